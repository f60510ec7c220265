"""TOFU metrics against values worked out by hand (fixed losses) and against independent computations on
a tiny model (a per-sequence log-softmax loop); the scoring engine itself: tests/test_scoring.py."""
import json
import math
from dataclasses import replace

import pytest
import torch

from perta_fast import eval as ev
from perta_fast.cli import main
from perta_fast.data import load_qa
from perta_fast.errors import PertaError
from perta_fast.models import load_model

from helpers import nll_by_hand


def test_truth_ratio_and_normalised_probability_by_hand():
    ratios = ev.truth_ratios([1.0, 2.0], [[2.0, 3.0], [1.0]])
    assert ratios == pytest.approx([math.exp(1.5), math.exp(-1.0)])
    # forget: mean of min(R, 1/R); elsewhere: mean of max(0, 1 − 1/R)
    assert ev.truth_ratio_score(ratios, forget=True) == pytest.approx((math.exp(-1.5) + math.exp(-1.0)) / 2)
    assert ev.truth_ratio_score(ratios, forget=False) == pytest.approx((1 - math.exp(-1.5) + 0.0) / 2)
    # P = 1, perturbed 1/2 and 1/4 → 1 / 1.75
    assert ev.normalised_probability(0.0, [math.log(2), math.log(4)]) == pytest.approx(1 / 1.75)


def test_rouge_l_recall_by_hand():
    # LCS of "the cat on a mat" with "the cat sat on the mat" is "the cat on mat": 4 of 6 reference words
    assert ev.rouge_l_recall("the cat on a mat", "the cat sat on the mat") == pytest.approx(4 / 6)
    assert ev.rouge_l_recall("Cats running.", "cat runs") == pytest.approx(1.0)  # stemmed, case and punctuation
    assert ev.rouge_l_recall("", "cat runs") == 0.0


def test_forget_quality_is_the_ks_p_value():
    # fully separated samples of 3: D = 1, exact p = 2 / C(6, 3) = 0.1
    assert ev.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx((0.1, 1.0))
    assert ev.forget_quality([1, 2, 3], [1, 2, 3])[0] == pytest.approx(1.0)


def test_model_utility_is_the_harmonic_mean_of_nine_scores():
    scores = {"prob": 1.0, "rouge_l": 1.0, "truth_ratio": 1.0}
    results = {"splits": {r: dict(scores) for r in ev.UTILITY_ROLES}}
    results["splits"]["world_facts"]["truth_ratio"] = 0.5
    assert ev.model_utility(results) == pytest.approx(9 / (8 + 2))
    results["splits"]["retain"]["prob"] = 0.0
    assert ev.model_utility(results) == 0.0
    del results["splits"]["retain"]["rouge_l"]
    assert ev.model_utility(results) is None


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tok = load_model(tiny_dir, "cpu")
    return model, tok


def test_evaluate_split_puts_the_pieces_together(tiny, eval_rows):
    model, tok = tiny
    rows = eval_rows[:4]
    forget = ev.evaluate_split(model, tok, rows, "forget", ev.EvalOptions(max_new_tokens=8))
    real = ev.evaluate_split(model, tok, rows, "real_authors", ev.EvalOptions(generate=False))
    by_hand = [[nll_by_hand(model, tok, r.question, a) for a in (r.answer, r.paraphrased_answer, *r.perturbed_answers)]
               for r in rows]
    probs = [math.exp(-h[0]) for h in by_hand]
    ratios = [math.exp(sum(h[2:]) / 3 - h[1]) for h in by_hand]
    assert forget["per_sample"]["prob"] == pytest.approx(probs, rel=1e-5)
    assert forget["prob"] == pytest.approx(sum(probs) / 4, rel=1e-5)
    assert forget["per_sample"]["truth_ratio_raw"] == pytest.approx(ratios, rel=1e-4)
    assert forget["truth_ratio"] == pytest.approx(sum(min(x, 1 / x) for x in ratios) / 4, rel=1e-4)
    assert len(forget["per_sample"]["generation"]) == 4 and 0 <= forget["rouge_l"] <= 1
    norm = [math.exp(-h[0]) / (math.exp(-h[0]) + sum(math.exp(-x) for x in h[2:])) for h in by_hand]
    assert real["prob"] == pytest.approx(sum(norm) / 4, rel=1e-5)
    # 1 − 1/R cancels for R near 1: the tolerance is absolute (NLLs agree to ~1e-6)
    assert real["truth_ratio"] == pytest.approx(sum(max(0, 1 - 1 / x) for x in ratios) / 4, abs=1e-5)
    assert "rouge_l" not in real


@pytest.fixture(scope="module")
def tofu_like(tmp_path_factory, eval_rows):
    """A TOFU-format folder of the project's own fictitious rows (no TOFU text)."""
    folder = tmp_path_factory.mktemp("tofu_like")

    def dump(name, rows, paraphrase=True):
        objs = [{"question": r.question, "answer": r.answer, "perturbed_answer": list(r.perturbed_answers),
                 **({"paraphrased_answer": r.paraphrased_answer} if paraphrase else {})} for r in rows]
        (folder / f"{name}.json").write_text(json.dumps(objs))

    dump("forget01_perturbed", eval_rows[:6])
    dump("retain_perturbed", eval_rows[8:16])
    dump("real_authors_perturbed", eval_rows[16:22], paraphrase=False)
    dump("world_facts_perturbed", eval_rows[22:28], paraphrase=False)
    return folder


def test_cli_eval_writes_results_and_forget_quality(tmp_path, tiny_dir, tofu_like, capsys):
    common = ["--tofu", str(tofu_like), "--max-new-tokens", "6"]
    ref = tmp_path / "retain.json"
    assert main(["eval", "--model", str(tiny_dir), *common, "--out", str(ref)]) == 0
    saved = json.loads(ref.read_text())
    assert set(saved["splits"]) == set(ev.ROLES) and saved["model_utility"] is not None
    assert (tmp_path / "retain.md").read_text().startswith("| model | forget quality")
    # the same model against itself: identical truth ratios, KS p-value 1, from the folder or the file
    for reference in (str(tiny_dir), str(ref)):
        out = tmp_path / f"self-{len(reference)}.json"
        assert main(["eval", "--model", str(tiny_dir), *common, "--retain-model", reference, "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["forget_quality"] == pytest.approx(1.0) and res["ks_statistic"] == 0.0
    capsys.readouterr()
    assert main(["eval", "--compare", str(ref), str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and table[2].startswith("| retain |") and table[3].split("|")[2].strip() == "1"


def test_open_unlearning_logs_round_trip(tmp_path, tiny_dir, tofu_like, capsys):
    """Written in their schema from the same run's per-sample values, read back as a retain log."""
    from scipy.stats import hmean

    common = ["--tofu", str(tofu_like), "--max-new-tokens", "6"]
    (tmp_path / "a").mkdir()
    ours = tmp_path / "a" / "retain.json"
    assert main(["eval", "--model", str(tiny_dir), *common, "--out", str(ours), "--format", "open-unlearning"]) == 0
    res = json.loads(ours.read_text())
    log = json.loads((tmp_path / "a" / "TOFU_EVAL.json").read_text())
    summary = json.loads((tmp_path / "a" / "TOFU_SUMMARY.json").read_text())
    assert summary == {k: v["agg_value"] for k, v in log.items()}
    ratios = res["splits"]["forget"]["per_sample"]["truth_ratio_raw"]
    scores = [log["forget_truth_ratio"]["value_by_index"][str(i)]["score"] for i in range(len(ratios))]
    assert scores == pytest.approx([1 / r for r in ratios], rel=1e-6)  # their + 1e-10
    assert log["forget_truth_ratio"]["agg_value"] == pytest.approx(res["splits"]["forget"]["truth_ratio"], rel=1e-6)
    for ours_key, role, name in (("prob", "forget", "forget_Q_A_Prob"), ("rouge_l", "retain", "retain_Q_A_ROUGE"),
                                 ("prob", "real_authors", "ra_Q_A_Prob_normalised"),
                                 ("truth_ratio", "world_facts", "wf_Truth_Ratio"),
                                 ("extraction_strength", "forget", "extraction_strength")):
        # their + 1e-10 in a ratio's denominator moves it by 1e-10 / P(correct): ~4e-8 here
        assert log[name]["agg_value"] == pytest.approx(res["splits"][role][ours_key], rel=1e-6, abs=1e-6), name
    nine = [log[k]["agg_value"] for k in ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
                                          "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
                                          "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")]
    assert log["model_utility"]["agg_value"] == pytest.approx(hmean(nine))
    assert log["model_utility"]["agg_value"] == pytest.approx(res["model_utility"], rel=1e-6)
    # their log as the retain model: the same model against itself has KS p = 1, as with our own results file
    out = tmp_path / "self.json"
    assert main(["eval", "--model", str(tiny_dir), *common, "--no-generate", "--retain-model",
                 str(tmp_path / "a" / "TOFU_EVAL.json"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["forget_quality"] == pytest.approx(1.0)
    # a log of other forget rows is refused in one line, before any output
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_dir), *common, "--no-generate", "--max-rows", "3", "--retain-model",
                 str(tmp_path / "a" / "TOFU_EVAL.json"), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another forget split" in err[0] and not (tmp_path / "x.json").exists()
    assert main(["eval", "--model", str(tiny_dir), *common, "--format", "open-unlearning"]) == 2


def test_eval_refuses_a_reference_on_other_rows(tmp_path, tiny_dir, tofu_like, capsys):
    ref = tmp_path / "ref.json"
    assert main(["eval", "--model", str(tiny_dir), "--tofu", str(tofu_like), "--no-generate", "--max-rows", "3",
                 "--out", str(ref)]) == 0
    capsys.readouterr()
    out = tmp_path / "x.json"
    assert main(["eval", "--model", str(tiny_dir), "--tofu", str(tofu_like), "--no-generate",
                 "--retain-model", str(ref), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(ref) in err and "other forget rows" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not out.with_suffix(".md").exists()


@pytest.mark.parametrize("bad, message", [
    ([{"question": "q", "answer": "a"}], "'perturbed_answer' must be a non-empty list"),
    ([{"question": "q", "answer": "a", "perturbed_answer": []}], "'perturbed_answer' must be a non-empty list"),
    ([{"question": "q", "answer": "a", "perturbed_answer": ["b"], "paraphrased_answer": 3}], "'paraphrased_answer'"),
    ([{"question": "q", "perturbed_answer": ["b"]}], "missing 'answer'"),
])
def test_bad_eval_rows_are_named(tmp_path, bad, message):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(PertaError, match=message) as e:
        load_qa(path, eval_rows=True)
    assert str(path) in str(e.value)


def test_bad_results_file_for_compare(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"not": "results"}))
    assert main(["eval", "--compare", str(path)]) == 2
    assert f"{path}: not a perta-fast TOFU eval results file" in capsys.readouterr().err
    # a log of the TOFU repository's own evaluation is named as what it is
    path.write_text(json.dumps({"avg_gt_loss": {"0": 1.0}, "avg_paraphrased_loss": {"0": 1.2}}))
    assert main(["eval", "--compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert "TOFU repository's own eval_log" in err and len(err.strip().splitlines()) == 1


TOFU = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


@pytest.mark.skipif(not (TOFU / "forget01_perturbed.json").is_file(), reason="TOFU data not at ../shared/data/tofu")
def test_tofu_eval_splits_load():
    splits = ev.tofu_splits(TOFU, "forget01")
    assert {r: len(v) for r, v in splits.items()} == {"forget": 40, "retain": 400, "real_authors": 100, "world_facts": 117}
    assert all(len(r.perturbed_answers) == 5 and r.paraphrased_answer != r.answer for r in splits["forget"])
    assert all(r.paraphrased_answer == r.answer for r in splits["world_facts"])
    assert [r.question for r in splits["forget"]] == [r.question for r in load_qa(f"{TOFU}:forget01")]


def _tofu_benchmark():
    from helpers import load_benchmark

    return load_benchmark("tofu.py", "tofu_bench")


def _tofu_parts():
    """The protocol's steps and report modules, which benchmarks/tofu.py imports from beside it."""
    import sys

    _tofu_benchmark()
    return sys.modules["tofu_steps"], sys.modules["tofu_report"]


def test_tofu_benchmark_matches_forget_quality_at_the_level_every_method_reaches():
    steps, report = _tofu_parts()

    # forget quality as a known function of λ: TV rises as λ²/40 to its peak 0.1 at λ 2 and then falls
    # (over-forgetting); PerTA rises as λ²/100 (crossing 0.1 at λ √10) up to 0.64 at λ 8
    def tv(lam):
        return lam ** 2 / 40 if lam <= 2 else 0.1 * 2 / lam ** 2

    def perta(lam):
        return lam ** 2 / 100

    scored = []

    def scorer(f):
        def score(lam):
            scored.append(lam)
            return {"lam": lam, "forget_quality": f(lam)}
        return score

    grid = (1.0, 2.0, 4.0, 8.0)
    curves = {name: [scorer(f)(lam) for lam in grid] for name, f in (("TV", tv), ("PerTA", perta))}
    target = steps.quality_target(curves)
    assert target == 0.1
    scored.clear()
    found = steps.first_reaching(curves["PerTA"], target, scorer(perta), steps=2)
    # two bisections in log λ between 2 and 4: the λ found reaches the level by measurement, and lies
    # within one quarter-octave above the true crossing
    assert len(scored) == 2 and found["lam"] in scored
    assert found["forget_quality"] >= target
    assert math.sqrt(10) <= found["lam"] <= math.sqrt(10) * 2 ** 0.25
    scored.clear()  # the default, four: within a sixteenth of an octave
    found = steps.first_reaching(curves["PerTA"], target, scorer(perta))
    assert len(scored) == 4 and found["forget_quality"] >= target
    assert math.sqrt(10) <= found["lam"] <= math.sqrt(10) * 2 ** (1 / 16)
    deep = steps.first_reaching(curves["PerTA"], target, scorer(perta), steps=12)
    assert deep["lam"] == pytest.approx(math.sqrt(10), rel=1e-3)
    # TV's level is its own peak: bisecting below it finds nothing smaller, not the fall after it
    assert steps.first_reaching(curves["TV"], target, scorer(tv))["lam"] == 2.0
    assert steps.first_reaching(curves["TV"], 0.2, scorer(tv)) is None
    # forget quality in KS steps (a p-value takes few values): a grid point at the level itself is not where
    # the search stops, as a smaller λ may be at the same step
    def steps_of(lam):
        return min(int(lam) / 10, 0.5)

    scored.clear()
    found = steps.first_reaching([{"lam": 1.0, "forget_quality": 0.1}, {"lam": 4.0, "forget_quality": 0.2}], 0.2,
                                 scorer(steps_of))
    assert len(scored) == 4 and found == {"lam": 2.0, "forget_quality": 0.2}
    scored.clear()  # the first grid point already reaches it: nothing below it to bisect against
    assert steps.first_reaching(curves["PerTA"], 0.001, scorer(perta))["lam"] == 1.0 and not scored


def test_tofu_benchmark_quality_sweep_starts_at_the_calibrated_lambda():
    steps, report = _tofu_parts()
    assert steps.from_calibrated((0.5, 1.0, 2.0, 4.0), 1.12) == [1.0, 2.0, 4.0]
    assert steps.from_calibrated((0.5, 1.0, 2.0, 4.0), 2.0) == [2.0, 4.0]
    assert steps.from_calibrated((0.5, 1.0, 2.0, 4.0), 0.1) == [0.5, 1.0, 2.0, 4.0]


def test_tofu_benchmark_quality_scan_starts_an_octave_below_matched_forgetting_and_holds_the_rise():
    steps, report = _tofu_parts()
    grid = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)

    def scan(fq, calibrated, matched):
        scored = []

        def score(lam):
            scored.append(lam)
            return {"lam": lam, "forget_quality": fq(lam)}
        return [p["lam"] for p in steps.quality_scan(grid, calibrated, matched, score)], scored

    def peaked(at):  # at its floor up to at/4, rising to a peak at `at`, falling after it
        return lambda lam: 0.0 if lam <= at / 4 else 1.0 / (1.0 + abs(math.log2(lam / at)))

    # the peak near matched forgetting (λ 12): the scan starts at 4 (≤ 12/2), which is at the floor
    lams, scored = scan(peaked(16.0), 1.1, 12.0)
    assert lams == [4.0, 8.0, 16.0, 32.0] and sorted(scored) == lams
    # a peak far below matched forgetting: the scan walks down until its lowest point is the floor,
    # and never below the calibrated λ's grid point
    lams, _ = scan(peaked(2.0), 0.6, 20.0)
    assert lams == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    lams, _ = scan(peaked(2.0), 1.1, 20.0)
    assert lams[0] == 1.0 and 2.0 in lams
    # the grid never reaches matched forgetting: everything from the calibrated λ
    assert scan(peaked(16.0), 1.1, None)[0] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


@pytest.mark.skipif(not (TOFU / "full.json").is_file(), reason="TOFU data not at ../shared/data/tofu")
def test_tofu_benchmark_cpu_sets_keep_importance_and_evaluation_rows_apart():
    steps, report = _tofu_parts()
    bench = _tofu_benchmark()
    size = bench.SIZES["cpu"]
    sets = steps.build_sets(TOFU, size, "forget01")
    full = load_qa(f"{TOFU}:full")
    assert sets["forget"] == full[-80:]  # the last 4 authors
    assert load_qa(f"{TOFU}:forget01") == sets["forget"][-40:]
    forget_q = {r.question for r in sets["forget"]}
    assert [r.question for r in sets["splits"]["forget"]] == [r.question for r in sets["forget"]]
    trained = {r.question for r in sets["train_retain"]}
    scored = {r.question for r in sets["importance_retain"]}
    evaluated = {r.question for r in sets["splits"]["retain"]}
    assert scored <= trained and evaluated <= trained and not scored & evaluated and not trained & forget_q
    assert {r: len(v) for r, v in sets["splits"].items()} == {"forget": 80, "retain": 40, "real_authors": 30,
                                                             "world_facts": 30}
    # each seed holds back another 20 % of the forget set and of D_r
    kept, held = steps.seeded_hold_out(sets["forget"], 0)
    kept1, held1 = steps.seeded_hold_out(sets["forget"], 1)
    assert len(held) == 16 and sorted(map(id, kept + held)) == sorted(map(id, sets["forget"])) and held != held1
    # the full size (GPU): the standard split; D_r = the retain authors outside retain_perturbed's 0-19
    sets = steps.build_sets(TOFU, bench.SIZES["full"], "forget05")
    assert sets["forget"] == full[-200:] and sets["train_retain"] == full[:-200]
    evaluated = {r.question for r in sets["splits"]["retain"]}
    assert sets["importance_retain"] == [r for r in full[400:-200] if r.question not in evaluated]
    assert len(sets["splits"]["retain"]) == 400 and len(sets["importance_retain"]) == 3400 - 1
    assert not {r.question for r in sets["importance_retain"]} & {r.question for r in sets["splits"]["retain"]}


def test_tofu_benchmark_gains_over_tv_are_paired_within_a_seed():
    steps, report = _tofu_parts()

    def row(mu, retain):
        return {"at_quality": {"model_utility": mu, "retain prob": retain}}

    # TV's utility moves a lot between seeds, PerTA's gain over it is constant: paired, the gain's sd is 0
    summary = {"seeds": {"0": {"methods": {"TV": row(0.10, 0.2), "PerTA": row(0.15, 0.3)}},
                         "1": {"methods": {"TV": row(0.30, 0.4), "PerTA": row(0.35, 0.4)}},
                         "2": {"methods": {"TV": row(0.20, 0.1), "PerTA": {}}}}}  # PerTA not done: left out
    gains = report.gains_over_tv(summary, "at_quality")
    assert set(gains) == {"PerTA"}
    assert gains["PerTA"]["model_utility"]["mean"] == pytest.approx(0.05)
    assert gains["PerTA"]["model_utility"]["sd"] == pytest.approx(0.0, abs=1e-12)
    assert gains["PerTA"]["model_utility"]["n"] == 2
    assert gains["PerTA"]["retain prob"]["mean"] == pytest.approx(0.05)
    assert gains["PerTA"]["retain prob"]["sd"] == pytest.approx(math.sqrt(0.005))  # 0.1 and 0.0
    assert "forget prob" not in gains["PerTA"]


def test_bf16_autocast_scores_with_bf16_matmuls(tiny, eval_rows):
    """--bf16-autocast: each answer's NLL is the unpadded sequence's under the same autocast (the token-tree
    scorer adds only bf16 rounding in another order), and it is not fp32's (the option took effect)."""
    model, tok = tiny
    rows = eval_rows[:6]
    opts = ev.EvalOptions(generate=False, bf16_autocast=True)
    got = ev.evaluate_split(model, tok, rows, "forget", opts)["per_sample"]
    fp32 = ev.evaluate_split(model, tok, rows, "forget", replace(opts, bf16_autocast=False))["per_sample"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        by_hand = [nll_by_hand(model, tok, r.question, r.answer) for r in rows]
    # both paths round the same inputs to bf16 and differ in fp32 accumulation order only (1.3e-5 measured):
    # a quarter of one bf16 step (2^-8) is room enough; fp32's own paths agree to ~1e-6, autocast's differ more
    assert got["answer_nll"] == pytest.approx(by_hand, rel=1e-3)
    assert max(abs(a - b) for a, b in zip(got["answer_nll"], fp32["answer_nll"])) > 2e-5


def test_tofu_benchmark_refuses_bf16_scoring_without_native_bf16(tmp_path, monkeypatch, capsys):
    bench = _tofu_benchmark()
    (tmp_path / "full.json").write_text("[]")  # past the data check, before anything is loaded
    monkeypatch.setattr(bench, "native_bf16", lambda device: False)
    assert bench.main(["--scoring", "bf16", "--tofu", str(tmp_path), "--work", str(tmp_path / "work")]) == 2
    assert "--scoring bf16 needs native bf16" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("native", [True, False])
def test_tofu_benchmark_default_run_is_the_affordable_protocol(tmp_path, monkeypatch, native):
    bench = _tofu_benchmark()
    (tmp_path / "full.json").write_text("[]")
    calls = []

    class Recorder:  # the protocol's stages, in the order main() asks for them
        def __init__(self, a, size, recipe, base, work, sets, stem):
            calls.append(("scoring in bf16", a.bf16_scoring, "training in bf16", recipe["full"]["bf16_autocast"]))
            self.a, self.stem, self.summary, self.t0 = a, stem, {}, 0.0

        stages = bench.Protocol.stages  # which stages a seed runs: --match decides

        def __getattr__(self, stage):
            return lambda *args: calls.append((stage, *args))

    monkeypatch.setattr(bench, "native_bf16", lambda device: native)
    monkeypatch.setattr(bench, "Protocol", Recorder)
    monkeypatch.setattr(bench, "build_sets", lambda *args: {})
    monkeypatch.setattr(bench, "markdown", lambda summary: "")
    common = ["--tofu", str(tmp_path), "--model", str(tmp_path), "--work", str(tmp_path / "work")]
    assert bench.main(common) == 0
    assert calls == [("scoring in bf16", native, "training in bf16", native),
                     ("shared",), ("seed", 0), ("seed", 1), ("seed", 2)]
    calls.clear()
    assert bench.main([*common, "--quality", "--ablation", "--scoring", "fp32"]) == 0
    assert calls == [("scoring in bf16", False, "training in bf16", native), ("shared",), ("seed", 0), ("seed", 1),
                     ("ablation", 0), ("seed", 2), ("quality", 0), ("quality", 1), ("quality", 2)]
    calls.clear()
    assert bench.main([*common, "--match", "audit", "--seeds", "0", "1"]) == 0
    assert calls[1:] == [("shared",), ("audit", 0), ("audit", 1)]
    calls.clear()
    assert bench.main([*common, "--match", "both", "--seeds", "3"]) == 0
    assert calls[1:] == [("shared",), ("seed", 3), ("audit", 3)]


def test_eval_warns_when_the_retain_log_was_scored_another_way(tmp_path, tiny_dir, tofu_like, capsys):
    common = ["--model", str(tiny_dir), "--tofu", str(tofu_like), "--no-generate"]
    ref = tmp_path / "retain.json"
    assert main(["eval", *common, "--out", str(ref)]) == 0
    assert json.loads(ref.read_text())["options"]["bf16_autocast"] is False
    capsys.readouterr()
    assert main(["eval", *common, "--retain-model", str(ref), "--bf16-autocast"]) == 0
    err = capsys.readouterr().err
    assert f"{ref}: the retain model was scored without --bf16-autocast, this model with" in err
    assert main(["eval", *common, "--retain-model", str(ref)]) == 0
    assert "--bf16-autocast" not in capsys.readouterr().err


def test_forget_quality_compares_with_the_reference_not_the_model_itself(tmp_path, tiny_dir, tofu_like):
    """A reference whose forget truth ratios all lie above the model's: the KS statistic is 1 and, for two
    samples of 6, the exact p-value is 2 / C(12, 6) = 2/924 (a model compared with itself would give p = 1)."""
    common = ["--tofu", str(tofu_like), "--max-new-tokens", "4", "--no-generate"]
    own = tmp_path / "own.json"
    assert main(["eval", "--model", str(tiny_dir), *common, "--out", str(own)]) == 0
    reference = json.loads(own.read_text())
    ratios = reference["splits"]["forget"]["per_sample"]["truth_ratio_raw"]
    assert len(ratios) == 6
    reference["splits"]["forget"]["per_sample"]["truth_ratio_raw"] = [1e6 + i for i in range(6)]
    ref_file = tmp_path / "reference.json"
    ref_file.write_text(json.dumps(reference))
    out = tmp_path / "against.json"
    assert main(["eval", "--model", str(tiny_dir), *common, "--retain-model", str(ref_file), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert max(ratios) < 1e6
    assert res["ks_statistic"] == 1.0
    assert res["forget_quality"] == pytest.approx(2 / math.comb(12, 6))


def test_eval_holdout_logs_the_audit_as_open_unlearning_mia_and_privleak(tmp_path, tiny_dir, tofu_like, eval_rows,
                                                                          capsys):
    """With --holdout, the forget split's audit appears in the results and in TOFU_EVAL.json as open-unlearning's
    mia_* (AUC and each side's scores) and privleak (their formula, on 1 − mia_min_k, against the retrained model's
    mia_min_k from its own log, else 0.5)."""
    holdout = tmp_path / "holdout.json"
    holdout.write_text(json.dumps([{"question": r.question, "answer": r.answer} for r in eval_rows[28:36]]))
    common = ["--tofu", str(tofu_like), "--no-generate", "--holdout", str(holdout), "--format", "open-unlearning"]
    (tmp_path / "r").mkdir()
    assert main(["eval", "--model", str(tiny_dir), *common, "--out", str(tmp_path / "r" / "res.json")]) == 0
    res = json.loads((tmp_path / "r" / "res.json").read_text())
    log = json.loads((tmp_path / "r" / "TOFU_EVAL.json").read_text())
    attacks = res["audit"]["attacks"]
    assert set(attacks) == {"loss", "zlib", "mink", "minkpp", "gradnorm"} and res["audit"]["rows"]["forget"] == 6
    for name, key in (("mia_loss", "loss"), ("mia_min_k", "mink"), ("mia_gradnorm", "gradnorm")):
        assert log[name]["agg_value"] == attacks[key]["auc"]
        assert [log[name]["holdout"]["value_by_index"][str(i)]["score"] for i in range(8)] == \
            attacks[key]["scores"]["holdout"]
    auc = attacks["mink"]["auc"]
    assert log["privleak"]["agg_value"] == pytest.approx(((1 - auc) - 0.5) / (0.5 + 1e-10) * 100)
    # the same model with that log as its retrained model's: privleak 0 and the retrained AUC read from mia_*
    (tmp_path / "s").mkdir()
    assert main(["eval", "--model", str(tiny_dir), *common, "--retain-model", str(tmp_path / "r" / "TOFU_EVAL.json"),
                 "--out", str(tmp_path / "s" / "res.json")]) == 0
    again = json.loads((tmp_path / "s" / "TOFU_EVAL.json").read_text())
    assert again["privleak"]["agg_value"] == pytest.approx(0.0, abs=1e-6)
    assert json.loads((tmp_path / "s" / "res.json").read_text())["audit"]["attacks"]["mink"]["retrained_auc"] == auc
    assert "membership audit" in capsys.readouterr().out
    # --reference adds mia_reference: the model against itself, every row's loss difference is 0 (AUC ½)
    (tmp_path / "t").mkdir()
    assert main(["eval", "--model", str(tiny_dir), *common, "--reference", str(tiny_dir),
                 "--out", str(tmp_path / "t" / "res.json")]) == 0
    reference = json.loads((tmp_path / "t" / "TOFU_EVAL.json").read_text())["mia_reference"]
    assert reference["agg_value"] == 0.5
    assert [reference[side]["value_by_index"][str(i)]["score"] for side, n in (("forget", 6), ("holdout", 8))
            for i in range(n)] == [0.0] * 14
    assert main(["eval", "--model", str(tiny_dir), "--tofu", str(tofu_like), "--reference", str(tiny_dir)]) == 2
