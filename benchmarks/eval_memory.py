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
  decoding: Σ C_i·2L·kv·b         the B continuations' caches (C: prefix + prompt + answer tokens agreed on)
          + B·(max C + ROOM)·2L·kv·b   the decode cache they are copied into, with room for ROOM tokens;
                                 when T (tokens decoded on) passes ROOM it doubles a layer at a time (the
                                 continuations gone by then): 2 + 1/L times the decode cache
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
    from perta_fast.profiling import TENSORS_ONLY_THRESHOLD, PeakRssAnon, map_allocations_above, release_freed_memory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path.home() / ".cache/perta_fast/tofu-cpu-scaled-fp32/theta_full"),
                    help="a TOFU-tuned θ_full (default: the one benchmarks/tofu.py trains on a CPU without native bf16)")
    ap.add_argument("--tofu", default=str(HERE.parent.parent / "shared" / "data" / "tofu"))
    ap.add_argument("--out", default=str(HERE / "results" / "eval-memory-cpu.json"))
    a = ap.parse_args()
    map_allocations_above(TENSORS_ONLY_THRESHOLD)
    model, tok = load_model(a.model, "cpu")
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
        formula = max(group_formula(trees, g, n_prefix, vocab, b, kv_per_token) for g in groups)
        r = {"measured_bytes": m.growth, "scoring_formula_bytes": formula, "forwards": len(groups),
             "largest_group_questions": max(map(len, groups)), "shared_prefix_tokens": n_prefix,
             "seconds": round(seconds, 1)}
        if generate:
            # the answers decoded on after scoring: those longer than the first answer's agreeing tokens + 1;
            # C of each: its prompt (prefix included) and the agreeing tokens, T: the tokens decoded after
            on = [(len(p) + m, len(s.greedy) - m - 1) for p, s, e in zip(prompts, scores, encoded)
                  for m in [agreed(s.greedy, e[0].input_ids[e[0].n_prompt:])] if len(s.greedy) > m + 1]
            c_max, t_max = max((n for n, _ in on), default=0), max((t for _, t in on), default=0)
            held = len(on) * (c_max + sc.ROOM)
            decode = int(max(sum(n for n, _ in on) + held,
                             held * (2 + 1 / model.config.num_hidden_layers) if t_max > sc.ROOM else 0)
                         * kv_per_token)
            r.update(decoding_formula_bytes=decode, decoded_on=len(on), longest_prompt_and_agreed=c_max,
                     most_decoded=t_max)
            formula = max(formula, decode)
        r["formula_bytes"] = formula
        r["measured_over_formula"] = round(m.growth / formula, 2)
        report[phase] = r
    report["command"] = " ".join(sys.argv)
    report["torch_threads"] = torch.get_num_threads()
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
