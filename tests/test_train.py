"""Fine-tuning a bf16 model: fp32 master weights keep the updates that a pure-bf16 AdamW step rounds away."""
import torch

from conftest import build_model
from helpers import load_folder
from perta_fast import train
from perta_fast.options import FinetuneOptions


def _bf16_model(folder, tokenizer):
    build_model(len(tokenizer), tie=False).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tau(full, ft) -> dict:
    a, b = load_folder(full), load_folder(ft)
    return {n: b[n].float() - a[n].float() for n in a}


def _zero_fraction(tau: dict) -> float:
    """Of the entries outside the embedding and output layer (rows of tokens never seen do not move at all)."""
    kept = [t for n, t in tau.items() if "embed" not in n and "lm_head" not in n]
    return sum(int((t == 0).sum()) for t in kept) / sum(t.numel() for t in kept)


def _norms_changed(tau: dict) -> tuple[int, int]:
    norms = [t for n, t in tau.items() if "norm" in n]
    return sum(bool((t != 0).any()) for t in norms), len(norms)


def test_bf16_finetune_keeps_small_updates(tmp_path, tiny_tokenizer, facts, monkeypatch):
    """At the default lr 1e-4, a pure-bf16 run (the MasterWeights disabled: what fine-tuning did before) leaves a
    share of τ exactly 0 and no norm weight moved; with fp32 master weights, written whole (save_dtype auto),
    none is 0 and every norm moves, and τ is the fp32 run's within bf16's forward/backward rounding; rounded to
    bf16 once at the end (save_dtype bf16) fewer entries are lost than by rounding every step."""
    full = _bf16_model(tmp_path / "full", tiny_tokenizer)
    rows = facts[0]
    opts = FinetuneOptions(epochs=3, batch_size=4)
    train.finetune(full, rows, tmp_path / "master", opts)
    train.finetune(full, rows, tmp_path / "rounded", FinetuneOptions(epochs=3, batch_size=4, save_dtype="bf16"))
    train.finetune(full, rows, tmp_path / "fp32", FinetuneOptions(epochs=3, batch_size=4, dtype="fp32"))
    with monkeypatch.context() as m:
        m.setattr(train.MasterWeights, "__init__", lambda self, model: setattr(self, "pairs", {}))
        train.finetune(full, rows, tmp_path / "pure", opts)
    pure, master = _tau(full, tmp_path / "pure"), _tau(full, tmp_path / "master")
    rounded, fp32 = _tau(full, tmp_path / "rounded"), _tau(full, tmp_path / "fp32")
    assert load_folder(tmp_path / "master")["model.norm.weight"].dtype == torch.float32
    assert load_folder(tmp_path / "rounded")["model.norm.weight"].dtype == torch.bfloat16
    assert _zero_fraction(pure) > 0.05 and _norms_changed(pure)[0] == 0  # the loss is real at this lr
    assert _zero_fraction(master) < 0.001 and _norms_changed(master)[0] == _norms_changed(master)[1] == 5
    assert _zero_fraction(rounded) < _zero_fraction(pure) / 2
    for n in master:  # the same steps as in fp32; only the forward and backward run in bf16
        cos = torch.nn.functional.cosine_similarity(master[n].flatten(), fp32[n].flatten(), dim=0)
        assert cos > 0.95, (n, float(cos))


def test_master_weights_only_for_half_precision(tiny_tokenizer):
    model = build_model(len(tiny_tokenizer))
    assert train.MasterWeights(model).pairs == {}  # fp32 weights are stepped themselves
    model.to(torch.bfloat16)
    masters = train.MasterWeights(model)
    assert len(masters.pairs) == len(list(model.parameters()))
    assert all(m.dtype == torch.float32 and torch.equal(m.bfloat16(), p) for p, m in masters.pairs.values())
