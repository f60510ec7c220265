"""`perta-fast plan` against measured peaks: every step on random-weight Llama-shaped checkpoints with
SmolLM2's vocabulary, each in a fresh process: the peak of private memory plus mapped file pages (a
checkpoint loaded in its own dtype is mapped, not copied) above the runtime's level, vs the prediction.
`calibrate` is compared by private memory alone: it writes each λ's tensors into the loaded weights (which
makes them private), and the merge inputs it reads stay mapped page cache the kernel can drop.

Each step runs twice: with glibc mapping every allocation over 128 KiB on its own (private memory then
follows the live tensors, the plan's quantity), and with glibc's default (what the CLI holds: freed
tensors below its adaptive threshold stay on the heap), with the time of both.

    python benchmarks/plan.py            # writes benchmarks/results/plan.json and .md
    python benchmarks/plan.py --steps calibrate --out benchmarks/results/plan-calibrate
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {  # hidden, intermediate, layers, heads, kv heads
    "llama-50M": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4),
    "llama-120M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4),
}
# perta-fast eval at its defaults on TOFU-size work: 128 questions (the facts repeated) decoded together to
# 200 new tokens (at random weights no answer agrees with its scored one or ends)
EVAL = {"rows": 128, "batch_size": 128, "max_new_tokens": 200}
CASES = [  # (step, dtype, options)
    ("finetune", "fp32", {}), ("finetune", "bf16", {}), ("finetune", "fp32", {"lora_rank": 8}),
    ("finetune", "bf16", {"lora_rank": 8}), ("finetune", "bf16", {"lora_rank": 8, "gradient_checkpointing": True}),
    ("importance", "fp32", {"method": "fisher"}), ("importance", "bf16", {"method": "fisher"}),
    ("importance", "fp32", {"method": "grad"}), ("importance", "bf16", {"method": "grad"}),
    ("importance", "bf16", {"method": "fisher", "gradient_checkpointing": True}),
    ("quick-eval", "fp32", {"rows": 128}), ("quick-eval", "bf16", {"rows": 128}),  # a full forward: the plan's bound
    ("eval", "fp32", EVAL), ("eval", "bf16", EVAL),
    # 128 rows a set fill a scoring forward (the plan's bound); without and with exact match at calibrate's
    # defaults (128 questions decoded together, 32 new tokens)
    ("calibrate", "fp32", {"rows": 256, "generate": False}), ("calibrate", "bf16", {"rows": 256, "generate": False}),
    ("calibrate", "fp32", {"rows": 256, "generate": True, "batch_size": 128}),
    ("calibrate", "bf16", {"rows": 256, "generate": True, "batch_size": 128}),
]


def build(folder: Path, shape: dict, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **shape)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def max_tokens(model_dir: Path, rows: int, prompt_only: bool = False) -> int:
    from perta_fast.data import encode
    from perta_fast.facts import make_facts
    from perta_fast.models import load_tokenizer

    forget, retain = make_facts(10, 2, 0)
    encoded = encode(load_tokenizer(model_dir), (forget + retain)[:rows])
    return max(e.n_prompt if prompt_only else len(e.input_ids) for e in encoded)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(HERE / "results" / "plan"))
    ap.add_argument("--steps", nargs="+", choices=sorted({c[0] for c in CASES}), help="only these steps")
    a = ap.parse_args(argv)
    from perta_fast.models import default_model
    from perta_fast.plan import plan_steps
    from perta_fast.memory import TENSORS_ONLY_THRESHOLD
    from perta_fast.profiling import measure_step_in_subprocess

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in a.configs:
            model = build(tmp / name, CONFIGS[name], default_model())
            finetuned = build(tmp / f"{name}-ft", CONFIGS[name], default_model(), seed=1)  # calibrate's θ_ft
            length = max_tokens(model, 16)  # every batch is padded to about this: the plan's worst case
            prompts = max_tokens(model, 16, prompt_only=True)  # what the eval and exact match decode from
            for src in (model, finetuned):
                from transformers import AutoModelForCausalLM
                import torch

                AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp / f"{src.name}-bf16")
                for f in src.iterdir():
                    if "token" in f.name or f.name.endswith(".jinja"):
                        (tmp / f"{src.name}-bf16" / f.name).write_bytes(f.read_bytes())
            for step, dtype, opts in CASES:
                if a.steps and step not in a.steps:
                    continue
                suffix = "" if dtype == "fp32" else "-bf16"
                folder = tmp / f"{name}{suffix}"
                options = {"batch_size": a.batch_size, "max_length": length, "epochs": 2,
                           "finetuned": str(tmp / f"{name}-ft{suffix}"), **opts}
                measured = {}
                for label, threshold in (("tensors", TENSORS_ONLY_THRESHOLD), ("glibc", None)):
                    measured[label] = measure_step_in_subprocess(step, folder, tmp / "out",
                                                                 {**options, "mmap_threshold": threshold})
                    shutil.rmtree(tmp / "out", ignore_errors=True)
                    (tmp / "out").unlink(missing_ok=True)
                # the eval's continuations hold their prompts alone (nothing agrees at random weights)
                context = prompts if step == "eval" else length
                plan = plan_steps(folder, opts.get("lora_rank"), "all-linear", "auto", opts.get("method", "fisher"),
                                  a.batch_size, context, opts.get("gradient_checkpointing", False),
                                  eval_batch=options["batch_size"], max_new_tokens=opts.get("max_new_tokens", 200),
                                  calibrate_batch=options["batch_size"], exact_match=opts.get("generate", True),
                                  prompt_length=prompts)["steps"]
                key = {"finetune": "finetune (LoRA)" if "lora_rank" in opts else "finetune (full)",
                       "importance": f"importance ({opts.get('method')})", "quick-eval": "quick eval",
                       "eval": "eval (TOFU)",
                       "calibrate": "calibrate"}[step]
                predicted = plan[key][0]
                tensors, glibc = measured["tensors"], measured["glibc"]
                # calibrate writes into the loaded weights, making them private; the merge's inputs stay
                # mapped page cache beside them (held − peak), which the kernel can drop: not the step's own
                field = "peak_bytes" if step == "calibrate" else "held_bytes"
                row = {"model": name, "step": key, "dtype": dtype, **{k: v for k, v in opts.items() if k != "method"},
                       "predicted_bytes": predicted, "measured_bytes": tensors[field], "measured": field,
                       "peak_rss_anon_bytes": tensors["peak_bytes"], "held_bytes": tensors["held_bytes"],
                       "runtime_bytes": tensors["runtime_bytes"],
                       "glibc_held_bytes": glibc[field], "seconds": round(tensors["seconds"], 2),
                       "glibc_seconds": round(glibc["seconds"], 2),
                       "ratio": round(predicted / tensors[field], 3),
                       "glibc_ratio": round(predicted / glibc[field], 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"batch_size": a.batch_size, "rows": rows}, indent=2))
    lines = ["| model | step | dtype | options | predicted MB | held MB | predicted / held | glibc default: held MB "
             "| predicted / held | time, 128 KiB / default |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r.items() if k in ("lora_rank", "gradient_checkpointing", "generate", *EVAL))
        lines.append(f"| {r['model']} | {r['step']} | {r['dtype']} | {opts} | {r['predicted_bytes'] / 1e6:.0f} | "
                     f"{r['measured_bytes'] / 1e6:.0f} | {r['ratio']:.2f} | {r['glibc_held_bytes'] / 1e6:.0f} | "
                     f"{r['glibc_ratio']:.2f} | {r['seconds'] / r['glibc_seconds']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"\nworst deviation from the live tensors: {worst:.0%}; "
          f"from glibc's default: {max(abs(r['glibc_ratio'] - 1) for r in rows):.0%}")
    return 0 if worst <= 0.25 else 1


if __name__ == "__main__":
    sys.exit(main())
