"""Tiny random-weight models of every architecture the support table names, built from transformers' own
config classes (2 layers, hidden 64, the tests' tokenizer): no download. `save_arch(kind, folder, tok)`
writes a checkpoint folder; `build_arch(kind, vocab)` returns the model."""
from __future__ import annotations

import torch

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=2, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts=4, num_experts_per_tok=2)

# kind -> (config class, model class, config fields beyond COMMON or in place of it)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=4)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(num_key_value_heads=None)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, hidden_size=None,
                                                   intermediate_size=None, num_hidden_layers=None,
                                                   num_attention_heads=None, num_key_value_heads=None,
                                                   max_position_embeddings=None)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(MOE, moe_intermediate_size=32,
                                                              shared_expert_intermediate_size=48)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def build_arch(kind: str, vocab: int, seed: int = 0):
    import transformers

    config_name, model_name, extra = ARCHS[kind]
    fields = {k: v for k, v in {**COMMON, **extra}.items() if v is not None}
    config = getattr(transformers, config_name)(vocab_size=vocab, **fields)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # random init is tiny; give every 1-D weight a spread so gradients are not degenerate
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()


def save_arch(kind: str, folder, tok, dtype=torch.float32, chat_template: bool = True):
    model = build_arch(kind, len(tok)).to(dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if not chat_template:  # the template lives in its own file (transformers 5) or in tokenizer_config.json
        for path in folder.glob("chat_template.*"):
            path.unlink()
        config = folder / "tokenizer_config.json"
        import json
        data = json.loads(config.read_text())
        data.pop("chat_template", None)
        config.write_text(json.dumps(data))
    return folder
