"""Each kernel against its torch reference, for every available backend: dtypes, sizes 0/1/7/4097,
odd 2-D shapes, non-contiguous inputs, in place or not, special values."""
import os

import pytest
import torch

from perta_fast import ops
from perta_fast.ops import accumulate_, linear_fisher_, merge_tensor, merge_tensors, ratio, ratio_weights

AVAILABLE = [b for b, why in ops.backend_status().items() if why is None]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(0,), (1,), (7,), (4097,), (33, 17), (5, 0, 3), (3, 129, 2)]


def exact(backend, dtype):
    """Tolerances for results that should equal the reference to the bit. One exception: Triton's CPU
    interpreter casts fp32 → bf16 by truncation, not round-to-nearest-even as GPUs (and torch) do, so
    there bf16 results may differ by one bf16 ulp (relative 2^-8 .. 2^-7): dtype's default tolerance."""
    if backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return {"rtol": 1.6e-2, "atol": 1e-5}
    return {"rtol": 0, "atol": 0}


@pytest.fixture(params=AVAILABLE)
def backend(request):
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(None)


def make(shape, dtype, seed, positive=False, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape if contiguous else (*shape[:-1], shape[-1] * 2) if shape else shape, generator=g)
    if not contiguous:
        t = t[..., ::2]  # a strided view: every other column
    return (t.abs() if positive else t).to(dtype)


def test_cpp_backend_is_built_here():
    """The C++ extension is part of the normal install; CI must exercise it, not silently fall back."""
    assert ops.backend_status()["cpp"] is None, ops.backend_status()["cpp"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("square", [True, False])
def test_accumulate(backend, dtype, shape, square):
    acc = make(shape, torch.float32, 0)
    g = make(shape, dtype, 1, contiguous=len(shape) < 2)
    term = g.double() ** 2 if square else g.double()
    want = acc.double() + term
    scale = acc.double().abs() + term.abs()
    got = accumulate_(acc, g, square)
    assert got is acc
    # fp32 math with one or two roundings (a fused multiply-add or not): within 2 ulp of the operands'
    # magnitude, which near cancellation is far more than 1 ulp of the (small) result
    assert ((acc.double() - want).abs() <= 2 * 2**-23 * scale).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha,power", [(1.0, 1.0), (0.3, 2.0), (4.0, 0.5)])
def test_ratio(backend, dtype, shape, alpha, power):
    s_f, s_r = make(shape, dtype, 2, positive=True), make(shape, dtype, 3, positive=True, contiguous=len(shape) < 2)
    if s_f.numel():
        s_f.view(-1)[0] = 0
        s_r.reshape(-1)[0] = 0  # 0/0 → w = 0
    want = ratio_weights(s_f, s_r, alpha, power, 0.0)
    got = ratio(s_f, s_r, alpha, power, 0.0)
    # the formula in float64, independent of ratio_weights (which the torch backend runs): fp32 inputs
    # rounded from `dtype`, a few fp32 roundings (pow, add, multiply, divide) of a value in [0, 1]
    f64, r64 = s_f.double() ** power, s_r.double() ** power
    w64 = torch.where(f64 == 0, 0.0, f64 / (f64 + alpha * r64))
    assert ((got.double() - w64).abs() <= 8 * 2**-24).all()
    # p = 1: the same fp32 operations in the same order; p ≠ 1: pow may differ by an ulp or two
    torch.testing.assert_close(got, want, rtol=0 if power == 1 else 1e-6, atol=0 if power == 1 else 1e-7)
    if s_f.numel():
        assert got.view(-1)[0] == 0


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_ratio_in_compact_dtype(backend, out_dtype):
    s_f, s_r = make((4097,), torch.float32, 4, positive=True), make((4097,), torch.float32, 5, positive=True)
    got = ratio(s_f, s_r, out_dtype=out_dtype)
    assert got.dtype == out_dtype
    torch.testing.assert_close(got, ratio_weights(s_f, s_r).to(out_dtype), **exact(backend, out_dtype))


def test_ratio_over_s_f_reuses_its_buffer(backend):
    s_f, s_r = make((4097,), torch.float32, 6, positive=True), make((4097,), torch.float32, 7, positive=True)
    want = ratio_weights(s_f, s_r, 2.0)
    ptr = s_f.data_ptr()
    got = ratio(s_f, s_r, 2.0, over_s_f=True)
    assert got.data_ptr() == ptr
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["tv", "w", "scores"])
def test_merge(backend, dtype, shape, kind):
    base, ft = make(shape, dtype, 8), make(shape, dtype, 9, contiguous=len(shape) < 2)
    s_f, s_r = make(shape, torch.float32, 10, positive=True), make(shape, torch.float32, 11, positive=True)
    w = ratio_weights(s_f, s_r, 0.5, 1.0, 1e-16)
    args = {"tv": {}, "w": {"w": w.half()}, "scores": {"s_f": s_f, "s_r": s_r}}[kind]
    want_w = {"tv": None, "w": w.half().float(), "scores": w}[kind]
    got, w_sum, nonfinite = merge_tensors(base, ft, **args, lam=1.7, alpha=0.5)
    assert nonfinite == 0
    want = merge_tensor(base, ft, want_w, 1.7)
    assert got.dtype == dtype and got.shape == base.shape
    # the formula in float64, independent of merge_tensor (which the torch backend runs): fp32 arithmetic,
    # then one rounding to `dtype` (truncation in Triton's interpreter: also within one ulp)
    b64 = base.double()
    want64 = b64 - 1.7 * (1.0 if want_w is None else want_w.double()) * (ft.double() - b64)
    scale = b64.abs() + 1.7 * (b64.abs() + ft.double().abs())
    assert ((got.double() - want64).abs() <= torch.finfo(dtype).eps * want64.abs() + 8 * 2**-24 * scale).all()
    # identical fp32 operation order, then one round-to-nearest-even cast: equal to the bit
    torch.testing.assert_close(got, want, **exact(backend, dtype))
    want_sum = base.numel() if want_w is None else float(want_w.double().sum())
    assert w_sum == pytest.approx(want_sum, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["tv", "scores", "delta"])
def test_merge_matches_the_formula_in_float64(backend, dtype, kind):
    """Every backend, the torch one included (which *is* merge_tensor, the reference the other tests use),
    against θ − λ·w·τ with w = s_f^p / (s_f^p + α·s_r^p + ε) computed here in float64."""
    base, ft = make((4097,), dtype, 30), make((4097,), dtype, 31)
    s_f, s_r = make((4097,), torch.float32, 32, positive=True), make((4097,), torch.float32, 33, positive=True)
    lam, alpha, power, eps = 1.3, 0.7, 2.0, 1e-3
    b64 = base.double()
    tau64 = ft.double() - b64 if kind != "delta" else ft.float().double()
    w64 = 1.0 if kind == "tv" else s_f.double() ** power / (s_f.double() ** power + alpha * s_r.double() ** power + eps)
    want = b64 - lam * w64 * tau64
    args = {} if kind == "tv" else {"s_f": s_f, "s_r": s_r}
    finetuned = ft.float() if kind == "delta" else ft
    got, _, _ = merge_tensors(base, finetuned, **args, lam=lam, alpha=alpha, power=power, eps=eps,
                              delta=kind == "delta")
    # one rounding to `dtype` (≤ 1 ulp of the result, truncation in Triton's interpreter included) plus the
    # fp32 arithmetic: a few fp32 ulps of the operands' magnitude
    scale = b64.abs() + lam * (b64.abs() + ft.double().abs())
    tol = torch.finfo(dtype).eps * want.abs() + 8 * 2**-24 * scale
    assert ((got.double() - want).abs() <= tol).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_rounding_at_the_edges(backend, dtype):
    """Subnormals, overflow to inf, ties: the C++ casts must agree with torch's to the bit."""
    info = torch.finfo(dtype)
    base = torch.tensor([0.0, info.tiny, info.tiny / 8, info.max, -info.max, 1.0, 1e-3, -2.5], dtype=dtype)
    ft = torch.tensor([info.tiny * 3, -info.tiny, 0.0, -info.max, info.max, 1.0 + 3 * info.eps, 2e-3, 7.0], dtype=dtype)
    # ties: with λ = 1, θ − (ft − θ) is 1 + half an ulp (exact in fp32): round-to-nearest-even gives 1; and
    # 1 + 3/2 ulp gives 1 + 2 ulp. A round-half-up cast gives 1 + 1 ulp for both; half-down 1 + 1 ulp for the second
    half = info.eps / 2
    base = torch.cat([base, torch.ones(2, dtype=dtype)])
    ft = torch.cat([ft, torch.tensor([1 - half, 1 - 3 * half], dtype=dtype)])
    assert ft[-2].item() == 1 - half and ft[-1].item() == 1 - 3 * half  # representable below 1
    for lam in (0.5, 1.0, 1.3):
        got, _, _ = merge_tensors(base, ft, lam=lam)
        torch.testing.assert_close(got, merge_tensor(base, ft, None, lam), equal_nan=True, **exact(backend, dtype))
        if lam == 1.0 and exact(backend, dtype)["rtol"] == 0:
            assert got[-2].item() == 1.0 and got[-1].item() == 1 + 2 * info.eps


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="float32"):
        accumulate_(torch.zeros(3, dtype=torch.float16), torch.zeros(3), True)
    with pytest.raises(ValueError, match="shape"):
        merge_tensors(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="not both"):
        merge_tensors(torch.zeros(3), torch.zeros(3), w=torch.zeros(3), s_f=torch.zeros(3), s_r=torch.zeros(3))


def test_forced_unavailable_backend_warns_once_and_falls_back(monkeypatch, caplog):
    """The warning is a log record (how it reaches stderr is console's business, and untouched when this
    test runs alone)."""
    monkeypatch.setattr(ops, "_TRITON_WHY", ["simulated: no GPU here"])
    monkeypatch.setenv("PERTA_FAST_BACKEND", "triton")
    ops._warned.clear()
    base, ft = make((7,), torch.float32, 12), make((7,), torch.float32, 13)
    for _ in range(3):
        got, _, _ = merge_tensors(base, ft, lam=1.0)
    torch.testing.assert_close(got, merge_tensor(base, ft, None, 1.0))
    warned = [r.getMessage() for r in caplog.records if r.name == "perta_fast" and r.levelname == "WARNING"]
    assert len(warned) == 1 and "triton unavailable: simulated: no GPU here" in warned[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_into_a_given_buffer(backend, dtype):
    base, ft = make((33, 17), dtype, 14), make((33, 17), dtype, 15)
    s_f, s_r = make((33, 17), torch.float32, 16, positive=True), make((33, 17), torch.float32, 17, positive=True)
    out = torch.full((33, 17), 7.0, dtype=dtype)
    got, _, _ = merge_tensors(base, ft, s_f=s_f, s_r=s_r, lam=0.9, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, merge_tensor(base, ft, ratio_weights(s_f, s_r), 0.9), **exact(backend, dtype))
    with pytest.raises(ValueError, match="out must be"):
        merge_tensors(base, ft, out=torch.empty(3, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["tv", "w", "scores"])
def test_merge_counts_and_zeroes_nonfinite_inputs(backend, dtype, kind):
    base, ft = make((4097,), dtype, 18), make((4097,), dtype, 19)
    s_f, s_r = make((4097,), torch.float32, 20, positive=True), make((4097,), torch.float32, 21, positive=True)
    base[3], ft[100], ft[101] = float("nan"), float("inf"), -float("inf")
    s_f[7], s_r[4000] = float("nan"), float("inf")
    args = {"tv": {}, "w": {"w": s_f}, "scores": {"s_f": s_f, "s_r": s_r}}[kind]
    _, _, counted = merge_tensors(base, ft, **args)
    assert counted == 3 + {"tv": 0, "w": 1, "scores": 2}[kind]
    got, _, _ = merge_tensors(base, ft, **args, nan_to_zero=True)
    clean = {k: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) for k, v in args.items()}
    b, f = (torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (base, ft))
    w = {"tv": None, "w": clean.get("w"), "scores": ratio_weights(clean.get("s_f", s_f), clean.get("s_r", s_r))}[kind]
    torch.testing.assert_close(got, merge_tensor(b, f, w, 1.0), **exact(backend, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,n_in,n_out", [(1, 1, 1, 1), (3, 7, 33, 17), (4, 21, 70, 130), (2, 0, 5, 3)])
def test_linear_fisher_equals_per_sample_loop(backend, dtype, b, t, n_in, n_out):
    x, g = make((b, t, n_in), dtype, 22), make((b, t, n_out), dtype, 23)
    acc = make((n_out, n_in), torch.float32, 24, positive=True)
    want = acc.double() + sum((g[i].double().T @ x[i].double()) ** 2 for i in range(b))
    got = linear_fisher_(acc, x, g)
    assert got is acc
    # fp32 dot products over t terms, then squared: relative error ~ t·2^-24 doubled; 1e-5 covers t ≤ 21
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_tensors_of_every_kernel_dtype_go_to_cpp(monkeypatch, dtype):
    """By device and dtype, nothing forced: the C++ kernels take fp32, bf16 and fp16 on the CPU (the torch
    path gives the same numbers, so only the choice itself shows a silent fall-back); float64 has no kernel."""
    monkeypatch.delenv("PERTA_FAST_BACKEND", raising=False)
    ops.set_backend(None)
    assert ops.pick_backend(torch.zeros(3, dtype=dtype), torch.zeros(3)) == "cpp"
    assert ops.pick_backend(torch.zeros(3, dtype=torch.float64)) == "torch"


@pytest.mark.skipif("triton" not in AVAILABLE, reason="triton not installed")
def test_fisher_offsets_past_two_to_the_31_do_not_wrap(tmp_path):
    """A sample at element offset 2·(2^31 − 32) of its input: past 2^31, so a 32-bit b·stride wraps to −64 and
    reads the zeros before the tensor instead. The input is a view of a sparse file (8 GB of address space, a few
    pages touched), so no memory is allocated for it."""
    from perta_fast.kernels.fisher import per_sample_sq_

    stride, start, n = 2**31 - 32, 1024, 16
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(2 * (start + 2 * stride + n))
    flat = torch.from_file(str(path), shared=True, size=start + 2 * stride + n, dtype=torch.float16)
    x = flat[start:].as_strided((3, 1, n), (stride, n, 1))
    x.copy_(make((3, 1, n), torch.float16, 40) + 3)  # no zero: a read of the zeros before the view shows
    g = make((3, 1, n), torch.float16, 41)
    want = sum((g[i].double().T @ x[i].double()) ** 2 for i in range(3))
    acc = per_sample_sq_(torch.zeros(n, n), x, g, config=(16, 16, 16, 1, 1, 1))
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-6)
