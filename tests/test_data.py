"""Data loading: JSON/JSONL rows, TOFU splits derived from full.json, encoding and padding."""
import json
import re
from pathlib import Path

import pytest
import torch

from perta_fast.data import QA, batches, encode, load_qa, pad_id
from perta_fast.loss import per_sample_loss
from perta_fast.errors import PertaError
from perta_fast.facts import make_facts

TOFU = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tofu"


def test_json_and_jsonl_give_the_same_rows(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "extra": 1} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    want = [QA(f"q{i}", f"a{i}") for i in range(3)]
    assert load_qa(tmp_path / "d.json") == want == load_qa(str(tmp_path / "d.jsonl"))


def test_json_lines_in_a_json_file_says_so(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2", "answer": "a2"}\n')
    with pytest.raises(PertaError, match=r"rows.json: malformed JSON at line 2 column 1: Extra data \(one JSON object "
                                         r"per line is JSON Lines: name the file rows.jsonl\)"):
        load_qa(path)
    path.write_text('[{"question": "q1", "answer": "a1"}] [1]')  # extra data, but not JSON Lines: no such hint
    with pytest.raises(PertaError, match=r"Extra data$"):
        load_qa(path)


def test_non_string_answer_names_row(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"question": "q", "answer": "a"}, {"question": "q", "answer": 3}]))
    with pytest.raises(PertaError, match=r"d\.json: row 1: 'answer' must be a non-empty string"):
        load_qa(tmp_path / "d.json")


def test_folder_without_split_is_explained(tmp_path):
    with pytest.raises(PertaError, match="FOLDER:SPLIT"):
        load_qa(tmp_path)


def test_facts_are_seeded_and_disjoint():
    f1, r1 = make_facts(10, 2, seed=3)
    f2, r2 = make_facts(10, 2, seed=3)
    assert (f1, r1) == (f2, r2) and len(f1) == 8 and len(r1) == 32
    names = {q.answer.split(" was ")[0] for q in f1 if " was born in " in q.answer}
    assert not any(n in q.question for n in names for q in r1)
    assert make_facts(10, 2, seed=4) != (f1, r1)


def test_padding_never_changes_the_loss(tiny_tokenizer, facts):
    """A sample's loss is the same alone and padded in a batch with longer samples."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_model

    model = build_model(len(tiny_tokenizer)).eval()
    rows = facts[0][:5]
    enc = encode(tiny_tokenizer, rows)
    assert len({len(e.input_ids) for e in enc}) > 1  # the batch really is padded
    with torch.no_grad():
        ids, mask, labels = next(batches(enc, 5, pad_id(tiny_tokenizer)))
        batched = per_sample_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        alone = torch.cat([per_sample_loss(model(input_ids=i, attention_mask=m).logits, lab)
                           for i, m, lab in batches(enc, 1, pad_id(tiny_tokenizer))])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    # labels cover exactly the answer tokens
    assert (labels[0] != -100).sum() == len(enc[0].input_ids) - enc[0].n_prompt



@pytest.mark.parametrize("template", [True, False])
def test_labels_cover_exactly_the_answer_tokens_written_out_by_hand(tiny_tokenizer, facts, template):
    """Where the answer starts, from prompt and answer strings written out in the test (helpers.tokens_by_hand),
    not from perta_fast.data: one token off either way changes what every loss, score and importance sees."""
    from copy import deepcopy

    from perta_fast.data import collate

    from helpers import tokens_by_hand

    tok = tiny_tokenizer if template else deepcopy(tiny_tokenizer)
    if not template:
        tok.chat_template = None
    rows = facts[0][:3] + facts[1][:3]
    enc = encode(tok, rows)
    ids, mask, labels = collate(enc, pad_id(tok))
    for i, r in enumerate(rows):
        want_ids, n_prompt = tokens_by_hand(tok, r.question, r.answer)
        assert enc[i].input_ids == want_ids and enc[i].n_prompt == n_prompt
        n = len(want_ids)
        assert labels[i, :n_prompt].eq(-100).all() and labels[i, n:].eq(-100).all()
        assert labels[i, n_prompt:n].tolist() == want_ids[n_prompt:]
        assert tok.decode(labels[i, n_prompt:n].tolist()) == r.answer + ("<|im_end|>\n" if template else "<|im_end|>")


needs_tofu = pytest.mark.skipif(not (TOFU / "full.json").is_file(), reason=f"TOFU data not found at {TOFU}")


@needs_tofu
@pytest.mark.parametrize("forget,retain,n", [("forget01", "retain99", 40), ("forget05", "retain95", 200),
                                             ("forget10", "retain90", 400)])
def test_tofu_splits_derive_from_full(forget, retain, n):
    full = load_qa(TOFU / "full.json")
    f, r = load_qa(f"{TOFU}:{forget}"), load_qa(f"{TOFU}:{retain}")
    assert len(f) == n and len(r) == len(full) - n and r + f == full  # retain = first rows, forget = last
    assert not set(f) & set(r)


@pytest.mark.parametrize("split", ["forget01", "retain99"])
def test_tofu_split_of_too_few_rows_is_refused(tmp_path, split):
    """forget01 of 50 rows is 0 rows, and rows[-0:] is every row: the whole set must not become the
    forget set (nor the retain set empty)."""
    rows = [{"question": f"q{i}?", "answer": f"a{i}."} for i in range(50)]
    (tmp_path / "full.json").write_text(json.dumps(rows))
    with pytest.raises(PertaError, match=r"full.json: 50 rows are too few for " + split):
        load_qa(f"{tmp_path}:{split}")
    rows += [{"question": f"q{i}?", "answer": f"a{i}."} for i in range(50, 100)]
    (tmp_path / "full.json").write_text(json.dumps(rows))
    assert len(load_qa(f"{tmp_path}:forget01")) == 1 and len(load_qa(f"{tmp_path}:retain99")) == 99


@needs_tofu
def test_tofu_forget01_matches_the_perturbed_file():
    f = load_qa(f"{TOFU}:forget01")
    perturbed = json.loads((TOFU / "forget01_perturbed.json").read_text())
    assert [q.question for q in f] == [row["question"] for row in perturbed]


@needs_tofu
def test_tofu_named_file_split_and_unknown_split():
    assert len(load_qa(f"{TOFU}:world_facts_perturbed")) == 117
    with pytest.raises(PertaError, match="unknown TOFU split 'forget07'"):
        load_qa(f"{TOFU}:forget07")


def test_identical_forget_and_retain_sets_are_refused_and_shared_rows_warned(tiny_dir, facts, caplog):
    from perta_fast.data import check_sets
    from perta_fast.importance import compute_importance

    forget, retain = facts
    with pytest.raises(PertaError, match=r"f.json and r.json hold the same 8 rows"):
        check_sets(forget, list(reversed(forget)), ("f.json", "r.json"))
    assert check_sets(forget, retain) == 0 and check_sets(forget, retain + forget[:3]) == 3
    compute_importance(tiny_dir, forget, retain[:4], method="grad", progress=False)
    assert not caplog.records
    compute_importance(tiny_dir, forget, retain[:4] + forget[:3], method="grad", progress=False)
    assert [r.getMessage() for r in caplog.records] == [
        "3 of the 8 forget rows (the forget set) are in the retain set too: importance counts them on both sides, "
        "so the weights they drive move less"]


def test_unlearn_refuses_identical_sets_before_any_training(tmp_path, tiny_dir, facts):
    import json

    from perta_fast.cli import main

    rows = [r.__dict__ for r in facts[0]]
    for name in ("f.json", "r.json"):
        (tmp_path / name).write_text(json.dumps(rows))
    out = tmp_path / "out"
    code = main(["unlearn", "--model", str(tiny_dir), "--forget", str(tmp_path / "f.json"), "--retain",
                 str(tmp_path / "r.json"), "--out", str(out), "-q"])
    assert code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "r.json"]  # no θ_ft, no work folder


@pytest.mark.parametrize("n", [5, 10, 13, 30])
def test_hold_out_advice_is_a_fraction_that_works(n):
    """The --hold-out the error advises gives calibration its rows and leaves some to score; 0.01 less does not."""
    from perta_fast.data import MIN_VALIDATION_ROWS, hold_out

    rows = list(range(n))
    with pytest.raises(PertaError, match=r"--hold-out ([0-9.]+) holds back enough") as e:
        hold_out(rows, 0.1, "f.json")
    advised = float(re.search(r"--hold-out ([0-9.]+) holds", str(e.value))[1])
    kept, held = hold_out(rows, advised)
    assert len(held) >= MIN_VALIDATION_ROWS and kept
    with pytest.raises(PertaError):
        hold_out(rows, round(advised - 0.01, 2))


@pytest.mark.parametrize("n", [1, 4])
def test_too_few_rows_for_lam_auto_say_give_a_number(n):
    from perta_fast.data import hold_out

    with pytest.raises(PertaError, match=rf"f.json: .*{n} rows are too few for --lam auto.*give --lam a number"):
        hold_out(list(range(n)), 0.5, "f.json")


def test_eval_on_a_folder_that_is_not_tofu_says_so(tmp_path):
    (tmp_path / "notes.json").write_text("[]")
    with pytest.raises(PertaError, match=r"not a TOFU folder \(no full.json, no \*_perturbed.json\): it holds notes"):
        load_qa(f"{tmp_path}:forget01_perturbed", eval_rows=True)
    (tmp_path / "forget05_perturbed.json").write_text("[]")
    with pytest.raises(PertaError, match=r"unknown TOFU split 'forget01_perturbed' .*it has forget05_perturbed\)"):
        load_qa(f"{tmp_path}:forget01_perturbed", eval_rows=True)
