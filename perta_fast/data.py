"""Question/answer data: JSON/JSONL files or TOFU splits, chat-template encoding, padded batches.

One loss definition everywhere: a sample's loss is the mean cross-entropy over its answer tokens;
a set's loss is the mean of its samples' losses. Padding never changes either.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import astuple, dataclass
from pathlib import Path

from .console import log
from .errors import PertaError

TOFU_SPLIT = re.compile(r"^(forget|retain)(\d\d)$")
STANDARD_FORGET = {"01", "05", "10"}


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


@dataclass(frozen=True)
class PromptCompletion:
    """TRL's prompt/completion row: the completion scored; the prompt a user turn of the chat template when the
    tokenizer has one and `chat_template` (--no-chat-template: prompt and completion as plain text, joined)."""
    prompt: str
    completion: str
    chat_template: bool = True


@dataclass(frozen=True)
class Chat:
    """A conversation, ((role, content), ...), through the chat template; every assistant turn scored."""
    messages: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Text:
    """Raw text (a document, an article, a chapter): no template, cut into windows of --max-length tokens."""
    text: str


# the shapes a row may take, tried in this order; the CLI's --columns maps other column names onto them
SHAPES = {("messages",): "messages", ("prompt", "completion"): "prompt/completion",
          ("question", "answer"): "question/answer", ("text",): "text"}
FIELDS = {field for shape in SHAPES for field in shape}
SHAPES_SAID = "question/answer, prompt/completion, messages or text objects, or a JSON array of strings"


def _string(obj: dict, key: str, path: Path, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise PertaError(f"{path}: {where}: {key!r} must be a non-empty string")
    return value


def _messages(value, path: Path, where: str) -> tuple:
    if not isinstance(value, list) or not value:
        raise PertaError(f"{path}: {where}: 'messages' must be a non-empty list of {{role, content}} objects")
    turns = []
    for k, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise PertaError(f"{path}: {where}: message {k} must be an object with string 'role' and 'content'")
        turns.append((m["role"], m["content"]))
    if not any(role == "assistant" and content.strip() for role, content in turns):
        raise PertaError(f"{path}: {where}: 'messages' has no assistant turn with content: nothing to learn or score")
    return tuple(turns)


def _row(obj, path: Path, where: str, columns: dict | None, chat_template: bool):
    """One row of any shape (SHAPES), after --columns renamed its columns."""
    if isinstance(obj, str):
        if not obj.strip():
            raise PertaError(f"{path}: {where}: an empty text")
        return Text(obj)
    if not isinstance(obj, dict):
        raise PertaError(f"{path}: {where}: expected {SHAPES_SAID}")
    if columns:
        obj = {**{k: v for k, v in obj.items() if k not in columns.values()},
               **{field: obj[column] for field, column in columns.items()}}
    shape = next((keys for keys in SHAPES if all(k in obj for k in keys)), None)
    if shape is None:
        raise PertaError(f"{path}: {where}: a row of none of the shapes accepted ({SHAPES_SAID}); it has "
                         f"{', '.join(map(repr, sorted(obj))) or 'no fields'} (--columns maps other names)")
    if shape == ("messages",):
        return Chat(_messages(obj["messages"], path, where))
    values = [_string(obj, k, path, where) for k in shape]
    if shape == ("prompt", "completion"):
        return PromptCompletion(*values, chat_template=chat_template)
    return QA(*values) if shape == ("question", "answer") else Text(*values)


def _rows_from_objects(objs, path: Path, line_numbers: list[int] | None = None, columns: dict | None = None,
                       chat_template: bool = True) -> list:
    """Rows of one shape (mixed shapes in a file are refused: a mistake far more often than a wish)."""
    if columns:
        first = next((o for o in objs if isinstance(o, dict)), {})
        for field, column in columns.items():
            if field not in FIELDS:
                raise PertaError(f"--columns {field}={column}: {field!r} is none of the fields "
                                 f"({', '.join(sorted(FIELDS))})")
            if column not in first:
                raise PertaError(f"{path}: --columns {field}={column}: no column {column!r} (it has "
                                 f"{', '.join(map(repr, sorted(first)))})")
    rows = []
    for i, obj in enumerate(objs):
        where = f"line {line_numbers[i]}" if line_numbers else f"row {i}"
        row = _row(obj, path, where, columns, chat_template)
        if rows and type(row) is not type(rows[0]):
            raise PertaError(f"{path}: {where} is a {_shape(row)} row, row 0 a {_shape(rows[0])} row: one shape per "
                             "file")
        rows.append(row)
    return rows


def _shape(row) -> str:
    return {QA: "question/answer", PromptCompletion: "prompt/completion", Chat: "messages", Text: "text"}[type(row)]


def row_format(rows: list) -> str:
    """The shape of a set's rows, as records name it."""
    return _shape(rows[0]) if rows else "none"


@dataclass(frozen=True)
class EvalQA:
    """A TOFU evaluation row: the answer, a paraphrase of it and wrong answers in the same style.
    Splits without a paraphrase (real authors, world facts) use the answer itself, as TOFU does."""
    question: str
    answer: str
    paraphrased_answer: str
    perturbed_answers: tuple[str, ...]


def _eval_rows_from_objects(objs, path: Path) -> list[EvalQA]:
    rows = []
    for i, obj in enumerate(objs):
        if not isinstance(obj, dict):
            raise PertaError(f"{path}: row {i}: evaluation rows are question/answer objects")
        for key in ("question", "answer"):
            if key not in obj:
                raise PertaError(f"{path}: row {i}: missing {key!r} (evaluation rows are question/answer objects)")
        qa = _row(obj, path, f"row {i}", None, True)
        para = obj.get("paraphrased_answer", qa.answer)
        pert = obj.get("perturbed_answer")
        if isinstance(pert, str):
            pert = [pert]
        if not isinstance(para, str) or not para.strip():
            raise PertaError(f"{path}: row {i}: 'paraphrased_answer' must be a non-empty string")
        if not isinstance(pert, list) or not pert or not all(isinstance(p, str) and p.strip() for p in pert):
            raise PertaError(f"{path}: row {i}: 'perturbed_answer' must be a non-empty list of non-empty strings")
        rows.append(EvalQA(qa.question, qa.answer, para, tuple(pert)))
    return rows


TABLES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _read_table(path: Path, split: str | None = None) -> list[dict]:
    """Parquet, CSV, Arrow or a `save_to_disk` folder, read by the datasets library (its cache in a temporary
    folder, removed after: reading data leaves nothing behind)."""
    import tempfile

    try:
        import datasets
    except ImportError:
        raise PertaError(f"{path}: reading {path.suffix or 'a saved dataset'} needs the datasets library "
                         "(pip install datasets)") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    kind = "a saved dataset" if path.is_dir() else TABLES[path.suffix]
    try:
        with tempfile.TemporaryDirectory() as cache:
            if path.is_dir():
                ds = datasets.load_from_disk(str(path), keep_in_memory=True)
                if isinstance(ds, datasets.DatasetDict):
                    if split is None or split not in ds:
                        raise PertaError(f"{path}: holds the splits {', '.join(ds)}: name one as {path}:SPLIT")
                    ds = ds[split]
            elif kind == "arrow":
                ds = datasets.Dataset.from_file(str(path), in_memory=True)
            else:
                reader = datasets.Dataset.from_parquet if kind == "parquet" else datasets.Dataset.from_csv
                ds = reader(str(path), cache_dir=cache, keep_in_memory=True)
            return ds.to_list()
    except PertaError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow, datasets and the file system raise many kinds
        raise PertaError(f"{path}: cannot read as {kind} ({(str(e).splitlines() or [type(e).__name__])[0][:200]})") \
            from None


def _read_file(path: Path, eval_rows: bool = False, columns: dict | None = None, chat_template: bool = True) -> list:
    if path.suffix in TABLES or _is_saved_dataset(path):
        objs = _read_table(path)
        return _eval_rows_from_objects(objs, path) if eval_rows else _rows_from_objects(objs, path, None, columns,
                                                                                        chat_template)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PertaError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except OSError as e:
        raise PertaError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.suffix == ".txt" and not eval_rows:
        return [_row(text, path, "the file", None, chat_template)]  # one document
    if path.suffix == ".jsonl":
        objs, lines = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    objs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise PertaError(f"{path}: malformed JSON on line {n}: {e.msg}") from None
                lines.append(n)
        return _eval_rows_from_objects(objs, path) if eval_rows else \
            _rows_from_objects(objs, path, lines, columns, chat_template)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg == "Extra data" and all(_is_json_object(line) for line in text.splitlines()[:2] if line.strip()):
            hint = f" (one JSON object per line is JSON Lines: name the file {path.with_suffix('.jsonl').name})"
        raise PertaError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}") from None
    if isinstance(data, dict):  # {"data": [...]} is a common wrapper
        data = data.get("data", data.get("rows"))
    if not isinstance(data, list):
        raise PertaError(f"{path}: expected a JSON array of rows ({SHAPES_SAID})")
    return _eval_rows_from_objects(data, path) if eval_rows else _rows_from_objects(data, path, None, columns,
                                                                                    chat_template)


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _tofu_split(folder: Path, split: str, eval_rows: bool = False) -> list:
    if not folder.is_dir():
        raise PertaError(f"{folder}: TOFU folder not found")
    m = TOFU_SPLIT.match(split)
    if m and not eval_rows:
        kind, pct = m.groups()
        forget_pct = pct if kind == "forget" else f"{100 - int(pct):02d}"
        if forget_pct not in STANDARD_FORGET:
            raise PertaError(f"{folder}: unknown TOFU split {split!r} (forget01/05/10, retain99/95/90)")
        rows = _read_file(folder / "full.json")
        n_forget = len(rows) * int(forget_pct) // 100
        if n_forget == 0:  # rows[-0:] would be every row: the whole set as the forget set
            raise PertaError(f"{folder / 'full.json'}: {len(rows)} rows are too few for {split} "
                             f"({forget_pct} % of them is no row)")
        # TOFU's standard splits: forget = the last authors, retain = all the rows before them.
        return rows[-n_forget:] if kind == "forget" else rows[:-n_forget]
    path = folder / f"{split}.json"
    if not path.is_file():
        present = sorted(p.stem for p in folder.glob("*.json"))
        if not (folder / "full.json").is_file() and not any(p.endswith("_perturbed") for p in present):
            raise PertaError(f"{folder}: not a TOFU folder (no full.json, no *_perturbed.json): it holds "
                             f"{', '.join(present[:5]) + (', …' if len(present) > 5 else '') or 'no .json file'}; "
                             "give --tofu the folder of TOFU's files (docs/formats.md)")
        others = [p for p in present if p != split and (p.endswith("_perturbed") or not eval_rows)]
        hint = f"it has {', '.join(others[:6])}" if others else "it has no split of that kind"
        raise PertaError(f"{folder}: unknown TOFU split {split!r} (no {path.name}; {hint})")
    return _read_file(path, eval_rows)


ROW_KINDS = (QA, PromptCompletion, Chat, Text)


class Rows(list):
    """A loaded set: its rows, and where they came from (`source`, the file or FOLDER:SPLIT) for messages."""

    def __init__(self, rows, source: str):
        super().__init__(rows)
        self.source = source


def source_of(rows, default: str) -> str:
    """The file a set was read from, for messages; `default` for rows made in code (or a path not yet read)."""
    if isinstance(rows, (str, Path)):
        return str(rows)
    return getattr(rows, "source", default)


def load_qa(spec: str | Path | list, eval_rows: bool = False, columns: dict | None = None,
            chat_template: bool = True) -> list:
    """Rows from a file (.json/.jsonl of any shape in SHAPES, .txt, Parquet, CSV, Arrow, a `save_to_disk`
    folder, or `FOLDER:SPLIT` of one holding splits), `FOLDER:SPLIT` for TOFU, or a list of dicts/rows (library
    use). `columns` {field: column} reads other column names as the fields; `chat_template` False feeds
    prompt/completion rows as plain text. With `eval_rows`, EvalQA rows that also carry paraphrased and
    perturbed answers."""
    if isinstance(spec, list):
        kinds = (EvalQA,) if eval_rows else ROW_KINDS
        rows = spec if all(isinstance(r, kinds) for r in spec) else None
        if rows is None:
            rows = _eval_rows_from_objects(spec, Path("<list>")) if eval_rows else \
                _rows_from_objects(spec, Path("<list>"), None, columns, chat_template)
        where = "<list>"
    else:
        spec = str(spec)
        path = Path(spec)
        folder, _, split = spec.rpartition(":")
        if not path.exists() and folder and "/" not in split:
            if (Path(folder) / "dataset_dict.json").is_file():  # a save_to_disk folder of splits
                objs = _read_table(Path(folder), split)
                rows = _eval_rows_from_objects(objs, path) if eval_rows else \
                    _rows_from_objects(objs, path, None, columns, chat_template)
            else:
                rows = _tofu_split(Path(folder), split, eval_rows)
            where = spec
        elif path.is_dir() and not _is_saved_dataset(path):
            raise PertaError(f"{path}: is a folder; for TOFU write FOLDER:SPLIT, e.g. {path}:forget01")
        elif not path.exists():
            raise PertaError(f"{path}: data file not found")
        else:
            rows, where = _read_file(path, eval_rows, columns, chat_template), spec
    if not rows:
        raise PertaError(f"{where}: no rows (the set is empty)")
    return Rows(rows, where) if where != "<list>" else rows


def parse_columns(text: str | None) -> dict | None:
    """--columns question=prompt,answer=response → {"question": "prompt", "answer": "response"}."""
    if not text:
        return None
    columns = {}
    for part in text.split(","):
        field, eq, column = (x.strip() for x in part.partition("="))
        if not eq or not field or not column:
            raise PertaError(f"--columns {text!r}: expected FIELD=COLUMN pairs, e.g. question=prompt,answer=response")
        columns[field] = column
    return columns


def data_hash(rows: list) -> str:
    """Of any rows; every field counts, and the shape of rows other than question/answer (whose hashes stay
    those of earlier records)."""
    h = hashlib.sha256()
    for r in rows:
        fields = astuple(r)
        h.update(json.dumps(fields if isinstance(r, (QA, EvalQA)) else [type(r).__name__, *fields]).encode())
    return h.hexdigest()


def check_sets(forget: list, retain: list, where: tuple[str, str] = ("the forget set", "the retain set")) -> int:
    """Refuse a forget set equal to the retain set (nothing would tell what to forget from what to keep);
    return how many distinct rows the two share, for the step those rows affect to say so."""
    f_rows, r_rows = set(forget), set(retain)
    if f_rows == r_rows:
        raise PertaError(f"{where[0]} and {where[1]} hold the same {len(f_rows)} rows: nothing would tell what to "
                         "forget from what to keep")
    return len(f_rows & r_rows)


MIN_VALIDATION_ROWS = 4


def hold_out(rows: list, fraction: float, where: str = "the set") -> tuple[list, list]:
    """(kept, held back): `fraction` of the rows held back for validation, spread evenly over the set
    (TOFU rows come an author at a time: the last rows would all be one author's), both in file order.
    Deterministic, so the importance step and a later calibration agree on which rows are which."""
    if not 0 < fraction < 1:
        raise PertaError(f"--hold-out must be a fraction in (0, 1), got {fraction:g}")
    n = len(rows)
    m = round(fraction * n)
    if m < MIN_VALIDATION_ROWS:
        if n <= MIN_VALIDATION_ROWS:  # no fraction helps: every row held back would leave none to score
            advice = (f"{n} rows are too few for --lam auto, which needs at least {MIN_VALIDATION_ROWS + 1}; give "
                      "--lam a number (docs/cli.md#perta-fast-calibrate) or add rows")
        else:
            need = next(f / 100 for f in range(1, 100) if MIN_VALIDATION_ROWS <= round(f / 100 * n) < n)
            advice = f"--hold-out {need:g} holds back enough, or add rows"
        raise PertaError(f"{where}: holding back {fraction:g} of {n} rows gives {m} validation rows; calibration "
                         f"needs at least {MIN_VALIDATION_ROWS} ({advice})")
    if m >= n:
        raise PertaError(f"{where}: holding back {fraction:g} of {n} rows leaves none for importance")
    held = {int((j + 0.5) * n / m) for j in range(m)}
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def prompt_and_answer(tokenizer, question: str, answer: str | None = None) -> tuple[str, str]:
    """The prompt text (through the chat template when the tokenizer has one) and the answer text."""
    user = [{"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        if answer is None:
            return prompt, ""
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise PertaError("the tokenizer's chat template does not extend the prompt with the answer")
        return prompt, full[len(prompt):]
    return f"Question: {question}\nAnswer: ", "" if answer is None else f"{answer}{tokenizer.eos_token or ''}"


@dataclass
class Encoded:
    input_ids: list[int]
    n_prompt: int  # tokens before the first scored one
    spans: tuple[tuple[int, int], ...] | None = None  # the scored [start, stop) ranges; None: input_ids[n_prompt:]
    row: int = 0  # the row it came from (a text's windows share it)

    def scored(self) -> tuple[tuple[int, int], ...]:
        return self.spans if self.spans is not None else ((self.n_prompt, len(self.input_ids)),)


def _uses_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with its BOS token (Llama's do; SmolLM2's and GPT-2's do not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _chat_segments(tokenizer, turns: tuple) -> list[tuple[str, bool]]:
    """(text, scored) pieces of a conversation: each assistant turn's text as the template renders it after the
    conversation so far (scored), and what comes between (not). Without a template, `role: content` lines."""
    messages = [{"role": role, "content": content} for role, content in turns]
    if not getattr(tokenizer, "chat_template", None):
        return [piece for m in messages for piece in ((f"{m['role']}: ", False),
                                                       (m["content"] + "\n", m["role"] == "assistant"))]
    render = lambda upto, prompt=False: tokenizer.apply_chat_template(  # noqa: E731
        messages[:upto], add_generation_prompt=prompt, tokenize=False)
    pieces, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, through = render(k, True), render(k + 1)
        if not (prompt.startswith(done) and through.startswith(prompt)):
            raise PertaError("the tokenizer's chat template does not render the conversation turn by turn (each "
                             "turn's text extending the last): its assistant turns cannot be told apart")
        pieces += [(prompt[len(done):], False), (through[len(prompt):], True)]
        done = through
    return pieces + [(render(len(messages))[len(done):], False)]


def _segments(tokenizer, row) -> list[tuple[str, bool]]:
    if isinstance(row, QA) or (isinstance(row, PromptCompletion) and row.chat_template):
        question, answer = (row.question, row.answer) if isinstance(row, QA) else (row.prompt, row.completion)
        prompt, answer = prompt_and_answer(tokenizer, question, answer)
        return [(prompt, False), (answer, True)]
    if isinstance(row, PromptCompletion):  # plain text: TRL's prompt + completion, the completion ending the text
        return [(row.prompt, False), (row.completion + (tokenizer.eos_token or ""), True)]
    return _chat_segments(tokenizer, row.messages)


def _windows(tokenizer, text: str, max_length: int, where: str, i: int) -> list[Encoded]:
    """A text cut into windows of `max_length` tokens (a BOS token first where the tokenizer uses one), every
    token of a window scored but its first; the last window is kept when it has a token to score."""
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if _uses_bos(tokenizer) else []
    if len(bos) + len(tokens) < 2:
        raise PertaError(f"{where}: row {i}: a text of {len(tokens)} token(s), nothing to score")
    step = max(1, max_length - len(bos))
    return [Encoded(bos + tokens[k:k + step], 1, row=i) for k in range(0, len(tokens), step)
            if len(bos) + len(tokens[k:k + step]) >= 2]


def encode(tokenizer, rows: list, max_length: int = 256, where: str | None = None) -> list[Encoded]:
    """Each row as token ids with the ranges its loss scores, tokenized piece by piece, so the scored tokens are
    exactly those of the answer (completion, assistant turns). A text row becomes one sample per window of
    `max_length` tokens; other rows are one sample each. `where` (the file or set the rows come from) names them
    in the error for a prompt over `max_length`, and, given, has the rows cut at `max_length` counted in a
    warning: the tokens past it are neither learned nor scored."""
    out, cut, longest = [], 0, 0
    for i, r in enumerate(rows):
        if isinstance(r, Text):
            out += _windows(tokenizer, r.text, max_length, where or "the rows", i)
            continue
        ids, spans = [], []
        for text, scored in _segments(tokenizer, r):
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            if scored and tokens:
                spans.append((len(ids), len(ids) + len(tokens)))
            ids += tokens
        if not spans:
            raise PertaError(f"{where or 'the rows'}: row {i}: nothing to score (the answer is no token)")
        if spans[0][0] >= max_length:
            raise PertaError(f"{where or 'the rows'}: row {i}: the prompt alone is {spans[0][0]} tokens, over "
                             f"--max-length {max_length} (raise --max-length)")
        cut += len(ids) > max_length
        longest = max(longest, len(ids))
        ids = ids[:max_length]
        spans = [(a, min(b, max_length)) for a, b in spans if a < max_length]
        out.append(Encoded(ids, spans[0][0], None if spans == [(spans[0][0], len(ids))] else tuple(spans), row=i))
    if cut and where:
        log.warning("%s: %d of %d answers are cut at --max-length %d (the longest row is %d tokens): the tokens "
                    "past it are neither learned nor scored; raise --max-length to keep them", where, cut, len(rows),
                    max_length, longest)
    return out


def set_summary(rows: list, encoded: list[Encoded]) -> dict:
    """What records keep of a set (never its text): its shape, rows, samples (a text's windows) and scored tokens."""
    return {"format": row_format(rows), "rows": len(rows), "samples": len(encoded),
            "scored_tokens": sum(stop - start for e in encoded for start, stop in e.scored())}


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    return pid if pid is not None else (tokenizer.eos_token_id or 0)


def collate(batch: list[Encoded], pad: int):
    """Right-padded input_ids, attention_mask and labels (-100 outside answers) as tensors."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        for start, stop in e.scored():
            labels[i, start:stop] = ids[i, start:stop]
    return ids, mask, labels


def batches(encoded: list[Encoded], batch_size: int, pad: int):
    for i in range(0, len(encoded), batch_size):
        yield collate(encoded[i:i + batch_size], pad)


def logits_of(model, ids, mask):
    """The model's logits for a batch, without a KV cache (training and scoring never reuse one)."""
    inner = getattr(model, "module", model)  # the model inside a DistributedDataParallel
    context = getattr(getattr(inner, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and ids.shape[1] > context:  # else an IndexError deep inside the position lookup
        raise PertaError(f"a sample of {ids.shape[1]} tokens is longer than the model's context of {context} "
                         f"positions: give --max-length {context} or less")
    if hasattr(getattr(inner, "config", None), "use_cache"):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return model(input_ids=ids, attention_mask=mask).logits
