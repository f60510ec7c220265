"""TOFU results in open-unlearning's log format (locuslab/open-unlearning), both ways: `TOFU_EVAL.json`
({metric: {"agg_value", "value_by_index": {row index: {...}}}}) and `TOFU_SUMMARY.json` ({metric: agg_value})
written from `perta-fast eval`'s results, and a retain model's `TOFU_EVAL.json` read as the reference of
forget quality.

Definitions pinned to open-unlearning's src/evals/metrics/memorization.py and configs/eval/tofu_metrics at
commit 2db47ec (2025): probability = exp(−mean answer-token loss); truth ratio per row
score = P(perturbed) / (P(correct) + 1e-10), P(perturbed) = exp(−mean of the perturbed answers' losses),
correct = the paraphrased answer on forget/retain, the answer itself on real authors / world facts (so
score = 1/R of perta_fast.eval.truth_ratios); aggregated `closer_to_1_better` = mean min(s, 1/(s+1e-10)) for
`forget_truth_ratio` and `true_better` = mean max(0, 1 − s) elsewhere. Their truth ratio changed once:
pull request #163 (Dec 2025) added a `prob_mean` aggregator, the TOFU paper's revised
P(para) / (P(para) + P(pert)); its review asked that it stay an option beside the default above, though one
of its commits (7ee901c) set it in forget_Truth_Ratio.yaml. At d3d7cf9 that aggregator also rewrites the
per-row scores (memorization.py, lines 162–167): a retain log written so, read as TOFU's ratio, gives a wrong
forget quality (0.256 against 0.0995 for the same models), so the definition of a log read here is detected
(truth_ratio_definition) and converted, or the log refused. Written here: TOFU's. Forget quality is the KS test
over the forget rows' per-row scores, the same whether R or 1/R is used.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .data import EvalQA, data_hash
from .errors import PertaError
from .metrics import harmonic_mean
from .outputs import atomic_file

PREFIX = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}
TRUTH_RATIO = {"forget": "forget_truth_ratio", "retain": "retain_Truth_Ratio", "real_authors": "ra_Truth_Ratio",
               "world_facts": "wf_Truth_Ratio"}
EXTRACTION = {"forget": "extraction_strength", "retain": "retain_extraction_strength"}
UTILITY = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE",
           "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")
EVAL_NAME, SUMMARY_NAME = "TOFU_EVAL.json", "TOFU_SUMMARY.json"
# perta_fast.audit's attacks under open-unlearning's metric names (their AUC convention is the audit's)
MIA_NAMES = {"loss": "mia_loss", "zlib": "mia_zlib", "mink": "mia_min_k", "minkpp": "mia_min_k_plus_plus",
             "reference": "mia_reference", "gradnorm": "mia_gradnorm"}
PRIVLEAK_REF_VALUE = 0.5  # open-unlearning's privleak.yaml ref_value: the retain AUC when no retain log is given


def _mean(values) -> float:
    return sum(values) / len(values)


def _metric(entries: list[dict], agg: float) -> dict:
    return {"agg_value": agg, "value_by_index": {str(i): e for i, e in enumerate(entries)}}


def _prob(nll: float) -> dict:
    return {"prob": math.exp(-nll), "avg_loss": nll}


def truth_ratio_scores(correct_nll: list[float], perturbed_nll: list[list[float]]) -> list[float]:
    return [math.exp(-_mean(p)) / (math.exp(-c) + 1e-10) for c, p in zip(correct_nll, perturbed_nll)]


def closer_to_1_better(scores: list[float]) -> float:
    return _mean([min(s, 1 / (s + 1e-10)) for s in scores])


def true_better(scores: list[float]) -> float:
    return _mean([max(0.0, 1 - s) for s in scores])


def split_metrics(role: str, split: dict, rows: list[EvalQA]) -> dict:
    """One split's metrics under open-unlearning's names, from `evaluate_split`'s per-sample values."""
    ps, pre = split["per_sample"], PREFIX[role]
    out = {f"{pre}_Q_A_Prob": _metric([_prob(x) for x in ps["answer_nll"]], _mean([math.exp(-x) for x in ps["answer_nll"]])),
           f"{pre}_Q_A_PERT_Prob": _metric(
               [{"prob": [math.exp(-x) for x in p], "avg_loss": list(p)} for p in ps["perturbed_nll"]],
               _mean([_mean([math.exp(-x) for x in p]) for p in ps["perturbed_nll"]]))}
    if role in ("forget", "retain"):
        correct = ps["paraphrased_nll"]
        out[f"{pre}_Q_A_PARA_Prob"] = _metric([_prob(x) for x in correct], _mean([math.exp(-x) for x in correct]))
        out[EXTRACTION[role]] = _metric([{"score": x} for x in ps["extraction_strength"]],
                                        _mean(ps["extraction_strength"]))
    else:
        correct = ps["answer_nll"]
        normalised = [math.exp(-a) / (math.exp(-a) + sum(math.exp(-x) for x in p) + 1e-10)
                      for a, p in zip(correct, ps["perturbed_nll"])]
        out[f"{pre}_Q_A_Prob_normalised"] = _metric([{"prob": x} for x in normalised], _mean(normalised))
    scores = truth_ratio_scores(correct, ps["perturbed_nll"])
    out[TRUTH_RATIO[role]] = _metric([{"score": s} for s in scores],
                                     closer_to_1_better(scores) if role == "forget" else true_better(scores))
    if "rouge_l" in ps:
        out[f"{pre}_Q_A_ROUGE"] = _metric(
            [{"rougeL_recall": r, "input": row.question, "ground_truth": row.answer, "generation": g}
             for r, row, g in zip(ps["rouge_l"], rows, ps["generation"])], _mean(ps["rouge_l"]))
    return out


def eval_log(results: dict, splits: dict[str, list[EvalQA]]) -> dict:
    """TOFU_EVAL.json's contents from `evaluate_tofu`'s results (plus forget quality when it has one)."""
    log = {}
    for role, split in results["splits"].items():
        log.update(split_metrics(role, split, splits[role]))
    if all(name in log for name in UTILITY):
        values = [log[name]["agg_value"] for name in UTILITY]
        log["model_utility"] = {"agg_value": harmonic_mean(values)}
    if results.get("forget_quality") is not None:
        log["forget_quality"] = {"agg_value": results["forget_quality"]}
    log.update(mia_log(results.get("audit")))
    return log


def mia_log(audit: dict | None) -> dict:
    """An audit's attacks as open-unlearning's mia_* entries (AUC, and each side's per-row scores), and its
    privleak from mia_min_k: ((1 − AUC) − (1 − AUC_retain)) / (1 − AUC_retain + 1e-10) × 100, the retain AUC the
    retrained model's when the audit had one, else open-unlearning's default 0.5."""
    if not audit:
        return {}
    log = {}
    for attack, r in audit["attacks"].items():
        sides = {side: _metric([{"score": x} for x in r["scores"][side]], _mean(r["scores"][side]))
                 for side in ("forget", "holdout")}
        log[MIA_NAMES[attack]] = {"agg_value": r["auc"], "auc": r["auc"], **sides}
    mink = audit["attacks"].get("mink")
    if mink is not None:
        ref = 1 - mink.get("retrained_auc", PRIVLEAK_REF_VALUE)
        log["privleak"] = {"agg_value": ((1 - mink["auc"]) - ref) / (ref + 1e-10) * 100}
    return log


def summary(log: dict) -> dict:
    return {name: metric["agg_value"] for name, metric in log.items()}


def write_logs(results: dict, splits: dict, folder: Path, overwrite: bool, inputs: tuple) -> list[Path]:
    """TOFU_EVAL.json and TOFU_SUMMARY.json into `folder`, each atomically."""
    log = eval_log(results, splits)
    paths = [folder / EVAL_NAME, folder / SUMMARY_NAME]
    for path, content in zip(paths, (log, summary(log))):
        with atomic_file(path, overwrite, inputs) as tmp:
            tmp.write_text(json.dumps(content, indent=1, ensure_ascii=False))
    return paths


def is_eval_log(content: dict) -> bool:
    return isinstance(content, dict) and any(k in content for k in TRUTH_RATIO.values())


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def _row_probs(content: dict, name: str) -> list | None:
    entry = content.get(name)
    rows = entry.get("value_by_index") if isinstance(entry, dict) else None
    try:
        return [rows[str(i)] for i in range(len(rows))] if isinstance(rows, dict) else None
    except KeyError:
        return None


def truth_ratio_definition(content: dict, metric: dict, scores: list[float], path: Path) -> str:
    """Which truth ratio a log's forget rows hold: TOFU's P(pert)/P(para) ("tofu", open-unlearning's default) or
    open-unlearning's `prob_mean` P(para)/(P(para)+P(pert)), which at d3d7cf9 rewrites the per-row scores too
    (src/evals/metrics/memorization.py). Read from the per-row probabilities when the log holds them, else from
    which aggregate its agg_value is; a log that fits both or neither is refused rather than guessed."""
    para, pert = _row_probs(content, "forget_Q_A_PARA_Prob"), _row_probs(content, "forget_Q_A_PERT_Prob")
    if para and pert and len(para) == len(pert) == len(scores):
        try:
            c = [math.exp(-float(r["avg_loss"])) for r in para]
            w = [math.exp(-_mean([float(x) for x in r["avg_loss"]])) for r in pert]
        except (KeyError, TypeError, ValueError):
            c = w = None
        if c and w:
            if all(_close(s, wi / (ci + 1e-10)) for s, ci, wi in zip(scores, c, w)):
                return "tofu"
            if all(_close(s, ci / (ci + wi + 1e-10)) for s, ci, wi in zip(scores, c, w)):
                return "prob_mean"
    agg = metric.get("agg_value")
    fits = [name for name, value in (("tofu", closer_to_1_better(scores)), ("prob_mean", _mean(scores)))
            if isinstance(agg, (int, float)) and _close(agg, value) and (name == "tofu" or max(scores) < 1)]
    if len(fits) == 1:
        return fits[0]
    why = ("fits both TOFU's P(pert)/P(para) and open-unlearning's prob_mean P(para)/(P(para)+P(pert)) (every score "
           "is under 1)" if fits else "matches neither TOFU's truth ratio nor open-unlearning's prob_mean")
    raise PertaError(f"{path}: its forget_truth_ratio agg_value {why}, and the log has no per-row "
                     "forget_Q_A_PARA_Prob/forget_Q_A_PERT_Prob to tell them apart: forget quality would be wrong "
                     "under the other; give the retain model's folder or a log with those entries")


def reference_from_log(content: dict, path: Path, forget_rows: list[EvalQA]) -> dict:
    """A retain model's TOFU_EVAL.json as forget quality's reference: its forget rows' truth ratios, checked
    to be of the same forget rows (count, and each question where the log carries them)."""
    metric = content.get("forget_truth_ratio")
    by_index = metric.get("value_by_index") if isinstance(metric, dict) else None
    if not isinstance(by_index, dict):
        kind = "a TOFU_SUMMARY.json (aggregates only)" if isinstance(metric, (int, float)) else "a log without them"
        raise PertaError(f"{path}: forget quality needs the retain model's per-row forget truth ratios "
                         f"(forget_truth_ratio.value_by_index of its TOFU_EVAL.json); this is {kind}")
    try:
        order = sorted(by_index, key=int)
        scores = [float(by_index[i]["score"]) for i in order]
    except (ValueError, TypeError, KeyError):
        raise PertaError(f"{path}: forget_truth_ratio.value_by_index must map row indices to {{\"score\": number}}") from None
    if order != [str(i) for i in range(len(order))]:
        raise PertaError(f"{path}: forget_truth_ratio rows are not indexed 0..{len(order) - 1}")
    if not all(math.isfinite(s) and s > 0 for s in scores):
        raise PertaError(f"{path}: forget_truth_ratio scores must be positive finite numbers")
    if truth_ratio_definition(content, metric, scores, path) == "prob_mean":
        scores = [(1 - s) / s for s in scores]  # P(para)/(P(para)+P(pert)) → P(pert)/P(para)
    if len(scores) != len(forget_rows):
        raise PertaError(f"{path}: the retain log has {len(scores)} forget rows, this evaluation {len(forget_rows)}: "
                         "a log of another forget split (or of other --max-rows)")
    rouge = content.get("forget_Q_A_ROUGE", {})
    rouge = rouge.get("value_by_index") if isinstance(rouge, dict) else None
    if isinstance(rouge, dict):
        for i, row in enumerate(forget_rows):
            asked = rouge.get(str(i), {}).get("input") if isinstance(rouge.get(str(i)), dict) else None
            if isinstance(asked, str) and row.question.strip() not in asked:  # theirs: the decoded prompt
                raise PertaError(f"{path}: the retain log's forget row {i} asks another question than this "
                                 "evaluation's: a log of another forget split")
    return {"model": str(path), "splits": {"forget": {"rows_sha256": data_hash(forget_rows),
                                                      "per_sample": {"truth_ratio_raw": [1 / s for s in scores]}}}}
