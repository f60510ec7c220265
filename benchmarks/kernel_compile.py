"""Every Triton kernel compiled ahead of time for a GPU, without one: the compiled facts (registers, spills, shared
memory, tensor-core instructions, the numerics each PTX carries) beside a roofline model of what each kernel
should take on an H100 at Llama-3.1-8B and -70B shapes, so the first GPU run has numbers to be judged against.

    python benchmarks/kernel_compile.py                          # sm_90: every kernel, dtype and configuration
    python benchmarks/kernel_compile.py --arch sm_80 --out DIR   # the .ptx files and kernels.json in DIR
    python benchmarks/kernel_compile.py --quick                  # each kernel and dtype at its first configuration
    python benchmarks/kernel_compile.py --time                   # on a GPU: each kernel timed beside its floor

Each variant goes through triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) with the launch options
its launcher uses (warps, stages, the pinned kernels' enable_fp_fusion and enable_reflect_ftz); ptxas from the triton wheel (-v) reports registers, spill
bytes and static shared memory; Triton's metadata the dynamic shared memory. Tensor cores: `wgmma` (sm_90) or
`mma.sync` (sm_80) in the PTX. Numerics: whether the PTX divides with div.rn (correctly rounded) or an approximate
division, and whether any fma.rn.f32 remains where the kernel pins the reference's two roundings. Writes
DIR/<kernel>-<dtype>-<config>.ptx, DIR/kernels.json, and benchmarks/results/kernel-compile-<arch>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def variants(quick: bool = False, major: int = 9) -> list[dict]:
    """Every (kernel, dtype, configuration) a launcher can pick on a GPU of compute capability `major`.x."""
    import torch

    # @triton.jit makes interpreter objects under TRITON_INTERPRET=1, triton.language's own helpers at its import:
    # main() clears it before triton is imported, and the compile test runs this file in a process of its own
    from perta_fast.kernels import accumulate, fisher, merge, ratio

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    out = []
    for dtype, ptr in DTYPES.items():
        configs = fisher.configs(torch_dtype[dtype], major)
        for bo, bi, bt, group, warps, stages in configs[:1] if quick else configs:
            out.append(dict(
                kernel="fisher", dtype=dtype, config=f"{bo}x{bi}x{bt}-g{group}-w{warps}-s{stages}",
                fn=fisher._per_sample_sq_kernel, warps=warps, stages=stages, options={},
                signature={"x_ptr": ptr, "g_ptr": ptr, "acc_ptr": "*fp32", **dict.fromkeys(
                    ("B", "T", "IN", "OUT", "sxb", "sxt", "sgb", "sgt"), "i32")},
                # contiguous inputs: the JIT turns an int argument equal to 1 into a constant, so the innermost
                # strides are known to be 1 and the loads vectorise (and, 16-bit, pipeline through cp.async)
                constexprs={"sxi": 1, "sgo": 1, "BO": bo, "BI": bi, "BT": bt, "GROUP": group,
                            "PRECISION": fisher.PRECISION[torch_dtype[dtype]], "UPCAST": False},
                aligned=["x_ptr", "g_ptr", "acc_ptr", "T", "IN", "OUT", "sxb", "sxt", "sgb", "sgt"]))
        for pow_mode in (ratio.NO_POW, ratio.LIBDEVICE_POW):
            suffix = "" if pow_mode == ratio.NO_POW else "-pow"
            out.append(dict(
                kernel="ratio", dtype=dtype, config=f"1024{suffix}", fn=ratio._ratio_kernel, warps=4, stages=3,
                options=ratio.PINNED, pinned=pow_mode == ratio.NO_POW,
                signature={"sf_ptr": ptr, "sr_ptr": ptr, "out_ptr": ptr, "n": "i32", "alpha": "fp32",
                           "power": "fp32", "eps": "fp32"}, aligned=["sf_ptr", "sr_ptr", "out_ptr", "n"],
                constexprs={"POW": pow_mode, "BLOCK": 1024}))
            for mode, name in ((merge.TV, "tv"), (merge.WEIGHTS, "w"), (merge.SCORES, "scores")):
                if pow_mode != ratio.NO_POW and (mode != merge.SCORES or quick):
                    continue
                for zero in ((False,) if quick else (False, True)):
                    for delta in ((False,) if quick else (False, True)):
                        cfg = f"{name}{suffix}" + ("-zero" if zero else "") + ("-delta" if delta else "")
                        out.append(dict(
                            kernel="merge", dtype=dtype, config=cfg, fn=merge._merge_kernel, warps=4, stages=3,
                            options=ratio.PINNED, pinned=pow_mode == ratio.NO_POW,
                            signature={"base_ptr": ptr, "ft_ptr": ptr, "w_ptr": "*fp16" if mode == merge.WEIGHTS else ptr,
                                       "sf_ptr": "*fp32", "sr_ptr": "*fp32", "out_ptr": ptr, "wsum_ptr": "*fp32",
                                       "bad_ptr": "*i32", "n": "i32", "lam": "fp32", "alpha": "fp32", "power": "fp32",
                                       "eps": "fp32"},
                            constexprs={"MODE": mode, "POW": pow_mode, "ZERO": zero, "DELTA": delta, "BLOCK": 1024},
                            aligned=["base_ptr", "ft_ptr", "w_ptr", "sf_ptr", "sr_ptr", "out_ptr", "wsum_ptr",
                                     "bad_ptr", "n"]))
        for square in (True, False):
            for n_aligned in ((True,) if quick else (True, False)):  # the launcher's bulk launch, and a size % 16 ≠ 0
                out.append(dict(
                    kernel="accumulate", dtype=dtype, config=("square" if square else "sum") + ("" if n_aligned else "-odd-n"),
                    fn=accumulate._accumulate_kernel, warps=4, stages=3, options={},
                    signature={"acc_ptr": "*fp32", "g_ptr": ptr, "n": "i32"}, constexprs={"SQUARE": square, "BLOCK": 1024},
                    aligned=["acc_ptr", "g_ptr"] + (["n"] if n_aligned else [])))
    return out


def ptxas(cc: int = 90) -> str:
    """The ptxas Triton itself compiles with (the wheel's newest: its PTX version is newer than the older one's)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cc).path


def compile_one(v: dict, cc: int) -> dict:
    """The variant compiled for compute capability `cc` (80, 90): its PTX and the facts read from it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**v["signature"], **dict.fromkeys(v["constexprs"], "constexpr")}
    # what the JIT assumes of a launch with 16-byte aligned tensors and sizes and strides divisible by 16
    attrs = {(v["fn"].arg_names.index(k),): [["tt.divisibility", 16]] for k in v["aligned"]}
    compiled = triton.compile(ASTSource(v["fn"], signature, v["constexprs"], attrs), target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": v["warps"], "num_stages": v["stages"], **v["options"]})
    ptx = compiled.asm["ptx"]
    arch = re.search(r"\.target\s+(\S+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        report = subprocess.run([ptxas(cc), "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")],
                                capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        m = re.search(pattern, report)
        return int(m.group(1)) if m else 0

    return {"kernel": v["kernel"], "dtype": v["dtype"], "config": v["config"], "arch": arch,
            "warps": v["warps"], "stages": v["stages"], "options": v["options"],
            "registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack_bytes": number(r"(\d+) bytes stack frame"),
            "static_smem": number(r"(\d+) bytes smem"), "dynamic_smem": compiled.metadata.shared,
            "wgmma": "wgmma" in ptx, "mma_sync": bool(re.search(r"\bmma\.sync", ptx)),
            "ffma": len(re.findall(r"\bfma\.rn\.f32", ptx)),
            "div_rn": len(re.findall(r"\bdiv\.rn\.f32", ptx)),
            "div_approx": len(re.findall(r"\bdiv\.(full|approx)\.f32", ptx)),
            "ex2_approx_ftz": len(re.findall(r"\bex2\.approx\.ftz", ptx)),
            # flush-to-zero arithmetic, less the rcp.approx.ftz libdevice's powf keeps even without ftz (inside its
            # own range reduction; tests/test_gpu.py checks subnormal scores end to end on a GPU)
            "ftz": len(re.findall(r"\.ftz\b", ptx)) - len(re.findall(r"\brcp\.approx\.ftz\b", ptx)),
            "shared_stores": len(re.findall(r"\bst\.shared", ptx)),
            "vector_loads": len(re.findall(r"\bld\.global(?:\.\w+)*\.v[248]\b", ptx)),
            "async_copies": len(re.findall(r"\bcp\.async\.(?:ca|cg|bulk)", ptx)),
            "pinned": v.get("pinned", False), "ptx": ptx}


# ---- the roofline: what each kernel should take on an H100 SXM (dense peaks, no sparsity) ----

H100 = {"bf16_tflops": 989.0, "tf32_tflops": 494.0, "fp32_tflops": 67.0, "hbm_tb_s": 3.35}
# Linear weights (out, in) of one decoder layer, and the untied head; layers; Llama-3.1's published shapes
MODELS = {"Llama-3.1-8B": {"layers": 32, "head": (128256, 4096),
                           "linears": [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096),
                                       (14336, 4096), (14336, 4096), (4096, 14336)]},
          "Llama-3.1-70B": {"layers": 80, "head": (128256, 8192),
                            "linears": [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192),
                                        (28672, 8192), (28672, 8192), (8192, 28672)]}}


def roofline(tokens: int = 8 * 512, dtype: str = "bf16") -> dict:
    """Per model: the floor (max of FLOP at the tensor-core peak and compulsory bytes at HBM bandwidth) of the
    Fisher over every Linear, against the backward's own weight-gradient matmuls (the same FLOP), and of the
    elementwise kernels over every weight (ratio on fp32 scores, the merge of bf16 weights with fp32 scores,
    accumulate of bf16 gradients into fp32)."""
    e = ELEMENT_BYTES[dtype]
    peak = (H100["bf16_tflops"] if dtype != "fp32" else H100["tf32_tflops"] / 3) * 1e12  # tf32x3: 3 products
    bw = H100["hbm_tb_s"] * 1e12
    out = {}
    for name, m in MODELS.items():
        shapes = m["linears"] * m["layers"] + [m["head"]]
        params = sum(o * i for o, i in shapes)
        flop = sum(2 * tokens * o * i for o, i in shapes)
        fisher_bytes = sum(tokens * (o + i) * e + 8 * o * i for o, i in shapes)  # X, G once; acc read + written
        wgrad_bytes = sum(tokens * (o + i) * e + e * o * i for o, i in shapes)
        one = max(m["linears"], key=lambda s: s[0] * s[1])
        out[name] = {
            "params": params, "tokens": tokens, "dtype": dtype,
            "fisher_ms": 1e3 * max(flop / peak, fisher_bytes / bw),
            "weight_grad_ms": 1e3 * max(flop / peak, wgrad_bytes / bw),
            "largest_linear": {"shape": one, "flop": 2 * tokens * one[0] * one[1],
                               "fisher_ms": 1e3 * max(2 * tokens * one[0] * one[1] / peak,
                                                      (tokens * sum(one) * e + 8 * one[0] * one[1]) / bw)},
            "ratio_ms": 1e3 * params * (4 + 4 + 4) / bw,  # s_f, s_r read (fp32), w written (fp32)
            "merge_ms": 1e3 * params * (e + e + 4 + 4 + e) / bw,  # base, ft, s_f, s_r read; out written
            "accumulate_ms": 1e3 * params * (4 + e + 4) / bw,  # acc read, g read, acc written
            "fisher_cuda_cores_ms": 1e3 * flop / (H100["fp32_tflops"] * 1e12),  # the old kernel's floor
        }
    return out


def markdown(facts: list[dict], arch: str, lines_per_kernel: dict, accuracy: list | None = None) -> str:
    head = ["| kernel | dtype | configuration | registers | spills (st/ld bytes) | smem (static + dynamic) | "
            "tensor cores | fma.rn.f32 | division | vector loads |", "|---|---|---|---:|---:|---:|---|---:|---|---:|"]
    rows = []
    for f in facts:
        cores = "wgmma" if f["wgmma"] else "mma.sync" if f["mma_sync"] else "none"
        div = "-" if not (f["div_rn"] or f["div_approx"]) else "rn" if not f["div_approx"] else "approximate"
        rows.append(f"| {f['kernel']} | {f['dtype']} | {f['config']} | {f['registers']} | "
                    f"{f['spill_stores']}/{f['spill_loads']} | {f['static_smem']} + {f['dynamic_smem']} | {cores} | "
                    f"{f['ffma']} | {div} | {f['vector_loads']} |")
    roof = roofline()
    pred = ["| model | params | Fisher floor | weight-grad floor | Fisher on fp32 CUDA cores (old kernel's floor) | "
            "ratio | merge | accumulate |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in roof.items():
        pred.append(f"| {name} | {r['params'] / 1e9:.2f} B | {r['fisher_ms']:.1f} ms | {r['weight_grad_ms']:.1f} ms | "
                    f"{r['fisher_cuda_cores_ms']:.0f} ms | {r['ratio_ms']:.1f} ms | {r['merge_ms']:.1f} ms | "
                    f"{r['accumulate_ms']:.1f} ms |")
    acc = []
    for a in accuracy or []:
        e = a["median_relative_error"]
        acc.append(f"| {' × '.join(map(str, a['shape']))} | {e['tf32x3']:.2e} | {e['fp32 dot']:.2e} | {e['tf32']:.2e} |")
    if acc:
        acc = ["", "The fp32 Fisher's tf32x3 dot, emulated in torch (tf32 rounding to nearest even), median relative "
               "error of Σ_b (g_bᵀx_b)² against float64 (shape B × T × in × out):", "",
               "| shape | tf32x3 | plain fp32 dot | one tf32 product |", "|---|---:|---:|---:|", *acc]
    return "\n".join([f"Compiled for {arch} (triton {lines_per_kernel['triton']}, ptxas {lines_per_kernel['ptxas']}):",
                      "", *head, *rows, "",
                      "Roofline on an H100 SXM (bf16 989 TFLOP/s dense, HBM 3.35 TB/s), bf16 weights, batch 8 × 512 "
                      "tokens, one batch over every Linear (the head included):", "", *pred, *acc])


def precision(shapes=((4, 256, 512, 384),), seed: int = 0) -> list[dict]:
    """tf32x3 (the fp32 Fisher's dot) emulated in torch against float64 and against a plain fp32 dot: each input
    split into a tf32 high part and a tf32 remainder, the three largest products summed in fp32."""
    import torch

    def tf32(t):  # round to nearest, 10 explicit mantissa bits
        bits = t.view(torch.int32)
        return ((bits + 0x1000 + ((bits >> 13) & 1) - 1) & ~0x1FFF).view(torch.float32)

    out = []
    gen = torch.Generator().manual_seed(seed)
    for b, t, n_in, n_out in shapes:
        x, g = torch.randn(b, t, n_in, generator=gen), torch.randn(b, t, n_out, generator=gen)
        exact = sum((g[i].double().T @ x[i].double()) ** 2 for i in range(b))
        hi_x, hi_g = tf32(x), tf32(g)
        lo_x, lo_g = tf32(x - hi_x), tf32(g - hi_g)
        x3 = sum(((hi_g[i].T @ hi_x[i]) + (hi_g[i].T @ lo_x[i]) + (lo_g[i].T @ hi_x[i])) ** 2 for i in range(b))
        fp32 = sum((g[i].T @ x[i]) ** 2 for i in range(b))
        plain_tf32 = sum((hi_g[i].T @ hi_x[i]) ** 2 for i in range(b))
        rel = lambda got: float(((got.double() - exact).abs() / exact.abs().clamp_min(1e-30)).median())  # noqa: E731
        out.append({"shape": [b, t, n_in, n_out], "median_relative_error": {
            "tf32x3": rel(x3), "fp32 dot": rel(fp32), "tf32": rel(plain_tf32)}})
    return out


def timed(repeats: int = 20) -> dict:
    """On CUDA: the kernels at Llama-3.1-8B's largest Linear (14336 × 4096, bf16, batch 8 × 512 tokens) against
    their roofline floors, and the Fisher against the backward's own weight-gradient matmul, in one run."""
    import torch

    from perta_fast import ops
    from perta_fast.kernels.fisher import per_sample_sq_
    from timing import median, run_seconds

    def ms(fn):
        return 1e3 * median(run_seconds(fn, repeats, sync=torch.cuda.synchronize)[0])

    n_out, n_in, b, t = 14336, 4096, 8, 512
    x = torch.randn(b, t, n_in, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(b, t, n_out, device="cuda", dtype=torch.bfloat16)
    acc = torch.zeros(n_out, n_in, device="cuda")
    n = n_out * n_in
    base, ft = (torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    s_f, s_r = (torch.rand(n, device="cuda") for _ in range(2))
    ops.set_backend("triton")
    try:
        per_sample_sq_(acc, x, g)  # the autotuner's choice first, outside the timing
        got = {"fisher_ms": ms(lambda: per_sample_sq_(acc, x, g)),
               "weight_grad_ms": ms(lambda: g.reshape(-1, n_out).T @ x.reshape(-1, n_in)),
               "ratio_ms": ms(lambda: ops.ratio(s_f, s_r)),
               "merge_ms": ms(lambda: ops.merge_tensors(base, ft, s_f=s_f, s_r=s_r, lam=1.0)),
               "accumulate_ms": ms(lambda: ops.accumulate_(s_f, base, square=True))}
    finally:
        ops.set_backend(None)
    one = roofline()["Llama-3.1-8B"]["largest_linear"]
    e, bw = 2, H100["hbm_tb_s"] * 1e12
    floors = {"fisher_ms": one["fisher_ms"], "ratio_ms": 1e3 * n * 12 / bw, "merge_ms": 1e3 * n * (3 * e + 8) / bw,
              "accumulate_ms": 1e3 * n * (8 + e) / bw}
    return {"shape": [n_out, n_in, b, t], "device": torch.cuda.get_device_name(), "measured": got, "floor": floors,
            "fisher_over_weight_grad": got["fisher_ms"] / got["weight_grad_ms"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["sm_80", "sm_90"], default="sm_90")
    ap.add_argument("--out", default=None, help="folder for the .ptx files and kernels.json (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="each kernel and dtype at its first configuration only")
    ap.add_argument("--time", action="store_true", help="on a GPU: time each kernel at an 8B layer beside its floor "
                    "(benchmarks/results/kernel-time-cuda.json)")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules:
        # compiling needs triton.language's own @jit helpers made for the compiler, which happens at import
        del os.environ["TRITON_INTERPRET"]
    if a.time:
        record = timed()
        (HERE / "results" / "kernel-time-cuda.json").write_text(json.dumps(record, indent=1))
        print(json.dumps(record, indent=1))
        return 0
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launchers say per kernel; silences 3.9's notice
    import triton

    cc = int(a.arch[3:])
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="kernel-compile-"))
    out.mkdir(parents=True, exist_ok=True)
    facts = []
    for v in variants(a.quick, cc // 10):
        f = compile_one(v, cc)
        (out / f"{f['kernel']}-{f['dtype']}-{f['config']}.ptx").write_text(f.pop("ptx"))
        facts.append(f)
        print(f"{f['kernel']:10} {f['dtype']:5} {f['config']:28} regs {f['registers']:3} spills "
              f"{f['spill_stores']}/{f['spill_loads']} wgmma {f['wgmma']} mma {f['mma_sync']}", file=sys.stderr)
    version = subprocess.run([ptxas(cc), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    about = {"triton": triton.__version__, "ptxas": version}
    record = {"arch": a.arch, **about, "kernels": facts, "roofline": roofline(), "tf32x3": precision()}
    (out / "kernels.json").write_text(json.dumps(record, indent=1))
    if not a.quick:
        results = HERE / "results" / f"kernel-compile-{a.arch}"
        results.with_suffix(".json").write_text(json.dumps(record, indent=1))
        results.with_suffix(".md").write_text(markdown(facts, a.arch, about, record["tf32x3"]) + "\n")
    print(markdown(facts, a.arch, about, record["tf32x3"]))
    print(f"\n.ptx files and kernels.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
