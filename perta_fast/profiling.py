"""Whole pipeline steps measured for tests and benchmarks: each step run alone in a fresh process, its peak
private memory against `perta-fast plan`'s figure. Built on perta_fast.memory, at the top with the CLI:
it drives the steps, so nothing below imports it."""
from __future__ import annotations

import time

from .audit import audit
from .calibration import calibrate
from .dtypes import autocast_for
from .eval import answer_probabilities
from .facts import make_facts
from .importance import importance_file
from .memory import TENSORS_ONLY_THRESHOLD, PeakRssAnon, map_allocations_above
from .merge import merge
from .models import load_model, load_tokenizer
from .options import AuditOptions, CalibrateOptions, FinetuneOptions, ImportanceOptions, MergeOptions
from .scoring import score_questions
from .train import finetune


def measure_step(step: str, model_dir: str, out: str, options: dict) -> dict:
    """Run one pipeline step in this process and return its peak memory above the level after imports
    (the runtime), for comparing with `perta-fast plan`: "held_bytes" counts private memory plus mapped
    checkpoint pages. options["mmap_threshold"] (default 128 KiB, None for glibc's default) is set for
    the process first, so by default the figure follows the live tensors rather than freed heap glibc
    keeps. Run it in a fresh process (`python -m perta_fast.profiling STEP MODEL OUT JSON`): an earlier
    step's heap would count."""
    import gc

    rows = _fact_rows(0, options.get("rows", 16))
    other_rows = _fact_rows(1, len(rows))  # importance's retain set: as many rows of other people's facts
    bs, length, dtype = options.get("batch_size", 8), options.get("max_length", 256), options.get("dtype") or "auto"
    ckpt = options.get("gradient_checkpointing", False)
    # by default the live tensors (the plan's quantity), not what glibc's heap also keeps; None: glibc's own
    mmap_threshold = options.get("mmap_threshold", TENSORS_ONLY_THRESHOLD)
    if mmap_threshold is not None:
        map_allocations_above(mmap_threshold)
    load_tokenizer(model_dir)  # tokenizer code and files are runtime, not the step's
    gc.collect()
    t0 = time.perf_counter()
    with PeakRssAnon(0.002) as m:
        if step == "finetune":
            finetune(model_dir, rows, out, FinetuneOptions(epochs=options.get("epochs", 1), batch_size=bs,
                     max_length=length, lora_rank=options.get("lora_rank"), dtype=dtype,
                     gradient_checkpointing=ckpt))
        elif step == "importance":
            importance_file(model_dir, rows, other_rows, out, ImportanceOptions(
                method=options.get("method", "fisher"), batch_size=bs, max_length=length, dtype=dtype,
                gradient_checkpointing=ckpt, adapter=options.get("adapter")), progress=False)
        elif step == "quick-eval":
            model, tok = load_model(model_dir, None, dtype)
            answer_probabilities(model, tok, rows, length)
        elif step == "eval":  # perta-fast eval's scoring and decoding: batch_size questions decoded together
            model, tok = load_model(model_dir, None, dtype)
            with autocast_for(model, options.get("bf16_autocast", False)):  # as evaluate_splits scores
                score_questions(model, tok, [(r.question, [r.answer]) for r in rows], length,
                                options.get("max_new_tokens", 200), bs)
        elif step == "calibrate":  # θ_full moved over options["lams"] and bisections, half the rows for each set
            half = len(rows) // 2
            calibrate(model_dir, options["finetuned"], rows[:half], rows[half:], None, MergeOptions(method="tv"),
                      CalibrateOptions(lams=tuple(options.get("lams", (0.5, 1.0))), bisect=options.get("bisect", 1),
                                       keep_retain=1.0, batch_size=bs, dtype=dtype,
                                       generate=options.get("generate", True)))
        elif step == "audit":  # half the rows against the other half, options["attacks"] of perta-fast audit
            model, tok = load_model(model_dir, None, dtype)
            half = len(rows) // 2
            audit(model, tok, rows[:half], rows[half:], AuditOptions(attacks=options.get("attacks", "auto"),
                                                                     batch_size=bs, max_length=length, bootstrap=10))
        elif step == "merge":
            merge(model_dir, options["finetuned"], out, None, MergeOptions(method="tv"), progress=False)
        else:
            raise ValueError(f"unknown step {step!r}")
    return {"step": step, "peak_bytes": m.growth, "held_bytes": m.held_growth, "runtime_bytes": m.start,
            "seconds": time.perf_counter() - t0, "mmap_threshold": mmap_threshold}


def _fact_rows(seed: int, n: int) -> list:
    """n rows of the demo's invented facts for `seed`, repeated past their 40."""
    facts = sum(make_facts(10, 2, seed), [])
    return [facts[i % len(facts)] for i in range(n)]


def measure_step_in_subprocess(step: str, model_dir, out, options: dict) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "perta_fast.profiling", step, str(model_dir), str(out),
                           json.dumps(options)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"measuring {step} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import json
    import sys

    import peft  # noqa: F401  (runtime imports before the baseline is taken)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    print(json.dumps(measure_step(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))))
