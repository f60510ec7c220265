"""w = s_f^p / (s_f^p + α·s_r^p + ε), written over s_f or into a (compact) output.

Numerics pinned to the torch reference (perta_fast.ops.ratio_weights): the same fp32 operations in the same
order, the division correctly rounded (`div_rn`; Triton's `/` is the approximate div.full.f32) and no fused
multiply-add (the launchers compile with enable_fp_fusion=False, and libdevice without ftz), so for p = 1 the result equals the reference to
the bit on a GPU as on the CPU. p ≠ 1 takes libdevice's powf (within 2 ulp, subnormal inputs and results kept as
torch keeps them; exp2/log2 would compile to ex2.approx.ftz and flush scores below 2^-126 to 0); the CPU
interpreter, which runs no libdevice, computes exp2(p·log2 s) in numpy instead."""
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

NO_POW, LIBDEVICE_POW, NUMPY_POW = 0, 1, 2
# launch options: no fp contraction, and libdevice without flush-to-zero (Triton compiles it with ftz by default)
PINNED = dict(enable_fp_fusion=False, enable_reflect_ftz=False)


def pow_mode(power: float) -> int:
    if power == 1.0:
        return NO_POW
    return NUMPY_POW if os.environ.get("TRITON_INTERPRET") == "1" else LIBDEVICE_POW


@triton.jit
def _pow(x, power, POW: tl.constexpr):
    if POW == 1:
        x = libdevice.pow(x, power)
    if POW == 2:
        x = tl.exp2(power * tl.log2(x))
    return x


@triton.jit
def _ratio(sf, sr, alpha, power, eps, POW: tl.constexpr):
    sf = _pow(sf, power, POW)
    sr = _pow(sr, power, POW)
    w = tl.div_rn(sf, sr * alpha + sf + eps)
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
                                                POW=pow_mode(power), BLOCK=block, **PINNED)
    return out
