"""Exact per-sample Fisher of a Linear weight without materialising per-sample gradients:
acc (out, in) += Σ_b (G_bᵀ X_b)², X (B, T, in) the layer input, G (B, T, out) its output gradient.

Each program owns one (out, in) tile: it forms G_bᵀX_b for that tile on the tensor cores (dots over token
blocks, accumulated in fp32), squares it into a running sum when a sample's last token block is in, and writes
the tile once. Memory traffic is one read of X and G per tile row/column, instead of writing and re-reading B
per-sample gradients of the whole layer.

Numerics: bf16 and fp16 tiles enter the dot in their own dtype (a product of two is exact in fp32, and the
accumulation is fp32, so nothing is lost against converting first); fp32 tiles go through tf32x3, three tf32
products that recover ~fp32 accuracy (measured against float64: benchmarks/kernel_compile.py --precision).
The sample and token-block loops are one loop, so the software pipeline keeps loading across samples.
Offsets are 64-bit: b·stride passes 2³¹ for an untied 128k-vocabulary head at batch 8 × 4096 tokens."""
import os

import torch
import triton
import triton.language as tl

# (BO, BI, BT, GROUP, warps, stages): 128×128 tiles feed wgmma on sm_90 and mma on sm_80; the smaller ones serve
# narrow layers. Two fp32 tiles (the sample's dot and the running sum of squares) live in registers: a 128-row tile
# needs 8 warps not to spill, and fp32's tf32x3 split operands a 32-token step at 128×128 (benchmarks/RESULTS.md,
# "Kernels compiled"). triton.autotune picks per (IN, OUT, T) and dtype on a GPU; the interpreter, which has no
# clock to tune by and runs small tiles faster, takes INTERPRETED.
CONFIGS = {torch.bfloat16: [(128, 128, 64, 8, 8, 3), (128, 64, 64, 8, 8, 3), (64, 128, 64, 8, 8, 3), (64, 64, 64, 8, 4, 4)],
           torch.float32: [(128, 128, 32, 8, 8, 3), (128, 64, 64, 8, 8, 3), (64, 128, 64, 8, 8, 3), (64, 64, 64, 8, 4, 4)]}
CONFIGS[torch.float16] = CONFIGS[torch.bfloat16]
# sm_80's mma.sync holds its accumulators in registers beside the two tiles: there sm_90's fp32 configurations
# spill 4-556 bytes, so fp32 takes 32-token steps of at most 128×64 (none spills)
SM80_FP32 = [(128, 64, 32, 8, 8, 3), (64, 128, 32, 8, 8, 3), (128, 64, 32, 8, 8, 4), (64, 64, 32, 8, 4, 3)]
INTERPRETED = (64, 64, 16, 8, 4, 1)
PRECISION = {torch.float32: "tf32x3", torch.bfloat16: "ieee", torch.float16: "ieee"}  # ieee: exact 16-bit products


def configs(dtype: torch.dtype, major: int) -> list:
    """The configurations the autotuner tries for `dtype` on a GPU of compute capability `major`.x."""
    return SM80_FP32 if dtype == torch.float32 and major < 9 else CONFIGS[dtype]


@triton.jit
def _per_sample_sq_kernel(x_ptr, g_ptr, acc_ptr, B, T, IN, OUT, sxb, sxt, sxi, sgb, sgt, sgo,
                          BO: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # grouped ordering: GROUP consecutive programs walk down one column of tiles, sharing its X block in L2
    pid = tl.program_id(0)
    n_o, n_i = tl.cdiv(OUT, BO), tl.cdiv(IN, BI)
    first_o = (pid // (GROUP * n_i)) * GROUP
    rows = tl.minimum(n_o - first_o, GROUP)
    pid_o = first_o + (pid % (GROUP * n_i)) % rows
    pid_i = (pid % (GROUP * n_i)) // rows
    o = pid_o * BO + tl.arange(0, BO)
    i = pid_i * BI + tl.arange(0, BI)
    g_cols = g_ptr + o.to(tl.int64)[None, :] * sgo
    x_cols = x_ptr + i.to(tl.int64)[None, :] * sxi
    n_t = tl.cdiv(T, BT)
    sq = tl.zeros((BO, BI), tl.float32)
    tile = tl.zeros((BO, BI), tl.float32)
    for step in range(0, B * n_t):  # one loop over (sample, token block): the pipeline runs across samples
        b = (step // n_t).to(tl.int64)
        t = (step % n_t) * BT + tl.arange(0, BT)
        t_ok = t[:, None] < T
        t64 = t.to(tl.int64)[:, None]
        g = tl.load(g_cols + b * sgb + t64 * sgt, mask=t_ok & (o[None, :] < OUT), other=0.0)  # (BT, BO)
        x = tl.load(x_cols + b * sxb + t64 * sxt, mask=t_ok & (i[None, :] < IN), other=0.0)  # (BT, BI)
        if UPCAST:  # the interpreter's dot multiplies bf16 as raw bits: the same exact products, in fp32 there
            g, x = g.to(tl.float32), x.to(tl.float32)
        tile = tl.dot(tl.trans(g), x, tile, input_precision=PRECISION)
        if step % n_t == n_t - 1:  # the sample's gradient tile is complete
            sq += tile * tile
            tile = tl.zeros((BO, BI), tl.float32)
    mask = (o[:, None] < OUT) & (i[None, :] < IN)
    ptrs = acc_ptr + o[:, None].to(tl.int64) * IN + i[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + sq, mask=mask)


def _config(bo, bi, bt, group, warps, stages):
    return triton.Config({"BO": bo, "BI": bi, "BT": bt, "GROUP": group}, num_warps=warps, num_stages=stages)


_tuned: dict = {}  # (dtype, major) -> its autotuner, made on first use


def _autotuned(dtype: torch.dtype, major: int):
    if (dtype, major) not in _tuned:
        _tuned[dtype, major] = triton.autotune([_config(*c) for c in configs(dtype, major)], key=["IN", "OUT", "T"],
                                               restore_value=["acc_ptr"])(_per_sample_sq_kernel)
    return _tuned[dtype, major]


def per_sample_sq_(acc: torch.Tensor, x: torch.Tensor, g: torch.Tensor, config: tuple | None = None) -> torch.Tensor:
    """acc += Σ_b (g[b]ᵀ x[b])², in place; acc (out, in) fp32 contiguous, x (B, T, in), g (B, T, out).
    `config` (BO, BI, BT, GROUP, warps, stages) fixes the tiles; by default they are autotuned on a GPU."""
    if x.dim() != 3 or g.dim() != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(f"x (B, T, in) and g (B, T, out) must share B and T, got {tuple(x.shape)}, {tuple(g.shape)}")
    if x.dtype not in PRECISION or g.dtype not in PRECISION:
        raise ValueError(f"x and g must be one of {', '.join(map(str, PRECISION))}, got {x.dtype} and {g.dtype}")
    if x.dtype != g.dtype:  # one dot dtype: mixed inputs (an autocast region's edge) meet in fp32
        x, g = x.float(), g.float()
    if acc.dtype != torch.float32 or not acc.is_contiguous() or acc.shape != (g.shape[2], x.shape[2]):
        raise ValueError(f"acc must be a contiguous float32 ({g.shape[2]}, {x.shape[2]}) tensor")
    # a unit innermost stride is what lets the JIT see contiguous rows (an int argument equal to 1 becomes a
    # constant): vector loads, and cp.async pipelining of 16-bit tiles; another stride would still be correct
    x, g = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, g))
    b, t, n_in = x.shape
    n_out = g.shape[2]
    if not (acc.numel() and b and t):
        return acc
    args = (x, g, acc, b, t, n_in, n_out, *x.stride(), *g.stride())
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if config is None and interpreted:
        config = INTERPRETED
    if config is None:
        grid = lambda meta: (triton.cdiv(n_out, meta["BO"]) * triton.cdiv(n_in, meta["BI"]),)  # noqa: E731
        major = torch.cuda.get_device_capability(x.device)[0]
        _autotuned(x.dtype, major)[grid](*args, PRECISION=PRECISION[x.dtype], UPCAST=False)
    else:
        bo, bi, bt, group, warps, stages = config
        grid = (triton.cdiv(n_out, bo) * triton.cdiv(n_in, bi),)
        _per_sample_sq_kernel[grid](*args, BO=bo, BI=bi, BT=bt, GROUP=group, PRECISION=PRECISION[x.dtype],
                                    UPCAST=interpreted, num_warps=warps, num_stages=stages)
    return acc
