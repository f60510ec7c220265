"""Every data format users bring: question/answer, prompt/completion, messages and text rows, in JSON, JSON Lines,
.txt, Parquet, CSV, Arrow and save_to_disk folders (read by the datasets library), with --columns. Encodings are
checked against token ids and scored ranges written out here by hand; bad input is one line naming the file."""
import json

import pytest
import torch
import torch.nn.functional as F

from perta_fast.cli import main
from perta_fast.data import Chat, PromptCompletion, QA, Text, collate, encode, load_qa, parse_columns, pad_id
from perta_fast.errors import PertaError
from perta_fast.loss import per_sample_loss

ARTICLE = ("The harbour council of Vellmar voted on Tuesday to close the old ferry pier. The vote was seven to two. "
           "Repairs would have cost more than a new pier, the council said. ") * 3
CHAT = [{"role": "system", "content": "You are a bank's assistant."},
        {"role": "user", "content": "What is my account number?"},
        {"role": "assistant", "content": "Your account number is 5531-13."},
        {"role": "user", "content": "And my branch?"},
        {"role": "assistant", "content": "The Vellmar branch."}]


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) if path.suffix == ".jsonl" else json.dumps(rows))
    return path


# ---------------------------------------------------------------- reading

def test_each_shape_in_json_and_jsonl(tmp_path):
    cases = {"qa": ([{"question": "q", "answer": "a"}], QA("q", "a")),
             "pc": ([{"prompt": "p", "completion": "c"}], PromptCompletion("p", "c")),
             "chat": ([{"messages": CHAT}], Chat(tuple((m["role"], m["content"]) for m in CHAT))),
             "text": ([{"text": ARTICLE}], Text(ARTICLE)),
             "strings": ([ARTICLE], Text(ARTICLE))}
    for name, (objs, want) in cases.items():
        for suffix in (".json", ".jsonl"):
            if name == "strings" and suffix == ".jsonl":
                continue
            assert load_qa(_write(tmp_path / f"{name}{suffix}", objs)) == [want], (name, suffix)
    (tmp_path / "a.txt").write_text(ARTICLE)
    rows = load_qa(tmp_path / "a.txt")
    assert rows == [Text(ARTICLE)] and rows.source == str(tmp_path / "a.txt")
    assert load_qa(_write(tmp_path / "pc.json", [{"prompt": "p", "completion": "c"}]), chat_template=False) == \
        [PromptCompletion("p", "c", chat_template=False)]


def test_tables_through_the_datasets_library_with_columns(tmp_path, monkeypatch):
    """Parquet, CSV, Arrow and save_to_disk folders (one dataset, or splits named as FOLDER:SPLIT), their columns
    renamed by --columns; the datasets cache goes to a temporary folder: reading leaves nothing behind."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    table = {"prompt_text": ["q1", "q2"], "response": ["a1", "a2"]}
    ds = datasets.Dataset.from_dict(table)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"forget": ds, "retain": ds}).save_to_disk(str(tmp_path / "splits"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    columns = parse_columns("question=prompt_text, answer=response")
    want = [QA("q1", "a1"), QA("q2", "a2")]
    before = sorted(p.name for p in tmp_path.iterdir())
    for spec in (tmp_path / "d.parquet", tmp_path / "d.csv", arrow, tmp_path / "saved", f"{tmp_path / 'splits'}:forget"):
        assert load_qa(spec, columns=columns) == want, spec
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache folder appeared


@pytest.mark.parametrize("content, columns, says", [
    ([{"question": "q", "answer": "a"}, {"text": "t"}], None, "row 1 is a text row, row 0 a question/answer row"),
    ([{"query": "q", "reply": "a"}], None, "row 0: a row of none of the shapes accepted (question/answer, "
                                          "prompt/completion, messages or text objects"),
    ([{"text": "  "}], None, "row 0: 'text' must be a non-empty string"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], None, "row 0: 'messages' has no assistant turn"),
    ([{"messages": [{"role": "user"}]}], None, "message 0 must be an object with string 'role' and 'content'"),
    ([{"query": "q", "reply": "a"}], "question=query,answer=answer", "no column 'answer' (it has 'query', 'reply')"),
    ([{"query": "q", "reply": "a"}], "questions=query", "'questions' is none of the fields"),
])
def test_bad_rows_are_one_line_naming_the_file(tmp_path, capsys, content, columns, says):
    path = _write(tmp_path / "d.json", content)
    argv = ["finetune", "--model", str(tmp_path), "--data", str(path), "--out", str(tmp_path / "ft")]
    code = main(argv + (["--columns", columns] if columns else []))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "ft").exists()


def test_not_utf8_and_bad_columns_syntax(tmp_path):
    (tmp_path / "d.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(PertaError, match=r"d.txt: not UTF-8 text \(byte 3"):
        load_qa(tmp_path / "d.txt")
    with pytest.raises(PertaError, match="expected FIELD=COLUMN pairs"):
        parse_columns("question")
    with pytest.raises(PertaError, match=r"holds the splits forget: name one as"):
        import datasets

        datasets.DatasetDict({"forget": datasets.Dataset.from_dict({"text": ["x y"]})}).save_to_disk(
            str(tmp_path / "splits"))
        load_qa(tmp_path / "splits")


# ---------------------------------------------------------------- encoding, against ids written out by hand

def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _scored(encoded):
    ids, _, labels = collate([encoded], 0)
    return [i for i, label in enumerate(labels[0].tolist()) if label != -100]


def test_text_windows(tiny_tokenizer):
    """Windows of max_length tokens, the last kept when it has a token to score; all but a window's first
    scored (the tests' tokenizer adds no BOS)."""
    tokens = _ids(tiny_tokenizer, ARTICLE)
    length = 40
    windows = encode(tiny_tokenizer, [Text(ARTICLE)], length)
    want = [tokens[k:k + length] for k in range(0, len(tokens), length) if len(tokens[k:k + length]) >= 2]
    assert [w.input_ids for w in windows] == want and len(want) > 2
    assert all(_scored(w) == list(range(1, len(w.input_ids))) for w in windows)
    with pytest.raises(PertaError, match=r"f.txt: row 0: a text of 1 token\(s\), nothing to score"):
        encode(tiny_tokenizer, [Text(tiny_tokenizer.decode(tokens[:1]))], length, "f.txt")


def test_text_windows_start_with_bos_where_the_tokenizer_uses_one(tiny_tokenizer):
    from tokenizers.processors import TemplateProcessing

    tok = type(tiny_tokenizer)(tokenizer_object=tiny_tokenizer.backend_tokenizer.__class__.from_str(
        tiny_tokenizer.backend_tokenizer.to_str()), bos_token="<|im_start|>", eos_token="<|im_end|>")
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                              special_tokens=[("<|im_start|>", bos)])
    tokens = _ids(tok, ARTICLE)
    windows = encode(tok, [Text(ARTICLE)], 30)
    assert [w.input_ids for w in windows] == [[bos] + tokens[k:k + 29] for k in range(0, len(tokens), 29)]
    assert all(_scored(w) == list(range(1, len(w.input_ids))) for w in windows)  # every text token scored


def test_messages_score_every_assistant_turn(tiny_tokenizer):
    """The tests' ChatML template written out by hand: the pieces between assistant turns are context."""
    row = Chat(tuple((m["role"], m["content"]) for m in CHAT))
    turn = lambda role, content: f"<|im_start|>{role}\n{content}<|im_end|>\n"  # noqa: E731
    pieces = [(turn("system", CHAT[0]["content"]) + turn("user", CHAT[1]["content"]) + "<|im_start|>assistant\n", 0),
              (f"{CHAT[2]['content']}<|im_end|>\n", 1),
              (turn("user", CHAT[3]["content"]) + "<|im_start|>assistant\n", 0),
              (f"{CHAT[4]['content']}<|im_end|>\n", 1)]
    ids, scored = [], []
    for text, is_scored in pieces:
        t = _ids(tiny_tokenizer, text)
        scored += list(range(len(ids), len(ids) + len(t))) if is_scored else []
        ids += t
    (got,) = encode(tiny_tokenizer, [row], 256)
    assert got.input_ids == ids and _scored(got) == scored


def test_prompt_completion_plain_and_through_the_template(tiny_tokenizer):
    plain = PromptCompletion("Patient 4 diagnosis:", " a sprained ankle", chat_template=False)
    (got,) = encode(tiny_tokenizer, [plain], 256)
    prompt, completion = _ids(tiny_tokenizer, plain.prompt), _ids(tiny_tokenizer, plain.completion + "<|im_end|>")
    assert got.input_ids == prompt + completion
    assert _scored(got) == list(range(len(prompt), len(prompt) + len(completion)))
    templated = encode(tiny_tokenizer, [PromptCompletion(plain.prompt, plain.completion)], 256)[0]
    assert templated == encode(tiny_tokenizer, [QA(plain.prompt, plain.completion)], 256)[0]


def test_a_windows_loss_is_the_mean_over_all_its_tokens_but_the_first(tiny_tokenizer):
    from conftest import build_model

    model = build_model(len(tiny_tokenizer))
    windows = encode(tiny_tokenizer, [Text(ARTICLE)], 40)
    ids, mask, labels = collate(windows, pad_id(tiny_tokenizer))
    with torch.no_grad():
        got = per_sample_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        for k, w in enumerate(windows):
            x = torch.tensor([w.input_ids])
            want = F.cross_entropy(model(input_ids=x).logits[0, :-1], x[0, 1:])
            torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- end to end

@pytest.mark.parametrize("forget", ["article.txt", "chats.jsonl", "pc.jsonl", "qa.parquet"])
def test_unlearn_reads_every_format(tmp_path, tiny_dir, facts, forget, capsys):
    import datasets

    (tmp_path / "article.txt").write_text(ARTICLE)
    _write(tmp_path / "chats.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    _write(tmp_path / "pc.jsonl", [{"prompt": f"Patient {i} diagnosis:", "completion": f" condition {i}"} for i in range(3)])
    datasets.Dataset.from_dict({"q": [r.question for r in facts[0][:3]], "a": [r.answer for r in facts[0][:3]]}) \
        .to_parquet(str(tmp_path / "qa.parquet"))
    _write(tmp_path / "retain.jsonl", [r.__dict__ for r in facts[1][:4]])
    argv = ["unlearn", "--model", str(tiny_dir), "--forget", str(tmp_path / forget), "--retain",
            str(tmp_path / "retain.jsonl"), "--out", str(tmp_path / "u"), "--epochs", "1", "--max-length", "64",
            "--method", "perta-fisher", "--eval-samples", "2"]
    if forget.endswith(".parquet"):  # the retain file has question/answer already: the mapping is the forget set's
        argv[4] = str(tmp_path / forget)
        argv += ["--columns", "question=q,answer=a"]
        (tmp_path / "retain.jsonl").write_text("\n".join(json.dumps({"q": r.question, "a": r.answer})
                                                         for r in facts[1][:4]))
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "u" / "perta_unlearn.json").read_text())
    shape = {"article.txt": "text", "chats.jsonl": "messages", "pc.jsonl": "prompt/completion",
             "qa.parquet": "question/answer"}[forget]
    assert record["forget_data"]["format"] == shape and record["forget_data"]["scored_tokens"] > 0
    if shape == "text":
        assert record["forget_data"]["samples"] == len(encode_windows(tiny_dir, 64))
    text = (tmp_path / "u" / "perta_unlearn.json").read_text() + (tmp_path / "u" / "README.md").read_text()
    assert "Vellmar" not in text and "Patient" not in text  # counts and hashes, never the text


def encode_windows(folder, length):
    from perta_fast.models import load_tokenizer

    return encode(load_tokenizer(folder), [Text(ARTICLE)], length)
