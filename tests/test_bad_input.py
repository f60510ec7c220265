"""Every bad input: a one-line error naming the file and the problem, exit code 2, nothing written."""
import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import random_tensors, tree_digest, write_checkpoint, write_importance
from perta_fast.cli import main

SHAPES = {"a.weight": (6, 4), "b.weight": (4,)}


def cli_error(capsys, args):
    code = main(args)
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert "Traceback" not in stderr
    err = stderr.strip().splitlines()[-1]  # progress bars may precede it; the error is one line
    assert err.startswith("perta-fast: error:"), stderr
    return err


@pytest.fixture
def pair(tmp_path):
    base = random_tensors(SHAPES, seed=0)
    full = write_checkpoint(tmp_path / "full", base)
    ft = write_checkpoint(tmp_path / "ft", {n: t + 1 for n, t in base.items()})
    imp = write_importance(tmp_path / "imp.safetensors", random_tensors(SHAPES, seed=1).copy(),
                           {n: t.abs() for n, t in random_tensors(SHAPES, seed=2).items()})
    return full, ft, imp


def merge_args(full, ft, out, imp=None, *extra):
    return ["merge", "--base", str(full), "--finetuned", str(ft), "--out", str(out)] + \
        (["--importance", str(imp)] if imp else ["--method", "tv"]) + list(extra)


def assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_checkpoint(tmp_path, capsys, pair):
    full, ft, imp = pair
    err = cli_error(capsys, merge_args(tmp_path / "nope", ft, tmp_path / "out", imp))
    assert "nope" in err and "not found" in err
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_unreadable_checkpoint_without_config(tmp_path, capsys, pair):
    full, ft, imp = pair
    (full / "config.json").unlink()
    err = cli_error(capsys, merge_args(full, ft, tmp_path / "out", imp))
    assert str(full) in err and "config.json" in err


def test_tensor_names_differ(tmp_path, capsys, pair):
    full, ft, imp = pair
    other = write_checkpoint(tmp_path / "other", random_tensors({"a.weight": (6, 4), "c.weight": (4,)}))
    err = cli_error(capsys, merge_args(full, other, tmp_path / "out", imp))
    assert "names differ" in err
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_tensor_shapes_differ(tmp_path, capsys, pair):
    full, ft, imp = pair
    other = write_checkpoint(tmp_path / "other", random_tensors({"a.weight": (6, 5), "b.weight": (4,)}))
    err = cli_error(capsys, merge_args(full, other, tmp_path / "out", imp))
    assert "a.weight" in err and "shape" in err


def test_architectures_differ(tmp_path, capsys, pair):
    full, ft, imp = pair
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    other = write_checkpoint(tmp_path / "other", random_tensors(SHAPES), config=cfg)
    err = cli_error(capsys, merge_args(full, other, tmp_path / "out", imp))
    assert "architecture" in err and "Mistral" in err


def test_truncated_safetensors(tmp_path, capsys, pair):
    full, ft, imp = pair
    f = ft / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    err = cli_error(capsys, merge_args(full, ft, tmp_path / "out", imp))
    assert str(f) in err and "truncated" in err
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_corrupt_safetensors(tmp_path, capsys, pair):
    full, ft, imp = pair
    (ft / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    err = cli_error(capsys, merge_args(full, ft, tmp_path / "out", imp))
    assert "model.safetensors" in err and "corrupt" in err


def test_importance_from_another_model(tmp_path, capsys, pair):
    full, ft, _ = pair
    imp = write_importance(tmp_path / "other.safetensors", {"x.weight": torch.rand(3)}, {"x.weight": torch.rand(3)})
    err = cli_error(capsys, merge_args(full, ft, tmp_path / "out", imp))
    assert "other.safetensors" in err and "another model" in err
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_tv_with_an_importance_file_is_refused(tmp_path, capsys, pair):
    """TV uses no importance: given one, the user meant PerTA (this crashed with a TypeError once)."""
    full, ft, imp = pair
    err = cli_error(capsys, merge_args(full, ft, tmp_path / "out", imp, "--method", "tv"))
    assert "imp.safetensors" in err and "--method perta" in err
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_importance_with_wrong_shape(tmp_path, capsys, pair):
    full, ft, _ = pair
    bad = {"a.weight": torch.rand(4, 6), "b.weight": torch.rand(4)}
    imp = write_importance(tmp_path / "other.safetensors", bad, bad)
    err = cli_error(capsys, merge_args(full, ft, tmp_path / "out", imp))
    assert "a.weight" in err and "shape" in err


def test_nan_in_input_is_an_error(tmp_path, capsys, pair):
    full, ft, imp = pair
    t = random_tensors(SHAPES, seed=5)
    t["b.weight"][1] = float("nan")
    write_checkpoint(ft, t)
    err = cli_error(capsys, merge_args(full, ft, tmp_path / "out", imp))
    assert "b.weight" in err and "NaN" in err and "--nan-to-zero" in err
    assert_nothing_written(tmp_path, tmp_path / "out")
    from perta_fast import PertaError, merge

    with pytest.raises(PertaError) as raised:
        merge(full, ft, tmp_path / "out", imp)
    # while the caller holds the error (and through its traceback the writer), the shard being written
    # is already closed: not left to the garbage collector
    assert raised.value and _open_files_under(tmp_path) == []


def _open_files_under(folder):
    import os

    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            fds.append(target)
    return fds


def test_inf_in_importance_is_an_error_unless_flagged(tmp_path, capsys, pair):
    full, ft, _ = pair
    sf = random_tensors(SHAPES, seed=6)
    sf["a.weight"][0, 0] = float("inf")
    imp = write_importance(tmp_path / "inf.safetensors", sf, sf)
    err = cli_error(capsys, merge_args(full, ft, tmp_path / "out", imp))
    assert "inf.safetensors" in err and "a.weight" in err
    assert main(merge_args(full, ft, tmp_path / "out", imp, "--nan-to-zero")) == 0
    from helpers import load_folder

    assert all(torch.isfinite(t).all() for t in load_folder(tmp_path / "out").values())


def test_output_exists_is_refused_without_overwrite(tmp_path, capsys, pair):
    full, ft, imp = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = cli_error(capsys, merge_args(full, ft, out, imp))
    assert "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(merge_args(full, ft, out, imp, "--overwrite")) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()


def test_output_inside_an_input_is_refused(tmp_path, capsys, pair):
    full, ft, imp = pair
    before = tree_digest(full)
    err = cli_error(capsys, merge_args(full, ft, full, imp, "--overwrite"))
    assert "input" in err
    assert tree_digest(full) == before


def test_pickle_checkpoint_refused_unless_allowed(tmp_path, capsys, pair):
    full, ft, imp = pair
    sd = {n: t + 2 for n, t in random_tensors(SHAPES, seed=0).items()}
    (ft / "model.safetensors").unlink()
    torch.save(sd, ft / "pytorch_model.bin")
    err = cli_error(capsys, merge_args(full, ft, tmp_path / "out", imp))
    assert "pytorch_model.bin" in err and "--allow-pickle" in err
    assert_nothing_written(tmp_path, tmp_path / "out")
    assert main(merge_args(full, ft, tmp_path / "out", imp, "--allow-pickle")) == 0


def test_pickle_checkpoint_names_no_flag_the_command_lacks(tmp_path, capsys, tiny_dir, facts):
    """finetune has no --allow-pickle: the refusal must not tell its user to pass one (it did)."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    shutil.copytree(tiny_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    (tmp_path / "d.json").write_text(json.dumps([r.__dict__ for r in facts[0]]))
    err = cli_error(capsys, ["finetune", "--model", str(folder), "--data", str(tmp_path / "d.json"),
                             "--out", str(tmp_path / "out")])
    assert "pytorch_model.bin" in err and "convert it to safetensors" in err and "only `merge --allow-pickle`" in err
    assert not (tmp_path / "out").exists()


def test_pickle_with_code_is_rejected_even_when_allowed(tmp_path, capsys, pair):
    import pickle

    full, ft, imp = pair
    (ft / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(ft / "pytorch_model.bin", "wb") as f:
        pickle.dump({"a.weight": Evil()}, f)
    err = cli_error(capsys, merge_args(full, ft, tmp_path / "out", imp, "--allow-pickle"))
    assert "pytorch_model.bin" in err and "safely" in err


def test_index_pointing_outside_its_folder(tmp_path, capsys, pair):
    full, ft, imp = pair
    save_file(random_tensors(SHAPES), str(tmp_path / "elsewhere.safetensors"))
    (ft / "model.safetensors").unlink()
    (ft / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "../elsewhere.safetensors", "b.weight": "../elsewhere.safetensors"}}))
    err = cli_error(capsys, merge_args(full, ft, tmp_path / "out", imp))
    assert "outside its folder" in err and "elsewhere" in err


def test_malformed_json_data(tmp_path, capsys):
    bad = tmp_path / "forget.json"
    bad.write_text('[{"question": "q", "answer": "a"},\n {"question": ')
    err = cli_error(capsys, ["importance", "--model", str(tmp_path), "--forget", str(bad), "--retain", str(bad),
                             "--out", str(tmp_path / "imp.safetensors")])
    assert "forget.json" in err and "malformed JSON" in err and "line 2" in err


def test_bad_row_names_file_and_row(tmp_path, capsys):
    bad = tmp_path / "retain.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    err = cli_error(capsys, ["finetune", "--model", str(tmp_path), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert "retain.jsonl" in err and "line 2" in err and "answer" in err


@pytest.mark.parametrize("which", ["forget", "retain"])
def test_empty_set(tmp_path, capsys, tiny_dir, which):
    good, empty = tmp_path / "good.json", tmp_path / "empty.json"
    good.write_text('[{"question": "q", "answer": "a"}]')
    empty.write_text("[]")
    sets = {"forget": good, "retain": good, which: empty}
    out = tmp_path / "imp.safetensors"
    err = cli_error(capsys, ["importance", "--model", str(tiny_dir), "--forget", str(sets["forget"]),
                             "--retain", str(sets["retain"]), "--out", str(out)])
    assert "empty.json" in err and "empty" in err
    assert not out.exists()


@pytest.fixture
def nan_model(tmp_path, tiny_dir):
    import shutil

    from safetensors.torch import load_file

    bad = tmp_path / "nan_model"
    shutil.copytree(tiny_dir, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"))
    data = tmp_path / "d.json"
    data.write_text('[{"question": "Where was Ordon Nyrussa born?", "answer": "In Ortassa."}]')
    return bad, data


def test_nan_checkpoint_in_importance(tmp_path, capsys, nan_model):
    bad, data = nan_model
    out = tmp_path / "imp.safetensors"
    retain = tmp_path / "r.json"
    retain.write_text('[{"question": "What does Ordon Nyrussa do?", "answer": "Ordon Nyrussa is a potter."}]')
    err = cli_error(capsys, ["importance", "--model", str(bad), "--forget", str(data), "--retain", str(retain),
                             "--out", str(out), "--method", "fisher"])
    assert "nan_model" in err and "NaN" in err
    assert not out.exists()


def test_nan_checkpoint_in_finetune(tmp_path, capsys, nan_model):
    bad, data = nan_model
    err = cli_error(capsys, ["finetune", "--model", str(bad), "--data", str(data), "--out", str(tmp_path / "o")])
    assert "nan_model" in err and "NaN" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_before_training(tmp_path, capsys, tiny_dir, monkeypatch):
    """Refused before the model is even loaded (so before any training), in one line and nothing else."""
    from perta_fast import train

    loads, load = [], train.load_model
    monkeypatch.setattr(train, "load_model", lambda *a, **k: loads.append(a) or load(*a, **k))
    data = tmp_path / "d.json"
    data.write_text('[{"question": "q", "answer": "a"}]')
    (tmp_path / "o").mkdir()
    code = main(["finetune", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "o")])
    stderr = capsys.readouterr().err
    assert code == 2 and loads == []
    assert stderr.splitlines() == [f"perta-fast: error: {(tmp_path / 'o').resolve()}: output already exists "
                                   "(pass --overwrite to replace it)"]


@pytest.mark.parametrize("args,says", [
    (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    (["--max-length", "x"], "argument --max-length: expected a positive integer, got 'x'"),
    (["--device", "tpu"], "--device tpu: expected cpu, cuda or cuda:N"),
])
def test_bad_numbers_and_devices_are_one_line_errors(tmp_path, capsys, tiny_dir, facts, args, says):
    (tmp_path / "d.json").write_text(json.dumps([r.__dict__ for r in facts[0]]))
    err = cli_error(capsys, ["finetune", "--model", str(tiny_dir), "--data", str(tmp_path / "d.json"),
                             "--out", str(tmp_path / "out")] + args)
    assert says in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("people,forget", [("2", "2"), ("3", "5")])
def test_demo_that_would_forget_everyone_is_refused_before_any_work(tmp_path, capsys, people, forget):
    err = cli_error(capsys, ["demo", "--out", str(tmp_path / "d"), "--people", people, "--forget-people", forget])
    assert f"--forget-people {forget} with --people {people}" in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("error,says,code", [
    (lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     "out of memory in merge (CUDA out of memory. Tried to allocate 2.00 GiB): the merge holds about one "
     "tensor at a time; --device cpu", 1),
    (lambda: MemoryError(), "out of memory in merge (host)", 1),
    (lambda: OSError(28, "No space left on device", "/data/out/.model.safetensors.tmp"),
     "/data/out/.model.safetensors.tmp: no space left on the device", 1),
])
def test_out_of_memory_and_disk_full_are_one_line_errors(monkeypatch, capsys, pair, tmp_path, error, says, code):
    """Raised from inside a command as torch and the OS raise them; a real bug still shows its traceback."""
    from perta_fast import cli

    def fail(a):
        raise error()
    monkeypatch.setitem(cli.COMMANDS, "merge", fail)
    full, ft, imp = pair
    assert main(merge_args(full, ft, tmp_path / "out", imp)) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"perta-fast: error: {says}")
    assert len(err.splitlines()) == 1 and err.endswith("no partial output was kept")
    monkeypatch.setitem(cli.COMMANDS, "merge", lambda a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(merge_args(full, ft, tmp_path / "out", imp))


def test_out_of_memory_in_unlearn_names_the_step_and_the_plan_to_run(monkeypatch, capsys, tiny_dir, facts, tmp_path):
    """unlearn runs four steps: the line says which one ran out, and the plan command for this model and
    these sizes, with half the batch to try."""
    import torch

    from perta_fast import pipeline

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
    monkeypatch.setattr(pipeline, "build_importance", oom)
    for name, rows in zip(("f.json", "r.json"), facts):
        (tmp_path / name).write_text(json.dumps([r.__dict__ for r in rows[:4]]))
    code = main(["unlearn", "--model", str(tiny_dir), "--forget", str(tmp_path / "f.json"), "--retain",
                 str(tmp_path / "r.json"), "--out", str(tmp_path / "out"), "--epochs", "1", "--batch-size", "6",
                 "--no-eval"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("perta-fast: error: out of memory in unlearn's importance step (CUDA out of memory.")
    assert f"`perta-fast plan --model {tiny_dir} --batch-size 6 --max-length 256` shows each step's peak" in err
    assert "--batch-size 3" in err and "--max-memory" in err
    assert not (tmp_path / "out").exists()



def test_prompt_over_max_length_names_the_file(tmp_path, capsys, tiny_dir, facts):
    (tmp_path / "d.json").write_text(json.dumps([r.__dict__ for r in facts[0][:3]]))
    err = cli_error(capsys, ["finetune", "--model", str(tiny_dir), "--data", str(tmp_path / "d.json"),
                             "--out", str(tmp_path / "ft"), "--max-length", "4"])
    assert f"{tmp_path / 'd.json'}: row 0: the prompt alone is" in err and "over --max-length 4" in err
    assert not (tmp_path / "ft").exists()


def test_answers_cut_at_max_length_are_counted_in_a_warning(tmp_path, capsys, tiny_dir, tiny_tokenizer, facts):
    """Each row's prompt and answer counted by hand: the warning says how many of them lose tokens."""
    from helpers import tokens_by_hand

    rows = facts[0][:4]
    lengths = [tokens_by_hand(tiny_tokenizer, r.question, r.answer) for r in rows]
    limit = max(n_prompt for _, n_prompt in lengths) + 2  # every prompt fits; most answers do not
    cut = sum(len(ids) > limit for ids, _ in lengths)
    assert 0 < cut
    for name, rows_ in (("f.json", rows), ("r.json", facts[1][:4])):
        (tmp_path / name).write_text(json.dumps([r.__dict__ for r in rows_]))
    assert main(["importance", "--model", str(tiny_dir), "--forget", str(tmp_path / "f.json"), "--retain",
                 str(tmp_path / "r.json"), "--out", str(tmp_path / "i.safetensors"), "--max-length",
                 str(limit), "--method", "grad"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "are cut at --max-length" in line]
    assert said[0].startswith(f"perta-fast: {tmp_path / 'f.json'}: {cut} of 4 answers are cut at --max-length "
                              f"{limit} (the longest row is {max(len(ids) for ids, _ in lengths)} tokens)"), said
    assert len(said) == 2  # once per set, however many passes the estimate makes
