"""The quality protocol: TOFU with SmolLM2-135M-Instruct, PerTA against TV (and GA/NPO), each at a λ
calibrated under the same retain constraint, over several seeds, with the set-up questions measured.

    python benchmarks/tofu.py                        # CPU size, seeds 0 1 2, the "scaled" recipe (~100 min, 2 cores)
    python benchmarks/tofu.py --quality --ablation   # everything: matched forget quality and the set-up knobs too
    python benchmarks/tofu.py --recipe tofu          # TOFU's lr 1e-5 for θ_full too (too low at 135M)
    python benchmarks/tofu.py --recipe fast          # the earlier recipe (lr 1e-4, no decay, no warm-up)
    python benchmarks/tofu.py --size full --device cuda --quality [--ablation] [--forget forget05]   # 200 authors

CPU size (stated in the output too): the forget set is the last 4 authors of full.json (80 rows; their
truth-ratio data are forget05_perturbed's last 80 rows); θ_full is base fine-tuned on those plus retain
authors 0-9; the retain model on authors 0-9 alone. Importance's retain set D_r is authors 0-5; the
evaluation's retain split is authors 6-9 (retain_perturbed rows), so no retain row both steers w and
scores it. Full size: the standard split, D_r = the retain authors outside retain_perturbed's 0-19.

Per seed (θ_ft's training order, and which 20 % of the forget set and of D_r is held back): θ_ft =
θ_full fine-tuned on the forget set; importance (grad, fisher) at θ_full on the rows not held back; for TV,
PerTA-grad and PerTA-fisher λ is calibrated on the held-back rows (perta_fast.calibration: the most
forgetting that keeps D_r's answer probability ≥ --keep-retain × θ_full's) and the model at that λ gets
TOFU's metrics; each method's λ sweep on evaluation rows gives its retain probability at the retain
model's forget probability (matched forgetting), and the model at that λ gets TOFU's metrics too (forget
quality, ROUGE and every utility component at matched forgetting). Then matched forget quality: each
method's forget quality at every grid λ from its calibrated λ up (the forget split scored, no generation),
the seed's level = the highest forget quality every method reaches, and each method at the smallest λ found
to reach it (four bisections in log λ below the first grid point that does) gets TOFU's metrics. θ_full and the retain model are trained once (seed 0).

Ablation (first seed, sweeps only): ε = 1e-8, α = n_r/n_f and α = 99 (summed instead of mean set
importance: TOFU forget01 with retain99), p = 2, importance at θ_0, a LoRA θ_ft, and θ_ft at the recipe's
other learning rate; with w's statistics (mean, correlation with |τ|, cosine and norm of w⊙τ against τ).
Order: the first two seeds, the ablation, the third seed, then matched forget quality seed by seed.

The default run is the part of the protocol a 2-core session can afford: set-up and 3 seeds to matched
forget probability (run F: 98.2 min for this command from a fresh clone, 2 cores with AVX-512 BF16,
scoring in bf16; run E 99.4 min). Matched forget
quality (--quality, ~20 min a seed there) and the ablation (--ablation, ~68 min in fp32 scoring) are one
flag each; a rerun with them continues from the cache.

Training uses bf16 autocast (fp32 weights) where bf16 matmuls are native (a GPU, or a CPU with AVX-512 BF16
or AMX) and fp32 elsewhere; an fp32 run is another set of models, so its cache and results carry "-fp32".
Scoring (evaluations, calibrations, sweeps) is in bf16 autocast where bf16 is native and fp32 elsewhere
(--scoring fp32 forces fp32: other numbers, so a bf16-scored run has its own cache and results, "-bf16scoring").
Every step is cached under --work; results are written after each stage, so an interrupted run still
leaves a table of what finished and a rerun continues. TOFU's text is never written into the results.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS_PER_AUTHOR = 20
GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
# bf16 matmuls, fp32 weights and optimizer state, where bf16 is native (main() turns it off elsewhere: a CPU
# without AVX-512 BF16 or AMX emulates bf16 matmuls ~40x slower than fp32)
TRAIN = dict(batch_size=8, bf16_autocast=True)
TOFU_OPT = dict(weight_decay=0.01, warmup_epochs=1, **TRAIN)  # TOFU's AdamW settings
RECIPES = {  # θ_full and the retain model; θ_ft; a LoRA θ_ft (10× the full learning rate, as is usual);
    # θ_ft at the other learning rate, for the ablation
    # TOFU's own: lr 1e-5 everywhere. At 135M, 5 epochs leave θ_full's forget answer probability at 0.285
    # (base 0.14): it has barely learnt the forget set, so there is little to unlearn.
    "tofu": {"full": dict(epochs=5, lr=1e-5, **TOFU_OPT), "forget_ft": dict(epochs=5, lr=1e-5, **TOFU_OPT),
             "lora": dict(epochs=5, lr=1e-4, lora_rank=16, **TOFU_OPT),
             "forget_ft_other": dict(epochs=5, lr=1e-4, **TOFU_OPT)},
    # TOFU's settings with the learning rate a 135M model needs to learn its facts, and a public-style
    # θ_ft at lr 1e-5 (the ablation: θ_ft at lr 1e-4, ten times harsher, as before)
    "scaled": {"full": dict(epochs=5, lr=1e-4, **TOFU_OPT), "forget_ft": dict(epochs=5, lr=1e-5, **TOFU_OPT),
               "lora": dict(epochs=5, lr=1e-4, lora_rank=16, **TOFU_OPT),
               "forget_ft_other": dict(epochs=5, lr=1e-4, **TOFU_OPT)},
    # the earlier runs' recipe: lr 1e-4, no weight decay, no warm-up
    "fast": {"full": dict(epochs=5, lr=1e-4, **TRAIN), "forget_ft": dict(epochs=5, lr=1e-4, **TRAIN),
             "lora": dict(epochs=5, lr=1e-3, lora_rank=16, **TRAIN),
             "forget_ft_other": dict(epochs=5, lr=1e-5, **TRAIN)},
}
BASELINE = dict(epochs=5, lr=1e-5, **TRAIN)  # GA/NPO: weight decay 0.01 and one warm-up epoch by default
METHODS = {"TV": None, "PerTA-grad": "grad", "PerTA-fisher": "fisher"}


@dataclass
class Size:
    forget_authors: list | None  # indices into full.json's 200 authors; None: the --forget split
    train_retain_authors: list | None  # None: every author outside the forget set
    importance_retain_authors: list | None  # D_r; None: the training retain authors outside retain_perturbed
    eval_retain_authors: list | None  # retain_perturbed rows of these; None: all of them
    eval_rows: dict  # role -> rows evaluated (None: all), spread over the split
    sweep_rows: int  # forget and retain rows scored at each λ of a sweep
    max_new_tokens: int


SIZES = {
    "cpu": Size(list(range(196, 200)), list(range(10)), list(range(6)), list(range(6, 10)),
                {"forget": None, "retain": 40, "real_authors": 30, "world_facts": 30}, 40, 80),
    "full": Size(None, None, None, None, {r: None for r in ("forget", "retain", "real_authors", "world_facts")},
                 200, 200),
}


def spread(rows: list, n: int | None) -> list:
    """n rows spread evenly over the split (every author represented), or all."""
    if n is None or n >= len(rows):
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def authors(rows: list, which) -> list:
    return [r for a in which for r in rows[a * ROWS_PER_AUTHOR:(a + 1) * ROWS_PER_AUTHOR]]


def build_sets(tofu: Path, size: Size, forget_split: str) -> dict:
    """forget (θ_full's and θ_ft's forget rows), train_retain, importance_retain (D_r), eval splits."""
    from perta_fast.data import load_qa
    from perta_fast.eval import tofu_splits

    full = load_qa(f"{tofu}:full")
    if size.forget_authors is None:
        forget = load_qa(f"{tofu}:{forget_split}")
        n_authors = len(full) // ROWS_PER_AUTHOR - len(forget) // ROWS_PER_AUTHOR
        train_retain = full[:n_authors * ROWS_PER_AUTHOR]
        importance_retain = train_retain[20 * ROWS_PER_AUTHOR:]  # retain_perturbed: authors 0-19 (and one row)
        splits = tofu_splits(tofu, forget_split)
    else:
        forget, train_retain = authors(full, size.forget_authors), authors(full, size.train_retain_authors)
        importance_retain = authors(full, size.importance_retain_authors)
        splits = tofu_splits(tofu, "forget05")  # the last 10 authors: holds every CPU-size forget author
        asked = {r.question for r in forget}
        splits["forget"] = [r for r in splits["forget"] if r.question in asked]
        kept = {r.question for r in authors(full, size.eval_retain_authors)}
        splits["retain"] = [r for r in splits["retain"] if r.question in kept]
    evaluated = {r.question for r in splits["retain"]}  # retain_perturbed strays once outside authors 0-19
    importance_retain = [r for r in importance_retain if r.question not in evaluated]
    splits = {role: spread(rows, size.eval_rows[role]) for role, rows in splits.items()}
    return {"forget": forget, "train_retain": train_retain, "importance_retain": importance_retain, "splits": splits}


def cached(path: Path, build) -> tuple[Path, float]:
    """Run `build(path)` unless `path` exists (a finished step: every writer in perta_fast is atomic);
    the step's seconds are kept beside it, so a rerun still reports them."""
    record = path.with_name(path.name + ".step.json")
    if path.exists():
        return path, json.loads(record.read_text())["seconds"] if record.exists() else float("nan")
    t0 = time.perf_counter()
    build(path)
    seconds = time.perf_counter() - t0
    record.write_text(json.dumps({"seconds": seconds}))
    return path, seconds


def cached_json(path: Path, compute) -> tuple[dict, float]:
    """`compute()`'s value stored at `path` unless a finished run stored it; with its seconds, as cached()
    keeps them: calibrations and sweeps are steps of the protocol's wall time too."""
    from perta_fast.outputs import atomic_file

    def build(out: Path) -> None:
        value = compute()
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps(value))

    path, seconds = cached(path, build)
    return json.loads(path.read_text()), seconds


def seeded_hold_out(rows: list, seed: int, fraction: float = 0.2) -> tuple[list, list]:
    """(rows for importance, validation rows): a seed-dependent 20 %, each part in file order."""
    from perta_fast.data import hold_out

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    kept_idx, held_idx = hold_out(order, fraction)
    return [rows[i] for i in sorted(kept_idx)], [rows[i] for i in sorted(held_idx)]


def qa(rows):
    from perta_fast.data import QA

    return [QA(r.question, r.answer) for r in rows]


def matched(points: list[dict], target: float) -> dict | None:
    """Where the forget probability first falls to `target`: λ and retain probability, linearly
    interpolated between the two points around it; None if the grid never gets there."""
    prev = {"lam": 0.0, **points[0]["theta_full"]}
    for p in points:
        if p["forget"] <= target:
            t = 0.0 if p["forget"] == prev["forget"] else (prev["forget"] - target) / (prev["forget"] - p["forget"])
            return {"lam": prev["lam"] + t * (p["lam"] - prev["lam"]),
                    "retain": prev["retain"] + t * (p["retain"] - prev["retain"])}
        prev = p
    return None


def quality_target(curves: dict[str, list[dict]]) -> float | None:
    """One seed's matched forget-quality level: the highest forget quality that every method reaches
    somewhere on its λ grid (a level one method never reaches cannot be matched)."""
    peaks = [max(p["forget_quality"] for p in c) for c in curves.values() if c]
    return min(peaks) if peaks else None


def first_reaching(points: list[dict], target: float, score, steps: int = 4) -> dict | None:
    """The smallest λ found whose measured forget quality reaches `target`: the first grid point that does,
    then `steps` bisections in log λ between it and the point before, `score(λ)` measuring each (a
    p-value is not interpolated: it moves in discrete KS steps). No early stop at a point measured at the
    level itself: a smaller λ may sit at the same KS step, and stopping would evaluate the method whose level
    it is (its own peak) deeper than it needs to go. None if no point reaches it."""
    lo = None
    for hi in points:
        if hi["forget_quality"] >= target:
            break
        lo = hi
    else:
        return None
    for _ in range(steps if lo is not None else 0):
        mid = score(round(math.sqrt(lo["lam"] * hi["lam"]), 4))
        lo, hi = (lo, mid) if mid["forget_quality"] >= target else (mid, hi)
    return hi


def from_calibrated(grid, lam: float) -> list:
    """The grid from the last point at or below the calibrated λ up: below it a method forgets less than
    the retain constraint allows, and forget quality sits at its floor there (seed 0 of run B)."""
    below = [g for g in grid if g <= lam]
    return [g for g in grid if g >= (below[-1] if below else grid[0])]


def quality_scan(grid, calibrated: float, matched_lam: float | None, score) -> list[dict]:
    """Forget quality over the grid from one octave below matched forgetting (where the forget probability
    reaches the retain model's, and forget quality peaks near it), then down one grid point at a time,
    never below the calibrated λ's, while the lowest point is above the curve's minimum: the rise from the
    floor, where any level is first reached, is then inside the scan. The whole range from the calibrated
    λ where the grid never reaches matched forgetting. On run B's records (every point from the calibrated
    λ up) it scores 31 of the 50 points and finds the same level in every seed."""
    allowed = from_calibrated(grid, calibrated)
    below_half = [g for g in allowed if matched_lam is not None and g <= matched_lam / 2]
    start = below_half[-1] if below_half else allowed[0]
    lower = [g for g in allowed if g < start]
    curve = [score(g) for g in allowed if g >= start]
    while lower and curve[0]["forget_quality"] > min(p["forget_quality"] for p in curve):
        curve.insert(0, score(lower.pop()))
    return curve


def w_statistics(full, finetuned, importance, alpha=1.0, power=1.0, eps=1e-16) -> dict:
    """How w relates to τ over every scored weight: mean w, Pearson correlation of w with |τ|, cosine and
    norm ratio of w⊙τ against τ (1 and 1 for TV)."""
    from perta_fast.io import Checkpoint, SafetensorsFile
    from perta_fast.lora import is_adapter, task_vectors
    from perta_fast.ops import ratio_weights

    imp = SafetensorsFile(importance)
    base = Checkpoint(full)
    taus = task_vectors(finetuned, full) if is_adapter(finetuned) else None
    ft = None if taus is not None else Checkpoint(finetuned)
    acc = dict.fromkeys(("n", "w", "ww", "a", "aa", "wa", "tt", "wtt", "wwtt"), 0.0)
    for key in imp.keys():
        if not key.startswith("forget/"):
            continue
        name = key[len("forget/"):]
        tau = taus[name] if taus is not None else ft.get(name).double() - base.get(name).double()
        w = ratio_weights(imp.get(key), imp.get("retain/" + name), alpha, power, eps).double()
        tau, a = tau.double(), tau.double().abs()
        for k, v in (("n", w.numel()), ("w", w.sum()), ("ww", (w * w).sum()), ("a", a.sum()), ("aa", (a * a).sum()),
                     ("wa", (w * a).sum()), ("tt", (tau * tau).sum()), ("wtt", (w * tau * tau).sum()),
                     ("wwtt", (w * w * tau * tau).sum())):
            acc[k] += float(v)
    n = acc["n"]
    cov = acc["wa"] / n - acc["w"] / n * acc["a"] / n
    var_w, var_a = acc["ww"] / n - (acc["w"] / n) ** 2, acc["aa"] / n - (acc["a"] / n) ** 2
    return {"mean_w": acc["w"] / n, "corr_w_abs_tau": cov / math.sqrt(var_w * var_a) if var_w > 0 and var_a > 0 else None,
            "cos_wtau_tau": acc["wtt"] / math.sqrt(acc["wwtt"] * acc["tt"]) if acc["wwtt"] > 0 else None,
            "norm_ratio": math.sqrt(acc["wwtt"] / acc["tt"]) if acc["tt"] > 0 else None}


def mean_sd(values: list) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": m, "sd": sd, "n": len(vals)}


def metrics(res: dict) -> dict:
    """The numbers a row of the tables shows, from an eval results dict."""
    s = res["splits"]
    out = {"forget_quality": res.get("forget_quality"), "model_utility": res.get("model_utility")}
    for role in ("forget", "retain", "real_authors", "world_facts"):
        for key in ("prob", "rouge_l", "truth_ratio"):
            out[f"{role} {key}"] = s[role].get(key)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="scaled")
    ap.add_argument("--forget", default="forget01", choices=["forget01", "forget05"], help="full size's forget split")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--keep-retain", type=float, default=0.95)
    ap.add_argument("--ablation", action="store_true", help="also the set-up knobs on the first seed (ε, α, p, θ_0, "
                    "LoRA τ, θ_ft's other learning rate; ~68 min on 2 cores)")
    ap.add_argument("--quality", action="store_true", help="also matched forget quality: ~8 forget-split scorings a "
                    "method and seed (~20 min a seed on 2 cores)")
    ap.add_argument("--scoring", choices=["auto", "fp32", "bf16"], default="auto", help="precision of evaluations, "
                    "calibrations and sweeps: bf16 autocast needs native bf16; auto: bf16 where native, else fp32")
    ap.add_argument("--baselines", action="store_true", help="also GA and NPO, each seed (the full size always)")
    ap.add_argument("--tofu", default=str(HERE.parent.parent / "shared" / "data" / "tofu"))
    ap.add_argument("--work", default=None, help="cache (default: ~/.cache/perta_fast/tofu-SIZE-RECIPE)")
    ap.add_argument("--model", default=None, help="base checkpoint (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--name", default=None, help="results file stem (default: the cache folder's name): keeps an earlier "
                    "run's results files beside this one's")
    a = ap.parse_args(argv)

    tofu = Path(a.tofu)
    if not (tofu / "full.json").is_file():
        print(f"tofu.py: {tofu}: no TOFU data (full.json) here; pass --tofu", file=sys.stderr)
        return 2
    from perta_fast.models import cache_dir, default_model

    size, recipe = SIZES[a.size], RECIPES[a.recipe]
    fast_bf16 = native_bf16(a.device)
    if a.scoring == "bf16" and not fast_bf16:
        print("tofu.py: --scoring bf16 needs native bf16 matmuls (a GPU, or a CPU with AVX-512 BF16 or AMX)",
              file=sys.stderr)
        return 2
    a.bf16_scoring = a.scoring == "bf16" or (a.scoring == "auto" and fast_bf16)
    if not fast_bf16:
        recipe = {step: dict(knobs, bf16_autocast=False) for step, knobs in recipe.items()}
        BASELINE["bf16_autocast"] = False
    base = Path(a.model) if a.model else default_model()
    # runs trained in fp32 are other models than bf16-autocast ones: their own cache and results
    stem = f"tofu-{a.size}-{a.recipe}" + (f"-{a.forget}" if a.size == "full" else "") + ("" if fast_bf16 else "-fp32") \
        + ("-bf16scoring" if a.bf16_scoring else "")
    work = Path(a.work) if a.work else cache_dir() / stem
    work.mkdir(parents=True, exist_ok=True)
    run = Protocol(a, size, recipe, base, work, build_sets(tofu, size, a.forget), a.name or stem)
    run.shared()
    for seed in a.seeds[:2]:  # the ablation (first seed) before the third seed: it answers more per minute
        run.seed(seed)
    if a.ablation:
        run.ablation(a.seeds[0])
    for seed in a.seeds[2:]:
        run.seed(seed)
    if a.quality:  # last: ~8 forget-split scorings per method and seed, so the tables above come first
        for seed in a.seeds:
            run.quality(seed)
    print(markdown(run.summary))
    print(f"\nwrote {HERE / 'results' / run.stem}.json, .md, .png; {time.perf_counter() - run.t0:.0f} s this run")
    return 0


def native_bf16(device) -> bool:
    import torch

    from perta_fast.dtypes import cpu_has_fast_bf16

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


class Protocol:
    def __init__(self, a, size: Size, recipe: dict, base: Path, work: Path, sets: dict, stem: str):
        import torch

        from perta_fast.eval import EvalOptions

        self.a, self.size, self.recipe, self.base, self.work, self.sets, self.stem = a, size, recipe, base, work, sets, stem
        self.eval_opts = EvalOptions(max_new_tokens=size.max_new_tokens, device=a.device, bf16_autocast=a.bf16_scoring)
        self.t0 = time.perf_counter()
        self.steps: dict[str, float] = {}
        splits = sets["splits"]
        self.sweep_sets = {"forget": qa(spread(splits["forget"], size.sweep_rows)),
                           "retain": qa(spread(splits["retain"], size.sweep_rows))}
        self.summary = {
            "command": "python benchmarks/tofu.py " + " ".join(sys.argv[1:]),
            "model": str(base), "device": a.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "recipe": {a.recipe: recipe}, "scoring": "bf16 autocast" if a.bf16_scoring else "fp32",
            "keep_retain": a.keep_retain, "grid": GRID,
            "sets": {"forget_rows": len(sets["forget"]), "train_retain_rows": len(sets["train_retain"]),
                     "importance_retain_rows": len(sets["importance_retain"]),
                     "eval_rows": {r: len(v) for r, v in splits.items()}, "sweep_rows": size.sweep_rows,
                     "size": asdict(size)},
            "models": {}, "seeds": {}, "ablation": {}}

    # ---- steps ----

    def train(self, out: Path, src, rows, knobs: dict, seed: int = 0) -> Path:
        from perta_fast.train import FinetuneOptions, finetune

        path, self.steps[f"train {self._step_name(out)}"] = cached(out, lambda o: finetune(
            src, rows, o, FinetuneOptions(**knobs, seed=seed, device=self.a.device)))
        return path

    def importance(self, out: Path, model, forget, retain, method, adapter=None) -> Path:
        from perta_fast.importance import importance_file

        path, self.steps[f"importance {self._step_name(out)}"] = cached(out, lambda o: importance_file(
            model, forget, retain, o, method, 8, device=self.a.device, adapter=adapter, progress=False))
        return path

    def _step_name(self, out: Path) -> str:  # seedN/theta_ft: every seed has a theta_ft
        return str(out.relative_to(self.work)) if out.is_relative_to(self.work) else out.name

    def evaluate(self, name: str, folder, reference) -> dict:
        from perta_fast.eval import eval_checkpoint

        path, self.steps[f"eval {name}"] = cached(self.work / "results" / f"{name}.json", lambda o: eval_checkpoint(
            folder, self.sets["splits"], o, reference, self.eval_opts))
        return json.loads(path.read_text())

    def write(self) -> None:
        self.summary["step_seconds"] = {k: round(v, 1) for k, v in self.steps.items()}
        self.summary["seconds_all_steps"] = round(sum(v for v in self.steps.values() if v == v), 1)
        self.summary["wall_seconds_this_run"] = round(time.perf_counter() - self.t0, 1)
        self.summary["aggregate"] = aggregate(self.summary)
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        (out / f"{self.stem}.json").write_text(json.dumps(self.summary, indent=1, ensure_ascii=False))
        (out / f"{self.stem}.md").write_text(markdown(self.summary) + "\n")
        plot(self.summary, out / f"{self.stem}.png")

    # ---- stages ----

    def shared(self) -> None:
        """θ_full, the retain model, and the three reference evaluations (base, θ_full, retain model)."""
        from perta_fast.calibration import probability_curve

        s, w = self.sets, self.work
        (w / "results").mkdir(exist_ok=True)
        self.full = self.train(w / "theta_full", self.base, s["train_retain"] + s["forget"], self.recipe["full"])
        self.retain_model = self.train(w / "retain_model", self.base, s["train_retain"], self.recipe["full"])
        self.reference = self.evaluate("retain-model", self.retain_model, None)
        for name, folder in (("base", self.base), ("theta_full", self.full)):
            self.summary["models"][name] = metrics(self.evaluate(name, folder, self.reference))
        self.summary["models"]["retain model"] = dict(metrics(self.reference), forget_quality=1.0)
        # the retain model's forget probability on the sweep rows: the matched-forgetting target
        self.target, self.steps["sweep target"] = cached_json(
            w / "results" / "sweep-target.json", lambda: probability_curve(
                self.retain_model, self.retain_model, None, _merge_opts("TV"), self.sweep_sets, [0.0], self.a.device,
                self.a.bf16_scoring)[0])
        self.summary["sweep_target"] = {k: self.target[k] for k in ("forget", "retain")}
        self.write()

    def seed(self, seed: int) -> None:
        from perta_fast.calibration import CalibrateOptions, calibrate

        s, w = self.sets, self.work / f"seed{seed}"
        w.mkdir(exist_ok=True)
        forget_kept, forget_val = seeded_hold_out(s["forget"], seed)
        retain_kept, retain_val = seeded_hold_out(s["importance_retain"], seed)
        theta_ft = self.train(w / "theta_ft", self.full, s["forget"], self.recipe["forget_ft"], seed)
        record = self.summary["seeds"].setdefault(str(seed), {"methods": {}})
        record.update(forget_importance_rows=len(forget_kept), forget_validation_rows=len(forget_val),
                      retain_importance_rows=len(retain_kept), retain_validation_rows=len(retain_val))
        for method, kind in METHODS.items():
            imp = self.importance(w / f"importance-{kind}.safetensors", self.full, forget_kept, retain_kept,
                                  kind) if kind else None
            opts = _merge_opts(method)
            cal, self.steps[f"calibrate seed{seed} {method}"] = cached_json(
                w / f"calibration-{method}.json", lambda: calibrate(self.full, theta_ft, forget_val, retain_val, imp, opts,
                CalibrateOptions(keep_retain=self.a.keep_retain, lams=GRID, bisect=3, generate=False,
                                 device=self.a.device, bf16_autocast=self.a.bf16_scoring)))
            res = self._evaluate_at(f"seed{seed}-{method}", theta_ft, imp, replace(opts, lam=cal["lam"]))
            curve, self.steps[f"sweep seed{seed} {method}"] = cached_json(w / f"sweep-{method}.json",
                                                                          lambda: self._sweep(theta_ft, imp, opts))
            match = matched(curve, self.target["forget"])
            entry = record["methods"][method] = {"lam": cal["lam"], "calibration_note": cal["note"], **metrics(res),
                                                 "sweep": curve, "matched": match}
            self.write()
            if match is not None:  # every TOFU metric at matched forgetting, not the sweep's retain prob alone
                at_match = self._evaluate_at(f"seed{seed}-{method}-matched", theta_ft, imp,
                                             replace(opts, lam=round(match["lam"], 4)))
                entry["at_match"] = {"lam": round(match["lam"], 4), **metrics(at_match)}
                self.write()
        if self.a.baselines or self.a.size == "full":
            self._baselines(seed, record)

    def quality(self, seed: int) -> None:
        """Matched forget quality: each method's forget quality along its λ grid around matched forgetting
        (quality_scan; the forget split scored against the retain model's truth ratios, no generation), the seed's level
        (the lowest of the methods' peaks), the smallest λ reaching it by bisection, and every method there
        with all of TOFU's metrics."""
        w, record = self.work / f"seed{seed}", self.summary["seeds"][str(seed)]
        curves, imps, scorers = {}, {}, {}
        for method, kind in METHODS.items():
            imps[method] = w / f"importance-{kind}.safetensors" if kind else None
            scorers[method] = self._forget_quality_at(w / "quality-sweep" / method, w / "theta_ft", imps[method],
                                                      _merge_opts(method))
            entry = record["methods"][method]
            curves[method] = entry["quality_sweep"] = quality_scan(GRID, entry["lam"], (entry["matched"] or {}).get("lam"),
                                                                   scorers[method])
        target = record["quality_target"] = quality_target(curves)
        self.write()
        for method, curve in curves.items():
            found = first_reaching(curve, target, scorers[method])
            self.steps[f"quality sweep seed{seed} {method}"] = sum(p["seconds"] for p in scorers[method].scored)
            res = self._evaluate_at(f"seed{seed}-{method}-quality-lam{found['lam']:g}", w / "theta_ft", imps[method],
                                    replace(_merge_opts(method), lam=found["lam"]))
            bisected = scorers[method].scored[len(curve):]
            record["methods"][method]["at_quality"] = {"lam": found["lam"], "bisected": bisected, **metrics(res)}
            self.write()

    def _forget_quality_at(self, folder: Path, finetuned, imp, opts):
        """score(λ): forget quality, probability and truth ratio of θ_full merged at λ in memory, each λ
        cached on its own (a point costs about half an evaluation: a cut run keeps what it scored);
        score.scored lists every point it returned."""
        from perta_fast.calibration import ModelAtLambda
        from perta_fast.eval import evaluate_split, forget_quality

        reference = self.reference["splits"]["forget"]["per_sample"]["truth_ratio_raw"]
        at = None
        folder.mkdir(parents=True, exist_ok=True)

        def measure(lam):
            nonlocal at
            t0 = time.perf_counter()
            at = at or ModelAtLambda(self.full, finetuned, imp, opts, self.a.device)
            at.set(lam)
            res = evaluate_split(at.model, at.tokenizer, self.sets["splits"]["forget"], "forget",
                                 replace(self.eval_opts, generate=False))
            return {"lam": lam, "forget_quality": forget_quality(res["per_sample"]["truth_ratio_raw"], reference)[0],
                    "forget_prob": res["prob"], "forget_truth_ratio": res["truth_ratio"],
                    "seconds": round(time.perf_counter() - t0, 1)}

        def score(lam):
            point, _ = cached_json(folder / f"lam{lam:g}.json", lambda: measure(lam))  # its seconds are in it
            score.scored.append(point)
            return point

        score.scored = []
        return score

    def _evaluate_at(self, name: str, finetuned, imp, opts) -> dict:
        """TOFU's metrics of θ_full merged with `opts` (its λ included); the merged model is deleted after."""
        from perta_fast.merge import merge

        if not (self.work / "results" / f"{name}.json").exists():
            _, self.steps[f"merge {name}"] = cached(self.work / "models" / name, lambda o: merge(
                self.full, finetuned, o, imp, opts, progress=False))
        res = self.evaluate(name, self.work / "models" / name, self.reference)
        shutil.rmtree(self.work / "models" / name, ignore_errors=True)
        return res

    def _sweep(self, finetuned, imp, opts) -> list[dict]:
        from perta_fast.calibration import probability_curve

        theta_full, *points = probability_curve(self.full, finetuned, imp, opts, self.sweep_sets, (0.0,) + GRID,
                                                self.a.device, self.a.bf16_scoring)
        return [dict(p, theta_full={"forget": theta_full["forget"], "retain": theta_full["retain"]}) for p in points]

    def _baselines(self, seed: int, record: dict) -> None:
        from perta_fast.baselines import BaselineOptions, unlearn_by_training

        s = self.sets
        for method in ("ga", "npo"):
            name = f"seed{seed}-{method.upper()}"
            if not (self.work / "results" / f"{name}.json").exists():
                _, self.steps[name] = cached(self.work / "models" / name, lambda o, m=method: unlearn_by_training(
                    self.full, s["forget"], s["importance_retain"], o,
                    BaselineOptions(method=m, seed=seed, device=self.a.device, **BASELINE)))
            res = self.evaluate(name, self.work / "models" / name, self.reference)
            shutil.rmtree(self.work / "models" / name, ignore_errors=True)
            record["methods"][method.upper()] = metrics(res)
            self.write()

    def ablation(self, seed: int) -> None:
        """One knob at a time from PerTA's defaults, sweeps only (matched forgetting) and w's statistics;
        the groups that need no new model or importance first, so a run cut short still answers most."""
        s, w = self.sets, self.work / f"seed{seed}"
        forget_kept, _ = seeded_hold_out(s["forget"], seed)
        retain_kept, _ = seeded_hold_out(s["importance_retain"], seed)
        theta_ft, ratio = w / "theta_ft", len(retain_kept) / len(forget_kept)

        def at_full(kind):
            return w / f"importance-{kind}.safetensors"

        def knobs():
            variants = {f"PerTA-{k}": (theta_ft, at_full(k), {}) for k in ("grad", "fisher")}
            for name, knob in (("ε=1e-8", {"eps": 1e-8}), (f"α=n_r/n_f={ratio:g}", {"alpha": ratio}),
                               ("α=99", {"alpha": 99.0}), ("p=2", {"power": 2.0})):
                variants.update({f"PerTA-{k} {name}": (theta_ft, at_full(k), knob) for k in ("grad", "fisher")})
            return variants

        def other_lr():
            other = self.train(w / "theta_ft_other", self.full, s["forget"], self.recipe["forget_ft_other"], seed)
            lr = self.recipe["forget_ft_other"]["lr"]
            return {f"{m} θ_ft lr {lr:g}": (other, at_full(k) if k else None, {}) for m, k in METHODS.items()}

        def at_theta0():
            return {f"PerTA-{k} at θ_0": (theta_ft, self.importance(
                w / f"importance-{k}-theta0.safetensors", self.base, forget_kept, retain_kept, k), {})
                for k in ("grad", "fisher")}

        def lora():
            adapter = self.train(w / "theta_ft_lora", self.full, s["forget"], self.recipe["lora"], seed)
            return {f"{m} LoRA τ": (adapter, self.importance(w / f"importance-{k}-lora.safetensors", self.full,
                                                             forget_kept, retain_kept, k, adapter=adapter) if k else None,
                                    {}) for m, k in METHODS.items()}

        for group in (knobs, other_lr, at_theta0, lora):
            for label, (tuned, imp, knob) in group().items():
                self._ablate(w, label, tuned, imp, knob)

    def _ablate(self, w: Path, label: str, tuned, imp, knob: dict) -> None:
        slug = label.replace(" ", "_").replace("/", "-")
        opts = replace(_merge_opts("PerTA" if imp else "TV"), **knob)
        default = w / f"sweep-{label}.json"  # a method at its own defaults: seed() swept it already

        def curve():
            return json.loads(default.read_text()) if default.exists() else self._sweep(tuned, imp, opts)

        entry, self.steps[f"ablation {label}"] = cached_json(w / f"ablation-{slug}.json", lambda: {
            "knobs": knob, "sweep": curve(), "w": w_statistics(self.full, tuned, imp, **knob) if imp else None})
        entry["matched"] = matched(entry["sweep"], self.target["forget"])
        self.summary["ablation"][label] = entry
        self.write()


def _merge_opts(method: str):
    from perta_fast.merge import MergeOptions

    return MergeOptions("tv" if method == "TV" else "perta")


# ---- aggregation, table, plot ----

COLUMNS = ["forget_quality", "model_utility", "forget prob", "forget rouge_l", "forget truth_ratio", "retain prob",
           "retain rouge_l", "retain truth_ratio", "real_authors prob", "real_authors rouge_l",
           "real_authors truth_ratio", "world_facts prob", "world_facts rouge_l", "world_facts truth_ratio"]


LEVELS = (0.7, 0.5, 0.3)  # forget probabilities (sweep rows) at which curves are also compared: the way down


def aggregate(summary: dict) -> dict:
    """Per method: mean ± sd over the seeds done of λ, every column, and the matched retain probability."""
    by_method: dict[str, list] = {}
    for seed in summary["seeds"].values():
        for method, r in seed["methods"].items():
            by_method.setdefault(method, []).append(r)
    return {method: {"seeds": len(rs), "lam": mean_sd([r.get("lam") for r in rs]),
                     **{c: mean_sd([r.get(c) for r in rs]) for c in COLUMNS},
                     **{f"at_match {c}": mean_sd([(r.get("at_match") or {}).get(c) for r in rs]) for c in COLUMNS},
                     **{f"at_quality {c}": mean_sd([(r.get("at_quality") or {}).get(c) for r in rs]) for c in COLUMNS},
                     "quality_lam": mean_sd([(r.get("at_quality") or {}).get("lam") for r in rs]),
                     "matched_lam": mean_sd([(r.get("matched") or {}).get("lam") for r in rs]),
                     "matched_retain": mean_sd([(r.get("matched") or {}).get("retain") for r in rs]),
                     "never_matched": sum("matched" in r and r["matched"] is None for r in rs),
                     "retain_at": {str(level): mean_sd([(matched(r["sweep"], level) or {}).get("retain")
                                                        for r in rs if "sweep" in r]) for level in LEVELS}}
            for method, rs in by_method.items()}


GAIN_COLUMNS = ["model_utility", "forget prob", "retain prob", "retain rouge_l", "real_authors rouge_l",
                "world_facts rouge_l"]


def gains_over_tv(summary: dict, stage: str) -> dict:
    """Per method but TV, each GAIN_COLUMNS column's difference from TV at `stage` ("at_match",
    "at_quality"), paired within a seed (θ_ft and the held-back rows shared), mean ± sd over the seeds
    where both have it: the spread of the gain itself, not of either method alone."""
    out: dict = {}
    for seed in summary["seeds"].values():
        tv = seed["methods"].get("TV", {}).get(stage)
        for method, r in seed["methods"].items():
            if method == "TV" or not tv or not r.get(stage):
                continue
            for c in GAIN_COLUMNS:
                if r[stage].get(c) is not None and tv.get(c) is not None:
                    out.setdefault(method, {}).setdefault(c, []).append(r[stage][c] - tv[c])
    return {m: {c: mean_sd(v) for c, v in cols.items()} for m, cols in out.items()}


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        sd = "" if v["sd"] is None else f" ± {v['sd']:.{digits}f}"
        return f"{v['mean']:.{digits}f}{sd}"
    return f"{v:.{digits}f}"


def _cell(v, column: str) -> str:
    """Three decimals; forget quality, a p-value that spans decades, in two significant digits."""
    if column != "forget_quality" or v is None:
        return _fmt(v)
    if isinstance(v, dict):
        sd = v["sd"] if v["sd"] is None or v["sd"] > 1e-9 * v["mean"] else 0.0  # equal seeds, up to rounding
        return f"{v['mean']:.2g}" + ("" if sd is None else f" ± {sd:.2g}")
    return f"{v:.2g}"


def markdown(summary: dict) -> str:
    short = ["FQ", "MU", "forget prob", "forget ROUGE", "forget TR", "retain prob", "retain ROUGE", "retain TR",
             "RA prob", "RA ROUGE", "RA TR", "WF prob", "WF ROUGE", "WF TR"]
    lines = ["Set-up models:", "", "| model | " + " | ".join(short) + " |", "|---|" + "---:|" * len(short)]
    for name, m in summary["models"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(m.get(c), c) for c in COLUMNS) + " |")
    agg = summary.get("aggregate", {})
    if agg:
        lines += ["", f"At calibrated λ (retain floor {summary['keep_retain']} × θ_full's on held-back D_r rows), "
                  "mean ± sd over seeds:", "",
                  "| method | seeds | λ | " + " | ".join(short) + " |", "|---|---:|---:|" + "---:|" * len(short)]
        for method, r in agg.items():
            lines.append(f"| {method} | {r['seeds']} | {_fmt(r['lam'], 2)} | "
                         + " | ".join(_cell(r[c], c) for c in COLUMNS) + " |")
        lines += ["", "Matched forgetting (λ sweep on evaluation rows): retain probability where forget probability "
                  "reaches the retain model's:", "", "| method | λ at match | retain prob at match | seeds not reaching it |",
                  "|---|---:|---:|---:|"]
        for method, r in agg.items():
            if r["matched_retain"] is not None or r["never_matched"]:
                lines.append(f"| {method} | {_fmt(r['matched_lam'], 2)} | {_fmt(r['matched_retain'])} | "
                             f"{r['never_matched']} |")
        lines += ["", "Along the way (each method's sweep): retain probability where forget probability (θ_full's "
                  "0.92) falls to each level, mean ± sd over seeds:", "",
                  "| method | " + " | ".join(f"forget {x}" for x in LEVELS) + " | forget = retain model's |",
                  "|---|" + "---:|" * (len(LEVELS) + 1)]
        for method, r in agg.items():
            lines.append(f"| {method} | " + " | ".join(_fmt(r["retain_at"][str(x)]) for x in LEVELS)
                         + f" | {_fmt(r['matched_retain'])} |")
        at = {m: r for m, r in agg.items() if r["at_match forget_quality"] is not None}
        if at:
            lines += ["", "TOFU's metrics at that matched λ (every evaluation row), mean ± sd over seeds:", "",
                      "| method | seeds | " + " | ".join(short) + " |", "|---|---:|" + "---:|" * len(short)]
            for method, r in at.items():
                lines.append(f"| {method} | {r['at_match forget_quality']['n']} | " + " | ".join(
                    _cell(r[f"at_match {c}"], c) for c in COLUMNS) + " |")
        at = {m: r for m, r in agg.items() if r["at_quality forget_quality"] is not None}
        if at:
            targets = [s["quality_target"] for s in summary["seeds"].values() if s.get("quality_target")]
            lines += ["", "Matched forget quality: per seed, the highest forget quality every method reaches on its λ "
                      f"grid (levels {', '.join(f'{t:.3g}' for t in targets)}); each method at the first λ reaching "
                      "it (four bisections in log λ from the grid, FQ measured at each), "
                      "TOFU's metrics there, mean ± sd over seeds:", "",
                      "| method | seeds | λ | " + " | ".join(short) + " |", "|---|---:|---:|" + "---:|" * len(short)]
            for method, r in at.items():
                lines.append(f"| {method} | {r['at_quality forget_quality']['n']} | {_fmt(r['quality_lam'], 2)} | "
                             + " | ".join(_cell(r[f"at_quality {c}"], c)
                                          for c in COLUMNS) + " |")
    for stage, title in (("at_match", "matched forget probability"), ("at_quality", "matched forget quality")):
        gains = gains_over_tv(summary, stage)
        if gains:
            lines += ["", f"Gain over TV at {title}, paired by seed (method − TV), mean ± sd:", "",
                      "| method | seeds | MU | forget prob | retain prob | retain ROUGE | RA ROUGE | WF ROUGE |",
                      "|---|---:|" + "---:|" * len(GAIN_COLUMNS)]
            for method, g in gains.items():
                lines.append(f"| {method} | {g['model_utility']['n']} | "
                             + " | ".join(_fmt(g.get(c)) for c in GAIN_COLUMNS) + " |")
    if summary.get("ablation"):
        lines += ["", "Ablation (first seed; one knob at a time from PerTA's defaults; sweeps on evaluation rows):", "",
                  "| variant | mean w | corr(w, \\|τ\\|) | cos(w⊙τ, τ) | \\|w⊙τ\\| / \\|τ\\| | "
                  + " | ".join(f"retain at forget {x}" for x in LEVELS) + " | λ at match | retain prob at match |",
                  "|---|" + "---:|" * (6 + len(LEVELS))]
        for label, e in summary["ablation"].items():
            ws, m = e.get("w") or {}, e.get("matched") or {}
            along = " | ".join(_fmt((matched(e["sweep"], x) or {}).get("retain")) for x in LEVELS)
            lines.append(f"| {label} | {_fmt(ws.get('mean_w'))} | {_fmt(ws.get('corr_w_abs_tau'))} | "
                         f"{_fmt(ws.get('cos_wtau_tau'))} | {_fmt(ws.get('norm_ratio'))} | {along} | "
                         f"{_fmt(m.get('lam'), 2)} | {_fmt(m.get('retain'))} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    from perta_fast.console import pyplot

    plt = pyplot()
    if plt is None:
        return
    first = next(iter(summary["seeds"].values()), {"methods": {}})
    # the default run has no matched forget quality: no empty third panel for it
    with_quality = any(r.get("quality_sweep") for r in first["methods"].values())
    fig, axes = plt.subplots(1, 3 if with_quality else 2, figsize=(19 if with_quality else 13, 5))
    left, right, third = (*axes, None)[:3]
    for method, r in summary.get("aggregate", {}).items():
        fq, mu = r["forget_quality"], r["model_utility"]
        if fq and mu:
            line = left.errorbar(mu["mean"], fq["mean"], xerr=mu["sd"] or 0, yerr=fq["sd"] or 0, marker="o",
                                 capsize=3, label=f"{method} at calibrated λ (n={r['seeds']})")
            fq2, mu2 = r["at_match forget_quality"], r["at_match model_utility"]
            if fq2 and mu2:  # the same method further along its λ path: read the two as a curve
                colour = line.lines[0].get_color()
                left.errorbar(mu2["mean"], fq2["mean"], xerr=mu2["sd"] or 0, yerr=fq2["sd"] or 0, marker="s",
                              capsize=3, color=colour, label=f"{method} at matched forget prob (n={fq2['n']})")
                left.plot([mu["mean"], mu2["mean"]], [fq["mean"], fq2["mean"]], color=colour, lw=1, ls=":")
            fq3, mu3 = r["at_quality forget_quality"], r["at_quality model_utility"]
            if fq3 and mu3:
                left.errorbar(mu3["mean"], fq3["mean"], xerr=mu3["sd"] or 0, yerr=fq3["sd"] or 0, marker="^",
                              capsize=3, color=line.lines[0].get_color(),
                              label=f"{method} at matched forget quality (n={fq3['n']})")
    for (name, m), marker in zip(summary["models"].items(), "*PX"):  # black: set-up models, not methods
        if m.get("forget_quality") and m.get("model_utility") is not None:
            left.scatter(m["model_utility"], m["forget_quality"], marker=marker, s=120, color="k", label=name,
                         zorder=3)
    left.set_yscale("log")
    left.set_xlabel("model utility")
    left.set_ylabel("forget quality (KS p-value)")
    left.set_title("at calibrated λ (circles), matched forget prob (squares) and matched FQ (triangles), "
                   "mean ± sd over seeds", fontsize=8)
    left.legend(fontsize=7)
    for method, r in first["methods"].items():
        if "sweep" in r:
            pts = [r["sweep"][0]["theta_full"]] + r["sweep"]
            right.plot([p["forget"] for p in pts], [p["retain"] for p in pts], marker="o", label=method)
        if r.get("quality_sweep"):  # the grid and the bisection's points, the matched λ starred
            at = r.get("at_quality") or {}
            pts = sorted(r["quality_sweep"] + at.get("bisected", []), key=lambda p: p["lam"])
            line, = third.plot([p["lam"] for p in pts], [p["forget_quality"] for p in pts], marker="o", label=method)
            if at:
                third.scatter(at["lam"], at["forget_quality"], marker="*", s=150, color=line.get_color(), zorder=3)
    for label, e in summary.get("ablation", {}).items():
        if label.endswith("LoRA τ") or label.startswith(("PerTA-grad ", "TV ")):
            pts = e["sweep"]
            right.plot([p["forget"] for p in pts], [p["retain"] for p in pts], ls=":", lw=1, label=label)
    if summary.get("sweep_target"):
        right.axvline(summary["sweep_target"]["forget"], color="gray", ls="--", lw=1,
                      label="the retain model's forget prob: the matched level")
    right.set_xlabel("forget answer probability (sweep rows)")
    right.set_ylabel("retain answer probability (sweep rows)")
    right.set_title("λ sweeps, first seed (upper left is best)", fontsize=9)
    right.legend(fontsize=6)
    if third is not None:
        if first.get("quality_target"):
            third.axhline(first["quality_target"], color="gray", ls="--", lw=1, label="the matched level")
        third.set_xscale("log", base=2)
        third.set_yscale("log")
        third.set_xlabel("λ")
        third.set_ylabel("forget quality (KS p-value, every forget row)")
        third.set_title("forget quality along λ, first seed (★ the matched λ)", fontsize=9)
        third.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
