"""Engine benchmark on the real model: importance cost against a plain batched backward, and the
streamed merge against a naive in-memory merge, each measured as a ratio within the same run.

    python benchmarks/engine.py                      # SmolLM2-135M-Instruct, demo facts, CPU, batch 1/8/16
    python benchmarks/engine.py --device cuda         # the same on a GPU

Writes benchmarks/results/engine-<device>.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

NAIVE_MERGE = """
import sys, time, torch
from safetensors.torch import load_file, save_file
from perta_fast.merge import merge_tensor, ratio_weights
from perta_fast.memory import PeakRssAnon
base_file, ft_file, imp_file, out_file = sys.argv[1:5]
t0 = time.perf_counter()
with PeakRssAnon() as mem:
    base, ft, imp = load_file(base_file), load_file(ft_file), load_file(imp_file)
    out = {n: merge_tensor(base[n], ft[n], ratio_weights(imp["forget/" + n], imp["retain/" + n]), 1.0) for n in base}
    save_file(out, out_file)
print(time.perf_counter() - t0, mem.growth)
"""

STREAMED_MERGE = """
import sys, time
from perta_fast.merge import merge
from perta_fast.memory import PeakRssAnon
base, ft, imp, out = sys.argv[1:5]
t0 = time.perf_counter()
with PeakRssAnon() as mem:
    merge(base, ft, out, imp, progress=False)
print(time.perf_counter() - t0, mem.growth)
"""


def bench_importance(model_dir: Path, n_samples: int, batch_sizes: list[int], device: str) -> dict:
    import torch
    from torch.func import functional_call, grad, vmap

    from perta_fast.data import batches, encode, pad_id
    from perta_fast.loss import per_sample_loss, reference_per_sample_loss
    from perta_fast.facts import make_facts
    from perta_fast.importance import estimate_importance
    from perta_fast.models import load_model
    from perta_fast.memory import PeakRssAnon
    from timing import median, run_seconds  # benchmarks/timing.py

    forget, retain = make_facts(10, 2, seed=0)
    rows = (forget + retain)[:n_samples]
    model, tok = load_model(model_dir, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    param_bytes = sum(p.numel() * 4 for p in model.parameters())

    def timed(fn, repeats=3):
        fn(rows[:2])  # warm-up: first-call allocations and kernel selection
        sync()
        with PeakRssAnon() as mem:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            runs, _ = run_seconds(lambda: fn(rows), repeats, warm_up=False, sync=sync)
        gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
        return {"s_per_sample": median(runs) / len(rows), "runs_s": runs,
                "rss_anon_growth_mb": mem.growth / 2**20, "gpu_peak_mb": gpu / 2**20 if gpu else None}

    def loop_fisher(sub):  # the naive exact method: one ordinary backward per sample
        acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
        for ids, mask, labels in batches(encode(tok, sub), 1, pad_id(tok)):
            model.zero_grad(set_to_none=True)
            per_sample_loss(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits,
                            labels.to(device)).sum().backward()
            for n, p in model.named_parameters():
                acc[n].add_(p.grad.float().square())
        model.zero_grad(set_to_none=True)

    def one_loss(params, ids, labels):
        # no attention mask: HF's mask builder branches on data, which vmap refuses; with right padding
        # and causal attention the mask does not change a sample's answer-token loss anyway
        return reference_per_sample_loss(functional_call(model, params, (), {"input_ids": ids[None]}).logits, labels[None])[0]

    def vmap_fisher(sub, batch):  # torch.func per-sample gradients, squared and summed
        params = {n: p.detach() for n, p in model.named_parameters()}
        acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        for ids, _, labels in batches(encode(tok, sub), batch, pad_id(tok)):
            per_sample = vmap(grad(one_loss), in_dims=(None, 0, 0))(params, ids.to(device), labels.to(device))
            for n, g in per_sample.items():
                acc[n].add_(g.square().sum(0))
            del per_sample

    results = {"batch-size-1 loop fisher": timed(loop_fisher)}
    for batch in batch_sizes:
        results[f"plain batched backward (grad), batch {batch}"] = timed(
            lambda r: estimate_importance(model, tok, r, "grad", batch_size=batch, progress=False))
        results[f"exact fisher (hooks), batch {batch}"] = timed(
            lambda r: estimate_importance(model, tok, r, "fisher", batch_size=batch, progress=False))
        if device == "cpu" and batch * param_bytes > 6 * 2**30:  # squared one parameter at a time
            results[f"torch.func vmap fisher, batch {batch}"] = {
                "skipped": f"its per-sample gradients alone take {batch * param_bytes / 2**30:.1f} GiB, "
                           "with activations too much for this 24 GiB machine"}
        else:
            results[f"torch.func vmap fisher, batch {batch}"] = timed(lambda r: vmap_fisher(r, batch), repeats=1)
    for batch in batch_sizes:
        floor = results[f"plain batched backward (grad), batch {batch}"]["s_per_sample"]
        for k, r in results.items():
            if "s_per_sample" in r and (k.endswith(f"batch {batch}") or (batch == 1 and "loop" in k)):
                r["x_plain_backward_same_batch"] = r["s_per_sample"] / floor
    return results


def bench_merge(model_dir: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from perta_fast.io import Checkpoint

    ck = Checkpoint(model_dir)
    if len(ck.weight_files) != 1:
        raise SystemExit("merge benchmark expects a single-file checkpoint")
    work = Path(tempfile.mkdtemp(prefix="perta-bench-"))
    (work / "ft").mkdir()
    g = torch.Generator().manual_seed(0)
    base_t = {n: ck.get(n) for n in ck.names()}
    save_file({n: t + 1e-3 * torch.randn(t.shape, generator=g) for n, t in base_t.items()}, str(work / "ft" / "model.safetensors"))
    for f in ("config.json",):
        (work / "ft" / f).write_text((model_dir / f).read_text())
    save_file({f"{k}/{n}": torch.rand(t.shape, generator=g) for n, t in base_t.items() for k in ("forget", "retain")},
              str(work / "imp.safetensors"), metadata={"method": "fisher", "n_forget": "1", "n_retain": "1"})
    nbytes = sum(t.numel() * t.element_size() for t in base_t.values())
    del base_t
    env = dict(os.environ, TQDM_DISABLE="1")
    out = {}
    for label, script, dst in (("naive in-memory (load_file, save_file)", NAIVE_MERGE, work / "naive.safetensors"),
                               ("streamed (perta-fast merge)", STREAMED_MERGE, work / "streamed")):
        runs = []
        for _ in range(3):
            subprocess.run(["rm", "-rf", str(dst)])
            r = subprocess.run([sys.executable, "-c", script, str(model_dir / "model.safetensors") if "naive" in label
                                else str(model_dir), str(work / "ft" / "model.safetensors") if "naive" in label
                                else str(work / "ft"), str(work / "imp.safetensors"), str(dst)],
                               capture_output=True, text=True, env=env, check=True)
            runs.append(tuple(map(float, r.stdout.split()[-2:])))
        seconds, growth = sorted(runs)[1]  # the median run
        # bytes moved: read θ_full, θ_ft, s_f, s_r (all fp32 here) and write θ_u
        out[label] = {"seconds": seconds, "rss_anon_growth_mb": growth / 2**20,
                      "effective_GBps": 5 * nbytes / seconds / 1e9}
    subprocess.run(["rm", "-rf", str(work)])
    naive = out["naive in-memory (load_file, save_file)"]
    for r in out.values():
        r["time_vs_naive"] = r["seconds"] / naive["seconds"]
        r["memory_vs_naive"] = r["rss_anon_growth_mb"] / naive["rss_anon_growth_mb"]
    return {"checkpoint_mb": nbytes / 2**20, **out}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint folder (default: SmolLM2-135M-Instruct, converted)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from perta_fast.models import default_model

    model_dir = Path(a.model) if a.model else default_model()
    result = {"command": " ".join(["python", "benchmarks/engine.py"] + sys.argv[1:]), "device": a.device,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "model": model_dir.name,
              "samples": a.samples, "batch_sizes": a.batch_sizes,
              "importance": bench_importance(model_dir, a.samples, [int(b) for b in a.batch_sizes.split(",")],
                                             a.device),
              "merge": bench_merge(model_dir)}
    out = Path(a.out) if a.out else HERE / "results" / f"engine-{a.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"| importance ({a.samples} samples; median of 3, vmap 1 run) | s/sample | × plain backward "
          "(same batch; loop: batch 1) | RssAnon +MB |")
    print("|---|---|---|---|")
    for k, r in result["importance"].items():
        if "skipped" in r:
            print(f"| {k} | skipped: {r['skipped']} | | |")
        else:
            print(f"| {k} | {r['s_per_sample']:.3f} | {r.get('x_plain_backward_same_batch', float('nan')):.2f} | "
                  f"{r['rss_anon_growth_mb']:.0f} |")
    print(f"\n| merge ({result['merge']['checkpoint_mb']:.0f} MB fp32; median of 3) | s | × naive time | RssAnon +MB | × naive memory | GB/s |")
    print("|---|---|---|---|---|---|")
    for k, r in result["merge"].items():
        if isinstance(r, dict):
            print(f"| {k} | {r['seconds']:.2f} | {r['time_vs_naive']:.2f} | {r['rss_anon_growth_mb']:.0f} | "
                  f"{r['memory_vs_naive']:.2f} | {r['effective_GBps']:.2f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
