"""The float dtypes a user names (--dtype, --weight-dtype), in one place; torch is imported only to
turn a name into a torch dtype, so the CLI and the plan can use the names without it."""
from __future__ import annotations

from .options import DTYPE_NAMES
from .console import log

NAMES = DTYPE_NAMES
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CONFIG_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # config.json's torch_dtype


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX). Without, torch emulates bf16 matmuls
    in a generic single-threaded loop: ~1 GFLOP/s against ~50 for fp32 on a 2-core AVX2 machine (measured)."""
    import torch

    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                      "_is_amx_tile_supported"))


def autocast(device, on: bool):
    """bf16 matmuls over the model's own (fp32) weights while `on` (torch.autocast); else nothing."""
    import contextlib

    import torch

    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


_warned = False


def warn_if_emulated_bf16(device, on: bool) -> None:
    """Once per process: a calibration scores under autocast at every λ."""
    import torch


    global _warned
    if on and torch.device(device).type == "cpu" and not cpu_has_fast_bf16() and not _warned:
        _warned = True
        log.warning("--bf16-autocast on a CPU without native bf16 (AVX-512 BF16 or AMX): its matmuls are emulated "
                    "there, tens of times slower than fp32")


def autocast_for(model, on: bool):
    """`autocast` on the model's device, warning first where bf16 is emulated. Its cast cache stays on: it
    holds a bf16 copy of every weight for the context's life (2 bytes a parameter, which `perta-fast plan
    --bf16-autocast` counts), but without it decoding recasts every weight for each token: a whole eval at
    135M took 152.0 s instead of 131.7 (benchmarks/RESULTS.md, "Evaluation in bf16 autocast")."""
    device = next(model.parameters()).device
    warn_if_emulated_bf16(device, on)
    return autocast(device, on)
