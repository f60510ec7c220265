"""Peak private memory of `perta-fast eval`'s scoring and decoding against their formulas, on the CPU-size
TOFU θ_full: scoring 40 forget questions (7 answers each as one token tree), scoring the world facts (small
trees, long prompts: the KV budget binds), and scoring 128 retain questions (one decode batch) with their
greedy answers (up to 200 new tokens) continued from the scored caches.

    python benchmarks/eval_memory.py

Formulas (b = bytes per element of the model's dtype, V vocabulary, L layers, kv = KV heads × head dim;
per forward: N questions, K = widest tree + 1 logit columns, S = shared prefix + widest prompt + widest tree):
  scoring:  N·K·V·b              the forward's logits (≤ ANSWER_TOKENS_PER_FORWARD · V · b)
          + N·K·V·4 / chunks     log-sum-exp's fp32 temporaries, one chunk (≤ 64 MiB) at a time
          + N·S·2L·kv·b          the forward's KV cache (≤ CONTEXT_TOKENS_PER_FORWARD tokens)
          + N·S·(S - prefix)·b   its attention mask
          + Σ C_i·2L·kv·b        with decoding: the caches of the continuations scored so far, this forward's
                                 included, waiting to be decoded (C: prefix + prompt + answer tokens agreed on)
  decoding: Σ C_i·2L·kv·b         the B continuations' caches
          + B·(max C + R)·2L·kv·b   the decode cache they are copied into, with room for R = min(ROOM, limit)
                                 tokens; when the tokens decoded on pass R it doubles a layer at a time (the
                                 continuations gone by then), up to max C + limit tokens: at each doubling
                                 the grown cache plus one layer of the old
Measured: growth of RssAnon above the loaded model (glibc's mmap threshold pinned, so RssAnon follows the
live tensors, as benchmarks/plan.py measures). Writes results/eval-memory-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def group_formula(trees, group, n_prefix, vocab, b, kv_per_token) -> int:
    from perta_fast.loss import CHUNK_BYTES

    n = len(group)
    k = max(len(trees[i].tokens) for i in group) + 1
    s = n_prefix + max(len(trees[i].prompt) for i in group) + k - 1
    return n * k * vocab * b + min(CHUNK_BYTES, n * k * vocab * 4) + n * s * kv_per_token + n * s * (s - n_prefix) * b


def agreed(greedy: list[int], answer: list[int]) -> int:
    return next((j for j, (g, t) in enumerate(zip(greedy, answer)) if g != t), min(len(greedy), len(answer)))


def main() -> int:
    import torch

    from perta_fast import eval as ev, scoring as sc
    from perta_fast.data import QA, encode
    from perta_fast.models import load_model
    from perta_fast.plan import doubling_peak_tokens
    from perta_fast.memory import TENSORS_ONLY_THRESHOLD, PeakRssAnon, map_allocations_above, release_freed_memory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a TOFU-tuned θ_full (default: the one benchmarks/tofu.py "
                    "trains, with bf16 autocast or in fp32, whichever its cache holds)")
    ap.add_argument("--tofu", default=str(HERE.parent.parent / "shared" / "data" / "tofu"))
    ap.add_argument("--out", default=str(HERE / "results" / "eval-memory-cpu.json"))
    a = ap.parse_args()
    from perta_fast.models import cache_dir

    model_dir = a.model or next((d for d in (cache_dir() / f"tofu-cpu-scaled{s}/theta_full" for s in ("", "-fp32"))
                                 if d.is_dir()), None)
    if model_dir is None:
        print(f"eval_memory.py: no TOFU θ_full in {cache_dir()} (run benchmarks/tofu.py first) or pass --model",
              file=sys.stderr)
        return 2
    map_allocations_above(TENSORS_ONLY_THRESHOLD)
    model, tok = load_model(model_dir, "cpu")
    c = model.config
    b, vocab, kv_per_token = 4, c.vocab_size, 2 * c.num_hidden_layers * c.num_key_value_heads * (
        c.hidden_size // c.num_attention_heads) * 4
    splits = ev.tofu_splits(a.tofu, "forget01")
    report = {}
    for phase, rows, generate in (("score forget", splits["forget"][:40], 0),
                                  ("score world_facts", splits["world_facts"], 0),
                                  ("score and decode retain", splits["retain"][:sc.GENERATE_BATCH], 200)):
        items = [(r.question, [r.answer] + ([] if r.paraphrased_answer == r.answer else [r.paraphrased_answer])
                  + list(r.perturbed_answers)) for r in rows]
        release_freed_memory()
        t0 = time.perf_counter()
        with PeakRssAnon(interval=0.02) as m:
            scores = sc.score_questions(model, tok, items, generate=generate)
        seconds = time.perf_counter() - t0
        encoded = [encode(tok, [QA(q, x) for x in ans]) for q, ans in items]
        prompts = [e[0].input_ids[:e[0].n_prompt] for e in encoded]
        n_prefix = sc.common_prefix(prompts)
        trees = [sc._tree(i, p[n_prefix:], [x.input_ids[x.n_prompt:] for x in e])
                 for i, (p, e) in enumerate(zip(prompts, encoded))]
        groups = sc.question_groups(trees, n_prefix)
        # the answers decoded on after scoring: those longer than the first answer's agreeing tokens + 1;
        # C of each (question index: C): its prompt (prefix included) and the agreeing tokens
        on = {i: len(p) + m for i, (p, s, e) in enumerate(zip(prompts, scores, encoded))
              for m in [agreed(s.greedy, e[0].input_ids[e[0].n_prompt:])] if len(s.greedy) > m + 1} if generate else {}
        waiting, scoring = 0, 0
        for g in groups:
            waiting += sum(on.get(i, 0) for i in g) * kv_per_token
            scoring = max(scoring, group_formula(trees, g, n_prefix, vocab, b, kv_per_token) + waiting)
        formula = scoring
        r = {"measured_bytes": m.growth, "scoring_formula_bytes": scoring, "forwards": len(groups),
             "largest_group_questions": max(map(len, groups)), "shared_prefix_tokens": n_prefix,
             "seconds": round(seconds, 1)}
        if generate:
            c_max = max(on.values(), default=0)
            t_max = max((len(scores[i].greedy) - (c - len(prompts[i])) - 1 for i, c in on.items()), default=0)
            size = c_max + min(sc.ROOM, generate)
            # tokens: the decode cache and the continuations, or the cache doubling up to what was decoded
            decode = max(len(on) * size + sum(on.values()), len(on) * doubling_peak_tokens(
                size, c_max + t_max, c_max + generate, model.config.num_hidden_layers))
            decode = int(decode * kv_per_token)
            r.update(decoding_formula_bytes=decode, decoded_on=len(on),
                     longest_prompt_and_agreed=c_max, most_decoded=t_max)
            formula = max(formula, decode)
        r["formula_bytes"] = formula
        r["measured_over_formula"] = round(m.growth / formula, 2)
        report[phase] = r
    report["command"] = " ".join(sys.argv)
    report["model"] = str(model_dir)
    report["torch_threads"] = torch.get_num_threads()
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
