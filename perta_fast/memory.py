"""Private memory: measuring it (RssAnon and its peak, for tests and benchmarks) and handing freed heap
back to the OS. A leaf every module may use (perta_fast.profiling measures whole steps on top of it).

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
