"""The TOFU protocol's steps (benchmarks/tofu.py): the author subsets and the sets drawn from them, every step
cached on disk so a rerun continues, the held-back rows of a seed, and the searches along a λ sweep (matched
forgetting, matched forget quality). No model is trained here unless a step asks for it."""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

ROWS_PER_AUTHOR = 20


@dataclass
class Size:
    forget_authors: list | None  # indices into full.json's 200 authors; None: the --forget split
    train_retain_authors: list | None  # None: every author outside the forget set
    importance_retain_authors: list | None  # D_r; None: the training retain authors outside retain_perturbed
    eval_retain_authors: list | None  # retain_perturbed rows of these; None: all of them
    eval_rows: dict  # role -> rows evaluated (None: all), spread over the split
    sweep_rows: int  # forget and retain rows scored at each λ of a sweep
    max_new_tokens: int


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


def walk_down(value, level: float, lams, bisect: int, known: dict | None = None) -> dict:
    """The smallest λ whose `value(λ)` is at or under `level`: `lams` walked upwards, then the last step bisected
    `bisect` times. {"lam" (None when no λ of the grid gets there), "level", "points": [[λ, value], ...]}.
    `known` {λ: value} measured already: where one is still above the level, the walk starts past it, the
    value taken to fall as λ grows."""
    points = dict(known or {})

    def under(lam: float) -> bool:
        if lam not in points:
            points[lam] = value(lam)
        return points[lam] <= level

    above = [lam for lam, v in points.items() if v > level]
    lo, hi = max(above, default=0.0), None
    for lam in (x for x in lams if x > lo):
        if under(lam):
            hi = lam
            break
        lo = lam
    if hi is not None:
        for _ in range(bisect):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if under(mid) else (mid, hi)
    return {"lam": hi, "level": level, "points": sorted(points.items())}


def continue_cached(path: Path, stored: tuple[dict, float], finished, compute) -> tuple[dict, float]:
    """cached_json(path, ...)'s (search, seconds) that a shorter grid or budget left unfinished, as
    `finished(search)` judges, continued by `compute(search)` from its points and stored again; the seconds add up."""
    from perta_fast.outputs import atomic_file

    found, seconds = stored
    if finished(found):
        return stored
    t0 = time.perf_counter()
    found = compute(found)
    seconds += time.perf_counter() - t0
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(found))
    path.with_name(path.name + ".step.json").write_text(json.dumps({"seconds": seconds}))
    return found, seconds


def train_until(train, audit, level: float, every: int, total: int | None = None, known: dict | None = None) -> dict:
    """GA or NPO by steps, to the first audit at or under `level`: `train(after_step)` runs the training with
    the hook (perta_fast.baselines.unlearn_by_training's), `audit(model)` the measure, every `every` steps
    and after the last (`total`, when every step is not audited anyway). {"step" (None when the run ended above the level), "points": [[step, value], ...],
    "train_seconds" (the training alone: what a user who knew the step count would pay), "audit_seconds"}.
    `known` {step: value}: audits of the same training measured already (a shorter run's), taken, not redone."""
    points, spent = [], {"audit": 0.0}

    def measure(model, steps_done):
        if steps_done in (known or {}):
            points.append([steps_done, known[steps_done]])
            return points[-1][1] <= level
        t0 = time.perf_counter()
        model.eval()
        points.append([steps_done, audit(model)])
        model.train()
        spent["audit"] += time.perf_counter() - t0
        return points[-1][1] <= level

    t0 = time.perf_counter()
    record = train(lambda model, done: (done % every == 0 or done == total) and measure(model, done))
    steps = record["steps"]
    reached = bool(points) and points[-1][0] == steps and points[-1][1] <= level
    train_seconds = time.perf_counter() - t0 - spent["audit"]
    return {"step": steps if reached else None, "steps_run": steps, "level": level, "points": points,
            "train_seconds": round(train_seconds, 1), "audit_seconds": round(spent["audit"], 1)}


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


def metrics(res: dict) -> dict:
    """The numbers a row of the tables shows, from an eval results dict."""
    s = res["splits"]
    out = {"forget_quality": res.get("forget_quality"), "model_utility": res.get("model_utility")}
    for role in ("forget", "retain", "real_authors", "world_facts"):
        for key in ("prob", "rouge_l", "truth_ratio"):
            out[f"{role} {key}"] = s[role].get(key)
    return out


def native_bf16(device) -> bool:
    import torch

    from perta_fast.dtypes import cpu_has_fast_bf16

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def merge_opts(method: str):
    from perta_fast.merge import MergeOptions

    return MergeOptions(method="tv" if method == "TV" else "perta")
