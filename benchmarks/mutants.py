"""A seeded mutation run over the core modules: each mutant (one small, plausible bug written out below)
is applied to the working tree, its own test files are run, and the tree is restored. A mutant is killed
when those tests fail; one that survives is a bug the suite would let through.

    python benchmarks/mutants.py                 # every mutant (~11 min on 2 cores)
    python benchmarks/mutants.py --only rslora   # one, by name
    python benchmarks/mutants.py --list

Writes benchmarks/results/mutants.json and .md (--out). A mutant names its code by a snippet, found in
whichever file of perta_fast/ or kernels/ holds it (exactly once), so the list survives files moving. The
tree must be clean there (git restores it if the run is killed); the C++ sources are left out (a mutant
would need a rebuild).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("perta_fast", "kernels")

# (name, what the bug is, snippet, its replacement, test files run against it)
MUTANTS = [
    ("ks-against-itself", "forget quality compares the model's truth ratios with its own, not the reference's",
     'mine["per_sample"]["truth_ratio_raw"], ref["per_sample"]["truth_ratio_raw"])',
     'mine["per_sample"]["truth_ratio_raw"], mine["per_sample"]["truth_ratio_raw"])', ["tests/test_eval.py"]),
    ("truth-ratio-max", "the forget split's truth ratio takes max(R, 1/R) instead of min",
     "min(r, 1 / r) for r in ratios]", "max(r, 1 / r) for r in ratios]", ["tests/test_eval.py"]),
    ("utility-arithmetic-mean", "model utility as the arithmetic mean, not the harmonic one",
     "float(hmean(scores))", "sum(scores) / len(scores)", ["tests/test_eval.py"]),
    ("publish-no-fsync", "publish renames the temp tree into place without fsyncing it",
     '    _fsync_tree(tmp)\n    kill_point("publish")', '    kill_point("publish")', ["tests/test_crash.py"]),
    ("overwrite-unchecked", "an existing output is replaced without --overwrite",
     "if out.exists() and not overwrite:", "if False:", ["tests/test_bad_input.py"]),
    ("rslora-as-lora", "an rsLoRA adapter scaled by α/r instead of α/√r",
     "alpha / math.sqrt(r) if rslora", "alpha / r if rslora", ["tests/test_lora.py"]),
    ("fp16-to-torch", "fp16 tensors silently sent to the torch path instead of the C++ kernels",
     't.device.type == "cpu" and t.dtype in KERNEL_DTYPES for t in tensors)',
     't.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) for t in tensors)', ["tests/test_ops.py"]),
    ("ratio-nan-is-one", "0/0 (neither set touches a parameter) gives w = 1 instead of 0",
     "return w.nan_to_num_(nan=0.0)", "return w.nan_to_num_(nan=1.0)", ["tests/test_ops.py"]),
    ("merge-sign", "the merge steps towards the task vector instead of away from it",
     "return out.mul_(-lam).add_(base).to(base.dtype)", "return out.mul_(lam).add_(base).to(base.dtype)",
     ["tests/test_ops.py"]),
    ("resume-ignores-forget", "importance's resume fingerprint leaves out the forget set's hash",
     '("checkpoint_sha256", "forget_sha256", "retain_sha256",', '("checkpoint_sha256", "retain_sha256",',
     ["tests/test_importance_file.py"]),
    ("plan-no-activations", "the importance plan leaves out the activations",
     "working = activations(s, tokens, b, checkpointing) + logits_bytes(s, tokens, b, True)",
     "working = logits_bytes(s, tokens, b, True)", ["tests/test_plan.py"]),
    ("labels-one-early", "answer-only labels start one token before the answer",
     "labels[i, start:stop] = ids[i, start:stop]", "labels[i, start - 1:stop] = ids[i, start - 1:stop]",
     ["tests/test_data.py"]),
    ("prompt-one-long", "the prompt length counts one answer token",
     "spans.append((len(ids), len(ids) + len(tokens)))", "spans.append((len(ids) + 1, len(ids) + len(tokens)))",
     ["tests/test_data.py"]),
    ("loss-sum", "a sample's loss is the sum over its answer tokens, not the mean",
     "return nll.sum(1) / count", "return nll.sum(1)", ["tests/test_loss.py"]),
    ("hold-out-tail", "the held-back rows are the last ones instead of spread over the set",
     "held = {int((j + 0.5) * n / m) for j in range(m)}", "held = set(range(n - m, n))", ["tests/test_calibrate.py"]),
    ("fisher-not-mean", "the exact Fisher is the sum over samples, not the mean",
     "return {n: a.div_(len(encoded)).cpu() for n, a in acc.acc.items()}",
     "return {n: a.cpu() for n, a in acc.acc.items()}", ["tests/test_importance.py"]),
    ("grad-signed", "grad importance keeps the gradient's sign",
     "return {n: a.abs_().cpu() for n, a in acc.acc.items()}", "return {n: a.cpu() for n, a in acc.acc.items()}",
     ["tests/test_importance.py"]),
    ("grad-not-mean", "the mean gradient is not divided by the set's size",
     "(losses.sum() / self.n_total).backward()", "losses.sum().backward()", ["tests/test_importance.py"]),
    ("norm-bias-square-of-sum", "a LayerNorm bias's Fisher squares the batch sum instead of each sample's",
     "self._add(module.bias, gf.sum(1).square_().sum(0))", "self._add(module.bias, gf.sum(1).sum(0).square_())",
     ["tests/test_importance.py"]),
    ("embedding-scale-dropped", "a scaled embedding's (Gemma's) per-sample gradient misses its scale",
     "g_emb = (g_emb.float() * mask * self.embed_scale[wid])", "g_emb = (g_emb.float() * mask)",
     ["tests/test_importance.py"]),
    ("padding-idx-counted", "an embedding's padding_idx row gets Fisher mass autograd never gives it",
     "keep = keep & (ids != module.padding_idx)", "keep = keep", ["tests/test_importance.py"]),
    ("no-malloc-trim", "the merge no longer hands freed heap back to the OS",
     "libc.malloc_trim(0)", "pass", ["tests/test_merge_memory.py"]),
    ("calibrate-floor-strict", "calibration's retain floor allows a point just under it",
     'p["keeps_retain"] = p["retain_prob"] >= floor', 'p["keeps_retain"] = p["retain_prob"] >= 0.9 * floor',
     ["tests/test_calibrate.py"]),
    ("calibrate-takes-breaking-lambda", "calibration returns the first λ that breaks the floor",
     "lam = hi if reached else lo", "lam = hi if hi is not None else lo", ["tests/test_calibrate.py"]),
]


def locate(snippet: str) -> Path:
    hits = [p for d in SOURCES for p in sorted((ROOT / d).rglob("*.py")) if snippet in p.read_text()]
    counts = [p.read_text().count(snippet) for p in hits]
    if len(hits) != 1 or counts != [1]:
        raise SystemExit(f"mutant snippet found {sum(counts)} times in {len(hits)} files (want once): {snippet!r}")
    return hits[0]


def dirty() -> list[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--", *SOURCES], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.splitlines()


def run_mutant(snippet: str, replacement: str, tests: list[str], timeout: float) -> dict:
    path = locate(snippet)
    original = path.read_text()
    path.write_text(original.replace(snippet, replacement, 1))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        status = "survived" if proc.returncode == 0 else "killed" if proc.returncode == 1 else \
            f"killed (pytest exit {proc.returncode})"
        last = (proc.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        status, last = "killed (timeout)", ""
    finally:
        path.write_text(original)
    return {"file": str(path.relative_to(ROOT)), "status": status, "seconds": round(time.perf_counter() - t0, 1),
            "pytest": last}


def table(results: list[dict]) -> str:
    killed = sum(r["status"].startswith("killed") for r in results)
    rows = ["| mutant | bug | file | tests | result | s |", "|---|---|---|---|---|---|"]
    rows += [f"| {r['name']} | {r['bug']} | {r['file']} | {', '.join(Path(t).name for t in r['tests'])} | "
             f"{r['status']} | {r['seconds']:.0f} |" for r in results]
    return f"Mutation score: {killed}/{len(results)} killed.\n\n" + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", default=None, help="mutants to run, by name")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one mutant's tests may take (then: killed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutants.json"))
    a = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if a.only is None or m[0] in a.only]
    if a.list:
        for name, bug, snippet, _, tests in chosen:
            print(f"{name:<32} {locate(snippet).relative_to(ROOT)}  {' '.join(tests)}\n    {bug}")
        return 0
    if dirty():
        raise SystemExit("perta_fast/ or kernels/ has uncommitted changes: commit or stash them first (a killed "
                         "run is then undone by `git checkout perta_fast kernels`)")
    for _, _, snippet, _, _ in chosen:  # every snippet resolves before anything is changed
        locate(snippet)
    results, t0 = [], time.perf_counter()
    for name, bug, snippet, replacement, tests in chosen:
        r = {"name": name, "bug": bug, "tests": tests, **run_mutant(snippet, replacement, tests, a.timeout)}
        print(f"{name:<32} {r['status']:<16} {r['seconds']:>6.1f} s  {r['pytest']}", flush=True)
        results.append(r)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "python benchmarks/mutants.py" + (f" --only {' '.join(a.only)}" if a.only else ""),
              "seconds": round(time.perf_counter() - t0, 1), "mutants": results}
    out.write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
