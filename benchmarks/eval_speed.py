"""`perta-fast eval` before and after changes to the evaluation code, on the same models and rows, one run
each, back to back: the seconds, and whether the numbers agree with the first version's (per-sample
probabilities and truth ratios, extraction strengths, greedy generations).

    git worktree add /tmp/eval-before 5b231c7      # one question at a time (the code issue 11 measured)
    git worktree add /tmp/eval-batched 5ccd2fe     # several questions per forward, batched decoding
    python benchmarks/eval_speed.py --src before=/tmp/eval-before --src batched=/tmp/eval-batched \\
        --model theta_full=~/.cache/perta_fast/tofu-cpu-scaled-fp32/theta_full --model base=<SmolLM2 folder>

The current tree runs last as "after"; with --bf16-autocast it runs once more as "after-bf16" (`eval
--bf16-autocast`: bf16 matmuls over the fp32 weights; its agreement columns say how far bf16 moves the numbers).
Writes results/eval-speed-cpu.json and .md.

    python benchmarks/eval_speed.py --bf16-autocast --model base=<SmolLM2 folder> \\
        --out benchmarks/results/eval-speed-bf16-cpu.json    # fp32 against bf16 autocast, same tree
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


def rss_anon(pid: int) -> int:
    try:
        return next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("RssAnon:"))
    except (OSError, StopIteration):  # exited between two polls
        return 0


def run_eval(src: Path, model: str, args, out: Path, extra: tuple = ()) -> tuple[float, int]:
    """Seconds and peak private memory (RssAnon, polled every 10 ms; glibc's default heap) of one
    `perta-fast eval` run with the package imported from `src`."""
    cmd = [sys.executable, "-m", "perta_fast", "eval", "--model", model, "--tofu", args.tofu,
           "--max-rows", str(args.max_rows), "--max-new-tokens", str(args.max_new_tokens), "--device", "cpu",
           "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(src), "TQDM_DISABLE": "1"}
    t = time.perf_counter()
    # cwd elsewhere: the current folder would come before PYTHONPATH on sys.path
    proc, peak = subprocess.Popen(cmd, env=env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL), 0
    while proc.poll() is None:
        peak = max(peak, rss_anon(proc.pid))
        time.sleep(0.01)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return time.perf_counter() - t, peak


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


def commit(src: Path) -> str:
    return subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", action="append", default=[], metavar="LABEL=TREE",
                    help="an earlier version's source tree (git worktree); the first is the baseline")
    ap.add_argument("--model", action="append", metavar="LABEL=DIR",
                    default=None, help="checkpoints to evaluate (default: the TOFU benchmark's θ_full)")
    ap.add_argument("--tofu", default=str(HERE.parent.parent / "shared" / "data" / "tofu"))
    ap.add_argument("--max-rows", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--bf16-autocast", action="store_true", help="also the current tree with eval --bf16-autocast")
    ap.add_argument("--out", default=str(HERE / "results" / "eval-speed-cpu.json"))
    args = ap.parse_args()
    versions = [(*s.split("=", 1), ()) for s in args.src] + [("after", str(HERE.parent), ())]
    if args.bf16_autocast:
        versions.append(("after-bf16", str(HERE.parent), ("--bf16-autocast",)))
    models = [tuple(m.split("=", 1)) for m in args.model or
              [f"theta_full={Path.home() / '.cache/perta_fast/tofu-cpu-scaled-fp32/theta_full'}"]]
    report = {"command": " ".join(sys.argv), "max_rows": args.max_rows, "max_new_tokens": args.max_new_tokens,
              "versions": {label: commit(Path(src)) or "working tree" for label, src, _ in versions}, "models": {}}
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models:
            seconds, peak_mb, results = {}, {}, {}
            for label, src, extra in versions:
                out = Path(tmp) / f"{name}-{label}.json"
                took, peak = run_eval(Path(src).resolve(), os.path.expanduser(model), args, out, extra)
                seconds[label], peak_mb[label] = round(took, 1), round(peak / 2**20)
                results[label] = json.loads(out.read_text())
                print(f"{name} {label}: {seconds[label]} s, peak RssAnon {peak_mb[label]} MB", flush=True)
            first = versions[0][0]
            entry = report["models"][name] = {
                "model": model, "seconds": seconds, "peak_rss_anon_mb": peak_mb,
                "speedup_over_" + first: {k: round(seconds[first] / v, 2) for k, v in seconds.items()},
                "agreement_with_" + first: {k: agreement(results[first], results[k]) for k, _, _ in versions[1:]}}
            lines += [f"**{name}** ({model}): " + ", ".join(f"{k} {v} s ({peak_mb[k]} MB peak RssAnon)"
                                                            for k, v in seconds.items()) + "; "
                      + ", ".join(f"{k} **{v}×**" for k, v in entry["speedup_over_" + first].items() if k != first),
                      "", "| version | split | rows | max abs Δ prob | max rel Δ truth ratio | same greedy answers "
                          "| same ES |", "|---|---|---:|---:|---:|---:|---|"]
            lines += [f"| {k} | {role} | {r['rows']} | {r['max_abs_prob_diff']:.2e} | {r['max_rel_truth_ratio_diff']:.2e} "
                      f"| {r['same_generations']}/{r['rows']} | {r['same_extraction_strength']} |"
                      for k, by_role in entry["agreement_with_" + first].items() for role, r in by_role.items()]
            lines.append("")
    Path(args.out).write_text(json.dumps(report, indent=1))
    Path(args.out).with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
