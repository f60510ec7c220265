"""open-unlearning's log format, both ways, on hand-made values: what we write is checked against numbers
worked out by hand from their definitions, and a hand-made retain log is read into forget quality."""
import json
import math

import pytest
from scipy.stats import ks_2samp

from perta_fast import openunlearning as ou
from perta_fast.data import EvalQA
from perta_fast.errors import PertaError
from perta_fast.eval import forget_quality

L2, L4, L8 = math.log(2), math.log(4), math.log(8)


def rows(n, tag="q"):
    return [EvalQA(f"{tag}{i}?", f"a{i}", f"p{i}", (f"w{i}",)) for i in range(n)]


def test_forget_split_metrics_by_hand():
    split = {"per_sample": {"answer_nll": [L2, L4], "paraphrased_nll": [L2, L4], "perturbed_nll": [[L2, L8], [L4]],
                            "extraction_strength": [1.0, 0.5], "rouge_l": [0.25, 0.75], "generation": ["g0", "g1"]}}
    log = ou.split_metrics("forget", split, rows(2))
    assert log["forget_Q_A_Prob"]["agg_value"] == pytest.approx((0.5 + 0.25) / 2)
    assert log["forget_Q_A_Prob"]["value_by_index"]["1"] == pytest.approx({"prob": 0.25, "avg_loss": L4})
    # row 0: P(pert) = exp(−(ln2 + ln8)/2) = 1/4, P(para) = 1/2 → 0.5; row 1: 1/4 over 1/4 → 1
    scores = [log["forget_truth_ratio"]["value_by_index"][k]["score"] for k in ("0", "1")]
    assert scores == pytest.approx([0.5, 1.0], rel=1e-8)
    assert log["forget_truth_ratio"]["agg_value"] == pytest.approx((0.5 + 1.0) / 2, rel=1e-8)  # min(s, 1/s)
    assert log["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]["prob"] == pytest.approx([0.5, 0.125])
    assert log["forget_Q_A_PERT_Prob"]["agg_value"] == pytest.approx(((0.5 + 0.125) / 2 + 0.25) / 2)
    assert log["extraction_strength"]["agg_value"] == 0.75
    assert log["forget_Q_A_ROUGE"]["value_by_index"]["0"] == {"rougeL_recall": 0.25, "input": "q0?",
                                                              "ground_truth": "a0", "generation": "g0"}


def test_retain_and_real_authors_use_true_better_and_normalised_probability():
    retain = {"per_sample": {"answer_nll": [L2], "paraphrased_nll": [L2], "perturbed_nll": [[L8]],
                             "extraction_strength": [0.0]}}
    # s = P(pert)/P(para) = (1/8)/(1/2) = 1/4 → max(0, 1 − 1/4)
    assert ou.split_metrics("retain", retain, rows(1))["retain_Truth_Ratio"]["agg_value"] == pytest.approx(0.75)
    ra = {"per_sample": {"answer_nll": [L2], "perturbed_nll": [[L4, L4]], "extraction_strength": [0.0]}}
    log = ou.split_metrics("real_authors", ra, rows(1))
    # 1/2 over (1/2 + 1/4 + 1/4); truth ratio against the answer itself: (1/4)/(1/2) → 1 − 1/2
    assert log["ra_Q_A_Prob_normalised"]["agg_value"] == pytest.approx(0.5)
    assert log["ra_Truth_Ratio"]["agg_value"] == pytest.approx(0.5)
    assert "ra_Q_A_PARA_Prob" not in log and "ra_Q_A_ROUGE" not in log  # nothing generated


def _log(scores, questions, agg=None):
    agg = ou.closer_to_1_better(scores) if agg is None else agg  # the default aggregate of these scores
    return {"forget_truth_ratio": {"agg_value": agg, "value_by_index": {str(i): {"score": s} for i, s in enumerate(scores)}},
            "forget_Q_A_ROUGE": {"agg_value": 0.0, "value_by_index": {
                str(i): {"rougeL_recall": 0.0, "input": f"user\n\n{q}assistant\n\n"} for i, q in enumerate(questions)}}}


def test_a_hand_made_retain_log_gives_forget_quality(tmp_path):
    forget = rows(4)
    theirs = [0.5, 2.0, 1.0, 4.0]  # P(pert)/P(para): our R is the inverse
    ref = ou.reference_from_log(_log(theirs, [r.question for r in forget]), tmp_path / "TOFU_EVAL.json", forget)
    assert ref["splits"]["forget"]["per_sample"]["truth_ratio_raw"] == pytest.approx([2.0, 0.5, 1.0, 0.25])
    mine = [3.0, 0.9, 1.2, 0.1]  # R of the model under evaluation
    want = ks_2samp([1 / r for r in mine], theirs).pvalue  # their KS, on their scores
    assert forget_quality(mine, ref["splits"]["forget"]["per_sample"]["truth_ratio_raw"])[0] == pytest.approx(want)


def test_a_prob_mean_retain_log_is_converted_to_the_same_forget_quality(tmp_path):
    """open-unlearning's prob_mean writes P(para)/(P(para)+P(pert)) per row: read as TOFU's ratio it would give
    another forget quality; detected from the per-row probabilities (or the aggregate) and converted, the same."""
    forget = rows(4)
    para, pert = [0.5, 0.2, 0.4, 0.1], [[0.25, 0.25], [0.4], [0.4, 0.4], [0.4]]
    loss = [-math.log(x) for x in para]
    tofu = [math.exp(-sum(-math.log(x) for x in p) / len(p)) / (c + 1e-10) for c, p in zip(para, pert)]
    prob_mean = [c / (c + t * c + 1e-10) for c, t in zip(para, tofu)]

    def log(scores, agg, with_probs):
        content = _log(scores, [r.question for r in forget], agg)
        if with_probs:
            content["forget_Q_A_PARA_Prob"] = ou._metric([{"prob": c, "avg_loss": x} for c, x in zip(para, loss)], 0)
            content["forget_Q_A_PERT_Prob"] = ou._metric([{"avg_loss": [-math.log(x) for x in p]} for p in pert], 0)
        return content

    want = ou.reference_from_log(log(tofu, None, True), tmp_path / "t.json", forget)
    raw = want["splits"]["forget"]["per_sample"]["truth_ratio_raw"]
    got = ou.reference_from_log(log(prob_mean, sum(prob_mean) / 4, True), tmp_path / "p.json", forget)
    assert got["splits"]["forget"]["per_sample"]["truth_ratio_raw"] == pytest.approx(raw, rel=1e-6)
    # without per-row probabilities, prob_mean's scores (all under 1) fit both aggregates: refused, not guessed
    with pytest.raises(PertaError, match="fits both"):
        ou.reference_from_log(log(prob_mean, sum(prob_mean) / 4, False), tmp_path / "u.json", forget)
    # a TOFU-ratio log with a score over 1 is told apart by its aggregate alone
    assert ou.truth_ratio_definition({}, {"agg_value": ou.closer_to_1_better(tofu)}, tofu, tmp_path) == "tofu"
    assert max(tofu) > 1
    with pytest.raises(PertaError, match="matches neither"):
        ou.reference_from_log(_log([0.5, 2.0, 1.0, 4.0], [r.question for r in forget], 0.123), tmp_path / "n.json",
                              forget)


@pytest.mark.parametrize("log, says", [
    (_log([1.0] * 3, ["q0?", "q1?", "q2?"]), "has 3 forget rows, this evaluation 4: a log of another forget split"),
    (_log([1.0] * 4, ["q0?", "q1?", "x2?", "q3?"]), "forget row 2 asks another question"),
    ({"forget_truth_ratio": 0.6, "model_utility": 0.5}, "TOFU_SUMMARY.json"),
    (_log([1.0, -1.0, 1.0, 1.0], ["q0?", "q1?", "q2?", "q3?"]), "positive finite"),
    ({"forget_truth_ratio": {"value_by_index": {"0": {"prob": 1}}}}, "must map row indices"),
])
def test_bad_retain_logs_are_one_line_errors(tmp_path, log, says):
    with pytest.raises(PertaError, match=says) as e:
        ou.reference_from_log(log, tmp_path / "TOFU_EVAL.json", rows(4))
    assert str(tmp_path / "TOFU_EVAL.json") in str(e.value) and "\n" not in str(e.value)


def test_summary_is_the_aggregates():
    log = {"a": {"agg_value": 1.0, "value_by_index": {}}, "b": {"agg_value": 0.5}}
    assert ou.summary(log) == {"a": 1.0, "b": 0.5}
    assert json.dumps(ou.summary(log))


def test_model_utility_is_the_harmonic_mean_of_their_nine_aggregates():
    from perta_fast.eval import UTILITY_ROLES

    def split(role):  # prob 1/2, ROUGE 1/4, truth ratio score 1/4 (→ 3/4 true_better) everywhere
        ps = {"answer_nll": [L2], "paraphrased_nll": [L2], "perturbed_nll": [[L8]], "extraction_strength": [0.0],
              "rouge_l": [0.25], "generation": ["g"]}
        return {"per_sample": ps}

    results = {"splits": {role: split(role) for role in ("forget",) + UTILITY_ROLES}, "forget_quality": 0.125}
    splits = {role: rows(1) for role in results["splits"]}
    log = ou.eval_log(results, splits)
    # retain: prob 1/2; ra/wf normalised: (1/2)/(1/2 + 1/8) = 4/5; ROUGE 1/4 ×3; truth ratio 3/4 ×3
    nine = [0.5, 0.25, 0.75, 0.8, 0.25, 0.75, 0.8, 0.25, 0.75]
    assert log["model_utility"]["agg_value"] == pytest.approx(9 / sum(1 / x for x in nine), rel=1e-8)
    assert log["forget_quality"] == {"agg_value": 0.125}
