"""Fine-tuning killed with SIGKILL midway (a real subprocess) and resumed ends with exactly the weights of
an uninterrupted run; a checkpoint from another run is refused."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import load_folder


def run_finetune(tmp_path, tiny_dir, out, extra, env=None):
    cmd = [sys.executable, "-m", "perta_fast", "finetune", "--model", str(tiny_dir), "--data",
           str(tmp_path / "d.json"), "--out", str(tmp_path / out), "--epochs", "2", "--lr", "3e-3",
           "--batch-size", "4"] + extra
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})


@pytest.mark.parametrize("lora,dtype", [(False, "auto"), (True, "auto"), (False, "bf16")])
def test_killed_finetune_resumes_to_the_same_weights(tmp_path, tiny_dir, facts, lora, dtype):
    """bf16: trained through fp32 master weights, which the checkpoint must hold (the bf16 weights are their
    rounding: resumed from those, the run ends elsewhere)."""
    (tmp_path / "d.json").write_text(json.dumps([r.__dict__ for r in (facts[0] + facts[1])[:12]]))  # 3 steps/epoch
    extra = (["--lora-rank", "4"] if lora else []) + ["--dtype", dtype]
    assert run_finetune(tmp_path, tiny_dir, "whole", extra).returncode == 0
    killed = run_finetune(tmp_path, tiny_dir, "ft", extra + ["--checkpoint-every", "1"],
                          {"PERTA_FAST_KILL_AT": "checkpoint:4"})  # in the second epoch
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "ft").exists() and (tmp_path / ".ft.resume" / "checkpoint" / "state.json").is_file()
    resumed = run_finetune(tmp_path, tiny_dir, "ft", extra + ["--checkpoint-every", "1", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    want, got = load_folder(tmp_path / "whole"), load_folder(tmp_path / "ft")
    assert set(got) == set(want) and want
    for n in want:  # same batches in the same order from the same optimizer state: bit-identical on CPU
        assert torch.equal(got[n], want[n]), n
    rec_want = json.loads((tmp_path / "whole" / "perta_finetune.json").read_text())
    rec_got = json.loads((tmp_path / "ft" / "perta_finetune.json").read_text())
    assert rec_got["epoch_losses"] == rec_want["epoch_losses"]
    assert not (tmp_path / ".ft.resume").exists()


def test_finetune_resume_refuses_another_run(tmp_path, tiny_dir, facts):
    (tmp_path / "d.json").write_text(json.dumps([r.__dict__ for r in facts[0]]))
    none = run_finetune(tmp_path, tiny_dir, "ft", ["--resume"])
    assert none.returncode == 2 and "--resume: no checkpoint here" in none.stderr
    killed = run_finetune(tmp_path, tiny_dir, "ft", ["--checkpoint-every", "1"], {"PERTA_FAST_KILL_AT": "checkpoint:1"})
    assert killed.returncode == -9
    other = run_finetune(tmp_path, tiny_dir, "ft", ["--checkpoint-every", "1", "--resume", "--lr", "1e-3"])
    assert other.returncode == 2 and "other options" in other.stderr and len(other.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ft").exists()
    fresh = run_finetune(tmp_path, tiny_dir, "ft", [])  # a plain rerun: the killed run's checkpoint is obsolete
    assert fresh.returncode == 0 and (tmp_path / "ft").is_dir() and not (tmp_path / ".ft.resume").exists()
