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
    g = g.contiguous()
    # a size divisible by 16 lets the compiler prove whole vectors in bounds (ptxas: ld.global.v4 only then); the
    # last n % 16 elements go in a launch of their own, which starts 16-element, so 16-byte, aligned
    bulk = n - n % 16
    for start, stop in ((0, bulk), (bulk, n)):
        if stop > start:
            part = stop - start
            _accumulate_kernel[(triton.cdiv(part, block),)](acc.view(-1)[start:stop], g.view(-1)[start:stop], part,
                                                           SQUARE=square, BLOCK=block)
    return acc
