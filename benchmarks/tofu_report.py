"""The TOFU protocol's report (benchmarks/tofu.py): each seed's results aggregated to mean ± sd, the paired gains
over TV, the markdown tables and the plot."""
from __future__ import annotations

import math
from pathlib import Path

from tofu_steps import matched


def mean_sd(values: list) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": m, "sd": sd, "n": len(vals)}


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
    if summary.get("audit"):
        lines += ["", *audit_markdown(summary, short)]
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


AUDIT_METHODS = ("TV", "PerTA-grad", "PerTA-fisher", "GA", "NPO")


def audit_markdown(summary: dict, short: list) -> list:
    """--match audit: each method where Min-K++'s member AUC first reaches the retain model's (by λ, or GA's and
    NPO's training steps), TOFU's metrics there, and the wall time of each method's unlearning run, the ratio
    to PerTA-grad's taken within each seed (one machine, one run) before the mean."""
    levels, seeds = summary.get("audit_levels", {}), summary["audit"].values()
    lines = [f"Audit-matched (Min-K++ AUC of {levels.get('rows', {}).get('forget')} forget rows against as many TOFU "
             f"holdout rows; base {_fmt(levels.get('base'))}, θ_full {_fmt(levels.get('theta_full'))}, retain model "
             f"{_fmt(levels.get('retain model'))}: the level to reach), mean ± sd over the seeds that reached it:", "",
             "| method | reached | λ or steps | AUC there | lowest AUC searched | " + " | ".join(short) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(short)]
    for method in AUDIT_METHODS:
        entries = [s["methods"][method] for s in seeds if method in s["methods"]]
        if not entries:
            continue
        at = [e["at_match"] for e in entries if e.get("at_match")]
        where = "steps" if method in ("GA", "NPO") else "lam"
        found = [e["search"]["points"] for e in entries if e.get("at_match")]
        auc_there = [dict(map(tuple, p))[a[where]] if where == "lam" else p[-1][1] for p, a in zip(found, at)]
        lines.append(f"| {method} | {len(at)}/{len(entries)} | {_fmt(mean_sd([a[where] for a in at]), 2)} | "
                     f"{_fmt(mean_sd(auc_there))} | "
                     f"{_fmt(mean_sd([min(v for _, v in e['search']['points']) for e in entries]))} | "
                     + " | ".join(_cell(mean_sd([a.get(c) for a in at]), c) for c in COLUMNS) + " |")
    lines += ["", "Wall time of each method's unlearning run (TV: θ_ft + merge; PerTA: θ_ft + importance + merge; GA, "
              "NPO: their training to the audit-matched step, or the whole run where none), seconds, and the "
              "audited search that found the λ or step, apart:", "",
              "| method | unlearning run | × PerTA-grad's (within a seed) | audited search |", "|---|---:|---:|---:|"]
    for method in AUDIT_METHODS:
        pairs = [(s["methods"][method], s["methods"].get("PerTA-grad")) for s in seeds if method in s["methods"]]
        if not pairs:
            continue
        ratios = [e["unlearn_seconds"] / g["unlearn_seconds"] for e, g in pairs if g]
        lines.append(f"| {method} | {_fmt(mean_sd([e['unlearn_seconds'] for e, _ in pairs]), 0)} | "
                     f"{_fmt(mean_sd(ratios), 2)} | {_fmt(mean_sd([e['search_seconds'] for e, _ in pairs]), 0)} |")
    return lines


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
