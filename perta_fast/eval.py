"""Quick quality checks used by `unlearn` and `demo`: answer probability, exact match, generations.

Answer probability is length-normalised, P(answer | question)^(1/|answer|) = exp(−sample loss),
with the same answer tokens the training and importance losses use.
"""
from __future__ import annotations

import re
import string

import torch

from .data import QA, batches, encode, pad_id, per_sample_loss, prompt_and_answer


def normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def answer_probabilities(model, tokenizer, rows: list[QA], batch_size: int = 16, max_length: int = 256) -> list[float]:
    device = next(model.parameters()).device
    probs = []
    for ids, mask, labels in batches(encode(tokenizer, rows, max_length), batch_size, pad_id(tokenizer)):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        probs += torch.exp(-per_sample_loss(logits, labels.to(device))).tolist()
    return probs


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy answers, batched with left padding so every prompt ends where generation starts."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    answers = []
    for i in range(0, len(questions), batch_size):
        prompts = [tokenizer(prompt_and_answer(tokenizer, q)[0], add_special_tokens=False)["input_ids"]
                   for q in questions[i:i + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        answers += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    return answers


def evaluate(model, tokenizer, rows: list[QA], batch_size: int = 16, max_new_tokens: int = 32,
             generate: bool = True) -> dict:
    """Mean answer probability, exact-match accuracy of greedy answers (after normalising case,
    punctuation and spaces) and the generations themselves."""
    probs = answer_probabilities(model, tokenizer, rows, batch_size)
    result = {"n": len(rows), "answer_prob": sum(probs) / len(probs)}
    if generate:
        gens = generate_answers(model, tokenizer, [r.question for r in rows], max_new_tokens, batch_size)
        result["exact_match"] = sum(normalise(g) == normalise(r.answer) for g, r in zip(gens, rows)) / len(rows)
        result["generations"] = gens
    return result
