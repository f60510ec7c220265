"""What a run tells its user besides its result: log lines (warnings, what a step decided) through the
`perta_fast` logger, and progress bars, drawn only on a terminal and never under --quiet."""
from __future__ import annotations

import logging
import sys

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


def bar(iterable=None, show: bool = True, **kwargs):
    """A tqdm bar shown only when the caller wants progress, --quiet is off and stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None if (show and _bars) else True, file=sys.stderr, **kwargs)


def pyplot():
    """matplotlib.pyplot drawing to files (Agg), or None where matplotlib is not installed: plots are extras."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
