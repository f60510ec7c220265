"""Data parallelism over torchrun, for the two steps that read whole data sets: importance and finetune.

    torchrun --nproc_per_node=N -m perta_fast importance ...     (or finetune)

Every rank loads the whole model and takes its share of each set's batches; nothing else changes. The
importance accumulators are summed with one all-reduce per tensor at the end and rank 0 writes the file;
fine-tuning wraps the model in DistributedDataParallel and splits each batch of --batch-size rows across
the ranks, so a step's gradient is the same mean over the same rows as in one process. NCCL on CUDA
(each rank on cuda:LOCAL_RANK), gloo on the CPU. Without torchrun every function here is a no-op.
"""
from __future__ import annotations

import os
import sys

from .errors import PertaError

COMMANDS = ("importance", "finetune")  # the CLI commands that run under torchrun


def launched() -> bool:
    """True inside a torchrun of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _group():
    dist = sys.modules.get("torch.distributed")  # not imported: no group (and `plan` stays free of torch)
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def setup(device: str | None) -> None:
    """Join the process group torchrun describes in the environment (once; no-op without torchrun)."""
    if not launched() or _group() is not None:
        return
    import torch
    import torch.distributed as dist

    cuda = str(device).startswith("cuda") or (device in (None, "auto") and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


def teardown() -> None:
    if _group() is not None:
        _group().destroy_process_group()


def rank_and_size() -> tuple[int, int]:
    dist = _group()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def is_main() -> bool:
    return rank_and_size()[0] == 0


def local_cuda() -> str:
    """This rank's GPU under torchrun (`cuda` alone would put every rank on GPU 0)."""
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if _group() else "cuda"


def refuse(what: str) -> None:
    """An option this build does not support under torchrun: a one-line error before any work."""
    if launched():
        raise PertaError(f"{what} is not supported under torchrun (run it in one process)")


def agree(facts: dict[str, str], what: str) -> None:
    """Every rank must hold the same `facts` (data hashes, options); otherwise every rank raises the same
    one-line error naming the first that differs, before any work is done."""
    dist = _group()
    if dist is None:
        return
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, facts)
    for rank, theirs in enumerate(gathered[1:], start=1):
        for key, value in gathered[0].items():
            if theirs.get(key) != value:
                raise PertaError(f"torchrun ranks disagree on {what}: rank {rank}'s {key} is {str(theirs.get(key))[:16]!r}, "
                                 f"rank 0's is {str(value)[:16]!r}")


def _device():
    return local_cuda() if _group().get_backend() == "nccl" else "cpu"


def sum_(tensors) -> None:
    """Sum each tensor over the ranks, in place: one all-reduce per tensor. A tensor NCCL cannot reach
    (host-offloaded accumulators) goes through the GPU one at a time."""
    dist = _group()
    if dist is None:
        return
    device = _device()
    for t in tensors:
        if t.device.type == device.split(":")[0]:
            dist.all_reduce(t)
        else:
            on_device = t.to(device)
            dist.all_reduce(on_device)
            t.copy_(on_device)
            del on_device


def reduce_float(x: float, op: str = "sum") -> float:
    dist = _group()
    if dist is None:
        return x
    import torch

    t = torch.tensor([x], dtype=torch.float64, device=_device())
    dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
    return float(t.item())


def barrier() -> None:
    dist = _group()
    if dist is not None:
        dist.barrier()


def shard(batch: list, rank: int, size: int) -> tuple[list, bool]:
    """This rank's rows of a batch (every size-th), or, when the batch has fewer rows than ranks, one row
    to run with weight 0 (DDP needs every rank to run a backward) and False."""
    mine = batch[rank::size]
    return (mine, True) if mine else (batch[:1], False)
