"""`viker study`: the maths on synthetic results with known answers, run keys, reuse and resume."""
import json
import math
import re

import pytest

from pipeline.study import grid as study
from pipeline.config import ConfigError, load_config
from pipeline.study.report import (bootstrap_ci, curve_auc, gold_table, interpolate_at, matched_table, select,
                                   unit_values, units)


# ------------------------------------------------------------ interpolation, AUC, bootstrap

def test_interpolation_at_matched_forgetting():
    forget = [1.0, 0.6, 0.2]            # vanilla, 16 steps, 32 steps
    utility = [0.9, 0.8, 0.4]
    # 50% of vanilla = 0.5: a quarter of the way from 0.6 to 0.2, so 0.8 - 0.25 * 0.4.
    assert interpolate_at(forget, utility, 0.5) == pytest.approx(0.7)
    assert interpolate_at(forget, utility, 0.6) == pytest.approx(0.8)      # hit exactly at a budget
    assert interpolate_at(forget, utility, 1.0) == pytest.approx(0.9)      # vanilla already there
    assert math.isnan(interpolate_at(forget, utility, 0.1))                # never reached: no extrapolation
    # Non-monotone curve: the *first* crossing counts.
    assert interpolate_at([1.0, 0.4, 0.8, 0.0], [1.0, 0.5, 0.9, 0.0], 0.7) == pytest.approx(0.75)


def test_area_under_forget_utility_curve():
    assert curve_auc([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1.0)         # all utility kept to full forgetting
    # Utility falls linearly from 1 to 0 while forgetting reaches 50%, nothing beyond: area 0.5 * 1 / 2.
    assert curve_auc([1.0, 0.5], [1.0, 0.0]) == pytest.approx(0.25, abs=1e-3)
    # Forgetting normalised by the vanilla value: same shape at half the scale, same area.
    assert curve_auc([0.5, 0.25], [1.0, 0.0]) == pytest.approx(0.25, abs=1e-3)
    assert curve_auc([1.0, 0.0], [0.8, 0.4]) == pytest.approx(0.6, abs=1e-3)
    assert math.isnan(curve_auc([0.0, 0.0], [1.0, 1.0]))                    # vanilla knows nothing


def test_bootstrap_interval_known_answers():
    mean, lo, hi, n = bootstrap_ci([0.3] * 7 + [float("nan")])
    assert (mean, lo, hi, n) == (pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3), 7)
    # 400 fair coin flips: mean 0.5, 95% interval ~ 0.5 +- 1.96 * 0.5 / 20.
    mean, lo, hi, n = bootstrap_ci([0.0, 1.0] * 200, n_boot=4000, seed=1)
    assert mean == 0.5 and n == 400
    assert lo == pytest.approx(0.5 - 0.049, abs=0.01) and hi == pytest.approx(0.5 + 0.049, abs=0.01)
    assert bootstrap_ci([0.1, 0.9], seed=5) == bootstrap_ci([0.1, 0.9], seed=5)   # seeded
    assert bootstrap_ci([])[3] == 0 and math.isnan(bootstrap_ci([None])[0])


# ------------------------------------------------------------ synthetic records

def _row(forget, retain, real=1.0):
    return {"metrics": {"forget": {"fact_acc": forget, "coherence": 1.0}, "retain": {"fact_acc": retain,
                                                                                     "rougeL": 0.9},
                        "real": {"fact_acc": real}, "test": {"fact_acc": forget}}}


def _record(variant, method, draw, budget, row, lr=1e-3, lam=0.5, split="forget_10", seed=0, group="main"):
    return {"variant": variant, "group": group, "row": row,
            "settings": {"draw": draw, "split": split, "seed": seed, "method": method, "budget": budget,
                         "lr": lr, "lam": lam}}


def _world():
    """Two draws; GA keeps retain 0.6 at half forgetting, ViKeR 0.8 (draw 1) and 0.9 (draw 2)."""
    recs = []
    for draw, vik in ((1, 0.8), (2, 0.9)):
        recs.append(_record("Vanilla", "vanilla", draw, 0, _row(1.0, 1.0)))
        recs += [_record("GA", "ga", draw, 8, _row(0.6, 0.8)), _record("GA", "ga", draw, 16, _row(0.4, 0.4))]
        recs += [_record("ViKeR", "viker", draw, 8, _row(0.5, vik)), _record("ViKeR", "viker", draw, 16,
                                                                            _row(0.0, 0.5))]
    return recs


def test_units_and_matched_values_from_records():
    u = units(_world())
    assert set(u) == {(m, "main", d, "forget_10", 0) for m in ("GA", "ViKeR") for d in (1, 2)}
    ga = unit_values(u[("GA", "main", 1, "forget_10", 0)], "forget.fact_acc", 0.5, (("r", "retain.fact_acc"),))
    assert ga["retain.fact_acc"] == pytest.approx(0.6)            # halfway from (0.6, 0.8) to (0.4, 0.4)
    table = matched_table(u, ["GA", "ViKeR"], "forget_10", "forget.fact_acc", 0.5, n_boot=500)
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "| 2/2 | 60.0 [60.0, 60.0]" in lines["GA"]
    assert "| 2/2 | 85.0 [80.0, 90.0]" in lines["ViKeR"]


def _attacked(row, auc, leak, recovery):
    return {"metrics": {**row["metrics"], "mia": {"mia_auc_best": auc, "privleak_best": leak},
                        "relearn": {"recovery": recovery, "acc_after": recovery}}}


def test_attack_columns_at_matched_forgetting_and_the_gold_table():
    """MIA AUC and relearn recovery are read where Forget ACC reaches the target, like utility;
    PrivLeak is already a percentage; a table whose runs have no attack numbers shows no attack columns."""
    recs = [_record("Vanilla", "vanilla", 1, 0, _attacked(_row(1.0, 1.0), 0.9, 80.0, 1.0)),
            _record("GA", "ga", 1, 8, _attacked(_row(0.6, 0.8), 0.7, 40.0, 0.8)),
            _record("GA", "ga", 1, 16, _attacked(_row(0.4, 0.4), 0.5, 0.0, 0.4)),
            _record("Gold", "gold", 1, 0, _attacked(_row(0.05, 0.95), 0.52, 0.0, 0.1), group="gold")]
    u = units(recs)
    assert set(u) == {("GA", "main", 1, "forget_10", 0)}, "the gold model is a reference, not a curve"
    table = matched_table(u, ["GA"], "forget_10", "forget.fact_acc", 0.5, n_boot=100)
    head, ga = table.splitlines()[0], table.splitlines()[2]
    assert "| MIA AUC | PrivLeak | Relearn |" in head
    # halfway between budget 8 and 16: AUC 0.6, PrivLeak 20 (not x100), recovery 0.6
    assert "| 60.0 [60.0, 60.0] | 20.0 [20.0, 20.0] | 60.0 [60.0, 60.0] |" in ga
    plain = matched_table(units(_world()), ["GA"], "forget_10", "forget.fact_acc", 0.5, n_boot=100)
    assert "MIA AUC" not in plain and "Relearn" not in plain
    gold = gold_table(recs, ["forget_10"], "forget.fact_acc", n_boot=100)
    assert "| forget_10 | 1 | 5.0 [5.0, 5.0] | 95.0 [95.0, 95.0] | 52.0 [52.0, 52.0] | 10.0 [10.0, 10.0]" in gold


def test_retain_aware_viker_is_a_study_method_of_its_own():
    cfg = load_config("configs/study.yaml", ["study.methods=viker,viker+nll"])
    keys = {r["settings"]["method"] for r in study.selection_runs(cfg)}
    assert keys == {"viker", "viker+nll"}
    assert study.train_method("viker+nll") == ("viker", {"retain_term": "nll"}) and study.is_viker("viker+kl")
    assert study.METHOD_LABELS["viker+nll"] == "ViKeR+NLL"
    a = study.make_run(cfg, 1, "forget_10", 0, "viker", 16, 2e-3, 0.5, "ViKeR", "main")
    b = study.make_run(cfg, 1, "forget_10", 0, "viker+nll", 16, 2e-3, 0.5, "ViKeR+NLL", "main")
    assert a["key"] != b["key"]
    # The relearning attack (and its settings) is part of a main run's key, not of a comparison's.
    c = study.make_run(cfg, 1, "forget_10", 0, "viker", 16, 2e-3, 0.5, "ViKeR k=1", "k")
    assert a["settings"]["attacks"]["relearn"] == {} and c["settings"]["attacks"]["relearn"] is None
    cfg.relearn.steps = 7
    assert study.make_run(cfg, 1, "forget_10", 0, "viker", 16, 2e-3, 0.5, "ViKeR", "main")["key"] != a["key"]


def test_selection_rule_picks_largest_area_and_first_on_ties():
    recs = [_record("Vanilla", "vanilla", 9, 0, _row(1.0, 1.0))]
    for lr, retain in ((1e-3, 0.5), (2e-3, 0.9), (3e-3, 0.9)):        # 2e-3 and 3e-3 tie: first listed wins
        recs.append(_record(f"GA lr={lr}", "ga", 9, 8, _row(0.0, retain), lr=lr, lam=0.0))
    chosen = select(recs, "fact_acc", "fact_acc")
    assert chosen["ga"]["lr"] == 2e-3 and len(chosen["ga"]["candidates"]) == 3
    assert chosen["ga"]["auc"] == pytest.approx(curve_auc([1.0, 0.0], [1.0, 0.9]))


# ------------------------------------------------------------ config, keys, reuse, resume

def test_study_config_rules_are_checked_at_load():
    load_config("configs/study.yaml")
    for bad, match in (("study.draws=0,1,2", "study.draws' must be >= 1"), ("study.draws=1,2", "at least 3"),
                       ("study.draws=1,1,2", ">= 3 distinct"), ("study.val_draw=2", "also a test draw"),
                       ("study.forget_metric=rouge", "study.forget_metric"),
                       ("study.forget_metric=mc_acc", "need the mc task")):
        with pytest.raises(ConfigError, match=match):
            load_config("configs/study.yaml", [bad])


def test_run_key_covers_every_setting():
    cfg = load_config("configs/study.yaml")
    base = study.make_run(cfg, 1, "forget_10", 0, "viker", 16, 2e-3, 0.5, "ViKeR", "main")
    assert base["key"] == study.make_run(cfg, 1, "forget_10", 0, "viker", 16, 2e-3, 0.5, "ViKeR", "main")["key"]
    others = [study.make_run(cfg, 2, "forget_10", 0, "viker", 16, 2e-3, 0.5, "ViKeR", "main"),
              study.make_run(cfg, 1, "forget_10", 1, "viker", 16, 2e-3, 0.5, "ViKeR", "main"),
              study.make_run(cfg, 1, "forget_10", 0, "viker", 16, 2e-3, 0.5, "ViKeR", "main", use_ga=False),
              study.make_run(cfg, 1, "forget_10", 0, "viker", 16, 2e-3, 0.5, "ViKeR", "main",
                             study.reference_settings(cfg, "pets"))]
    cfg.finetune.steps += 1
    others.append(study.make_run(cfg, 1, "forget_10", 0, "viker", 16, 2e-3, 0.5, "ViKeR", "main"))
    assert len({base["key"]} | {o["key"] for o in others}) == 6
    # Only values that differ from the defaults are keyed: a key added later at its default keeps runs valid.
    cfg.finetune.steps -= 1
    assert base["settings"]["finetune"] == {"formats": True}     # configs/study.yaml's only change there
    cfg.train.output = "elsewhere"
    assert study.make_run(cfg, 1, "forget_10", 0, "viker", 16, 2e-3, 0.5, "ViKeR", "main")["key"] == base["key"]


class Killed(Exception):
    """Stands in for a kill in the middle of a run (pytest reserves KeyboardInterrupt)."""


def test_finished_runs_are_reused_and_a_killed_study_resumes(tmp_path, monkeypatch):
    cfg = load_config("configs/study.yaml", [f"study.output={tmp_path}", "study.workers=1"])
    runs = [study.make_run(cfg, 1, "forget_10", 0, "vanilla", 0, 0.0, 0.0, "Vanilla", "vanilla")]
    runs += [study.make_run(cfg, 1, "forget_10", 0, "ga", b, 1e-3, 0.5, "GA", "main") for b in (8, 16, 32)]
    calls, killed = [], []

    def fake_train(c, vanilla, tcfg, overwrite=False, log=print):
        assert overwrite, "the study owns its run folders: a killed attempt must be replaced"
        calls.append(("train", tcfg.steps, tcfg.lr, tcfg.seed))
        if tcfg.steps == 16 and not killed:
            killed.append(True)
            raise Killed("killed")                              # the first attempt at 16 steps dies
        return {"adapter": f"{tcfg.output}/adapter"}

    def fake_eval(model_dir, root, split, adapter=None, method="Vanilla", budget=0, results_path=None, **kw):
        calls.append(("eval", budget))
        results_path.write_text("partial\n")
        return {"method": method, "budget": budget, "metrics": {"forget": {"fact_acc": 1.0 - budget / 64}}}

    monkeypatch.setattr("pipeline.jobs.runs.run_train", fake_train)
    monkeypatch.setattr("pipeline.evaluation.evaluate.evaluate", fake_eval)
    monkeypatch.setattr(study, "prepare_cache", lambda *a: None)
    with pytest.raises(Killed):
        study._execute(cfg, runs, lambda *_: None, "grid")
    done = sorted(p.parent.name for p in tmp_path.glob("runs/*/done.json"))
    assert done == sorted([runs[0]["key"], runs[1]["key"]])      # vanilla and 8 steps finished
    assert (tmp_path / "runs" / runs[2]["key"]).is_dir() and not (tmp_path / "runs" / runs[2]["key"] /
                                                                   "done.json").exists()
    calls.clear()
    records = study._execute(cfg, runs, lambda *_: None, "grid")
    # Resumed: only the killed run and the one never started; the finished two are read back.
    assert [c for c in calls if c[0] == "train"] == [("train", 16, 1e-3, 0), ("train", 32, 1e-3, 0)]
    assert [r["row"]["budget"] for r in records] == [0, 8, 16, 32]
    calls.clear()
    again = study._execute(cfg, runs, lambda *_: None, "grid")
    assert calls == [] and [r["key"] for r in again] == [r["key"] for r in runs]


def test_quick_preset_end_to_end_then_fully_reused(tmp_path):
    """`viker study --quick` on the CI grid (~2 min on 2 cores), then again: every run reused.

    Not marked slow: CI runs the quick grid, so the study's attack columns are checked on every commit."""
    over = [f"study.output={tmp_path}/s", f"study.report={tmp_path}/STUDY.md"]
    cfg = load_config("configs/study.yaml", study.QUICK + tuple(over))
    first = study.run_study(cfg, command="viker study --quick", log=lambda *_: None)
    text = (tmp_path / "STUDY.md").read_text()
    assert "viker study --quick" in text and "## Main table: forget_10" in text and "per-token" in text
    # The attacks at matched forgetting, the gold models they are read against, the retain-aware ViKeR.
    # (The quick vanilla model knows nothing, so relearn recovery, relative to it, has no value here.)
    assert "| MIA AUC | PrivLeak |" in text and "## Gold models" in text and "| Relearn | Relearned ACC |" in text
    assert re.search(r"\| ViKeR\+NLL \| \d+/\d+ \|", text)
    assert json.loads((tmp_path / "s" / "selection.json").read_text())["draw"] == 4
    logs = []
    second = study.run_study(cfg, command="viker study --quick", log=logs.append)
    assert second["runs"] == first["runs"]
    # Every phase found all its runs finished: "[study] selection: 23 runs, 23 reused".
    counts = [re.search(r": (\d+) runs, (\d+) reused", line) for line in logs]
    counts = [(int(m.group(1)), int(m.group(2))) for m in counts if m]
    assert len(counts) == 2 and all(n == reused for n, reused in counts), counts
    assert second["wall_seconds"] < first["wall_seconds"]


def test_only_the_benchmark_image_pools_bypass_the_leak_check():
    cfg = load_config("configs/study.yaml")
    for ref, allowed in (("people", False), ("pets", False), ("retain_set", True), ("forget_set", True)):
        c = study._cache_config(cfg, 1, "forget_10", study.reference_settings(cfg, ref))
        assert c.precompute.allow_benchmark_images is allowed, ref
        assert c.precompute.pool.endswith(f"pools/{ref}") == allowed


def test_comparison_tables_use_the_first_seed_only():
    from pipeline.study.report import first_seed_units
    recs = [_record("Vanilla", "vanilla", d, 0, _row(1.0, 1.0), seed=0, group="vanilla") for d in (1, 2)]
    recs += [_record("ViKeR", "viker", d, 16, _row(0.4, 0.8), seed=s) for d in (1, 2) for s in (0, 1)]
    recs += [_record("ViKeR k=1", "viker", d, 16, _row(0.4, 0.7), seed=0, group="k") for d in (1, 2)]
    kept = first_seed_units(units(recs), 0)
    assert sorted((k[0], k[2]) for k in kept) == [("ViKeR", 1), ("ViKeR", 2), ("ViKeR k=1", 1), ("ViKeR k=1", 2)]
