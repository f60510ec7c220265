"""Whole jobs built from the library's steps: `unlearn` (θ_full + D_f + D_r → θ_u) and the built-in `demo`."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from .audit import audit_models
from .calibration import calibrate, check_options, probability_curve, validation_sets, write_curve
from .console import bar, log, pyplot
from .data import QA, check_sets, data_hash, encode, load_qa, set_summary, source_of
from .errors import PertaError
from .eval import evaluate
from .facts import fact_values, facts_of, holdout_people, make_facts, make_people
from .importance import importance_file
from .support import require
from .io import SafetensorsFile, content_sha256
from .lora import is_adapter
from .memory import PeakRssAnon, release_freed_memory
from .merge import card_with_metrics, merge, plan_merge, write_merge
from .models import default_model, load_model, load_tokenizer, pick_device
from .options import (AuditOptions, CalibrateOptions, DemoOptions, FinetuneOptions, ImportanceOptions,  # noqa: F401
                      MergeOptions, UnlearnOptions)
from .outputs import atomic_dir, check_output_path, remove_path
from .train import finetune, lora_config

METHODS = ("tv", "perta-grad", "perta-fisher")


def remove_forget_derived(work: Path) -> list[str]:
    """Delete what unlearn derived from the forget set in `work` (θ_ft, full or LoRA, and importance
    files), and `work` itself if nothing else is left; only names unlearn writes are touched, since
    --work-dir may be a folder of the user's. Returns what was removed."""
    removed = []
    for p in sorted(work.iterdir()) if work.is_dir() else []:
        if p.name in ("theta_ft", "theta_ft_lora") or (p.name.startswith("importance-") and ".safetensors" in p.name):
            remove_path(p)
            removed.append(p.name)
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()
    return removed


@contextmanager
def _work_folder(work: Path):
    """`work`, made if missing; a failed run removes it again if it made it and left nothing in it."""
    made = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except BaseException:
        if made and work.is_dir() and not any(work.iterdir()):
            work.rmdir()
        raise


def _matches(record: dict, expect: dict) -> bool:
    """A step's output from an earlier run is reused when its record matches what we would do now."""
    return all(record.get(k) == v for k, v in expect.items())


def build_finetuned(model_dir, forget: list[QA], work: Path, opts: FinetuneOptions, where: str = "the forget set") -> Path:
    out = work / ("theta_ft" if opts.lora_rank is None else "theta_ft_lora")
    expect = {"base_sha256": content_sha256(model_dir), "data_sha256": data_hash(forget), "options": asdict(opts)}
    try:
        record = json.loads((out / "perta_finetune.json").read_text())
    except (OSError, json.JSONDecodeError):
        record = {}
    if not _matches(record, expect):
        finetune(model_dir, forget, out, opts, overwrite=True, where=where)
    return out


def build_importance(model_dir, forget, retain, method: str, work: Path, opts: UnlearnOptions,
                     adapter: Path | None = None, where: tuple[str, str] = ("the forget set", "the retain set")) -> Path:
    out = work / f"importance-{method}{'-lora' if adapter else ''}.safetensors"
    forget, retain = forget[:opts.max_samples or None], retain[:opts.max_samples or None]
    expect = {"forget_sha256": data_hash(forget), "retain_sha256": data_hash(retain), "method": method,
              "checkpoint_sha256": content_sha256(model_dir), "max_length": str(opts.max_length),
              "adapter_sha256": content_sha256(adapter) if adapter else "", "write": opts.write}
    if opts.write == "weights":
        expect.update(alpha=str(opts.alpha), power=str(opts.power), eps=str(opts.eps))
    if not (out.is_file() and _matches(SafetensorsFile(out).metadata, expect)):
        importance_file(model_dir, forget, retain, out, ImportanceOptions(
            method=method, batch_size=opts.batch_size, max_length=opts.max_length, device=opts.device,
            dtype=opts.dtype, gradient_checkpointing=opts.gradient_checkpointing, adapter=adapter,
            max_memory=opts.max_memory, write=opts.write, alpha=opts.alpha, power=opts.power, eps=opts.eps),
            overwrite=True, where=where)
    return out


STILL_KNOWN = 0.95  # without an audit: forget probability at or above this share of θ_full's is "as before"


def forgetting(summary: dict) -> dict:
    """Whether the forget set was measured forgotten, in plain words: {"status", "by", "message"}. By the audit
    when a holdout set was given (status: its verdict on θ_u), else by the quick evaluation's forget
    probability (remembered within 5 % of θ_full's, else "reduced": less likely, but no audit says whether the
    rows can still be told from unseen ones), else "not measured"."""
    if "audit" in summary:
        before, after = summary["audit"].values()
        level = {name: r.get("retrained_auc", 0.5) for name, r in after["attacks"].items()}
        # the attack that tells them apart best: its interval furthest above its level
        top = max(after["attacks"], key=lambda a: after["attacks"][a]["interval"][0] - level[a])
        b, a = before["attacks"][top], after["attacks"][top]
        seen = (f"{top} AUC {b['auc']:.3f} → {a['auc']:.3f}, 95 % interval {a['interval'][0]:.3f}–"
                f"{a['interval'][1]:.3f}, against " + (f"the retrained model's {level[top]:.3f}"
                                                        if "retrained_auc" in a else "0.5"))
        message = {"remembered": f"NOT FORGOTTEN: an attacker still tells the forget rows from unseen ones ({seen}); "
                                 "the model still knows the data",
                   "over-unlearned": f"over-unlearned: the forget rows now look less familiar than unseen ones "
                                     f"({seen}), which gives them away too",
                   "indistinguishable": f"forgotten by every attack's measure: the forget rows cannot be told from "
                                        f"unseen ones ({seen})"}[after["verdict"]]
        return {"status": after["verdict"], "by": "audit", "message": message}
    if "eval" in summary:
        before, after = (r["forget"]["answer_prob"] for r in summary["eval"].values())
        if after >= STILL_KNOWN * before:
            return {"status": "remembered", "by": "forget probability",
                    "message": f"NOT FORGOTTEN: forget probability {before:.3f} → {after:.3f}, within 5 % of θ_full's: "
                               "the model still knows the forget set"}
        return {"status": "reduced", "by": "forget probability",
                "message": f"forget probability {before:.3f} → {after:.3f}; whether the rows can still be told from "
                           "unseen ones is not measured: give --holdout (rows of the same kind it never saw) to audit"}
    return {"status": "not measured", "by": None,
            "message": "nothing was measured (--no-eval, no --holdout): whether the data is forgotten is unknown"}


def evaluate_models(models: dict[str, Path], sets: dict[str, list[QA]], device=None, generate=True,
                    dtype=None, max_length: int = 256) -> dict:
    """{model label: {set label: evaluate(...)}} loading one model at a time."""
    results = {}
    for label, folder in bar(models.items(), desc="evaluate", unit="model"):
        model, tok = load_model(folder, device, dtype)
        results[label] = {name: evaluate(model, tok, rows, generate=generate, max_length=max_length)
                          for name, rows in sets.items()}
        del model
    return results


def format_table(results: dict) -> str:
    sets = list(next(iter(results.values())))
    cols = [f"{s} {m}" for s in sets for m in ("prob", "EM")]
    width = max(len(k) for k in results) + 2
    lines = ["model".ljust(width) + "".join(c.rjust(13) for c in cols)]
    for label, by_set in results.items():
        cells = []
        for s in sets:
            r = by_set[s]
            cells += [f"{r['answer_prob']:.3f}", f"{r['exact_match']:.3f}" if "exact_match" in r else "-"]
        lines.append(label.ljust(width) + "".join(c.rjust(13) for c in cells))
    return "\n".join(lines)


class _StepMeter:
    """Wall time and peak memory of each pipeline step: private host memory (RssAnon) and, on a GPU,
    torch.cuda.max_memory_allocated. Freed heap is handed back between steps, so a step's peak is its own."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak_host: dict[str, int] = {}
        self.peak_resident: dict[str, int] = {}
        self.peak_device: dict[str, int] = {}

    def __call__(self, name: str, fn, *args, **kwargs):
        import torch

        release_freed_memory()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with PeakRssAnon(interval=0.05) as m:
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:
                e.add_note(f"perta-fast step: {name}")  # an out-of-memory error then names the step
                raise
        self.seconds[name] = round(time.perf_counter() - t, 2)
        self.peak_host[name] = m.peak
        self.peak_resident[name] = m.peak_rss
        if cuda:
            self.peak_device[name] = torch.cuda.max_memory_allocated()
        return result


def unlearn(model_dir: str | Path, forget: list[QA], retain: list[QA], out: str | Path,
            finetuned: str | Path | None = None, options: UnlearnOptions | None = None,
            work_dir: str | Path | None = None, overwrite: bool = False, holdout: list | None = None,
            retain_model: str | Path | None = None) -> dict:
    """θ_full (`model_dir`) + forget + retain (rows, or files as load_qa reads them) → θ_u in `out`;
    fine-tunes θ_ft when not given. With lam="auto", `options.calibration.hold_out` of each set is held back:
    importance is estimated on the rest, λ chosen on those rows (perta_fast.calibration), and the curve written
    into `out` beside the model; θ_ft still learns every forget row (all of them are to be forgotten).
    `holdout` (rows of the forget set's kind the model never saw): θ_full and θ_u are audited (perta_fast.audit)
    and the record says, in `forgotten`, whether the forget rows can still be told from unseen ones;
    `retain_model` (a model that never saw the forget rows: a retrained one, or θ_0 when the retain data is not
    the point) sets the level the audit's AUCs are judged against instead of 0.5."""
    opts = options or UnlearnOptions()
    if opts.method not in METHODS:
        raise PertaError(f"unknown method {opts.method!r} (expected one of {', '.join(METHODS)})")
    auto = opts.lam == "auto"
    if not auto and isinstance(opts.lam, str):
        raise PertaError(f"--lam must be a number or auto, got {opts.lam!r}")
    where = {"forget": source_of(forget, "the forget set"), "retain": source_of(retain, "the retain set"),
             "holdout": source_of(holdout, "the holdout set")}
    forget, retain = load_qa(forget), load_qa(retain)
    holdout = load_qa(holdout) if holdout is not None else None
    # identical sets refused before θ_ft is trained; importance warns of rows the two share
    check_sets(forget, retain, (where["forget"], where["retain"]))
    tok = load_tokenizer(model_dir)  # the sets' shapes and counts for the record; a bad row fails here, before work
    described = {label: set_summary(rows, encode(tok, rows, opts.max_length))
                 for label, rows in (("forget", forget), ("retain", retain), ("holdout", holdout)) if rows}
    split = None
    if retain_model is not None and holdout is None:
        raise PertaError("--retain-model is the audit's reference: give --holdout too")
    if auto:
        check_options(opts.calibration)
        if opts.calibration.forget_target == "audit" and holdout is None:
            raise PertaError("--forget-target audit needs --holdout: rows of the forget set's kind the model never saw")
        split = validation_sets(forget, retain, opts.calibration.hold_out, where)
    inputs = tuple(p for p in (model_dir, finetuned, opts.importance_model, retain_model) if p)
    check_output_path(Path(out), overwrite, inputs)
    if opts.finetune.lora_rank is not None and finetuned is None:
        lora_config(opts.finetune)  # bad LoRA options fail before anything runs
    # what the architecture cannot do is said now, not after θ_ft is trained: each folder's support read once
    steps: dict[str, list[str]] = {}
    if finetuned is None:
        steps.setdefault(str(model_dir), []).append(
            "finetune --lora-rank" if opts.finetune.lora_rank is not None else "finetune")
    if opts.method != "tv":
        steps.setdefault(str(opts.importance_model or model_dir), []).append(
            f"importance --method {opts.method.split('-', 1)[1]}")
    for folder, needed in steps.items():
        require(folder, needed)
    work = Path(work_dir) if work_dir else Path(out).with_name(Path(out).name + ".work")
    with _work_folder(work):
        meter, t0 = _StepMeter(), time.perf_counter()
        if finetuned is None:
            ft_opts = replace(opts.finetune, dtype=opts.dtype, gradient_checkpointing=opts.gradient_checkpointing,
                              device=opts.device)
            finetuned = meter("finetune", build_finetuned, model_dir, forget, work, ft_opts, where["forget"])
        adapter = Path(finetuned) if is_adapter(finetuned) else None
        importance = None
        if opts.method != "tv":
            scored = (split["forget"][0], split["retain"][0]) if auto else (forget, retain)
            importance = meter("importance", build_importance, opts.importance_model or model_dir, *scored,
                               opts.method.split("-", 1)[1], work, opts, adapter, (where["forget"], where["retain"]))
        merge_opts = MergeOptions(method="tv" if opts.method == "tv" else "perta", lam=opts.lam, alpha=opts.alpha,
                                  power=opts.power, eps=opts.eps, device=pick_device(opts.device))
        calibration = None
        if auto:
            calibration = meter("calibrate", calibrate, model_dir, finetuned, split["forget"][1], split["retain"][1],
                                importance, merge_opts, replace(opts.calibration, device=opts.device, dtype=opts.dtype),
                                holdout)
            merge_opts.lam = calibration["lam"]
            log.info("calibrated: λ = %g", merge_opts.lam)
        plan = plan_merge(model_dir, finetuned, importance, merge_opts)
        # the output appears only once evaluated and recorded: a crash in evaluation leaves nothing at `out`
        with atomic_dir(out, overwrite, inputs) as staged:
            record = meter("merge", write_merge, plan, staged)
            summary = {"method": opts.method, "lam": merge_opts.lam, "lam_chosen_by": "calibration" if auto else "user",
                       "out": str(out), "finetuned": str(finetuned),
                       "importance": str(importance) if importance else None, "mean_weight": record["mean_weight"],
                       "forget_rows": len(forget), "forget_sha256": data_hash(forget), "retain_rows": len(retain),
                       "retain_sha256": data_hash(retain), "forget_data": described["forget"],
                       "retain_data": described["retain"], "work": str(work), "work_kept": opts.keep_work}
            if calibration is not None:
                write_curve(calibration, staged)
                summary["calibration"] = calibration
            if opts.evaluate:
                summary["eval"] = meter("eval", evaluate_models,
                                        {"before (θ_full)": Path(model_dir), f"after ({opts.method})": staged},
                                        {"forget": forget[:opts.eval_samples or None],
                                         "retain": retain[:opts.eval_samples or None]}, opts.device, dtype=opts.dtype,
                                        max_length=opts.max_length)
                summary["table"] = format_table(summary["eval"])
            if holdout is not None:
                summary["holdout_data"] = described["holdout"]
                summary["audit"] = meter("audit", audit_models,
                                         {"before (θ_full)": Path(model_dir), f"after ({opts.method})": staged},
                                         forget, holdout, AuditOptions(max_length=opts.max_length,
                                                                       batch_size=opts.batch_size, device=opts.device,
                                                                       dtype=opts.dtype),
                                         (where["forget"], where["holdout"]), retain_model)
            summary["forgotten"] = forgetting(summary)
            summary["seconds"] = {**meter.seconds, "total": round(time.perf_counter() - t0, 2)}
            summary["peak_rss_anon_bytes"] = meter.peak_host
            summary["peak_rss_bytes"] = meter.peak_resident  # with mapped checkpoint pages
            if meter.peak_device:
                summary["peak_cuda_allocated_bytes"] = meter.peak_device
            (staged / "perta_unlearn.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
            (staged / "README.md").write_text(card_with_metrics((staged / "README.md").read_text(), summary))
    if not opts.keep_work:  # θ_ft learnt exactly the data to delete: it must not outlive the request unasked
        summary["work_removed"] = remove_forget_derived(work)
    return summary


def lambda_sweep(full: Path, finetuned: Path, importance: dict[str, Path | None], lams, sets: dict,
                 device=None) -> dict:
    """Answer probability of θ_full − λ·(w ⊙ τ) over a λ grid for each method, merged in memory by the
    merge's own executor (perta_fast.calibration): {method: [{lam, mean_weight, set: prob}]}.
    `finetuned` is a checkpoint or a LoRA adapter folder (τ = 0 outside its targets)."""
    return {method: probability_curve(full, finetuned, imp, MergeOptions(method="perta" if imp else "tv"), sets, lams, device)
            for method, imp in bar(importance.items(), desc="λ sweep", unit="method")}


def _plot(results: dict, curves: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method, points in curves.items():
        xs, ys = [p["forget"] for p in points], [p["retain"] for p in points]
        left.plot(xs, ys, marker="o", label=method)
        for p in points:
            left.annotate(f"λ={p['lam']:g}", (p["forget"], p["retain"]), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
    full = results.get("θ_full")
    if full:
        left.scatter([full["forget"]["answer_prob"]], [full["retain"]["answer_prob"]], marker="*", s=150,
                     color="black", label="θ_full (before)", zorder=3)
    left.set_xlabel("forget facts: answer probability (lower = forgotten)")
    left.set_ylabel("retain facts: answer probability (higher = kept)")
    left.set_title("trade-off over λ (upper left is best)")
    left.legend(fontsize=8)
    labels = list(results)
    xs = range(len(labels))
    right.bar([x - 0.2 for x in xs], [results[m]["forget"]["exact_match"] for m in labels], 0.4, label="forget facts")
    right.bar([x + 0.2 for x in xs], [results[m]["retain"]["exact_match"] for m in labels], 0.4, label="retain facts")
    right.set_xticks(list(xs), labels, rotation=20, ha="right")
    right.set_ylim(0, 1.05)
    right.set_title("exact match of greedy answers at the table's λ")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def format_sweep(curves: dict) -> str:
    lams = [p["lam"] for p in next(iter(curves.values()))]
    head = "forget / retain answer prob".ljust(28) + "".join(f"λ={lam:g}".rjust(14) for lam in lams)
    rows = [m.ljust(28) + "".join(f"{p['forget']:.3f} / {p['retain']:.3f}".rjust(14) for p in pts)
            for m, pts in curves.items()]
    return "\n".join([head] + rows)


def table_of_forgetting(results: dict, facts: dict, audits: dict, lams: dict) -> str:
    """Per model: λ, forget facts no longer given, retain facts still given (greedy answers holding the fact's
    value), and the audit's AUC and verdict."""
    lines = [f"{'model':<22}{'λ':>7}{'forget facts gone':>19}{'retain facts kept':>19}{'Min-K++ AUC':>13}  verdict"]
    for m in results:
        forget, retain = facts[m]["forget"], facts[m]["retain"]
        attack = audits.get(m, {}).get("attacks", {}).get("minkpp")
        lam = "" if m not in lams else f"{lams[m]:.3g}"
        auc, verdict = ("", "") if attack is None else (f"{attack['auc']:.3f}", attack["verdict"])
        gone, kept = f"{forget.count(False)}/{len(forget)}", f"{sum(retain)}/{len(retain)}"
        lines.append(f"{m:<22}{lam:>7}{gone:>19}{kept:>19}{auc:>13}  {verdict}")
    return "\n".join(lines)


def in_plain_words(facts: dict, audits: dict, lams: dict, holdout_rows: int) -> list[str]:
    """One line per unlearned model: forgotten only when no forget fact is still given; an audit that cannot
    tell a few facts from unseen ones does not outweigh answers that still give them."""
    lines = []
    for m in lams:
        given, n = sum(facts[m]["forget"]), len(facts[m]["forget"])
        attack = audits[m]["attacks"]["minkpp"]
        auc = f"Min-K++ AUC {attack['auc']:.2f}"
        if not given:
            lines.append(f"{m}: every forget fact gone (the audit: {attack['verdict']}, {auc})")
        elif attack["verdict"] == "remembered":
            lines.append(f"{m}: NOT forgotten: {given} of {n} forget facts still answered, and the audit still "
                         f"tells them from unseen ones ({auc})")
        else:
            lines.append(f"{m}: NOT forgotten: {given} of {n} forget facts still answered, though the audit calls "
                         f"them {attack['verdict']} ({auc}: {n} facts against {holdout_rows} unseen ones are too few "
                         "for its interval to exclude 0.5)")
    return lines


def forgotten_sample(forget: list[QA], results: dict, facts: dict, lams: dict) -> dict:
    """A forget question whose fact the most unlearned models no longer give (the first such), and each model's
    answer to it (in_plain_words says which models still give every forget fact)."""
    unlearned = list(lams)
    gone = [sum(not facts[m]["forget"][i] for m in unlearned) for i in range(len(forget))]
    i = gone.index(max(gone))
    return {"question": forget[i].question, "reference": forget[i].answer,
            "answers": {m: r["forget"]["generations"][i] for m, r in results.items()},
            "gives_fact": {m: facts[m]["forget"][i] for m in results}}


def demo(out: str | Path = "perta-demo", options: DemoOptions | None = None, overwrite: bool = False,
         model_dir: str | Path | None = None) -> dict:
    """The main job on its built-in default: SmolLM2-135M-Instruct and generated fictitious facts."""
    opts = options or DemoOptions()
    t0 = time.perf_counter()
    forget, retain = make_facts(opts.n_people, opts.n_forget, opts.seed)  # bad options fail before any work
    unseen = holdout_people(opts.n_people, opts.holdout_people, opts.seed)
    holdout = [qa for p in unseen for qa in facts_of(p)]
    values = fact_values(make_people(opts.n_people, opts.seed))
    base = Path(model_dir) if model_dir else default_model()
    with atomic_dir(out, overwrite, inputs=(base,)) as work:
        for name, rows in (("forget", forget), ("retain", retain), ("holdout", holdout)):
            (work / f"{name}.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
        full, ft = work / "theta_full", work / "theta_ft"
        finetune(base, forget + retain, full, replace(opts.full, device=opts.device))
        finetune(full, forget, ft, replace(opts.forget_ft, device=opts.device))
        thetas = {"": (ft, None)}
        if opts.lora_rank:
            adapter = work / "theta_ft_lora"
            finetune(full, forget, adapter, replace(opts.forget_lora, lora_rank=opts.lora_rank, device=opts.device))
            thetas[" (LoRA)"] = (adapter, adapter)
        models = {"base": base, "θ_full": full}
        sets = {"forget": forget, "retain": retain}
        curves, lams, calibrations = {}, {}, {}
        for suffix, (theta_ft, adapter) in thetas.items():
            tag = suffix.strip(" ()").lower()
            imps = {"TV": None}
            for method in ("grad", "fisher"):
                imps[f"PerTA-{method}"] = work / f"importance-{method}{'-' + tag if tag else ''}.safetensors"
                importance_file(full, forget, retain, imps[f"PerTA-{method}"], ImportanceOptions(
                    method=method, batch_size=opts.batch_size, device=opts.device, adapter=adapter))
            for label, imp in imps.items():
                folder = work / f"unlearned-{label.lower()}{'-' + tag if tag else ''}"
                merge_options = MergeOptions(method="tv" if imp is None else "perta")
                lam = opts.lam
                if lam == "auto":
                    # on the rows it forgets: two people's 8 facts leave no validation split to hold back
                    cal = calibrate(full, theta_ft, forget, retain, imp, merge_options, CalibrateOptions(
                        forget_target="audit", generate=False, device=opts.device), holdout)
                    lam = cal["lam"]
                    calibrations[label + suffix] = {k: cal[k] for k in ("lam", "reached_target", "note", "chosen",
                                                                        "retain_floor", "audit_attack")}
                merge(full, theta_ft, folder, imp, replace(merge_options, lam=lam))
                models[label + suffix] = folder
                lams[label + suffix] = lam
            curves.update({k + suffix: v for k, v in lambda_sweep(full, theta_ft, imps, opts.sweep, sets,
                                                                  opts.device).items()})
        results = evaluate_models(models, sets, opts.device)
        audits = audit_models({m: f for m, f in models.items() if m != "base"}, forget, holdout,
                              AuditOptions(attacks="minkpp", device=opts.device), ("the forget facts", "unseen people's"))
        facts = {m: {name: [values[q.question].lower() in g.lower() for q, g in zip(rows, r[name]["generations"])]
                     for name, rows in sets.items()} for m, r in results.items()}
        summary = {"table": table_of_forgetting(results, facts, audits, lams), "results": results,
                   "facts_given": facts, "audit": audits, "lam": lams, "calibration": calibrations,
                   "in_plain_words": in_plain_words(facts, audits, lams, len(holdout)),
                   "sample": forgotten_sample(forget, results, facts, lams), "table_by_probability": format_table(results),
                   "options": {"people": opts.n_people, "forget_people": opts.n_forget, "seed": opts.seed,
                               "holdout_people": opts.holdout_people, "lora_rank": opts.lora_rank, "lam": opts.lam},
                   "sweep": curves, "sweep_table": format_sweep(curves),
                   "n_forget_rows": len(forget), "n_retain_rows": len(retain), "n_holdout_rows": len(holdout),
                   "seconds": round(time.perf_counter() - t0, 1)}
        (work / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        summary["plot"] = str(Path(out) / "demo.png") if _plot(results, curves, work / "demo.png") else None
    return summary
