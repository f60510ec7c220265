"""Peak private memory of `perta-fast eval`'s two phases against their formulas, on the CPU-size TOFU θ_full:
scoring 40 forget questions (7 answers each, ≤ ANSWER_TOKENS_PER_FORWARD answer tokens per forward), scoring
the world facts (short answers: ≤ CONTEXT_TOKENS_PER_FORWARD prompt-and-answer tokens per forward) and
greedy decoding of 64 retain questions in one batch (max 200 new tokens).

    python benchmarks/eval_memory.py

Formulas (b = bytes per element of the model's dtype, V vocabulary, L layers, kv = KV heads × head dim):
  scoring:  2 · N(W+1)·V·b   the group's logits and their copy with the prompts' last logits prepended
          + N(P+W)·2L·kv·b   each answer's copy of its prompt's KV cache plus its own
  decoding: B(P+T)·2L·kv·b   the batch's KV cache (T: tokens decoded, at most --max-new-tokens)
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


def main() -> int:
    import torch

    from perta_fast import eval as ev
    from perta_fast.data import QA, encode
    from perta_fast.models import load_model
    from perta_fast.profiling import TENSORS_ONLY_THRESHOLD, PeakRssAnon, map_allocations_above, release_freed_memory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path.home() / ".cache/perta_fast/tofu-cpu-scaled/theta_full"),
                    help="a TOFU-tuned θ_full (default: the one benchmarks/tofu.py trains)")
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
    # forget: long answers (the logits budget binds); world facts: short ones (the KV budget binds)
    context = ev.CONTEXT_TOKENS_PER_FORWARD
    for phase, rows, context_tokens in (("score", splits["forget"][:40], context),
                                        ("score world_facts", splits["world_facts"], context),
                                        ("score world_facts, KV unbounded (before)", splits["world_facts"], 10**9)):
        items = [(r.question, [r.answer, r.paraphrased_answer, *r.perturbed_answers]) for r in rows]
        release_freed_memory()
        t0 = time.perf_counter()
        with PeakRssAnon(interval=0.02) as m:
            ev.score_questions(model, tok, items, context_tokens=context_tokens)
        seconds = time.perf_counter() - t0
        # the largest of the groups score_questions forms: its answers N, widest answer W and prompt P
        encoded = [encode(tok, [QA(q, x) for x in ans]) for q, ans in items]
        predicted, shape = 0, None
        for group in ev.question_groups(encoded, context_tokens=context_tokens):
            answers = [x for j in group for x in encoded[j]]
            n, p = len(answers), max(x.n_prompt for x in answers)
            width = max(len(x.input_ids) - x.n_prompt for x in answers)
            f = 2 * n * (width + 1) * vocab * b + n * (p + width) * kv_per_token
            if f > predicted:
                predicted, shape = f, {"answers": n, "prompt": p, "width": width}
        report[phase] = {"measured_bytes": m.growth, "formula_bytes": predicted, "largest_group": shape,
                         "seconds": round(seconds, 1)}
    questions = [r.question for r in splits["retain"][:64]]
    release_freed_memory()
    with PeakRssAnon(interval=0.02) as m:
        answers = ev.generate_answers(model, tok, questions, 200, 64)
    prompt = max(len(tok(ev.prompt_and_answer(tok, q)[0], add_special_tokens=False)["input_ids"]) for q in questions)
    decoded = max(len(tok(x, add_special_tokens=False)["input_ids"]) for x in answers) + 1  # + the end token
    report["decode"] = {"measured_bytes": m.growth, "formula_bytes": 64 * (prompt + decoded) * kv_per_token,
                        "formula_at_200_tokens_bytes": 64 * (prompt + 200) * kv_per_token,
                        "prompt_tokens": prompt, "decoded_tokens": decoded}
    for phase in report:
        r = report[phase]
        r["measured_over_formula"] = round(r["measured_bytes"] / r["formula_bytes"], 2)
    report["command"] = " ".join(sys.argv)
    report["torch_threads"] = torch.get_num_threads()
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
