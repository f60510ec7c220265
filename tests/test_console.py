"""What runs say besides their results: -q/-v on every command, progress bars on a terminal only (a real
pseudo-terminal here), decisions and warnings through the `perta_fast` logger."""
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from helpers import random_tensors, write_checkpoint
from perta_fast.cli import COMMANDS, build_parser, main

SHAPES = {"a.weight": (64, 32), "b.weight": (48,)}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_quiet_and_verbose(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    usage = capsys.readouterr().out
    assert "-q, --quiet" in usage and "-v, --verbose" in usage


def _merge_argv(tmp_path):
    base = random_tensors(SHAPES, seed=0)
    full = write_checkpoint(tmp_path / "full", base)
    ft = write_checkpoint(tmp_path / "ft", {n: t + 1 for n, t in base.items()})
    return ["merge", "--base", str(full), "--finetuned", str(ft), "--method", "tv", "--out", str(tmp_path / "out")]


def _stderr(argv, terminal: bool) -> str:
    """The command's stderr, written to a pseudo-terminal or to a pipe."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    if not terminal:
        return subprocess.run([sys.executable, "-m", "perta_fast"] + argv, capture_output=True, text=True,
                              env=env).stderr
    leader, follower = pty.openpty()
    # a real terminal has a size; tqdm draws nothing at 0 columns
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "perta_fast"] + argv, stdout=subprocess.DEVNULL,
                            stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait()
    os.close(leader)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_only_on_a_terminal(tmp_path):
    argv = _merge_argv(tmp_path)
    shown = _stderr(argv + ["--overwrite"], terminal=True)
    assert "merge: 100%" in shown and "tensor" in shown
    assert "merge:" not in _stderr(argv + ["--overwrite"], terminal=False)
    assert "merge:" not in _stderr(argv + ["--overwrite", "-q"], terminal=True)
    assert "merge:" not in _stderr(["-q"] + argv + ["--overwrite"], terminal=True)  # before the command too


def test_progress_lines_at_a_steady_interval_where_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    """Under nohup or CI a long step logs where it stands every PERTA_FAST_PROGRESS_SECONDS (here 0: every
    tensor), one line each; -q keeps them out; a step shorter than the interval (the default 60 s) prints none."""
    argv = _merge_argv(tmp_path) + ["--overwrite", "--max-shard-size", "0.000001"]
    monkeypatch.setenv("PERTA_FAST_PROGRESS_SECONDS", "0")
    lines = [line for line in _stderr(argv, terminal=False).splitlines() if line.startswith("perta-fast: merge:")]
    assert lines and lines[-1].startswith("perta-fast: merge: 2/2 tensors (100 %),"), lines
    assert all("\r" not in line for line in lines)
    assert "merge:" not in _stderr(argv + ["-q"], terminal=False)
    monkeypatch.delenv("PERTA_FAST_PROGRESS_SECONDS")
    assert "merge:" not in _stderr(argv, terminal=False)


def test_decisions_are_logged_and_quiet_keeps_only_warnings(tmp_path, tiny_dir, facts, capsys):
    import json

    forget, retain = facts
    (tmp_path / "f.json").write_text(json.dumps([r.__dict__ for r in forget[:2]]))
    (tmp_path / "r.json").write_text(json.dumps([r.__dict__ for r in retain[:2]]))
    argv = ["importance", "--model", str(tiny_dir), "--forget", str(tmp_path / "f.json"), "--retain",
            str(tmp_path / "r.json"), "--out", str(tmp_path / "imp.safetensors"), "--overwrite"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.startswith("perta-fast: importance: fp32 accumulators on cpu, in 1 parameter group(s)"), err
    (tmp_path / ".imp.safetensors.tmp-dead").write_bytes(b"left by a killed run")  # no live run holds it
    assert main(argv + ["-q"]) == 0
    err = capsys.readouterr().err
    assert err == "perta-fast: imp.safetensors: removed .imp.safetensors.tmp-dead, left by an interrupted run\n" \
        .replace("imp.safetensors:", f"{tmp_path / 'imp.safetensors'}:"), err
    assert not (tmp_path / ".imp.safetensors.tmp-dead").exists()
