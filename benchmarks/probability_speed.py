"""Answer probabilities (calibrate's and the TOFU benchmark's λ sweeps' only scoring) two ways, on the same
model and rows, back to back: padded batches with full logits (`padded_answer_probabilities`, the earlier
code and the reference) against the token-tree scorer (`answer_probabilities`): seconds, ratio, and the
largest difference of any row's probability.

    python benchmarks/probability_speed.py        # SmolLM2-135M-Instruct, 40 forget + 40 retain TOFU rows

Writes results/probability-speed-cpu.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from timing import run_seconds  # benchmarks/timing.py

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--tofu", default=str(HERE.parent.parent / "shared" / "data" / "tofu"))
    ap.add_argument("--rows", type=int, default=40, help="rows of each split (forget05's and retain's first)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="load dtype (default: the checkpoint's)")
    ap.add_argument("--out", default=str(HERE / "results" / "probability-speed-cpu"))
    a = ap.parse_args(argv)
    import torch

    from perta_fast.data import QA, load_qa
    from perta_fast.eval import answer_probabilities, padded_answer_probabilities
    from perta_fast.models import default_model, load_model
    from perta_fast.outputs import atomic_file

    rows = [QA(r.question, r.answer) for split in ("forget05", "retain_perturbed")
            for r in load_qa(f"{a.tofu}:{split}")[:a.rows]]  # first: a wrong --tofu fails before the model loads
    model_dir = a.model or str(default_model())
    model, tok = load_model(model_dir, "cpu", a.dtype)
    # the fastest of the repeats; the first also warms the allocator and kernels
    padded_runs, padded = run_seconds(lambda: padded_answer_probabilities(model, tok, rows), a.repeats, warm_up=False)
    tree_runs, tree = run_seconds(lambda: answer_probabilities(model, tok, rows), a.repeats, warm_up=False)
    padded_s, tree_s = min(padded_runs), min(tree_runs)
    report = {"command": " ".join(["python", "benchmarks/probability_speed.py", *(argv or sys.argv[1:])]),
              "model": model_dir, "dtype": str(next(model.parameters()).dtype), "rows": len(rows),
              "threads": torch.get_num_threads(), "repeats": a.repeats,
              "padded_batches_seconds": round(padded_s, 2), "token_tree_seconds": round(tree_s, 2),
              "speedup": round(padded_s / tree_s, 2),
              "max_abs_prob_diff": max(abs(x - y) for x, y in zip(padded, tree)),
              "mean_prob": sum(tree) / len(tree)}
    table = ("| rows | padded batches (s) | token tree (s) | speed-up | max abs Δ prob |\n|---:|---:|---:|---:|---:|\n"
             f"| {len(rows)} | {padded_s:.2f} | {tree_s:.2f} | {padded_s / tree_s:.2f}× | "
             f"{report['max_abs_prob_diff']:.1e} |\n")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out.with_suffix(".json"), json.dumps(report, indent=1)), (out.with_suffix(".md"), table)):
        with atomic_file(path, overwrite=True) as tmp:
            tmp.write_text(text)
    print(json.dumps(report, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    from perta_fast.errors import PertaError

    try:
        sys.exit(main())
    except PertaError as e:  # bad --tofu, --model or --dtype: one line, nothing written
        print(f"probability_speed.py: {e}", file=sys.stderr)
        sys.exit(2)
