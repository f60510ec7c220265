"""Scoring answers to questions and decoding greedy answers: the work TOFU's evaluation is made of.

TOFU scores 6-7 answers per question (the answer, a paraphrase, five perturbed ones) and generates one.
The FLOPs that cost are cut three ways, none changing a number beyond fp32 rounding:
- the prompts' common first tokens (the chat template's system prompt: ~20 of SmolLM2's ~47) run once;
- a question's answers run as one token tree after its prompt, under a tree-shaped attention mask (the
  perturbed answers repeat the paraphrase but for a few words: 24 % fewer tokens on TOFU's forget and
  retain splits), several questions side by side, logits only where an answer token is predicted;
- greedy decoding starts where teacher forcing of the first answer stops agreeing with it: up to there
  its argmaxes are the tokens greedy decoding produces, and their keys and values are already in the
  scored cache, so only the rest is decoded (batched, finished answers leaving the batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hf
from .console import bar
from .data import QA, encode, pad_id, prompt_and_answer
from .loss import chunk_rows
from .options import GENERATE_BATCH

# A forward's logits are (questions × widest tree + 1) × vocabulary: this bounds that product (~200 MB of
# fp32 logits at a 49k vocabulary).
ANSWER_TOKENS_PER_FORWARD = 1024
# bounds questions × (prefix + widest prompt + widest tree): the forward's KV cache and its attention mask
# (short trees, as world facts have, would otherwise pack ~40 questions with their prompts into one forward)
CONTEXT_TOKENS_PER_FORWARD = 4096


@dataclass
class QuestionScores:
    nll: list[float]  # mean answer-token NLL of each answer
    extraction: list[float]  # extraction strength of each answer
    greedy: list[int] | None = None  # the greedy answer's tokens (end token included), when asked


@dataclass
class _Tree:
    """One question: its prompt after the shared prefix, and its answers merged into a token tree whose
    node i has token tokens[i], parent parents[i] (-1: the prompt's last token) and depth depths[i] (1 for
    an answer's first token). Parents precede children, and the first answer's path is nodes 0..len-1."""
    index: int
    prompt: list[int]
    tokens: list[int]
    parents: list[int]
    depths: list[int]
    paths: list[list[int]]  # each answer's nodes, first token to last


def _tree(index: int, prompt: list[int], tails: list[list[int]]) -> _Tree:
    tree, child = _Tree(index, prompt, [], [], [], []), {}
    for tail in tails:
        node, path = -1, []
        for token in tail:
            nxt = child.get((node, token))
            if nxt is None:
                nxt = child[(node, token)] = len(tree.tokens)
                tree.tokens.append(token)
                tree.parents.append(node)
                tree.depths.append(1 if node < 0 else tree.depths[node] + 1)
            path.append(nxt)
            node = nxt
        tree.paths.append(path)
    return tree


def common_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least its last token (whose logits are needed)."""
    n = min(map(len, prompts)) - 1
    first = prompts[0]
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def question_groups(trees: list, prefix: int = 0, answer_tokens: int = ANSWER_TOKENS_PER_FORWARD,
                    context_tokens: int = CONTEXT_TOKENS_PER_FORWARD) -> list[list[int]]:
    """The questions (indices into `trees`) scored together: trees of like size side by side (less
    padding), as many as keep questions × (widest tree + 1) within `answer_tokens` (the logits) and
    questions × (prefix + longest prompt + widest tree) within `context_tokens` (the KV cache)."""
    order = sorted(range(len(trees)), key=lambda i: len(trees[i].tokens))
    groups, group, nodes, prompt = [], [], 0, 0
    for i in order:
        n, p = max(nodes, len(trees[i].tokens)), max(prompt, len(trees[i].prompt))
        if group and ((len(group) + 1) * (n + 1) > answer_tokens or (len(group) + 1) * (prefix + p + n) > context_tokens):
            groups.append(group)
            group, n, p = [], len(trees[i].tokens), len(trees[i].prompt)
        group.append(i)
        nodes, prompt = n, p
    if group:
        groups.append(group)
    return groups


@torch.no_grad()
def score_questions(model, tokenizer, items: list[tuple[str, list[str]]], max_length: int = 512,
                    generate: int = 0, batch_size: int = GENERATE_BATCH, desc: str | None = None,
                    answer_tokens: int = ANSWER_TOKENS_PER_FORWARD,
                    context_tokens: int = CONTEXT_TOKENS_PER_FORWARD,
                    parts: list[int] | None = None) -> list[QuestionScores]:
    """Each (question, answers)'s mean answer-token NLLs and extraction strengths, and with `generate` > 0
    the greedy answer (up to that many tokens) to the question, continued from its first answer's scoring.
    `parts` (lengths summing to len(items)) scores each part on its own, shared prefix and forwards alike,
    so that a part's scores do not depend on the other parts; only their greedy answers share batches."""
    device = next(model.parameters()).device
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    results: list[QuestionScores | None] = [None] * len(items)
    pending: list[_Continuation] = []
    with bar(total=len(items), show=desc is not None, desc=desc, unit="row", leave=False) as progress:
        start = 0
        for size in parts or [len(items)]:
            part = range(start, start + size)
            start += size
            encoded = {i: encode(tokenizer, [QA(items[i][0], a) for a in items[i][1]], max_length) for i in part}
            prompts = {i: e[0].input_ids[:e[0].n_prompt] if e else _prompt(tokenizer, items[i][0])
                       for i, e in encoded.items()}
            n_prefix = common_prefix(list(prompts.values())) if prompts else 0
            trees = [_tree(i, prompts[i][n_prefix:], [x.input_ids[x.n_prompt:] for x in encoded[i]]) for i in part]
            prefix = _prefix_cache(model, prompts[part[0]][:n_prefix], device) if n_prefix else None
            for group in question_groups(trees, n_prefix, answer_tokens, context_tokens):
                for tree, scores, going in _score_group(model, [trees[j] for j in group], prefix, n_prefix, pad, eos,
                                                        generate, device):
                    results[tree.index] = scores
                    if going is not None:
                        pending.append(going)
                while len(pending) >= batch_size:
                    _decode_continuations(model, pending[:batch_size], generate, eos, device)
                    pending = pending[batch_size:]
                progress.update(len(group))
    if pending:
        _decode_continuations(model, pending, generate, eos, device)
    return results


def _prompt(tokenizer, question: str) -> list[int]:
    return tokenizer(prompt_and_answer(tokenizer, question)[0], add_special_tokens=False)["input_ids"]


def _prefix_cache(model, tokens: list[int], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of the shared prefix, per layer: (1, heads, len, head dim)."""
    out = model(input_ids=torch.tensor([tokens], device=device), use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in hf.cache_of(out).layers]


ROOM = 64  # tokens a decode cache is first given room for; it doubles when they are used up


def _first_room(limit: int) -> int:
    """Room for decoding's first tokens: ROOM, or `limit` (the tokens it can add) when that is fewer."""
    return min(ROOM, limit)


@dataclass
class _Continuation:
    """A greedy answer cut short where its scoring stopped agreeing with the first answer: the tokens so far
    (the last not yet run through the model), its position, and the cache of everything before it."""
    scores: QuestionScores
    position: int
    kv: torch.Tensor  # (layers, 2, heads, tokens, head dim)


def _score_group(model, trees: list[_Tree], prefix, n_prefix: int, pad: int, eos: int, generate: int, device):
    ids, position, mask, rest, nodes = _tree_inputs(trees, n_prefix, pad, model.dtype)
    cache = hf.cache_from([(k.expand(len(trees), -1, -1, -1), v.expand(len(trees), -1, -1, -1))
                           for k, v in prefix]) if prefix is not None else None
    out = hf.forward(model, cache, input_ids=ids.to(device), attention_mask=mask.to(device),
                     position_ids=position.to(device), use_cache=generate > 0, logits_to_keep=nodes + 1)
    # logits[b, 0] follow the prompt's last token and predict an answer's first; logits[b, 1 + i] follow node i
    logits = out.logits
    lse, top = _normaliser_and_argmax(logits.reshape(-1, logits.shape[-1]))
    lse, top = lse.view(logits.shape[:2]).tolist(), top.view(logits.shape[:2]).tolist()
    for b, tree in enumerate(trees):
        at = [p + 1 for p in tree.parents]  # the logits column that predicts each node
        picked = logits[b, at, tree.tokens].float().tolist() if tree.tokens else []
        logp = [x - lse[b][k] for x, k in zip(picked, at)]
        nll = [-sum(logp[i] for i in path) / len(path) if path else 0.0 for path in tree.paths]
        strength = [extraction_strength([top[b][at[i]] for i in path], [tree.tokens[i] for i in path])
                    for path in tree.paths]
        scores = QuestionScores(nll, strength)
        going = None
        if generate > 0:
            first = tree.paths[0] if tree.paths else []
            scores.greedy, matched = _greedy_start(top[b], [tree.tokens[i] for i in first], eos, generate)
            if matched is not None:  # not finished: continue from the cache of prompt + matched answer tokens
                start = n_prefix + rest - len(tree.prompt)
                kv = torch.stack([torch.stack([torch.cat([layer.keys[b, :, :n_prefix],
                                                          layer.keys[b, :, start:n_prefix + rest + matched]], 1),
                                               torch.cat([layer.values[b, :, :n_prefix],
                                                          layer.values[b, :, start:n_prefix + rest + matched]], 1)])
                                  for layer in hf.cache_of(out).layers])
                going = _Continuation(scores, n_prefix + len(tree.prompt) + matched, kv)
        yield tree, scores, going


def _tree_inputs(trees: list[_Tree], n_prefix: int, pad: int, dtype):
    """Input ids, positions and the 4-D additive attention mask of trees side by side: each prompt right-
    aligned at column `rest` (left-padded), its tree after it; a prompt token sees the prefix and the prompt
    up to itself, a tree node the prefix, the whole prompt and its own ancestors; padding sees itself."""
    import numpy as np

    rest, nodes = max(len(t.prompt) for t in trees), max(len(t.tokens) for t in trees)
    width = rest + nodes
    ids = torch.full((len(trees), width), pad, dtype=torch.long)
    position = torch.zeros((len(trees), width), dtype=torch.long)
    seen = np.zeros((len(trees), width, n_prefix + width), dtype=bool)
    seen[:, :, :n_prefix] = True
    seen[:, np.arange(width), n_prefix + np.arange(width)] = True
    for b, t in enumerate(trees):
        p, n, start = len(t.prompt), len(t.tokens), rest - len(t.prompt)
        ids[b, start:rest] = torch.tensor(t.prompt, dtype=torch.long)
        ids[b, rest:rest + n] = torch.tensor(t.tokens, dtype=torch.long)
        position[b, start:rest] = torch.arange(n_prefix, n_prefix + p)
        position[b, rest:rest + n] = n_prefix + p - 1 + torch.tensor(t.depths, dtype=torch.long)
        seen[b, start:rest, n_prefix + start:n_prefix + rest] = np.tril(np.ones((p, p), dtype=bool))
        seen[b, rest:rest + n, n_prefix + start:n_prefix + rest] = True
        ancestors = np.eye(n, dtype=bool)
        for i, parent in enumerate(t.parents):
            if parent >= 0:
                ancestors[i] |= ancestors[parent]
        seen[b, rest:rest + n, n_prefix + rest:n_prefix + rest + n] = ancestors
    mask = torch.zeros(seen.shape, dtype=dtype).masked_fill_(torch.from_numpy(~seen), torch.finfo(dtype).min)
    return ids, position, mask[:, None], rest, nodes


def _normaliser_and_argmax(logits: torch.Tensor):
    """Log-sum-exp (fp32) and argmax of each row of (n, vocab) logits, an fp32 chunk at a time."""
    rows = chunk_rows(logits.shape[-1])
    lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    top = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for r0 in range(0, logits.shape[0], rows):
        chunk = logits[r0:r0 + rows].float()
        lse[r0:r0 + rows] = torch.logsumexp(chunk, dim=-1)
        top[r0:r0 + rows] = chunk.argmax(-1)
    return lse, top


def extraction_strength(predicted: list[int], answer: list[int]) -> float:
    """1 − k/|a|, k the shortest answer prefix after which every teacher-forced argmax equals its token."""
    misses = [j for j, (p, t) in enumerate(zip(predicted, answer)) if p != t]
    k = misses[-1] + 1 if misses else 0
    return 1.0 - k / len(answer) if answer else 0.0


def _greedy_start(top: list[int], answer: list[int], eos: int, limit: int) -> tuple[list[int], int | None]:
    """The greedy tokens teacher forcing on `answer` already gives (top[j]: the argmax after the prompt and
    answer[:j]): every one that agrees with the answer, then the first that does not. Returns them and the
    number of answer tokens they repeat, or None for that when decoding ends here (end token or limit)."""
    tokens = []
    for j in range(len(answer) + 1):
        tokens.append(top[j])
        if top[j] == eos or len(tokens) == limit:
            return tokens, None
        if j == len(answer) or top[j] != answer[j]:
            return tokens, j
    raise AssertionError("unreachable")


def _decode_continuations(model, batch: list[_Continuation], limit: int, eos: int, device) -> None:
    """Greedy decoding of cut-short answers side by side: their caches left-padded to a common length, copied
    straight into the decode cache's buffers."""
    width = max(c.kv.shape[3] for c in batch)
    # built in one expression: the layers swap in new tensors when rows leave or room runs out, and a local
    # still naming the first ones would hold them to the end of decoding (measured: 1.75× the decode cache
    # once a quarter of the rows had left)
    room = _first_room(limit)
    cache = hf.roomy_cache([_left_padded_layer(batch, i, width, room) for i in range(batch[0].kv.shape[0])],
                           width + limit)
    mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
    for b, c in enumerate(batch):
        mask[b, width - c.kv.shape[3]:] = 1
        c.kv = None  # in the decode cache now
    tokens = [c.scores.greedy for c in batch]
    chosen = torch.tensor([t[-1] for t in tokens], device=device)
    position = torch.tensor([c.position for c in batch], device=device)
    _continue(model, cache, mask, position, chosen, tokens, limit, eos)


def _left_padded_layer(batch: list[_Continuation], layer: int, width: int, room: int):
    """One layer of the continuations' caches, right-aligned at `width` in buffers with `room` more tokens."""
    _, _, heads, _, dim = batch[0].kv.shape
    k, v = (batch[0].kv.new_zeros((len(batch), heads, width + room, dim)) for _ in range(2))
    for b, c in enumerate(batch):
        k[b, :, width - c.kv.shape[3]:width], v[b, :, width - c.kv.shape[3]:width] = c.kv[layer, 0], c.kv[layer, 1]
    return k, v, width


def _continue(model, cache, mask, position, chosen, tokens: list[list[int]], limit: int, eos: int) -> None:
    """Greedy decoding onwards from `chosen`, each row's newest token (already the last of tokens[row], not
    yet in the cache; at `position`), until a row chooses the end token or holds `limit` tokens. Finished
    rows leave the batch once they are a quarter of it (each leaving copies the cache; until then they are
    decoded on, their tokens ignored)."""
    device = chosen.device
    alive = list(range(len(tokens)))
    while True:
        done = [tokens[row][-1] == eos or len(tokens[row]) >= limit for row in alive]
        if all(done):
            return
        if 4 * sum(done) >= len(alive):
            keep = [i for i, d in enumerate(done) if not d]
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            alive, chosen, mask, position = [alive[i] for i in keep], chosen[index], mask[index], position[index]
            done = [False] * len(alive)
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], 1)
        out = hf.forward(model, cache, input_ids=chosen[:, None], attention_mask=mask,
                         position_ids=position[:, None], use_cache=True)
        position = position + 1
        chosen = out.logits[:, -1].argmax(-1)
        for row, token, finished in zip(alive, chosen.tolist(), done):
            if not finished:
                tokens[row].append(token)


def _run_prompts(model, prompts: list[list[int]], pad: int):
    """Prompts side by side, left-padded so that each ends where its continuation starts, positions counted
    from each one's first real token (so the padding changes nothing): (last logits and KV cache, mask)."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                use_cache=True, logits_to_keep=1)
    return out, mask


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 32,
                     batch_size: int = GENERATE_BATCH) -> list[str]:
    """Greedy answers to questions through the chat template (generate_tokens)."""
    prompts = [_prompt(tokenizer, q) for q in questions]
    return [decode(tokenizer, t) for t in generate_tokens(model, tokenizer, prompts, max_new_tokens, batch_size)]


@torch.no_grad()
def generate_tokens(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 32,
                    batch_size: int = GENERATE_BATCH) -> list[list[int]]:
    """Greedy continuations of token prompts (no answer to start from), decoded in batches of prompts of
    similar length, left-padded so every prompt ends where decoding starts; each stops at the end token or
    `max_new_tokens`."""
    # autocast off: it re-casts every weight at every decoding step, which made greedy decoding 2.3x slower
    # than fp32 on this repo's CPU (benchmarks/decode_autocast.py) and can only cost memory traffic on a GPU;
    # the prompt's forward goes with it so that one dtype fills the KV cache
    with torch.autocast(next(model.parameters()).device.type, enabled=False):
        return _generate_tokens(model, tokenizer, prompts, max_new_tokens, batch_size)


def _generate_tokens(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int):
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        out, mask = _run_prompts(model, [prompts[i] for i in batch], pad)
        chosen = out.logits[:, -1].argmax(-1)
        tokens = [[t] for t in chosen.tolist()]
        if max_new_tokens > 0:
            width, room = mask.shape[1], _first_room(max_new_tokens)
            cache = hf.roomy_cache([hf.with_room(layer.keys, layer.values, room)
                                    for layer in hf.cache_of(out).layers], width + max_new_tokens)
            del out  # its cache is copied into the roomy one; held, it would stay to the end of decoding
            _continue(model, cache, mask, mask.sum(1), chosen, tokens, max_new_tokens, eos)
        for i, t in zip(batch, tokens):
            answers[i] = t if max_new_tokens > 0 else []
    return answers


def decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()
