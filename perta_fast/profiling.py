"""Measuring helpers for tests and benchmarks: private memory (RssAnon) and its peak.

safetensors mmaps files, and those pages are page cache, not memory the process owns; RssAnon counts
only private anonymous memory, which is what a memory bound is about.
"""
from __future__ import annotations

import threading
import time


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise OSError("RssAnon not in /proc/self/status")


class PeakRssAnon:
    """`with PeakRssAnon() as m: ...` then `m.growth`: the highest RssAnon seen above the starting level,
    polled every `interval` seconds from a thread (a sample, so a very short spike can be missed)."""

    def __init__(self, interval: float = 0.0005):
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = rss_anon_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start
