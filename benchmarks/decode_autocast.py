"""Greedy decoding under bf16 autocast against fp32, same model, prompts and run: why perta_fast.scoring's
generate_tokens turns autocast off (autocast re-casts every fp32 weight to bf16 at every decoding step).

    python benchmarks/decode_autocast.py     # SmolLM2-135M-Instruct, 3 prompts of ~150 tokens, 128 new tokens

Writes results/decode-autocast-cpu.json and .md: milliseconds per decoded token each way, their ratio, and
whether the two decodings chose the same tokens.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    import torch

    from perta_fast.facts import facts_of, make_people
    from perta_fast.models import default_model, load_model
    from perta_fast.scoring import _generate_tokens, generate_tokens

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(HERE / "results" / "decode-autocast-cpu.json"))
    a = ap.parse_args(argv)
    model, tok = load_model(a.model or default_model(), "cpu")
    people = make_people(9)
    texts = [" ".join(qa.answer for p in people[i::3] for qa in facts_of(p)) for i in range(3)]
    prompts = [tok(t)["input_ids"] for t in texts]
    runs = {}
    with torch.inference_mode():
        generate_tokens(model, tok, prompts[:1], 4)  # warm-up
        for name in ("fp32 (generate_tokens under autocast)", "bf16 autocast kept on", "fp32 again"):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = (_generate_tokens(model, tok, prompts, a.new_tokens, 8) if name.startswith("bf16")
                       else generate_tokens(model, tok, prompts, a.new_tokens, 8))
            seconds = time.perf_counter() - t0
            runs[name] = {"seconds": seconds, "tokens": sum(map(len, out)), "out": out}
    fp32 = min(runs[n]["seconds"] for n in runs if not n.startswith("bf16"))
    result = {"prompt_tokens": [len(p) for p in prompts], "new_tokens": a.new_tokens, "batch": len(prompts),
              "runs": {n: {k: v for k, v in r.items() if k != "out"} for n, r in runs.items()},
              "ms_per_step": {n: 1000 * r["seconds"] / a.new_tokens for n, r in runs.items()},
              "autocast_over_fp32": runs["bf16 autocast kept on"]["seconds"] / fp32,
              "same_tokens": runs["bf16 autocast kept on"]["out"] == runs["fp32 again"]["out"]}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    lines = ["| decoding | seconds | ms per step (batch of 3) |", "|---|---|---|"]
    lines += [f"| {n} | {r['seconds']:.1f} | {result['ms_per_step'][n]:.0f} |" for n, r in runs.items()]
    lines += ["", f"bf16 autocast / fp32 (the faster fp32 run): {result['autocast_over_fp32']:.2f}×; "
                  f"same tokens chosen: {result['same_tokens']}"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
