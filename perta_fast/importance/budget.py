"""The budget: which parameters' fp32 accumulators are held at once under --max-memory (parameter groups,
one pass over the data each) and where they live (on the device, or in host memory beside a GPU)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PertaError
from ..memory import rss_anon_bytes
from ..plan import Shapes, importance_working_bytes


def parameter_groups(sizes: dict[str, int], budget_bytes: float | None) -> list[list[str]]:
    """Consecutive parameters packed into groups whose fp32 accumulators fit `budget_bytes` each
    (None: one group). One pass over both data sets is made per group."""
    if budget_bytes is None:
        return [list(sizes)]
    groups, current, used = [], [], 0
    for name, numel in sizes.items():
        if current and used + 4 * numel > budget_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += 4 * numel
    return groups + ([current] if current else [])


def _in_use(model) -> int:
    """Memory the process holds now: CUDA allocations on a GPU; on the CPU private memory (RssAnon) plus
    the weights when they are not in it (transformers maps a checkpoint loaded in its own dtype instead of
    copying it: page cache, but resident all the same)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)

    held = rss_anon_bytes()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return held + weights if held < weights else held


HOST_HEADROOM = 1.25  # host memory asked for beyond the offloaded accumulators themselves (runtime, transfers)


def place_accumulators(scored_bytes: int, budget: float | None, device_type: str, host_free: float | None) -> str:
    """Where the fp32 accumulators live under --max-memory: "device" when all of them fit the budget left
    on the device; on a GPU, else "host" when they fit the host's available memory (one pass over the
    data, each parameter's batch contribution moved to the host as it completes: 4 bytes per scored
    parameter per batch over the bus); else "groups" (one pass over the data per parameter group). On the
    CPU the host is the device, so it is device or groups."""
    if budget is None or scored_bytes <= budget:
        return "device"
    if device_type == "cuda" and host_free is not None and HOST_HEADROOM * scored_bytes <= host_free:
        return "host"
    return "groups"


def accumulator_budget(model, model_dir, max_memory_gb: float | None, widest: tuple[int, int], batch_size: int,
                       max_length: int, method: str, checkpointing: bool) -> float | None:
    """Bytes the accumulators of one group may take: the budget less what the process holds now (runtime
    and weights, measured) and the activations and logits a batch will add (perta_fast.plan's formulas)."""
    if max_memory_gb is None:
        return None

    b = next(model.parameters()).element_size()
    shapes = Shapes.from_config(model.config.to_dict(), Path(model_dir) / "config.json")
    # the working set is an estimate, measured within 25 % (tests/test_plan.py): keep that much in reserve
    fixed = _in_use(model) + 1.25 * importance_working_bytes(shapes, batch_size, max_length, b, method,
                                                             checkpointing, widest)
    budget = max_memory_gb * 1e9 - fixed
    largest = widest[0] * widest[1]
    if budget < 4 * largest:
        need = (fixed + 4 * largest) / 1e9
        raise PertaError(f"--max-memory {max_memory_gb:g} GB is too small: the model, activations and one "
                         f"parameter's accumulator need at least {need:.2f} GB")
    return budget
