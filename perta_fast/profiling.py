"""Private memory: measuring it (RssAnon and its peak, for tests and benchmarks) and handing freed heap
back to the OS.

safetensors mmaps files, and those pages are page cache, not memory the process owns; RssAnon counts
only private anonymous memory, which is what a memory bound is about.
"""
from __future__ import annotations

import threading
import time


def rss_anon_bytes(field: str = "RssAnon", pid: int | str = "self") -> int:
    """A process's private anonymous memory (or another /proc/PID/status field, e.g. VmRSS)."""
    return _proc_kb(f"/proc/{pid}/status", field)


def host_available_bytes() -> int | None:
    """Memory the host can still give without swapping (MemAvailable), or None where /proc says nothing."""
    try:
        return _proc_kb("/proc/meminfo", "MemAvailable")
    except OSError:
        return None


def _proc_kb(path: str, field: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in {path}")


def run_and_watch(cmd: list[str], interval: float = 0.05, **kwargs) -> dict:
    """Run a command to its end, polling its peak RssAnon and VmRSS (a sample every `interval` s)."""
    import subprocess

    peak = {"RssAnon": 0, "VmRSS": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, **kwargs)
    while proc.poll() is None:
        try:
            for field in peak:
                peak[field] = max(peak[field], rss_anon_bytes(field, proc.pid))
        except (OSError, ValueError):  # the process ended between poll and read
            pass
        time.sleep(interval)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return {"seconds": time.perf_counter() - start, "peak_rss_anon_bytes": peak["RssAnon"],
            "peak_rss_bytes": peak["VmRSS"]}


def release_freed_memory():
    """glibc keeps freed buffers on its heap (after large frees it raises its mmap threshold, and tensors
    below it come from the heap and fragment it), so private memory creeps up with every tensor merged or
    training step taken; hand those pages back. A no-op where there is no glibc."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
TENSORS_ONLY_THRESHOLD = 1 << 17


def map_allocations_above(threshold: int) -> bool:
    """Give every allocation above `threshold` bytes its own mapping, returned to the OS when freed, for
    the rest of the process (glibc's mmap threshold, fixed; the environment variable
    MALLOC_MMAP_THRESHOLD_ does the same from outside). By default glibc raises that threshold after each
    large free, up to 32 MiB, and serves everything below it from its heap, where a freed tensor stays
    resident between live ones: a step then holds more than its live tensors. At 128 KiB private memory
    follows the live tensors closely, which is how the plan is checked, but every allocation then faults
    in fresh pages and CPU steps take longer (benchmarks/plan.py times both), which is why the CLI leaves
    glibc's default alone. False where there is no glibc."""
    libc = _glibc()
    return bool(libc) and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1


def _glibc():
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim, _libc.mallopt  # noqa: B018  (musl and others lack them)
        except (OSError, AttributeError):
            _libc = False
    return _libc


_libc = None


class PeakRssAnon:
    """`with PeakRssAnon() as m: ...` then `m.growth`: the highest RssAnon seen above the starting level,
    polled every `interval` seconds from a thread (a sample, so a very short spike can be missed).
    `m.peak_rss` is the highest resident set (VmRSS): private memory plus file pages such as the
    checkpoint's, which transformers maps rather than copies when it loads weights in their own dtype."""

    def __init__(self, interval: float = 0.0005):
        self.interval, self.start, self.peak, self.peak_rss = interval, 0, 0, 0
        self.start_held = self.peak_held = 0
        self._stop = threading.Event()

    def _sample(self):
        anon = rss_anon_bytes()
        self.peak = max(self.peak, anon)
        self.peak_rss = max(self.peak_rss, rss_anon_bytes("VmRSS"))
        # private memory plus mapped file pages, at the same instant: a page the process copies on write
        # leaves RssFile as it joins RssAnon, so nothing is counted twice
        self.peak_held = max(self.peak_held, anon + rss_anon_bytes("RssFile"))

    def _poll(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = rss_anon_bytes()
        self.peak_rss = rss_anon_bytes("VmRSS")
        self.start_held = self.peak_held = self.start + rss_anon_bytes("RssFile")
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def growth(self) -> int:
        return self.peak - self.start

    @property
    def held_growth(self) -> int:
        """Peak growth of private memory plus mapped file pages (a checkpoint transformers maps instead of
        copying is memory the model computes from all the same)."""
        return self.peak_held - self.start_held


def measure_step(step: str, model_dir: str, out: str, options: dict) -> dict:
    """Run one pipeline step in this process and return its peak memory above the level after imports
    (the runtime), for comparing with `perta-fast plan`: "held_bytes" counts private memory plus mapped
    checkpoint pages. options["mmap_threshold"] (default 128 KiB, None for glibc's default) is set for
    the process first, so by default the figure follows the live tensors rather than freed heap glibc
    keeps. Run it in a fresh process (`python -m perta_fast.profiling STEP MODEL OUT JSON`): an earlier
    step's heap would count."""
    import gc

    import perta_fast as pf
    from .facts import make_facts
    from .models import load_tokenizer

    facts = sum(make_facts(10, 2, 0), [])
    rows = [facts[i % len(facts)] for i in range(options.get("rows", 16))]  # repeated past the 40 facts
    bs, length, dtype = options.get("batch_size", 8), options.get("max_length", 256), options.get("dtype")
    ckpt = options.get("gradient_checkpointing", False)
    # by default the live tensors (the plan's quantity), not what glibc's heap also keeps; None: glibc's own
    mmap_threshold = options.get("mmap_threshold", TENSORS_ONLY_THRESHOLD)
    if mmap_threshold is not None:
        map_allocations_above(mmap_threshold)
    load_tokenizer(model_dir)  # tokenizer code and files are runtime, not the step's
    gc.collect()
    t0 = time.perf_counter()
    with PeakRssAnon(0.002) as m:
        if step == "finetune":
            from .train import FinetuneOptions

            pf.finetune(model_dir, rows, out, FinetuneOptions(epochs=options.get("epochs", 1), batch_size=bs,
                        max_length=length, lora_rank=options.get("lora_rank"), dtype=dtype,
                        gradient_checkpointing=ckpt))
        elif step == "importance":
            pf.importance_file(model_dir, rows, rows, out, options.get("method", "fisher"), bs, length,
                               progress=False, dtype=dtype, gradient_checkpointing=ckpt, adapter=options.get("adapter"))
        elif step == "quick-eval":
            from .eval import answer_probabilities
            from .models import load_model

            model, tok = load_model(model_dir, None, dtype)
            answer_probabilities(model, tok, rows, length)
        elif step == "eval":  # perta-fast eval's scoring and decoding: batch_size questions decoded together
            from .dtypes import autocast_for
            from .models import load_model
            from .scoring import score_questions

            model, tok = load_model(model_dir, None, dtype)
            with autocast_for(model, options.get("bf16_autocast", False)):  # as evaluate_splits scores
                score_questions(model, tok, [(r.question, [r.answer]) for r in rows], length,
                                options.get("max_new_tokens", 200), bs)
        elif step == "calibrate":  # θ_full moved over two λ and one bisection, half the rows for each set
            from .calibration import CalibrateOptions, calibrate

            half = len(rows) // 2
            calibrate(model_dir, options["finetuned"], rows[:half], rows[half:], None, pf.MergeOptions("tv"),
                      CalibrateOptions(lams=(0.5, 1.0), bisect=1, keep_retain=1.0, batch_size=bs, dtype=dtype,
                                       generate=options.get("generate", True)))
        elif step == "merge":
            pf.merge(model_dir, options["finetuned"], out, None, pf.MergeOptions("tv"), progress=False)
        else:
            raise ValueError(f"unknown step {step!r}")
    return {"step": step, "peak_bytes": m.growth, "held_bytes": m.held_growth, "runtime_bytes": m.start,
            "seconds": time.perf_counter() - t0, "mmap_threshold": mmap_threshold}


def measure_step_in_subprocess(step: str, model_dir, out, options: dict) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "perta_fast.profiling", step, str(model_dir), str(out),
                           json.dumps(options)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"measuring {step} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import json
    import sys

    import peft  # noqa: F401  (runtime imports before the baseline is taken)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    print(json.dumps(measure_step(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))))
