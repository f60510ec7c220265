"""The whole pipeline on a large model on one machine: a random-weight checkpoint with a real architecture's
layer shapes (Llama-3.2-3B by default; bf16, sharded safetensors; SmolLM2's tokenizer and vocabulary, so
nothing is downloaded), unlearned with a LoRA θ_ft and the exact Fisher:

    perta-fast unlearn --lora-rank 16 --dtype bf16 --method perta-fisher --max-memory GB ...

Per step it records wall time, peak private host memory (RssAnon; on a GPU also max_memory_allocated),
`perta-fast plan`'s prediction (+ the runtime's own memory), and what the full-fine-tune fp32 pipeline
would need by the same formulas. Memory is the claim here; the weights are random, so quality is not.

    python benchmarks/scale.py                                  # CPU, Llama-3.2-3B shapes
    python benchmarks/scale.py --shape llama-3.1-8b --device cuda --max-memory 70   # a GPU machine
    python benchmarks/scale.py --importance-only --max-memory 12   # importance alone, grad and fisher
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, head_dim, tied (the real models' configs)
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "smoke": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),  # checks the script, in seconds
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
}


def build_checkpoint(folder: Path, shape: dict, tokenizer_dir: Path, shard_gb: float = 2.0) -> Path:
    """Random bf16 weights written tensor by tensor (no model is ever built in memory)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from perta_fast.io import ShardedWriter
    from perta_fast.outputs import atomic_dir

    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, rms_norm_eps=1e-5, dtype="bfloat16",
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      architectures=["LlamaForCausalLM"], **shape)
    d, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    layout = [("model.embed_tokens.weight", (cfg.vocab_size, d))]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        layout += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (q, d)),
                   (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                   (p + "self_attn.o_proj.weight", (d, q)), (p + "post_attention_layernorm.weight", (d,)),
                   (p + "mlp.gate_proj.weight", (i, d)), (p + "mlp.up_proj.weight", (i, d)),
                   (p + "mlp.down_proj.weight", (d, i))]
    layout.append(("model.norm.weight", (d,)))
    if not cfg.tie_word_embeddings:
        layout.append(("lm_head.weight", (cfg.vocab_size, d)))
    g = torch.Generator().manual_seed(0)
    with atomic_dir(folder, overwrite=True) as tmp:
        writer = ShardedWriter(tmp, [(n, s, torch.bfloat16) for n, s in layout], int(shard_gb * 1024**3))
        for name, s in layout:
            if len(s) == 1:
                t = torch.ones(s)
            else:  # std 0.02 as Llama's initialiser: activations stay finite through every layer
                t = torch.randn(s, generator=g).mul_(0.02)
            writer.write(name, t.to(torch.bfloat16))
            del t
        writer.close()
        cfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return folder


def run_unlearn(model: Path, work: Path, a) -> tuple[dict, float]:
    from perta_fast.facts import make_facts

    forget, retain = make_facts(a.people, a.forget_people, seed=0)
    (work / "forget.json").write_text(json.dumps([r.__dict__ for r in forget]))
    (work / "retain.json").write_text(json.dumps([r.__dict__ for r in retain[:a.retain_rows]]))
    out = work / "unlearned"
    shutil.rmtree(work / "unlearned.work", ignore_errors=True)  # every step runs: nothing reused from a last run
    cmd = [sys.executable, "-m", "perta_fast", "unlearn", "--model", str(model), "--forget", str(work / "forget.json"),
           "--retain", str(work / "retain.json"), "--out", str(out), "--lora-rank", str(a.lora_rank), "--dtype", "bf16",
           "--method", "perta-fisher", "--epochs", str(a.epochs), "--lr", "1e-4", "--batch-size", str(a.batch_size),
           "--max-length", str(a.max_length), "--max-memory", str(a.max_memory), "--no-eval", "--device", a.device,
           "--write", "weights",
           "--overwrite"] + (["--gradient-checkpointing"] if a.gradient_checkpointing else [])
    print(" ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads((out / "perta_unlearn.json").read_text()), time.perf_counter() - t


def run_importance(model: Path, work: Path, a, model_bytes: int) -> dict:
    """`perta-fast importance` alone on the whole model (every parameter scored), grad and fisher, under
    --max-memory, writing fp16 ratio weights; peak memory polled from outside the process."""
    from safetensors import safe_open

    from perta_fast.facts import make_facts
    from perta_fast.plan import Shapes
    from perta_fast.memory import run_and_watch

    forget, retain = make_facts(a.people, a.forget_people, seed=0)
    retain = retain[:a.retain_rows]
    (work / "forget.json").write_text(json.dumps([r.__dict__ for r in forget]))
    (work / "retain.json").write_text(json.dumps([r.__dict__ for r in retain]))
    params = Shapes.from_config(json.loads((model / "config.json").read_text()), model / "config.json").params
    runs = []
    for method in a.methods.split(","):
        out = work / f"importance-{method}.safetensors"
        cmd = [sys.executable, "-m", "perta_fast", "importance", "--model", str(model), "--forget",
               str(work / "forget.json"), "--retain", str(work / "retain.json"), "--out", str(out), "--method", method,
               "--dtype", "bf16", "--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--max-memory",
               str(a.max_memory), "--write", "weights", "--weight-dtype", "fp16", "--device", a.device, "--overwrite"]
        cmd += ["--gradient-checkpointing"] if a.gradient_checkpointing else []
        print(" ".join(cmd), flush=True)
        got = run_and_watch(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        with safe_open(str(out), "pt") as f:
            groups = int(f.metadata()["groups"])
        anon, rss = got["peak_rss_anon_bytes"], got["peak_rss_bytes"]
        held = anon + min(model_bytes, rss - anon)  # the mapped weights count as held (see run_unlearn's table)
        samples = len(forget) + len(retain)
        runs.append({"method": method, "seconds": round(got["seconds"], 1), "groups": groups, "samples": samples,
                     "seconds_per_sample_per_pass": round(got["seconds"] / (samples * groups), 2),
                     "peak_rss_anon_bytes": anon, "peak_rss_bytes": rss, "held_bytes": held,
                     "under_budget": held <= a.max_memory * 1e9, "file_bytes": out.stat().st_size,
                     "file_bytes_per_param": round(out.stat().st_size / params, 3)})
        if not a.keep:
            out.unlink()
    return {"params": params, "model_bytes_bf16": model_bytes, "max_memory_gb": a.max_memory,
            "model_plus_two_fp32_accumulators_bytes": model_bytes + 8 * params, "device": a.device,
            "batch_size": a.batch_size, "max_length": a.max_length, "runs": runs}


def importance_table(shape: str, r: dict) -> str:
    lines = [f"{shape}: {r['params'] / 1e9:.2f} B parameters, bf16 checkpoint {r['model_bytes_bf16'] / 1e9:.2f} GB, "
             f"{r['device']}; `importance --max-memory {r['max_memory_gb']:g} --write weights --weight-dtype fp16` "
             f"(model + two fp32 accumulators would need {r['model_plus_two_fp32_accumulators_bytes'] / 1e9:.1f} GB)",
             "", "| method | groups | seconds | s/sample/pass | peak RssAnon GB | held GB | under budget | file GB "
             "| file bytes/param |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        lines.append(f"| {x['method']} | {x['groups']} | {x['seconds']:.0f} | {x['seconds_per_sample_per_pass']:.2f} | "
                     f"{x['peak_rss_anon_bytes'] / 1e9:.2f} | {x['held_bytes'] / 1e9:.2f} | {x['under_budget']} | "
                     f"{x['file_bytes'] / 1e9:.2f} | {x['file_bytes_per_param']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="llama-3.2-3b")
    ap.add_argument("--work", default=None, help="folder for the checkpoint and outputs (default: a temp folder)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--max-memory", type=float, default=13.0, help="importance's budget in GB")
    ap.add_argument("--people", type=int, default=8)
    ap.add_argument("--forget-people", type=int, default=2)
    ap.add_argument("--retain-rows", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--report-only", action="store_true", help="re-tabulate the last run kept in --work")
    ap.add_argument("--out", default=None, help="results stem (default: benchmarks/results/scale-DEVICE-SHAPE)")
    ap.add_argument("--importance-only", action="store_true",
                    help="only `importance` on the whole model (--methods), fp16 weights out, under --max-memory")
    ap.add_argument("--methods", default="grad,fisher")
    a = ap.parse_args(argv)

    from perta_fast.models import default_model
    from perta_fast.plan import RUNTIME_HOST_BYTES, plan_steps

    import tempfile

    work = Path(a.work or tempfile.mkdtemp(prefix="perta-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        model = build_checkpoint(work / a.shape, SHAPES[a.shape], default_model())
        build_seconds = time.perf_counter() - t
        model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        if a.importance_only:
            result = run_importance(model, work, a, model_bytes)
            out = Path(a.out or HERE / "results" / f"scale-importance-{a.device}-{a.shape}")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_name(out.name + ".json").write_text(json.dumps(result, indent=2))
            out.with_name(out.name + ".md").write_text(importance_table(a.shape, result))
            print(importance_table(a.shape, result))
            return 0
        if a.report_only:
            summary = json.loads((work / "unlearned" / "perta_unlearn.json").read_text())
            wall = summary["seconds"]["total"]
        else:
            summary, wall = run_unlearn(model, work, a)
        # the plan at the importance step's groups, as the run chose them
        from safetensors import safe_open

        with safe_open(summary["importance"], "pt") as f:
            groups = int(f.metadata()["groups"])
        plan = plan_steps(model, a.lora_rank, "all-linear", "bf16", "fisher", a.batch_size, a.max_length,
                          a.gradient_checkpointing, groups, device=a.device)
        full32 = plan_steps(model, None, "all-linear", "fp32", "fisher", a.batch_size, a.max_length,
                            a.gradient_checkpointing, device=a.device)
        keys = {"finetune": "finetune (LoRA)", "importance": "importance (fisher)", "merge": "merge"}
        full_keys = {"finetune": "finetune (full)", "importance": "importance (fisher)", "merge": "merge"}
        rows = []
        for step, key in keys.items():
            # what the step holds: private memory, plus the weights where they are not in it (a checkpoint
            # loaded in its own dtype is mapped, and the model computes from those pages). The resident set
            # is shown too; it also counts input pages the merge merely streams through (reclaimable cache).
            anon, rss = summary["peak_rss_anon_bytes"][step], summary["peak_rss_bytes"][step]
            measured = anon if step == "merge" else anon + min(model_bytes, rss - anon)
            predicted = plan["steps"][key][0] + RUNTIME_HOST_BYTES
            rows.append({"step": key, "seconds": summary["seconds"][step], "held_bytes": measured,
                         "peak_rss_anon_bytes": anon, "peak_rss_bytes": summary["peak_rss_bytes"][step],
                         "peak_cuda_allocated_bytes": summary.get("peak_cuda_allocated_bytes", {}).get(step),
                         "predicted_bytes": predicted, "predicted_over_held": round(predicted / measured, 3),
                         "full_fp32_pipeline_bytes": full32["steps"][full_keys[step]][0] + RUNTIME_HOST_BYTES})
        peak = max(r["held_bytes"] for r in rows)
        result = {"shape": a.shape, "params": plan["params"], "model_bytes_bf16": model_bytes,
                  "importance_file_bytes": Path(summary["importance"]).stat().st_size,
                  "device": a.device, "lora_rank": a.lora_rank, "max_memory_gb": a.max_memory, "groups": groups,
                  "batch_size": a.batch_size, "max_length": a.max_length, "epochs": a.epochs,
                  "gradient_checkpointing": a.gradient_checkpointing, "build_seconds": round(build_seconds, 1),
                  "wall_seconds": round(wall, 1), "steps": rows, "pipeline_peak_bytes": peak,
                  "pipeline_peak_over_model": round(peak / model_bytes, 2),
                  "full_fp32_peak_over_model": round(max(r["full_fp32_pipeline_bytes"] for r in rows) / model_bytes, 2)}
        out = Path(a.out or HERE / "results" / f"scale-{a.device}-{a.shape}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_name(out.name + ".json").write_text(json.dumps(result, indent=2))
        lines = [f"{a.shape}: {plan['params'] / 1e9:.2f} B parameters, bf16 checkpoint {model_bytes / 1e9:.2f} GB, "
                 f"{a.device}, LoRA rank {a.lora_rank}, importance in {groups} group(s) under --max-memory {a.max_memory:g}",
                 "", "| step | seconds | peak RssAnon GB | held GB (RssAnon + mapped weights) | peak RSS GB "
                 "| plan GB (+runtime) | plan / held | full fp32 pipeline GB (plan) |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['step']} | {r['seconds']:.0f} | {r['peak_rss_anon_bytes'] / 1e9:.2f} | "
                         f"{r['held_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
                         f"{r['predicted_bytes'] / 1e9:.2f} | {r['predicted_over_held']:.2f} | "
                         f"{r['full_fp32_pipeline_bytes'] / 1e9:.1f} |")
        lines += ["", f"pipeline peak: {peak / 1e9:.2f} GB = {result['pipeline_peak_over_model']}x the bf16 model "
                      f"(target <= 2.5x); full fp32 pipeline: {result['full_fp32_peak_over_model']}x"]
        out.with_name(out.name + ".md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    finally:
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
