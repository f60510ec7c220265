"""benchmarks/muse.py's own logic: the matched-λ search, the aggregation over seeds and the grounding of every
forget metric in the texts the target trains on (the last needs ../shared/data/muse-news)."""
from pathlib import Path

import pytest

MUSE = Path(__file__).resolve().parents[2] / "shared" / "data" / "muse-news"


def _bench():
    from helpers import load_benchmark

    return load_benchmark("muse.py", "muse_bench")


def test_match_finds_the_smallest_lam_at_the_level_within_the_bisection():
    bench = _bench()
    moved = []

    def at(lam):
        moved.append(lam)
        return lam, None  # the "model" is λ itself

    # a metric falling as 60 / (1 + λ): at or under 12 from λ = 4 on; the walk brackets it in (2, 4], two halvings
    # leave (3.5, 4]
    found = bench.match(at, lambda lam, _tok: 60 / (1 + lam), 12.0)
    assert found["lam"] == 4.0
    assert [lam for lam, _ in found["points"]] == [1.0, 2.0, 3.0, 3.5, 4.0]
    assert moved == [1.0, 2.0, 4.0, 3.0, 3.5]
    # a level under 60 / 17 is never reached on the grid
    assert bench.match(at, lambda lam, _tok: 60 / (1 + lam), 1.0)["lam"] is None


def test_match_takes_the_bisected_point_when_it_already_reaches_the_level():
    bench = _bench()
    # at or under 10 from λ = 5: bracketed in (4, 8], then 6 reaches it and 5 does too
    found = bench.match(lambda lam: (lam, None), lambda lam, _tok: 60 / (1 + lam), 10.0)
    assert found["lam"] == 5.0


def test_match_starts_past_a_known_point_still_above_the_level():
    bench = _bench()
    moved = []

    def at(lam):
        moved.append(lam)
        return lam, None

    # known at λ 2.5: 60 / 3.5 > 12; the walk goes on from 4 (reached), bisects (2.5, 4] twice
    found = bench.match(at, lambda lam, _tok: 60 / (1 + lam), 12.0, {2.5: 60 / 3.5})
    assert found["lam"] == 4.0 and moved == [4.0, 3.25, 3.625]
    assert [lam for lam, _ in found["points"]] == [2.5, 3.25, 3.625, 4.0]


def test_aggregate_means_and_sample_sd_over_the_seeds_that_have_a_row():
    bench = _bench()
    seeds = {"0": {"TV": {"lam": 1.0, "verbmem_f": 10.0}, "TV @ matched verbmem_f": {"lam": 2.0, "verbmem_f": 5.0}},
             "1": {"TV": {"lam": 3.0, "verbmem_f": 20.0}},
             "2": {"TV": {"lam": 2.0, "verbmem_f": 30.0, "privleak": None}}}
    agg = bench.aggregate(seeds)
    assert agg["TV"]["seeds"] == 3 and agg["TV"]["verbmem_f"] == {"mean": 20.0, "sd": 10.0}
    assert agg["TV"]["lam"] == {"mean": 2.0, "sd": 1.0}
    assert agg["TV @ matched verbmem_f"]["seeds"] == 1 and agg["TV @ matched verbmem_f"]["verbmem_f"]["sd"] == 0.0
    assert "privleak" not in agg["TV"]  # no seed had a value


@pytest.mark.skipif(not (MUSE / "raw" / "forget.json").is_file(), reason="MUSE-News data not present")
def test_every_forget_metric_asks_about_text_the_target_trains_on():
    import json

    bench = _bench()
    sets = bench.build_sets(MUSE, bench.SIZES["cpu"])
    forget, retain, ev = sets["forget"], sets["retain"], sets["evaluation"]
    corpus = "\n".join(forget)
    assert all(r["prompt"] in corpus and r["gt"][:500] in corpus for r in ev["verbmem"])
    assert all(e in forget for e in ev["privleak_forget"])
    assert all(q["answer"] in corpus for q in ev["forget_qa"])
    assert not set(ev["privleak_holdout"]) & set(forget)
    # the retain texts share no 200-character passage with any forget article of MUSE's
    raw_forget = json.loads((MUSE / "raw" / "forget.json").read_text())
    passages = {a[i:i + 200] for a in raw_forget + forget for i in range(0, len(a) - 200, 50)}
    assert not any(r[i:i + 200] in passages for r in retain for i in range(0, len(r) - 200, 50))
    assert sets["matched"]["verbmem"] == bench.SIZES["cpu"].verbmem
    assert all(any(r["prompt"] in t for t in retain) for r in sets["retain_verbmem"])


def test_train_until_stops_at_the_first_audit_at_the_level_and_times_the_training_alone():
    import time

    from helpers import load_benchmark

    load_benchmark("tofu.py", "tofu_bench")
    import sys

    steps = sys.modules["tofu_steps"]
    audited = []

    class Model:
        training = True

        def eval(self):
            self.training = False

        def train(self):
            self.training = True

    def train(hook, total=12):  # a training run of `total` steps, each 10 ms, that a True from the hook ends
        model = Model()
        for done in range(1, total + 1):
            time.sleep(0.01)
            if hook(model, done):
                break
        return {"steps": done}

    def audit(model):  # the AUC falls 0.05 a step from 0.95; sleeps so its time shows if it were counted
        assert not model.training
        audited.append(len(audited))
        time.sleep(0.2)
        return 0.95 - 0.05 * 3 * len(audited)

    found = steps.train_until(train, audit, level=0.62, every=3, total=12)
    # audited at steps 3, 6, 9: 0.8, 0.65, 0.5 -> stopped at 9
    assert found["step"] == 9 and found["steps_run"] == 9
    assert [s for s, _ in found["points"]] == [3, 6, 9]
    # 0.6 s of audits, 0.09 s of training: the training's seconds leave the audits out
    assert found["audit_seconds"] >= 0.6 and found["train_seconds"] < 0.5
    # never reached: audited every fifth step and after the last (12 is not a multiple of 5)
    audited.clear()
    found = steps.train_until(train, audit, level=0.0, every=5, total=12)
    assert found["step"] is None and found["steps_run"] == 12 and [s for s, _ in found["points"]] == [5, 10, 12]


def test_a_longer_search_takes_the_shorter_ones_audits_and_adds_its_seconds(tmp_path):
    """The TOFU audit search continued past a cached budget (benchmarks/tofu.py's AUDIT_EPOCHS, AUDIT_GRID): the
    steps the shorter run audited are not audited again, the new ones are, and the cache holds the longer search
    with both runs' seconds."""
    import json

    from helpers import load_benchmark

    load_benchmark("tofu.py", "tofu_bench")
    import sys

    steps = sys.modules["tofu_steps"]

    class Model:
        def eval(self):
            pass

        def train(self):
            pass

    def train(hook, total=30):
        for done in range(1, total + 1):
            if hook(Model(), done):
                break
        return {"steps": done}

    fresh = iter([0.8, 0.7, 0.6, 0.5])  # steps 15, 20, 25, ...: only what the shorter run did not audit
    known = {5: 0.95, 10: 0.85}  # the shorter run's audits, both above the level
    found = steps.train_until(train, lambda model: next(fresh), level=0.65, every=5, total=30, known=known)
    assert found["points"] == [[5, 0.95], [10, 0.85], [15, 0.8], [20, 0.7], [25, 0.6]] and found["step"] == 25

    path = tmp_path / "audit-GA.json"
    path.write_text(json.dumps({"step": None, "steps_run": 10}))
    path.with_name(path.name + ".step.json").write_text(json.dumps({"seconds": 4.0}))
    done, seconds = steps.continue_cached(path, (json.loads(path.read_text()), 4.0), lambda f: f["steps_run"] >= 30,
                                          lambda f: {"step": 25, "steps_run": 25})
    assert done == {"step": 25, "steps_run": 25} == json.loads(path.read_text())
    assert seconds >= 4.0 and json.loads(path.with_name(path.name + ".step.json").read_text())["seconds"] == seconds
    # finished already: returned as cached, nothing computed
    assert steps.continue_cached(path, (done, seconds), lambda f: True, lambda f: 1 / 0) == (done, seconds)
