"""`perta-fast eval` before and after a change to the evaluation code, on the same model and rows, one run
each, back to back: the seconds, and whether the numbers agree (per-sample probabilities and truth ratios,
greedy generations).

    git worktree add /tmp/eval-before <earlier commit>
    python benchmarks/eval_speed.py --before-src /tmp/eval-before

Writes results/eval-speed-cpu.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_eval(src: Path, args, out: Path) -> float:
    """Seconds of one `perta-fast eval` run with the package imported from `src`."""
    cmd = [sys.executable, "-m", "perta_fast", "eval", "--model", args.model, "--tofu", args.tofu,
           "--max-rows", str(args.max_rows), "--max-new-tokens", str(args.max_new_tokens), "--device", "cpu",
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(src), "TQDM_DISABLE": "1"}
    t = time.perf_counter()
    # cwd elsewhere: the current folder would come before PYTHONPATH on sys.path
    subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def agreement(before: dict, after: dict) -> dict:
    rows = {}
    for role, b in before["splits"].items():
        a = after["splits"][role]
        pb, pa = b["per_sample"], a["per_sample"]
        rows[role] = {
            "rows": b["rows"],
            "max_abs_prob_diff": max(abs(x - y) for x, y in zip(pb["prob"], pa["prob"])),
            "max_rel_truth_ratio_diff": max(abs(x - y) / abs(x) for x, y in zip(pb["truth_ratio_raw"],
                                                                                  pa["truth_ratio_raw"])),
            "same_generations": sum(x == y for x, y in zip(pb["generation"], pa["generation"])),
            "same_extraction_strength": pb["extraction_strength"] == pa["extraction_strength"],
        }
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before-src", required=True, help="a source tree of the earlier version (git worktree)")
    ap.add_argument("--model", default=str(Path.home() / ".cache/perta_fast/tofu-cpu-forget01/theta_full"))
    ap.add_argument("--tofu", default=str(HERE.parent.parent / "shared" / "data" / "tofu"))
    ap.add_argument("--max-rows", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--out", default=str(HERE / "results" / "eval-speed-cpu.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seconds, results = {}, {}
        for label, src in (("before", Path(args.before_src).resolve()), ("after", HERE.parent)):
            seconds[label] = round(run_eval(src, args, Path(tmp) / f"{label}.json"), 1)
            results[label] = json.loads((Path(tmp) / f"{label}.json").read_text())
            print(f"{label}: {seconds[label]} s", flush=True)
    report = {"command": " ".join(sys.argv), "model": args.model, "max_rows": args.max_rows,
              "max_new_tokens": args.max_new_tokens, "seconds": seconds,
              "speedup": round(seconds["before"] / seconds["after"], 2),
              "before_commit": subprocess.run(["git", "-C", args.before_src, "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True).stdout.strip(),
              "agreement": agreement(results["before"], results["after"])}
    lines = [f"before {seconds['before']} s, after {seconds['after']} s: **{report['speedup']}×**", "",
             "| split | rows | max abs Δ prob | max rel Δ truth ratio | same greedy answers | same ES |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {role} | {r['rows']} | {r['max_abs_prob_diff']:.2e} | {r['max_rel_truth_ratio_diff']:.2e} | "
              f"{r['same_generations']}/{r['rows']} | {r['same_extraction_strength']} |"
              for role, r in report["agreement"].items()]
    Path(args.out).write_text(json.dumps(report, indent=1))
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
