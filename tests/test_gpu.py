"""Every Triton kernel against its reference at real layer shapes on a GPU (Llama-3.1-8B's 14336 × 4096 MLP weight,
an untied 128k-vocabulary head), compiled, not interpreted. Skipped without CUDA; benchmarks/gpu_check.sh runs
them (`python -m pytest -m gpu tests/test_gpu.py`)."""
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="needs CUDA (and the compiled kernels, not the interpreter)")]
U = 2.0 ** -24  # fp32 unit roundoff


def rand(shape, dtype, seed, positive=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randn(shape, generator=g, device="cuda")
    return (t.abs() if positive else t).to(dtype)


def fisher_bound(x, g, rows, factor):
    """|got − exact| bound for rows `rows` of Σ_b (g_bᵀ x_b)²: each dot's accumulation over T tokens in fp32
    (T·u relative to Σ|g||x|), doubled by the square, summed over samples; `factor` for the product's own
    error (1: 16-bit products are exact in fp32; tf32x3 leaves ~2^-21 per product)."""
    t = x.shape[1]
    mags = sum((g[i, :, rows].double().abs().T @ x[i].double().abs()) ** 2 for i in range(x.shape[0]))
    return 2 * factor * t * U * mags + U * mags


@pytest.mark.parametrize("dtype,factor", [(torch.bfloat16, 1), (torch.float16, 1), (torch.float32, 8)])
def test_fisher_at_an_8b_mlp_weight(dtype, factor):
    from perta_fast.kernels.fisher import per_sample_sq_

    x, g = rand((8, 512, 4096), dtype, 0), rand((8, 512, 14336), dtype, 1)
    acc = per_sample_sq_(torch.zeros(14336, 4096, device="cuda"), x, g)
    for rows in (slice(0, 256), slice(14336 - 200, 14336)):  # the first and the last (partial) tiles
        exact = sum((g[i, :, rows].double().T @ x[i].double()) ** 2 for i in range(8))
        assert ((acc[rows].double() - exact).abs() <= fisher_bound(x, g, rows, factor)).all()


def test_fisher_at_a_128k_vocabulary_head():
    from perta_fast.kernels.fisher import per_sample_sq_

    x, g = rand((2, 256, 4096), torch.bfloat16, 2), rand((2, 256, 128256), torch.bfloat16, 3)
    acc = per_sample_sq_(torch.zeros(128256, 4096, device="cuda"), x, g)
    rows = slice(128256 - 300, 128256)
    exact = sum((g[i, :, rows].double().T @ x[i].double()) ** 2 for i in range(2))
    assert ((acc[rows].double() - exact).abs() <= fisher_bound(x, g, rows, 1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_and_ratio_equal_the_torch_reference_to_the_bit(dtype):
    from perta_fast import ops

    n = 14336 * 4096 + 7  # not a multiple of any block
    base, ft = rand((n,), dtype, 4), rand((n,), dtype, 5)
    s_f, s_r = rand((n,), torch.float32, 6, positive=True), rand((n,), torch.float32, 7, positive=True)
    ops.set_backend("triton")
    try:
        w = ops.ratio(s_f, s_r, 0.5, 1.0, 1e-16)
        merged, _, _ = ops.merge_tensors(base, ft, s_f=s_f, s_r=s_r, lam=1.7, alpha=0.5)
    finally:
        ops.set_backend(None)
    want_w = ops.ratio_weights(s_f, s_r, 0.5, 1.0, 1e-16)
    assert torch.equal(w, want_w)
    assert torch.equal(merged, ops.merge_tensor(base, ft, want_w, 1.7))


def test_ratio_with_a_power_keeps_scores_below_the_normal_range():
    """p ≠ 1 (libdevice powf): within 4 ulp of torch's pow, and scores under 2^-126 not flushed to zero."""
    from perta_fast import ops

    s_f = torch.tensor([1e-40, 1e-39, 3e-38, 1e-30, 0.5, 0.0], device="cuda")
    s_r = torch.tensor([1e-40, 4e-40, 1e-38, 1e-31, 0.25, 0.0], device="cuda")
    ops.set_backend("triton")
    try:
        got = ops.ratio(s_f, s_r, 1.0, 0.5, 0.0)
    finally:
        ops.set_backend(None)
    want = ops.ratio_weights(s_f, s_r, 1.0, 0.5, 0.0)
    assert (got[:5] > 0).all() and got[5] == 0
    torch.testing.assert_close(got, want, rtol=4 * 2 * U, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [4096 * 14336, 4096 * 14336 + 5])
def test_accumulate_at_layer_sizes(dtype, n):
    from perta_fast import ops

    acc, g = rand((n,), torch.float32, 8), rand((n,), dtype, 9)
    want = acc.double() + g.double() ** 2
    ops.set_backend("triton")
    try:
        ops.accumulate_(acc, g, square=True)
    finally:
        ops.set_backend(None)
    scale = (want - g.double() ** 2).abs() + g.double() ** 2  # |acc| + g²: near cancellation, ulps of the operands
    assert ((acc.double() - want).abs() <= 2 * 2 * U * scale).all()
