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


def _rows_from_objects(objs, path: Path, line_numbers: list[int] | None = None) -> list[QA]:
    rows = []
    for i, obj in enumerate(objs):
        where = f"line {line_numbers[i]}" if line_numbers else f"row {i}"
        if not isinstance(obj, dict):
            raise PertaError(f"{path}: {where}: expected an object with question and answer")
        for key in ("question", "answer"):
            if key not in obj:
                raise PertaError(f"{path}: {where}: missing {key!r}")
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise PertaError(f"{path}: {where}: {key!r} must be a non-empty string")
        rows.append(QA(obj["question"], obj["answer"]))
    return rows


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
    for i, (qa, obj) in enumerate(zip(_rows_from_objects(objs, path), objs)):
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


def _read_file(path: Path, eval_rows: bool = False) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PertaError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if path.suffix == ".jsonl":
        objs, lines = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    objs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise PertaError(f"{path}: malformed JSON on line {n}: {e.msg}") from None
                lines.append(n)
        return _eval_rows_from_objects(objs, path) if eval_rows else _rows_from_objects(objs, path, lines)
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
        raise PertaError(f"{path}: expected a JSON array of question/answer rows")
    return _eval_rows_from_objects(data, path) if eval_rows else _rows_from_objects(data, path)


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


def load_qa(spec: str | Path | list, eval_rows: bool = False) -> list:
    """Rows from a .json/.jsonl file, `FOLDER:SPLIT` for TOFU, or a list of dicts/QA (library use).
    With `eval_rows`, EvalQA rows that also carry paraphrased and perturbed answers."""
    kind = EvalQA if eval_rows else QA
    if isinstance(spec, list):
        rows = [r if isinstance(r, kind) else None for r in spec]
        if None in rows:
            parse = _eval_rows_from_objects if eval_rows else _rows_from_objects
            rows = parse(spec, Path("<list>"))
        where = "<list>"
    else:
        spec = str(spec)
        path = Path(spec)
        folder, _, split = spec.rpartition(":")
        if not path.exists() and folder and "/" not in split:
            rows, where = _tofu_split(Path(folder), split, eval_rows), spec
        elif path.is_dir():
            raise PertaError(f"{path}: is a folder; for TOFU write FOLDER:SPLIT, e.g. {path}:forget01")
        elif not path.is_file():
            raise PertaError(f"{path}: data file not found")
        else:
            rows, where = _read_file(path, eval_rows), spec
    if not rows:
        raise PertaError(f"{where}: no question/answer rows (the set is empty)")
    return rows


def data_hash(rows: list) -> str:
    """Of QA or EvalQA rows; every field counts."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(astuple(r)).encode())
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
    n_prompt: int  # tokens before the answer; labels cover input_ids[n_prompt:]


def encode(tokenizer, rows: list[QA], max_length: int = 256, where: str | None = None) -> list[Encoded]:
    """Prompt and answer tokenized apart, so the answer's tokens are exactly those the loss sees. `where` (the
    file or set the rows come from) names them in the error for a prompt over `max_length`, and, given, has the
    answers cut at `max_length` counted in a warning: the tokens past it are neither learned nor scored."""
    out, cut, longest = [], 0, 0
    for i, r in enumerate(rows):
        prompt, answer = prompt_and_answer(tokenizer, r.question, r.answer)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(p) >= max_length:
            raise PertaError(f"{where or 'the rows'}: row {i}: the prompt alone is {len(p)} tokens, over --max-length "
                             f"{max_length} (raise --max-length)")
        cut += len(p) + len(a) > max_length
        longest = max(longest, len(p) + len(a))
        out.append(Encoded((p + a)[:max_length], len(p)))
    if cut and where:
        log.warning("%s: %d of %d answers are cut at --max-length %d (the longest row is %d tokens): the tokens "
                    "past it are neither learned nor scored; raise --max-length to keep them", where, cut, len(rows),
                    max_length, longest)
    return out


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
        labels[i, e.n_prompt:n] = ids[i, e.n_prompt:n]
    return ids, mask, labels


def batches(encoded: list[Encoded], batch_size: int, pad: int):
    for i in range(0, len(encoded), batch_size):
        yield collate(encoded[i:i + batch_size], pad)


def logits_of(model, ids, mask):
    """The model's logits for a batch, without a KV cache (training and scoring never reuse one)."""
    inner = getattr(model, "module", model)  # the model inside a DistributedDataParallel
    if hasattr(getattr(inner, "config", None), "use_cache"):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return model(input_ids=ids, attention_mask=mask).logits
