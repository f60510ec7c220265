"""λ calibration on a tiny Llama: the chosen λ keeps the retain floor and the next λ tried does not, each
point is the model `merge` writes (checked by merging and scoring it independently), validation rows are
never used for importance, and bad input gets one line."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import load_folder
from perta_fast.calibration import CalibrateOptions, calibrate, calibrate_files
from perta_fast.cli import main
from perta_fast.data import hold_out, load_qa
from perta_fast.errors import PertaError
from perta_fast.facts import make_facts


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_dir):
    """θ_0 (the tiny model), θ_full (θ_0 trained on every fact), θ_ft (θ_full trained on the forget facts)
    and a retain model (θ_0 trained on the retain facts only)."""
    ws = tmp_path_factory.mktemp("calibrate")
    forget, retain = make_facts(20, 6, seed=0)  # 24 forget rows, 56 retain rows
    for name, rows in (("forget", forget), ("retain", retain), ("all", forget + retain)):
        (ws / f"{name}.json").write_text(json.dumps([r.__dict__ for r in rows]))
    train = ["--epochs", "6", "--lr", "3e-3", "--batch-size", "8", "-q"]
    assert main(["finetune", "--model", str(tiny_dir), "--data", str(ws / "all.json"), "--out", str(ws / "full")] + train) == 0
    assert main(["finetune", "--model", str(tiny_dir), "--data", str(ws / "retain.json"), "--out",
                 str(ws / "retain_model")] + train) == 0
    assert main(["finetune", "--model", str(ws / "full"), "--data", str(ws / "forget.json"), "--out", str(ws / "ft"),
                 "--epochs", "3", "--lr", "3e-3", "--batch-size", "4", "-q"]) == 0
    return ws


def _validation(ws, name):
    return hold_out(load_qa(str(ws / f"{name}.json")), 0.2)[1]


def _prob(folder, rows):
    from perta_fast.eval import answer_probabilities
    from perta_fast.models import load_model

    model, tok = load_model(folder)
    probs = answer_probabilities(model, tok, rows)
    return sum(probs) / len(probs)


def test_hold_out_spreads_over_the_set_and_keeps_file_order():
    kept, held = hold_out(list(range(40)), 0.2)
    assert held == [2, 7, 12, 17, 22, 27, 32, 37]  # one per fifth: TOFU's 20-row authors each lose 4
    assert kept == [i for i in range(40) if i not in held]
    assert hold_out(list(range(40)), 0.2) == (kept, held)
    for fraction in (0, 1, -0.1):
        with pytest.raises(PertaError, match="--hold-out"):
            hold_out(list(range(40)), fraction)
    with pytest.raises(PertaError, match="gives 3 validation rows; calibration needs at least 4"):
        hold_out(list(range(15)), 0.2, "f.json")
    with pytest.raises(PertaError, match="leaves none"):
        hold_out(list(range(5)), 0.95)


def test_chosen_lam_keeps_the_floor_and_the_next_point_does_not(ws, tmp_path):
    opts = CalibrateOptions(keep_retain=0.8, lams=(0.5, 1, 2, 4, 8), bisect=3)
    res = calibrate_files(ws / "full", ws / "ft", ws / "forget.json", ws / "retain.json", options=opts,
                          out=tmp_path / "cal.json")
    forget, retain = _validation(ws, "forget"), _validation(ws, "retain")
    assert res["validation"]["forget_rows"] == len(forget) == 5 and res["validation"]["retain_rows"] == 11
    # θ_full's own scores, computed apart from the calibration
    torch.testing.assert_close(res["reference"]["retain_prob"], _prob(ws / "full", retain), rtol=1e-6, atol=0)
    floor = 0.8 * res["reference"]["retain_prob"]
    by_lam = {p["lam"]: p for p in res["points"]}
    chosen, above = by_lam[res["lam"]], res["above"]
    assert res["lam"] > 0 and chosen["retain_prob"] >= floor and above["retain_prob"] < floor
    assert chosen["forget_prob"] < res["reference"]["forget_prob"]
    # the walk stopped at the first grid point that breaks the floor; bisection narrowed the gap below it 2^3-fold
    grid_ok = [lam for lam in opts.lams if lam in by_lam and by_lam[lam]["keeps_retain"]]
    first_bad = min(lam for lam in opts.lams if lam in by_lam and not by_lam[lam]["keeps_retain"])
    assert all(lam < first_bad for lam in grid_ok) and max(by_lam) == first_bad
    assert above["lam"] - res["lam"] == pytest.approx((first_bad - (max(grid_ok) if grid_ok else 0)) / 8)
    # each point is the checkpoint `merge` writes: merge at the chosen λ and the next, score them from scratch
    for point in (chosen, above):
        out = tmp_path / f"merged-{point['lam']}"
        assert main(["merge", "--method", "tv", "--base", str(ws / "full"), "--finetuned", str(ws / "ft"),
                     "--out", str(out), "--lam", repr(point["lam"]), "-q"]) == 0
        torch.testing.assert_close(point["retain_prob"], _prob(out, retain), rtol=1e-5, atol=0)
        torch.testing.assert_close(point["forget_prob"], _prob(out, forget), rtol=1e-5, atol=0)
    saved = json.loads((tmp_path / "cal.json").read_text())
    assert saved["lam"] == res["lam"] and (tmp_path / "cal.png").stat().st_size > 1000


def test_forget_target_base_stops_where_theta_0_is_reached(ws):
    """θ_0 here is a model that never saw the forget facts (trained on the retain facts only)."""
    opts = CalibrateOptions(keep_retain=0.3, lams=(0.25, 0.5, 1, 2, 4), bisect=3, forget_target="base",
                            pretrained=str(ws / "retain_model"))
    forget, retain = _validation(ws, "forget"), _validation(ws, "retain")
    res = calibrate(ws / "full", ws / "ft", forget, retain, options=opts)
    target = _prob(ws / "retain_model", forget)
    torch.testing.assert_close(res["target_forget_prob"], target, rtol=1e-6, atol=0)
    assert res["reference"]["forget_prob"] > target  # θ_full knows the forget facts better than θ_0
    assert res["reached_target"], res["note"]
    chosen = next(p for p in res["points"] if p["lam"] == res["lam"])
    assert chosen["forget_prob"] <= target and chosen["keeps_retain"]
    below = [p for p in res["points"] if p["lam"] < res["lam"]]
    assert below and max(below, key=lambda p: p["lam"])["forget_prob"] > target


def test_perta_needs_importance_without_the_validation_rows(ws, tmp_path, capsys):
    common = ["--forget", str(ws / "forget.json"), "--retain", str(ws / "retain.json")]
    held = tmp_path / "held.safetensors"
    assert main(["importance", "--model", str(ws / "full"), *common, "--out", str(held), "--hold-out", "0.2", "-q"]) == 0
    assert main(["calibrate", "--base", str(ws / "full"), "--finetuned", str(ws / "ft"), "--importance", str(held),
                 *common, "--lams", "1", "2", "4", "--bisect", "2", "--out", str(tmp_path / "c.json"), "-q"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    res = json.loads((tmp_path / "c.json").read_text())
    assert printed[-1] == f"λ = {res['lam']:.6g}" and res["method"] == "perta"
    from perta_fast.io import SafetensorsFile

    assert SafetensorsFile(held).metadata["n_forget"] == str(24 - 5)
    assert 0 < res["chosen"]["mean_weight"] < 1
    everything = tmp_path / "all.safetensors"
    assert main(["importance", "--model", str(ws / "full"), *common, "--out", str(everything), "-q"]) == 0
    assert main(["calibrate", "--base", str(ws / "full"), "--finetuned", str(ws / "ft"), "--importance",
                 str(everything), *common, "--out", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(everything) in err[0] and "including the rows calibration holds back" in err[0]
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--keep-retain", "0"], "--keep-retain must be in (0, 1]"),
    (["--keep-retain", "1.5"], "--keep-retain must be in (0, 1]"),
    (["--lams", "1", "-2"], "--lams must be positive"),
    (["--lams"], "expected at least one argument"),
    (["--hold-out", "0.1"], "gives 2 validation rows; calibration needs at least 4"),
    (["--forget-target", "base"], "--forget-target base needs --pretrained"),
    (["--bisect", "-1"], "--bisect must be 0 or more"),
])
def test_bad_input_is_one_line(ws, tmp_path, capsys, args, message):
    rc = main(["calibrate", "--base", str(ws / "full"), "--finetuned", str(ws / "ft"), "--forget",
               str(ws / "forget.json"), "--retain", str(ws / "retain.json"), "--out", str(tmp_path / "c.json"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_api_refuses_an_empty_grid_and_too_few_validation_rows(ws):
    forget, retain = _validation(ws, "forget"), _validation(ws, "retain")
    with pytest.raises(PertaError, match="--lams is empty"):
        calibrate(ws / "full", ws / "ft", forget, retain, options=CalibrateOptions(lams=()))
    with pytest.raises(PertaError, match="forget validation set has 3 rows"):
        calibrate(ws / "full", ws / "ft", forget[:3], retain)


def test_unlearn_lam_auto_merges_at_the_calibrated_lam(ws, tmp_path, capsys):
    out = tmp_path / "unlearned"
    assert main(["unlearn", "--model", str(ws / "full"), "--finetuned", str(ws / "ft"), "--forget",
                 str(ws / "forget.json"), "--retain", str(ws / "retain.json"), "--out", str(out), "--method",
                 "perta-grad", "--lam", "auto", "--keep-retain", "0.8", "--lams", "1", "2", "4", "8", "--bisect", "2",
                 "--keep-work", "--eval-samples", "4"]) == 0
    summary = json.loads((out / "perta_unlearn.json").read_text())
    cal = json.loads((out / "calibration.json").read_text())
    assert summary["lam"] == cal["lam"] > 0 and summary["lam_chosen_by"] == "calibration"
    assert (out / "calibration.png").is_file() and f"λ = {cal['lam']:.6g}" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "## λ chosen by calibration" in card and f"λ = {cal['lam']:.4g}" in card
    # importance saw only the rows calibration did not score
    from perta_fast.io import SafetensorsFile

    imp = out.parent / "unlearned.work" / "importance-grad.safetensors"
    assert SafetensorsFile(imp).metadata["n_forget"] == "19" and cal["validation"]["forget_rows"] == 5
    # the written weights are the formula at that λ
    s, base, ft, got = load_file(str(imp)), load_folder(ws / "full"), load_folder(ws / "ft"), load_folder(out)
    n = "model.layers.0.self_attn.q_proj.weight"
    w = s[f"forget/{n}"] / (s[f"forget/{n}"] + s[f"retain/{n}"] + 1e-16)
    torch.testing.assert_close(got[n], base[n] - cal["lam"] * w * (ft[n] - base[n]))
    assert main(["unlearn", "--model", str(ws / "full"), "--forget", str(ws / "forget.json"), "--retain",
                 str(ws / "retain.json"), "--out", str(tmp_path / "x"), "--lam", "often"]) == 2


def test_bf16_autocast_scores_every_point_with_bf16_matmuls(ws, tmp_path, capsys):
    """`calibrate --bf16-autocast`: θ_full's retain probability is the one scored apart under the same autocast,
    and not fp32's (so the option reached the scoring)."""
    from perta_fast.eval import answer_probabilities
    from perta_fast.models import load_model

    out = tmp_path / "cal.json"
    assert main(["calibrate", "--base", str(ws / "full"), "--finetuned", str(ws / "ft"), "--forget",
                 str(ws / "forget.json"), "--retain", str(ws / "retain.json"), "--lams", "0.5", "1", "--bisect", "0",
                 "--batch-size", "8", "--bf16-autocast", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    model, tok = load_model(ws / "full")
    retain = _validation(ws, "retain")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ac = answer_probabilities(model, tok, retain)
    fp32 = _prob(ws / "full", retain)
    assert res["scoring"] == "bf16 autocast"
    torch.testing.assert_close(res["reference"]["retain_prob"], sum(ac) / len(ac), rtol=1e-6, atol=0)
    assert abs(res["reference"]["retain_prob"] - fp32) > 1e-7  # 2e-6 measured; fp32 scored twice: bit-identical
