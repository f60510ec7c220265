"""Exact per-sample Fisher of a Linear weight without materialising per-sample gradients:
acc (out, in) += Σ_b (G_bᵀ X_b)², X (B, T, in) the layer input, G (B, T, out) its output gradient.

Each program owns one (out, in) tile: for every sample it forms G_bᵀX_b for that tile in registers
(a loop of dots over token blocks), squares it and adds it to a running sum, and writes the tile once.
Memory traffic is one read of X and G per tile row/column, instead of writing and re-reading B
per-sample gradients of the whole layer."""
import torch
import triton
import triton.language as tl


@triton.jit
def _per_sample_sq_kernel(x_ptr, g_ptr, acc_ptr, B, T, IN, OUT, sxb, sxt, sxi, sgb, sgt, sgo,
                          BO: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr):
    o = tl.program_id(0) * BO + tl.arange(0, BO)
    i = tl.program_id(1) * BI + tl.arange(0, BI)
    sq = tl.zeros((BO, BI), tl.float32)
    for b in range(0, B):
        tile = tl.zeros((BO, BI), tl.float32)
        for t0 in range(0, T, BT):
            t = t0 + tl.arange(0, BT)
            g = tl.load(g_ptr + b * sgb + t[:, None] * sgt + o[None, :] * sgo,
                        mask=(t[:, None] < T) & (o[None, :] < OUT), other=0.0).to(tl.float32)  # (BT, BO)
            x = tl.load(x_ptr + b * sxb + t[:, None] * sxt + i[None, :] * sxi,
                        mask=(t[:, None] < T) & (i[None, :] < IN), other=0.0).to(tl.float32)  # (BT, BI)
            # ieee: TF32 would round the inputs to 10 mantissa bits; the Fisher is meant to be exact
            tile += tl.dot(tl.trans(g), x, input_precision="ieee")
        sq += tile * tile
    mask = (o[:, None] < OUT) & (i[None, :] < IN)
    ptrs = acc_ptr + o[:, None].to(tl.int64) * IN + i[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + sq, mask=mask)


def per_sample_sq_(acc: torch.Tensor, x: torch.Tensor, g: torch.Tensor, bo: int = 64, bi: int = 64,
                   bt: int = 16) -> torch.Tensor:
    """acc += Σ_b (g[b]ᵀ x[b])², in place; acc (out, in) fp32 contiguous, x (B, T, in), g (B, T, out)."""
    if x.dim() != 3 or g.dim() != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(f"x (B, T, in) and g (B, T, out) must share B and T, got {tuple(x.shape)}, {tuple(g.shape)}")
    if acc.dtype != torch.float32 or not acc.is_contiguous() or acc.shape != (g.shape[2], x.shape[2]):
        raise ValueError(f"acc must be a contiguous float32 ({g.shape[2]}, {x.shape[2]}) tensor")
    b, t, n_in = x.shape
    n_out = g.shape[2]
    if acc.numel() and b and t:
        grid = (triton.cdiv(n_out, bo), triton.cdiv(n_in, bi))
        _per_sample_sq_kernel[grid](x, g, acc, b, t, n_in, n_out, *x.stride(), *g.stride(), BO=bo, BI=bi, BT=bt)
    return acc
