"""LoRA task vectors: the fused merge of an adapter folder against the ordinary merge of θ_ft
materialised by peft's own merge_and_unload, and against an fp64 product; importance restricted to
the adapter's targets; adapters the merge cannot reproduce are refused."""
import json

import pytest
import torch

from conftest import build_model
from helpers import load_folder, tree_digest
from perta_fast import ops
from perta_fast.errors import PertaError
from perta_fast.importance import compute_importance, importance_file
from perta_fast.merge import MergeOptions, merge


def make_adapter(base_dir, out, targets, rank=4, seed=0, **config):
    """A peft LoRA adapter with random A and B (a trained adapter's B is non-zero too), saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank + 1, target_modules=targets, init_lora_weights=False, **config)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.mul_(0.5)
    peft_model.save_pretrained(out)
    return out


def materialise(base_dir, adapter_dir, out, tokenizer):
    """θ_ft as peft itself merges it: the oracle the fused merge must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_base(path, tokenizer, tie=True, shard=None, dtype=torch.float32):
    model = build_model(len(tokenizer), tie=tie, seed=3).to(dtype)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(path)
    return path


def scores_file(path, base_dir, names):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    base = load_folder(base_dir)
    tensors = {}
    for n in names:
        tensors[f"forget/{n}"] = torch.rand(base[n].shape, generator=g)
        tensors[f"retain/{n}"] = torch.rand(base[n].shape, generator=g)
    save_file(tensors, str(path), metadata={"method": "fisher", "n_forget": "1", "n_retain": "1"})
    return path


@pytest.fixture(params=["cpp", "torch", "triton"])
def backend(request):
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(None)


@pytest.mark.parametrize("tie,targets,shard", [
    (True, "all-linear", None),  # SmolLM2-like: tied embeddings, every Linear but the output layer
    (False, ["q_proj", "v_proj", "lm_head"], "20KB"),  # untied lm_head targeted, sharded checkpoint
    (True, ["embed_tokens", "o_proj"], "20KB"),  # an Embedding LoRA on the tied weight
])
@pytest.mark.parametrize("method", ["tv", "perta"])
def test_fused_lora_merge_equals_merge_of_materialised_theta_ft(tmp_path, tiny_tokenizer, backend, tie, targets,
                                                                 shard, method):
    base = save_base(tmp_path / "full", tiny_tokenizer, tie, shard)
    adapter = make_adapter(base, tmp_path / "adapter", targets)
    ft = materialise(base, adapter, tmp_path / "ft", tiny_tokenizer)
    imp = scores_file(tmp_path / "imp.safetensors", base, load_folder(base)) if method == "perta" else None
    opts = MergeOptions(method=method, lam=0.8)
    merge(base, ft, tmp_path / "ordinary", imp, opts, progress=False)
    rec = merge(base, adapter, tmp_path / "fused", imp, opts, progress=False)
    want, got, full = load_folder(tmp_path / "ordinary"), load_folder(tmp_path / "fused"), load_folder(base)
    assert set(got) == set(want)
    changed = [n for n in full if not torch.equal(got[n], full[n])]
    assert rec["merged_tensors"] == len(changed) > 0
    for n in want:
        if n not in changed:
            assert torch.equal(got[n], full[n]), n  # untargeted: τ = 0, copied bit for bit
        # fp32: τ through peft's fp32 merge and back (θ_ft − θ_full) vs τ formed directly; both round
        # near |θ| ~ 1, so they differ by a few fp32 ulps of θ (1.2e-7 each), far below |λ·τ| ~ 1e-2
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6, msg=n)


def fp64_oracle(base, adapter_dir, lam, targets_map):
    """θ_full − λ·scale·B·A for each targeted weight, in fp64, rounded once to the base dtype."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    factors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = dict(base)
    for module, name in targets_map.items():
        a = factors[f"base_model.model.{module}.lora_A.weight"].double()
        b = factors[f"base_model.model.{module}.lora_B.weight"].double()
        tau = cfg["lora_alpha"] / a.shape[0] * (b @ a)
        out[name] = (base[name].double() - lam * tau).to(base[name].dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_lora_merge_in_half_precision_rounds_once(tmp_path, tiny_tokenizer, backend, dtype):
    base = save_base(tmp_path / "full", tiny_tokenizer, dtype=dtype)
    adapter = make_adapter(save_base(tmp_path / "full32", tiny_tokenizer), tmp_path / "adapter", ["up_proj"])
    merge(base, adapter, tmp_path / "out", None, MergeOptions(method="tv", lam=1.5), progress=False)
    full = load_folder(base)
    mods = {f"model.layers.{i}.mlp.up_proj": f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)}
    want = fp64_oracle(full, adapter, 1.5, mods)
    got = load_folder(tmp_path / "out")
    for n in full:
        # one rounding of the fp32 result against one of the fp64 result: at most one ulp apart
        # (the interpreter's bf16 cast truncates: also one ulp), inside the dtype's default tolerance
        torch.testing.assert_close(got[n], want[n], msg=n)
        assert got[n].dtype == dtype


def test_sign_goes_on_the_product_not_the_factors(tmp_path, tiny_tokenizer):
    """λ < 0 re-applies the task (θ_full + |λ|·τ); negating A and B separately would leave τ's sign as is."""
    base = save_base(tmp_path / "full", tiny_tokenizer)
    adapter = make_adapter(base, tmp_path / "adapter", ["down_proj"])
    ft = materialise(base, adapter, tmp_path / "ft", tiny_tokenizer)
    merge(base, adapter, tmp_path / "minus", None, MergeOptions(method="tv", lam=-1.0), progress=False)
    got, want = load_folder(tmp_path / "minus"), load_folder(ft)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("method", ["grad", "fisher"])
def test_importance_with_adapter_scores_only_its_targets(tmp_path, tiny_tokenizer, facts, method):
    base = save_base(tmp_path / "full", tiny_tokenizer)
    adapter = make_adapter(base, tmp_path / "adapter", ["q_proj", "up_proj"])
    forget, retain = facts[0][:6], facts[1][:6]
    whole, _ = compute_importance(base, forget, retain, method=method, batch_size=4, progress=False)
    only, meta = compute_importance(base, forget, retain, method=method, batch_size=4, progress=False, adapter=adapter)
    targets = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj")}
    assert {k.split("/", 1)[1] for k in only} == targets
    for k, t in only.items():
        torch.testing.assert_close(t, whole[k], rtol=1e-5, atol=0, msg=k)
    assert meta["adapter"] == str(adapter.resolve())
    # and the merge takes the targets-only file
    importance_file(base, forget, retain, tmp_path / "imp.safetensors", method=method, batch_size=4, progress=False, adapter=adapter)
    rec = merge(base, adapter, tmp_path / "out", tmp_path / "imp.safetensors", MergeOptions(lam=1.0), progress=False)
    assert rec["merged_tensors"] == len(targets)


@pytest.mark.parametrize("method", ["grad", "fisher"])
def test_gradient_checkpointing_leaves_importance_unchanged(tmp_path, tiny_tokenizer, facts, method):
    base = save_base(tmp_path / "full", tiny_tokenizer)
    forget, retain = facts[0][:6], facts[1][:5]
    plain, _ = compute_importance(base, forget, retain, method=method, batch_size=4, progress=False)
    ckpt, _ = compute_importance(base, forget, retain, method=method, batch_size=4, progress=False,
                                 gradient_checkpointing=True)
    assert set(ckpt) == set(plain)
    for k in plain:
        scale = plain[k].abs().max().item()
        # the recomputed forward is bit-identical on CPU; sums may still run in another order
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7 * scale, msg=k)


def test_lora_finetune_writes_an_adapter_peft_loads(tmp_path, tiny_tokenizer, facts):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from perta_fast.train import FinetuneOptions, finetune

    base = save_base(tmp_path / "full", tiny_tokenizer)
    rec = finetune(base, facts[0], tmp_path / "adapter",
                   FinetuneOptions(epochs=3, lr=1e-2, batch_size=4, lora_rank=4, gradient_checkpointing=True))
    assert rec["epoch_losses"][-1] < rec["epoch_losses"][0]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())  # it trained
    assert load_folder(base).keys()  # base untouched is checked by digest in the CLI test


def test_bf16_load_holds_bf16_weights(tmp_path, tiny_tokenizer):
    from perta_fast.models import load_model

    base = save_base(tmp_path / "full", tiny_tokenizer, dtype=torch.bfloat16)
    model, _ = load_model(base, "cpu")  # auto: the checkpoint's dtype
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_model(base, "cpu", "fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ---------------------------------------------------------------- bad input

def test_bad_adapters_are_one_line_errors(tmp_path, tiny_tokenizer):
    base = save_base(tmp_path / "full", tiny_tokenizer)
    other = build_model(len(tiny_tokenizer), hidden_size=48, seed=5)
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "tokenizer_config.json").write_text("{}")
    cases = {}
    cases["another model"] = make_adapter(tmp_path / "other", tmp_path / "a_other", ["q_proj"])
    cases["weights missing"] = make_adapter(base, tmp_path / "a_noweights", ["q_proj"])
    (cases["weights missing"] / "adapter_model.safetensors").unlink()
    cases["DoRA"] = make_adapter(base, tmp_path / "a_dora", ["q_proj"], use_dora=True)
    cases["bias"] = make_adapter(base, tmp_path / "a_bias", ["q_proj"], bias="lora_only")
    expect = {"another model": "adapter is for another model", "weights missing": "adapter weights missing",
              "DoRA": "DoRA", "bias": "biases"}
    for label, folder in cases.items():
        with pytest.raises(PertaError) as e:
            merge(base, folder, tmp_path / f"out_{label}", None, MergeOptions(method="tv"), progress=False)
        assert expect[label] in str(e.value) and "\n" not in str(e.value), label
        assert not (tmp_path / f"out_{label}").exists()


def test_cli_lora_bad_input(tmp_path, tiny_tokenizer, facts, capsys):
    from perta_fast.cli import main

    base = save_base(tmp_path / "full", tiny_tokenizer)
    data = tmp_path / "forget.json"
    data.write_text(json.dumps([r.__dict__ for r in facts[0]]))
    before = tree_digest(base)
    for argv, message in [
        (["finetune", "--lora-rank", "0"], "--lora-rank must be a positive integer"),
        (["finetune", "--lora-rank", "-3"], "--lora-rank must be a positive integer"),
        (["finetune", "--device", "cuda"], "no CUDA device"),
    ]:
        if torch.cuda.is_available() and "cuda" in argv:
            continue
        out = tmp_path / "out"
        code = main(argv + ["--model", str(base), "--data", str(data), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    assert tree_digest(base) == before


def test_cli_unlearn_with_lora(tmp_path, tiny_tokenizer, facts):
    from perta_fast.cli import main

    base = save_base(tmp_path / "full", tiny_tokenizer)
    forget, retain = facts
    (tmp_path / "f.json").write_text(json.dumps([r.__dict__ for r in forget]))
    (tmp_path / "r.json").write_text(json.dumps([r.__dict__ for r in retain[:8]]))
    before = tree_digest(base)
    assert main(["unlearn", "--model", str(base), "--forget", str(tmp_path / "f.json"), "--retain",
                 str(tmp_path / "r.json"), "--out", str(tmp_path / "u"), "--method", "perta-fisher",
                 "--lora-rank", "4", "--epochs", "2", "--lr", "1e-2", "--batch-size", "4", "--no-eval",
                 "--gradient-checkpointing", "--dtype", "fp32", "--keep-work"]) == 0
    work = tmp_path / "u.work"
    assert (work / "theta_ft_lora" / "adapter_config.json").is_file()
    merged = json.loads((tmp_path / "u" / "perta_merge.json").read_text())
    assert merged["finetuned_kind"] == "lora adapter"
    from safetensors import safe_open

    with safe_open(str(work / "importance-fisher-lora.safetensors"), "pt") as f:
        names = {k.split("/", 1)[1] for k in f.keys()}
    got, full = load_folder(tmp_path / "u"), load_folder(base)
    assert names == {n for n in full if not torch.equal(got[n], full[n])} | (names - set(full))
    assert all(torch.equal(got[n], full[n]) for n in full if n not in names)
    assert tree_digest(base) == before


def test_rslora_adapter_merges_with_alpha_over_sqrt_rank(tmp_path, tiny_tokenizer):
    """rsLoRA scales B·A by α/√r, not α/r: the fused merge against peft's own merge_and_unload."""
    base = save_base(tmp_path / "full", tiny_tokenizer)
    adapter = make_adapter(base, tmp_path / "adapter", ["q_proj", "down_proj"], rank=4, use_rslora=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["use_rslora"] is True
    ft = materialise(base, adapter, tmp_path / "ft", tiny_tokenizer)
    merge(base, adapter, tmp_path / "fused", None, MergeOptions(method="tv", lam=-1.0), progress=False)
    got, want, full = load_folder(tmp_path / "fused"), load_folder(ft), load_folder(base)
    changed = [n for n in full if not torch.equal(want[n], full[n])]
    assert len(changed) == 4
    for n in want:  # λ = −1 re-applies τ: θ_full + τ is θ_ft itself (tolerance as in the test above)
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6, msg=n)
