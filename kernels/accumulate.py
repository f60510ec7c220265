"""acc (fp32) += g² or += g, in place, g in fp32/bf16/fp16."""
import torch
import triton
import triton.language as tl


@triton.jit
def _accumulate_kernel(acc_ptr, g_ptr, n, SQUARE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    acc += g * g if SQUARE else g
    tl.store(acc_ptr + offs, acc, mask=mask)


def accumulate_(acc: torch.Tensor, g: torch.Tensor, square: bool, block: int = 1024) -> torch.Tensor:
    if acc.dtype != torch.float32 or not acc.is_contiguous():
        raise ValueError("accumulator must be a contiguous float32 tensor")
    if g.shape != acc.shape:
        raise ValueError(f"gradient has shape {tuple(g.shape)}, expected {tuple(acc.shape)}")
    n = acc.numel()
    if n:
        _accumulate_kernel[(triton.cdiv(n, block),)](acc, g.contiguous(), n, SQUARE=square, BLOCK=block)
    return acc
