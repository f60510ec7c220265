"""Every Triton kernel compiled for sm_90 (and for sm_80) ahead of time, without a GPU (benchmarks/kernel_compile.py
--quick: each kernel and dtype at the launcher's first configuration): it compiles, nothing spills, the Fisher's
dots run on tensor cores with a software pipeline, and the kernels whose numerics are pinned to the torch reference
carry no fused multiply-add, no approximate division and no flush-to-zero in their PTX. The compiler runs in a
process of its own: Triton's code generator and the interpreter the other kernel tests use share global state."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_compile.py"


def compile_for(arch: str, out: Path) -> list[dict]:
    # without TRITON_INTERPRET: triton.language's own @jit helpers (tl.cdiv) are made interpreted at import otherwise
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(BENCH), "--quick", "--arch", arch, "--out", str(out)], check=True,
                   capture_output=True, text=True, env=env)
    return json.loads((out / "kernels.json").read_text())["kernels"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_for("sm_90", tmp_path_factory.mktemp("sm_90"))


def test_every_kernel_compiles_for_sm_90_without_spills(compiled):
    assert {f["kernel"] for f in compiled} == {"fisher", "ratio", "merge", "accumulate"}
    assert {f["dtype"] for f in compiled} == {"fp32", "bf16", "fp16"}
    assert all(f["arch"] == "sm_90a" for f in compiled)
    spilled = [(f["kernel"], f["dtype"], f["config"]) for f in compiled if f["spill_stores"] or f["spill_loads"]]
    assert not spilled


def test_every_kernel_compiles_for_sm_80_without_spills(tmp_path):
    """sm_80's configurations (fp32's Fisher has its own there: mma.sync's register accumulators)."""
    facts = compile_for("sm_80", tmp_path)
    assert {f["kernel"] for f in facts} == {"fisher", "ratio", "merge", "accumulate"}
    assert all(f["mma_sync"] for f in facts if f["kernel"] == "fisher")
    assert not [f for f in facts if f["spill_stores"] or f["spill_loads"]]


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
