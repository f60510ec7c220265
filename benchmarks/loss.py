"""The loss's memory: the chunked per-sample cross-entropy (perta_fast.loss) against the plain one (an fp32
copy of all logits), forward and backward from logits of a given shape, each case in a fresh process.

    python benchmarks/loss.py        # writes benchmarks/results/loss-cpu.json and .md

"Peak" is the highest RssAnon above the level before the logits were made, so it counts the logits, the
loss's own tensors and the gradient; the plan's figure (perta_fast.plan.logits_bytes) is shown beside it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = [(8, 256, 49152), (2, 1024, 49152), (2, 1024, 128256)]  # batch, tokens, vocabulary


def one(kind: str, dtype: str, b: int, t: int, v: int) -> dict:
    import gc
    import time

    import torch

    from perta_fast.loss import per_sample_loss, reference_per_sample_loss
    from perta_fast.memory import PeakRssAnon, release_freed_memory

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    fn = {"chunked": per_sample_loss, "plain": reference_per_sample_loss}[kind]
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, : t // 4] = -100  # a prompt: its positions carry no loss
    gc.collect()
    release_freed_memory()
    with PeakRssAnon(0.0005) as m:
        logits = torch.randn(b, t, v, generator=g, dtype=dt).requires_grad_(True)
        start = time.perf_counter()
        fn(logits, labels).sum().backward()
        seconds = time.perf_counter() - start
    return {"kind": kind, "dtype": dtype, "shape": [b, t, v], "peak_bytes": m.growth, "seconds": round(seconds, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "loss-cpu"))
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # KIND DTYPE B T V, in a fresh process
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], *map(int, a.one[2:]))))
        return 0
    from perta_fast.plan import Shapes, logits_bytes

    rows = []
    for b, t, v in SHAPES:
        for dtype in ("fp32", "bf16"):
            for kind in ("plain", "chunked"):
                proc = subprocess.run([sys.executable, __file__, "--one", kind, dtype, str(b), str(t), str(v)],
                                      capture_output=True, text=True, check=True)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                shapes = Shapes(vocab=v, hidden=1, intermediate=1, layers=0, heads=1, kv_heads=1, head_dim=1,
                                tied=True, dtype=dtype)
                r["plan_bytes"] = logits_bytes(shapes, b * t, 2 if dtype == "bf16" else 4, True)
                rows.append(r)
                print(r, flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": "python benchmarks/loss.py", "rows": rows}, indent=1))
    lines = ["| batch × tokens × vocab | dtype | plain peak GB | chunked peak GB | chunked / plain | plan GB (chunked) "
             "| plain s | chunked s |", "|---|---|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 2):
        p, c = rows[i], rows[i + 1]
        lines.append(f"| {' × '.join(map(str, p['shape']))} | {p['dtype']} | {p['peak_bytes'] / 1e9:.2f} | "
                     f"{c['peak_bytes'] / 1e9:.2f} | {c['peak_bytes'] / p['peak_bytes']:.2f} | {c['plan_bytes'] / 1e9:.2f} | "
                     f"{p['seconds']:.2f} | {c['seconds']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
