"""TOFU's metric formulas on numbers already scored: truth ratios, normalised probability, ROUGE-L, forget
quality (the KS test) and the harmonic mean behind model utility. A leaf that the evaluation (perta_fast.eval)
and its log formats (perta_fast.openunlearning) both use; scipy and rouge-score are imported when called."""
from __future__ import annotations

import math


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
