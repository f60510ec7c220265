"""Disk full, for real: each writing command with its output on a 96 KiB tmpfs (mounted in a private mount
namespace, so no root is needed where user namespaces are allowed; skipped, saying why, where they are not).
It must fail with one line, exit 1, leave nothing on the full disk, and leave its inputs untouched."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from helpers import tree_digest, write_sets

SMALL = "96k"


def _namespace_refusal() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1) here"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt || "
                            "mount -t tmpfs -o size=4k tmpfs /tmp"], capture_output=True, text=True)
    if probe.returncode:
        return f"cannot mount a tmpfs in a user mount namespace here ({probe.stderr.strip()[:120]})"
    return None


REFUSAL = _namespace_refusal()
pytestmark = pytest.mark.skipif(REFUSAL is not None, reason=str(REFUSAL))


def _run_on_small_disk(disk, argv):
    """Mount a small tmpfs at `disk` in a private namespace, run the command there, then list what is left
    on it (the mount vanishes with the namespace)."""
    listing = disk.parent / f"{disk.name}.left"
    cmd = " ".join(shlex.quote(x) for x in [sys.executable, "-m", "perta_fast"] + argv)
    script = (f"mount -t tmpfs -o size={SMALL} tmpfs {shlex.quote(str(disk))} && "
              f"{{ {cmd}; code=$?; find {shlex.quote(str(disk))} -mindepth 1 > {shlex.quote(str(listing))}; "
              f"exit $code; }}")
    disk.mkdir()
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    return result, listing.read_text().split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dir, facts):
    root = tmp_path_factory.mktemp("full-disk")
    write_sets(root, facts[0][:4], facts[1][:4])
    from perta_fast.cli import main

    assert main(["finetune", "--model", str(tiny_dir), "--data", str(root / "forget.json"), "--out",
                 str(root / "ft"), "--epochs", "1", "--batch-size", "4"]) == 0
    return root


@pytest.mark.parametrize("command", ["finetune", "importance", "merge", "unlearn"])
def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, tiny_dir, inputs, command):
    disk = tmp_path / "disk"
    data = ["--forget", str(inputs / "forget.json"), "--retain", str(inputs / "retain.json")]
    argv = {
        "finetune": ["finetune", "--model", str(tiny_dir), "--data", str(inputs / "forget.json"), "--epochs", "1",
                     "--out", str(disk / "ft")],
        "importance": ["importance", "--model", str(tiny_dir), *data, "--out", str(disk / "imp.safetensors")],
        "merge": ["merge", "--base", str(tiny_dir), "--finetuned", str(inputs / "ft"), "--method", "tv",
                  "--out", str(disk / "merged")],
        "unlearn": ["unlearn", "--model", str(tiny_dir), *data, "--method", "tv", "--epochs", "1", "--no-eval",
                    "--out", str(disk / "u")],
    }[command]
    before = tree_digest(tiny_dir), tree_digest(inputs)
    result, left = _run_on_small_disk(disk, argv + ["--quiet"])
    err = result.stderr.strip()
    assert result.returncode == 1, err
    assert len(err.splitlines()) == 1 and "no space left on the device" in err and str(disk) in err, err
    assert err.startswith("perta-fast: error: ") and err.endswith("no partial output was kept")
    assert left == []  # no temp, no partial output, no empty work folder
    assert (tree_digest(tiny_dir), tree_digest(inputs)) == before
