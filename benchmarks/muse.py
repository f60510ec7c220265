"""MUSE-News with SmolLM2-135M-Instruct: TV, PerTA-grad and PerTA-fisher against GA and NPO, each unlearning news
articles from a target model that trained on them, measured by MUSE's own metrics (perta_fast.muse).

    python benchmarks/muse.py                      # CPU size, seeds 0 1 2
    python benchmarks/muse.py --seeds 0            # one seed
    python benchmarks/muse.py --size full --device cuda

The set-up (MUSE's Llama-2-7B target is not reachable offline, so the target is made here, and grounded):
- forget corpus: MUSE's verbmem rows (prompt + true continuation: the text VerbMem asks the model to continue),
  privleak forget excerpts, and the raw/forget.json articles that hold the answers of the KnowMem forget
  questions kept. A KnowMem question is matched to the article that holds its answer verbatim and shares the most
  words of four letters or more with the question (three at least); questions without such an article are left out.
  So every forget metric asks about text the target trained on.
- retain corpus: raw/retain_pool.json articles, without those equal to or sharing a 200-character passage with
  any forget text (MUSE's files repeat some articles across the two pools).
- target = SmolLM2 fine-tuned on forget + retain texts; retrained = SmolLM2 fine-tuned on the retain texts alone
  (PrivLeak's reference, and what unlearning should come close to).
- utility: VerbMem on retain articles the target trained on (the first 600 characters as prompt, the next 128
  tokens as truth), and MUSE's KnowMem retain questions, which are about MUSE's retain corpus (not in this copy):
  general news knowledge, not grounded in our retain texts (reported, labelled so).
- per seed: θ_ft = target fine-tuned on the forget texts (seeded order); importance at the target on the forget
  texts against the retain texts, less a seeded 20 % of each held back; λ calibrated on the held-back texts
  (perta_fast.calibration: the most forgetting that keeps retain probability ≥ 0.95 × the target's); GA and NPO
  (perta-fast baseline: lr 1e-5, weight decay 0.01, one warm-up epoch) for as many epochs as the target trained.
  Every model gets every MUSE metric.

This is the first version of the protocol: calibrated λ only. λ sweeps with matched VerbMem/KnowMem-forget,
a LoRA τ and the plot are still to come (issue 34). Results: benchmarks/results/muse-SIZE.json and .md; every step
is cached under --work so an interrupted run continues. MUSE's text is never written into the results.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tofu_steps import cached, cached_json, native_bf16, seeded_hold_out  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass
class Size:
    verbmem: int  # verbmem rows (their text trained on, VerbMem and extraction strength measured)
    privleak: int  # forget excerpts trained on, and as many holdout excerpts
    knowmem: int  # forget questions kept (their articles trained on), and as many retain questions
    retain: int  # retain_pool articles trained on
    retain_verbmem: int  # of those, continued for utility
    epochs: int


SIZES = {"smoke": Size(verbmem=3, privleak=8, knowmem=8, retain=20, retain_verbmem=2, epochs=1),  # code paths only
         # sized from the smoke run: ~0.87 s a 256-token window, forward and backward, on the 2-core CPU
         "cpu": Size(verbmem=4, privleak=6, knowmem=8, retain=12, retain_verbmem=4, epochs=2),
         "full": Size(verbmem=100, privleak=100, knowmem=100, retain=400, retain_verbmem=50, epochs=5)}
TRAIN = dict(lr=1e-4, batch_size=8, max_length=256, weight_decay=0.01, warmup_epochs=1)
METHODS = {"TV": None, "PerTA-grad": "grad", "PerTA-fisher": "fisher"}


def _words(text: str) -> set:
    return set(re.findall(r"[A-Za-z][a-z]{3,}", text))


def build_sets(folder: Path, size: Size) -> dict:
    """The grounded forget and retain texts and the evaluation data (see the module's docstring)."""
    from perta_fast.muse import load_muse

    raw_forget = json.loads((folder / "raw/forget.json").read_text())
    pool = json.loads((folder / "raw/retain_pool.json").read_text())
    data = load_muse(folder)
    corpus = "\n\n".join(raw_forget)
    verbmem = [r for r in data["verbmem"] if r["prompt"][:200] in corpus][:size.verbmem]
    excerpts = data["privleak_forget"][:size.privleak]
    questions, articles = [], []
    for q in data["forget_qa"]:
        holding = [a for a in raw_forget if q["answer"] in a]
        best = max(holding, key=lambda a: len(_words(q["question"]) & _words(a)), default=None)
        if best is not None and len(_words(q["question"]) & _words(best)) >= 3:
            questions.append(q)
            if best not in articles:
                articles.append(best)
        if len(questions) == size.knowmem:
            break
    forget = list(dict.fromkeys([r["prompt"] + r["gt"] for r in verbmem] + excerpts + articles))
    shingles = {t[i:i + 200] for t in forget + raw_forget for i in range(0, max(1, len(t) - 200), 100)}
    retain = []
    for a in dict.fromkeys(pool):
        if a not in raw_forget and not any(a[i:i + 200] in shingles for i in range(0, max(1, len(a) - 200), 100)):
            retain.append(a)
        if len(retain) == size.retain:
            break
    retain_verbmem = [{"prompt": a[:600], "gt": a[600:]} for a in retain[:size.retain_verbmem] if len(a) > 1200]
    evaluation = {**data, "verbmem": verbmem, "forget_qa": questions, "retain_qa": data["retain_qa"][:size.knowmem],
                  "privleak_forget": excerpts, "privleak_holdout": data["privleak_holdout"][:size.privleak]}
    return {"forget": forget, "retain": retain, "evaluation": evaluation, "retain_verbmem": retain_verbmem,
            "matched": {"verbmem": len(verbmem), "privleak": len(excerpts), "knowmem": len(questions),
                        "knowmem_articles": len(articles), "forget_texts": len(forget), "retain_texts": len(retain),
                        "retain_verbmem": len(retain_verbmem)}}


def evaluate(model_dir: Path, sets: dict, auc_retrained: float | None, bf16: bool) -> dict:
    from perta_fast.dtypes import autocast_for
    from perta_fast.models import load_model
    from perta_fast.muse import evaluate_muse, verbmem

    model, tok = load_model(model_dir)
    with autocast_for(model, bf16):
        res = evaluate_muse(model, tok, sets["evaluation"], auc_retrained)
        retain_verb = verbmem(model, tok, sets["retain_verbmem"])
    res["verbmem_r"] = 100 * statistics.mean(r["rougeL_f1"] for r in retain_verb["rows"])
    del res["generations"]  # MUSE's text stays out of the results
    return res


def summary(res: dict) -> dict:
    keys = ("verbmem_f", "knowmem_f", "privleak_auc", "privleak", "extraction_strength", "verbmem_r", "knowmem_r")
    return {k: res.get(k) for k in keys}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--muse", default=str(HERE.parent.parent / "shared" / "data" / "muse-news"))
    ap.add_argument("--work", default=None, help="cache (default: ~/.cache/perta_fast/muse-SIZE)")
    ap.add_argument("--model", default=None, help="base checkpoint (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="results .json (default: benchmarks/results/muse-SIZE.json)")
    a = ap.parse_args(argv)
    folder = Path(a.muse)
    if not (folder / "raw/forget.json").is_file():
        print(f"muse.py: {folder}: no MUSE-News data (raw/forget.json) here; pass --muse", file=sys.stderr)
        return 2
    from perta_fast.baselines import unlearn_by_training
    from perta_fast.calibration import calibrate
    from perta_fast.data import Text
    from perta_fast.importance import importance_file
    from perta_fast.merge import merge
    from perta_fast.models import cache_dir, default_model
    from perta_fast.options import BaselineOptions, CalibrateOptions, FinetuneOptions, MergeOptions
    from perta_fast.train import finetune

    size = SIZES[a.size]
    bf16 = native_bf16(a.device)
    work = Path(a.work) if a.work else cache_dir() / f"muse-{a.size}"
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else HERE / "results" / f"muse-{a.size}.json"
    base = Path(a.model) if a.model else default_model()
    t0 = time.perf_counter()
    sets = build_sets(folder, size)
    forget, retain = [Text(t) for t in sets["forget"]], [Text(t) for t in sets["retain"]]
    train = dict(TRAIN, epochs=size.epochs, bf16_autocast=bf16, device=a.device)
    seconds, results = {}, {"size": a.size, "sets": sets["matched"], "seeds": {}, "device": a.device or "auto"}

    def step(name, path, build):
        path, s = cached(path, build)
        seconds[name] = round(s, 1)
        return path

    def save():
        results["seconds"] = {**seconds, "total": round(time.perf_counter() - t0, 1)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        out.with_suffix(".md").write_text(markdown(results) + "\n")

    target = step("target", work / "target", lambda p: finetune(base, forget + retain, p, FinetuneOptions(**train)))
    retrained = step("retrained", work / "retrained", lambda p: finetune(base, retain, p, FinetuneOptions(**train)))
    ref, s = cached_json(work / "retrained.eval.json", lambda: evaluate(retrained, sets, None, bf16))
    seconds["eval retrained"] = round(s, 1)
    auc_retrained = ref["privleak_auc"]
    target_eval, s = cached_json(work / "target.eval.json", lambda: evaluate(target, sets, auc_retrained, bf16))
    seconds["eval target"] = round(s, 1)
    results.update(retrained=summary({**ref, "privleak": 0.0}), target=summary(target_eval))
    save()
    for seed in a.seeds:
        sw = work / f"seed{seed}"
        sw.mkdir(exist_ok=True)
        ft = step(f"seed{seed} θ_ft", sw / "theta_ft", lambda p: finetune(target, forget, p, FinetuneOptions(
            **dict(train, seed=seed))))
        (f_imp, f_val), (r_imp, r_val) = seeded_hold_out(forget, seed), seeded_hold_out(retain, seed)
        rows = {}
        for method, estimator in METHODS.items():
            imp = None
            if estimator:
                imp = step(f"seed{seed} importance {estimator}", sw / f"importance-{estimator}.safetensors",
                           lambda p, e=estimator: importance_file(target, f_imp, r_imp, p, method=e, batch_size=8,
                                                                  max_length=train["max_length"], device=a.device))
            options = MergeOptions(method="tv" if imp is None else "perta")
            cal, s = cached_json(sw / f"{method}.calibration.json", lambda i=imp, o=options: calibrate(
                target, ft, f_val, r_val, i, o, CalibrateOptions(device=a.device, bf16_autocast=bf16,
                                                                 max_length=train["max_length"])))
            seconds[f"seed{seed} calibrate {method}"] = round(s, 1)
            merged = step(f"seed{seed} merge {method}", sw / f"{method}-calibrated", lambda p, i=imp, o=options, c=cal:
                          merge(target, ft, p, i, MergeOptions(method=o.method, lam=c["lam"]), progress=False))
            res, s = cached_json(sw / f"{method}.eval.json", lambda m=merged: evaluate(m, sets, auc_retrained, bf16))
            seconds[f"seed{seed} eval {method}"] = round(s, 1)
            rows[method] = {"lam": cal["lam"], **summary(res)}
        for name in ("ga", "npo"):
            model = step(f"seed{seed} {name}", sw / name, lambda p, n=name: unlearn_by_training(
                target, forget, retain, p, BaselineOptions(method=n, seed=seed, bf16_autocast=bf16, device=a.device,
                                                           max_length=train["max_length"], epochs=size.epochs)))
            res, s = cached_json(sw / f"{name}.eval.json", lambda m=model: evaluate(m, sets, auc_retrained, bf16))
            seconds[f"seed{seed} eval {name}"] = round(s, 1)
            rows[name.upper()] = summary(res)
        results["seeds"][str(seed)] = rows
        save()
    results["aggregate"] = aggregate(results["seeds"])
    save()
    print(markdown(results))
    return 0


def aggregate(seeds: dict) -> dict:
    """Mean and sample sd over seeds of each method's metrics."""
    methods = next(iter(seeds.values())).keys() if seeds else []
    out = {}
    for m in methods:
        out[m] = {}
        for k in next(iter(seeds.values()))[m]:
            values = [s[m][k] for s in seeds.values() if s[m].get(k) is not None]
            if values:
                out[m][k] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def markdown(results: dict) -> str:
    cols = ("verbmem_f", "knowmem_f", "privleak", "extraction_strength", "verbmem_r", "knowmem_r")
    head = "| model | λ | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 2)
    lines = [f"MUSE-News, size {results['size']}: {json.dumps(results['sets'])}", "", head]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for name in ("target", "retrained"):
        if name in results:
            lines.append(f"| {name} | | " + " | ".join(fmt(results[name].get(c)) for c in cols) + " |")
    for m, by_metric in results.get("aggregate", {}).items():
        cells = [f"{by_metric[c]['mean']:.2f} ± {by_metric[c]['sd']:.2f}" if c in by_metric else "-" for c in cols]
        lam = f"{by_metric['lam']['mean']:.3g}" if "lam" in by_metric else ""
        lines.append(f"| {m} (mean ± sd, {len(results['seeds'])} seeds) | {lam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
