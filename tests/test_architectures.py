"""Every architecture of the README's support table, as a tiny random model built from transformers' own config
classes (tests/archs.py): fine-tuning (full and LoRA), importance (grad and, where supported, the exact Fisher
against a batch-size-1 autograd loop), the merge against θ_full − w⊙τ formed here from the files (and, for LoRA,
from peft's own merge), unlearn, plan's parameter count and `info --model`. What is not supported is refused
before any training, naming the model type and the alternative."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from archs import ARCHS, build_arch, save_arch
from helpers import load_folder
from perta_fast.cli import main
from perta_fast.importance import estimate_importance
from test_importance import assert_scores_close, oracle_per_sample_grads

MOE = {"qwen2_moe", "mixtral"}
KINDS = list(ARCHS) + ["llama-no-template"]
# the stored names transformers 5 writes for the parameters it loads under other names (its conversion
# mapping, written out here by hand from the checkpoints it saves): module name -> {stored name: the slice}
RENAMED = {"gpt_neox": {"lm_head.weight": "embed_out.weight"}}


def _expected_stored(kind: str, name: str, value: torch.Tensor) -> dict:
    """A module parameter's value under the checkpoint's stored names, by hand."""
    if kind in RENAMED and name in RENAMED[kind]:
        return {RENAMED[kind][name]: value}
    fused = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
    if not fused:
        mixtral_router = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.gate\.weight", name)
        if kind == "mixtral" and mixtral_router:
            return {f"model.layers.{mixtral_router[1]}.block_sparse_moe.gate.weight": value}
        return {name: value}
    layer, which = fused[1], fused[2]
    # Mixtral: under block_sparse_moe, w1 = gate, w3 = up, w2 = down; Qwen2-MoE keeps the projections' names
    base = f"model.layers.{layer}.block_sparse_moe.experts" if kind == "mixtral" else f"model.layers.{layer}.mlp.experts"
    names = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    out = {}
    for e in range(value.shape[0]):
        if which == "gate_up_proj":
            gate, up = value[e].chunk(2, dim=0)
            out.update({f"{base}.{e}.{names[0]}.weight": gate, f"{base}.{e}.{names[1]}.weight": up})
        else:
            out[f"{base}.{e}.{names[2]}.weight"] = value[e]
    return out


def _rows(facts):
    forget, retain = facts
    return forget[:4], retain[:4]


@pytest.fixture(scope="module")
def sets(tmp_path_factory, facts):
    root = tmp_path_factory.mktemp("sets")
    forget, retain = _rows(facts)
    for name, rows in (("forget", forget), ("retain", retain)):
        (root / f"{name}.json").write_text(json.dumps([r.__dict__ for r in rows]))
    return root / "forget.json", root / "retain.json"


@pytest.fixture(scope="module", params=KINDS)
def pipeline(request, tmp_path_factory, tiny_tokenizer, sets):
    """Each step run once per architecture through the CLI; the tests below check what it wrote."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    save_arch(kind.removesuffix("-no-template"), root / "full", tiny_tokenizer, chat_template=not kind.endswith("template"))
    forget, retain = map(str, sets)
    full = str(root / "full")
    quiet = ["-q"]
    codes = {
        "finetune": main(quiet + ["finetune", "--model", full, "--data", forget, "--out", str(root / "ft"),
                                  "--epochs", "1", "--lr", "1e-3", "--batch-size", "2"]),
        "lora": main(quiet + ["finetune", "--model", full, "--data", forget, "--out", str(root / "lora"),
                              "--epochs", "1", "--lr", "1e-3", "--batch-size", "2", "--lora-rank", "2"]),
        "grad": main(quiet + ["importance", "--model", full, "--forget", forget, "--retain", retain,
                              "--out", str(root / "grad.safetensors"), "--method", "grad"]),
    }
    if kind not in MOE:
        codes["fisher"] = main(quiet + ["importance", "--model", full, "--forget", forget, "--retain", retain,
                                        "--out", str(root / "fisher.safetensors"), "--method", "fisher"])
    codes["unlearn"] = main(quiet + ["unlearn", "--model", full, "--forget", forget, "--retain", retain,
                                     "--out", str(root / "unlearned"), "--method", "perta-grad", "--epochs", "1",
                                     "--batch-size", "2", "--eval-samples", "2"])
    codes["merge"] = main(quiet + ["merge", "--base", full, "--finetuned", str(root / "ft"), "--importance",
                                   str(root / "grad.safetensors"), "--out", str(root / "u")])
    codes["merge-lora"] = main(quiet + ["merge", "--base", full, "--finetuned", str(root / "lora"), "--importance",
                                        str(root / "grad.safetensors"), "--out", str(root / "u-lora")])
    return kind, root, codes


def test_every_step_runs(pipeline):
    kind, root, codes = pipeline
    assert codes == dict.fromkeys(codes, 0), (kind, codes)
    record = json.loads((root / "unlearned" / "perta_unlearn.json").read_text())
    assert set(record["eval"]) == {"before (θ_full)", "after (perta-grad)"} and 0 < record["mean_weight"] < 1


def test_grad_scores_are_keyed_by_the_stored_names(pipeline, tiny_tokenizer, facts):
    """The mean gradient, from an autograd loop one row at a time, placed under the checkpoint's names by hand;
    every stored tensor scored exactly once."""
    kind, root, _ = pipeline
    from safetensors.torch import load_file

    scores = load_file(str(root / "grad.safetensors"))
    model = build_arch(kind.removesuffix("-no-template"), len(tiny_tokenizer))
    from perta_fast.models import load_tokenizer

    tok = load_tokenizer(root / "full")
    for label, rows in zip(("forget", "retain"), _rows(facts)):
        per_sample = oracle_per_sample_grads(model, tok, rows)
        want = {}
        for name in per_sample[0]:
            want.update(_expected_stored(kind, name, (sum(g[name] for g in per_sample) / len(rows)).abs()))
        got = {n.split("/", 1)[1]: t for n, t in scores.items() if n.startswith(label + "/")}
        assert set(got) == set(load_folder(root / "full"))  # a tied output layer is stored once, as scored
        assert_scores_close(got, want)


def test_full_merge_is_theta_minus_w_tau(pipeline):
    """θ_u = θ_full − w⊙(θ_ft − θ_full) at λ = 1, α = 1, p = 1, formed here in float64 from the three files."""
    kind, root, _ = pipeline
    from safetensors.torch import load_file

    full, ft, merged = load_folder(root / "full"), load_folder(root / "ft"), load_folder(root / "u")
    scores = load_file(str(root / "grad.safetensors"))
    assert set(merged) == set(full)
    for name, base in full.items():
        s_f, s_r = scores[f"forget/{name}"].double(), scores[f"retain/{name}"].double()
        w = s_f / (s_f + s_r + 1e-16)
        want = base.double() - w * (ft[name].double() - base.double())
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-6, atol=1e-7, msg=name)


def test_lora_merge_is_theta_minus_w_tau_of_peft_merge(pipeline):
    """τ of the adapter is peft's own merge_and_unload less θ_full; untargeted tensors (fused experts) are θ_full's."""
    kind, root, _ = pipeline
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(root / "full", dtype=torch.float32)
    peft_merged = PeftModel.from_pretrained(base_model, root / "lora").merge_and_unload()
    peft_merged.save_pretrained(root / "peft-merged")
    full, by_peft, merged = load_folder(root / "full"), load_folder(root / "peft-merged"), load_folder(root / "u-lora")
    scores = load_file(str(root / "grad.safetensors"))
    changed = 0
    for name, base in full.items():
        tau = by_peft[name].double() - base.double()
        changed += bool(tau.abs().max() > 0)
        s_f, s_r = scores[f"forget/{name}"].double(), scores[f"retain/{name}"].double()
        want = base.double() - s_f / (s_f + s_r + 1e-16) * tau
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-5, atol=1e-6, msg=name)
    assert changed > 0
    adapter = json.loads((root / "lora" / "adapter_config.json").read_text())
    assert not adapter.get("target_parameters")


SUPPORTED_FISHER = [k for k in KINDS if k not in MOE]


@pytest.mark.parametrize("kind", SUPPORTED_FISHER)
def test_exact_fisher_equals_the_batch_size_one_loop(kind, tiny_tokenizer, facts):
    model = build_arch(kind.removesuffix("-no-template"), len(tiny_tokenizer))
    rows = facts[0][:5]
    per_sample = oracle_per_sample_grads(model, tiny_tokenizer, rows)
    want = {n: sum(g[n].square() for g in per_sample) / len(rows) for n in per_sample[0]}
    assert_scores_close(estimate_importance(model, tiny_tokenizer, rows, "fisher", batch_size=2, progress=False), want)


@pytest.mark.parametrize("kind", sorted(MOE))
def test_unsupported_fisher_is_refused_before_any_training(kind, tmp_path, tiny_tokenizer, sets, capsys):
    save_arch(kind, tmp_path / "full", tiny_tokenizer)
    forget, retain = map(str, sets)
    code = main(["unlearn", "--model", str(tmp_path / "full"), "--forget", forget, "--retain", retain,
                 "--out", str(tmp_path / "u"), "--method", "perta-fisher", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"importance --method fisher is not supported for {kind}" in err and "use --method grad" in err
    assert not (tmp_path / "u").exists() and not (tmp_path / "u.work").exists()  # no θ_ft trained


@pytest.mark.parametrize("kind", KINDS)
def test_info_names_each_step(kind, tmp_path, tiny_tokenizer, capsys):
    save_arch(kind.removesuffix("-no-template"), tmp_path / "m", tiny_tokenizer,
              chat_template=not kind.endswith("template"))
    assert main(["info", "--model", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    unsupported = [line.split()[0:3] for line in out.splitlines() if "not supported" in line]
    assert unsupported == ([["importance", "--method", "fisher"]] if kind in MOE else []), out
    assert ("no chat template" in out) == kind.endswith("no-template")


@pytest.mark.parametrize("kind", KINDS)
def test_plan_counts_every_parameter(kind, tmp_path, tiny_tokenizer):
    from perta_fast.plan import plan_steps

    model = build_arch(kind.removesuffix("-no-template"), len(tiny_tokenizer))
    model.config.save_pretrained(tmp_path)
    assert plan_steps(tmp_path)["params"] == sum(p.numel() for p in model.parameters())


def test_readme_support_table_says_what_the_tests_check():
    """The README's model-support table lists every architecture here, and fisher as unsupported for MoE only."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("## Model support", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    for kind in ARCHS:
        if kind.endswith("-tied"):
            continue
        row = next((line for name, line in rows.items() if kind in re.findall(r"[a-z0-9_]+", name)), None)
        assert row is not None, kind
        cells = [c.strip() for c in row.split("|")[2:-1]]
        assert (cells[3] == "no: use grad") == (kind in MOE), row


def test_calibration_moves_the_loaded_model_to_the_merged_weights(pipeline, tmp_path):
    """calibrate moves θ_full in place over λ by the merge's executor: its parameters are the module's (fused
    experts, NeoX's lm_head), the merge's tensors the checkpoint's. At λ = 1 the moved model, saved, is the merge's
    output file bit for bit."""
    from perta_fast.calibration import ModelAtLambda
    from perta_fast.options import MergeOptions

    kind, root, _ = pipeline
    at = ModelAtLambda(root / "full", root / "ft", root / "grad.safetensors", MergeOptions())
    at.set(1.0)
    at.model.save_pretrained(tmp_path / "moved")
    moved, merged = load_folder(tmp_path / "moved"), load_folder(root / "u")
    assert set(moved) == set(merged)
    for name in merged:
        assert torch.equal(moved[name], merged[name]), name


def test_before_transformers_5_module_names_are_stored_names(monkeypatch, tiny_tokenizer):
    """transformers 4.x (the floor is 4.56) has no load conversion and no reversal to ask: names stay."""
    from perta_fast import hf

    monkeypatch.setattr(hf, "_reversal", lambda: None)
    model = build_arch("llama", len(tiny_tokenizer))
    params = dict(model.named_parameters())
    assert hf.stored_layout(model, params) == {n: {n: tuple(p.shape)} for n, p in params.items()}
    scores = torch.ones(params["lm_head.weight"].shape)
    assert hf.to_stored(model, "lm_head.weight", scores) == {"lm_head.weight": scores}
