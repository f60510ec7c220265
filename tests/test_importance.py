"""Importance against an independent oracle: a batch-size-1 loop of ordinary autograd gradients."""
import pytest
import torch
import torch.nn.functional as F

from conftest import build_model
from helpers import tokens_by_hand
from perta_fast.errors import PertaError
from perta_fast.importance import estimate_importance


def oracle_per_sample_grads(model, tokenizer, rows):
    """One unpadded sample at a time: the gradient of its mean answer-token cross-entropy."""
    grads = []
    for r in rows:
        input_ids, n_prompt = tokens_by_hand(tokenizer, r.question, r.answer)
        ids = torch.tensor([input_ids])
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[0, :-1]
        targets = ids[0, 1:]
        answer = torch.arange(len(targets)) >= n_prompt - 1
        F.cross_entropy(logits[answer], targets[answer]).backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return grads


def assert_scores_close(got, want):
    assert set(got) == set(want)
    for name in want:
        scale = want[name].abs().max().item()
        # fp32 sums in a different order (batched matmuls vs one sample at a time): relative 1e-4,
        # plus an absolute floor for entries far below the tensor's largest.
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("tie", [True, False])
def test_exact_fisher_equals_batch_size_one_loop(tiny_tokenizer, facts, tie):
    model = build_model(len(tiny_tokenizer), tie=tie)
    rows = facts[0] + facts[1][:5]  # 13 rows: the last batch of 4 is partial, lengths differ (padding)
    per_sample = oracle_per_sample_grads(model, tiny_tokenizer, rows)
    want = {n: sum(g[n].square() for g in per_sample) / len(rows) for n in per_sample[0]}
    got = estimate_importance(model, tiny_tokenizer, rows, "fisher", batch_size=4, progress=False)
    assert_scores_close(got, want)
    assert all(p.requires_grad for p in model.parameters())  # the estimator restores what it froze


def test_exact_fisher_with_biases_and_untied_rows(tiny_tokenizer, facts):
    model = build_model(len(tiny_tokenizer), tie=False, attention_bias=True, mlp_bias=True)
    rows = facts[0][:6]
    per_sample = oracle_per_sample_grads(model, tiny_tokenizer, rows)
    want = {n: sum(g[n].square() for g in per_sample) / len(rows) for n in per_sample[0]}
    got = estimate_importance(model, tiny_tokenizer, rows, "fisher", batch_size=3, progress=False)
    assert any("bias" in n for n in got)
    assert_scores_close(got, want)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_exact_fisher_through_each_backend(tiny_tokenizer, facts, backend):
    from perta_fast import ops

    if ops.backend_status()[backend]:
        pytest.skip(f"{backend}: {ops.backend_status()[backend]}")
    model = build_model(len(tiny_tokenizer), tie=False)
    rows = facts[0][:6]
    per_sample = oracle_per_sample_grads(model, tiny_tokenizer, rows)
    want = {n: sum(g[n].square() for g in per_sample) / len(rows) for n in per_sample[0]}
    ops.set_backend(backend)
    try:
        got = estimate_importance(model, tiny_tokenizer, rows, "fisher", batch_size=4, progress=False)
    finally:
        ops.set_backend(None)
    assert_scores_close(got, want)


def test_fisher_does_not_depend_on_batch_size(tiny_tokenizer, facts):
    model = build_model(len(tiny_tokenizer))
    rows = facts[1][:11]
    one = estimate_importance(model, tiny_tokenizer, rows, "fisher", batch_size=1, progress=False)
    eight = estimate_importance(model, tiny_tokenizer, rows, "fisher", batch_size=8, progress=False)
    assert_scores_close(eight, one)


def test_grad_importance_is_abs_mean_gradient(tiny_tokenizer, facts):
    model = build_model(len(tiny_tokenizer))
    rows = facts[0] + facts[1][:3]
    per_sample = oracle_per_sample_grads(model, tiny_tokenizer, rows)
    want = {n: (sum(g[n] for g in per_sample) / len(rows)).abs() for n in per_sample[0]}
    got = estimate_importance(model, tiny_tokenizer, rows, "grad", batch_size=4, progress=False)
    assert_scores_close(got, want)
    assert all(p.grad is None for p in model.parameters())  # each gradient was freed once accumulated


def test_fisher_is_not_the_squared_mean_gradient(tiny_tokenizer, facts):
    """Guards the oracle itself: per-sample squares differ from the square of the mean."""
    model = build_model(len(tiny_tokenizer))
    rows = facts[0]
    fisher = estimate_importance(model, tiny_tokenizer, rows, "fisher", batch_size=4, progress=False)
    grad = estimate_importance(model, tiny_tokenizer, rows, "grad", batch_size=4, progress=False)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(fisher[name], grad[name].square(), rtol=1e-2)


def test_unknown_method_and_empty_set(tiny_tokenizer, facts):
    model = build_model(len(tiny_tokenizer))
    with pytest.raises(PertaError, match="unknown importance method"):
        estimate_importance(model, tiny_tokenizer, facts[0], "hessian", progress=False)
    with pytest.raises(PertaError, match="empty"):
        estimate_importance(model, tiny_tokenizer, [], "grad", progress=False)


class _Toy(torch.nn.Module):
    """A minimal causal LM: embedding, a Linear (optionally applied twice), an output head."""

    def __init__(self, vocab, twice=False, extra_param=False, layer_norm=False):
        super().__init__()
        self.emb, self.lin, self.head = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, vocab)
        self.twice = twice
        if extra_param:
            self.scale = torch.nn.Parameter(torch.ones(8))
        if layer_norm:  # with a bias, spread away from its init so both gradients are far from degenerate
            self.norm = torch.nn.LayerNorm(8)
            with torch.no_grad():
                self.norm.weight.add_(0.3 * torch.randn(8))
                self.norm.bias.add_(0.3 * torch.randn(8))

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        h = self.lin(self.emb(input_ids))
        if self.twice:
            h = self.lin(h)
        if hasattr(self, "norm"):
            h = self.norm(h)
        if hasattr(self, "scale"):
            h = h * self.scale
        return SimpleNamespace(logits=self.head(h))


def test_exact_fisher_refuses_a_module_run_twice(tiny_tokenizer, facts):
    with pytest.raises(PertaError, match="runs twice"):
        estimate_importance(_Toy(len(tiny_tokenizer), twice=True), tiny_tokenizer, facts[0][:2], "fisher",
                            progress=False)


def test_exact_fisher_refuses_unsupported_parameters(tiny_tokenizer, facts):
    model = _Toy(len(tiny_tokenizer), extra_param=True)
    with pytest.raises(PertaError, match="does not support parameter scale"):
        estimate_importance(model, tiny_tokenizer, facts[0][:2], "fisher", progress=False)
    assert all(p.requires_grad for p in model.parameters())


class _FlattenedTokens(torch.nn.Module):
    """Feeds its Linear the batch's tokens flattened (batch·tokens, features), as MoE experts are fed."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def test_exact_fisher_refuses_a_linear_fed_flattened_tokens(tiny_tokenizer, facts):
    """Axis 0 would be tokens, not samples: the squares would be per token, silently. grad still works."""
    model = build_model(len(tiny_tokenizer))
    mlp = model.model.layers[0].mlp
    mlp.down_proj = _FlattenedTokens(mlp.down_proj)
    with pytest.raises(PertaError, match=r"model.layers.0.mlp.down_proj.linear.weight receives inputs of shape "
                                         r"\(\d+, 48\), not \(batch 2, tokens, features\)"):
        estimate_importance(model, tiny_tokenizer, facts[0][:2], "fisher", batch_size=2, progress=False)
    scores = estimate_importance(model, tiny_tokenizer, facts[0][:2], "grad", progress=False)
    name = "model.layers.0.mlp.down_proj.linear.weight"
    assert set(scores) == {n for n, _ in model.named_parameters()} and scores[name].shape == (32, 48)
    assert scores[name].abs().sum() > 0  # a real gradient reached the wrapped Linear


@pytest.mark.parametrize("layer_norm", [False, True])
def test_exact_fisher_on_a_plain_toy_model_matches_the_loop(tiny_tokenizer, facts, layer_norm):
    """With a LayerNorm (weight and bias), as GPT-2-style models have, besides Llama's bias-free RMSNorm."""
    torch.manual_seed(0)
    model = _Toy(len(tiny_tokenizer), layer_norm=layer_norm)
    rows = facts[0][:5]
    per_sample = oracle_per_sample_grads(model, tiny_tokenizer, rows)
    want = {n: sum(g[n].square() for g in per_sample) / len(rows) for n in per_sample[0]}
    assert_scores_close(estimate_importance(model, tiny_tokenizer, rows, "fisher", batch_size=2, progress=False), want)


@pytest.mark.parametrize("tie", [True, False])
def test_exact_fisher_with_tiny_chunks_tiles_rows_and_still_matches(tiny_tokenizer, facts, monkeypatch, tie):
    """With a per-sample chunk smaller than one sample's gradient of any layer, Linear weights and the tied
    lm_head are tiled along their rows (the vocabulary for lm_head): the bound holds at any layer size,
    and the result is still the exact Fisher."""
    from perta_fast import ops

    model = build_model(len(tiny_tokenizer), tie=tie)
    rows = facts[0][:5]
    per_sample = oracle_per_sample_grads(model, tiny_tokenizer, rows)
    want = {n: sum(g[n].square() for g in per_sample) / len(rows) for n in per_sample[0]}
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 100)  # 3 rows of a 32-wide weight: every layer is tiled
    tiles = list(ops.per_sample_tiles(400, 32, 4))
    assert len(tiles) > 100 and all((o1 - o0) * 32 * chunk <= 100 for o0, o1, chunk in tiles)
    ops.set_backend("cpp")  # the torch path of the per-sample Linear Fisher (Triton tiles in registers)
    try:
        got = estimate_importance(model, tiny_tokenizer, rows, "fisher", batch_size=4, progress=False)
    finally:
        ops.set_backend(None)
    assert_scores_close(got, want)


def _gemma(kind: str, vocab: int):
    """A tiny Gemma 2 or Gemma 3 text model from transformers' own config classes: its embedding multiplies
    the looked-up row by √hidden (8 here), and its output layer is tied to it."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    config, cls = {"gemma2": (Gemma2Config, Gemma2ForCausalLM), "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[kind]
    torch.manual_seed(0)
    model = cls(config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       pad_token_id=2, bos_token_id=1, eos_token_id=2, attn_implementation="eager"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_exact_fisher_of_a_scaled_embedding_equals_the_loop(tiny_tokenizer, facts, kind):
    """Gemma's embedding scales its lookup (by √hidden): the per-sample embedding gradient carries the scale
    (left out, embed_tokens' rows of the samples' tokens differ from the loop: this test fails, checked)."""
    model = _gemma(kind, len(tiny_tokenizer))
    assert type(model.model.embed_tokens).__name__.endswith("ScaledWordEmbedding")
    rows = facts[0][:5]
    per_sample = oracle_per_sample_grads(model, tiny_tokenizer, rows)
    want = {n: sum(g[n].square() for g in per_sample) / len(rows) for n in per_sample[0]}
    assert_scores_close(estimate_importance(model, tiny_tokenizer, rows, "fisher", batch_size=2, progress=False), want)


class _ShiftedEmbedding(torch.nn.Embedding):
    def forward(self, input_ids):
        return super().forward(input_ids) + 1.0


def test_exact_fisher_refuses_an_embedding_that_does_more_than_a_lookup(tiny_tokenizer, facts):
    model = build_model(len(tiny_tokenizer))
    old = model.model.embed_tokens
    model.model.embed_tokens = _ShiftedEmbedding(old.num_embeddings, old.embedding_dim, old.padding_idx)
    model.model.embed_tokens.weight = old.weight  # still tied to the output layer
    with pytest.raises(PertaError, match=r"model.embed_tokens.weight is a _ShiftedEmbedding, whose forward does more "
                                         r"than a lookup.*use --method grad"):
        estimate_importance(model, tiny_tokenizer, facts[0][:2], "fisher", progress=False)
    assert estimate_importance(model, tiny_tokenizer, facts[0][:2], "grad", progress=False)[
        "model.embed_tokens.weight"].abs().sum() > 0
