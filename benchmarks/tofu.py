"""The quality protocol: TOFU with SmolLM2-135M-Instruct, PerTA against TV (and GA/NPO), each at a λ
calibrated under the same retain constraint, over several seeds, with the set-up questions measured.

    python benchmarks/tofu.py                        # CPU size, seeds 0 1 2, the "scaled" recipe (~100 min, 2 cores)
    python benchmarks/tofu.py --quality --ablation   # everything: matched forget quality and the set-up knobs too
    python benchmarks/tofu.py --match audit          # every method, GA and NPO too, where the audit says unseen
    python benchmarks/tofu.py --recipe tofu          # TOFU's lr 1e-5 for θ_full too (too low at 135M)
    python benchmarks/tofu.py --recipe fast          # the earlier recipe (lr 1e-4, no decay, no warm-up)
    python benchmarks/tofu.py --size full --device cuda --quality [--ablation] [--forget forget05]   # 200 authors

This file is the protocol (what runs, in which order, with which options); tofu_steps.py holds the steps it
is made of (the sets, the on-disk cache, the searches along a λ sweep) and tofu_report.py the report
(aggregates, paired gains over TV, tables, plot).

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

Audit-matched (--match audit, per seed, on the same cache): each method where Min-K++'s AUC of the evaluated
forget split against as many rows of TOFU's holdout.json (authors no split holds) first reaches the retain
model's AUC on the same rows. TV and PerTA by λ (the grid and 48, 64 walked up, the last step bisected 3 times,
θ_full moved in place); GA and NPO by training steps (audited every 5 steps and stopped at the first audit at the
level; GA up to 10 epochs, NPO TOFU's 5: AUDIT_EPOCHS says why). TOFU's metrics there, and each method's
unlearning wall time as a user who knew its λ or step count would pay it (TV: θ_ft + merge; PerTA: θ_ft +
importance + merge; GA/NPO: training to that step), the audited search apart. A point estimate at the level, not an interval reaching it (calibrate's rule): the
methods are compared at one strength.

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
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its steps and report beside it, however it is loaded
from tofu_report import aggregate, markdown, plot  # noqa: E402
from tofu_steps import (Size, merge_opts, build_sets, cached, cached_json, continue_cached, first_reaching, matched,  # noqa: E402
                        metrics, native_bf16, qa, quality_scan, quality_target, seeded_hold_out, spread, train_until,
                        w_statistics, walk_down)

HERE = Path(__file__).resolve().parent
GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
AUDIT_GRID = GRID + (48.0, 64.0)  # PerTA was still at AUC 0.49-0.57 at λ 32 in some seeds
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
# the audit-matched search's budget: GA was still falling fast after TOFU's 5 epochs (0.70 -> 0.53 over its last 5
# steps, seed 0), NPO slowly (0.87 -> 0.83), and another 5 epochs of NPO cost ~15 CPU minutes a seed
AUDIT_EPOCHS = {"ga": 10, "npo": 5}
METHODS = {"TV": None, "PerTA-grad": "grad", "PerTA-fisher": "fisher"}


SIZES = {
    "cpu": Size(list(range(196, 200)), list(range(10)), list(range(6)), list(range(6, 10)),
                {"forget": None, "retain": 40, "real_authors": 30, "world_facts": 30}, 40, 80),
    "full": Size(None, None, None, None, {r: None for r in ("forget", "retain", "real_authors", "world_facts")},
                 200, 200),
}


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
    ap.add_argument("--match", choices=["probability", "audit", "both"], default="probability", help="what each seed "
                    "matches the methods on: forget probability (the default run: calibrated λ, then the retain model's "
                    "forget probability), or the audit (the λ, or GA's and NPO's training step, where Min-K++'s "
                    "forget-vs-holdout AUC reaches the retain model's; with each method's unlearning wall time), or both")
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
        run.stages(seed)
    if a.ablation:
        run.ablation(a.seeds[0])
    for seed in a.seeds[2:]:
        run.stages(seed)
    if a.quality:  # last: ~8 forget-split scorings per method and seed, so the tables above come first
        for seed in a.seeds:
            run.quality(seed)
    print(markdown(run.summary))
    print(f"\nwrote {HERE / 'results' / run.stem}.json, .md, .png; {time.perf_counter() - run.t0:.0f} s this run")
    return 0


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
            "audit_search": {"grid": AUDIT_GRID, "epochs": AUDIT_EPOCHS},
            "sets": {"forget_rows": len(sets["forget"]), "train_retain_rows": len(sets["train_retain"]),
                     "importance_retain_rows": len(sets["importance_retain"]),
                     "eval_rows": {r: len(v) for r, v in splits.items()}, "sweep_rows": size.sweep_rows,
                     "size": asdict(size)},
            "models": {}, "seeds": {}, "ablation": {}, "audit": {}}

    # ---- steps ----

    def train(self, out: Path, src, rows, knobs: dict, seed: int = 0) -> Path:
        from perta_fast.train import FinetuneOptions, finetune

        path, self.steps[f"train {self._step_name(out)}"] = cached(out, lambda o: finetune(
            src, rows, o, FinetuneOptions(**knobs, seed=seed, device=self.a.device)))
        return path

    def importance(self, out: Path, model, forget, retain, method, adapter=None) -> Path:
        from perta_fast.importance import importance_file

        path, self.steps[f"importance {self._step_name(out)}"] = cached(out, lambda o: importance_file(
            model, forget, retain, o, method=method, batch_size=8, device=self.a.device, adapter=adapter, progress=False))
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
                self.retain_model, self.retain_model, None, merge_opts("TV"), self.sweep_sets, [0.0], self.a.device,
                self.a.bf16_scoring)[0])
        self.summary["sweep_target"] = {k: self.target[k] for k in ("forget", "retain")}
        self.write()

    def stages(self, seed: int) -> None:
        if self.a.match in ("probability", "both"):
            self.seed(seed)
        if self.a.match in ("audit", "both"):
            self.audit(seed)

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
            opts = merge_opts(method)
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

    # ---- the audit-matched stage (--match audit) ----

    def member_auc(self, model, tokenizer) -> float:
        """Min-K++'s AUC (perta_fast.audit): P(a forget row scores as more likely a member than a holdout row),
        on the evaluated forget split against as many rows of TOFU's holdout.json (authors no split holds)."""
        from perta_fast.calibration import audit_point
        from perta_fast.options import CalibrateOptions

        rows = self.audit_rows
        return audit_point(model, tokenizer, rows["forget"], rows["holdout"], CalibrateOptions(
            audit_attack="minkpp", bf16_autocast=self.a.bf16_scoring, device=self.a.device))["audit_auc"]

    def audit_levels(self) -> dict:
        """Base, θ_full's and the retain model's member AUC: the last is what unlearning should reach."""
        from perta_fast.data import load_qa
        from perta_fast.models import load_model

        forget = qa(self.sets["splits"]["forget"])
        self.audit_rows = {"forget": forget, "holdout": spread(load_qa(f"{self.a.tofu}:holdout"), len(forget))}
        levels, self.steps["audit levels"] = cached_json(self.work / "results" / "audit-levels.json", lambda: {
            name: self.member_auc(*load_model(folder, self.a.device))
            for name, folder in (("base", self.base), ("theta_full", self.full), ("retain model", self.retain_model))})
        self.summary["audit_levels"] = dict(levels, rows={k: len(v) for k, v in self.audit_rows.items()})
        return levels

    def audit(self, seed: int) -> None:
        """Every method where the member AUC (member_auc) first reaches the retain model's: TV and PerTA by λ
        (AUDIT_GRID walked up, the last step bisected 3 times), GA and NPO by training steps (BASELINE's run for
        AUDIT_EPOCHS, audited every 5 steps and stopped there); a search cached with a shorter grid or budget is
        continued from its points; TOFU's metrics at that point, and each method's unlearning wall time."""
        from perta_fast.baselines import BaselineOptions, unlearn_by_training
        from perta_fast.calibration import ModelAtLambda
        from perta_fast.merge import merge
        from perta_fast.models import load_tokenizer

        s, w = self.sets, self.work / f"seed{seed}"
        w.mkdir(exist_ok=True)
        level = self.audit_levels()["retain model"]
        forget_kept, _ = seeded_hold_out(s["forget"], seed)
        retain_kept, _ = seeded_hold_out(s["importance_retain"], seed)
        theta_ft = self.train(w / "theta_ft", self.full, s["forget"], self.recipe["forget_ft"], seed)
        record = self.summary["audit"].setdefault(str(seed), {"methods": {}})
        seconds = {"θ_ft": _seconds(w / "theta_ft")}
        for method, kind in METHODS.items():
            imp = self.importance(w / f"importance-{kind}.safetensors", self.full, forget_kept, retain_kept,
                                  kind) if kind else None
            opts = merge_opts(method)
            moving = []  # θ_full loaded once, moved in place to each λ (calibration's ModelAtLambda)

            def value(lam, i=imp, o=opts):
                if not moving:
                    moving.append(ModelAtLambda(self.full, theta_ft, i, o, self.a.device))
                moving[0].set(lam)
                return self.member_auc(moving[0].model, moving[0].tokenizer)

            path = w / f"audit-{method}.json"
            found, searched = continue_cached(
                path, cached_json(path, lambda: walk_down(value, level, AUDIT_GRID, 3)),
                lambda f: f["lam"] is not None or f["points"][-1][0] >= AUDIT_GRID[-1],
                lambda f: walk_down(value, level, AUDIT_GRID, 3, known=dict(f["points"])))
            self.steps[f"audit sweep seed{seed} {method}"] = searched
            moving.clear()
            entry = record["methods"][method] = {"search": found, "search_seconds": searched}
            name = f"seed{seed}-{method}-audit"
            lam = found["lam"] if found["lam"] is not None else AUDIT_GRID[-1]  # unreached: the merge at the grid's end, timed
            _, self.steps[f"merge {name}"] = cached(self.work / "models" / name, lambda o, i=imp, m=opts: merge(
                self.full, theta_ft, o, i, replace(m, lam=lam), progress=False))
            if found["lam"] is not None:
                entry["at_match"] = {"lam": lam, **metrics(self.evaluate(name, self.work / "models" / name, self.reference))}
            shutil.rmtree(self.work / "models" / name, ignore_errors=True)
            entry["unlearn_seconds"] = seconds["θ_ft"] + _seconds(self.work / "models" / name) + (
                _seconds(w / f"importance-{kind}.safetensors") if kind else 0.0)
            self.write()
        tok = load_tokenizer(self.full)
        for method in ("ga", "npo"):
            name, stopped = f"seed{seed}-{method.upper()}-audit", self.work / "models" / f"seed{seed}-{method.upper()}-audit"
            epochs = AUDIT_EPOCHS[method]
            total = epochs * -(-len(s["forget"]) // BASELINE["batch_size"])

            def search(known=None, m=method, n=epochs, t=total):
                return train_until(
                    lambda hook: unlearn_by_training(self.full, s["forget"], s["importance_retain"], stopped, BaselineOptions(
                        method=m, seed=seed, device=self.a.device, **{**BASELINE, "epochs": n}), overwrite=True,
                        after_step=hook), lambda model: self.member_auc(model, tok), level, every=5, total=t, known=known)

            def longer(shorter, go=search):  # the schedule is flat after warm-up: a longer run's first steps are
                found = go(dict(shorter["points"]))  # the shorter one's, so its audits are taken, not redone
                return {**found, "audit_seconds": round(found["audit_seconds"] + shorter["audit_seconds"], 1)}

            path = w / f"audit-{method.upper()}.json"
            found, self.steps[f"audit {name}"] = continue_cached(
                path, cached_json(path, search), lambda f, t=total: f["step"] is not None or f["steps_run"] >= t, longer)
            entry = record["methods"][method.upper()] = {"search": found, "search_seconds": found["audit_seconds"],
                                                         "unlearn_seconds": found["train_seconds"]}
            if found["step"] is not None:
                entry["at_match"] = {"steps": found["step"], **metrics(self.evaluate(name, stopped, self.reference))}
            shutil.rmtree(stopped, ignore_errors=True)
            self.write()

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
                                                      merge_opts(method))
            entry = record["methods"][method]
            curves[method] = entry["quality_sweep"] = quality_scan(GRID, entry["lam"], (entry["matched"] or {}).get("lam"),
                                                                   scorers[method])
        target = record["quality_target"] = quality_target(curves)
        self.write()
        for method, curve in curves.items():
            found = first_reaching(curve, target, scorers[method])
            self.steps[f"quality sweep seed{seed} {method}"] = sum(p["seconds"] for p in scorers[method].scored)
            res = self._evaluate_at(f"seed{seed}-{method}-quality-lam{found['lam']:g}", w / "theta_ft", imps[method],
                                    replace(merge_opts(method), lam=found["lam"]))
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
        opts = replace(merge_opts("PerTA" if imp else "TV"), **knob)
        default = w / f"sweep-{label}.json"  # a method at its own defaults: seed() swept it already

        def curve():
            return json.loads(default.read_text()) if default.exists() else self._sweep(tuned, imp, opts)

        entry, self.steps[f"ablation {label}"] = cached_json(w / f"ablation-{slug}.json", lambda: {
            "knobs": knob, "sweep": curve(), "w": w_statistics(self.full, tuned, imp, **knob) if imp else None})
        entry["matched"] = matched(entry["sweep"], self.target["forget"])
        self.summary["ablation"][label] = entry
        self.write()


def _seconds(path: Path) -> float:
    """A cached step's seconds (tofu_steps.cached keeps them beside its output, which may be gone since)."""
    return json.loads(path.with_name(path.name + ".step.json").read_text())["seconds"]


# ---- aggregation, table, plot ----


if __name__ == "__main__":
    sys.exit(main())
