"""The membership audit (perta_fast.audit) against values computed here by hand on the tiny model: each row's
tokens from tests/helpers' own prompt layout and one unpadded float64 forward, the attacks' formulas written out
(open-unlearning's at d3d7cf9), the AUC by counting pairs, TPR at a false-positive rate by trying every
threshold; and the behaviour that matters: a model cannot be told apart from itself, and a model fine-tuned on
the forget rows gives them away."""
import json
import math
import zlib

import pytest
import torch

from helpers import tokens_by_hand
from perta_fast import audit
from perta_fast.cli import main
from perta_fast.data import QA, Text
from perta_fast.errors import PertaError
from perta_fast.options import AuditOptions


def _by_hand(model, tok, ids, n_prompt):
    """(log p of each scored token, its Min-K++ z, the scored tokens) from one unpadded forward in float64."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    lps, zs = [], []
    for t in range(max(n_prompt, 1), len(ids)):
        dist = logp[t - 1]
        mu = float((dist.exp() * dist).sum())
        var = float((dist.exp() * dist * dist).sum()) - mu * mu
        lps.append(float(dist[ids[t]]))
        zs.append((lps[-1] - mu) / math.sqrt(max(var, 1e-6)))
    return lps, zs, ids[max(n_prompt, 1):]


def _scores_by_hand(lps, zs, text, k, ref_lps=None):
    loss = -sum(lps) / len(lps)
    n = max(1, int(len(lps) * k))
    out = {"loss": loss, "zlib": loss / len(zlib.compress(text.encode())), "mink": -sum(sorted(lps)[:n]) / n,
           "minkpp": -sum(sorted(zs)[:n]) / n}
    if ref_lps is not None:
        out["reference"] = loss + sum(ref_lps) / len(ref_lps)
    return out


def test_every_attack_score_against_the_formulas_by_hand(tiny_tokenizer, facts):
    from conftest import build_model

    model, ref = build_model(len(tiny_tokenizer)).eval(), build_model(len(tiny_tokenizer), seed=1).eval()
    tok = tiny_tokenizer
    rows = facts[0][:3]
    text = "the harbour council voted to close the old ferry pier on tuesday"
    k = 0.4
    got = audit.row_tokens(model, tok, rows + [Text(text)], max_length=128, batch_size=2, where="rows")
    got_ref = audit.row_tokens(ref, tok, rows + [Text(text)], max_length=128, batch_size=3, where="rows")
    for i, row in enumerate(rows + [Text(text)]):
        if isinstance(row, QA):
            ids, n_prompt = tokens_by_hand(tok, row.question, row.answer)
        else:  # a text fitting one window, as the tokenizer starts a text (BOS or not): all but the first scored
            ids, n_prompt = tok(text)["input_ids"], 1
            assert len(ids) < 128
        lps, zs, scored = _by_hand(model, tok, ids, n_prompt)
        ref_lps = _by_hand(ref, tok, ids, n_prompt)[0]
        assert got[i].logprobs == pytest.approx(lps, abs=1e-5) and got[i].z == pytest.approx(zs, abs=1e-4)
        expected = _scores_by_hand(lps, zs, tok.decode(scored, skip_special_tokens=True), k, ref_lps)
        for attack, value in expected.items():
            score = audit.attack_scores([got[i]], attack, k, [got_ref[i]])[0]
            assert score == pytest.approx(value, rel=1e-5, abs=1e-6), attack


def test_auc_tpr_and_privleak_by_counting():
    forget, holdout = [0.1, 0.5, 0.2, 0.9], [0.3, 0.5, 0.8, 1.0, 0.05]
    # a forget row "wins" a pair when its score is lower (more member-like); ties count half
    pairs = [1.0 if f < h else 0.5 if f == h else 0.0 for f in forget for h in holdout]
    assert audit.auc(forget, holdout) == pytest.approx(sum(pairs) / len(pairs))
    for fpr in (0.0, 0.2, 0.4, 1.0):  # every threshold t flags the rows scoring ≤ t
        best = max(sum(f <= t for f in forget) / len(forget) for t in [-math.inf] + forget + holdout
                   if sum(h <= t for h in holdout) / len(holdout) <= fpr)
        assert audit.tpr_at(forget, holdout, fpr) == pytest.approx(best), fpr
    low, high = audit.bootstrap_interval(forget, holdout, 500)
    assert low <= audit.auc(forget, holdout) <= high and (low, high) == audit.bootstrap_interval(forget, holdout, 500)
    assert audit.privleak(0.8, 0.5) == pytest.approx(((1 - 0.8) - 0.5) / 0.5 * 100)  # −60: remembered
    assert audit.privleak(0.8, 1.0) is None


def test_verdict_rule():
    assert audit.verdict_of((0.6, 0.9), 0.5) == "remembered"
    assert audit.verdict_of((0.4, 0.6), 0.5) == "indistinguishable"
    assert audit.verdict_of((0.1, 0.3), 0.5) == "over-unlearned"
    assert audit.verdict_of((0.6, 0.9), 0.7) == "indistinguishable"  # the retrained model's level, not 0.5
    assert audit.overall(["indistinguishable", "over-unlearned", "remembered"]) == "remembered"
    assert audit.overall(["indistinguishable", "over-unlearned"]) == "over-unlearned"


def test_a_model_against_itself_is_indistinguishable(tiny_tokenizer, facts):
    from conftest import build_model

    model = build_model(len(tiny_tokenizer)).eval()
    rows = facts[0] + facts[1][:10]
    res = audit.audit(model, tiny_tokenizer, rows, list(rows), AuditOptions(bootstrap=200))
    for name, r in res["attacks"].items():
        assert r["auc"] == 0.5 and r["interval"][0] <= 0.5 <= r["interval"][1], name
    assert res["verdict"] == "indistinguishable"


def test_a_model_trained_on_the_forget_rows_gives_them_away(tmp_path, tiny_dir, facts, capsys):
    forget, holdout = facts[0], facts[1][:20]
    for name, rows in (("forget", forget), ("holdout", holdout)):
        (tmp_path / f"{name}.json").write_text(json.dumps([r.__dict__ for r in rows]))
    assert main(["finetune", "--model", str(tiny_dir), "--data", str(tmp_path / "forget.json"), "--out",
                 str(tmp_path / "ft"), "--epochs", "8", "--lr", "1e-2", "--batch-size", "4", "-q"]) == 0
    out = tmp_path / "audit" / "ft.json"
    assert main(["audit", "--model", str(tmp_path / "ft"), "--forget", str(tmp_path / "forget.json"), "--holdout",
                 str(tmp_path / "holdout.json"), "--reference", str(tiny_dir), "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert set(res["attacks"]) == set(audit.ATTACKS)
    assert res["attacks"]["loss"]["auc"] > 0.9 and res["attacks"]["reference"]["auc"] > 0.9
    assert res["verdict"] == "remembered" and "not forgotten" in printed
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").stat().st_size > 0
    # the fine-tuned model again, with a retrained model's audit (AUCs chosen here) as the level: PrivLeak per
    # attack on 1 − AUC, MUSE's sign (negative: remembered)
    retrained = tmp_path / "retrained.json"
    retrained.write_text(json.dumps({"attacks": {"loss": {"auc": 0.6}, "minkpp": {"auc": 0.45}}}))
    again = tmp_path / "audit" / "again.json"
    assert main(["audit", "--model", str(tmp_path / "ft"), "--forget", str(tmp_path / "forget.json"), "--holdout",
                 str(tmp_path / "holdout.json"), "--retain-model", str(retrained), "--attacks", "loss,minkpp",
                 "--out", str(again), "-q"]) == 0
    got = json.loads(again.read_text())["attacks"]
    for attack, r in (("loss", 0.6), ("minkpp", 0.45)):
        assert got[attack]["retrained_auc"] == r
        assert got[attack]["privleak"] == pytest.approx(((1 - got[attack]["auc"]) - (1 - r)) / (1 - r) * 100)
        assert got[attack]["privleak"] < -50 and got[attack]["verdict"] == "remembered"


@pytest.mark.parametrize("argv,message", [
    (["--attacks", "loss,recall"], "unknown attack recall"),
    (["--attacks", "reference"], "needs a reference model"),
    (["--k", "0"], "--k must be in (0, 1]"),
])
def test_bad_options_one_line_and_nothing_written(tmp_path, tiny_dir, facts, capsys, argv, message):
    (tmp_path / "rows.json").write_text(json.dumps([r.__dict__ for r in facts[0]]))
    out = tmp_path / "a.json"
    assert main(["audit", "--model", str(tiny_dir), "--forget", str(tmp_path / "rows.json"), "--holdout",
                 str(tmp_path / "rows.json"), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]


@pytest.fixture(scope="module")
def knowing(tmp_path_factory, tiny_dir, facts):
    """θ_full that learnt the forget and retain rows, and holdout rows of the same kind it never saw."""
    root = tmp_path_factory.mktemp("knowing")
    forget, retain = facts[0], facts[1][:16]
    holdout = facts[1][16:36]
    for name, rows in (("forget", forget), ("retain", retain), ("holdout", holdout), ("all", forget + retain)):
        (root / f"{name}.json").write_text(json.dumps([r.__dict__ for r in rows]))
    assert main(["finetune", "--model", str(tiny_dir), "--data", str(root / "all.json"), "--out", str(root / "full"),
                 "--epochs", "8", "--lr", "1e-2", "--batch-size", "4", "-q"]) == 0
    return root


def test_unlearn_that_leaves_the_data_known_says_so_and_require_forgotten_fails(knowing, tmp_path, capsys):
    sets = ["--forget", str(knowing / "forget.json"), "--retain", str(knowing / "retain.json")]
    out = tmp_path / "u"
    # λ = 0: θ_u is θ_full, which knows the forget rows: the audit must say so, whatever the tool hoped
    code = main(["unlearn", "--model", str(knowing / "full"), *sets, "--holdout", str(knowing / "holdout.json"),
                 "--out", str(out), "--method", "tv", "--lam", "0", "--epochs", "1", "--batch-size", "4",
                 "--require-forgotten", "-q"])
    printed, err = capsys.readouterr()
    assert code == 3 and "--require-forgotten" in err and "NOT FORGOTTEN" in printed
    record = json.loads((out / "perta_unlearn.json").read_text())
    assert record["forgotten"]["status"] == "remembered" and record["forgotten"]["by"] == "audit"
    before, after = record["audit"].values()
    assert before["verdict"] == after["verdict"] == "remembered"
    assert after["attacks"]["loss"]["auc"] == pytest.approx(before["attacks"]["loss"]["auc"])
    card = (out / "README.md").read_text()
    assert "NOT FORGOTTEN" in card and "| loss |" in card
    # without a holdout set and without the quick evaluation nothing is measured: required, that fails too
    code = main(["unlearn", "--model", str(knowing / "full"), *sets, "--out", str(tmp_path / "v"), "--method", "tv",
                 "--lam", "0", "--epochs", "1", "--batch-size", "4", "--no-eval", "--require-forgotten", "-q"])
    printed, err = capsys.readouterr()
    assert code == 3 and "unknown" in printed
    # with the quick evaluation only: forget probability within 5 % of θ_full's is reported as still known
    assert main(["unlearn", "--model", str(knowing / "full"), *sets, "--out", str(tmp_path / "w"), "--method", "tv",
                 "--lam", "0", "--epochs", "1", "--batch-size", "4", "-q"]) == 0
    said = json.loads((tmp_path / "w" / "perta_unlearn.json").read_text())["forgotten"]
    assert said["status"] == "remembered" and said["by"] == "forget probability"


def test_unlearn_that_forgets_reports_it_from_the_audit(knowing, tmp_path, capsys):
    # a strong TV step wipes what θ_full learnt: the forget rows no longer stand out from the holdout ones
    out = tmp_path / "u"
    assert main(["unlearn", "--model", str(knowing / "full"), "--forget", str(knowing / "forget.json"), "--retain",
                 str(knowing / "retain.json"), "--holdout", str(knowing / "holdout.json"), "--out", str(out),
                 "--method", "tv", "--lam", "3", "--epochs", "8", "--lr", "1e-2", "--batch-size", "4",
                 "--require-forgotten", "-q"]) == 0
    record = json.loads((out / "perta_unlearn.json").read_text())
    before, after = record["audit"].values()
    assert before["verdict"] == "remembered" and after["verdict"] != "remembered"
    assert record["forgotten"]["status"] == after["verdict"]


def test_calibrate_to_the_audit_target(knowing, tmp_path, capsys):
    """--forget-target audit: the smallest λ of the grid (then bisected) whose Min-K++ AUC interval reaches 0.5
    against the holdout rows; the chosen point's interval does, the last point below it does not."""
    sets = ["--forget", str(knowing / "forget.json"), "--retain", str(knowing / "retain.json")]
    assert main(["finetune", "--model", str(knowing / "full"), "--data", str(knowing / "forget.json"), "--out",
                 str(tmp_path / "ft"), "--epochs", "8", "--lr", "1e-2", "--batch-size", "4", "-q"]) == 0
    out = tmp_path / "curve.json"
    argv = ["calibrate", "--base", str(knowing / "full"), "--finetuned", str(tmp_path / "ft"), *sets, "--hold-out",
            "0.5", "--forget-target", "audit", "--lams", "0.5", "1", "2", "4", "--bisect", "2", "--keep-retain", "0.01",
            "--out", str(out), "-q"]
    assert main(argv) == 2 and "needs --holdout" in capsys.readouterr().err and not out.exists()
    assert main(argv + ["--holdout", str(knowing / "holdout.json")]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["forget_target"] == "audit" and res["audit_attack"] == "minkpp" and "minkpp AUC" in printed
    assert res["reference"]["audit_interval"][0] > 0.5  # θ_full: remembered
    chosen = next(p for p in res["points"] if p["lam"] == res["lam"])
    assert res["reached_target"] and chosen["audit_interval"][0] <= 0.5
    assert all(p["audit_interval"][0] > 0.5 for p in res["points"] if p["lam"] < res["lam"])


def test_unlearn_audit_target_without_holdout_refused_before_any_work(knowing, tmp_path, capsys):
    assert main(["unlearn", "--model", str(knowing / "full"), "--forget", str(knowing / "forget.json"), "--retain",
                 str(knowing / "retain.json"), "--out", str(tmp_path / "u"), "--lam", "auto", "--forget-target",
                 "audit"]) == 2
    err = capsys.readouterr().err
    assert "needs --holdout" in err and len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["llama", "llama-untied", "qwen2", "gpt2"])
def test_gradnorm_against_a_backward_per_sample(tiny_tokenizer, facts, kind):
    """open-unlearning's GradNorm (the mean over parameter tensors of each one's gradient L2 norm, the loss the
    mean NLL of the scored tokens) from one batched backward, against a backward per sample written here; tied
    and untied embeddings, biases (Qwen2), Conv1D and a position embedding (GPT-2); a text of two windows is the
    mean of its windows' values."""
    from archs import build_arch
    from conftest import build_model
    from perta_fast.data import encode

    tok = tiny_tokenizer
    model = (build_model(len(tok), tie=kind == "llama") if kind.startswith("llama") else
             build_arch(kind, len(tok))).eval()
    rows = facts[0][:5] + [Text("the harbour council voted to close the old ferry pier on tuesday " * 2)]
    max_length = 48
    got = audit.gradnorm_scores(model, tok, rows, max_length, batch_size=4, where="rows")
    params = list({id(p): p for p in model.parameters()}.values())
    want = [[] for _ in rows]
    for e in encode(tok, rows, max_length):
        ids = torch.tensor([e.input_ids])
        model.zero_grad()
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        scored = [t for a, b in e.scored() for t in range(max(a, 1), b)]
        loss = -torch.stack([logp[t - 1, e.input_ids[t]] for t in scored]).mean()
        loss.backward()
        want[e.row].append(float(torch.stack([p.grad.norm() for p in params if p.grad is not None]).mean()))
    assert len(want[-1]) >= 2  # the text is two windows or more
    assert got == pytest.approx([sum(w) / len(w) for w in want], rel=1e-4)


def test_auto_attacks_leave_gradnorm_out_where_per_sample_gradients_cannot_be_formed(tiny_tokenizer, facts):
    from archs import build_arch

    moe = build_arch("mixtral", len(tiny_tokenizer))
    rows = facts[0][:4]
    res = audit.audit(moe, tiny_tokenizer, rows, facts[1][:4], AuditOptions(bootstrap=50))
    assert "gradnorm" not in res["attacks"] and "minkpp" in res["attacks"]
    with pytest.raises(PertaError, match="leave gradnorm out of --attacks"):
        audit.audit(moe, tiny_tokenizer, rows, facts[1][:4], AuditOptions(attacks="gradnorm", bootstrap=50))


def test_unlearn_judges_the_audit_against_a_retain_model(knowing, tiny_dir, tmp_path, capsys):
    """--retain-model sets each attack's level: θ_full audited against itself as the 'retrained' model is at its
    level by construction, so λ = 0 is no longer 'remembered'."""
    sets = ["--forget", str(knowing / "forget.json"), "--retain", str(knowing / "retain.json")]
    out = tmp_path / "u"
    assert main(["unlearn", "--model", str(knowing / "full"), *sets, "--holdout", str(knowing / "holdout.json"),
                 "--retain-model", str(knowing / "full"), "--out", str(out), "--method", "tv", "--lam", "0",
                 "--epochs", "1", "--batch-size", "4", "--require-forgotten", "-q"]) == 0
    after = list(json.loads((out / "perta_unlearn.json").read_text())["audit"].values())[1]
    for r in after["attacks"].values():
        assert r["retrained_auc"] == pytest.approx(r["auc"]) and r["verdict"] == "indistinguishable"
    assert "against the retrained model's" in capsys.readouterr().out
    assert main(["unlearn", "--model", str(knowing / "full"), *sets, "--retain-model", str(tiny_dir), "--out",
                 str(tmp_path / "v")]) == 2
    assert "give --holdout too" in capsys.readouterr().err and not (tmp_path / "v.work").exists()


@pytest.mark.parametrize("point,existing", [("publish:2", False), ("publish:3", True)])
def test_killed_audit_leaves_each_output_whole_or_absent(tmp_path, tiny_dir, facts, point, existing):
    """`audit` writes three files (JSON, table, ROC plot), each atomically: SIGKILLed between them, each is absent
    or whole, an overwritten one never lost, the inputs untouched, and the next run cleans up."""
    from helpers import check_killed_outputs

    forget, holdout = tmp_path / "forget.json", tmp_path / "holdout.json"
    forget.write_text(json.dumps([r.__dict__ for r in facts[0]]))
    holdout.write_text(json.dumps([r.__dict__ for r in facts[1][:8]]))
    out = tmp_path / "res" / "a.json"
    out.parent.mkdir()
    check_killed_outputs(["audit", "--model", str(tiny_dir), "--forget", str(forget), "--holdout", str(holdout),
                          "--bootstrap", "100", "--out", str(out)], out.parent, [tiny_dir, forget, holdout], point,
                         existing, {"a.json", "a.md", "a.png"})
