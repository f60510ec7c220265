"""The engine's elementwise kernels: torch references, argument-checking launchers, and dispatch.

Each op has a plain-torch reference (the fallback and the test oracle) and fast backends: C++ on CPU
tensors (csrc/, built by the package install) and Triton on CUDA tensors (kernels/, installed as
perta_fast.kernels; under TRITON_INTERPRET=1 also on CPU tensors, for testing). The backend is chosen
per call from the tensors' device, unless `PERTA_FAST_BACKEND` (or `set_backend`, or a CLI
`--backend`) forces one; a forced backend that is unavailable falls back with a one-line warning.

Ops:
  accumulate_(acc, g, square)            acc (fp32) += g² or += g, in place
  ratio(s_f, s_r, α, p, ε, ...)          w = s_f^p / (s_f^p + α s_r^p + ε), optionally over s_f
  merge_tensors(base, ft, w | s_f,s_r)   base − λ·(w ⊙ (ft − base)) in base's dtype, one pass
                                         (delta=True: ft is τ itself, e.g. a block of a LoRA product)
  linear_fisher_(acc, x, g)              acc += Σ_b (g_bᵀ x_b)², a Linear's exact per-sample Fisher
"""
from __future__ import annotations

import os

import torch

from .console import log

BACKENDS = ("triton", "cpp", "torch")
KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_forced: str | None = None
_warned: set[str] = set()


# ---------------------------------------------------------------- torch references

def ratio_weights(s_f: torch.Tensor, s_r: torch.Tensor, alpha: float = 1.0, power: float = 1.0,
                  eps: float = 1e-16) -> torch.Tensor:
    """w = s_f^p / (s_f^p + α·s_r^p + ε) in fp32 (the torch reference for the ratio kernel).

    Inputs are never written (the streamed merge reads them as views of a shared mmap); the result
    is built in one fresh fp32 buffer so a merge step holds as few tensor-sized buffers as possible.
    """
    if power != 1.0:
        s_f, s_r = s_f.float().pow(power), s_r.float().pow(power)
    w = s_r.to(torch.float32, copy=True).mul_(alpha).add_(s_f).add_(eps)
    torch.div(s_f, w, out=w)
    # 0/0 (a parameter neither set touches, with ε = 0): no evidence it serves the forget set, so w = 0.
    return w.nan_to_num_(nan=0.0)


def merge_tensor(base: torch.Tensor, finetuned: torch.Tensor, w: torch.Tensor | None, lam: float,
                 delta: bool = False) -> torch.Tensor:
    """θ_full − λ·(w ⊙ (θ_ft − θ_full)) in fp32, returned in the base tensor's dtype (inputs untouched).
    With `delta`, `finetuned` is τ itself."""
    out = finetuned.to(torch.float32, copy=True)
    if not delta:
        out.sub_(base)
    if w is not None:
        out.mul_(w)
    return out.mul_(-lam).add_(base).to(base.dtype)


# ---------------------------------------------------------------- backends

def _load_cpp():
    try:
        from . import _cpp
    except ImportError as e:
        return None, f"C++ extension not built ({e}); reinstall with a C++ compiler and OpenMP"
    return _cpp, None


_CPP, _CPP_WHY = _load_cpp()
_TRITON_WHY: list = []  # computed on first need: importing triton is slow and the CPU path never needs it


def _triton_why() -> str | None:
    if not _TRITON_WHY:
        _TRITON_WHY.append(_triton_unavailable())
    return _TRITON_WHY[0]


def _triton_unavailable() -> str | None:
    """None when the Triton kernels (perta_fast.kernels) can run here, else why not."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if importlib.util.find_spec("perta_fast.kernels") is None:
        return "perta_fast.kernels is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly, for testing)"
    return None


def backend_status() -> dict[str, str | None]:
    """{backend: None if usable here, else why not}."""
    return {"triton": _triton_why(), "cpp": _CPP_WHY, "torch": None}


def set_backend(name: str | None) -> None:
    """Force a backend for every op (None: choose by device). Also read from PERTA_FAST_BACKEND."""
    global _forced
    if name not in (None, *BACKENDS):
        raise ValueError(f"unknown backend {name!r} (expected one of {', '.join(BACKENDS)})")
    _forced = name


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning("warning: %s", msg)


def pick_backend(*tensors: torch.Tensor) -> str:
    """The backend for an op over `tensors`: the forced one if usable, else by device and dtype."""
    forced = _forced or os.environ.get("PERTA_FAST_BACKEND") or None
    on_cuda = any(t.device.type == "cuda" for t in tensors)
    fits_cpp = all(t.device.type == "cpu" and t.dtype in KERNEL_DTYPES for t in tensors)
    fits_triton = all(t.dtype in KERNEL_DTYPES for t in tensors)
    why = {"cpp": _CPP_WHY, "torch": None}
    if forced == "triton" or on_cuda:
        why["triton"] = _triton_why()
    if forced:
        if forced not in BACKENDS:
            _warn_once(f"PERTA_FAST_BACKEND={forced!r} is not one of {', '.join(BACKENDS)}; choosing by device")
        elif why[forced] is not None:
            _warn_once(f"backend {forced} unavailable: {why[forced]}; falling back")
        elif (forced == "cpp" and not fits_cpp) or (forced == "triton" and not fits_triton):
            _warn_once(f"backend {forced} does not take these tensors (device/dtype); using another for them")
        else:
            return forced
    if on_cuda and fits_triton and why.get("triton") is None:
        return "triton"
    if fits_cpp and why["cpp"] is None:
        return "cpp"
    return "torch"


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1)


def _check_same_shape(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")


# ---------------------------------------------------------------- launchers

def accumulate_(acc: torch.Tensor, g: torch.Tensor, square: bool) -> torch.Tensor:
    """acc += g² (square) or acc += g, in place; acc must be fp32."""
    if acc.dtype != torch.float32:
        raise ValueError(f"accumulator must be float32, got {acc.dtype}")
    _check_same_shape("gradient", g, acc)
    if acc.numel() == 0:
        return acc
    backend = pick_backend(acc, g)
    if backend == "triton" and acc.is_contiguous():
        from .kernels.accumulate import accumulate_ as triton_accumulate_

        return triton_accumulate_(acc, g, square)
    if backend == "cpp" and acc.is_contiguous():
        g = _flat(g)
        _CPP.accumulate(acc.data_ptr(), g.data_ptr(), KERNEL_DTYPES[g.dtype], acc.numel(), square)
        return acc
    return acc.addcmul_(g, g) if square else acc.add_(g)


def ratio(s_f: torch.Tensor, s_r: torch.Tensor, alpha: float = 1.0, power: float = 1.0, eps: float = 1e-16,
          out_dtype: torch.dtype = torch.float32, over_s_f: bool = False) -> torch.Tensor:
    """w = s_f^p / (s_f^p + α·s_r^p + ε). With `over_s_f` (fp32, contiguous s_f, fp32 output) w is
    written over s_f's buffer, so no model-sized buffer is allocated; otherwise a new `out_dtype` tensor."""
    _check_same_shape("s_r", s_r, s_f)
    in_place = over_s_f and out_dtype == torch.float32 and s_f.dtype == torch.float32 and s_f.is_contiguous()
    backend = pick_backend(s_f, s_r)
    if backend == "triton" and out_dtype in KERNEL_DTYPES:
        from .kernels.ratio import ratio as triton_ratio

        out = s_f if in_place else torch.empty(s_f.shape, dtype=out_dtype, device=s_f.device)
        return triton_ratio(s_f, s_r, alpha, power, eps, out)
    if backend == "cpp" and s_f.dtype == s_r.dtype and out_dtype in KERNEL_DTYPES:
        out = s_f if in_place else torch.empty(s_f.shape, dtype=out_dtype)
        if out.numel():
            f, r = _flat(s_f), _flat(s_r)
            _CPP.ratio(f.data_ptr(), r.data_ptr(), KERNEL_DTYPES[f.dtype], out.data_ptr(), KERNEL_DTYPES[out_dtype],
                       out.numel(), alpha, power, eps)
        return out
    w = ratio_weights(s_f, s_r, alpha, power, eps)
    if in_place:
        return s_f.copy_(w)
    return w.to(out_dtype)


def merge_tensors(base: torch.Tensor, finetuned: torch.Tensor, w: torch.Tensor | None = None,
                  s_f: torch.Tensor | None = None, s_r: torch.Tensor | None = None, lam: float = 1.0,
                  alpha: float = 1.0, power: float = 1.0, eps: float = 1e-16,
                  out: torch.Tensor | None = None, nan_to_zero: bool = False,
                  delta: bool = False) -> tuple[torch.Tensor, float, int]:
    """(base − λ·(w ⊙ (ft − base)) in base's dtype, Σw, number of elements with a non-finite input). w is given,
    or formed from (s_f, s_r) on the fly without a w buffer, or 1 everywhere (TV) when neither is given.
    One read of each input, one write; NaN/Inf inputs are counted in the same pass and, with
    `nan_to_zero`, read as 0.

    `out` (base's shape and dtype, contiguous) receives the result when given: reusing one buffer across
    tensors spares the page faults of fresh memory, which cost more than the merge itself.

    With `delta`, `finetuned` is the task vector τ itself (fp32): a LoRA product formed block by block."""
    if w is not None and s_f is not None:
        raise ValueError("give w or (s_f, s_r), not both")
    if (s_f is None) != (s_r is None):
        raise ValueError("s_f and s_r go together")
    for name, t in (("finetuned", finetuned), ("w", w), ("s_f", s_f), ("s_r", s_r)):
        if t is not None:
            _check_same_shape(name, t, base)
    if out is not None and (out.shape != base.shape or out.dtype != base.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {base.dtype} tensor of shape {tuple(base.shape)}")
    if delta and finetuned.dtype != torch.float32:
        raise ValueError(f"a task vector (delta=True) must be float32, got {finetuned.dtype}")
    present = [t for t in (base, finetuned, w, s_f, s_r) if t is not None]
    backend = pick_backend(*present)
    if backend == "triton":
        from .kernels.merge import merge as triton_merge

        out = torch.empty_like(base, memory_format=torch.contiguous_format) if out is None else out
        return triton_merge(base, finetuned, w, s_f, s_r, out, lam, alpha, power, eps, nan_to_zero, delta)
    if backend == "cpp" and (s_f is None or s_f.dtype == s_r.dtype):
        out = torch.empty(base.shape, dtype=base.dtype) if out is None else out
        if not out.numel():
            return out, 0.0, 0
        flat = [None if t is None else _flat(t) for t in (base, finetuned, w, s_f, s_r)]
        b, f, wf, sf, sr = flat
        w_sum, nonfinite = _CPP.merge(
            b.data_ptr(), KERNEL_DTYPES[b.dtype], f.data_ptr(), KERNEL_DTYPES[f.dtype],
            wf.data_ptr() if wf is not None else 0, KERNEL_DTYPES[wf.dtype] if wf is not None else 0,
            sf.data_ptr() if sf is not None else 0, sr.data_ptr() if sr is not None else 0,
            KERNEL_DTYPES[sf.dtype] if sf is not None else 0, out.data_ptr(), out.numel(), lam, alpha, power, eps,
            nan_to_zero, delta)
        return out, w_sum, nonfinite
    inputs = {"base": base, "finetuned": finetuned, "w": w, "s_f": s_f, "s_r": s_r}
    bad = torch.zeros(base.shape, dtype=torch.bool, device=base.device)
    for t in inputs.values():
        if t is not None:
            bad |= ~torch.isfinite(t)
    nonfinite = int(bad.sum())
    if nonfinite and nan_to_zero:
        inputs = {k: None if t is None else torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
                  for k, t in inputs.items()}
    base, finetuned, w = inputs["base"], inputs["finetuned"], inputs["w"]
    if s_f is not None:
        w = ratio_weights(inputs["s_f"], inputs["s_r"], alpha, power, eps)
    w_sum = float(w.sum(dtype=torch.float64)) if w is not None else float(base.numel())
    merged = merge_tensor(base, finetuned, w, lam, delta)
    return (merged if out is None else out.copy_(merged)), w_sum, nonfinite


CHUNK_ELEMENTS = 1 << 25  # per-sample gradients the torch path holds at once: 128 MiB of fp32


def linear_fisher_(acc: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """acc (out, in) += Σ_b (g_bᵀ x_b)² for x (B, T, in), g (B, T, out): the exact per-sample Fisher of a
    Linear weight. Triton keeps each tile in registers; the torch reference forms the per-sample
    gradients in chunks with a batched matmul and adds their squares with `accumulate_`."""
    b, n_out, n_in = x.shape[0], g.shape[-1], x.shape[-1]
    x, g = x.reshape(b, -1, n_in), g.reshape(b, -1, n_out)
    if pick_backend(acc, x, g) == "triton":
        from .kernels.fisher import per_sample_sq_

        return per_sample_sq_(acc, x, g)
    # on CUDA, 16-bit inputs multiply in their own dtype with fp32 output (exact products, fp32 sums, tensor cores);
    # elsewhere in fp32 (CPU bmm has no fp32 output for 16-bit inputs)
    native = x.is_cuda and x.dtype == g.dtype and x.dtype in (torch.bfloat16, torch.float16)
    x = x if native else x.float()
    for o0, o1, chunk in per_sample_tiles(n_out, n_in, b):
        for s in range(0, b, chunk):
            g_tile = g[s:s + chunk, :, o0:o1].transpose(1, 2)
            per_sample = (torch.bmm(g_tile, x[s:s + chunk], out_dtype=torch.float32) if native
                          else torch.bmm(g_tile.float(), x[s:s + chunk]))
            add_squares_(acc[o0:o1], per_sample)
    return acc


def per_sample_tiles(n_rows: int, n_cols: int, batch: int):
    """(row start, row stop, samples at once) so that a chunk of per-sample gradients, samples × rows ×
    n_cols, never exceeds CHUNK_ELEMENTS, however large the layer: rows are tiled when one sample's
    whole gradient would not fit."""
    rows = min(n_rows, max(1, CHUNK_ELEMENTS // max(1, n_cols)))
    chunk = max(1, min(batch, CHUNK_ELEMENTS // max(1, rows * n_cols)))
    for r0 in range(0, n_rows, rows):
        yield r0, min(n_rows, r0 + rows), chunk


def add_squares_(acc: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """acc += Σ_b per_sample[b]², one fused read of each per-sample gradient."""
    for grad in per_sample:
        accumulate_(acc, grad, square=True)
    return acc
