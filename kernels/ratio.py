"""w = s_f^p / (s_f^p + α·s_r^p + ε), written over s_f or into a (compact) output."""
import torch
import triton
import triton.language as tl


@triton.jit
def _ratio(sf, sr, alpha, power, eps, POW: tl.constexpr):
    if POW:  # p ≠ 1; p = 1 is a compile-time case without the pow
        sf = tl.exp2(power * tl.log2(sf))
        sr = tl.exp2(power * tl.log2(sr))
    w = sf / (sr * alpha + sf + eps)
    return tl.where(w == w, w, 0.0)  # 0/0: no evidence the parameter serves the forget set


@triton.jit
def _ratio_kernel(sf_ptr, sr_ptr, out_ptr, n, alpha, power, eps, POW: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    sf = tl.load(sf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sr = tl.load(sr_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = _ratio(sf, sr, alpha, power, eps, POW)
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


def ratio(s_f: torch.Tensor, s_r: torch.Tensor, alpha: float, power: float, eps: float, out: torch.Tensor,
          block: int = 1024) -> torch.Tensor:
    """`out` may be s_f itself (fp32): each element is read before it is written, by the same program."""
    if s_r.shape != s_f.shape or out.shape != s_f.shape or not out.is_contiguous():
        raise ValueError("s_f, s_r and out must have one shape, out contiguous")
    n = s_f.numel()
    if n:
        _ratio_kernel[(triton.cdiv(n, block),)](s_f.contiguous(), s_r.contiguous(), out, n, alpha, power, eps,
                                                POW=power != 1.0, BLOCK=block)
    return out
