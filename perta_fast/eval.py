"""Evaluation: quick checks used by `unlearn` and `demo` (answer probability, exact match), and TOFU's
metrics for `perta-fast eval` (probability, ROUGE-L, truth ratio, extraction strength, forget quality,
model utility).

Answer probability is length-normalised, P(answer | question)^(1/|answer|) = exp(−sample loss),
with the same answer tokens (through the chat template) the training and importance losses use.
"""
from __future__ import annotations

import math
import re
import string
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .console import bar
from .data import QA, EvalQA, batches, data_hash, encode, load_qa, pad_id, prompt_and_answer
from .errors import PertaError
from .loss import per_sample_loss


def normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def answer_probabilities(model, tokenizer, rows: list[QA], batch_size: int = 16, max_length: int = 256) -> list[float]:
    device = next(model.parameters()).device
    probs = []
    for ids, mask, labels in batches(encode(tokenizer, rows, max_length), batch_size, pad_id(tokenizer)):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        probs += torch.exp(-per_sample_loss(logits, labels.to(device))).tolist()
    return probs


GENERATE_BATCH = 64  # questions decoded together: on a CPU a decode step costs about the same for 16 or 64


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 32,
                     batch_size: int = GENERATE_BATCH) -> list[str]:
    """Greedy answers, decoded in batches of questions of similar prompt length, left-padded so every
    prompt ends where decoding starts; a finished answer leaves the batch (its cache rows dropped) instead
    of being decoded to the longest one's end."""
    pad = pad_id(tokenizer)
    prompts = [tokenizer(prompt_and_answer(tokenizer, q)[0], add_special_tokens=False)["input_ids"] for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        for i, tokens in zip(batch, _greedy(model, [prompts[i] for i in batch], max_new_tokens, pad,
                                            tokenizer.eos_token_id)):
            answers[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return answers


def _run_prompts(model, prompts: list[list[int]], pad: int):
    """Prompts side by side, left-padded so that each ends where its continuation starts, positions counted
    from each one's first real token (so the padding changes nothing): (last logits and KV cache, mask)."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                use_cache=True, logits_to_keep=1)
    return out, mask


def _greedy(model, prompts: list[list[int]], max_new_tokens: int, pad: int, eos: int) -> list[list[int]]:
    device = next(model.parameters()).device
    out, mask = _run_prompts(model, prompts, pad)
    position = mask.sum(1)  # of the next token, counted from each prompt's first real one
    cache, alive = out.past_key_values, torch.arange(len(prompts), device=device)
    tokens: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        chosen = out.logits[:, -1].argmax(-1)
        for row, token in zip(alive.tolist(), chosen.tolist()):
            tokens[row].append(token)
        going = chosen != eos
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, chosen, mask, position = alive[keep], chosen[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], 1)
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=position[:, None],
                    past_key_values=cache, use_cache=True)
        position = position + 1
    return tokens


def evaluate(model, tokenizer, rows: list[QA], batch_size: int = 16, max_new_tokens: int = 32,
             generate: bool = True) -> dict:
    """Mean answer probability, exact-match accuracy of greedy answers (after normalising case,
    punctuation and spaces) and the generations themselves."""
    probs = answer_probabilities(model, tokenizer, rows, batch_size)
    result = {"n": len(rows), "answer_prob": sum(probs) / len(probs)}
    if generate:
        gens = generate_answers(model, tokenizer, [r.question for r in rows], max_new_tokens)
        result["exact_match"] = sum(normalise(g) == normalise(r.answer) for g, r in zip(gens, rows)) / len(rows)
        result["generations"] = gens
    return result


# ---- TOFU's metrics (Maini et al., 2024), computed the way its evaluation code defines them ----

ROLES = ("forget", "retain", "real_authors", "world_facts")
UTILITY_ROLES = ("retain", "real_authors", "world_facts")  # 3 splits × (prob, ROUGE-L, truth ratio) = 9 scores


@dataclass
class EvalOptions:
    batch_size: int = GENERATE_BATCH  # questions decoded together
    max_new_tokens: int = 200  # TOFU generates up to 200 tokens
    max_length: int = 512
    generate: bool = True  # greedy answers for ROUGE-L; off, ROUGE-L is left out (and model utility with it)
    device: str | None = None
    dtype: str | None = None  # auto (None): the checkpoint's own


def tofu_splits(folder: str | Path, forget: str = "forget01", max_rows: int | None = None) -> dict[str, list[EvalQA]]:
    """The four evaluation splits of a TOFU folder, each cut to its first `max_rows` rows."""
    names = {"forget": f"{forget}_perturbed", "retain": "retain_perturbed",
             "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed"}
    return {role: load_qa(f"{folder}:{name}", eval_rows=True)[:max_rows or None] for role, name in names.items()}


def extraction_strength(logits, labels) -> list[float]:
    """1 − k/|a| per sample, k the shortest prefix of the answer a after which the greedy continuation
    reproduces the rest exactly; under teacher forcing that is: every later argmax equals its label.
    k = |a| (nothing extracted) gives 0."""
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    out = []
    for p, t in zip(pred, target):
        valid = t != -100
        miss = (p[valid] != t[valid]).nonzero()
        n = int(valid.sum())
        k = int(miss[-1]) + 1 if len(miss) else 0
        out.append(1.0 - k / n if n else 0.0)
    return out


ANSWER_TOKENS_PER_FORWARD = 1024  # bounds the (answers × tokens × vocab) fp32 logits: ~200 MB at 49k vocab
# bounds the answers' copies of their prompts' KV cache: short answers (world facts: ~5 tokens) would
# otherwise pack ~200 answers, each with its ~60-token prompt, into one forward (1.1 GB at 135M in fp32)
CONTEXT_TOKENS_PER_FORWARD = 4096


def question_scores(model, tokenizer, question: str, answers: list[str], max_length: int = 512):
    """Mean answer-token NLL and extraction strength of each answer to one question."""
    return score_questions(model, tokenizer, [(question, answers)], max_length)[0]


@torch.no_grad()
def score_questions(model, tokenizer, items: list[tuple[str, list[str]]], max_length: int = 512,
                    answer_tokens: int = ANSWER_TOKENS_PER_FORWARD, desc: str | None = None,
                    context_tokens: int = CONTEXT_TOKENS_PER_FORWARD) -> list[tuple[list[float], list[float]]]:
    """(mean answer-token NLLs, extraction strengths) of each (question, answers), several questions per
    forward. TOFU scores 6-7 answers per question and the prompt is ~half of each: every prompt runs once,
    left-padded beside the others' (positions counted from its first real token, so the padding changes
    nothing), and its KV cache is copied to each of its answers, which run right-padded after it."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    encoded = [encode(tokenizer, [QA(q, a) for a in answers], max_length) for q, answers in items]
    scores = {}
    with bar(total=len(items), show=desc is not None, desc=desc, unit="row", leave=False) as progress:
        for group in question_groups(encoded, answer_tokens, context_tokens):
            scores.update(zip(group, _score_group(model, [encoded[j] for j in group], pad, device)))
            progress.update(len(group))
    return [scores[i] for i in range(len(items))]


def question_groups(encoded: list[list], answer_tokens: int = ANSWER_TOKENS_PER_FORWARD,
                    context_tokens: int = CONTEXT_TOKENS_PER_FORWARD) -> list[list[int]]:
    """The questions (indices into `encoded`, each a question's encoded answers) that score_questions runs
    together: questions with answers of like length side by side (less padding: 23 % of TOFU's answer
    tokens otherwise), as many as keep answers × widest answer within `answer_tokens` (the logits) and
    answers × (longest prompt + widest answer) within `context_tokens` (the KV cache)."""
    def width(i):
        return max(len(e.input_ids) - e.n_prompt for e in encoded[i])

    def prompt(i):
        return max(e.n_prompt for e in encoded[i])

    order = sorted(range(len(encoded)), key=width)
    groups, group = [], []
    for k, i in enumerate(order):
        group.append(i)
        nxt = order[k + 1] if k + 1 < len(order) else None
        if nxt is None:
            groups.append(group)
            break
        grown = group + [nxt]
        answers, wide = sum(len(encoded[j]) for j in grown), max(map(width, grown))
        if answers * wide > answer_tokens or answers * (max(map(prompt, grown)) + wide) > context_tokens:
            groups.append(group)
            group = []
    return groups


def _score_group(model, group, pad: int, device) -> list[tuple[list[float], list[float]]]:
    out, mask = _run_prompts(model, [e[0].input_ids[:e[0].n_prompt] for e in group], pad)
    owner = torch.tensor([g for g, enc in enumerate(group) for _ in enc], device=device)
    cache = out.past_key_values
    cache.batch_select_indices(owner)  # each answer gets its own copy of its prompt's keys/values
    tails = [e.input_ids[e.n_prompt:] for enc in group for e in enc]
    width = max(map(len, tails))
    ids = torch.full((len(tails), width), pad, dtype=torch.long)
    labels = torch.full((len(tails), width + 1), -100, dtype=torch.long)
    tail_mask = torch.zeros((len(tails), width), dtype=torch.long)
    for i, t in enumerate(tails):
        ids[i, :len(t)] = torch.tensor(t)
        labels[i, 1:len(t) + 1] = ids[i, :len(t)]
        tail_mask[i, :len(t)] = 1
    starts = mask.sum(1)[owner]
    logits = model(input_ids=ids.to(device), attention_mask=torch.cat([mask[owner], tail_mask.to(device)], 1),
                   position_ids=starts[:, None] + torch.arange(width, device=device), past_key_values=cache).logits
    # position 0 holds the prompt's last logits, which predict the first answer token
    logits = torch.cat([out.logits[owner], logits], 1)
    labels = labels.to(device)
    nll, strength = per_sample_loss(logits, labels).tolist(), extraction_strength(logits, labels)
    bounds = [0]
    for enc in group:
        bounds.append(bounds[-1] + len(enc))
    return [(nll[a:b], strength[a:b]) for a, b in zip(bounds, bounds[1:])]


def truth_ratios(paraphrased_nll: list[float], perturbed_nll: list[list[float]]) -> list[float]:
    """R = P(paraphrase)^(1/n) / geometric mean of P(perturbed)^(1/n): exp(mean perturbed NLL − paraphrase NLL)."""
    return [math.exp(sum(p) / len(p) - q) for q, p in zip(paraphrased_nll, perturbed_nll)]


def truth_ratio_score(ratios: list[float], forget: bool) -> float:
    """TOFU's reported truth ratio: mean min(R, 1/R) on the forget split (1 = cannot tell right from
    wrong), mean max(0, 1 − 1/R) elsewhere (1 = strongly prefers the right answer)."""
    vals = [min(r, 1 / r) for r in ratios] if forget else [max(0.0, 1 - 1 / r) for r in ratios]
    return sum(vals) / len(vals)


def normalised_probability(answer_nll: float, perturbed_nll: list[float]) -> float:
    """Real authors / world facts: P(answer) / (P(answer) + Σ P(perturbed)), length-normalised probabilities."""
    p = math.exp(-answer_nll)
    return p / (p + sum(math.exp(-x) for x in perturbed_nll))


def rouge_l_recall(generated: str, reference: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, generated)["rougeL"].recall


def forget_quality(model_ratios: list[float], retain_model_ratios: list[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov test of the forget split's truth ratios: (p-value, statistic)."""
    from scipy.stats import ks_2samp

    res = ks_2samp(model_ratios, retain_model_ratios)
    return float(res.pvalue), float(res.statistic)


def harmonic_mean(scores: list[float]) -> float:
    """TOFU's aggregate: 0 as soon as one score is 0."""
    from scipy.stats import hmean

    return 0.0 if min(scores) <= 0 else float(hmean(scores))


def model_utility(results: dict) -> float | None:
    """Harmonic mean of probability, ROUGE-L and truth ratio on retain, real authors and world facts."""
    scores = [results["splits"].get(role, {}).get(m) for role in UTILITY_ROLES for m in ("prob", "rouge_l", "truth_ratio")]
    if any(s is None for s in scores):
        return None
    return harmonic_mean(scores)


def _no_paraphrase(r: EvalQA) -> bool:
    return r.paraphrased_answer == r.answer


def evaluate_split(model, tokenizer, rows: list[EvalQA], role: str, opts: EvalOptions | None = None) -> dict:
    opts = opts or EvalOptions()
    n = len(rows)
    answer_nll, para_nll, pert_nll, es = [], [], [], []
    items = [(r.question, [r.answer] + ([] if _no_paraphrase(r) else [r.paraphrased_answer]) + list(r.perturbed_answers))
             for r in rows]
    for r, (nll, strength) in zip(rows, score_questions(model, tokenizer, items, opts.max_length,
                                                                 desc=f"score {role}")):
        same = _no_paraphrase(r)  # real authors, world facts
        answer_nll.append(nll[0])
        para_nll.append(nll[0] if same else nll[1])
        pert_nll.append(nll[1 if same else 2:])
        es.append(strength[0])
    if role in ("forget", "retain"):
        probs = [math.exp(-x) for x in answer_nll]
    else:
        probs = [normalised_probability(a, p) for a, p in zip(answer_nll, pert_nll)]
    ratios = truth_ratios(para_nll, pert_nll)
    out = {"rows": n, "rows_sha256": data_hash(rows), "prob": sum(probs) / n,
           "truth_ratio": truth_ratio_score(ratios, forget=role == "forget"),
           "extraction_strength": sum(es) / n,
           "per_sample": {"prob": probs, "truth_ratio_raw": ratios, "extraction_strength": es,
                          "answer_nll": answer_nll, "paraphrased_nll": para_nll, "perturbed_nll": pert_nll}}
    if opts.generate:
        gens = generate_answers(model, tokenizer, [r.question for r in rows], opts.max_new_tokens, opts.batch_size)
        rouge = [rouge_l_recall(g, r.answer) for g, r in zip(gens, rows)]
        out["rouge_l"] = sum(rouge) / n
        out["per_sample"].update(rouge_l=rouge, generation=gens)
    return out


def evaluate_tofu(model, tokenizer, splits: dict[str, list[EvalQA]], opts: EvalOptions | None = None,
                  reference: dict | None = None) -> dict:
    """Every TOFU metric of one model; `reference` (a retain-only model's results) adds forget quality."""
    unknown = set(splits) - set(ROLES)
    if unknown:
        raise PertaError(f"unknown evaluation split(s) {sorted(unknown)} (expected {', '.join(ROLES)})")
    results = {"splits": {}}
    for role, rows in bar(splits.items(), desc="eval splits", unit="split"):
        results["splits"][role] = evaluate_split(model, tokenizer, rows, role, opts)
    results["model_utility"] = model_utility(results)
    if reference is not None:
        add_forget_quality(results, reference)
    return results


def add_forget_quality(results: dict, reference: dict, where: str = "the retain model's results") -> None:
    mine, ref = results["splits"].get("forget"), reference.get("splits", {}).get("forget")
    if mine is None or ref is None:
        raise PertaError(f"{where}: forget quality needs the forget split evaluated on both models")
    if mine["rows_sha256"] != ref["rows_sha256"]:
        raise PertaError(f"{where}: evaluated on other forget rows than this model (different split or --max-rows)")
    results["forget_quality"], results["ks_statistic"] = forget_quality(
        mine["per_sample"]["truth_ratio_raw"], ref["per_sample"]["truth_ratio_raw"])


# ---- tables ----

COLUMNS = [("forget quality", None, "forget_quality"), ("model utility", None, "model_utility")] + [
    (f"{role.replace('_', ' ')} {label}", role, key) for role in ROLES
    for label, key in (("prob", "prob"), ("ROUGE-L", "rouge_l"), ("truth ratio", "truth_ratio"), ("ES", "extraction_strength"))
    if not (role in ("real_authors", "world_facts") and key == "extraction_strength")]


def _cell(results: dict, role, key) -> str:
    value = results.get(key) if role is None else results["splits"].get(role, {}).get(key)
    return "-" if value is None else f"{value:.4g}" if key == "forget_quality" else f"{value:.3f}"


def format_results(by_label: dict[str, dict]) -> str:
    """A markdown table, one row per model and one column per metric."""
    head = "| model | " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    rows = [f"| {label} | " + " | ".join(_cell(r, role, key) for _, role, key in COLUMNS) + " |"
            for label, r in by_label.items()]
    return "\n".join([head, rule] + rows)


# ---- checkpoints and files: what `perta-fast eval` runs ----

def load_results(path: str | Path, content: dict | None = None) -> dict:
    """A saved results file (`content`: its JSON, when already read)."""
    from .io import read_json

    path = Path(path)
    results = read_json(path) if content is None else content
    if not isinstance(results.get("splits"), dict):
        raise PertaError(f"{path}: not a perta-fast eval results file (no 'splits')")
    return results


def reference_results(reference: str | Path, forget_rows: list[EvalQA], opts: EvalOptions) -> dict:
    """A retain-only model's forget-split results: read from its saved results, or computed from its folder
    (truth ratios only, which is all forget quality needs)."""
    from .models import load_model

    from .io import read_json
    from .openunlearning import is_eval_log, reference_from_log

    reference = Path(reference)
    if reference.is_file():
        content = read_json(reference)
        if is_eval_log(content):  # open-unlearning's TOFU_EVAL.json
            return reference_from_log(content, reference, forget_rows)
        return load_results(reference, content)
    if not reference.is_dir():
        raise PertaError(f"{reference}: retain model not found (a checkpoint folder or its eval results .json)")
    model, tok = load_model(reference, opts.device, opts.dtype)
    return {"model": str(reference),
            "splits": {"forget": evaluate_split(model, tok, forget_rows, "forget", replace(opts, generate=False))}}


def eval_checkpoint(model_dir: str | Path, splits: dict[str, list[EvalQA]], out: str | Path | None = None,
                    reference: str | Path | dict | None = None, opts: EvalOptions | None = None,
                    overwrite: bool = False, open_unlearning: bool = False) -> dict:
    """Evaluate the checkpoint in `model_dir`; write `out` (.json) and a markdown table beside it (.md), and
    with `open_unlearning` also TOFU_EVAL.json and TOFU_SUMMARY.json in open-unlearning's format beside it."""
    import json
    import time

    from .outputs import atomic_file, check_output_path
    from .models import load_model

    from .openunlearning import EVAL_NAME, SUMMARY_NAME, write_logs

    opts = opts or EvalOptions()
    if open_unlearning and out is None:
        raise PertaError("--format open-unlearning writes TOFU_EVAL.json and TOFU_SUMMARY.json beside --out: give --out")
    if out is not None:
        out = Path(out)
        extra = (out.with_name(EVAL_NAME), out.with_name(SUMMARY_NAME)) if open_unlearning else ()
        for path in (out, out.with_suffix(".md"), *extra):
            check_output_path(path, overwrite, (model_dir,))
    t0 = time.perf_counter()
    if reference is not None and not isinstance(reference, dict):
        ref_where = str(reference)
        reference = reference_results(reference, splits.get("forget", []), opts)
    else:
        ref_where = "the retain model's results"
    model, tok = load_model(model_dir, opts.device, opts.dtype)
    results = {"model": str(model_dir), **evaluate_tofu(model, tok, splits, opts)}
    if reference is not None:
        add_forget_quality(results, reference, ref_where)
        results["forget_quality_reference"] = reference.get("model", ref_where)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["options"] = asdict(opts)
    if out is not None:
        table = format_results({Path(model_dir).name: results})
        with atomic_file(out, overwrite, (model_dir,)) as tmp:
            tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False))
        with atomic_file(out.with_suffix(".md"), overwrite, (model_dir,)) as tmp:
            tmp.write_text(table + "\n")
        if open_unlearning:
            results["open_unlearning"] = [str(p) for p in write_logs(results, splits, out.parent, overwrite,
                                                                     (model_dir,))]
    return results


def compare(paths: list[str | Path]) -> str:
    """Side-by-side table of saved results; each row is labelled by its file name."""
    return format_results({Path(p).stem: load_results(p) for p in paths})
