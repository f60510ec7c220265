"""λ chosen for the user: θ_full is loaded once and moved to θ_full − λ·(w ⊙ τ) for each λ tried, in place,
by the merge's own executor (so each point is exactly the checkpoint `merge` would write), and scored on
held-back validation rows of both sets: rows that were never used for importance.

The default choice is the most forgetting that keeps the retain answer probability ≥ keep × θ_full's:
the λ grid is walked upwards until a point breaks that floor, then the gap between the last point that
keeps it and the first that does not is bisected. With `forget_target="base"` the walk stops instead at the
smallest λ whose forget probability reaches the base model θ_0's (the model that never saw the data),
still never below the retain floor.

Memory: the model (b bytes per parameter) + the merge's one-tensor scratch + the quick evaluation.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

from .audit import attack_scores, auc, bootstrap_interval, row_tokens
from .console import bar, log, pyplot
from .data import MIN_VALIDATION_ROWS, QA, data_hash, hold_out, load_qa, source_of
from .dtypes import autocast_for
from .errors import PertaError
from .hf import element_places, renamed_to, stored_layout
from .merge import MergeExecutor, plan_merge
from .options import DEFAULT_LAMS, AuditOptions, CalibrateOptions, MergeOptions  # noqa: F401  (importable here, as always)
from .eval import answer_probabilities, evaluate
from .io import SafetensorsFile
from .models import load_model, pick_device
from .outputs import atomic_file, check_output_path

TARGETS = ("max", "base", "audit")
AUDIT = AuditOptions()  # --forget-target audit scores as `perta-fast audit` does by default (k, resamples)


def check_options(opts: CalibrateOptions) -> tuple[float, ...]:
    """The λ grid, sorted; bad options fail here, before any model is loaded."""
    if not (0 < opts.keep_retain <= 1):
        raise PertaError(f"--keep-retain must be in (0, 1] (a fraction of θ_full's retain probability), "
                         f"got {opts.keep_retain:g}")
    if opts.forget_target not in TARGETS:
        raise PertaError(f"--forget-target must be one of {', '.join(TARGETS)}, got {opts.forget_target!r}")
    if opts.forget_target == "base" and not opts.pretrained:
        raise PertaError("--forget-target base needs --pretrained DIR: the base model θ_0 whose forget probability "
                         "is the target")
    if opts.forget_target == "audit" and not 0 < opts.audit_target < 1:
        raise PertaError(f"--audit-target must be an AUC in (0, 1), got {opts.audit_target:g}")
    if opts.bisect < 0:
        raise PertaError(f"--bisect must be 0 or more, got {opts.bisect}")
    lams = tuple(sorted(set(float(x) for x in opts.lams)))
    if not lams:
        raise PertaError("--lams is empty: give at least one λ to try")
    bad = [x for x in lams if not (math.isfinite(x) and x > 0)]
    if bad:
        raise PertaError(f"--lams must be positive finite numbers, got {bad[0]:g}")
    return lams


class ModelAtLambda:
    """θ_full as a loaded model that `set(λ)` moves to θ_full − λ·(w ⊙ τ), one tensor at a time."""

    def __init__(self, base, finetuned, importance, merge_options: MergeOptions, device=None, dtype=None):
        self.model, self.tokenizer = load_model(base, device, dtype)
        math_device = pick_device(device)
        self.plan = plan_merge(base, finetuned, importance, replace(merge_options, device=math_device))
        self.steps = [s for s in self.plan.steps if s.action != "copy"]
        # the merge works on the checkpoint's stored tensors, the model on its parameters: transformers 5 loads
        # some under other names (GPT-NeoX's embed_out) or fuses them (MoE experts); hf says which is where
        self.params = dict(self.model.named_parameters())
        self.owner = {stored: name for name, pieces in stored_layout(self.model, self.params).items()
                      for stored in pieces}
        missing = [s.name for s in self.steps if s.name not in self.owner]
        if missing:
            raise PertaError(f"{base}: tensor {missing[0]} is not a parameter of the loaded model")
        self.renamed = {name: renamed_to(self.model, name, self.params[name].shape) is not None
                        for name in {self.owner[s.name] for s in self.steps}}
        self.executor = MergeExecutor(self.plan)

    def set(self, lam: float) -> float:
        """Move the model to λ; returns the mean w."""
        import torch

        places = {}  # a fused parameter's element places, found once per move and dropped after it
        with torch.no_grad():
            for step, tensor in self.executor.tensors(self.steps, lam):
                name = self.owner[step.name]
                param = self.params[name]
                if self.renamed[name]:
                    param.copy_(tensor)
                    continue
                if name not in places:
                    places[name] = element_places(self.model, name, param.shape)
                param.view(-1)[places[name][step.name].flatten().long()] = tensor.flatten().to(param.dtype)
        return self.executor.mean_weight


def probability_curve(base, finetuned, importance, merge_options: MergeOptions, sets: dict[str, list[QA]], lams,
                      device=None, bf16_autocast: bool = False) -> list[dict]:
    """Mean answer probability of each set at each λ (and the mean w): [{"lam", "mean_weight", set: prob}]."""
    at = ModelAtLambda(base, finetuned, importance, merge_options, device)
    points = []
    for lam in lams:
        point = {"lam": lam, "mean_weight": at.set(lam)}  # the merge outside autocast: its math stays fp32
        with autocast_for(at.model, bf16_autocast):
            for name, rows in sets.items():
                probs = answer_probabilities(at.model, at.tokenizer, rows)
                point[name] = sum(probs) / len(probs)
        points.append(point)
    return points


def score(model, tokenizer, sets: dict[str, list[QA]], opts: CalibrateOptions) -> dict:
    """{set}_prob (mean answer probability) and, when generating, {set}_em (greedy exact match)."""
    point = {}
    with autocast_for(model, opts.bf16_autocast):
        for name, rows in sets.items():
            r = evaluate(model, tokenizer, rows, opts.batch_size, opts.max_new_tokens, opts.generate, opts.max_length)
            point[f"{name}_prob"] = r["answer_prob"]
            if "exact_match" in r:  # rows without a question (text, conversations) are scored by probability only
                point[f"{name}_em"] = r["exact_match"]
    return point


def audit_point(model, tokenizer, forget: list, holdout: list, opts: CalibrateOptions) -> dict:
    """The --audit-attack's AUC of forget against holdout rows and its bootstrap interval (perta_fast.audit)."""
    score = dict(max_length=opts.max_length, batch_size=opts.batch_size, bf16_autocast=opts.bf16_autocast)
    scores = [attack_scores(row_tokens(model, tokenizer, rows, where=name, **score), opts.audit_attack, AUDIT.k)
              for name, rows in (("the forget validation rows", forget), ("the holdout rows", holdout))]
    return {"audit_auc": auc(*scores), "audit_interval": list(bootstrap_interval(*scores, AUDIT.bootstrap))}


def _target_prob(opts: CalibrateOptions, forget: list[QA]) -> float:
    """θ_0's forget answer probability on the validation rows (loaded, scored, freed)."""
    model, tok = load_model(opts.pretrained, opts.device, opts.dtype)
    with autocast_for(model, opts.bf16_autocast):
        probs = answer_probabilities(model, tok, forget)
    del model
    return sum(probs) / len(probs)


def calibrate(base, finetuned, forget: list[QA], retain: list[QA], importance=None,
              merge_options: MergeOptions | None = None, options: CalibrateOptions | None = None,
              holdout: list | None = None) -> dict:
    """Choose λ on validation rows `forget` and `retain` (never used for the importance file); with
    forget_target "audit", against `holdout` rows (of the forget rows' kind, never seen).
    Returns {"lam", "points" (every λ scored, ascending), "reference", "retain_floor", ...}."""
    opts = options or CalibrateOptions()
    lams = check_options(opts)
    audited = opts.forget_target == "audit"
    if audited and not holdout:
        raise PertaError("--forget-target audit needs --holdout: rows of the forget set's kind the model never saw")
    for label, rows in (("forget", forget), ("retain", retain)):
        if len(rows) < MIN_VALIDATION_ROWS:
            raise PertaError(f"the {label} validation set has {len(rows)} rows; calibration needs at least "
                             f"{MIN_VALIDATION_ROWS}")
    merge_options = merge_options or MergeOptions()
    merge_options = replace(merge_options, method="perta" if importance else "tv")
    target = _target_prob(opts, forget) if opts.forget_target == "base" else None
    at = ModelAtLambda(base, finetuned, importance, merge_options, opts.device, opts.dtype)
    sets = {"forget": forget, "retain": retain}

    def scored(model, tok) -> dict:
        return {**score(model, tok, sets, opts), **(audit_point(model, tok, forget, holdout, opts) if audited else {})}

    reference = scored(at.model, at.tokenizer)
    floor = opts.keep_retain * reference["retain_prob"]
    points: dict[float, dict] = {}

    def point(lam: float) -> dict:
        mean_w = at.set(lam)
        p = {"lam": lam, **scored(at.model, at.tokenizer), "mean_weight": mean_w}
        p["keeps_retain"] = p["retain_prob"] >= floor
        # audit: reached once the interval no longer lies above the target (perta_fast.audit's verdict rule)
        p["reaches_target"] = (p["audit_interval"][0] <= opts.audit_target if audited
                               else target is not None and p["forget_prob"] <= target)
        points[lam] = p
        progress.update(1)
        return p

    def done(p: dict) -> bool:  # the search can stop growing λ here
        return not p["keeps_retain"] or p["reaches_target"]

    with bar(total=len(lams) + opts.bisect, desc="calibrate λ", unit="point") as progress:
        lo, hi = 0.0, None
        for lam in lams:
            if done(point(lam)):
                hi = lam
                break
            lo = lam
        if hi is not None:
            for _ in range(opts.bisect):  # lo never stops the walk, hi does
                mid = (lo + hi) / 2
                if done(point(mid)):
                    hi = mid
                else:
                    lo = mid
    end = points.get(hi)
    reached = end is not None and end["keeps_retain"] and end["reaches_target"]
    lam = hi if reached else lo
    result = {"lam": lam, "forget_target": opts.forget_target, "reached_target": reached, "keep_retain": opts.keep_retain,
              "reference": reference, "retain_floor": floor, "target_forget_prob": target,
              **({"audit_attack": opts.audit_attack, "audit_target": opts.audit_target,
                  "holdout_rows": len(holdout)} if audited else {}),
              "grid": list(lams), "bisect": opts.bisect, "method": merge_options.method,
              "scoring": "bf16 autocast" if opts.bf16_autocast else "model dtype",
              "merge_options": {k: v for k, v in asdict(merge_options).items() if k in ("alpha", "power", "eps")},
              "validation": {"forget_rows": len(forget), "forget_sha256": data_hash(forget),
                             "retain_rows": len(retain), "retain_sha256": data_hash(retain)},
              "points": [points[k] for k in sorted(points)], "chosen": points.get(lam, {"lam": 0.0, **reference}),
              "above": points.get(hi) if not reached else None,
              "note": _note(lam, hi, reached, target, lams, opts if audited else None)}
    if result["note"]:
        log.warning("calibrate: %s", result["note"])
    return result


def _note(lam, hi, reached, target, lams, audit: CalibrateOptions | None = None) -> str | None:
    """What the user should know about a choice the grid or the floor limited."""
    if hi is None:
        what = "the forget target was not reached and " if target is not None or audit else ""
        return f"{what}the retain floor still held at the largest λ tried ({lams[-1]:g}): try larger --lams"
    if audit and not reached:
        return (f"the retain floor stopped it: at every λ that keeps it the forget rows are still told from the holdout "
                f"rows ({audit.audit_attack} AUC interval above {audit.audit_target:g}); λ = {lam:g} is the largest "
                "that keeps the floor, and the data is not forgotten there")
    if target is not None and not reached:
        return (f"θ_0's forget probability ({target:.4f}) is not reached before retain probability falls below the "
                f"floor; λ = {lam:g} is the largest that keeps it")
    if lam == 0:
        return "no λ > 0 tried keeps the retain floor: the merge is left at θ_full (λ = 0); lower --keep-retain"
    return None


def format_curve(result: dict) -> str:
    """One line per point tried, then the choice."""
    em = "forget_em" in result["reference"] and "retain_em" in result["reference"]
    audited = "audit_auc" in result["reference"]
    head = f"{'λ':>9} {'forget prob':>12} {'retain prob':>12}" + (f" {'forget EM':>10} {'retain EM':>10}" if em else "")
    head += f" {result.get('audit_attack', '') + ' AUC':>14} {'interval':>13}" if audited else ""
    rows = [head]
    for p in [{"lam": 0.0, **result["reference"]}] + result["points"]:
        line = f"{p['lam']:>9.4g} {p['forget_prob']:>12.4f} {p['retain_prob']:>12.4f}"
        if em:
            line += f" {p['forget_em']:>10.3f} {p['retain_em']:>10.3f}"
        if audited:
            line += f" {p['audit_auc']:>14.3f} {p['audit_interval'][0]:>6.3f}–{p['audit_interval'][1]:<6.3f}"
        rows.append(line + ("  ← chosen" if p["lam"] == result["lam"] else ""))
    rows.append(f"retain floor {result['retain_floor']:.4f} (= {result['keep_retain']:g} × θ_full's)"
                + (f"; forget target {result['target_forget_prob']:.4f} (θ_0's)"
                   if result["target_forget_prob"] is not None else "")
                + (f"; audit target: {result['audit_attack']} AUC interval reaching {result['audit_target']:g} "
                   f"(forget validation rows against {result['holdout_rows']} holdout rows)" if audited else ""))
    return "\n".join(rows)


def plot_curve(result: dict, path: Path) -> bool:
    """Forget and retain answer probability over λ, the floor, the target and the choice."""
    plt = pyplot()
    if plt is None:
        return False
    pts = [{"lam": 0.0, **result["reference"]}] + result["points"]
    xs = [p["lam"] for p in pts]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [p["forget_prob"] for p in pts], marker="o", color="tab:red", label="forget (validation)")
    ax.plot(xs, [p["retain_prob"] for p in pts], marker="o", color="tab:blue", label="retain (validation)")
    ax.axhline(result["retain_floor"], color="tab:blue", ls="--", lw=1,
               label=f"retain floor ({result['keep_retain']:g} × θ_full)")
    if result["target_forget_prob"] is not None:
        ax.axhline(result["target_forget_prob"], color="tab:red", ls="--", lw=1, label="forget target (θ_0)")
    ax.axvline(result["lam"], color="black", lw=1, label=f"chosen λ = {result['lam']:.4g}")
    ax.set_xscale("symlog", linthresh=min(result["grid"]))
    ax.set_xlim(left=0)
    ax.set_xlabel("λ")
    ax.set_ylabel("answer probability")
    ax.set_title(f"λ calibration ({result['method']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return True


def write_curve(result: dict, folder: Path, stem: str = "calibration") -> None:
    """`stem`.json and `stem`.png into `folder` (a staged output folder: published whole by its caller)."""
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot_curve(result, folder / f"{stem}.png")


def validation_sets(forget: list[QA], retain: list[QA], fraction: float, where: dict[str, str]) -> dict:
    """{"forget"|"retain": (rows for importance, validation rows)}."""
    return {label: hold_out(rows, fraction, where[label]) for label, rows in (("forget", forget), ("retain", retain))}


def check_importance_rows(importance, split: dict, whole: dict[str, str], where: dict[str, str],
                          fraction: float) -> None:
    """The importance file must have been estimated on exactly the rows calibration does not hold back
    (`whole`: each whole set's hash, to say so when it was estimated on everything)."""
    meta = SafetensorsFile(importance).metadata
    for label, (kept, held) in split.items():
        got = meta.get(f"{label}_sha256")
        if got == data_hash(kept):
            continue
        if got == whole[label]:
            why = f"on every row of {where[label]}, including the rows calibration holds back for validation"
        else:
            why = f"on other {label} rows than {where[label]} less its held-back validation rows"
        raise PertaError(f"{importance}: importance was estimated {why}; estimate it with `perta-fast importance "
                         f"... --hold-out {fraction:g}` so that validation rows are never used for importance")


def calibrate_files(base, finetuned, forget_spec, retain_spec, importance=None,
                    merge_options: MergeOptions | None = None, options: CalibrateOptions | None = None,
                    out: str | Path | None = None, overwrite: bool = False, holdout: list | None = None) -> dict:
    """`perta-fast calibrate`: hold back validation rows, check the importance file never saw them,
    calibrate, and write the curve (`out` .json and a .png beside it) atomically."""
    opts = options or CalibrateOptions()
    check_options(opts)
    inputs = tuple(p for p in (base, finetuned, importance, opts.pretrained) if p)
    if out is not None:
        out = Path(out)
        for path in (out, out.with_suffix(".png")):
            check_output_path(path, overwrite, inputs)
    where = {"forget": source_of(forget_spec, "the forget set"), "retain": source_of(retain_spec, "the retain set")}
    rows = {"forget": load_qa(forget_spec), "retain": load_qa(retain_spec)}
    split = validation_sets(rows["forget"], rows["retain"], opts.hold_out, where)
    if importance is not None:
        check_importance_rows(importance, split, {k: data_hash(v) for k, v in rows.items()}, where, opts.hold_out)
    result = calibrate(base, finetuned, split["forget"][1], split["retain"][1], importance, merge_options, opts,
                       load_qa(holdout) if holdout is not None else None)
    result.update(base=str(base), finetuned=str(finetuned), importance=str(importance) if importance else None,
                  hold_out=opts.hold_out)
    if out is not None:
        with atomic_file(out, overwrite, inputs) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        result["plot"] = None
        if pyplot() is not None:
            with atomic_file(out.with_suffix(".png"), overwrite, inputs) as tmp:
                plot_curve(result, tmp)
            result["plot"] = str(out.with_suffix(".png"))
    return result
