"""How outputs are written safely: a temp beside the target, fsynced, renamed into place in one step
(an existing folder swapped out with renameat2), temps locked by their run so that the next run can remove
a killed one's; where a resumable run keeps its state; a safetensors file written that way (save_tensors).

Whatever instant a process dies, an output is the old one or the new one, whole, never a part."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .console import log
from .errors import PertaError
from .faults import kill_point
from .io import SafetensorsWriter, read_json


def resume_dir(out: str | Path) -> Path:
    """Where a checkpointed run writing `out` keeps its state: `.OUT.resume/` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.resume"


def resume_state(folder: Path, state_file: Path, fingerprint: dict) -> dict:
    """The saved state of a checkpointed run in `folder`, refused (naming what differs) unless it was
    made with the same data, options and model, i.e. the same `fingerprint`."""
    if not state_file.is_file():
        raise PertaError(f"{folder}: --resume: no checkpoint here (run with --checkpoint-every N first)")
    state = read_json(state_file)
    saved = state.get("fingerprint", {})
    differs = next((k for k in fingerprint if saved.get(k) != fingerprint[k]), None)
    if differs is not None:
        raise PertaError(f"{folder}: the checkpoint is from a run with other {differs} "
                         f"({saved.get(differs)!r}, now {fingerprint[differs]!r}); refused")
    return state


def check_output_path(out: Path, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse an output that exists (unless overwrite) or that is, holds, or sits inside an input."""
    out = Path(out).resolve()
    for p in inputs:
        p = Path(p).resolve()
        if out == p or p.is_relative_to(out) or out.is_relative_to(p):
            raise PertaError(f"{out}: output would overwrite or sit inside input {p}; choose another --out")
    if out.exists() and not overwrite:
        raise PertaError(f"{out}: output already exists (pass --overwrite to replace it)")


def _umask_mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Make a finished output durable before it is renamed into place: a power cut after the rename must
    not leave a complete-looking folder of empty files."""
    if root.is_dir():
        for folder, _, files in os.walk(root):
            for name in files:
                _fsync_path(Path(folder) / name)
            _fsync_path(Path(folder))
    else:
        _fsync_path(root)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system or file system lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_cwd = -100
    if fn(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _temp_prefixes(out: Path) -> tuple[str, str]:
    return f".{out.name}.tmp-", f".{out.name}.old-"


def _lock(path: Path) -> int | None:
    """An exclusive lock on `path` held through the returned descriptor, or None if another live process
    holds it. The kernel drops a killed process's locks: a temp nobody holds was left by a dead run."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temp outputs beside `out` that interrupted runs left (killed before their rename, or
    after swapping out the output they replaced), saying so; temps of runs still going are locked and kept."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in sorted(out.parent.iterdir()):
        if not p.name.startswith(_temp_prefixes(out)):
            continue
        fd = _lock(p)
        if fd is None:
            continue
        try:
            remove_leftover(out, p)
        finally:
            os.close(fd)
        removed.append(p)
    return removed


def remove_path(path: Path) -> None:
    """A file or a folder, gone (nothing if it is not there)."""
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def remove_leftover(out: Path, path: Path) -> None:
    """Remove what an interrupted run writing `out` left at `path`, and say so."""
    remove_path(path)
    log.warning("%s: removed %s, left by an interrupted run", out, path.name)


def publish(tmp: Path, out: Path) -> None:
    """Make the finished `tmp` durable and rename it over `out` (an existing folder is swapped out in one
    step, then deleted): whatever instant the process dies, `out` is the old output or the new one."""
    _fsync_tree(tmp)
    kill_point("publish")
    if tmp.is_dir() and out.is_dir() and not out.is_symlink():
        if not _exchange(tmp, out):  # two renames: a crash between them leaves no `out`, never half of one
            old = Path(tempfile.mkdtemp(prefix=_temp_prefixes(out)[1], dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            tmp = old
        kill_point("replace")
        shutil.rmtree(tmp, ignore_errors=True)  # the replaced output
    else:
        os.replace(tmp, out)
    _fsync_path(out.parent)


@contextmanager
def _staged(out: Path, overwrite: bool, inputs: tuple, make):
    """The body of atomic_dir/atomic_file: `make(prefix)` creates the temp and locks it for the run."""
    check_output_path(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp, fd = make(_temp_prefixes(out)[0])
    try:
        kill_point("start")
        yield tmp
        publish(tmp, out)
    except BaseException:  # before the rename `tmp` is the unfinished output, after a swap the replaced one
        remove_path(tmp)
        raise
    finally:
        os.close(fd)


def _make_dir(prefix: str, parent: Path):
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes it private; the result should not be
    return tmp, _lock(tmp)


def _make_file(prefix: str, parent: Path):
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
    os.chmod(tmp, _umask_mode(0o666))
    fcntl.flock(fd, fcntl.LOCK_EX)
    return Path(tmp), fd


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, inputs: tuple = ()):
    """Yield a temp folder beside `out`; on success it replaces `out` in one rename, on failure it vanishes;
    killed, it is removed by the next run writing `out`."""
    with _staged(Path(out), overwrite, inputs, lambda prefix: _make_dir(prefix, Path(out).parent)) as tmp:
        yield tmp
        for path in tmp.rglob("*"):  # transformers writes model.safetensors through a private (0600) temp file
            if path.is_file() and not path.is_symlink():
                os.chmod(path, _umask_mode(0o666))


@contextmanager
def atomic_file(out: str | Path, overwrite: bool = False, inputs: tuple = ()):
    """Yield a temp path beside `out`; on success it is renamed to `out` (see atomic_dir)."""
    with _staged(Path(out), overwrite, inputs, lambda prefix: _make_file(prefix, Path(out).parent)) as tmp:
        yield tmp


def save_tensors(tensors: dict, metadata: dict, out: str | Path, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """A safetensors file of `tensors` with string `metadata`, streamed tensor by tensor, atomically."""
    with atomic_file(out, overwrite, inputs) as tmp, \
            SafetensorsWriter(tmp, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], metadata) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
    return Path(out)
