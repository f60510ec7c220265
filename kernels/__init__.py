"""Triton kernels (installed as `perta_fast.kernels`): the GPU fast path of `perta_fast.ops`.

One file per op, Liger-style: the `@triton.jit` kernel, a launcher that checks shapes and picks block
sizes; the torch reference each is tested against lives in `perta_fast.ops`. On a machine without a
GPU they run under `TRITON_INTERPRET=1` (that is how the tests check them).
"""
import os


def unavailable_reason() -> str | None:
    """None when the Triton kernels can run here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly, for testing)"
    return None
