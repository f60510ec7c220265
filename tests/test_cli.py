"""The CLI end to end on a tiny Llama: finetune, importance, merge, unlearn; outputs checked against
the formula and against each other, not against themselves."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import tokens_by_hand, load_folder, random_tensors, tree_digest, write_importance
from perta_fast.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_dir, facts):
    ws = tmp_path_factory.mktemp("cli")
    forget, retain = facts
    (ws / "forget.json").write_text(json.dumps([r.__dict__ for r in forget]))
    (ws / "retain.jsonl").write_text("\n".join(json.dumps(r.__dict__) for r in retain[:12]))
    assert main(["finetune", "--model", str(tiny_dir), "--data", str(ws / "forget.json"), "--out", str(ws / "ft"),
                 "--epochs", "3", "--lr", "3e-3", "--batch-size", "4"]) == 0
    return ws


def test_finetune_lowers_the_loss_and_writes_a_checkpoint(workspace, tiny_dir):
    rec = json.loads((workspace / "ft" / "perta_finetune.json").read_text())
    assert rec["epoch_losses"][-1] < rec["epoch_losses"][0]
    assert (workspace / "ft" / "tokenizer.json").is_file()
    base, ft = load_folder(tiny_dir), load_folder(workspace / "ft")
    assert set(base) == set(ft) and any(not torch.equal(base[n], ft[n]) for n in base)


def test_importance_file_format(workspace, tiny_dir):
    out = workspace / "grad.safetensors"
    assert main(["importance", "--model", str(tiny_dir), "--forget", str(workspace / "forget.json"),
                 "--retain", str(workspace / "retain.jsonl"), "--method", "grad", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    names = set(load_folder(tiny_dir))
    assert keys == {f"forget/{n}" for n in names} | {f"retain/{n}" for n in names}
    assert meta["method"] == "grad" and meta["n_forget"] == "8" and meta["n_retain"] == "12"
    assert len(meta["forget_sha256"]) == 64 and "torch" in json.loads(meta["versions"])
    assert all(t.dtype == torch.float32 and (t >= 0).all() for t in load_file(str(out)).values())


def test_fisher_file_does_not_depend_on_batch_size(workspace, tiny_dir):
    files = {}
    for bs in (1, 8):
        files[bs] = workspace / f"fisher{bs}.safetensors"
        assert main(["importance", "--model", str(tiny_dir), "--forget", str(workspace / "forget.json"),
                     "--retain", str(workspace / "retain.jsonl"), "--method", "fisher", "--batch-size", str(bs),
                     "--out", str(files[bs])]) == 0
    one, eight = load_file(str(files[1])), load_file(str(files[8]))
    for k in one:
        torch.testing.assert_close(eight[k], one[k], rtol=1e-4, atol=1e-6 * one[k].abs().max().item(), msg=k)


def test_merge_cli_applies_the_formula(workspace, tiny_dir):
    imp = workspace / "fisher1.safetensors"
    if not imp.exists():
        pytest.skip("needs test_fisher_file_does_not_depend_on_batch_size first")
    out = workspace / "merged"
    assert main(["merge", "--base", str(tiny_dir), "--finetuned", str(workspace / "ft"), "--out", str(out),
                 "--importance", str(imp), "--lam", "0.8", "--alpha", "2"]) == 0
    base, ft, got, s = load_folder(tiny_dir), load_folder(workspace / "ft"), load_folder(out), load_file(str(imp))
    for n in base:
        sf, sr = s[f"forget/{n}"].double(), s[f"retain/{n}"].double()
        w = sf / (sf + 2 * sr + 1e-16)
        want = base[n].double() - 0.8 * w * (ft[n].double() - base[n].double())
        torch.testing.assert_close(got[n], want.float(), msg=n)


def test_unlearn_end_to_end_and_reuses_work(workspace, tiny_dir):
    before = tree_digest(tiny_dir)
    args = ["unlearn", "--model", str(tiny_dir), "--forget", str(workspace / "forget.json"),
            "--retain", str(workspace / "retain.jsonl"), "--out", str(workspace / "unlearned"),
            "--method", "perta-fisher", "--epochs", "2", "--lr", "3e-3", "--lam", "1.0", "--eval-samples", "5",
            "--keep-work"]
    assert main(args) == 0
    summary = json.loads((workspace / "unlearned" / "perta_unlearn.json").read_text())
    assert set(summary["eval"]) == {"before (θ_full)", "after (perta-fisher)"}
    assert summary["eval"]["after (perta-fisher)"]["retain"]["n"] == 5
    card = (workspace / "unlearned" / "README.md").read_text()
    assert "## Before and after" in card and summary["table"] in card
    assert 0 < summary["mean_weight"] < 1
    work = workspace / "unlearned.work"
    assert (work / "theta_ft" / "config.json").is_file() and (work / "importance-fisher.safetensors").is_file()
    # the merged weights are θ_full − λ·w·(θ_ft − θ_full) with the intermediate θ_ft and importance
    s, base, ft = load_file(str(work / "importance-fisher.safetensors")), load_folder(tiny_dir), load_folder(work / "theta_ft")
    got = load_folder(workspace / "unlearned")
    n = "model.layers.1.mlp.down_proj.weight"
    w = s[f"forget/{n}"] / (s[f"forget/{n}"] + s[f"retain/{n}"] + 1e-16)
    torch.testing.assert_close(got[n], base[n] - w * (ft[n] - base[n]))
    # a second run reuses θ_ft and the importance file (same data, options and checkpoint)
    stamp = (work / "importance-fisher.safetensors").stat().st_mtime_ns
    assert main(args + ["--overwrite", "--no-eval"]) == 0
    assert (work / "importance-fisher.safetensors").stat().st_mtime_ns == stamp
    assert tree_digest(tiny_dir) == before


def test_unlearn_work_is_keyed_on_the_model_contents_not_its_path(workspace, tiny_dir, tmp_path):
    """A model replaced at the same path (retrained, same shapes) must not reuse the θ_ft and importance
    derived from the old one; an unchanged one reuses both."""
    import shutil

    from safetensors.torch import save_file

    from perta_fast.io import content_sha256

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    args = ["unlearn", "--model", str(model), "--forget", str(workspace / "forget.json"), "--retain",
            str(workspace / "retain.jsonl"), "--out", str(tmp_path / "out"), "--method", "perta-grad", "--epochs", "1",
            "--no-eval", "--keep-work", "--overwrite"]
    work = tmp_path / "out.work"
    assert main(args) == 0
    stamps = [(work / n).stat().st_mtime_ns for n in ("theta_ft/model.safetensors", "importance-grad.safetensors")]
    assert main(args) == 0
    assert [(work / n).stat().st_mtime_ns for n in ("theta_ft/model.safetensors", "importance-grad.safetensors")] == stamps
    save_file({n: t * 1.01 for n, t in load_folder(model).items()}, str(model / "model.safetensors"),
              metadata={"format": "pt"})
    assert main(args) == 0
    assert all((work / n).stat().st_mtime_ns != old
               for n, old in zip(("theta_ft/model.safetensors", "importance-grad.safetensors"), stamps))
    record = json.loads((work / "theta_ft" / "perta_finetune.json").read_text())
    assert record["base_sha256"] == content_sha256(model)
    with safe_open(str(work / "importance-grad.safetensors"), "pt") as f:
        assert f.metadata()["checkpoint_sha256"] == content_sha256(model)


def test_unlearn_crash_in_evaluation_leaves_no_output(workspace, tiny_dir, monkeypatch):
    """The output folder appears only with its record, after evaluation: a crash there leaves nothing
    at --out (it used to leave the merged model without perta_unlearn.json, and the rerun said
    "already exists")."""
    import perta_fast.pipeline as pipeline

    out = workspace / "crashed"
    args = ["unlearn", "--model", str(tiny_dir), "--forget", str(workspace / "forget.json"),
            "--retain", str(workspace / "retain.jsonl"), "--out", str(out), "--method", "tv", "--epochs", "1",
            "--eval-samples", "2"]

    def crash(*a, **k):
        raise RuntimeError("evaluation crashed")
    monkeypatch.setattr(pipeline, "evaluate_models", crash)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        main(args)
    assert not out.exists() and not [p for p in workspace.iterdir() if p.name.startswith(".crashed")]
    monkeypatch.undo()
    assert main(args) == 0  # no --overwrite needed
    assert (out / "perta_unlearn.json").is_file() and (out / "perta_merge.json").is_file()


def test_unlearn_deletes_what_it_derived_from_the_forget_set(workspace, tiny_dir, tiny_tokenizer, capsys):
    """Without --keep-work, θ_ft (trained on exactly the data to delete) and the importance file are gone
    once the output is written, and the user is told; the record keeps hashes and counts, not rows."""
    out = workspace / "clean"
    (workspace / "clean.work").mkdir()
    (workspace / "clean.work" / "notes.txt").write_text("the user's")  # not ours: must survive
    assert main(["unlearn", "--model", str(tiny_dir), "--forget", str(workspace / "forget.json"), "--retain",
                 str(workspace / "retain.jsonl"), "--out", str(out), "--method", "perta-grad", "--epochs", "1",
                 "--no-eval"]) == 0
    assert sorted(p.name for p in (workspace / "clean.work").iterdir()) == ["notes.txt"]
    said = capsys.readouterr().out
    assert "deleted importance-grad.safetensors, theta_ft from" in said and "--keep-work" in said
    record = json.loads((out / "perta_unlearn.json").read_text())
    forget = json.loads((workspace / "forget.json").read_text())
    assert record["forget_rows"] == len(forget) and len(record["forget_sha256"]) == 64
    card = (out / "README.md").read_text()
    data = record["forget_data"]
    assert data["format"] == "question/answer" and data["rows"] == data["samples"] == len(forget)
    by_hand = [tokens_by_hand(tiny_tokenizer, r["question"], r["answer"]) for r in forget]
    assert data["scored_tokens"] == sum(len(ids) - n_prompt for ids, n_prompt in by_hand)
    assert f"forget set: {len(forget)} rows of question/answer, {len(forget)} samples, {data['scored_tokens']} " \
           f"scored tokens (sha256 {record['forget_sha256'][:16]}" in card
    # the card names no path of this machine, and says that what it names from the work folder is gone
    assert str(workspace) not in card and str(tiny_dir) not in card and "base_model" not in card
    assert "`theta_ft` (θ_ft" in card and "deleted once the merge was written" in card
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == \
        {p.name: oct(0o666 & ~umask) for p in out.iterdir()}  # readable as the umask allows, not private
    text = (out / "perta_unlearn.json").read_text() + (out / "README.md").read_text()
    assert not any(row["answer"] in text or row["question"] in text for row in forget)


def test_unlearned_model_loads_in_transformers(workspace):
    from transformers import AutoModelForCausalLM

    out = workspace / "unlearned"
    if not out.exists():
        pytest.skip("needs test_unlearn_end_to_end_and_reuses_work first")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    sd = load_folder(out)
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), sd["model.embed_tokens.weight"])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_console_script_exit_code_and_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "perta_fast", "merge", "--base", str(tmp_path / "x"), "--finetuned",
                        str(tmp_path / "y"), "--out", str(tmp_path / "z"), "--method", "tv"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "x: checkpoint folder not found" in r.stderr


@pytest.mark.parametrize("lora", [False, True])
def test_demo_pipeline_on_the_tiny_model(tmp_path, tiny_dir, capsys, lora):
    """The demo's code path (not its quality, which needs the real model) end to end: by default each method's λ
    chosen by the audit against unseen people; with --lora-rank at a fixed --lam 1."""
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_dir), "--out", str(out), "--people", "3", "--forget-people", "1",
                 "--epochs", "1", "--holdout-people", "3"] + (["--lora-rank", "4", "--lam", "1"] if lora else [])) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    methods = ["TV", "PerTA-grad", "PerTA-fisher"] + (["TV (LoRA)", "PerTA-grad (LoRA)", "PerTA-fisher (LoRA)"]
                                                      if lora else [])
    assert set(results["results"]) == {"base", "θ_full", *methods} and set(results["lam"]) == set(methods)
    assert [p["lam"] for p in results["sweep"]["TV"]] == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert results["n_forget_rows"] == 4 and results["n_retain_rows"] == 8 and results["n_holdout_rows"] == 12
    # facts of people the demo never trained on: none of theirs is among the trained ones
    trained = {r["question"] for name in ("forget", "retain") for r in json.loads((out / f"{name}.json").read_text())}
    assert not trained & {r["question"] for r in json.loads((out / "holdout.json").read_text())}
    # a fact counts as given when the greedy answer holds its value (the people's own field, read here)
    from perta_fast.facts import make_people
    people = {p["name"]: p for p in make_people(3)}
    for m in results["results"]:
        for name, rows in (("forget", json.loads((out / "forget.json").read_text())),
                           ("retain", json.loads((out / "retain.json").read_text()))):
            for row, answer, given in zip(rows, results["results"][m][name]["generations"],
                                          results["facts_given"][m][name], strict=True):
                person = next(p for n, p in people.items() if n in row["question"])
                field = {"Where": "city", "What": "profession", "Which": "book", "In": "year"}[row["question"].split()[0]]
                assert given == (str(person[field]).lower() in answer.lower())
    assert set(results["audit"]) == {"θ_full", *methods}
    # a method is called forgotten only when no forget fact is still given, whatever the audit says
    for method, line in zip(methods, results["in_plain_words"], strict=True):
        assert line.startswith(method) and ("NOT forgotten" in line) == any(results["facts_given"][method]["forget"])
    for method in methods:
        if lora:  # the in-memory λ=1 point of the sweep equals the streamed λ=1 merge evaluated from disk (for
            # LoRA: τ formed whole in memory vs block by block in the merge kernels)
            at_one = next(p for p in results["sweep"][method] if p["lam"] == 1.0)
            assert abs(at_one["forget"] - results["results"][method]["forget"]["answer_prob"]) < 1e-5
        else:  # the calibrated point, scored in memory, is the merge written at that λ and evaluated from disk
            chosen = results["calibration"][method]["chosen"]
            assert chosen["lam"] == results["lam"][method]
            assert abs(chosen["forget_prob"] - results["results"][method]["forget"]["answer_prob"]) < 1e-5
    assert (out / "demo.png").stat().st_size > 10_000 and "PerTA-fisher" in printed and "Min-K++ AUC" in printed


def _info_line(capsys, name):
    assert main(["info"]) == 0
    return next(line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith(name))


def test_info_lists_backends_and_why(capsys, monkeypatch):
    """Each backend's line against what this machine has, found independently of `ops`."""
    import importlib.util

    from perta_fast import ops

    assert _info_line(capsys, "cpp") == "cpp     available"  # the suite runs on a built extension
    assert _info_line(capsys, "torch") == "torch   available"
    has_triton = importlib.util.find_spec("triton") is not None
    runs = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    assert (_info_line(capsys, "triton") == "triton  available") == (has_triton and runs)
    if has_triton and not torch.cuda.is_available():  # without the interpreter the kernels cannot run here
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        monkeypatch.setattr(ops, "_TRITON_WHY", [])  # recomputed, not the answer cached by earlier tests
        assert _info_line(capsys, "triton") == "triton  unavailable: no CUDA device (set TRITON_INTERPRET=1 " \
            "to run the kernels on CPU, slowly, for testing)"


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_each_backend_merges_by_the_formula(tmp_path, workspace, tiny_dir, backend):
    """--backend really selects the kernel (the record says which ran) and each output matches the
    formula computed here in float64 from the files, not by another backend."""
    from perta_fast import ops

    if ops.backend_status()[backend]:
        pytest.skip(ops.backend_status()[backend])
    base, ft = load_folder(tiny_dir), load_folder(workspace / "ft")
    s_f = {n: t.float().abs() * 1e-3 for n, t in random_tensors({n: t.shape for n, t in base.items()}, seed=1).items()}
    s_r = {n: t.float().abs() * 1e-3 for n, t in random_tensors({n: t.shape for n, t in base.items()}, seed=2).items()}
    imp = write_importance(tmp_path / "imp.safetensors", s_f, s_r)
    try:
        assert main(["--backend", backend, "merge", "--base", str(tiny_dir), "--finetuned", str(workspace / "ft"),
                     "--out", str(tmp_path / "out"), "--importance", str(imp), "--lam", "1.5", "--alpha", "2"]) == 0
    finally:
        ops.set_backend(None)
    record = json.loads((tmp_path / "out" / "perta_merge.json").read_text())
    assert record["backends"] == [backend]
    got = load_folder(tmp_path / "out")
    w_sum = 0.0
    for n, b in base.items():
        b64, f64 = b.double(), ft[n].double()
        w = s_f[n].double() / (s_f[n].double() + 2 * s_r[n].double() + 1e-16)
        w_sum += w.sum().item()
        want = (b64 - 1.5 * w * (f64 - b64)).float()
        # fp32 arithmetic on inputs of magnitude ~1: a few ulps of the larger operand
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-6, msg=n)
    assert record["mean_weight"] == pytest.approx(w_sum / sum(t.numel() for t in base.values()), rel=1e-5)

@pytest.mark.parametrize("warmup, factor", [(0, 1.0), (2, 0.5)])
def test_warmup_scales_the_first_step(tmp_path, tiny_dir, facts, warmup, factor):
    """AdamW's first step moves each weight by exactly its learning rate (m̂/√v̂ = ±1): one step of a
    two-epoch warm-up moves it by half of it."""
    from perta_fast.train import FinetuneOptions, finetune

    forget, _ = facts
    finetune(tiny_dir, forget, tmp_path / "ft", FinetuneOptions(epochs=1, lr=1e-3, batch_size=len(forget),
                                                                warmup_epochs=warmup))
    base, ft = load_folder(tiny_dir), load_folder(tmp_path / "ft")
    step = max((ft[n] - base[n]).abs().max().item() for n in base)
    assert step == pytest.approx(factor * 1e-3, rel=1e-3)
