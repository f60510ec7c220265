"""MUSE's metrics (perta_fast.muse) against values computed here by hand on the tiny model: greedy continuations
by a one-token-at-a-time loop without a cache, the few-shot prompt and cut rules written out, Min-K % from each
text's own unpadded forward, the AUC by counting pairs."""
import json
import math

import pytest
import torch
from rouge_score import rouge_scorer

from perta_fast import muse
from perta_fast.cli import main
from perta_fast.errors import PertaError

FACTS = ["The harbour council of Vellmar voted to close the old ferry pier on Tuesday.",
         "Repairs would have cost more than a new pier, the council said in a statement.",
         "The Zeller Institute found three comets with its new telescope last spring.",
         "A bakery in Orlen won the regional bread prize for the fourth year running."]


def _folder(root):
    """A MUSE-shaped folder of invented rows, short enough for the tiny model's context."""
    rows = {"verbmem/forget.json": [{"prompt": f[:30], "gt": f[30:]} for f in FACTS],
            "knowmem/forget_qa.json": [{"question": "Which pier closed?", "answer": "the old ferry pier"},
                                       {"question": "How many comets?", "answer": "three"}],
            "knowmem/forget_qa_icl.json": [{"question": "Who voted?", "answer": "the harbour council"}],
            "knowmem/retain2_qa.json": [{"question": "Which prize?", "answer": "the regional bread prize"}],
            "knowmem/retain2_qa_icl.json": [{"question": "Where is the bakery?", "answer": "Orlen"}],
            "privleak/forget.json": FACTS[:3], "privleak/holdout.json": FACTS[1:] + [FACTS[0][::-1]]}
    for name, content in rows.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    return root


def _model(tok):
    """Room for a prompt and MUSE's 128 new tokens (the suite's tiny model has 128 positions)."""
    from conftest import build_model

    return build_model(len(tok), max_position_embeddings=512).eval()


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("muse") / "model"
    _model(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _greedy(model, ids, n, eos):
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(t)
            if t == eos:
                break
    return out


def _rouge(ref, gen):
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(ref, gen)["rougeL"].fmeasure


def test_knowmem_prompt_and_cut_rules():
    shots = [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
    assert muse.knowmem_prompt(shots, "Q3?") == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q3?\nAnswer: "
    assert muse.knowmem_cut("three comets\n\nQuestion: next") == "three comets"
    assert muse.knowmem_cut("three\nQuestion: x") == "three"
    assert muse.knowmem_cut("three Question: x\n\ny") == "three "
    assert muse.knowmem_cut("no stop here") == "no stop here"


def test_min_k_and_auc_by_hand():
    logprobs = [-0.1, -5.0, -2.0, -0.5, -3.0]  # ⌊0.4 · 5⌋ = 2 lowest: −5 and −3
    assert muse.min_k_score(logprobs) == pytest.approx(4.0)
    assert math.isnan(muse.min_k_score([-1.0, -2.0]))  # ⌊0.8⌋ = 0 tokens: no score, as MUSE's mean of nothing
    forget, holdout = [1.0, 2.0, 3.0], [2.0, 4.0]
    pairs = [(f > h) + 0.5 * (f == h) for f in forget for h in holdout]
    assert muse.auc_forget_above_holdout(forget, holdout) == pytest.approx(sum(pairs) / len(pairs))
    assert muse.privleak(0.25, 0.5) == pytest.approx(-50.0)
    assert muse.privleak(0.25, 0.0) is None  # relative to nothing


def test_every_metric_against_the_loops(tmp_path, tiny_tokenizer):
    tok, model = tiny_tokenizer, _model(tiny_tokenizer)
    data = muse.load_muse(_folder(tmp_path))
    got = muse.evaluate_muse(model, tok, data, auc_retrained=0.5, batch_size=3)
    ids = lambda text: tok(text, add_special_tokens=True)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    verb, es = [], []
    for row in data["verbmem"]:
        out = _greedy(model, ids(row["prompt"]), 128, eos)
        truth = tok.decode(ids(row["gt"])[:128], skip_special_tokens=True)
        verb.append(_rouge(truth, tok.decode(out, skip_special_tokens=True)))
        cont = tok(row["gt"], add_special_tokens=False)["input_ids"][:128]
        with torch.no_grad():
            top = model(input_ids=torch.tensor([ids(row["prompt"]) + cont])).logits[0].argmax(-1).tolist()
        predicted = top[len(ids(row["prompt"])) - 1:len(ids(row["prompt"])) - 1 + len(cont)]
        k = next(k for k in range(len(cont) + 1) if predicted[k:] == cont[k:])  # the shortest prefix
        es.append(1 - k / len(cont))
    assert got["verbmem_f"] == pytest.approx(100 * sum(verb) / len(verb), abs=1e-9)
    assert got["extraction_strength"] == pytest.approx(sum(es) / len(es), abs=1e-9)
    for key, qa, icl in (("knowmem_f", "forget_qa", "forget_qa_icl"), ("knowmem_r", "retain_qa", "retain_qa_icl")):
        scores = []
        for row in data[qa]:
            prompt = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in data[icl]) + \
                f"Question: {row['question']}\nAnswer: "
            text = tok.decode(_greedy(model, ids(prompt), 32, eos), skip_special_tokens=True)
            for stop in ("\n\n", "\nQuestion", "Question:"):
                text = text.split(stop)[0]
            scores.append(_rouge(row["answer"], text))
        assert got[key] == pytest.approx(100 * sum(scores) / len(scores), abs=1e-9), key
    minks = {}
    for key in ("privleak_forget", "privleak_holdout"):
        minks[key] = []
        for text in data[key]:
            x = torch.tensor([ids(text)])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1).gather(1, x[0, 1:, None])[:, 0]
            lowest = sorted(lp.tolist())[:int(0.4 * len(lp))]
            minks[key].append(-sum(lowest) / len(lowest))
        assert got["rows"][key] == pytest.approx(minks[key], rel=1e-5), key
    pairs = [(f > h) + 0.5 * (f == h) for f in minks["privleak_forget"] for h in minks["privleak_holdout"]]
    assert got["privleak_auc"] == pytest.approx(sum(pairs) / len(pairs))
    assert got["privleak"] == pytest.approx((got["privleak_auc"] - 0.5) / 0.5 * 100)


def test_cli_writes_results_and_open_unlearning_logs(tmp_path, long_dir, capsys):
    folder = _folder(tmp_path / "muse")
    (tmp_path / "retrained.json").write_text(json.dumps({"privleak_auc": 0.4}))
    out = tmp_path / "res" / "muse.json"
    out.parent.mkdir()
    assert main(["eval", "--benchmark", "muse", "--model", str(long_dir), "--data", str(folder), "--max-rows", "2",
                 "--retain-model", str(tmp_path / "retrained.json"), "--out", str(out), "--format",
                 "open-unlearning"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["n"]["verbmem"] == res["n"]["privleak_forget"] == 2 and res["n"]["forget_qa_icl"] == 1
    assert res["privleak"] == pytest.approx((res["privleak_auc"] - 0.4) / 0.4 * 100) and "PrivLeak" in printed
    log = json.loads((out.parent / "MUSE_EVAL.json").read_text())
    summary = json.loads((out.parent / "MUSE_SUMMARY.json").read_text())
    assert {"forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "privleak",
            "extraction_strength"} <= set(summary)
    assert summary["forget_verbmem_ROUGE"] == pytest.approx(res["verbmem_f"] / 100)
    assert sorted(log["forget_verbmem_ROUGE"]["value_by_index"]) == ["0", "1"]
    assert summary["privleak"] == pytest.approx(res["privleak"])
    # open-unlearning's mia_min_k AUC is 1 − MUSE's, and its privleak (at d3d7cf9) turns it back: computed its way
    # from our logs, with our summary as the retrained model's log, it gives our PrivLeak
    assert summary["mia_min_k"] == pytest.approx(1 - res["privleak_auc"])
    ref_auc = 1 - 0.4  # the retrained model's, in open-unlearning's convention
    theirs = ((1 - summary["mia_min_k"]) - (1 - ref_auc)) / (1 - ref_auc) * 100
    assert theirs == pytest.approx(res["privleak"])
    # and our logs read back as a retrained model's give MUSE's AUC
    from perta_fast.eval import muse_reference_auc
    from perta_fast.options import EvalOptions

    for name in ("MUSE_EVAL.json", "MUSE_SUMMARY.json"):
        assert muse_reference_auc(out.parent / name, {}, EvalOptions()) == pytest.approx(res["privleak_auc"])


def test_not_a_muse_folder_and_a_short_context(tmp_path, tiny_dir, capsys):
    (tmp_path / "x").mkdir()
    assert main(["eval", "--benchmark", "muse", "--model", str(tiny_dir), "--data", str(tmp_path / "x")]) == 2
    assert "not a MUSE folder: no verbmem/forget.json" in capsys.readouterr().err
    folder = _folder(tmp_path / "muse")
    (folder / "privleak/forget.json").write_text(json.dumps([" ".join(FACTS * 8)]))
    with pytest.raises(PertaError, match=r"privleak excerpts: row 0 needs \d+ tokens, over the model's context of 128"):
        muse.min_k_scores(_model_from(tiny_dir), _tok_from(tiny_dir), json.loads((folder / "privleak/forget.json").read_text()))


def _model_from(folder):
    from perta_fast.models import load_model

    return load_model(folder, "cpu")[0]


def _tok_from(folder):
    from perta_fast.models import load_tokenizer

    return load_tokenizer(folder)


@pytest.mark.parametrize("point,existing", [("publish:2", False), ("publish:3", True)])
def test_killed_muse_eval_leaves_each_output_whole_or_absent(tmp_path, long_dir, point, existing):
    """SIGKILLed (a real subprocess) with one output renamed and the next complete but not, or overwriting old
    logs with the last still to rename: each of the three files is absent, the old one or the new one whole, the
    inputs untouched, and the next run cleans up and succeeds."""
    from helpers import check_killed_outputs

    folder = _folder(tmp_path / "muse")
    out = tmp_path / "res" / "muse.json"
    out.parent.mkdir()
    check_killed_outputs(["eval", "--benchmark", "muse", "--model", str(long_dir), "--data", str(folder), "--max-rows",
                          "2", "--out", str(out), "--format", "open-unlearning"], out.parent, [long_dir, folder], point,
                         existing, {"muse.json", "MUSE_EVAL.json", "MUSE_SUMMARY.json"})
