"""Every Triton kernel compiled for sm_90 (and the Fisher for sm_80) ahead of time, without a GPU (benchmarks/kernel_compile.py --quick: each
kernel and dtype at the launcher's first configuration): it compiles, nothing spills, the Fisher's 16-bit dots run
on tensor cores (wgmma), and the kernels whose numerics are pinned to the torch reference carry no fused
multiply-add and no approximate division in their PTX."""
import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@pytest.fixture(scope="module")
def compiled():
    from helpers import load_benchmark

    bench = load_benchmark("kernel_compile.py", "kernel_compile_bench")
    return [bench.compile_one(v, 90) for v in bench.variants(quick=True)]


def test_every_kernel_compiles_for_sm_90_without_spills(compiled):
    assert {f["kernel"] for f in compiled} == {"fisher", "ratio", "merge", "accumulate"}
    assert {f["dtype"] for f in compiled} == {"fp32", "bf16", "fp16"}
    assert all(f["arch"] == "sm_90a" for f in compiled)
    spilled = [(f["kernel"], f["dtype"], f["config"]) for f in compiled if f["spill_stores"] or f["spill_loads"]]
    assert not spilled


def test_the_fisher_compiles_for_sm_80_without_spills():
    """sm_80's configurations (fp32 has its own there: mma.sync's register accumulators) at their first choice."""
    from helpers import load_benchmark

    bench = load_benchmark("kernel_compile.py", "kernel_compile_bench")
    facts = [bench.compile_one(v, 80) for v in bench.variants(quick=True, major=8) if v["kernel"] == "fisher"]
    assert {f["dtype"] for f in facts} == {"fp32", "bf16", "fp16"}
    assert all(f["mma_sync"] and not (f["spill_stores"] or f["spill_loads"]) for f in facts)


def test_the_fisher_multiplies_on_tensor_cores(compiled):
    fisher = {f["dtype"]: f for f in compiled if f["kernel"] == "fisher"}
    assert fisher["bf16"]["wgmma"] and fisher["fp16"]["wgmma"] and fisher["fp32"]["wgmma"]  # fp32: tf32x3
    # the tiles of the next token steps load while these multiply (cp.async: the software pipeline is there)
    assert all(f["async_copies"] > 0 for f in fisher.values())
    # the elementwise kernels have no dot
    assert not any(f["wgmma"] or f["mma_sync"] for f in compiled if f["kernel"] != "fisher")


def test_pinned_kernels_round_as_the_reference_does(compiled):
    pinned = [f for f in compiled if f["pinned"]]
    assert {f["kernel"] for f in pinned} == {"ratio", "merge"}
    assert all(f["ffma"] == 0 and f["div_approx"] == 0 for f in pinned)
    ratio = [f for f in pinned if f["kernel"] == "ratio"]
    assert all(f["div_rn"] > 0 for f in ratio)
    # p ≠ 1: libdevice's powf, compiled without flush-to-zero (Triton's default would flush subnormal scores)
    powered = [f for f in compiled if f["kernel"] == "ratio" and not f["pinned"]]
    assert powered and all(f["ftz"] == 0 and f["ex2_approx_ftz"] == 0 for f in powered)
