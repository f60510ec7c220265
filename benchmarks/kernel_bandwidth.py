"""Elementwise kernels against the machine's copy bandwidth and against torch eager, in one run.

    python benchmarks/kernel_bandwidth.py                    # CPU: the C++ backend vs torch
    python benchmarks/kernel_bandwidth.py --elements 16777216
    python benchmarks/kernel_bandwidth.py --device cuda --backend triton   # a GPU: Triton vs torch

Effective bandwidth = (bytes read + bytes written) / time. The ceiling is a plain torch copy of a
large tensor measured in the same run (read + write). Writes benchmarks/results/kernels-<device>.json
and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from perta_fast import ops
from timing import median, run_seconds  # benchmarks/timing.py

HERE = Path(__file__).resolve().parent


def median_seconds(fn, repeats: int) -> float:
    return median(run_seconds(fn, repeats, sync=torch.cuda.synchronize if torch.cuda.is_available() else None)[0])


def with_backend(name, fn):
    def run():
        ops.set_backend(name)
        try:
            return fn()
        finally:
            ops.set_backend(None)
    return run


def cases(n: int, dtype: torch.dtype, device: str = "cpu"):
    """{name: (bytes moved, fast-kernel call, torch eager composition)}. Kernels write into buffers that
    are reused, as the streamed merge reuses one; torch eager allocates as torch code does."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).to(dtype)
    ft = (base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype)
    s_f, s_r = torch.rand(n, generator=g), torch.rand(n, generator=g)
    acc, grad, out = torch.zeros(n), torch.randn(n, generator=g).to(dtype), torch.empty(n, dtype=dtype)
    base, ft, s_f, s_r, acc, grad, out = (t.to(device) for t in (base, ft, s_f, s_r, acc, grad, out))
    e, f32 = dtype.itemsize, 4
    rows = {
        "merge (s_f, s_r fused)": (n * (3 * e + 2 * f32),
                                   lambda: ops.merge_tensors(base, ft, s_f=s_f, s_r=s_r, lam=1.0, out=out),
                                   lambda: ops.merge_tensor(base, ft, ops.ratio_weights(s_f, s_r), 1.0)),
        "merge (TV)": (n * 3 * e, lambda: ops.merge_tensors(base, ft, lam=1.0, out=out),
                       lambda: ops.merge_tensor(base, ft, None, 1.0)),
        "accumulate g²": (n * (2 * f32 + e), lambda: ops.accumulate_(acc, grad, True),
                          lambda: acc.addcmul_(grad, grad)),
    }
    if dtype == torch.float32:  # the scores are fp32 whatever the checkpoint's dtype
        scratch = s_f.clone()
        rows["ratio (w over s_f)"] = (n * 3 * f32, lambda: ops.ratio(scratch, s_r, over_s_f=True),
                                      lambda: ops.ratio_weights(s_f, s_r))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=1 << 25, help="elements per tensor (default 32M)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="cpp", help="the fast backend to measure (cpp on CPU)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda with --backend triton")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if ops.backend_status().get(a.backend):
        sys.exit(f"backend {a.backend} unavailable: {ops.backend_status()[a.backend]}")
    n = a.elements
    src = torch.randn(n * 2, device=a.device)  # the copy ceiling: 2n fp32 read + written
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), a.repeats)
    copy_gbps = 2 * src.numel() * 4 / copy_s / 1e9
    del src, dst
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, (nbytes, kernel, eager) in cases(n, dtype, a.device).items():
            k = median_seconds(with_backend(a.backend, kernel), a.repeats)
            t = median_seconds(with_backend("torch", eager), a.repeats)
            rows.append({"op": name, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes,
                         "kernel_s": k, "torch_eager_s": t, "kernel_GBps": nbytes / k / 1e9,
                         "torch_GBps": nbytes / t / 1e9, "kernel_vs_copy": nbytes / k / 1e9 / copy_gbps,
                         "speedup_vs_torch": t / k})
    result = {"command": " ".join(["python", "benchmarks/kernel_bandwidth.py"] + sys.argv[1:]), "backend": a.backend,
              "torch": torch.__version__, "device": a.device, "threads": torch.get_num_threads(), "elements": n,
              "copy_GBps": copy_gbps, "rows": rows}
    out = Path(a.out) if a.out else HERE / "results" / f"kernels-{a.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"copy bandwidth (torch copy_, read + write): {copy_gbps:.2f} GB/s; {n} elements per tensor, "
          f"median of {a.repeats}")
    print(f"| op | dtype | {a.backend} GB/s | × copy bandwidth | torch eager GB/s | {a.backend} speed-up vs torch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['dtype']} | {r['kernel_GBps']:.2f} | {r['kernel_vs_copy']:.2f} | "
              f"{r['torch_GBps']:.2f} | {r['speedup_vs_torch']:.2f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
