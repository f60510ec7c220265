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
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .console import log
from .audit import audit, retrained_aucs
from .data import QA, EvalQA, PromptCompletion, batches, data_hash, encode, load_qa, pad_id, source_of
from .dtypes import autocast_for
from .errors import PertaError
from .loss import per_sample_loss
from .metrics import (forget_quality, harmonic_mean, normalised_probability, rouge_l_recall,  # noqa: F401
                      truth_ratio_score, truth_ratios)
from .options import GENERATE_BATCH, AuditOptions, EvalOptions
from .scoring import decode, generate_answers, score_questions
from .io import read_json
from .models import load_model
from .muse import EVAL_NAME as MUSE_EVAL, SUMMARY_NAME as MUSE_SUMMARY, auc_forget_above_holdout, evaluate_muse, \
    load_muse, min_k_scores, open_unlearning_logs
from .openunlearning import EVAL_NAME, MIA_NAMES, SUMMARY_NAME, is_eval_log, reference_from_log, write_logs
from .outputs import atomic_file, check_output_path

# eval --holdout's attacks: open-unlearning's TOFU MIA metrics; mia_reference too when θ_0 is given (--reference)
AUDIT_ATTACKS = "loss,zlib,mink,minkpp,gradnorm"


def normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def as_question(row) -> QA | None:
    """The question/answer a row is to the token-tree scorer and the decoder: a QA row, or a prompt/completion
    row through the chat template (the same tokens); None for text, conversations and plain prompt/completion."""
    if isinstance(row, (QA, EvalQA)):
        return QA(row.question, row.answer)
    if isinstance(row, PromptCompletion) and row.chat_template:
        return QA(row.prompt, row.completion)
    return None


def answer_probabilities(model, tokenizer, rows: list[QA], max_length: int = 256) -> list[float]:
    """Each row's answer probability: exp of minus its loss (the mean cross-entropy of its scored tokens; of each
    window, for text). Question rows go through the token-tree scorer: the shared system prompt runs once and
    logits are formed only where an answer token is predicted, so memory is bounded by the scorer's token
    budgets, not by a batch size (1.57x faster than padded batches on 80 TOFU rows, SmolLM2-135M fp32, 2 cores:
    benchmarks/probability_speed.py)."""
    questions = [as_question(r) for r in rows]
    if None in questions:  # every other shape: padded batches of the training encoding
        return padded_answer_probabilities(model, tokenizer, rows, max_length=max_length)
    scores = score_questions(model, tokenizer, [(q.question, [q.answer]) for q in questions], max_length)
    return [math.exp(-s.nll[0]) for s in scores]


@torch.no_grad()
def padded_answer_probabilities(model, tokenizer, rows: list[QA], batch_size: int = 16,
                                max_length: int = 256) -> list[float]:
    """The plain reference for `answer_probabilities`: a padded forward per batch, full logits and the
    training loss. Its test oracle and its benchmark's baseline."""
    device = next(model.parameters()).device
    probs = []
    for ids, mask, labels in batches(encode(tokenizer, rows, max_length), batch_size, pad_id(tokenizer)):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        probs += torch.exp(-per_sample_loss(logits, labels.to(device))).tolist()
    return probs


def evaluate(model, tokenizer, rows: list[QA], batch_size: int = GENERATE_BATCH, max_new_tokens: int = 32,
             generate: bool = True, max_length: int = 256) -> dict:
    """Mean answer probability, exact-match accuracy of greedy answers (after normalising case,
    punctuation and spaces; `batch_size` questions decoded together) and the generations themselves."""
    probs = answer_probabilities(model, tokenizer, rows, max_length)
    result = {"n": len(rows), "answer_prob": sum(probs) / len(probs)}
    questions = [as_question(r) for r in rows]
    if generate and None not in questions:  # exact match needs a question to answer
        gens = generate_answers(model, tokenizer, [q.question for q in questions], max_new_tokens, batch_size)
        result["exact_match"] = sum(normalise(g) == normalise(q.answer) for g, q in zip(gens, questions)) / len(rows)
        result["generations"] = gens
    return result


# ---- TOFU's metrics (Maini et al., 2024), computed the way its evaluation code defines them ----

ROLES = ("forget", "retain", "real_authors", "world_facts")
UTILITY_ROLES = ("retain", "real_authors", "world_facts")  # 3 splits × (prob, ROUGE-L, truth ratio) = 9 scores


def tofu_splits(folder: str | Path, forget: str = "forget01", max_rows: int | None = None) -> dict[str, list[EvalQA]]:
    """The four evaluation splits of a TOFU folder, each cut to its first `max_rows` rows."""
    names = {"forget": f"{forget}_perturbed", "retain": "retain_perturbed",
             "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed"}
    return {role: load_qa(f"{folder}:{name}", eval_rows=True)[:max_rows or None] for role, name in names.items()}


def model_utility(results: dict) -> float | None:
    """Harmonic mean of probability, ROUGE-L and truth ratio on retain, real authors and world facts."""
    scores = [results["splits"].get(role, {}).get(m) for role in UTILITY_ROLES for m in ("prob", "rouge_l", "truth_ratio")]
    if any(s is None for s in scores):
        return None
    return harmonic_mean(scores)


def _no_paraphrase(r: EvalQA) -> bool:
    return r.paraphrased_answer == r.answer


def evaluate_split(model, tokenizer, rows: list[EvalQA], role: str, opts: EvalOptions | None = None) -> dict:
    return evaluate_splits(model, tokenizer, {role: rows}, opts)[role]


def evaluate_splits(model, tokenizer, splits: dict[str, list[EvalQA]], opts: EvalOptions | None = None) -> dict:
    """Each split's TOFU metrics. Each split is scored on its own (its numbers do not depend on the others),
    but the greedy answers left to decode after scoring fill batches across splits (a batch costs as many
    steps as its longest answer, however few questions it holds)."""
    opts = opts or EvalOptions()
    items = [(r.question, [r.answer] + ([] if _no_paraphrase(r) else [r.paraphrased_answer]) + list(r.perturbed_answers))
             for rows in splits.values() for r in rows]
    limit = opts.max_new_tokens if opts.generate else 0
    with autocast_for(model, opts.bf16_autocast):
        scores = iter(score_questions(model, tokenizer, items, opts.max_length, limit, opts.batch_size,
                                      desc="score " + ", ".join(splits), parts=[len(r) for r in splits.values()]))
    return {role: _split_metrics(tokenizer, rows, role, [next(scores) for _ in rows], opts.generate)
            for role, rows in splits.items()}


def _split_metrics(tokenizer, rows: list[EvalQA], role: str, scores, generate: bool) -> dict:
    n = len(rows)
    answer_nll, para_nll, pert_nll, es, gens = [], [], [], [], []
    for r, s in zip(rows, scores, strict=True):
        same = _no_paraphrase(r)  # real authors, world facts: no paraphrase
        answer_nll.append(s.nll[0])
        para_nll.append(s.nll[0] if same else s.nll[1])
        pert_nll.append(s.nll[1 if same else 2:])
        es.append(s.extraction[0])
        gens.append(decode(tokenizer, s.greedy or []))
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
    if generate:
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
    results = {"splits": evaluate_splits(model, tokenizer, splits, opts)}
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
    path = Path(path)
    results = read_json(path) if content is None else content
    if not isinstance(results.get("splits"), dict):
        raise PertaError(f"{path}: not a perta-fast TOFU eval results file (no 'splits'): {_what_it_is(results)}")
    return results


def _what_it_is(content: dict) -> str:
    """What a JSON that is not our TOFU results holds, so the user knows what to give instead."""
    instead = ("give the retain model's folder, its `perta-fast eval` results .json or its open-unlearning "
               "TOFU_EVAL.json")
    if {"avg_gt_loss", "avg_paraphrased_loss", "avg_perturbed_loss"} & set(content):
        return f"it looks like the TOFU repository's own eval_log*.json (avg_gt_loss, …), not read here; {instead}"
    if content.get("benchmark") == "muse" or "forget_verbmem_ROUGE" in content:
        return f"it holds MUSE results; {instead}"
    if "attacks" in content:
        return f"it is a perta-fast audit; {instead}"
    return instead


def reference_results(reference: str | Path, forget_rows: list[EvalQA], opts: EvalOptions) -> dict:
    """A retain-only model's forget-split results: read from its saved results, or computed from its folder
    (truth ratios only, which is all forget quality needs)."""
    reference = Path(reference)
    if reference.is_file():
        content = read_json(reference)
        if is_eval_log(content):  # open-unlearning's TOFU_EVAL.json
            return reference_from_log(content, reference, forget_rows)
        results = load_results(reference, content)
        theirs = results.get("options", {}).get("bf16_autocast", False)
        if theirs != opts.bf16_autocast:  # KS on truth ratios scored two ways measures the precision too
            log.warning(f"{reference}: the retain model was scored {'with' if theirs else 'without'} --bf16-autocast, "
                        f"this model {'with' if opts.bf16_autocast else 'without'}: forget quality compares the two")
        return results
    if not reference.is_dir():
        raise PertaError(f"{reference}: retain model not found (a checkpoint folder or its eval results .json)")
    model, tok = load_model(reference, opts.device, opts.dtype)
    return {"model": str(reference),
            "splits": {"forget": evaluate_split(model, tok, forget_rows, "forget", replace(opts, generate=False))}}


def retrained_audit_aucs(reference, forget: list, holdout: list, options: AuditOptions,
                         attack_reference=None) -> dict | None:
    """The retrained (retain-only) model's AUC per attack, for the audit's comparison and privleak: audited here
    when `reference` is its folder (`attack_reference`: θ_0 loaded, for the reference attack), read from its
    results (`audit`) or its open-unlearning log (mia_*)."""
    if reference is None or isinstance(reference, dict):
        return None
    reference = Path(reference)
    if reference.is_dir():
        return retrained_aucs(reference, forget, holdout, options, attack_reference)
    content = read_json(reference)
    if isinstance(content.get("audit"), dict):
        return {a: r["auc"] for a, r in content["audit"]["attacks"].items()}
    logged = {a: content[name] for a, name in MIA_NAMES.items() if name in content}
    aucs = {a: v["agg_value"] if isinstance(v, dict) else v for a, v in logged.items()}
    return {a: float(v) for a, v in aucs.items() if isinstance(v, (int, float))} or None


def eval_checkpoint(model_dir: str | Path, splits: dict[str, list[EvalQA]], out: str | Path | None = None,
                    reference: str | Path | dict | None = None, opts: EvalOptions | None = None,
                    overwrite: bool = False, open_unlearning: bool = False, holdout: list | None = None,
                    attack_reference: str | Path | None = None) -> dict:
    """Evaluate the checkpoint in `model_dir`; write `out` (.json) and a markdown table beside it (.md), and
    with `open_unlearning` also TOFU_EVAL.json and TOFU_SUMMARY.json in open-unlearning's format beside it.
    `holdout` (rows of the forget split's kind never trained on, TOFU's holdout.json): the membership audit of
    the forget split against them (perta_fast.audit), logged as open-unlearning's mia_* and privleak;
    `attack_reference` (θ_0's folder) adds the reference attack (mia_reference)."""
    import json
    import time

    opts = opts or EvalOptions()
    if open_unlearning and out is None:
        raise PertaError("--format open-unlearning writes TOFU_EVAL.json and TOFU_SUMMARY.json beside --out: give --out")
    if out is not None:
        out = Path(out)
        extra = (out.with_name(EVAL_NAME), out.with_name(SUMMARY_NAME)) if open_unlearning else ()
        for path in (out, out.with_suffix(".md"), *extra):
            check_output_path(path, overwrite, tuple(p for p in (model_dir, attack_reference) if p))
    t0 = time.perf_counter()
    if attack_reference is not None and holdout is None:
        raise PertaError("--reference is the reference attack's model (θ_0): the attack needs --holdout")
    if holdout is not None:
        attacks = AUDIT_ATTACKS + (",reference" if attack_reference is not None else "")
        audit_opts = AuditOptions(attacks=attacks, max_length=opts.max_length, device=opts.device,
                                  dtype=opts.dtype, bf16_autocast=opts.bf16_autocast)
        forget_qa = [QA(r.question, r.answer) for r in splits.get("forget", [])]
        if not forget_qa:
            raise PertaError("--holdout audits the forget split: evaluate one (--forget-split)")
        theta_0 = load_model(attack_reference, opts.device, opts.dtype) if attack_reference is not None else None
        # before `reference` is read
        retrained = retrained_audit_aucs(reference, forget_qa, holdout, audit_opts, theta_0)
    if reference is not None and not isinstance(reference, dict):
        ref_where = str(reference)
        reference = reference_results(reference, splits.get("forget", []), opts)
    else:
        ref_where = "the retain model's results"
    model, tok = load_model(model_dir, opts.device, opts.dtype)
    results = {"model": str(model_dir), **evaluate_tofu(model, tok, splits, opts)}
    if holdout is not None:
        results["audit"] = audit(model, tok, forget_qa, holdout, audit_opts, theta_0, retrained_aucs=retrained,
                                 where=("the forget split", source_of(holdout, "the holdout set")))
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


# ---- MUSE (perta_fast.muse): `perta-fast eval --benchmark muse --data DIR`

def muse_reference_auc(reference: str | Path, data: dict, opts: EvalOptions) -> float:
    """The retrained model's privleak AUC: from its folder (evaluated on the same excerpts), its saved results
    (.json from `eval --benchmark muse`), or its open-unlearning MUSE_EVAL.json / MUSE_SUMMARY.json."""
    reference = Path(reference)
    if reference.is_dir():
        model, tok = load_model(reference, opts.device, opts.dtype)
        return auc_forget_above_holdout(min_k_scores(model, tok, data["privleak_forget"]),
                                        min_k_scores(model, tok, data["privleak_holdout"]))
    content = read_json(reference)
    if isinstance(content.get("privleak_auc"), (int, float)):
        return float(content["privleak_auc"])
    logged = content.get("mia_min_k")  # open-unlearning's AUC: 1 − MUSE's
    logged = logged.get("auc", logged.get("agg_value")) if isinstance(logged, dict) else logged
    if isinstance(logged, (int, float)):
        return 1 - float(logged)
    raise PertaError(f"{reference}: holds no privleak AUC (privleak_auc of eval --benchmark muse's results, or "
                     "mia_min_k of open-unlearning's MUSE logs)")


def muse_checkpoint(model_dir: str | Path, data_dir: str | Path, out: str | Path | None = None,
                    reference: str | Path | None = None, opts: EvalOptions | None = None, max_rows: int | None = None,
                    overwrite: bool = False, open_unlearning: bool = False) -> dict:
    """MUSE's metrics of the checkpoint in `model_dir` on the folder `data_dir` (perta_fast.muse); `out` (.json)
    and, with `open_unlearning`, MUSE_EVAL.json and MUSE_SUMMARY.json beside it."""
    import json
    import time

    opts = opts or EvalOptions()
    if open_unlearning and out is None:
        raise PertaError("--format open-unlearning writes MUSE_EVAL.json and MUSE_SUMMARY.json beside --out: give --out")
    paths = []
    if out is not None:
        out = Path(out)
        paths = [out] + ([out.with_name(MUSE_EVAL), out.with_name(MUSE_SUMMARY)] if open_unlearning else [])
        for path in paths:
            check_output_path(path, overwrite, (model_dir,))
    data = load_muse(data_dir, max_rows)
    t0 = time.perf_counter()
    auc_retrained = muse_reference_auc(reference, data, opts) if reference is not None else None
    model, tok = load_model(model_dir, opts.device, opts.dtype)
    with autocast_for(model, opts.bf16_autocast):
        results = {"model": str(model_dir), "benchmark": "muse", "data": str(data_dir),
                   **evaluate_muse(model, tok, data, auc_retrained, opts.batch_size)}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        contents = [results]
        if open_unlearning:
            contents += list(open_unlearning_logs(results))
        for path, content in zip(paths, contents):
            with atomic_file(path, overwrite, (model_dir,)) as tmp:
                tmp.write_text(json.dumps(content, indent=1, ensure_ascii=False))
        if open_unlearning:
            results["open_unlearning"] = [str(p) for p in paths[1:]]
    return results


def format_muse(results: dict) -> str:
    leak = results["privleak"]
    lines = [f"MUSE on {results['data']} ({results['n']['verbmem']} verbmem, {results['n']['forget_qa']} forget / "
             f"{results['n']['retain_qa']} retain questions, {results['n']['privleak_forget']} + "
             f"{results['n']['privleak_holdout']} privleak excerpts)",
             f"  VerbMem (forget)     {results['verbmem_f']:7.2f}   ROUGE-L F1 × 100: verbatim memory, lower is forgotten",
             f"  KnowMem (forget)     {results['knowmem_f']:7.2f}   lower is forgotten",
             f"  KnowMem (retain)     {results['knowmem_r']:7.2f}   utility: higher is kept",
             f"  PrivLeak AUC         {results['privleak_auc']:7.3f}   forget vs holdout excerpts (0.5: indistinguishable)",
             f"  PrivLeak             " + (f"{leak:7.2f}   vs the retrained model's AUC {results['auc_retrained']:.3f} "
                                           "(0 ideal; negative: still remembered)" if leak is not None
                                           else "      -   " + results["note"]),
             f"  Extraction strength  {results['extraction_strength']:7.3f}   on the VerbMem rows"]
    return "\n".join(lines)
