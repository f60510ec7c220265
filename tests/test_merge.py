"""The streamed merge against an in-memory fp64 computation of θ_full − λ·(w ⊙ (θ_ft − θ_full))."""
import json

import pytest
import torch

from helpers import load_folder, random_tensors, tree_digest, write_checkpoint, write_importance
from perta_fast.merge import MergeOptions, merge

SHAPES = {"model.embed_tokens.weight": (50, 16), "model.layers.0.mlp.up_proj.weight": (24, 16),
          "model.layers.0.input_layernorm.weight": (16,), "model.norm.weight": (16,), "odd.weight": (7, 3, 5),
          "empty.weight": (0, 4)}


def oracle(base, ft, sf, sr, lam, alpha=1.0, power=1.0, eps=1e-16, tv=False):
    out = {}
    for n in base:
        b, f = base[n].double(), ft[n].double()
        if tv:
            w = torch.ones_like(b)
        else:
            a, r = sf[n].double() ** power, sr[n].double() ** power
            w = a / (a + alpha * r + eps)
        out[n] = (b - lam * w * (f - b)).to(base[n].dtype)
    return out


def make_inputs(tmp_path, dtype, shards=1):
    base = random_tensors(SHAPES, dtype, seed=1)
    ft = {n: (t.float() + 0.1 * torch.randn(t.shape)).to(dtype) for n, t in base.items()}
    sf = {n: torch.rand(s) for n, s in SHAPES.items()}
    sr = {n: torch.rand(s) for n, s in SHAPES.items()}
    sf["model.norm.weight"][:4] = 0  # 0 forget importance: w must be 0 there
    return (write_checkpoint(tmp_path / "full", base, shards), write_checkpoint(tmp_path / "ft", ft, shards),
            write_importance(tmp_path / "imp.safetensors", sf, sr), base, ft, sf, sr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shards", [1, 3])
def test_streamed_merge_matches_in_memory(tmp_path, dtype, shards):
    full, ft_dir, imp, base, ft, sf, sr = make_inputs(tmp_path, dtype, shards)
    rec = merge(full, ft_dir, tmp_path / "out", imp, MergeOptions(lam=0.7), progress=False)
    got = load_folder(tmp_path / "out")
    want = oracle(base, ft, sf, sr, 0.7)
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == dtype, n  # each tensor keeps its dtype
        # both round the fp32/fp64 result once to `dtype`: at most one ulp apart, which the
        # dtype's default assert_close tolerance (bf16 rtol 1.6e-2, fp16 1e-3, fp32 1.3e-6) covers
        torch.testing.assert_close(got[n], want[n], msg=n)
    assert rec["tensors"] == len(SHAPES)
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert json.loads((tmp_path / "out" / "perta_merge.json").read_text())["options"]["lam"] == 0.7


def test_records_of_the_inputs_are_not_copied(tmp_path):
    full, ft_dir, imp, *_ = make_inputs(tmp_path, torch.float32)
    (full / "perta_finetune.json").write_text("{}")
    (full / "special_tokens_map.json").write_text("{}")
    merge(full, ft_dir, tmp_path / "out", imp, progress=False)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "special_tokens_map.json" in names and "perta_finetune.json" not in names


def test_output_card_says_what_was_done_not_the_base_card(tmp_path):
    full, ft_dir, imp, *_ = make_inputs(tmp_path, torch.float32)
    (full / "README.md").write_text("# SmolLM2-135M-Instruct\n\nA compact instruction model.\n")
    merge(full, ft_dir, tmp_path / "out", imp, MergeOptions(lam=0.7, alpha=2.0), progress=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" not in card and "compact instruction model" not in card
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]  # Hugging Face's YAML front matter
    # a local folder is no hub repository id: no base_model; names, not this machine's paths, in the card
    assert "base_model" not in front and "- unlearning" in front
    assert body.lstrip().startswith("# Unlearned model") and "method: perta, λ = 0.7, α = 2" in body
    assert f"`{full.name}` (θ_full)" in card and f"`{imp.name}`" in card and f"`{ft_dir.name}` (θ_ft" in card
    assert str(tmp_path) not in card
    record = json.loads((tmp_path / "out" / "perta_merge.json").read_text())  # the record keeps the paths
    assert record["base"] == str(full.resolve()) and record["importance"] == str(imp.resolve())
    assert (full / "README.md").read_text().startswith("# SmolLM2")  # the input is untouched


@pytest.mark.parametrize("alpha,power", [(1.0, 1.0), (2.5, 1.0), (1.0, 0.5), (0.3, 2.0)])
def test_power_alpha_variants(tmp_path, alpha, power):
    full, ft_dir, imp, base, ft, sf, sr = make_inputs(tmp_path, torch.float32)
    merge(full, ft_dir, tmp_path / "out", imp, MergeOptions(lam=1.3, alpha=alpha, power=power), progress=False)
    got, want = load_folder(tmp_path / "out"), oracle(base, ft, sf, sr, 1.3, alpha, power)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)


def test_tv_is_plain_task_arithmetic(tmp_path):
    full, ft_dir, _, base, ft, sf, sr = make_inputs(tmp_path, torch.bfloat16, shards=2)
    merge(full, ft_dir, tmp_path / "out", None, MergeOptions(method="tv", lam=1.0), progress=False)
    got, want = load_folder(tmp_path / "out"), oracle(base, ft, None, None, 1.0, tv=True)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)
    # TV steps farther than PerTA (w ≤ 1): the moved distance is never smaller
    merge(full, ft_dir, tmp_path / "perta", tmp_path / "imp.safetensors", progress=False)
    perta = load_folder(tmp_path / "perta")
    n = "model.layers.0.mlp.up_proj.weight"
    assert (got[n].float() - base[n].float()).norm() > (perta[n].float() - base[n].float()).norm()


def test_weight_file_is_used_directly(tmp_path):
    from safetensors.torch import save_file

    full, ft_dir, _, base, ft, _, _ = make_inputs(tmp_path, torch.float32)
    w = {n: torch.rand(s) for n, s in SHAPES.items()}
    save_file({f"weight/{n}": t.half() for n, t in w.items()}, str(tmp_path / "w.safetensors"))
    merge(full, ft_dir, tmp_path / "out", tmp_path / "w.safetensors", MergeOptions(lam=1.0), progress=False)
    got = load_folder(tmp_path / "out")
    for n in SHAPES:
        want = base[n].double() - w[n].half().double() * (ft[n].double() - base[n].double())
        torch.testing.assert_close(got[n], want.float(), msg=n)


def test_output_is_sharded_with_index(tmp_path):
    full, ft_dir, imp, *_ = make_inputs(tmp_path, torch.float32)
    rec = merge(full, ft_dir, tmp_path / "out", imp, MergeOptions(max_shard_bytes=2000), progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert rec["shards"] == len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(SHAPES)


def test_untied_lm_head_copy_uses_embedding_importance(tmp_path):
    shapes = {"model.embed_tokens.weight": (20, 8), "lm_head.weight": (20, 8), "model.norm.weight": (8,)}
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": True}
    base = random_tensors(shapes, seed=3)
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    ft = {n: t + 0.1 for n, t in base.items()}
    emb_only = {n: s for n, s in shapes.items() if n != "lm_head.weight"}
    sf, sr = {n: torch.rand(s) for n, s in emb_only.items()}, {n: torch.rand(s) for n, s in emb_only.items()}
    write_checkpoint(tmp_path / "full", base, config=cfg)
    write_checkpoint(tmp_path / "ft", ft, config=cfg)
    write_importance(tmp_path / "imp.safetensors", sf, sr)
    merge(tmp_path / "full", tmp_path / "ft", tmp_path / "out", tmp_path / "imp.safetensors", progress=False)
    got = load_folder(tmp_path / "out")
    # the oracle: θ − w·τ for both copies, w from the embedding's scores (λ = 1, α = 1, p = 1), in float64
    name = "model.embed_tokens.weight"
    w = sf[name].double() / (sf[name].double() + sr[name].double() + 1e-16)
    want = base[name].double() - w * (ft[name].double() - base[name].double())
    for n in (name, "lm_head.weight"):
        torch.testing.assert_close(got[n].double(), want, rtol=0, atol=4e-7, msg=n)


def test_inputs_are_never_modified(tmp_path):
    full, ft_dir, imp, *_ = make_inputs(tmp_path, torch.bfloat16, shards=2)
    before = [tree_digest(full), tree_digest(ft_dir), imp.read_bytes()]
    merge(full, ft_dir, tmp_path / "out", imp, progress=False)
    merge(full, ft_dir, tmp_path / "out", imp, MergeOptions(lam=2.0), overwrite=True, progress=False)
    assert [tree_digest(full), tree_digest(ft_dir), imp.read_bytes()] == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_functions_never_write_their_inputs(dtype):
    from perta_fast.merge import merge_tensor, ratio_weights

    base, ft, sf, sr = (torch.randn(33, 5).to(dtype) for _ in range(4))
    sf, sr = sf.abs(), sr.abs()
    copies = [t.clone() for t in (base, ft, sf, sr)]
    for power in (1.0, 2.0):
        w = ratio_weights(sf, sr, 0.5, power)
        merge_tensor(base, ft, w, 1.5)
        merge_tensor(base, ft, None, 1.5)
    for t, c in zip((base, ft, sf, sr), copies):
        assert torch.equal(t, c)
    assert w.dtype == torch.float32 and ((0 <= w) & (w <= 1)).all()
