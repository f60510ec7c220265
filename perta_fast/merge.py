"""The PerTA merge: θ_u = θ_full − λ·(w ⊙ τ), τ = θ_ft − θ_full, streamed one tensor at a time.

A plan (what to read, compute, write; all validation from headers alone) is built first, then an
executor streams tensors from the mmap'd inputs into a sharded writer, so peak memory is a few
tensors whatever the model size.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import PertaError
from .io import Checkpoint, SafetensorsFile, ShardedWriter, atomic_dir, copy_aux_files
from .ops import merge_tensor, merge_tensors, pick_backend, ratio_weights  # noqa: F401  (references re-exported)

IMPORTANCE_PREFIXES = ("forget/", "retain/", "weight/")


@dataclass
class MergeOptions:
    method: str = "perta"  # "perta" (w from importance) or "tv" (w ≡ 1)
    lam: float = 1.0
    alpha: float = 1.0
    power: float = 1.0
    eps: float = 1e-16
    nan_to_zero: bool = False
    max_shard_bytes: int = 2 * 1024**3


@dataclass
class TensorStep:
    name: str
    shape: tuple
    dtype: torch.dtype
    action: str  # "merge" or "copy" (non-float tensors)
    weight_key: str | None = None  # importance tensor name(s) for this parameter (without prefix)


@dataclass
class MergePlan:
    base: Path
    finetuned: Path
    importance: Path | None
    options: MergeOptions
    steps: list[TensorStep] = field(default_factory=list)
    importance_kind: str | None = None  # "scores" (forget/retain) or "weights"
    importance_meta: dict = field(default_factory=dict)


def _importance_index(imp: SafetensorsFile) -> tuple[str, dict[str, tuple]]:
    """Which kind of importance file this is, and the shape of each parameter it covers."""
    shapes: dict[str, dict[str, tuple]] = {p: {} for p in IMPORTANCE_PREFIXES}
    for key in imp.keys():
        prefix = next((p for p in IMPORTANCE_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise PertaError(f"{imp.path}: unexpected tensor {key!r} (names must start with forget/, retain/ or weight/)")
        shapes[prefix][key[len(prefix):]] = imp.info(key)[0]
    if shapes["weight/"]:
        if shapes["forget/"] or shapes["retain/"]:
            raise PertaError(f"{imp.path}: holds both weight/ and forget/retain tensors; expected one kind")
        return "weights", shapes["weight/"]
    if set(shapes["forget/"]) != set(shapes["retain/"]):
        missing = sorted(set(shapes["forget/"]) ^ set(shapes["retain/"]))[0]
        raise PertaError(f"{imp.path}: forget/ and retain/ cover different parameters (e.g. {missing})")
    if not shapes["forget/"]:
        raise PertaError(f"{imp.path}: no importance tensors")
    for k in ("method", "n_forget", "n_retain"):
        if k not in imp.metadata:
            raise PertaError(f"{imp.path}: metadata lacks {k!r}")
    for name, shape in shapes["forget/"].items():
        if shapes["retain/"][name] != shape:
            raise PertaError(f"{imp.path}: forget/{name} and retain/{name} differ in shape")
    return "scores", shapes["forget/"]


def _tied_partner(name: str, covered: dict) -> str | None:
    """The embedding an untied copy of a tied lm_head stands for, if the importance file has it."""
    if name.endswith("lm_head.weight"):
        return next((k for k in covered if k.endswith("embed_tokens.weight")), None)
    return None


def plan_merge(base: str | Path, finetuned: str | Path, importance: str | Path | None = None,
               options: MergeOptions | None = None, allow_pickle: bool = False) -> MergePlan:
    """Check that the inputs fit together, from headers only, and list what to compute."""
    options = options or MergeOptions()
    if options.method not in ("perta", "tv"):
        raise PertaError(f"unknown merge method {options.method!r} (expected perta or tv)")
    base_ck = Checkpoint(base, allow_pickle)
    ft_ck = Checkpoint(finetuned, allow_pickle)
    if base_ck.architecture != ft_ck.architecture:
        raise PertaError(f"{ft_ck.folder}: architecture {ft_ck.architecture} differs from base {base_ck.architecture}")
    base_names, ft_names = set(base_ck.names()), set(ft_ck.names())
    if base_names != ft_names:
        odd = sorted(base_names ^ ft_names)[0]
        where = base_ck.folder if odd in base_names else ft_ck.folder
        raise PertaError(f"{ft_ck.folder}: tensor names differ from {base_ck.folder} (e.g. {odd!r} only in {where})")
    plan = MergePlan(Path(base), Path(finetuned), Path(importance) if importance else None, options)
    covered: dict[str, tuple] = {}
    if options.method == "perta":
        if importance is None:
            raise PertaError("method perta needs an importance file (--importance)")
        imp = SafetensorsFile(importance)
        plan.importance_kind, covered = _importance_index(imp)
        plan.importance_meta = dict(imp.metadata)
        unknown = sorted(set(covered) - base_names)
        if unknown:
            raise PertaError(f"{imp.path}: importance file is for another model ({unknown[0]!r} is not in {base_ck.folder})")
    for name in base_ck.names():
        shape, dtype = base_ck.info(name)
        ft_shape, ft_dtype = ft_ck.info(name)
        if ft_shape != shape:
            raise PertaError(f"{ft_ck.folder}: tensor {name} has shape {list(ft_shape)}, base has {list(shape)}")
        if not dtype.is_floating_point:
            plan.steps.append(TensorStep(name, shape, dtype, "copy"))
            continue
        key = None
        if options.method == "perta":
            key = name if name in covered else (_tied_partner(name, covered) if base_ck.ties_embeddings else None)
            if key is None:
                raise PertaError(f"{importance}: importance file is for another model (no entry for {name!r})")
            if covered[key] != shape:
                raise PertaError(f"{importance}: importance for {name} has shape {list(covered[key])}, model has {list(shape)}")
        plan.steps.append(TensorStep(name, shape, dtype, "merge", key))
    return plan


def _raise_nonfinite(inputs: list[tuple[Path, str, torch.Tensor]]):
    """The merge kernel counted NaN/Inf among a step's inputs, (file, tensor name, tensor) triples
    already in hand: name the first file and tensor that hold them."""
    where, name = next((path, name) for path, name, t in inputs if not torch.isfinite(t).all())
    raise PertaError(f"{where}: tensor {name} contains NaN or Inf (pass --nan-to-zero to treat them as 0)")


def _release_freed_memory():
    """glibc raises its mmap threshold after large frees and then keeps freed tensor buffers on
    its heap, so private memory creeps up with the number of tensors; hand those pages back."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def execute_merge(plan: MergePlan, out_folder: Path, progress: bool = True) -> dict:
    """Stream every tensor through the merge into `out_folder` (which must exist and be empty)."""
    from tqdm import tqdm

    opts = plan.options
    base_ck, ft_ck = Checkpoint(plan.base, True), Checkpoint(plan.finetuned, True)
    imp = SafetensorsFile(plan.importance) if plan.importance else None
    layout = [(s.name, s.shape, s.dtype) for s in plan.steps]
    writer = ShardedWriter(out_folder, layout, opts.max_shard_bytes, {"perta_fast": __version__})
    w_sum, w_count = 0.0, 0
    # One output buffer for every tensor: fresh memory would be page-faulted in on each step, which
    # costs more than the merge arithmetic itself.
    scratch = torch.empty(max((s.dtype.itemsize * torch.Size(s.shape).numel() for s in plan.steps), default=0),
                          dtype=torch.uint8)
    for step in tqdm(plan.steps, desc="merge", unit="tensor", disable=not progress):
        base = base_ck.get(step.name)
        if step.action == "copy":
            writer.write(step.name, base)
            continue
        ft = ft_ck.get(step.name)
        scores = {}
        if imp is not None:
            keys = {"w": "weight/"} if plan.importance_kind == "weights" else {"s_f": "forget/", "s_r": "retain/"}
            scores = {arg: imp.get(prefix + step.weight_key) for arg, prefix in keys.items()}
        out = scratch[:base.numel() * base.element_size()].view(base.dtype).view(base.shape)
        merged, step_w_sum, nonfinite = merge_tensors(base, ft, **scores, lam=opts.lam, alpha=opts.alpha,
                                                      power=opts.power, eps=opts.eps, out=out,
                                                      nan_to_zero=opts.nan_to_zero)
        if nonfinite and not opts.nan_to_zero:
            _raise_nonfinite([(base_ck.file_of(step.name), step.name, base), (ft_ck.file_of(step.name), step.name, ft)]
                             + [(imp.path, step.weight_key, t) for t in scores.values()])
        writer.write(step.name, merged)
        if imp is not None:
            w_sum += step_w_sum
            w_count += base.numel()
        backend = pick_backend(base, ft, *scores.values())
        del base, ft, scores, merged, out
        if backend == "torch":  # the fused kernels allocate nothing model-sized; torch's temporaries do
            _release_freed_memory()
    writer.close()
    return {"tensors": len(plan.steps), "mean_weight": (w_sum / w_count) if w_count else 1.0,
            "shards": len(writer.shard_names)}


def merge(base: str | Path, finetuned: str | Path, out: str | Path, importance: str | Path | None = None,
          options: MergeOptions | None = None, overwrite: bool = False, allow_pickle: bool = False,
          progress: bool = True) -> dict:
    """Plan, execute and record a merge; the output folder appears only when complete."""
    t0 = time.perf_counter()
    plan = plan_merge(base, finetuned, importance, options, allow_pickle)
    inputs = (plan.base, plan.finetuned) + ((plan.importance,) if plan.importance else ())
    with atomic_dir(out, overwrite, inputs) as tmp:
        stats = execute_merge(plan, tmp, progress)
        copy_aux_files(plan.base, tmp)
        record = {
            "tool": f"perta-fast {__version__}",
            "formula": "theta_u = theta_full - lam * (w * (theta_ft - theta_full))",
            "base": str(Path(base).resolve()), "finetuned": str(Path(finetuned).resolve()),
            "importance": str(Path(importance).resolve()) if importance else None,
            "importance_kind": plan.importance_kind, "importance_meta": plan.importance_meta,
            "options": asdict(plan.options), **stats, "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / "perta_merge.json").write_text(json.dumps(record, indent=2))
    return record
