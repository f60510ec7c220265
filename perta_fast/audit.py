"""Membership-inference audit: can an attacker tell the forget rows from rows of the same kind the model never
saw (the holdout)? The attacks as open-unlearning (at commit d3d7cf9) and their papers define them, each a
per-row score where higher means "less likely a member" (a loss's direction):

- loss: the mean cross-entropy of the row's scored tokens (Yeom et al. 2018);
- zlib: that loss over the zlib-compressed length, in bytes, of the scored tokens' text (Carlini et al. 2021);
- mink: minus the mean of the lowest k of the scored tokens' log-probabilities (Shi et al. 2024);
- minkpp: the same over each token's log-probability standardised by the mean μ and standard deviation σ of log p
  under the model's own next-token distribution, σ² floored at 1e-6 (Zhang et al. 2024);
- reference: the loss minus a reference model's loss on the same row (θ_0, the model before fine-tuning, is the
  natural one: what the row costs a model that never saw it);
- gradnorm: the mean over the model's parameter tensors of the L2 norm of the row's loss gradient (Wang et al. 2024;
  open-unlearning's p = 2), every sample's gradient from one batched backward through the exact Fisher's hooks
  (importance.estimators._PerSampleSquares), never a backward per row; a text of several windows: the mean of
  its windows' values (the pooled row's gradient is not formed).

k rows: max(1, ⌊k·n⌋) of a row's n scored tokens. A row's scored tokens are exactly those training scores: a Q&A
row's answer, a completion, the assistant turns, every token of a text window but its first; a text cut into
several windows is one row, its tokens pooled.

AUC: the probability that a random forget row is scored as more likely a member than a random holdout row (ties
count ½), i.e. scikit-learn's roc_auc_score with the holdout rows as the positive class, as open-unlearning
computes it: 0.5 when the two cannot be told apart, 1 when every forget row looks seen. Beside it a percentile
bootstrap 95 % interval (scipy.stats.bootstrap, forget and holdout resampled apart), TPR at 1 % and 5 % FPR, and,
given a retrained model's AUC, PrivLeak as MUSE and open-unlearning compute it, on 1 − AUC:
((1 − AUC) − (1 − AUC_r)) / (1 − AUC_r) × 100, near 0 like the retrained model, negative while remembered.

The verdict, per attack and overall (the rule, stated in every report): with r the retrained model's AUC for
that attack (0.5 without one), "remembered" when the interval lies above r, "over-unlearned" when it lies below
r (the forget rows now look less familiar than unseen ones: that too gives them away), else "indistinguishable";
overall "remembered" if any attack says so, else "over-unlearned" if any says so.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from .console import bar, pyplot
from .data import collate, encode, logits_of, pad_id, row_format, source_of
from .dtypes import autocast_for
from .errors import PertaError
from .models import load_model
from .muse import privleak as muse_privleak
from .openunlearning import MIA_NAMES
from .options import AuditOptions
from .outputs import atomic_file, check_output_path

ATTACKS = tuple(MIA_NAMES)
VARIANCE_FLOOR = 1e-6  # open-unlearning's clamp of σ² in Min-K++
POSITIONS_PER_SOFTMAX = 512  # positions × vocabulary in fp32 at once


@dataclass
class RowTokens:
    """What the attacks read of one row: its scored tokens' log p, their Min-K++ z-scores and their text."""
    logprobs: list[float]
    z: list[float]
    text: str


def parse_attacks(text: str, reference: bool = True, gradnorm: bool = True) -> tuple[str, ...]:
    """--attacks as names; "auto": every attack, the reference one only with a reference model, gradnorm only
    where per-sample gradients can be formed (not for fused MoE experts)."""
    if text == "auto":
        return tuple(a for a in ATTACKS if (reference or a != "reference") and (gradnorm or a != "gradnorm"))
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise PertaError(f"--attacks {text!r}: unknown attack {unknown[0] if unknown else '(none)'}; choose from "
                         f"{', '.join(ATTACKS)}")
    return names


def row_tokens(model, tokenizer, rows: list, max_length: int, batch_size: int, where: str,
               bf16_autocast: bool = False) -> list[RowTokens]:
    """Each row's scored tokens scored by the model: padded forwards of samples of similar length."""
    import torch

    encoded = encode(tokenizer, rows, max_length, where)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    pieces = [([], [], []) for _ in rows]
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    with torch.no_grad(), autocast_for(model, bf16_autocast), \
            bar(total=len(encoded), desc=f"score {where}", unit="sample") as progress:
        for start in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[start:start + batch_size]]
            ids, mask, _ = collate(batch, pad)
            logits = logits_of(model, ids.to(device), mask.to(device))
            for b, e in enumerate(batch):
                logp, z, tokens = pieces[e.row]
                for first, stop in e.scored():
                    first = max(first, 1)  # a window's first token has nothing before it to predict it
                    for s0 in range(first, stop, POSITIONS_PER_SOFTMAX):
                        s1 = min(stop, s0 + POSITIONS_PER_SOFTMAX)
                        lp = logits[b, s0 - 1:s1 - 1].float().log_softmax(-1)
                        target = ids[b, s0:s1].to(lp.device)
                        token_lp = lp.gather(-1, target[:, None])[:, 0]
                        p = lp.exp()
                        mu = (p * lp).sum(-1)
                        # Σ p (log p − μ)², not Σ p (log p)² − μ²: the difference of two near numbers loses
                        # ~4e-4 of z in fp32 (against float64), this two-pass form ~1e-6
                        var = (p * (lp - mu[:, None]).square()).sum(-1)
                        logp += token_lp.tolist()
                        z += ((token_lp - mu) / var.clamp(min=VARIANCE_FLOOR).sqrt()).tolist()
                        tokens += target.tolist()
            del logits
            progress.update(len(batch))
    return [RowTokens(logp, z, tokenizer.decode(tokens, skip_special_tokens=True)) for logp, z, tokens in pieces]


def gradnorm_scores(model, tokenizer, rows: list, max_length: int, batch_size: int, where: str) -> list[float]:
    """Each row's GradNorm (see the module's docstring), in the model's own dtype (no autocast: a gradient)."""
    from .importance.estimators import _PerSampleSquares, fisher_blocker

    blocker = fisher_blocker(model)
    if blocker:
        raise PertaError(f"the gradnorm attack needs each sample's gradient, as the exact Fisher does: "
                         f"{blocker.split(';')[0]}; leave gradnorm out of --attacks")
    encoded = encode(tokenizer, rows, max_length, where)
    per_row: list[list[float]] = [[] for _ in rows]
    device = next(model.parameters()).device
    pad, was_training = pad_id(tokenizer), model.training
    model.eval()
    squares = _PerSampleSquares(model)
    try:
        with bar(total=len(encoded), desc=f"gradnorm {where}", unit="sample") as progress:
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start:start + batch_size]
                ids, mask, labels = (t.to(device) for t in collate(batch, pad))
                for e, norms in zip(batch, squares.squares_of(ids, mask, labels).sqrt().mean(1).tolist()):
                    per_row[e.row].append(norms)
                progress.update(len(batch))
    finally:
        squares.close()
        model.train(was_training)
    return [sum(v) / len(v) for v in per_row]


def _lowest_mean(values: list[float], k: float) -> float:
    n = max(1, int(len(values) * k))
    return sum(sorted(values)[:n]) / n


def loss_of(row: RowTokens) -> float:
    return -sum(row.logprobs) / len(row.logprobs)


def attack_scores(rows: list[RowTokens], attack: str, k: float, reference: list[RowTokens] | None = None) -> list[float]:
    """Each row's score (higher: less likely a member), for every attack but gradnorm (gradnorm_scores)."""
    if attack == "loss":
        return [loss_of(r) for r in rows]
    if attack == "zlib":
        return [loss_of(r) / len(zlib.compress(r.text.encode("utf-8"))) for r in rows]
    if attack == "mink":
        return [-_lowest_mean(r.logprobs, k) for r in rows]
    if attack == "minkpp":
        return [-_lowest_mean(r.z, k) for r in rows]
    if attack == "reference":
        return [loss_of(r) - loss_of(ref) for r, ref in zip(rows, reference, strict=True)]
    raise ValueError(attack)


def auc(forget: list[float], holdout: list[float]) -> float:
    """P(a forget row scores lower, i.e. more member-like, than a holdout row) + ½ P(tie): open-unlearning's
    roc_auc_score with the holdout rows as the positive class."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([0] * len(forget) + [1] * len(holdout), list(forget) + list(holdout)))


def bootstrap_interval(forget: list[float], holdout: list[float], resamples: int, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % interval of the AUC, forget and holdout rows resampled apart."""
    import numpy as np
    from scipy.stats import bootstrap, mannwhitneyu

    def statistic(f, h, axis=-1):  # the AUC above, as the Mann-Whitney U of the holdout scores over n_f·n_h
        return mannwhitneyu(h, f, axis=axis).statistic / (f.shape[axis] * h.shape[axis])

    res = bootstrap((np.asarray(forget, float), np.asarray(holdout, float)), statistic, n_resamples=resamples,
                    method="percentile", vectorized=True, random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def tpr_at(forget: list[float], holdout: list[float], fpr: float) -> float:
    """The share of forget rows flagged as members at the threshold that flags at most `fpr` of holdout rows."""
    from sklearn.metrics import roc_curve

    fprs, tprs, _ = roc_curve([1] * len(forget) + [0] * len(holdout), [-s for s in list(forget) + list(holdout)])
    return float(max(t for f, t in zip(fprs, tprs) if f <= fpr))


def privleak(auc_value: float, auc_retrained: float) -> float | None:
    """MUSE's and open-unlearning's PrivLeak, on 1 − AUC (MUSE's AUC); None where the retrained model's is 0."""
    return muse_privleak(1 - auc_value, 1 - auc_retrained)


VERDICT_RULE = ("per attack: remembered when the 95 % interval of the AUC lies above the retrained model's AUC (0.5 "
                "without one), over-unlearned when it lies below, else indistinguishable; overall: remembered if any "
                "attack says so, else over-unlearned if any says so")


def verdict_of(interval: tuple[float, float], reference: float) -> str:
    low, high = interval
    return "remembered" if low > reference else "over-unlearned" if high < reference else "indistinguishable"


def overall(verdicts: list[str]) -> str:
    return next((v for v in ("remembered", "over-unlearned") if v in verdicts), "indistinguishable")


def attack_result(forget: list[float], holdout: list[float], resamples: int, retrained_auc: float | None) -> dict:
    value = auc(forget, holdout)
    interval = bootstrap_interval(forget, holdout, resamples)
    reference = 0.5 if retrained_auc is None else retrained_auc
    out = {"auc": value, "interval": list(interval), "tpr_at_1pct_fpr": tpr_at(forget, holdout, 0.01),
           "tpr_at_5pct_fpr": tpr_at(forget, holdout, 0.05), "verdict": verdict_of(interval, reference),
           "compared_with": "the retrained model's AUC" if retrained_auc is not None else "0.5 (no retrained model)",
           "scores": {"forget": forget, "holdout": holdout}}
    if retrained_auc is not None:
        out.update(retrained_auc=retrained_auc, privleak=privleak(value, retrained_auc))
    return out


def audit(model, tokenizer, forget: list, holdout: list, options: AuditOptions, reference=None,
          retrained_aucs: dict | None = None, where: tuple[str, str] = ("the forget set", "the holdout set")) -> dict:
    """Every attack of `options.attacks` on a loaded model; `reference` (model, tokenizer) for the reference
    attack; `retrained_aucs` {attack: AUC} of a retrained model."""
    from .importance.estimators import fisher_blocker

    attacks = parse_attacks(options.attacks, reference is not None, fisher_blocker(model) is None)
    if "reference" in attacks and reference is None:
        raise PertaError("the reference attack needs a reference model (--reference: θ_0, the model before "
                         "fine-tuning); or leave it out of --attacks")
    score = dict(max_length=options.max_length, batch_size=options.batch_size, bf16_autocast=options.bf16_autocast)
    tokens = None  # every attack but gradnorm reads the token scores
    if any(a != "gradnorm" for a in attacks):
        tokens = {"forget": row_tokens(model, tokenizer, forget, where=where[0], **score),
                  "holdout": row_tokens(model, tokenizer, holdout, where=where[1], **score)}
    ref_tokens = None
    if "reference" in attacks:
        ref_tokens = {name: row_tokens(*reference, rows, where=f"{w} (reference)", **score)
                      for (name, rows), w in zip((("forget", forget), ("holdout", holdout)), where)}
    results = {}
    for attack in attacks:
        if attack == "gradnorm":
            scores = {name: gradnorm_scores(model, tokenizer, rows, options.max_length, options.batch_size, w)
                      for (name, rows), w in zip((("forget", forget), ("holdout", holdout)), where)}
        else:
            scores = {name: attack_scores(tokens[name], attack, options.k, ref_tokens and ref_tokens[name])
                      for name in ("forget", "holdout")}
        results[attack] = attack_result(scores["forget"], scores["holdout"], options.bootstrap,
                                        (retrained_aucs or {}).get(attack))
    return {"attacks": results, "verdict": overall([r["verdict"] for r in results.values()]), "rule": VERDICT_RULE,
            "rows": {"forget": len(forget), "holdout": len(holdout)},
            "format": {"forget": row_format(forget), "holdout": row_format(holdout)},
            "options": asdict(options)}


def retrained_aucs(source, forget: list, holdout: list, options: AuditOptions, reference=None) -> dict:
    """{attack: AUC} of the retrained model: its folder (audited here on the same rows) or its audit .json."""
    source = Path(source)
    if source.is_dir():
        model, tok = load_model(source, options.device, options.dtype)
        return {a: r["auc"] for a, r in audit(model, tok, forget, holdout, options, reference)["attacks"].items()}
    from .io import read_json

    content = read_json(source)
    aucs = {a: r.get("auc") for a, r in (content.get("attacks") or {}).items() if isinstance(r, dict)}
    if not any(isinstance(v, (int, float)) for v in aucs.values()):
        raise PertaError(f"{source}: holds no attack AUCs (attacks.<name>.auc of a perta-fast audit .json)")
    return {a: float(v) for a, v in aucs.items() if isinstance(v, (int, float))}


def format_audit(result: dict) -> str:
    head = f"{'attack':<10} {'AUC':>6} {'95 % interval':>15} {'TPR@1%FPR':>10} {'TPR@5%FPR':>10} {'PrivLeak':>9}  verdict"
    lines = [f"membership audit: {result['rows']['forget']} forget rows against {result['rows']['holdout']} holdout "
             "rows (AUC 0.5: indistinguishable, 1: every forget row looks seen)", head]
    for name, r in result["attacks"].items():
        leak = r.get("privleak")
        lines.append(f"{name:<10} {r['auc']:6.3f} {r['interval'][0]:7.3f}–{r['interval'][1]:<7.3f} "
                     f"{r['tpr_at_1pct_fpr']:10.3f} {r['tpr_at_5pct_fpr']:10.3f} "
                     f"{'-' if leak is None else f'{leak:.1f}':>9}  {r['verdict']} (vs {r['compared_with']})")
    lines.append(f"verdict: {result['verdict']}: {PLAIN[result['verdict']]}")
    lines.append(f"rule: {result['rule']}")
    return "\n".join(lines)


PLAIN = {"remembered": "an attacker can still tell the forget rows from unseen ones; the data is not forgotten",
         "indistinguishable": "no attack tells the forget rows from unseen ones better than the reference does",
         "over-unlearned": "the forget rows now look less familiar than unseen ones, which gives them away too"}


def plot_roc(result: dict, path: Path) -> bool:
    """Each attack's ROC curve (forget rows as the members) against the diagonal."""
    plt = pyplot()
    if plt is None:
        return False
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, r in result["attacks"].items():
        f, h = r["scores"]["forget"], r["scores"]["holdout"]
        fprs, tprs, _ = roc_curve([1] * len(f) + [0] * len(h), [-s for s in f + h])
        ax.plot(fprs, tprs, label=f"{name} (AUC {r['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    ax.set(xlabel="false positive rate (holdout rows flagged)", ylabel="true positive rate (forget rows flagged)",
           title=f"membership audit: {result['verdict']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return True


def audit_files(model_dir, forget, holdout, options: AuditOptions, reference_dir=None, retrained=None,
                out=None, overwrite: bool = False) -> dict:
    """`perta-fast audit`: rows loaded by the caller (any data format); writes `out` (.json), a markdown table
    (.md) and the ROC plot (.png) beside it, each atomically."""
    inputs = tuple(p for p in (model_dir, reference_dir, retrained) if p)
    if out is not None:
        out = Path(out)
        for path in (out, out.with_suffix(".md"), out.with_suffix(".png")):
            check_output_path(path, overwrite, inputs)
    parse_attacks(options.attacks)
    if math.isnan(options.k) or not 0 < options.k <= 1:
        raise PertaError(f"--k must be in (0, 1], got {options.k}")
    where = (source_of(forget, "the forget set"), source_of(holdout, "the holdout set"))
    reference = load_model(reference_dir, options.device, options.dtype) if reference_dir else None
    aucs = retrained_aucs(retrained, forget, holdout, options, reference) if retrained else None
    model, tok = load_model(model_dir, options.device, options.dtype)
    result = {"model": Path(model_dir).name, **audit(model, tok, forget, holdout, options, reference, aucs, where)}
    if reference_dir:
        result["reference_model"] = Path(reference_dir).name
    if retrained:
        result["retrained_model"] = Path(retrained).name
    if out is not None:
        with atomic_file(out, overwrite, inputs) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
        with atomic_file(out.with_suffix(".md"), overwrite, inputs) as tmp:
            tmp.write_text(format_audit(result) + "\n")
        if pyplot() is not None:
            with atomic_file(out.with_suffix(".png"), overwrite, inputs) as tmp:
                plot_roc(result, tmp)
    return result


def audit_models(models: dict, forget: list, holdout: list, options: AuditOptions,
                 where: tuple[str, str] = ("the forget set", "the holdout set"), retrained=None) -> dict:
    """{label: audit without the per-row scores} of each model folder, loaded one at a time (unlearn's
    before → after); `retrained` (a retrained model's folder or audit .json) sets the level each AUC is judged
    against."""
    aucs = retrained_aucs(retrained, forget, holdout, options) if retrained else None
    out = {}
    for label, folder in models.items():
        model, tok = load_model(folder, options.device, options.dtype)
        result = audit(model, tok, forget, holdout, options, retrained_aucs=aucs, where=where)
        for r in result["attacks"].values():
            del r["scores"]
        out[label] = result
        del model
    return out
