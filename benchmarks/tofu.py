"""The quality table: TOFU with SmolLM2-135M-Instruct, PerTA against TV and training-based unlearning.

    python benchmarks/tofu.py                    # CPU size: 5 authors, forget01's two as the forget set
    python benchmarks/tofu.py --size full --device cuda   # all 200 authors; forget01 and forget05

Steps (each cached in --work, so a rerun only redoes what changed):
  θ_full = base fine-tuned on the chosen authors; the retain-only model = base fine-tuned on them minus
  the forget authors; θ_ft = θ_full fine-tuned further on the forget set; then TV, PerTA-grad and
  PerTA-fisher over a λ grid, GA and NPO, each evaluated with TOFU's metrics (perta_fast.eval).
Writes benchmarks/results/tofu-<size>[-<forget>].json, .md (the table) and .png (forget quality against
model utility). TOFU's text is read from --tofu and never written into the results.
forget10 is not offered: this TOFU folder has no forget10_perturbed.json, so its truth ratio (and forget
quality) cannot be computed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS_PER_AUTHOR = 20


@dataclass
class Size:
    retain_authors: list[int]  # indices into full.json's 200 authors; the forget authors are the last ones
    eval_rows: dict  # role -> rows to evaluate (None: all)
    max_new_tokens: int
    lams: list[float]
    # training runs in bf16 autocast (fp32 weights); importance and evaluation stay in fp32
    full: dict = field(default_factory=lambda: dict(epochs=5, lr=1e-4, batch_size=8, bf16_autocast=True))
    forget_ft: dict = field(default_factory=lambda: dict(epochs=5, lr=1e-4, batch_size=8, bf16_autocast=True))
    baseline: dict = field(default_factory=lambda: dict(epochs=5, lr=1e-5, batch_size=8, bf16_autocast=True))


SIZES = {
    # 3 retain authors + forget01's 2: fits the 90-minute budget on the 2-core CPU
    "cpu": Size(list(range(3)), {"forget": None, "retain": 30, "real_authors": 30, "world_facts": 30}, 80,
                [0.5, 1.0, 2.0]),
    "full": Size(None, {"forget": None, "retain": None, "real_authors": None, "world_facts": None}, 200,
                 [0.5, 1.0, 2.0, 4.0], full=dict(epochs=5, lr=1e-4, batch_size=16, bf16_autocast=True),
                 forget_ft=dict(epochs=5, lr=1e-4, batch_size=16, bf16_autocast=True),
                 baseline=dict(epochs=5, lr=1e-5, batch_size=16, bf16_autocast=True)),
}


def spread(rows: list, n: int | None) -> list:
    """n rows spread evenly over the split (every author represented), or all."""
    if n is None or n >= len(rows):
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def build_sets(tofu: Path, size: Size, forget_split: str):
    from perta_fast.data import load_qa
    from perta_fast.eval import tofu_splits

    forget = load_qa(f"{tofu}:{forget_split}")
    if size.retain_authors is None:
        retain = load_qa(f"{tofu}:retain{100 - int(forget_split[-2:]):02d}")
    else:
        full = load_qa(f"{tofu}:full")
        retain = [r for a in size.retain_authors for r in full[a * ROWS_PER_AUTHOR:(a + 1) * ROWS_PER_AUTHOR]]
    splits = tofu_splits(tofu, forget_split)
    if size.retain_authors is not None:  # evaluate retain rows only of authors the models were trained on
        keep = {r.question for r in retain}
        splits["retain"] = [r for r in splits["retain"] if r.question in keep]
    splits = {role: spread(rows, size.eval_rows[role]) for role, rows in splits.items()}
    return forget, retain, splits


def cached(path: Path, build) -> tuple[Path, float]:
    """Run `build(path)` unless `path` exists (a finished step: every writer in perta_fast is atomic);
    the step's seconds are kept beside it, so a rerun still reports them."""
    def record():
        return path / "perta_step.json" if path.is_dir() else path.with_suffix(path.suffix + ".step.json")

    if path.exists():
        return path, json.loads(record().read_text())["seconds"] if record().exists() else float("nan")
    t0 = time.perf_counter()
    build(path)
    seconds = time.perf_counter() - t0
    record().write_text(json.dumps({"seconds": seconds}))
    return path, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--forget", default="forget01", choices=["forget01", "forget05"])
    ap.add_argument("--tofu", default=str(HERE.parent.parent / "shared" / "data" / "tofu"))
    ap.add_argument("--work", default=None, help="cache of models and results (default: ~/.cache/perta_fast/tofu-SIZE)")
    ap.add_argument("--model", default=None, help="base checkpoint (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--lams", default=None, help="comma-separated λ grid")
    ap.add_argument("--keep-models", action="store_true", help="keep unlearned checkpoints (off: deleted after eval)")
    ap.add_argument("--lora-rank", type=int, default=None,
                    help="also unlearn with a LoRA θ_ft of this rank (lr 1e-3) beside the full one, same λ grid")
    ap.add_argument("--lora-only", action="store_true",
                    help="with --lora-rank: evaluate only θ_full, the retain model and the LoRA rows (the full-θ_ft "
                         "rows and GA/NPO are those of the run without --lora-rank)")
    a = ap.parse_args(argv)

    import torch

    from perta_fast.baselines import BaselineOptions, unlearn_by_training
    from perta_fast.eval import EvalOptions, eval_checkpoint
    from perta_fast.importance import importance_file
    from perta_fast.merge import MergeOptions, merge
    from perta_fast.models import cache_dir, default_model
    from perta_fast.train import FinetuneOptions, finetune

    size = SIZES[a.size]
    if a.lams:
        size = replace(size, lams=[float(x) for x in a.lams.split(",")])
    tofu = Path(a.tofu)
    if not (tofu / "full.json").is_file():
        print(f"tofu.py: {tofu}: no TOFU data (full.json) here; pass --tofu", file=sys.stderr)
        return 2
    base = Path(a.model) if a.model else default_model()
    work = Path(a.work) if a.work else cache_dir() / f"tofu-{a.size}-{a.forget}"
    work.mkdir(parents=True, exist_ok=True)
    forget, retain, splits = build_sets(tofu, size, a.forget)
    eval_opts = EvalOptions(batch_size=16, max_new_tokens=size.max_new_tokens, device=a.device)
    t_start = time.perf_counter()

    def ft(src, rows, knobs):
        return lambda out: finetune(src, rows, out, FinetuneOptions(**knobs, device=a.device))

    steps = {}  # each step's own seconds, as first measured (a cached step keeps its figure)
    full, steps["θ_full fine-tune"] = cached(work / "theta_full", ft(base, retain + forget, size.full))
    retain_model, steps["retain model fine-tune"] = cached(work / "retain_model", ft(base, retain, size.full))
    theta_ft, steps["θ_ft fine-tune"] = cached(work / "theta_ft", ft(full, forget, size.forget_ft))
    thetas = {"": (theta_ft, None)}
    if a.lora_rank:
        lora = dict(size.forget_ft, lr=1e-3, lora_rank=a.lora_rank)
        adapter, steps["θ_ft (LoRA) fine-tune"] = cached(work / f"theta_ft_lora{a.lora_rank}", ft(full, forget, lora))
        thetas[" (LoRA)"] = (adapter, adapter)
    importance = {}
    for suffix, (_, adapter) in thetas.items():
        for method in ("grad", "fisher"):
            tag = f"{method}-lora{a.lora_rank}" if adapter else method
            importance[method + suffix], steps[f"importance {method}{suffix}"] = cached(
                work / f"importance-{tag}.safetensors",
                lambda out, m=method, ad=adapter: importance_file(full, forget, retain, out, m, 8, device=a.device,
                                                                   adapter=ad))

    def evaluate(name, folder, reference):
        path, steps[f"eval {name}"] = cached(work / "results" / f"{name}.json",
                                             lambda out: eval_checkpoint(folder, splits, out, reference, eval_opts))
        return json.loads(path.read_text())

    def unlearned(name, build):
        """Build an unlearned model unless its results exist; its seconds are kept beside the results."""
        seconds = work / "results" / f"{name}.seconds"
        if not seconds.exists():
            _, s = cached(work / "models" / name, build)
            seconds.parent.mkdir(exist_ok=True)
            seconds.write_text(str(s))
        return work / "models" / name, float(seconds.read_text())

    reference = evaluate("retain-model", retain_model, None)
    runs = [("θ_full", None, "theta_full", full, 0.0), ("retain model", None, "retain-model", retain_model, 0.0)]
    if a.lora_only and not a.lora_rank:
        print("tofu.py: --lora-only needs --lora-rank", file=sys.stderr)
        return 2
    for suffix, (tuned, _) in thetas.items():
        if a.lora_only and suffix == "":
            continue
        for method, imp in (("TV", None), ("PerTA-grad", "grad"), ("PerTA-fisher", "fisher")):
            for lam in size.lams:
                name = f"{method}{suffix.replace(' (LoRA)', f'-lora{a.lora_rank}')}_lam{lam:g}"
                key = imp + suffix if imp else None
                folder, steps[f"merge {name}"] = unlearned(name, lambda o, key=key, lam=lam, tuned=tuned: merge(
                    full, tuned, o, importance[key] if key else None, MergeOptions("perta" if key else "tv", lam),
                    progress=False))
                # the whole cost of task arithmetic: θ_ft's fine-tuning, importance (PerTA), the merge
                cost = (steps[f"θ_ft{suffix} fine-tune"] + (steps[f"importance {key}"] if key else 0.0)
                        + steps[f"merge {name}"])
                runs.append((method + suffix, lam, name, folder, cost))
    for method in () if a.lora_only else ("ga", "npo"):
        knobs = dict(size.baseline, method=method, device=a.device)
        folder, steps[method] = unlearned(method, lambda o, k=knobs: unlearn_by_training(
            full, forget, retain, o, BaselineOptions(**k)))
        runs.append((method.upper(), None, method, folder, steps[method]))

    table = {}
    for method, lam, name, folder, cost in runs:
        res = reference if method == "retain model" else evaluate(name, folder, reference)
        if method == "retain model":
            res = dict(res, forget_quality=1.0)  # the reference against itself: KS p-value 1 by definition
        label = method if lam is None else f"{method} λ={lam:g}"
        table[label] = {"method": method, "lam": lam, "unlearn_seconds": round(cost, 1),
                        **{k: res.get(k) for k in ("forget_quality", "ks_statistic", "model_utility")},
                        "splits": {r: {k: v for k, v in s.items() if k != "per_sample"} for r, s in res["splits"].items()}}
        if folder.parent == work / "models" and not a.keep_models:
            shutil.rmtree(folder, ignore_errors=True)

    stem = f"tofu-{a.size}-{a.forget}" + (f"-lora{a.lora_rank}" if a.lora_rank else "")
    summary = {
        "command": "python benchmarks/tofu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(base), "device": a.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "forget_set": f"{a.forget}: the last {len(forget) // ROWS_PER_AUTHOR} authors of full.json ({len(forget)} rows)",
        "retain_set": (f"authors {size.retain_authors[0]}-{size.retain_authors[-1]} of full.json ({len(retain)} rows)"
                       if size.retain_authors else f"every other author ({len(retain)} rows)"),
        "eval_rows": {r: len(rows) for r, rows in splits.items()},
        "settings": {"theta_full_and_retain_model": size.full, "theta_ft": size.forget_ft,
                     "ga_npo": size.baseline, "lams": size.lams, "eval": asdict(eval_opts)},
        "unlearn_seconds": "TV and PerTA: θ_ft's fine-tuning + importance (PerTA) + merge; GA/NPO: their training",
        "step_seconds": {k: round(v, 1) for k, v in steps.items()},
        "seconds_all_steps": round(sum(steps.values()), 1),  # what a cold run costs, without start-up
        "results": table,
        "wall_seconds_this_run": round(time.perf_counter() - t_start, 1),
    }
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    md = markdown(table)
    (out_dir / f"{stem}.md").write_text(md + "\n")
    plot(table, out_dir / f"{stem}.png", summary["forget_set"])
    print(md)
    print(f"\nwrote {out_dir / stem}.json (every metric), .md (this table), .png (the plot); "
          f"{summary['wall_seconds_this_run']:.0f} s this run")
    return 0


def markdown(table: dict) -> str:
    head = ("| method | λ | forget quality | model utility | forget ROUGE-L | retain ROUGE-L | forget prob | "
            "forget truth ratio | unlearning wall time (s) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in table.items():
        s = r["splits"]
        lam = "" if r["lam"] is None else f"{r['lam']:g}"
        lines.append(f"| {r['method']} | {lam} | {r['forget_quality']:.3g} | "
                     f"{r['model_utility']:.3f} | {s['forget']['rouge_l']:.3f} | {s['retain']['rouge_l']:.3f} | "
                     f"{s['forget']['prob']:.3f} | {s['forget']['truth_ratio']:.3f} | {r['unlearn_seconds']:.1f} |")
    return "\n".join(lines)


def plot(table: dict, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("tofu.py: matplotlib missing; no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    by_method: dict[str, list] = {}
    for label, r in table.items():
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        xs, ys = [r["model_utility"] for r in rs], [max(r["forget_quality"], 1e-12) for r in rs]
        if rs[0]["lam"] is None:  # one model: θ_full, the retain model, GA, NPO
            ax.scatter(xs, ys, label=method, marker="*", s=160, zorder=3)
        else:  # a curve over λ
            ax.plot(xs, ys, label=method, marker="o")
            for r in rs:
                ax.annotate(f"λ={r['lam']:g}", (r["model_utility"], max(r["forget_quality"], 1e-12)), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("model utility (higher = kept more)")
    ax.set_ylabel("forget quality, KS p-value (higher = closer to the retain-only model)")
    ax.set_title(f"TOFU, SmolLM2-135M-Instruct: {title}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
