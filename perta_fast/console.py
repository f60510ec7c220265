"""What a run tells its user besides its result: log lines (warnings, what a step decided) through the
`perta_fast` logger, and progress bars, drawn only on a terminal and never under --quiet."""
from __future__ import annotations

import logging
import math
import os
import sys
import time

log = logging.getLogger("perta_fast")
_bars = True  # False under --quiet


class _BarSafeHandler(logging.Handler):
    """Writes a record above any progress bar on screen instead of through it."""

    def emit(self, record):
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


def configure(verbosity: int) -> None:
    """The CLI's setting: -1 (--quiet) warnings and errors only, no bars; 0 also what each step decided;
    1 (-v) also debug detail. Python warnings go through the same logger."""
    global _bars
    _bars = verbosity >= 0
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = _BarSafeHandler()
    handler.setFormatter(logging.Formatter("perta-fast: %(message)s"))
    for old in list(log.handlers):
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers[:] = [handler]
    warnings_log.setLevel(logging.WARNING if verbosity < 1 else logging.DEBUG)
    warnings_log.propagate = False
    if verbosity < 0:  # transformers' own notices too
        logging.getLogger("transformers").setLevel(logging.ERROR)


PROGRESS_SECONDS = 60.0  # between progress lines when stderr is not a terminal (PERTA_FAST_PROGRESS_SECONDS)


class _ProgressLines:
    """tqdm's output as log lines: under nohup, CI or a scheduler a bar redrawn in place is one endless line
    in the log, or nothing until the end. tqdm also refreshes from its monitor thread and on close: a line
    within half an interval of the last is dropped, unless it is the last one (100 %)."""

    def __init__(self, every: float):
        self.every, self.last = every, -math.inf

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        now = time.monotonic()
        if text and (now - self.last >= self.every / 2 or "(100 %)" in text):
            self.last = now
            log.info("%s", text)

    def flush(self) -> None:
        pass


def bar(iterable=None, show: bool = True, **kwargs):
    """A tqdm bar when the caller wants progress and --quiet is off: drawn on a terminal; elsewhere a progress
    line every PROGRESS_SECONDS, the first once a step has run that long (short steps print none)."""
    from tqdm import tqdm

    if not (show and _bars):
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, disable=False, file=sys.stderr, **kwargs)
    every = float(os.environ.get("PERTA_FAST_PROGRESS_SECONDS", PROGRESS_SECONDS))
    return tqdm(iterable, disable=False, file=_ProgressLines(every), delay=every, mininterval=every, maxinterval=every,
                bar_format="{desc}: {n_fmt}/{total_fmt} {unit}s ({percentage:.0f} %), {elapsed} elapsed, "
                           "{remaining} left{postfix}", **kwargs)


def pyplot():
    """matplotlib.pyplot drawing to files (Agg), or None where matplotlib is not installed: plots are extras."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
