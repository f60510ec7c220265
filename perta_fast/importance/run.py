"""The importance file and its run: options checked, the model loaded, forget and retain scored group by group
through the estimators, each group's forget scores spilled beside the output, checkpoints for --resume,
torchrun's ranks kept in step, and the file published atomically."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from .. import distributed, dtypes
from .._version import __version__
from ..console import log
from ..data import QA, check_sets, data_hash, encode, hold_out, set_summary
from ..errors import PertaError
from ..faults import kill_point
from ..hf import stored_layout, to_stored, transformers_version
from ..io import Checkpoint, SafetensorsFile, SafetensorsWriter, content_sha256
from ..lora import adapter_targets
from ..memory import host_available_bytes
from ..models import load_model
from ..ops import ratio
from ..options import ImportanceOptions
from ..outputs import (_umask_mode, check_output_path, publish, remove_leftover, remove_stale_temps, resume_dir,
                       resume_state, save_tensors)
from .budget import accumulator_budget, parameter_groups, place_accumulators
from .estimators import _unique_params, estimate_importance

save_importance = save_tensors  # the API's name for writing an importance file (a safetensors file, atomically)


SETS = ("the forget set", "the retain set")


def _load(model_dir, forget, retain, o: ImportanceOptions, where: tuple[str, str] = SETS):
    """(model, tokenizer, forget, retain, names to score or None for all, the sets' counts for the record, every
    parameter's stored layout), inputs checked; `where` names the sets in messages."""
    if o.hold_out is not None:  # the rows calibrate keeps for importance, chosen the same way
        forget, retain = hold_out(forget, o.hold_out, where[0])[0], hold_out(retain, o.hold_out, where[1])[0]
    if o.max_samples:
        forget, retain = forget[:o.max_samples], retain[:o.max_samples]
    for label, rows in (("forget", forget), ("retain", retain)):
        if not rows:
            raise PertaError(f"the {label} set is empty")
    shared = check_sets(forget, retain, where)
    if shared:
        log.warning("%d of the %d forget rows (%s) are in %s too: importance counts them on both sides, so the "
                    "weights they drive move less", shared, len(set(forget)), where[0], where[1])
    model, tok = load_model(model_dir, o.device, o.dtype, gradient_checkpointing=o.gradient_checkpointing)
    counts = {}
    for label, rows, name in (("forget", forget, where[0]), ("retain", retain, where[1])):
        # a prompt too long, answers cut: said once, now; the records keep the shape and the counts
        counts.update({f"{label}_{k}": v for k, v in set_summary(rows, encode(tok, rows, o.max_length, name)).items()})
    layout = stored_layout(model, _unique_params(model))
    why = unstored(model_dir, layout, model.config.model_type)
    if why:
        raise PertaError(f"{model_dir}: {why}")
    names = None
    if o.adapter is not None:  # the adapter names stored tensors; the estimators work on the module's
        targets = set(adapter_targets(o.adapter, model_dir))
        names = [n for n, pieces in layout.items() if targets & set(pieces)]
    return model, tok, forget, retain, names, counts, layout


def unstored(model_dir, layout: dict, model_type: str) -> str | None:
    """Why the scores cannot be keyed by the checkpoint's tensor names (the merge reads them so), or None: a
    parameter whose stored place (hf.stored_layout) the checkpoint does not hold."""
    checkpoint = Checkpoint(model_dir, allow_pickle=True)
    on_disk = set(checkpoint.names())
    for name, pieces in layout.items():
        for stored, shape in pieces.items():
            if stored not in on_disk or tuple(checkpoint.info(stored)[0]) != tuple(shape):
                return (f"the model's parameter {name} should be stored as {stored} {list(shape)} (as transformers "
                        f"{transformers_version()} saves {model_type}), which the checkpoint does not hold: a "
                        "checkpoint of another layout or version")
    return None


def _checked(scores: dict, label: str, model_dir) -> dict:
    for name, s in scores.items():
        if not torch.isfinite(s).all():
            raise PertaError(f"{model_dir}: {label} importance of {name} is NaN/Inf (does the checkpoint hold NaN weights?)")
    return scores


def _metadata(model, model_dir, forget, retain, o: ImportanceOptions, t0, **extra) -> dict:
    import transformers

    return {"method": o.method, "n_forget": str(len(forget)), "n_retain": str(len(retain)),
            "forget_sha256": data_hash(forget), "retain_sha256": data_hash(retain),
            "checkpoint": str(Path(model_dir).resolve()), "checkpoint_sha256": content_sha256(model_dir),
            "batch_size": str(o.batch_size), "max_length": str(o.max_length),
            "estimator": "exact per-sample" if o.method == "fisher" else "mean gradient",
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "adapter": str(Path(o.adapter).resolve()) if o.adapter else "",
            "adapter_sha256": content_sha256(o.adapter) if o.adapter else "",
            "versions": json.dumps({"perta_fast": __version__, "torch": torch.__version__,
                                    "transformers": transformers.__version__}),
            **{k: str(v) for k, v in extra.items()}, "seconds": f"{time.perf_counter() - t0:.2f}"}


def compute_importance(model_dir: str | Path, forget: list[QA], retain: list[QA],
                       options: ImportanceOptions | None = None, *, progress: bool = True, **fields) -> tuple[dict, dict]:
    """(tensors, metadata) of an importance file, in memory: forget/<name> and retain/<name> scores at
    `model_dir`. For large models use `importance_file`, which streams them to disk and keeps to a budget
    (max_memory, write and the run's knobs are its own; here they are ignored).

    The model runs in `dtype` (auto: the checkpoint's own); scores accumulate in fp32. With `adapter`
    (a peft LoRA folder for this model) only the weights it targets are scored: τ is 0 everywhere else."""
    o = replace(options or ImportanceOptions(), **fields)
    t0 = time.perf_counter()
    distributed.setup(o.device)
    model, tok, forget, retain, names, counts, _ = _load(model_dir, forget, retain, o)
    distributed.agree({"forget": data_hash(forget), "retain": data_hash(retain), "method": o.method,
                       "batch_size": str(o.batch_size), "names": str(names)}, "the importance run")
    tensors = {}
    for label, rows in (("forget", forget), ("retain", retain)):
        scores = estimate_importance(model, tok, rows, o.method, batch_size=o.batch_size, max_length=o.max_length,
                                     progress=progress, desc=f"{o.method} {label}", names=names)
        for n, s in _checked(scores, label, model_dir).items():
            tensors.update({f"{label}/{stored}": t for stored, t in to_stored(model, n, s).items()})
    return tensors, _metadata(model, model_dir, forget, retain, o, t0, **counts)


class _RunState:
    """An importance run's working folder beside its output (.OUT.resume/): the partly written output,
    the spilled forget scores, and, with checkpoints, the accumulators and where the run stands, so that
    `--resume` continues a killed run. Every file in it is replaced atomically."""

    def __init__(self, out: Path, fingerprint: dict, every: int | None, resume: bool):
        self.dir = resume_dir(out)
        remove_stale_temps(out)
        self.every = every
        self.partial, self.acc_file = self.dir / "partial.safetensors", self.dir / "acc.safetensors"
        if resume:
            self.state = resume_state(self.dir, self.dir / "state.json", fingerprint)
        else:
            if self.dir.exists():  # a killed run's, or one never resumed
                remove_leftover(out, self.dir)
            self.dir.mkdir(parents=True)
            self.state = {"fingerprint": fingerprint, "group": 0, "phase": "forget", "written": 0}
            self.save_state()

    def spill(self, g: int) -> Path:
        return self.dir / f"forget-{g}.safetensors"

    def save_state(self, **changes):
        self.state.update(changes)
        if self.every:
            tmp = self.dir / "state.json.tmp"
            tmp.write_text(json.dumps(self.state))
            os.replace(tmp, self.dir / "state.json")

    def start(self, g: int, phase: str):
        """(accumulators, batches done) saved for this group and phase, if any."""
        if not self.acc_file.is_file():
            return None
        f = SafetensorsFile(self.acc_file)
        if f.metadata.get("group") != str(g) or f.metadata.get("phase") != phase:
            return None
        return {n: f.get(n) for n in f.keys()}, int(f.metadata["batch"])  # mapped: copied in by the estimator

    def on_batch(self, g: int, phase: str):
        if not self.every:
            return None

        def save(done: int, acc: dict):
            if done % self.every:
                return
            save_tensors(acc, {"group": str(g), "phase": phase, "batch": str(done)}, self.acc_file, overwrite=True)
            kill_point("checkpoint")
        return save


def importance_file(model_dir: str | Path, forget: list[QA], retain: list[QA], out: str | Path,
                    options: ImportanceOptions | None = None, *, overwrite: bool = False, progress: bool = True,
                    checkpoint_every: int | None = None, resume: bool = False,
                    where: tuple[str, str] = SETS, **fields) -> dict:
    """Estimate and write an importance file, streamed: the output is checked before any work is done.
    `options` (perta_fast.options.ImportanceOptions; `fields` override any of them by name) say what is
    estimated and how; the keywords here say how the run goes.

    Accumulators are fp32 and held one parameter group at a time (`max_memory` GB sets the groups; None:
    one group). Each group's forget scores are spilled to a file beside the output before its retain
    pass, so the two sets' scores are never both in memory. `write="weights"` stores the ratio weights
    w = s_f^p / (s_f^p + α·s_r^p + ε) in `weight_dtype` (2 bytes per parameter in fp16) instead of both
    scores (8 bytes). `group_bytes` sets the accumulator bytes per group directly instead. `hold_out` keeps
    back the rows calibration validates on (`where` names the two sets in its messages).

    With `max_memory` on a GPU whose budget the accumulators do not fit, they are kept in host memory
    instead when the host has room (one pass, `place_accumulators`); `offload` True/False forces that
    choice either way.

    `checkpoint_every` N saves the accumulators and the data position every N batches (atomically, in
    .OUT.resume/ beside the output); `resume` continues from there, refusing a checkpoint made with other
    data, options or model. The resumed file equals an uninterrupted run's (bit-identical on the CPU)."""
    o = replace(options or ImportanceOptions(), **fields)
    if o.write not in ("scores", "weights"):
        raise PertaError(f"--write must be scores or weights, got {o.write!r}")
    if o.weight_dtype not in dtypes.NAMES:
        raise PertaError(f"--weight-dtype must be one of {', '.join(dtypes.NAMES)}, got {o.weight_dtype!r}")
    if o.max_memory is not None and o.max_memory <= 0:
        raise PertaError(f"--max-memory must be a positive number of GB, got {o.max_memory:g}")
    if checkpoint_every is not None and checkpoint_every <= 0:
        raise PertaError(f"--checkpoint-every must be a positive number of batches, got {checkpoint_every}")
    if checkpoint_every or resume:
        distributed.refuse("--checkpoint-every/--resume")
    out = Path(out)
    inputs = (model_dir,) + ((o.adapter,) if o.adapter else ())
    check_output_path(out, overwrite, inputs)
    if resume:  # a missing checkpoint fails before the model is loaded; the fingerprint is checked after
        resume_state(resume_dir(out), resume_dir(out) / "state.json", {})
    t0 = time.perf_counter()
    distributed.setup(o.device)
    main = distributed.is_main()  # under torchrun every rank estimates its share; rank 0 alone writes
    model, tok, forget, retain, names, counts, layout = _load(model_dir, forget, retain, o, where)
    params = _unique_params(model, names)
    sizes = {n: p.numel() for n, p in params.items()}
    widest = max((tuple(p.shape) for p in params.values() if p.dim() == 2), key=lambda s: s[0] * s[1],
                  default=(max(sizes.values()), 1))
    budget = o.group_bytes or accumulator_budget(model, model_dir, o.max_memory, widest, o.batch_size, o.max_length,
                                                 o.method, o.gradient_checkpointing)
    if budget is not None:  # the ranks must make the same groups: the tightest rank's budget for all
        budget = distributed.reduce_float(budget, "min")
    math_device = next(model.parameters()).device
    if o.offload is None:
        scored_bytes = 4 * sum(sizes.values())
        host_free = None
        if budget is not None and scored_bytes > budget and math_device.type == "cuda":  # the same on every rank
            host_free = distributed.reduce_float(host_available_bytes() or 0, "min")
        o = replace(o, offload=place_accumulators(scored_bytes, budget, math_device.type, host_free) == "host")
    groups = parameter_groups(sizes, None if o.offload else budget)
    if main:
        largest = max(4 * sum(sizes[n] for n in g) for g in groups) / 1e9
        place = f"in host memory, each parameter's batch contribution moved from {math_device} as it " \
            "completes" if o.offload else f"on {math_device}"
        log.info("importance: fp32 accumulators %s, in %d parameter group(s) of at most %.2f GB, one pass over the "
                 "data per group", place, len(groups), largest)
    stored = [(s, shape) for n in params for s, shape in layout[n].items()]
    if o.write == "weights":
        layout = [(f"weight/{s}", shape, dtypes.torch_dtype(o.weight_dtype)) for s, shape in stored]
    else:
        layout = [(f"{label}/{s}", shape, torch.float32) for s, shape in stored for label in ("forget", "retain")]
    meta_extra = {"groups": len(groups), "write": o.write, "ranks": distributed.rank_and_size()[1],
                  "accumulators": "host" if o.offload else "device", **counts}
    if o.write == "weights":
        meta_extra.update(alpha=o.alpha, power=o.power, eps=o.eps, weight_dtype=o.weight_dtype)
    meta = _metadata(model, model_dir, forget, retain, o, t0, **meta_extra)
    del meta["seconds"]  # the header goes first: the duration is filled in at the end
    fingerprint = {k: meta[k] for k in ("checkpoint_sha256", "forget_sha256", "retain_sha256", "method", "batch_size",
                                        "max_length", "dtype", "adapter_sha256", "write")}
    fingerprint.update(groups=hashlib.sha256(json.dumps(groups).encode()).hexdigest(),
                       merge_knobs=json.dumps([o.alpha, o.power, o.eps, o.weight_dtype] if o.write == "weights"
                                              else None))
    distributed.agree(fingerprint, "the importance run")
    if not main:
        for group in groups:  # the same passes as rank 0, whose all-reduces they join; nothing is kept
            for rows in (forget, retain):
                estimate_importance(model, tok, rows, o.method, batch_size=o.batch_size, max_length=o.max_length,
                                    progress=False, names=group, offload=o.offload)
        distributed.barrier()  # return once the file is there
        return {**meta, "seconds": f"{time.perf_counter() - t0:.2f}"}
    run = _RunState(out, fingerprint, checkpoint_every, resume)
    writer = None
    try:
        writer = SafetensorsWriter(run.partial, layout, meta, reserve={"seconds": 16}, done=run.state["written"])
        for g, group in enumerate(groups):
            if g < run.state["group"]:
                continue
            tag = f" [{g + 1}/{len(groups)}]" if len(groups) > 1 else ""
            if run.state["phase"] == "forget":
                scores = estimate_importance(model, tok, forget, o.method, batch_size=o.batch_size,
                                             max_length=o.max_length, progress=progress, desc=f"{o.method} forget{tag}",
                                             names=group, start=run.start(g, "forget"),
                                             on_batch=run.on_batch(g, "forget"), offload=o.offload)
                save_tensors(_checked(scores, "forget", model_dir), {}, run.spill(g), overwrite=True)
                del scores
                run.save_state(phase="retain")
            retain_scores = estimate_importance(model, tok, retain, o.method, batch_size=o.batch_size,
                                                max_length=o.max_length, progress=progress,
                                                desc=f"{o.method} retain{tag}", names=group,
                                                start=run.start(g, "retain"), on_batch=run.on_batch(g, "retain"),
                                                offload=o.offload)
            _checked(retain_scores, "retain", model_dir)
            for n in group:
                # a copy, with the file closed again: a mapping kept open would keep every page of the
                # spill file read so far resident in this process
                s_f, s_r = SafetensorsFile(run.spill(g)).get(n).clone(), retain_scores.pop(n)
                s_f, s_r = to_stored(model, n, s_f), to_stored(model, n, s_r)
                for s in s_f:  # the stored tensors of this parameter, in the layout's order
                    if o.write == "weights":
                        writer.write(f"weight/{s}", ratio(s_f[s], s_r[s], o.alpha, o.power, o.eps,
                                                          dtypes.torch_dtype(o.weight_dtype)))
                    else:
                        writer.write(f"forget/{s}", s_f[s])
                        writer.write(f"retain/{s}", s_r[s])
                del s_f, s_r
            writer.flush()
            run.save_state(group=g + 1, phase="forget", written=writer.written)
            run.spill(g).unlink()
        meta["seconds"] = f"{time.perf_counter() - t0:.2f}"
        writer.close({"seconds": meta["seconds"]})
        os.chmod(run.partial, _umask_mode(0o666))
        publish(run.partial, out)
    except BaseException as e:
        if writer:
            writer.abort()
        if not (checkpoint_every and isinstance(e, (KeyboardInterrupt, OSError))):
            shutil.rmtree(run.dir, ignore_errors=True)  # nothing to resume from: leave nothing behind
        raise
    shutil.rmtree(run.dir, ignore_errors=True)
    distributed.barrier()
    return meta
