"""Fault injection for the crash tests: named points in every writing step where PERTA_FAST_KILL_AT=POINT:N
SIGKILLs the process the Nth time it reaches POINT (tests/test_crash.py, tests/test_resume.py). A leaf:
the readers and writers (io, outputs, models, train, importance) all mark their points here."""
from __future__ import annotations

import os
import signal

_reached: dict[str, int] = {}


def kill_point(point: str) -> None:
    """Points: start (an output's temp was just made), tensor (a tensor was appended), model (a
    checkpoint's weights were saved, its tokenizer not yet), checkpoint (a resumable checkpoint was saved),
    publish (a complete temp output, before its rename), replace (an overwritten output swapped out, not
    yet deleted)."""
    spec = os.environ.get("PERTA_FAST_KILL_AT")
    if not spec:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if spec == f"{point}:{_reached[point]}":
        os.kill(os.getpid(), signal.SIGKILL)
