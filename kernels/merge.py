"""Fused merge: out = base − λ·(w ⊙ (ft − base)) (or, with DELTA, base − λ·(w ⊙ τ)) in base's dtype, w given, formed from (s_f, s_r) on the
fly, or 1 (TV); one read of each input, one write, fp32 math: b − λ·(w·d) rounded at each step as the torch
reference rounds it (compiled without fused multiply-add, which would round once where the reference rounds twice). Also returns Σw and the number of
elements with a non-finite input (read as 0 when asked), from per-program partials, so no second pass is needed."""
import torch
import triton
import triton.language as tl

from .ratio import PINNED, _ratio, pow_mode

TV, WEIGHTS, SCORES = 0, 1, 2


@triton.jit
def _finite(x):
    return (x - x) == 0.0  # false for NaN and ±inf


@triton.jit
def _merge_kernel(base_ptr, ft_ptr, w_ptr, sf_ptr, sr_ptr, out_ptr, wsum_ptr, bad_ptr, n, lam, alpha, power, eps,
                  MODE: tl.constexpr, POW: tl.constexpr, ZERO: tl.constexpr, DELTA: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(ft_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.full((BLOCK,), 1.0, tl.float32)
    y = tl.zeros((BLOCK,), tl.float32)
    if MODE == 1:
        x = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 2:
        x = tl.load(sf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(sr_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bad = (~(_finite(b) & _finite(f) & _finite(x) & _finite(y))).to(tl.int32)  # elements, not values
    if ZERO:
        b = tl.where(_finite(b), b, 0.0)
        f = tl.where(_finite(f), f, 0.0)
        x = tl.where(_finite(x), x, 0.0)
        y = tl.where(_finite(y), y, 0.0)
    w = x
    if MODE == 2:
        w = _ratio(x, y, alpha, power, eps, POW)
    d = f if DELTA else f - b  # DELTA: ft_ptr holds τ itself (a block of a LoRA product)
    tl.store(out_ptr + offs, (b - lam * (w * d)).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(wsum_ptr + pid, tl.sum(tl.where(mask, w, 0.0), axis=0))
    tl.store(bad_ptr + pid, tl.sum(tl.where(mask, bad, 0), axis=0))


def merge(base, ft, w, s_f, s_r, out, lam, alpha, power, eps, nan_to_zero, delta=False, block: int = 1024):
    """Launcher; the caller (perta_fast.ops.merge_tensors) has checked shapes and dtypes."""
    n = base.numel()
    if n == 0:
        return out, 0.0, 0
    grid = triton.cdiv(n, block)
    wsum = torch.empty(grid, dtype=torch.float32, device=base.device)
    bad = torch.empty(grid, dtype=torch.int32, device=base.device)
    mode = WEIGHTS if w is not None else SCORES if s_f is not None else TV
    dummy = base  # never read: the constexpr MODE removes those loads
    _merge_kernel[(grid,)](base.contiguous(), ft.contiguous(), dummy if w is None else w.contiguous(),
                           dummy if s_f is None else s_f.contiguous(), dummy if s_r is None else s_r.contiguous(),
                           out, wsum, bad, n, lam, alpha, power, eps, MODE=mode, POW=pow_mode(power),
                           ZERO=nan_to_zero, DELTA=delta, BLOCK=block, **PINNED)
    return out, float(wsum.sum(dtype=torch.float64)), int(bad.sum())
