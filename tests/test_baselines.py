"""GA and NPO against hand-worked losses: at θ = π_ref NPO's loss is (2/β)·ln 2; GA's first loss is minus
the forget set's mean answer NLL, computed here by a separate log-softmax loop."""
import json
import math

import pytest

from helpers import load_folder, nll_by_hand
from perta_fast.baselines import BaselineOptions, unlearn_by_training
from perta_fast.cli import main
from perta_fast.errors import PertaError
from perta_fast.models import load_model


def mean_nll_by_hand(model_dir, rows):
    model, tok = load_model(model_dir, "cpu")
    return sum(nll_by_hand(model, tok, r.question, r.answer) for r in rows) / len(rows)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_npo_loss_at_the_reference_is_2_ln2_over_beta(tmp_path, tiny_dir, facts, beta):
    forget, retain = facts
    # lr 0: θ stays π_ref, so log(π_θ/π_ref) = 0 at every step and every loss is −(2/β)·log σ(0)
    rec = unlearn_by_training(tiny_dir, forget, retain, tmp_path / "npo", BaselineOptions(
        method="npo", epochs=2, lr=0.0, batch_size=3, beta=beta, retain_weight=0.0, device="cpu"))
    assert rec["step_losses"] == pytest.approx([2 / beta * math.log(2)] * 6, rel=1e-4)


def test_npo_adds_the_retain_loss(tmp_path, tiny_dir, facts):
    forget, retain = facts
    rec = unlearn_by_training(tiny_dir, forget, retain, tmp_path / "npo", BaselineOptions(
        method="npo", epochs=1, lr=0.0, batch_size=len(forget), retain_weight=1.0, device="cpu"))
    # one step, retain batch = the first len(forget) retain rows
    expected = 20 * math.log(2) + mean_nll_by_hand(tiny_dir, retain[:len(forget)])
    assert rec["step_losses"] == pytest.approx([expected], rel=1e-4)


def test_npo_refuses_identical_sets_and_warns_of_shared_rows(tmp_path, tiny_dir, facts, caplog):
    forget, retain = facts
    opts = BaselineOptions(method="npo", epochs=1, lr=0.0, batch_size=len(forget), device="cpu")
    with pytest.raises(PertaError, match="hold the same 8 rows"):
        unlearn_by_training(tiny_dir, forget, forget, tmp_path / "same", opts)
    assert not (tmp_path / "same").exists()
    unlearn_by_training(tiny_dir, forget, retain + forget[:2], tmp_path / "shared", opts)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "forget rows are in the retain set too: NPO both pushes their loss up and pulls it down"]


def test_npo_training_pushes_the_forget_answers_below_the_reference(tmp_path, tiny_dir, facts):
    """At lr > 0, without the retain term: NPO lowers π_θ of the forget answers, so their NLL rises above
    the reference's and the loss falls below (2/β)·ln 2 (a flipped sign would do the opposite; the lr-0
    tests above cannot tell)."""
    forget, retain = facts
    out = tmp_path / "npo"
    beta = 0.1
    rec = unlearn_by_training(tiny_dir, forget, retain, out, BaselineOptions(
        method="npo", epochs=4, lr=1e-3, batch_size=len(forget), beta=beta, retain_weight=0.0, device="cpu"))
    assert rec["step_losses"][0] == pytest.approx(2 / beta * math.log(2), rel=1e-4)  # θ = π_ref at step 1
    assert rec["step_losses"][-1] < rec["step_losses"][0] - 0.1
    assert mean_nll_by_hand(out, forget) > mean_nll_by_hand(tiny_dir, forget) + 0.1


def test_gradient_ascent_raises_the_forget_loss(tmp_path, tiny_dir, facts):
    forget, retain = facts
    out = tmp_path / "ga"
    rec = unlearn_by_training(tiny_dir, forget, retain, out, BaselineOptions(
        method="ga", epochs=4, lr=1e-3, batch_size=len(forget), device="cpu"))
    before = mean_nll_by_hand(tiny_dir, forget)
    assert rec["step_losses"][0] == pytest.approx(-before, rel=1e-4)
    assert mean_nll_by_hand(out, forget) > before + 0.1
    assert json.loads((out / "perta_baseline.json").read_text())["options"]["method"] == "ga"
    assert set(load_folder(out)) == set(load_folder(tiny_dir))


def test_after_step_stops_training_where_it_says(tmp_path, tiny_dir, facts):
    """A run of 3 epochs stopped after 2 steps is, weight for weight, the run of one 2-step epoch (the learning
    rate's warm-up counts steps, not epochs); the hook sees every step until then, in eval-ready train mode."""
    import torch

    forget, retain = facts
    seen = []

    def stop_at_two(model, steps_done):
        seen.append((steps_done, model.training))
        return steps_done == 2

    half = max(1, len(forget) // 2)
    opts = dict(method="ga", lr=1e-3, batch_size=half, device="cpu")
    rec = unlearn_by_training(tiny_dir, forget[:2 * half], retain, tmp_path / "stopped",
                              BaselineOptions(epochs=3, **opts), after_step=stop_at_two)
    unlearn_by_training(tiny_dir, forget[:2 * half], retain, tmp_path / "one_epoch", BaselineOptions(epochs=1, **opts))
    assert seen == [(1, True), (2, True)] and rec["steps"] == 2
    stopped, one_epoch = load_folder(tmp_path / "stopped"), load_folder(tmp_path / "one_epoch")
    assert all(torch.equal(stopped[k], one_epoch[k]) for k in one_epoch)
    assert not all(torch.equal(stopped[k], t) for k, t in load_folder(tiny_dir).items())


def test_baseline_cli_and_bad_input(tmp_path, tiny_dir, facts, capsys):
    forget, retain = facts
    (tmp_path / "f.json").write_text(json.dumps([r.__dict__ for r in forget]))
    (tmp_path / "r.json").write_text(json.dumps([r.__dict__ for r in retain]))
    args = ["baseline", "--model", str(tiny_dir), "--forget", str(tmp_path / "f.json"),
            "--retain", str(tmp_path / "r.json"), "--epochs", "1", "--lr", "1e-4"]
    assert main([*args, "--method", "npo", "--out", str(tmp_path / "npo")]) == 0
    assert (tmp_path / "npo" / "perta_baseline.json").is_file()
    capsys.readouterr()
    assert main([*args, "--method", "npo", "--out", str(tmp_path / "npo")]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    with pytest.raises(PertaError, match="unknown baseline"):
        unlearn_by_training(tiny_dir, forget, retain, tmp_path / "x", BaselineOptions(method="sgd"))
    assert not (tmp_path / "x").exists()
