"""The streamed importance file: parameter groups, the spill of forget scores, ratio weights written
directly, and the memory budget, each against the in-memory computation."""
import json

import pytest
import torch
from safetensors import safe_open

from helpers import tree_digest
from perta_fast.cli import main
from perta_fast.errors import PertaError
from perta_fast.importance import compute_importance, importance_file, parameter_groups, place_accumulators
from perta_fast.ops import ratio_weights


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_parameter_groups_pack_consecutive_parameters_under_the_budget():
    sizes = {"a": 10, "b": 5, "c": 20, "d": 1}
    assert parameter_groups(sizes, None) == [["a", "b", "c", "d"]]
    assert parameter_groups(sizes, 4 * 15) == [["a", "b"], ["c"], ["d"]]  # c alone exceeds: its own group
    assert parameter_groups(sizes, 4 * 100) == [["a", "b", "c", "d"]]


@pytest.mark.parametrize("method", ["grad", "fisher"])
def test_grouped_spilled_file_equals_in_memory_scores(tmp_path, tiny_dir, facts, method):
    forget, retain = facts[0][:6], facts[1][:7]
    want, _ = compute_importance(tiny_dir, forget, retain, method=method, batch_size=4, progress=False)
    meta = importance_file(tiny_dir, forget, retain, tmp_path / "imp.safetensors", method=method, batch_size=4, progress=False,
                           group_bytes=4 * 3000)  # a few parameters per group: many passes
    got, file_meta = read(tmp_path / "imp.safetensors")
    assert int(meta["groups"]) > 3 and file_meta["groups"] == meta["groups"]
    assert float(file_meta["seconds"]) > 0
    assert set(got) == set(want)
    for k in want:  # the same accumulation per parameter, whatever the grouping: bit-identical on CPU
        assert torch.equal(got[k], want[k]), k
    assert [p.name for p in tmp_path.iterdir()] == ["imp.safetensors"]  # spill files are gone


@pytest.mark.parametrize("dtype,name", [(torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_write_weights_equals_ratio_of_scores(tmp_path, tiny_dir, facts, dtype, name):
    forget, retain = facts[0][:6], facts[1][:6]
    scores, _ = compute_importance(tiny_dir, forget, retain, method="fisher", batch_size=4, progress=False)
    importance_file(tiny_dir, forget, retain, tmp_path / "w.safetensors", method="fisher", batch_size=4, progress=False,
                    write="weights", weight_dtype=name, alpha=0.5, power=2.0)
    got, meta = read(tmp_path / "w.safetensors")
    assert meta["write"] == "weights" and meta["alpha"] == "0.5" and meta["power"] == "2.0"
    assert {k.split("/", 1)[1] for k in got} == {k.split("/", 1)[1] for k in scores}
    for k, w in got.items():
        n = k.split("/", 1)[1]
        want = ratio_weights(scores["forget/" + n], scores["retain/" + n], alpha=0.5, power=2.0).to(dtype)
        assert w.dtype == dtype
        # the same fp32 ratio (p = 2: pow in C++ vs torch, up to a few fp32 ulps apart: 4 allowed),
        # rounded once to the output dtype: within one ulp of that dtype on top
        ulp = {torch.float32: 0, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
        torch.testing.assert_close(w.float(), want.float(), rtol=ulp + 4 * 2 ** -23, atol=1e-30, msg=k)


@pytest.mark.parametrize("method", ["grad", "fisher"])
@pytest.mark.parametrize("tied", [True, False])
def test_host_offloaded_accumulators_equal_the_device_ones(tmp_path, tiny_tokenizer, facts, method, tied):
    """The offloaded path (a zeroed buffer per parameter on the math device, added to a host
    accumulator once filled; the mean gradient moved as it lands) against accumulating in place. Here the
    math device is the CPU too, so only the order of the additions differs: fp32 tolerance of each
    tensor's largest score. Both a tied lm_head (its vocabulary-tiled buffer) and untied embeddings."""
    from conftest import build_model

    folder = tmp_path / "m"
    build_model(len(tiny_tokenizer), tie=tied).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    forget, retain = facts[0][:6], facts[1][:7]
    files = {}
    for offload in (False, True):
        out = tmp_path / f"{offload}.safetensors"
        meta = importance_file(folder, forget, retain, out, method=method, batch_size=4, progress=False, offload=offload)
        assert meta["accumulators"] == ("host" if offload else "device")
        files[offload] = read(out)[0]
    assert set(files[True]) == set(files[False])
    for k, want in files[False].items():
        torch.testing.assert_close(files[True][k], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=k)


def test_accumulators_go_to_the_host_only_on_a_gpu_that_lacks_room():
    gb = 1e9
    assert place_accumulators(10 * gb, None, "cuda", 64 * gb) == "device"  # no budget given
    assert place_accumulators(10 * gb, 12 * gb, "cuda", 64 * gb) == "device"  # fits the GPU
    assert place_accumulators(10 * gb, 6 * gb, "cuda", 64 * gb) == "host"  # one pass instead of two groups
    assert place_accumulators(10 * gb, 6 * gb, "cuda", 12 * gb) == "groups"  # the host lacks the headroom
    assert place_accumulators(10 * gb, 6 * gb, "cuda", None) == "groups"
    assert place_accumulators(10 * gb, 6 * gb, "cpu", 64 * gb) == "groups"  # on the CPU the host is the device


def test_max_memory_too_small_names_the_minimum(tmp_path, tiny_dir, facts, capsys):
    before = tree_digest(tiny_dir)
    (tmp_path / "f.json").write_text(json.dumps([r.__dict__ for r in facts[0]]))
    (tmp_path / "r.json").write_text(json.dumps([r.__dict__ for r in facts[1]]))
    out = tmp_path / "imp.safetensors"
    code = main(["importance", "--model", str(tiny_dir), "--forget", str(tmp_path / "f.json"), "--retain",
                 str(tmp_path / "r.json"), "--out", str(out), "--max-memory", "0.01"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--max-memory 0.01 GB is too small" in err and "at least" in err
    assert len(err.splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "r.json"]
    assert tree_digest(tiny_dir) == before


def test_max_memory_says_what_it_chose(tmp_path, tiny_dir, facts, capsys):
    """A roomy budget keeps one group; one below what the process already holds is refused. (Several
    groups are forced through group_bytes above: RssAnon moves by more than the tiny model's scores.)"""
    from perta_fast.memory import rss_anon_bytes

    forget, retain = facts[0][:4], facts[1][:4]
    roomy = importance_file(tiny_dir, forget, retain, tmp_path / "a.safetensors", method="grad", batch_size=4, progress=False,
                            max_memory=100.0)
    assert roomy["groups"] == "1"
    tight_gb = (rss_anon_bytes() + 64 * 1024**2) / 1e9  # the tiny model's accumulators are ~100 KB
    with pytest.raises(PertaError, match="too small"):
        importance_file(tiny_dir, forget, retain, tmp_path / "b.safetensors", method="grad", batch_size=4, progress=False,
                        max_memory=tight_gb - 0.2)
    assert "parameter group(s)" in capsys.readouterr().err


def _cli_importance(tmp_path, tiny_dir, extra, env=None):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "perta_fast", "importance", "--model", str(tiny_dir), "--forget",
           str(tmp_path / "f.json"), "--retain", str(tmp_path / "r.json"), "--method", "fisher", "--batch-size", "2",
           "--out", str(tmp_path / "imp.safetensors")] + extra
    return subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})


def _grouped_run(tmp_path, tiny_dir, resume, env=None):
    """importance_file in a real subprocess, parameters in many groups, a checkpoint after every batch."""
    import os
    import subprocess
    import sys

    code = ("import json, sys; from perta_fast.data import load_qa; from perta_fast.importance import importance_file; "
            f"importance_file({str(tiny_dir)!r}, load_qa({str(tmp_path / 'f.json')!r}), "
            f"load_qa({str(tmp_path / 'r.json')!r}), {str(tmp_path / 'imp.safetensors')!r}, method='fisher', batch_size=2, "
            f"progress=False, group_bytes=4 * 3000, checkpoint_every=1, resume={resume})")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})


# 3 batches per set: checkpoint 2 falls in group 1's forget pass, 5 in its retain pass, 8 in group 2's
@pytest.mark.parametrize("kill_after", [2, 5, 8])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_dir, facts, kill_after):
    forget, retain = facts[0][:6], facts[1][:6]
    (tmp_path / "f.json").write_text(json.dumps([r.__dict__ for r in forget]))
    (tmp_path / "r.json").write_text(json.dumps([r.__dict__ for r in retain]))
    want, _ = compute_importance(tiny_dir, forget, retain, method="fisher", batch_size=2, progress=False)
    killed = _grouped_run(tmp_path, tiny_dir, False, {"PERTA_FAST_KILL_AT": f"checkpoint:{kill_after}"})
    assert killed.returncode == -9, killed.stderr  # a real SIGKILL, mid-run
    assert not (tmp_path / "imp.safetensors").exists()
    assert (tmp_path / ".imp.safetensors.resume" / "state.json").is_file()
    resumed = _grouped_run(tmp_path, tiny_dir, True)
    assert resumed.returncode == 0, resumed.stderr
    got, meta = read(tmp_path / "imp.safetensors")
    assert int(meta["groups"]) > 2
    assert set(got) == set(want)
    for k in want:  # same batches, same order of accumulation: bit-identical on CPU
        assert torch.equal(got[k], want[k]), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "imp.safetensors", "r.json"]


def test_resume_refuses_other_data_and_a_missing_checkpoint(tmp_path, tiny_dir, facts):
    (tmp_path / "f.json").write_text(json.dumps([r.__dict__ for r in facts[0][:4]]))
    (tmp_path / "r.json").write_text(json.dumps([r.__dict__ for r in facts[1][:4]]))
    none = _cli_importance(tmp_path, tiny_dir, ["--resume"])
    assert none.returncode == 2 and "--resume: no checkpoint here" in none.stderr
    assert len(none.stderr.strip().splitlines()) == 1
    killed = _cli_importance(tmp_path, tiny_dir, ["--checkpoint-every", "1"], {"PERTA_FAST_KILL_AT": "checkpoint:1"})
    assert killed.returncode == -9
    (tmp_path / "r.json").write_text(json.dumps([r.__dict__ for r in facts[1][:5]]))  # other retain data
    other = _cli_importance(tmp_path, tiny_dir, ["--checkpoint-every", "1", "--resume"])
    assert other.returncode == 2 and "other retain_sha256" in other.stderr, other.stderr
    (tmp_path / "r.json").write_text(json.dumps([r.__dict__ for r in facts[1][:4]]))
    (tmp_path / "f.json").write_text(json.dumps([r.__dict__ for r in facts[0][1:5]]))  # other forget data
    other = _cli_importance(tmp_path, tiny_dir, ["--checkpoint-every", "1", "--resume"])
    assert other.returncode == 2 and "other forget_sha256" in other.stderr, other.stderr
    (tmp_path / "f.json").write_text(json.dumps([r.__dict__ for r in facts[0][:4]]))
    other = _cli_importance(tmp_path, tiny_dir, ["--checkpoint-every", "1", "--resume", "--batch-size", "3"])
    assert other.returncode == 2 and "other batch_size" in other.stderr
    assert not (tmp_path / "imp.safetensors").exists()
