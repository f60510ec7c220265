"""The PerTA merge: θ_u = θ_full − λ·(w ⊙ τ), τ = θ_ft − θ_full, streamed one tensor at a time.

A plan (what to read, compute, write; all validation from headers alone) is built first, then an
executor streams tensors from the mmap'd inputs into a sharded writer, so peak memory is a few
tensors whatever the model size. θ_ft is a checkpoint folder, or a peft LoRA adapter folder: then τ of
each targeted weight is formed a block of rows at a time from its factors (perta_fast.lora) and merged
in the same kernels; untargeted tensors have τ = 0 and are copied bit for bit. Math runs on
`options.device` (the storage device is the CPU, where the files are mapped).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ._version import __version__
from .console import bar
from .errors import PertaError
from .io import Checkpoint, SafetensorsFile, ShardedWriter, copy_aux_files
from .outputs import atomic_dir
from .memory import release_freed_memory
from .lora import LoraAdapter, delta_rows, is_adapter, read_adapter
from .options import MergeOptions
from .ops import merge_tensor, merge_tensors, pick_backend, ratio_weights  # noqa: F401  (references re-exported)
from .models import pick_device

IMPORTANCE_PREFIXES = ("forget/", "retain/", "weight/")


LORA_BLOCK_ELEMENTS = 1 << 22  # rows of a LoRA product formed at once: 16 MiB of fp32 whatever the layer


@dataclass
class TensorStep:
    name: str
    shape: tuple
    dtype: torch.dtype
    action: str  # "merge", "lora" (τ from adapter factors) or "copy" (non-float, or untouched by an adapter)
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
    adapter: LoraAdapter | None = None  # when θ_ft is given as a LoRA adapter folder


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
    if options.device != "cpu":
        pick_device(options.device)  # a clear error where the device is missing
    base_ck = Checkpoint(base, allow_pickle)
    plan = MergePlan(Path(base), Path(finetuned), Path(importance) if importance else None, options)
    base_names = set(base_ck.names())
    if is_adapter(finetuned):
        plan.adapter = read_adapter(finetuned, base_ck)
    else:
        ft_ck = Checkpoint(finetuned, allow_pickle)
        if base_ck.architecture != ft_ck.architecture:
            raise PertaError(f"{ft_ck.folder}: architecture {ft_ck.architecture} differs from base {base_ck.architecture}")
        ft_names = set(ft_ck.names())
        if base_names != ft_names:
            odd = sorted(base_names ^ ft_names)[0]
            where = base_ck.folder if odd in base_names else ft_ck.folder
            raise PertaError(f"{ft_ck.folder}: tensor names differ from {base_ck.folder} (e.g. {odd!r} only in {where})")
    covered: dict[str, tuple] = {}
    if options.method == "tv" and importance is not None:  # TV weighs nothing: the file would be ignored
        raise PertaError(f"{importance}: --importance is for --method perta; tv subtracts λ·τ unweighted "
                         "(drop --importance, or use --method perta)")
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
        if plan.adapter is None:
            ft_shape, ft_dtype = ft_ck.info(name)
            if ft_shape != shape:
                raise PertaError(f"{ft_ck.folder}: tensor {name} has shape {list(ft_shape)}, base has {list(shape)}")
        if not dtype.is_floating_point or (plan.adapter is not None and name not in plan.adapter.targets):
            plan.steps.append(TensorStep(name, shape, dtype, "copy"))
            continue
        key = None
        if options.method == "perta":
            key = name if name in covered else (_tied_partner(name, covered) if base_ck.ties_embeddings else None)
            if key is None:
                raise PertaError(f"{importance}: importance file is for another model (no entry for {name!r})")
            if covered[key] != shape:
                raise PertaError(f"{importance}: importance for {name} has shape {list(covered[key])}, model has {list(shape)}")
        plan.steps.append(TensorStep(name, shape, dtype, "merge" if plan.adapter is None else "lora", key))
    return plan


def _raise_nonfinite(inputs: list[tuple[Path, str, torch.Tensor]]):
    """The merge kernel counted NaN/Inf among a step's inputs, (file, tensor name, tensor) triples
    already in hand: name the first file and tensor that hold them."""
    where, name = next((path, name) for path, name, t in inputs if not torch.isfinite(t).all())
    raise PertaError(f"{where}: tensor {name} contains NaN or Inf (pass --nan-to-zero to treat them as 0)")


class MergeExecutor:
    """Streams a plan's tensors through the merge kernels, one at a time: into a sharded writer
    (`execute_merge`), or into a loaded model's parameters (perta_fast.calibration, which moves one model
    over many λ with the same kernels, hence the same numbers, as the written checkpoint)."""

    def __init__(self, plan: MergePlan):
        self.plan, self.opts = plan, plan.options
        self.device = torch.device(plan.options.device)
        self.base_ck = Checkpoint(plan.base, True)
        self.ft_ck = None if plan.adapter else Checkpoint(plan.finetuned, True)
        self.imp = SafetensorsFile(plan.importance) if plan.importance else None
        self.w_sum, self.w_count = 0.0, 0
        self.backends: set[str] = set()  # the kernels that merged, recorded (and checked by the tests)
        # One output buffer for every tensor: fresh memory would be page-faulted in on each step, which
        # costs more than the merge arithmetic itself.
        merged = [s for s in plan.steps if s.action != "copy"]
        self.scratch = torch.empty(max((s.dtype.itemsize * torch.Size(s.shape).numel() for s in merged), default=0),
                                   dtype=torch.uint8, device=self.device)
        lora_cols = max((s.shape[-1] for s in merged if s.action == "lora"), default=0)
        self.tau = torch.empty(max(LORA_BLOCK_ELEMENTS, lora_cols) if lora_cols else 0, dtype=torch.float32,
                               device=self.device)

    def _scores(self, step) -> tuple[dict, list]:
        """The step's importance tensors by kernel argument, and (file, name, tensor) for error messages."""
        if self.imp is None:
            return {}, []
        keys = {"w": "weight/"} if self.plan.importance_kind == "weights" else {"s_f": "forget/", "s_r": "retain/"}
        scores = {arg: self.imp.get(prefix + step.weight_key) for arg, prefix in keys.items()}
        return ({arg: t.to(self.device) for arg, t in scores.items()},
                [(self.imp.path, prefix + step.weight_key, scores[arg]) for arg, prefix in keys.items()])

    def _out(self, base):
        return self.scratch[:base.numel() * base.element_size()].view(base.dtype).view(base.shape)

    def _merge(self, step, base, base_dev):
        ft = self.ft_ck.get(step.name)
        scores, sources = self._scores(step)
        merged, w_sum, nonfinite = merge_tensors(base_dev, ft.to(self.device), **scores, out=self._out(base),
                                                 **self._knobs())
        inputs = [(self.base_ck.file_of(step.name), step.name, base), (self.ft_ck.file_of(step.name), step.name, ft)]
        return merged, w_sum, nonfinite, inputs + sources

    def _lora(self, step, base, base_dev):
        """τ = Σ scale·L·R formed a block of rows at a time, each block merged as it is formed."""
        adapter = self.plan.adapter
        stored = [(f, *adapter.stored(f)) for f in adapter.targets[step.name]]
        factors = [(f, *adapter.factors(f, a, b, self.device)) for f, a, b in stored]
        scores, sources = self._scores(step)
        out = self._out(base)
        rows, cols = base.shape
        block = max(1, self.tau.numel() // cols)
        w_sum, nonfinite = 0.0, 0
        for start in range(0, rows, block):
            stop = min(rows, start + block)
            tau = delta_rows(factors, start, stop, self.tau[:(stop - start) * cols].view(stop - start, cols))
            _, s, bad = merge_tensors(base_dev[start:stop], tau, **{k: v[start:stop] for k, v in scores.items()},
                                      out=out[start:stop], delta=True, **self._knobs())
            w_sum, nonfinite = w_sum + s, nonfinite + bad
        inputs = [(self.base_ck.file_of(step.name), step.name, base)]
        inputs += [(adapter.file.path, key, t) for f, a, b in stored for key, t in ((f.a_key, a), (f.b_key, b))]
        return out, w_sum, nonfinite, inputs + sources

    def _knobs(self) -> dict:
        o = self.opts
        return {"lam": o.lam, "alpha": o.alpha, "power": o.power, "eps": o.eps, "nan_to_zero": o.nan_to_zero}

    @property
    def mean_weight(self) -> float:
        return (self.w_sum / self.w_count) if self.w_count else 1.0

    def tensors(self, steps, lam: float | None = None):
        """(step, tensor) for each step, merged at `lam` (default: the plan's λ) or, for a copy step, as
        stored. The merged tensor lives in a buffer the next step reuses: use it before asking for the next."""
        if lam is not None:
            self.opts = replace(self.opts, lam=lam)
        self.w_sum, self.w_count = 0.0, 0
        for step in steps:
            base = self.base_ck.get(step.name)
            if step.action == "copy":
                yield step, base
                continue
            base_dev = base.to(self.device)
            merged, w_sum, nonfinite, inputs = (self._lora if step.action == "lora" else self._merge)(step, base, base_dev)
            if nonfinite and not self.opts.nan_to_zero:
                _raise_nonfinite(inputs)
            yield step, merged
            if self.imp is not None:
                self.w_sum += w_sum
                self.w_count += base.numel()
            backend = pick_backend(base_dev, *(t for _, _, t in inputs[1:]))
            self.backends.add(backend)
            del base, base_dev, merged, inputs
            if backend == "torch":  # the fused kernels allocate nothing model-sized; torch's temporaries do
                release_freed_memory()


def execute_merge(plan: MergePlan, out_folder: Path, progress: bool = True) -> dict:
    """Stream every tensor through the merge into `out_folder` (which must exist and be empty)."""
    executor = MergeExecutor(plan)
    layout = [(s.name, s.shape, s.dtype) for s in plan.steps]
    writer = ShardedWriter(out_folder, layout, plan.options.max_shard_bytes, {"perta_fast": __version__})
    with writer:  # an error closes the shard being written (its folder is the caller's to remove)
        for step, tensor in executor.tensors(bar(plan.steps, progress, desc="merge", unit="tensor")):
            writer.write(step.name, tensor)
    return {"tensors": len(plan.steps), "mean_weight": executor.mean_weight, "shards": len(writer.shard_names),
            "merged_tensors": sum(s.action != "copy" for s in plan.steps), "backends": sorted(executor.backends)}


def merge(base: str | Path, finetuned: str | Path, out: str | Path, importance: str | Path | None = None,
          options: MergeOptions | None = None, overwrite: bool = False, allow_pickle: bool = False,
          progress: bool = True) -> dict:
    """Plan, execute and record a merge; the output folder appears only when complete."""
    t0 = time.perf_counter()
    plan = plan_merge(base, finetuned, importance, options, allow_pickle)
    inputs = (plan.base, plan.finetuned) + ((plan.importance,) if plan.importance else ())
    with atomic_dir(out, overwrite, inputs) as tmp:
        return write_merge(plan, tmp, progress, t0)


def write_merge(plan: MergePlan, folder: Path, progress: bool = True, t0: float | None = None) -> dict:
    """Execute `plan` into the empty `folder` with the base's config and tokenizer, its record
    (perta_merge.json) and a model card; publishing the folder is the caller's (merge renames it into
    place; unlearn adds its own record first). `t0`: when the merge began (default: now)."""
    t0 = time.perf_counter() if t0 is None else t0
    stats = execute_merge(plan, folder, progress)
    copy_aux_files(plan.base, folder)
    record = {
        "tool": f"perta-fast {__version__}",
        "formula": "theta_u = theta_full - lam * (w * (theta_ft - theta_full))",
        "base": str(plan.base.resolve()), "finetuned": str(plan.finetuned.resolve()),
        "finetuned_kind": "lora adapter" if plan.adapter else "checkpoint",
        "importance": str(plan.importance.resolve()) if plan.importance else None,
        "importance_kind": plan.importance_kind, "importance_meta": plan.importance_meta,
        "options": asdict(plan.options), **stats, "seconds": round(time.perf_counter() - t0, 3),
    }
    (folder / "perta_merge.json").write_text(json.dumps(record, indent=2))
    (folder / "README.md").write_text(model_card(record))  # not the base's card: this is another model
    return record


def model_card(record: dict) -> str:
    """The output's README.md: what was done to which model, so that the folder never presents itself
    as the base model (whose card would otherwise be copied with its config)."""
    opts, meta = record["options"], record.get("importance_meta") or {}
    # folder and file names only: a card travels with the model (to a hub, to colleagues), and the paths of this
    # machine mean nothing there; perta_merge.json keeps them in full. No base_model in the front matter: the
    # hub reads it as a repository id, and θ_full was a local folder.
    name = lambda path: Path(path).name  # noqa: E731
    lines = ["---", "tags:", "- unlearning", "- perta-fast", "---", "",
             "# Unlearned model (perta-fast)", "",
             f"Made by {record['tool']} from `{name(record['base'])}` (θ_full), stepping against the task vector of "
             f"`{name(record['finetuned'])}` (θ_ft, a {record['finetuned_kind']}):", "",
             f"    {record['formula']}", "",
             f"- method: {opts['method']}, λ = {opts['lam']:g}" + (f", α = {opts['alpha']:g}, p = {opts['power']:g}, "
                                                                  f"ε = {opts['eps']:g}" if opts["method"] == "perta" else ""),
             f"- importance: `{name(record['importance'])}`" if record.get("importance") else "- importance: none (w = 1)"]
    if meta:
        lines.append(f"- importance estimated by `{meta.get('method', '?')}` on {meta.get('n_forget', '?')} forget "
                     f"rows (sha256 {meta.get('forget_sha256', '?')[:16]}…) and {meta.get('n_retain', '?')} retain rows")
    lines += ["", "This is not the base model: the base model's card describes the model it was made from, "
              "not this one. How it was made, in full: `perta_merge.json`.", ""]
    return "\n".join(lines)


def _shape_said(data: dict | None) -> str:
    if not data:
        return ""
    return f" of {data['format']}, {data['samples']} samples, {data['scored_tokens']} scored tokens"


def card_with_metrics(card: str, summary: dict) -> str:
    """`unlearn`'s addition to the card: the sets' sizes and hashes (never their text) and the
    before/after table when it evaluated."""
    lines = [card.rstrip("\n"), "", "## Unlearning request", "",
             f"- forget set: {summary['forget_rows']} rows{_shape_said(summary.get('forget_data'))} "
             f"(sha256 {summary['forget_sha256'][:16]}…)",
             f"- retain set: {summary['retain_rows']} rows{_shape_said(summary.get('retain_data'))} "
             f"(sha256 {summary['retain_sha256'][:16]}…)"]
    if not summary.get("work_kept", True):
        lines.append("- θ_ft and the importance file above were derived from the forget set by this run and deleted "
                     "once the merge was written (`--keep-work` keeps them)")
    cal = summary.get("calibration")
    if cal:
        v = cal["validation"]
        lines += ["", "## λ chosen by calibration", "",
                  f"- λ = {cal['lam']:.4g}: " + (
                      (f"the smallest λ tried at which the {cal['audit_attack']} attack's AUC interval reaches "
                       f"{cal['audit_target']:g} (forget rows against {cal['holdout_rows']} holdout rows)"
                       if cal["forget_target"] == "audit" else
                       f"the smallest λ tried whose forget probability reaches the base model's "
                       f"({cal['target_forget_prob']:.4f})") if cal["reached_target"] else "the most forgetting tried") +
                  f" that keeps retain answer probability ≥ {cal['keep_retain']:g} × θ_full's "
                  f"({cal['reference']['retain_prob']:.4f} → floor {cal['retain_floor']:.4f})",
                  f"- chosen point: forget probability {cal['reference']['forget_prob']:.4f} → "
                  f"{cal['chosen']['forget_prob']:.4f}, retain {cal['chosen']['retain_prob']:.4f}",
                  f"- scored on {v['forget_rows']} forget and {v['retain_rows']} retain rows held back from importance; "
                  f"{len(cal['points'])} points tried; curve: `calibration.json`, `calibration.png`"]
        if cal.get("note"):
            lines.append(f"- note: {cal['note']}")
    if "table" in summary:
        lines += ["", "## Before and after (answer probability and exact match)", "", "```", summary["table"], "```"]
    said = summary.get("forgotten")
    if said:
        lines += ["", "## Was the data forgotten?", "", said["message"]]
    if "audit" in summary:
        (b_label, before), (a_label, after) = summary["audit"].items()
        lines += ["", f"Membership audit against {summary['holdout_data']['rows']} holdout rows (AUC 0.5: "
                      "indistinguishable from unseen rows; rule: " + after["rule"] + ")", "",
                  f"| attack | AUC {b_label} | AUC {a_label} | 95 % interval after | verdict after |", "|---|---|---|---|---|"]
        for name, r in after["attacks"].items():
            lines.append(f"| {name} | {before['attacks'][name]['auc']:.3f} | {r['auc']:.3f} | "
                         f"{r['interval'][0]:.3f}–{r['interval'][1]:.3f} | {r['verdict']} |")
    return "\n".join(lines) + "\n"
