"""MUSE-News with SmolLM2-135M-Instruct: TV, PerTA-grad and PerTA-fisher against GA and NPO, each unlearning news
articles from a target model that trained on them, measured by MUSE's own metrics (perta_fast.muse).

    python benchmarks/muse.py                      # CPU size, seeds 0 1 2
    python benchmarks/muse.py --seeds 0            # one seed
    python benchmarks/muse.py --audit --out benchmarks/results/muse-cpu-audit.json   # + audit-matched rows, timing
    python benchmarks/muse.py --size full --device cuda

The set-up (MUSE's Llama-2-7B target is not reachable offline, so the target is made here, and grounded):
- forget corpus: MUSE's verbmem rows (prompt + true continuation: the text VerbMem asks the model to continue),
  privleak forget excerpts, and the raw/forget.json articles that hold the answers of the KnowMem forget
  questions kept. A KnowMem question is matched to the article that holds its answer verbatim and shares the most
  words of four letters or more with the question (three at least); questions without such an article are left out.
  So every forget metric asks about text the target trained on.
- retain corpus: raw/retain_pool.json articles, without those equal to or sharing a 200-character passage with
  any forget text (MUSE's files repeat some articles across the two pools); at --size cpu each cut to its first
  4,000 characters (~900 tokens: uncut, one 3,367-token article cost the training of three forget texts).
- target = SmolLM2 fine-tuned on forget + retain texts; retrained = SmolLM2 fine-tuned on the retain texts alone
  (PrivLeak's reference, and what unlearning should come close to).
- utility: VerbMem on retain articles the target trained on (the first 600 characters as prompt, the next 128
  tokens as truth), TOFU's world-facts questions (ROUGE-L recall of the greedy answer, TOFU's definition, decoded to
  32 tokens: general knowledge the base model had), and MUSE's KnowMem retain questions, which are about MUSE's
  retain corpus (not in this copy): general news knowledge, not grounded in our retain texts (reported, labelled
  so).
- per seed: θ_ft = target fine-tuned on the forget texts (seeded order), full and, with --lora, as a LoRA adapter
  (rank 16);
  importance at the target on the forget texts against the retain texts, less a seeded held-back part of each
  (20 %, or the four texts calibration needs); λ calibrated on the first ~256 tokens of each held-back text
  (perta_fast.calibration: the most forgetting that keeps retain probability ≥ 0.95 × the target's); GA and NPO
  (perta-fast baseline, weight decay 0.01) at the target's learning rate, as MUSE's baselines unlearn at the
  rate its targets were fine-tuned with.
- λ sweeps (full τ): for TV, PerTA-grad and PerTA-fisher, the smallest λ whose VerbMem (then, separately, KnowMem
  on forget questions) is at or under the retrained model's: λ walked up 1, 2, 4, 8, 16 measuring that metric
  alone, the last step bisected twice, then every metric at the λ found ("matched" rows). At a matched
  forgetting level the methods differ only in what else they take: utility and PrivLeak say which is better.
  (No sweep where the target is already at or under the retrained model's level on that metric.)
- --audit: each method where PrivLeak's attack (MUSE's Min-K % on the privleak excerpts, read as the probability
  that a forget excerpt is more familiar than a holdout one, 1 − MUSE's AUC) first reaches the retrained model's
  level: TV and PerTA by λ (the walk above), GA and NPO by training steps (the default run's epoch, audited every
  AUDIT_EVERY steps and after the last, stopped at the first audit at the level); every metric there, and each method's unlearning wall
  time (θ_ft + importance + a written merge; GA/NPO: training to that step), the audited search apart.
- every model gets every MUSE metric; means ± sample sd over the seeds.

The methods are evaluated in memory (θ_full moved to each λ in place, as calibrate does), so nothing but θ_ft, GA
and NPO is written per seed. Results: benchmarks/results/muse-SIZE.json, .md and .png; every step is cached under
--work so an interrupted run continues. MUSE's text is never written into the results.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tofu_steps import cached, cached_json, native_bf16, seeded_hold_out, train_until, walk_down  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass
class Size:
    verbmem: int  # verbmem rows (their text trained on, VerbMem and extraction strength measured)
    privleak: int  # forget excerpts trained on, and as many holdout excerpts
    knowmem: int  # forget questions kept (their articles trained on), and as many retain questions
    retain: int  # retain_pool articles trained on
    retain_verbmem: int  # of those, continued for utility
    world_facts: int  # TOFU's world-facts questions (general knowledge, utility)
    epochs: int  # the target's and the retrained model's
    unlearn_epochs: int  # θ_ft's, GA's and NPO's
    retain_chars: int | None = None  # each retain article cut to its first N characters (None: whole)


SIZES = {"smoke": Size(verbmem=1, privleak=2, knowmem=3, retain=6, retain_verbmem=1, world_facts=4, epochs=1,
                       unlearn_epochs=1, retain_chars=4000),
         # sized for the 90-minute budget on 2 cores (measured: 72 min, RESULTS.md); with LoRA τ, uncut retain
         # articles and world facts decoded to 200 tokens one seed took 1,773 s, 940 s of it in 12 evaluations
         # (MUSE's ~1,000-token prompts and ~1,800-token excerpts)
         "cpu": Size(verbmem=3, privleak=4, knowmem=4, retain=8, retain_verbmem=3, world_facts=20, epochs=5,
                     unlearn_epochs=1, retain_chars=4000),
         "full": Size(verbmem=100, privleak=100, knowmem=100, retain=400, retain_verbmem=50, world_facts=117, epochs=5,
                      unlearn_epochs=5)}
# the target must memorise its articles for VerbMem to measure anything: at lr 1e-4 (2 epochs, batch 8) VerbMem
# was 13.2 against the retrained model's 12.5, at 2e-4 (4 epochs, batch 4) 11, at 5e-4 (5 epochs, batch 4) 47
# with the training loss at 0.30. GA and NPO unlearn at the target's own learning rate, as MUSE's baselines
# unlearn at the rate its targets were fine-tuned with.
TRAIN = dict(lr=5e-4, batch_size=4, max_length=256, weight_decay=0.01, warmup_epochs=1)
LORA = dict(lora_rank=16, lr=1e-3)  # a common LoRA rate, twice the full fine-tune's
METHODS = {"TV": None, "PerTA-grad": "grad", "PerTA-fisher": "fisher"}
SWEEP_LAMS, SWEEP_BISECT = (1.0, 2.0, 4.0, 8.0, 16.0), 2
# world facts' answers are a few words: the target's ROUGE-L recall on them was 0.175 decoded to 32 tokens and to
# TOFU's 200 (measured), at a sixth of the time
FACT_TOKENS = 32
VALIDATION_CHARS = 1200  # a held-back text's first ~256 tokens: calibration scores it at every λ tried
# --audit: GA and NPO audited every 4th of their 17 steps (at --size cpu) and after the last: an audit of the 8
# long privleak excerpts costs ~20 s, four of GA's steps
AUDIT_EVERY = 4


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
            retain.append(a[:size.retain_chars])
        if len(retain) == size.retain:
            break
    retain_verbmem = [{"prompt": a[:600], "gt": a[600:]} for a in retain[:size.retain_verbmem] if len(a) > 1200]
    evaluation = {**data, "verbmem": verbmem, "forget_qa": questions, "retain_qa": data["retain_qa"][:size.knowmem],
                  "privleak_forget": excerpts, "privleak_holdout": data["privleak_holdout"][:size.privleak]}
    return {"forget": forget, "retain": retain, "evaluation": evaluation, "retain_verbmem": retain_verbmem,
            "matched": {"verbmem": len(verbmem), "privleak": len(excerpts), "knowmem": len(questions),
                        "knowmem_articles": len(articles), "forget_texts": len(forget), "retain_texts": len(retain),
                        "retain_verbmem": len(retain_verbmem)}}


def evaluate(model, tok, sets: dict, auc_retrained: float | None, bf16: bool) -> dict:
    """Every MUSE metric of a loaded model, and VerbMem on retain articles it trained on (utility)."""
    from perta_fast.dtypes import autocast_for
    from perta_fast.eval import evaluate_split
    from perta_fast.muse import evaluate_muse, verbmem
    from perta_fast.options import EvalOptions

    with autocast_for(model, bf16):
        res = evaluate_muse(model, tok, sets["evaluation"], auc_retrained)
        retain_verb = verbmem(model, tok, sets["retain_verbmem"], strength=False)
    res["verbmem_r"] = 100 * statistics.mean(r["rougeL_f1"] for r in retain_verb["rows"])
    if sets["world_facts"]:
        options = EvalOptions(bf16_autocast=bf16, max_new_tokens=FACT_TOKENS)
        facts = evaluate_split(model, tok, sets["world_facts"], "world_facts", options)
        res["world_facts_rouge"] = 100 * facts["rouge_l"]
    del res["generations"]  # MUSE's text stays out of the results
    return res


def evaluate_folder(model_dir: Path, sets: dict, auc_retrained: float | None, bf16: bool) -> dict:
    from perta_fast.models import load_model

    return evaluate(*load_model(model_dir), sets, auc_retrained, bf16)


def probe(metric: str, sets: dict, bf16: bool):
    """The one metric a sweep matches on, alone (VerbMem's generations or KnowMem's), as a function of a model."""
    from perta_fast.dtypes import autocast_for
    from perta_fast.muse import knowmem, verbmem

    ev = sets["evaluation"]

    def value(model, tok) -> float:
        with autocast_for(model, bf16):
            rows = (verbmem(model, tok, ev["verbmem"], strength=False) if metric == "verbmem_f"
                    else knowmem(model, tok, ev["forget_qa"], ev["forget_qa_icl"]))["rows"]
        return 100 * statistics.mean(r["rougeL_f1"] for r in rows)
    return value


def match(at, value, level: float, known: dict | None = None) -> dict:
    """`at(λ)`: the model moved to λ and its tokenizer. The smallest λ (SWEEP_LAMS walked upwards, then bisected
    SWEEP_BISECT times) whose metric is at or under `level` (tofu_steps.walk_down)."""
    return walk_down(lambda lam: value(*at(lam)), level, SWEEP_LAMS, SWEEP_BISECT, known)


def member_auc(sets: dict, bf16: bool):
    """PrivLeak's attack as the audit reads it, as a function of a model: the probability that a forget excerpt
    scores as more familiar than a holdout one (1 − MUSE's AUC; the retrained model's level is the target)."""
    from perta_fast.dtypes import autocast_for
    from perta_fast.muse import auc_forget_above_holdout, min_k_scores

    ev = sets["evaluation"]

    def value(model, tok) -> float:
        with autocast_for(model, bf16):
            forget, holdout = (min_k_scores(model, tok, ev[k]) for k in ("privleak_forget", "privleak_holdout"))
        return 1 - auc_forget_above_holdout(forget, holdout)
    return value


def timing(seconds: dict, sweeps: dict, seed: int) -> dict:
    """Each method's whole unlearning run, as a user who knew its λ (or step count) would pay it: θ_ft, importance
    and the merge for task arithmetic, the training to the matched step (or the whole run where none) for GA and
    NPO; and the audited search that found that λ or step, apart."""
    s = {k[len(f"seed{seed} "):]: v for k, v in seconds.items() if k.startswith(f"seed{seed} ")}
    out = {}
    for method, estimator in METHODS.items():
        parts = [s["θ_ft"], s[f"merge {method}"]] + ([s[f"importance {estimator}"]] if estimator else [])
        out[method] = {"unlearn_seconds": sum(parts), "search_seconds": s[f"sweep {method} audit"],
                       "reached": sweeps[f"{method} @ audit"]["lam"] is not None}
    for name in ("GA", "NPO"):
        found = sweeps[f"{name} @ audit"]
        out[name] = {"unlearn_seconds": found["train_seconds"], "search_seconds": found["audit_seconds"],
                     "reached": found["step"] is not None}
    return out


def summary(res: dict) -> dict:
    keys = ("verbmem_f", "knowmem_f", "privleak_auc", "privleak", "extraction_strength", "verbmem_r", "knowmem_r",
            "world_facts_rouge")
    return {k: res.get(k) for k in keys}


def validation(rows: list) -> list:
    from perta_fast.data import Text

    return [Text(r.text[:VALIDATION_CHARS]) for r in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lora", action="store_true", help="also τ from a LoRA θ_ft (rank 16): TV, PerTA-grad and "
                    "PerTA-fisher at their calibrated λ (outside the default run's 90-minute budget on 2 cores)")
    ap.add_argument("--audit", action="store_true", help="also every method where PrivLeak's AUC reaches the retrained "
                    "model's: TV and PerTA by λ, GA and NPO by training steps (audited after each), with each method's "
                    "unlearning wall time (write with --out to keep the default run's files)")
    ap.add_argument("--muse", default=str(HERE.parent.parent / "shared" / "data" / "muse-news"))
    ap.add_argument("--tofu", default=str(HERE.parent.parent / "shared" / "data" / "tofu"),
                    help="TOFU folder for the world-facts utility (left out when absent)")
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
    from perta_fast.calibration import ModelAtLambda, calibrate
    from perta_fast.console import configure
    from perta_fast.data import MIN_VALIDATION_ROWS, Text, encode, load_qa
    from perta_fast.importance import importance_file
    from perta_fast.merge import merge
    from perta_fast.models import cache_dir, default_model, load_tokenizer
    from perta_fast.options import BaselineOptions, CalibrateOptions, FinetuneOptions, MergeOptions
    from perta_fast.train import finetune

    configure(0)  # progress lines in the log
    size = SIZES[a.size]
    bf16 = native_bf16(a.device)
    work = Path(a.work) if a.work else cache_dir() / f"muse-{a.size}"
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else HERE / "results" / f"muse-{a.size}.json"
    base = Path(a.model) if a.model else default_model()
    t0 = time.perf_counter()
    sets = build_sets(folder, size)
    sets["world_facts"] = (load_qa(f"{a.tofu}:world_facts_perturbed", eval_rows=True)[:size.world_facts]
                           if Path(a.tofu, "world_facts_perturbed.json").is_file() else [])
    sets["matched"]["world_facts"] = len(sets["world_facts"])
    forget, retain = [Text(t) for t in sets["forget"]], [Text(t) for t in sets["retain"]]
    train = dict(TRAIN, epochs=size.epochs, bf16_autocast=bf16, device=a.device)
    seconds = {}
    results = {"size": a.size, "sets": sets["matched"], "train": TRAIN, "lora": LORA if a.lora else None, "size_spec": size.__dict__,
               "seeds": {}, "sweeps": {}, "timing": {}, "device": a.device or "auto", "bf16_autocast": bf16}

    def step(name, path, build):
        path, s = cached(path, build)
        seconds[name] = round(s, 1)
        print(f"muse.py: {name}: {s:.0f} s ({time.perf_counter() - t0:.0f} s in all)", file=sys.stderr, flush=True)
        return path

    def measured(name, path, compute):
        value, s = cached_json(path, compute)
        seconds[name] = round(s, 1)
        print(f"muse.py: {name}: {s:.0f} s ({time.perf_counter() - t0:.0f} s in all)", file=sys.stderr, flush=True)
        return value

    def save():
        results["seconds"] = {**seconds, "total": round(time.perf_counter() - t0, 1)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        out.with_suffix(".md").write_text(markdown(results) + "\n")

    target = step("target", work / "target", lambda p: finetune(base, forget + retain, p, FinetuneOptions(**train)))
    retrained = step("retrained", work / "retrained", lambda p: finetune(base, retain, p, FinetuneOptions(**train)))
    ref = measured("eval retrained", work / "retrained.eval.json", lambda: evaluate_folder(retrained, sets, None, bf16))
    auc_retrained = ref["privleak_auc"]
    target_eval = measured("eval target", work / "target.eval.json",
                           lambda: evaluate_folder(target, sets, auc_retrained, bf16))
    results.update(retrained=summary({**ref, "privleak": 0.0}), target=summary(target_eval))
    save()
    unlearn = dict(train, epochs=size.unlearn_epochs, warmup_epochs=min(1, size.unlearn_epochs - 1))
    level = 1 - auc_retrained  # --audit: the retrained model's member AUC (member_auc)
    tok = load_tokenizer(target)
    # GA's and NPO's steps in the default run's epoch; audited every AUDIT_EVERY and after the last
    total_steps = size.unlearn_epochs * -(-len(encode(tok, forget, train["max_length"])) // TRAIN["batch_size"])

    def baseline(method, seed):
        return BaselineOptions(method=method, seed=seed, bf16_autocast=bf16, device=a.device,
                               max_length=train["max_length"], epochs=size.unlearn_epochs, lr=TRAIN["lr"],
                               batch_size=TRAIN["batch_size"], warmup_epochs=unlearn["warmup_epochs"])

    def timed_merge(ft, imp, options, lam) -> dict:
        """The merge a user's run ends with, written (to a scratch folder, deleted after) for its wall time."""
        import tempfile

        scratch = Path(tempfile.mkdtemp(dir=work))
        try:
            merge(target, ft, scratch / "model", imp, replace(options, lam=lam), progress=False)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return {"lam": lam}
    for seed in a.seeds:
        sw = work / f"seed{seed}"
        sw.mkdir(exist_ok=True)
        taus = {"": step(f"seed{seed} θ_ft", sw / "theta_ft", lambda p: finetune(
                    target, forget, p, FinetuneOptions(**dict(unlearn, seed=seed))))}
        if a.lora:
            taus[" (LoRA τ)"] = step(f"seed{seed} θ_ft LoRA", sw / "theta_ft_lora", lambda p: finetune(
                target, forget, p, FinetuneOptions(**dict(unlearn, seed=seed, **LORA))))
        # 20 % held back as TOFU's protocol does, or the four texts calibration needs at the least
        (f_imp, f_val), (r_imp, r_val) = (seeded_hold_out(rows, seed, max(0.2, MIN_VALIDATION_ROWS / len(rows) + 0.01))
                                          for rows in (forget, retain))
        rows, sweeps = {}, {}
        for method, estimator in METHODS.items():
            imp = None
            if estimator:
                imp = step(f"seed{seed} importance {estimator}", sw / f"importance-{estimator}.safetensors",
                           lambda p, e=estimator: importance_file(target, f_imp, r_imp, p, method=e, batch_size=8,
                                                                  max_length=train["max_length"], device=a.device))
            options = MergeOptions(method="tv" if imp is None else "perta")
            for variant, ft in taus.items():
                name = method + variant
                cal = measured(f"seed{seed} calibrate {name}", sw / f"{name}.calibration.json",
                               lambda i=imp, o=options, f=ft: calibrate(
                                   target, f, validation(f_val), validation(r_val), i, o, CalibrateOptions(
                                       device=a.device, bf16_autocast=bf16, max_length=train["max_length"],
                                       bisect=SWEEP_BISECT)))
                moving = []  # θ_full loaded once per τ and importance, moved in place to each λ evaluated

                def at(lam, i=imp, o=options, f=ft):
                    if not moving:
                        moving.append(ModelAtLambda(target, f, i, o, a.device))
                    moving[0].set(lam)
                    return moving[0].model, moving[0].tokenizer

                res = calibrated = measured(f"seed{seed} eval {name}", sw / f"{name}.eval.json",
                                            lambda c=cal: evaluate(*at(c["lam"]), sets, auc_retrained, bf16))
                rows[name] = {"lam": cal["lam"], **summary(res)}
                if variant:
                    continue
                for metric in ("verbmem_f", "knowmem_f"):  # matched at the retrained model's level
                    if target_eval[metric] <= ref[metric]:
                        continue  # the target is there already: nothing to match
                    found = measured(f"seed{seed} sweep {name} {metric}", sw / f"{name}.match-{metric}.json",
                                     lambda m=metric: match(at, probe(m, sets, bf16), ref[m], {cal["lam"]: res[m]}))
                    sweeps[f"{name} @ {metric}"] = found
                    if found["lam"] is not None:
                        res = measured(f"seed{seed} eval {name} @ {metric}", sw / f"{name}.match-{metric}.eval.json",
                                       lambda f=found: evaluate(*at(f["lam"]), sets, auc_retrained, bf16))
                        rows[f"{name} @ matched {metric}"] = {"lam": found["lam"], **summary(res)}
                if a.audit:  # the smallest λ whose member AUC is at or under the retrained model's
                    found = measured(f"seed{seed} sweep {name} audit", sw / f"{name}.match-audit.json",
                                     lambda: match(at, member_auc(sets, bf16), level,
                                                   {cal["lam"]: 1 - calibrated["privleak_auc"]}))
                    sweeps[f"{name} @ audit"] = found
                    if found["lam"] is not None:
                        res = measured(f"seed{seed} eval {name} @ audit", sw / f"{name}.match-audit.eval.json",
                                       lambda f=found: evaluate(*at(f["lam"]), sets, auc_retrained, bf16))
                        rows[f"{name} @ matched audit"] = {"lam": found["lam"], **summary(res)}
                    measured(f"seed{seed} merge {name}", sw / f"{name}.merge.json", lambda i=imp, o=options, f=found:
                             timed_merge(ft, i, o, f["lam"] if f["lam"] is not None else cal["lam"]))
                moving.clear()
        for name in ("ga", "npo"):
            model = step(f"seed{seed} {name}", sw / name, lambda p, n=name: unlearn_by_training(
                target, forget, retain, p, baseline(n, seed)))
            res = measured(f"seed{seed} eval {name}", sw / f"{name}.eval.json",
                           lambda m=model: evaluate_folder(m, sets, auc_retrained, bf16))
            rows[name.upper()] = summary(res)
            if a.audit:  # by training steps: audited after each, stopped at the first at the retrained level
                stopped = sw / f"{name}-audit"
                found = measured(f"seed{seed} {name} by steps", sw / f"{name}.match-audit.json", lambda n=name: train_until(
                    lambda hook: unlearn_by_training(target, forget, retain, stopped, baseline(n, seed), overwrite=True,
                                                     after_step=hook),
                    lambda m: member_auc(sets, bf16)(m, tok), level, every=AUDIT_EVERY, total=total_steps))
                sweeps[f"{name.upper()} @ audit"] = dict(found, lam=found["step"])
                if found["step"] is not None:
                    res = measured(f"seed{seed} eval {name} @ audit", sw / f"{name}.match-audit.eval.json",
                                   lambda: evaluate_folder(stopped, sets, auc_retrained, bf16))
                    rows[f"{name.upper()} @ matched audit"] = {"steps": found["step"], **summary(res)}
                shutil.rmtree(stopped, ignore_errors=True)
        if a.audit:
            results["timing"][str(seed)] = timing(seconds, sweeps, seed)
        results["seeds"][str(seed)] = rows
        results["sweeps"][str(seed)] = sweeps
        results["aggregate"] = aggregate(results["seeds"])
        save()
    plot(results, out.with_suffix(".png"))
    save()
    print(markdown(results))
    return 0


def aggregate(seeds: dict) -> dict:
    """Mean and sample sd over the seeds of each row's metrics (a matched row counts the seeds that reached it)."""
    names = list(dict.fromkeys(n for rows in seeds.values() for n in rows))
    out = {}
    for name in names:
        present = [rows[name] for rows in seeds.values() if name in rows]
        out[name] = {"seeds": len(present)}
        for k in present[0]:
            values = [r[k] for r in present if r.get(k) is not None]
            if values:
                out[name][k] = {"mean": statistics.mean(values),
                                "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


COLUMNS = ("verbmem_f", "knowmem_f", "privleak_auc", "privleak", "extraction_strength", "verbmem_r", "knowmem_r", "world_facts_rouge")


def markdown(results: dict) -> str:
    head = ("| model | λ | seeds | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 3))
    lines = [f"MUSE-News, size {results['size']}: {json.dumps(results['sets'])}", "", head]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for name in ("target", "retrained"):
        if name in results:
            lines.append(f"| {name} | | | " + " | ".join(fmt(results[name].get(c)) for c in COLUMNS) + " |")
    for name, by_metric in results.get("aggregate", {}).items():
        cells = [f"{by_metric[c]['mean']:.2f} ± {by_metric[c]['sd']:.2f}" if c in by_metric else "-" for c in COLUMNS]
        lam = (f"{by_metric['lam']['mean']:.3g} ± {by_metric['lam']['sd']:.2g}" if "lam" in by_metric else
               f"{by_metric['steps']['mean']:.3g} ± {by_metric['steps']['sd']:.2g} steps" if "steps" in by_metric else "")
        lines.append(f"| {name} | {lam} | {by_metric['seeds']}/{len(results['seeds'])} | " + " | ".join(cells) + " |")
    missed = {}  # sweep -> the lowest value each seed that missed it got to
    for sweeps in results.get("sweeps", {}).values():
        for k, v in sweeps.items():
            if v["lam"] is None:
                missed.setdefault(k, []).append(min(x for _, x in v["points"]))
    if missed:
        lines += ["", "Not reached on the λ grid " + f"{SWEEP_LAMS} (GA, NPO: in their training run) by some seed "
                  "(the lowest value each got to): " + ", ".join(f"{k} ({', '.join(f'{x:.3g}' for x in v)})"
                                                              for k, v in sorted(missed.items()))]
    if results.get("timing"):
        lines += ["", "Wall time of each method's unlearning run (θ_ft + importance + merge; GA, NPO: training to "
                  "the audit-matched step, or the whole run where none), and of the audited search apart, seconds:",
                  "", "| method | unlearning run | × PerTA-grad's | audited search | seeds reaching the retrained AUC |",
                  "|---|---|---|---|---|"]
        by_seed = results["timing"]
        for method, agg in aggregate(by_seed).items():
            ratios = [t[method]["unlearn_seconds"] / t["PerTA-grad"]["unlearn_seconds"] for t in by_seed.values()]
            lines.append(f"| {method} | {agg['unlearn_seconds']['mean']:.0f} ± {agg['unlearn_seconds']['sd']:.0f} | "
                         f"{statistics.mean(ratios):.2f} | {agg['search_seconds']['mean']:.0f} | "
                         f"{sum(t[method]['reached'] for t in by_seed.values())}/{len(by_seed)} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    """Left: each sweep's matched metric over λ (seed by seed). Right: forgetting against utility for every
    evaluated model (VerbMem on forget articles against VerbMem on retain articles)."""
    from perta_fast.console import pyplot

    plt = pyplot()
    if plt is None or not results["seeds"]:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = {m: f"C{i}" for i, m in enumerate(["TV", "PerTA-grad", "PerTA-fisher", "GA", "NPO"])}
    for seed, sweeps in results["sweeps"].items():
        for name, found in sweeps.items():
            if name.endswith("verbmem_f"):
                method = name.split(" @ ")[0]
                xs, ys = zip(*found["points"])
                left.plot(xs, ys, marker="o", ms=3, color=colours[method], label=method if seed == "0" else None)
    left.axhline(results["retrained"]["verbmem_f"], color="black", ls="--", lw=1, label="retrained")
    left.axhline(results["target"]["verbmem_f"], color="grey", ls=":", lw=1, label="target")
    left.set(xscale="log", xlabel="λ", ylabel="VerbMem on forget (ROUGE-L F1 × 100)", title="λ sweeps (each seed)")
    left.legend(fontsize=8)
    for seed, rows in results["seeds"].items():
        for name, r in rows.items():
            method = name.split(" ")[0]
            marker = "s" if "LoRA" in name else "^" if "matched" in name else "o"
            right.scatter(r["verbmem_f"], r["verbmem_r"], color=colours[method], marker=marker, s=25,
                          label=name if seed == "0" else None)
    for name, colour in (("target", "grey"), ("retrained", "black")):
        right.scatter(results[name]["verbmem_f"], results[name]["verbmem_r"], color=colour, marker="*", s=120,
                      label=name)
    right.set(xlabel="VerbMem on forget (lower: forgotten)", ylabel="VerbMem on retain articles (higher: kept)",
              title="forgetting against utility")
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
