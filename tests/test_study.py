"""`viker study`: the maths on synthetic results with known answers, run keys, reuse and resume."""
import json
import math
import re

import pytest

from pipeline.study import grid as study
from pipeline.study import report as study_report
from pipeline.config import ConfigError, load_config
from pipeline.study.report import (curve_auc, draw_interval, gold_table, interpolate_at, matched_table,
                                   paired_differences, paired_table, relearn_gold_table, select, t_quantile,
                                   unit_values, units, verdict)


# ------------------------------------------------------------ interpolation, AUC, intervals

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


def test_interpolation_skips_a_point_whose_forget_acc_is_unknown():
    nan = float("nan")
    # The NaN budget is skipped: between (0.9, 1) and (0.3, 0), three quarters of the way to 0.45.
    v = interpolate_at([0.9, nan, 0.3], [1.0, nan, 0.0], 0.45)
    assert not math.isnan(v) and v == pytest.approx(1.0 + (0.9 - 0.45) / (0.9 - 0.3) * (0.0 - 1.0))
    assert interpolate_at([0.9, nan, nan, 0.3], [1.0, 7.0, 7.0, 0.0], 0.45) == pytest.approx(0.25)
    # No finite point before the one that reached: its value as it is (nothing to interpolate from) ...
    assert interpolate_at([nan, 0.3, 0.1], [5.0, 0.4, 0.0], 0.45) == pytest.approx(0.4)
    # ... and when it is not reached there, the interval runs from the first finite point on.
    assert interpolate_at([nan, 0.6, 0.2], [5.0, 0.8, 0.4], 0.4) == pytest.approx(0.6)
    assert math.isnan(interpolate_at([nan, nan], [1.0, 1.0], 0.5))


def test_area_under_forget_utility_curve():
    assert curve_auc([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1.0)         # all utility kept to full forgetting
    # Utility falls linearly from 1 to 0 while forgetting reaches 50%, nothing beyond: area 0.5 * 1 / 2.
    assert curve_auc([1.0, 0.5], [1.0, 0.0]) == pytest.approx(0.25, abs=1e-3)
    # Forgetting normalised by the vanilla value: same shape at half the scale, same area.
    assert curve_auc([0.5, 0.25], [1.0, 0.0]) == pytest.approx(0.25, abs=1e-3)
    assert curve_auc([1.0, 0.0], [0.8, 0.4]) == pytest.approx(0.6, abs=1e-3)
    assert math.isnan(curve_auc([0.0, 0.0], [1.0, 1.0]))                    # vanilla knows nothing


def test_t_quantiles_are_the_tables():
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (5, 2.5706), (10, 2.2281), (30, 2.0423)):
        assert t_quantile(df) == pytest.approx(t, abs=1e-4)
    assert t_quantile(2000) == pytest.approx(1.9600, abs=2e-3)
    assert t_quantile(4, 0.90) == pytest.approx(2.1318, abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile(0)


def test_draw_interval_is_a_t_interval_on_per_draw_means():
    nan = float("nan")
    # Draw 1: seeds 0.2, 0.4 (mean 0.3); draw 2: 0.5 (its other seed did not reach); draw 3: 0.7, 0.7.
    iv = draw_interval([(1, 0.2), (1, 0.4), (2, 0.5), (2, nan), (3, 0.7), (3, None)])
    assert (iv.n, iv.draws, iv.left_out) == (4, 3, 2)
    assert iv.mean == pytest.approx(0.5)                     # mean of draw means, not of the 4 units (0.45)
    half = 4.3027 * 0.2 / math.sqrt(3)                       # sd of (0.3, 0.5, 0.7) = 0.2, 2 df
    assert (iv.low, iv.high) == (pytest.approx(0.5 - half, abs=1e-4), pytest.approx(0.5 + half, abs=1e-4))
    # One seed: a t interval over draws; equal draws: a zero-width interval.
    one = draw_interval([(1, 0.3), (2, 0.3), (3, 0.3)])
    assert (one.mean, one.low, one.high, one.n) == (pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3), 3)
    # The seeds of one draw are not independent units: two draws of many seeds still have 1 df.
    many = draw_interval([(d, v) for d, v in ((1, 0.4), (2, 0.6)) for _ in range(50)])
    assert many.high - many.mean == pytest.approx(12.7062 * 0.1, abs=1e-3)
    single = draw_interval([(1, 0.2), (1, 0.4)])             # one draw: a mean, no interval
    assert single.mean == pytest.approx(0.3) and math.isnan(single.low) and single.draws == 1
    empty = draw_interval([(1, nan)])
    assert empty.n == 0 and empty.left_out == 1 and math.isnan(empty.mean)
    assert verdict(draw_interval([(1, 0.1), (2, 0.2), (3, 0.15)]), "A", "B") == "A > B"
    assert verdict(draw_interval([(1, -0.1), (2, -0.2), (3, -0.15)]), "A", "B") == "A < B"
    assert verdict(draw_interval([(1, -0.1), (2, 0.2), (3, 0.0)]), "A", "B") == "no difference shown"
    assert verdict(single, "A", "B") == "no difference shown" and verdict(empty, "A", "B") == "n/a"


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
    table = matched_table(u, ["GA", "ViKeR"], "forget_10", "forget.fact_acc", 0.5)
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "| 2/2 | 60.0 [60.0, 60.0]" in lines["GA"]
    # Two draws: a t interval with 1 df, 85 +- 12.706 * 5 (the old bootstrap said [80.0, 90.0]).
    assert "| 2/2 | 85.0 [21.5, 148.5]" in lines["ViKeR"]


def test_paired_differences_per_unit_and_their_table():
    """ViKeR - GA per (draw, seed) at matched forgetting: +20 and +30 points of retain fact; the verdict names
    a direction only when the interval excludes 0."""
    u = units(_world())
    d = paired_differences(u, "ViKeR", "GA", "forget_10", "forget.fact_acc", 0.5, (("r", "retain.fact_acc"),))
    iv = d["retain.fact_acc"]
    assert (iv.mean, iv.n, iv.draws) == (pytest.approx(0.25), 2, 2)
    assert iv.low == pytest.approx(0.25 - 12.7062 * 0.05, abs=1e-4)        # 2 draws: 1 df, no direction
    table = paired_table(u, [("ViKeR", "GA")], "forget_10", "forget.fact_acc", 0.5)
    row = next(line for line in table.splitlines() if "| Retain fact |" in line)
    assert row == "| ViKeR − GA | Retain fact | +25.0 | [-38.5, +88.5] | 2/2 (2) | no difference shown |"
    # A third draw where ViKeR is 0.85: differences 20, 30, 25 -> interval excludes 0.
    recs = _world() + [_record("Vanilla", "vanilla", 3, 0, _row(1.0, 1.0)),
                       _record("GA", "ga", 3, 8, _row(0.6, 0.8)), _record("GA", "ga", 3, 16, _row(0.4, 0.4)),
                       _record("ViKeR", "viker", 3, 8, _row(0.5, 0.85)),
                       _record("ViKeR", "viker", 3, 16, _row(0.0, 0.5))]
    table = paired_table(units(recs), [("ViKeR", "GA"), ("GA", "ViKeR")], "forget_10", "forget.fact_acc", 0.5)
    assert "| ViKeR − GA | Retain fact | +25.0 | [+12.6, +37.4] | 3/3 (3) | ViKeR > GA |" in table
    assert "| GA − ViKeR | Retain fact | -25.0 | [-37.4, -12.6] | 3/3 (3) | GA < ViKeR |" in table
    # A unit where one of them never reaches the target is left out and counted.
    recs.append(_record("ViKeR", "viker", 4, 8, _row(0.9, 0.9)))
    recs += [_record("Vanilla", "vanilla", 4, 0, _row(1.0, 1.0)), _record("GA", "ga", 4, 8, _row(0.4, 0.5))]
    table = paired_table(units(recs), [("ViKeR", "GA")], "forget_10", "forget.fact_acc", 0.5)
    assert "| +25.0 | [+12.6, +37.4] | 3/4 (3) | ViKeR > GA |" in table


def _attacked(row, auc, leak, recovery, **extra):
    mia = {"mia_auc_min_k": auc, "privleak_min_k": leak, **{k: v for k, v in extra.items() if k.startswith("priv")}}
    relearn = {"recovery": recovery, "acc_after": recovery, **{k: v for k, v in extra.items() if "recovery" in k}}
    return {"metrics": {**row["metrics"], "mia": mia, "relearn": relearn}}


def test_attack_columns_at_matched_forgetting_and_the_gold_table():
    """MIA AUC and relearn recovery are read where Forget ACC reaches the target, like utility;
    PrivLeak is already a percentage; a table whose runs have no attack numbers shows no attack columns."""
    recs = [_record("Vanilla", "vanilla", 1, 0, _attacked(_row(1.0, 1.0), 0.9, 80.0, 1.0)),
            _record("GA", "ga", 1, 8, _attacked(_row(0.6, 0.8), 0.7, 40.0, 0.8)),
            _record("GA", "ga", 1, 16, _attacked(_row(0.4, 0.4), 0.5, 0.0, 0.4)),
            _record("Gold", "gold", 1, 0, _attacked(_row(0.05, 0.95), 0.52, 0.0, 0.1), group="gold")]
    u = units(recs)
    assert set(u) == {("GA", "main", 1, "forget_10", 0)}, "the gold model is a reference, not a curve"
    table = matched_table(u, ["GA"], "forget_10", "forget.fact_acc", 0.5)
    head, ga = table.splitlines()[0], table.splitlines()[2]
    assert "| MIA AUC (min-k) | PrivLeak (min-k) | Relearn | AUC (retain fact) |" in head
    assert "PrivLeak OU" not in head and "worst" not in head, "columns no row has are left out"
    # halfway between budget 8 and 16: AUC 0.6, PrivLeak 20 (not x100), recovery 0.6; one draw: no interval
    assert "| 60.0 [n/a] | 20.0 [n/a] | 60.0 [n/a] |" in ga
    plain = matched_table(units(_world()), ["GA"], "forget_10", "forget.fact_acc", 0.5)
    assert "MIA AUC" not in plain and "Relearn" not in plain
    gold = gold_table(recs, ["forget_10"], "forget.fact_acc")
    assert "| forget_10 | 1 | 5.0 [n/a] | 95.0 [n/a] | 52.0 [n/a] | 10.0 [n/a] | 10.0 [n/a] |" in gold
    assert "| MIA AUC (min-k) | Relearn | Relearned ACC |" in gold


def test_openunlearning_privleak_and_relearning_against_the_gold_control():
    """PrivLeak OU appears when the rows have it (x1); relearn recovery minus the gold model of the unit's
    draw and split, per unit; worst/people recovery when present, absent otherwise."""
    recs = []
    for draw, gold_rec in ((1, 0.10), (2, 0.20), (3, 0.15)):
        recs.append(_record("Vanilla", "vanilla", draw, 0, _attacked(_row(1.0, 1.0), 0.9, 80.0, 1.0)))
        recs.append(_record("Gold", "gold", draw, 0, _attacked(_row(0.05, 0.95), 0.5, 0.0, gold_rec,
                                                               worst_recovery=gold_rec), group="gold"))
        for seed, extra in ((0, 0.0), (1, 0.1)):
            # Recovery 0.6 + extra at 50% (halfway between 0.8 and 0.4); worst recovery only on budget rows.
            recs.append(_record("GA", "ga", draw, 8, _attacked(_row(0.6, 0.8), 0.7, 40.0, 0.8 + extra,
                                                               privleak_ou_min_k=-40.0, worst_recovery=0.9),
                                seed=seed))
            recs.append(_record("GA", "ga", draw, 16, _attacked(_row(0.4, 0.4), 0.5, 0.0, 0.4 + extra,
                                                                privleak_ou_min_k=0.0, worst_recovery=0.5),
                                seed=seed))
    u = units(recs)
    head = matched_table(u, ["GA"], "forget_10", "forget.fact_acc", 0.5).splitlines()[0]
    assert "| PrivLeak OU (min-k) | Relearn | Relearn (worst) |" in head and "people" not in head
    table = relearn_gold_table(u, recs, ["GA"], "forget_10", "forget.fact_acc", 0.5)
    # Per unit: 0.6 (+0.1 on seed 1) - gold of the draw; draw means 0.65 - g: 0.55, 0.45, 0.50,
    # so 50 +- 4.30 * 5 / sqrt 3
    assert "| GA − gold | Relearn | +50.0 | [+37.6, +62.4] | 6/6 (3) | GA > gold |" in table
    assert "| GA − gold | Relearn (worst) | +55.0 | [+42.6, +67.4] | 6/6 (3) | GA > gold |" in table
    assert "people" not in table
    no_gold = [r for r in recs if r["settings"]["method"] != "gold"]
    assert relearn_gold_table(units(no_gold), no_gold, ["GA"], "forget_10", "forget.fact_acc", 0.5) is None


def test_the_goal_against_the_gold_model_is_judged_on_intervals():
    """At 25% of vanilla Forget ACC: PrivLeak within 10 points of 0 and retain fact >= 85% of vanilla, judged
    on the whole interval (met), the means only (mean only) or neither (no); KL to gold in nats, 2 decimals."""
    def with_gold(row, leak, auc, kl):
        out = _attacked(row, auc, leak, 0.3)
        out["metrics"]["gold_distance"] = {"kl_gold": kl, "kl_gold_key": 2 * kl}
        return out
    recs = []
    for draw, noise in ((1, 0.0), (2, 1.0), (3, -1.0)):
        recs.append(_record("Vanilla", "vanilla", draw, 0, with_gold(_row(1.0, 1.0), 90.0, 0.9, 1.0)))
        recs.append(_record("Gold", "gold", draw, 0, _attacked(_row(0.05, 0.95), 0.5, 0.0, 0.1), group="gold"))
        # close: Forget ACC 0.25 at budget 8 exactly, PrivLeak 2 +- 1, retain 0.95 of vanilla's
        recs.append(_record("Close", "viker", draw, 8, with_gold(_row(0.25, 0.95), 2.0 + noise, 0.51, 0.2)))
        # noisy: PrivLeak 5 +- 8 (mean inside, interval not)
        recs.append(_record("Noisy", "viker+span", draw, 8, with_gold(_row(0.25, 0.9), 5.0 + 8 * noise, 0.52, 0.3)))
        # leaky: PrivLeak 40
        recs.append(_record("Leaky", "ga", draw, 8, with_gold(_row(0.25, 0.99), 40.0 + noise, 0.7, 0.9)))
    table = study_report.goal_table(units(recs), recs, ["Close", "Noisy", "Leaky"], "forget_10", "forget.fact_acc",
                                    0.25)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert rows["Close"].endswith("| met |") and "| 95.0 [95.0, 95.0] |" in rows["Close"]
    assert "| 0.20 [0.20, 0.20] | 0.40 [0.40, 0.40] |" in rows["Close"]
    assert "| +1.0 [+1.0, +1.0] |" not in rows["Close"] and "| 1.0 [1.0, 1.0] |" in rows["Close"]   # MIA - gold
    assert rows["Noisy"].endswith("| mean only |")
    assert rows["Leaky"].endswith("| no |") and "| 40.0 [37.5, 42.5] |" in rows["Leaky"]


def test_the_variant_singled_out_is_picked_on_the_validation_draw():
    """BEST_RULE: smallest |PrivLeak| at 25% among the ViKeR variants keeping retain >= 85%, each at its chosen
    lambda; a variant leaking less but losing retain is passed over; non-ViKeR methods never count."""
    def leak(row, value):
        row["metrics"]["mia"] = {"privleak_min_k": value}
        return row
    val = [_record("Vanilla", "vanilla", 4, 0, leak(_row(1.0, 1.0), 90.0))]
    for label, key, lam, privleak, retain in (("a", "viker", 0.5, 30.0, 0.9), ("b", "viker", 2.0, 1.0, 0.9),
                                             ("c", "viker+span", 0.5, 12.0, 0.95),
                                             ("d", "viker+names", 0.5, 2.0, 0.5), ("e", "npo", 0.5, 0.0, 1.0)):
        val.append(_record(label, key, 4, 16, leak(_row(0.25, retain), privleak), lam=lam))
    selection = {"viker": {"lr": 1e-3, "lam": 0.5}, "viker+span": {"lr": 1e-3, "lam": 0.5},
                 "viker+names": {"lr": 1e-3, "lam": 0.5}, "npo": {"lr": 1e-3, "lam": 0.5}}
    best, found = study_report.best_on_validation(val, selection, "forget.fact_acc")
    # viker at its chosen lambda 0.5 leaks 30 (the 2.0 candidate's 1.0 is not the chosen one); names leaks 2 but
    # keeps 50% of retain; span: 12 at 95%
    assert best == "viker+span" and set(found) == {"viker", "viker+span", "viker+names"}
    assert found["viker"] == (pytest.approx(30.0), pytest.approx(0.9))
    selection["viker+names"] = {"lr": 1e-3, "lam": 9.0}            # no run of that candidate: left out
    assert study_report.best_on_validation(val, selection, "forget.fact_acc")[1].keys() == {"viker", "viker+span"}


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


def test_reference_variants_get_caches_of_their_own():
    """viker+span / viker+names train ViKeR on a cache made with precompute.span / names; the default variants'
    run keys do not change (their ref has no such keys)."""
    cfg = load_config("configs/study.yaml", ["study.methods=viker,viker+span,viker+names-ga",
                                             "precompute.name_pool=Holdout_Set"])
    runs = {r["settings"]["method"]: r for r in study.selection_runs(cfg)}
    plain, span, names = (runs[m]["settings"]["ref"] for m in ("viker", "viker+span", "viker+names-ga"))
    assert plain == {"pool": "people", "reference": "pool", "k": 5}
    assert span == {**plain, "span": "chain"}
    assert names == {**plain, "span": "chain", "names": "swap", "name_pool": "Holdout_Set"}
    assert runs["viker+names-ga"]["settings"]["method"] == "viker+names-ga"
    assert study.train_method("viker+names-ga") == ("viker", {"use_ga": False})
    dirs = {study.cache_dir(cfg, 1, "forget_10", ref) for ref in (plain, span, names)}
    assert len(dirs) == 3
    c = study._cache_config(cfg, 1, "forget_10", names)
    assert (c.precompute.span, c.precompute.names, c.precompute.name_pool) == ("chain", "swap", "Holdout_Set")
    assert study._cache_config(cfg, 1, "forget_10", plain).precompute.span == "none"
    assert len(study._caches(cfg, list(runs.values()))) == 3


def test_attacks_added_later_run_on_the_finished_runs_without_training(tmp_path, monkeypatch):
    """evaluate.attacks is not part of a run's key: a finished attacked run gets the missing attack from its
    saved adapter (the gold row from the gold model), published atomically; comparisons are left alone."""
    from pipeline.jobs import runs as jobs_runs
    cfg = load_config("configs/study.yaml", [f"study.output={tmp_path}", "study.splits=forget_10"])
    main = study.make_run(cfg, 1, "forget_10", 0, "viker", 16, 2e-3, 0.5, "ViKeR", "main")
    gold = study.make_run(cfg, 1, "forget_10", 0, "gold", 0, 0.0, 0.0, "Gold", "gold")
    other = study.make_run(cfg, 1, "forget_10", 0, "viker", 16, 2e-3, 0.5, "ViKeR k=1", "k")
    for run in (main, gold, other):
        folder = tmp_path / "runs" / run["key"]
        (folder / "train" / "adapter").mkdir(parents=True)
        (folder / "done.json").write_text(json.dumps({**run, "row": {"metrics": {"forget": {"fact_acc": 0.5}}}}))
    seen = []

    def fake(c, adapter, reference, gold_dir):
        seen.append((c.model.path, adapter, reference, gold_dir, list(c.evaluate.attacks)))
        return {a: {"recovery": 0.25} for a in c.evaluate.attacks}
    monkeypatch.setattr(jobs_runs, "attack_metrics", fake)
    monkeypatch.setattr(study, "execute_run", lambda *a: pytest.fail("a finished run was trained again"))
    assert study._runs_needing(cfg, [main, gold, other]) == []              # no attack asked: nothing to do
    cfg.evaluate.attacks = ["logit_lens"]
    assert [r["key"] for r in study._runs_needing(cfg, [main, gold, other])] == [main["key"], gold["key"]]
    assert main["key"] == study.make_run(cfg, 1, "forget_10", 0, "viker", 16, 2e-3, 0.5, "ViKeR", "main")["key"]
    for run in (main, gold):
        done = tmp_path / "runs" / run["key"] / "done.json"
        record = study.add_attacks(cfg, json.loads(done.read_text()), done)
        assert record["row"]["metrics"]["logit_lens"] == {"recovery": 0.25}
        assert record["row"]["metrics"]["forget"] == {"fact_acc": 0.5}
        assert json.loads(done.read_text()) == record and not done.with_name("done.json.tmp").exists()
    vanilla = study.draw_config(cfg, 1).finetune.output
    assert seen[0][1].endswith("train/adapter") and seen[0][2] == vanilla and seen[0][3].endswith("gold-forget_10")
    assert seen[1][1] is None and seen[1][0].endswith("gold-forget_10") and seen[1][3] == ""   # the control
    assert study._runs_needing(cfg, [main, gold, other]) == []
    study.add_attacks(cfg, json.loads((tmp_path / "runs" / main["key"] / "done.json").read_text()),
                      tmp_path / "runs" / main["key"] / "done.json")
    assert len(seen) == 2, "an attack already in the row is not run again"


def test_attack_summaries_in_a_row_are_flat_numbers(monkeypatch):
    from pipeline.jobs import runs as jobs_runs
    cfg = load_config("configs/demo.yaml", ["evaluate.attacks=logit_lens,probe,quantize"])
    monkeypatch.setattr(jobs_runs, "run_logit_lens_attack",
                        lambda *a: {"curves": "big", "summary": {"recovery": 0.5, "gold_recovery": float("nan")}})
    monkeypatch.setattr(jobs_runs, "run_probe_attack",
                        lambda *a: {"summary": {"mean_recovery": 0.4, "probes_in_mean": ["crop"]},
                                    "by_probe": {"crop": {"recovery": 0.4, "acc": 0.2}}})
    asked = []
    monkeypatch.setattr(jobs_runs, "run_quantize_attack",
                        lambda c, *a: asked.append(c.quantize) or
                        {"by_scheme": {"int4": {"recovery": 0.3, "change": 0.1, "acc_forget": 0.2}}})
    out = jobs_runs.attack_metrics(cfg, "adapter", "vanilla", "gold")
    assert out == {"logit_lens": {"recovery": 0.5, "gold_recovery": None},
                   "probe": {"mean_recovery": 0.4, "recovery_crop": 0.4},
                   "quantize": {"recovery_int4": 0.3, "change_int4": 0.1}}
    # in a row, quantize is int4 on the forget set (what the tables read), with the section's other settings
    assert (asked[0].schemes, asked[0].sets, asked[0].group_size) == (["int4"], ["forget"], cfg.quantize.group_size)


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


# One draw of the quick world, run for real: two methods at one budget, a 2-step relearning attacker with no
# worst-case grid, one evaluated profile.
ONE_DRAW = ("study.methods=ga,viker", "study.budgets=4", "study.ablations=false", "finetune.steps=8",
            "evaluate.max_profiles=1", "relearn.steps=2", "relearn.grid_lrs=", "relearn.grid_steps=",
            "relearn.people=false")


def test_real_runs_of_one_draw_fill_the_reports_attack_columns(tmp_path):
    """The study's own steps on one draw (benchmark, vanilla and gold models, cache, then a vanilla, a gold,
    a GA and a ViKeR run trained, evaluated and attacked), their done records copied to the other two test
    draws, and the report read from them: the attack columns come from what evaluation really writes.
    Every phase of `run_study` together, on the quick grid, is the slow test below."""
    over = [f"study.output={tmp_path}/s", f"study.report={tmp_path}/STUDY.md"]
    cfg = load_config("configs/study.yaml", study.QUICK + ONE_DRAW + tuple(over))
    s = cfg.study
    first, others, split = s.draws[0], s.draws[1:], s.splits[0]
    selection = {m: {"lr": s.lrs[0], "lam": s.lams[0], "auc": 0.5,
                     "candidates": [{"lr": s.lrs[0], "lam": s.lams[0], "auc": 0.5}]} for m in s.methods}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "selection.json").write_text(json.dumps({"chosen": selection}))
    planned = (study.vanilla_runs(cfg, s.draws, [split]) + study.gold_runs(cfg, s.draws, [split])
               + study.test_runs(cfg, selection))
    mine = [r for r in planned if r["settings"]["draw"] == first]
    assert sorted(r["settings"]["method"] for r in mine) == ["ga", "gold", "vanilla", "viker"]
    study.prepare_draw(cfg, first)
    study.prepare_gold(cfg, first, split)
    for job in study._caches(cfg, mine):
        study.prepare_cache(*job)
    done = {r["settings"]["method"]: study.execute_run(cfg, r) for r in mine}
    for name in ("ga", "viker"):    # trained, then attacked: membership against the gold model, relearning
        metrics = done[name]["row"]["metrics"]
        assert "privleak_min_k" in metrics["mia"] and metrics["relearn"]["steps"] == 2, name
    assert study.execute_run(cfg, mine[0]) == done["vanilla"]           # a finished run is read back
    for run in (r for r in planned if r["settings"]["draw"] in others):
        folder = tmp_path / "s" / "runs" / run["key"]
        folder.mkdir(parents=True)
        (folder / "done.json").write_text(json.dumps({**run, "row": done[run["settings"]["method"]]["row"]}))
    result = study.report_only(cfg, command="viker study --quick", log=lambda *_: None)
    assert result["runs"] == 12
    text = (tmp_path / "STUDY.md").read_text()
    # The attack columns appear only where the rows hold attack numbers, and here every cell has one.
    assert "| MIA AUC (min-k) | PrivLeak (min-k) |" in text and "| Relearn | Relearned ACC |" in text
    gold = re.search(r"\| forget_10 \| 3 \| (.*) \|$", text, re.M).group(1).split(" | ")
    assert re.fullmatch(r"\d+\.\d \[\d+\.\d, \d+\.\d\]", gold[2]), gold           # the gold model's MIA AUC
    assert re.search(r"^\| ViKeR − GA \| MIA AUC \(min-k\) \| [+-]\d+\.\d \|", text, re.M)
    assert "## Relearning against the gold control" in text


@pytest.mark.slow
def test_quick_preset_end_to_end_then_fully_reused(tmp_path):
    """`viker study --quick` on the CI grid (~2 min on 2 cores), then again: every run reused."""
    over = [f"study.output={tmp_path}/s", f"study.report={tmp_path}/STUDY.md"]
    cfg = load_config("configs/study.yaml", study.QUICK + tuple(over))
    first = study.run_study(cfg, command="viker study --quick", log=lambda *_: None)
    text = (tmp_path / "STUDY.md").read_text()
    assert "viker study --quick" in text and "## Main table: forget_10" in text and "per-token" in text
    # The attacks at matched forgetting, the gold models they are read against, the retain-aware ViKeR.
    # (The quick vanilla model knows nothing, so relearn recovery, relative to it, has no value here.)
    assert "| MIA AUC (min-k) | PrivLeak (min-k) |" in text and "## Gold models" in text
    assert "| Relearn | Relearned ACC |" in text
    # Methods compared paired, per unit, with the t interval over draws (one seed: over draws only).
    assert "## Paired differences" in text and "| ViKeR − GA | Retain fact |" in text
    assert "## Relearning against the gold control" in text and "overlap" not in text.lower()
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


def _finished_study(tmp_path):
    """A study output with every planned run finished (synthetic rows, nothing trained): selection.json and
    done.json records as run_study leaves them. ViKeR and ViKeR+NLL keep 20 points more retain fact than
    GA and GradDiff on every draw, on top of a draw effect all methods share."""
    over = [f"study.output={tmp_path}/s", f"study.report={tmp_path}/STUDY.md", "study.splits=forget_10",
            "study.seeds=0,1", "study.methods=ga,graddiff,viker,viker+nll", "study.budgets=8,16",
            "study.ablations=false"]
    cfg = load_config("configs/study.yaml", over)
    selection = {m: {"lr": 1e-3, "lam": 0.5, "auc": 0.5, "candidates": [{"lr": 1e-3, "lam": 0.5, "auc": 0.5}]}
                 for m in cfg.study.methods}
    out = tmp_path / "s"
    (out / "runs").mkdir(parents=True)
    (out / "selection.json").write_text(json.dumps({"chosen": selection}))
    keep = {"ga": 0.0, "graddiff": 0.02, "viker": 0.2, "viker+nll": 0.22}
    planned = (study.vanilla_runs(cfg, [cfg.study.val_draw], [cfg.study.val_split]) + study.selection_runs(cfg)
               + study.vanilla_runs(cfg, cfg.study.draws, ["forget_10"])
               + study.gold_runs(cfg, cfg.study.draws, ["forget_10"]) + study.test_runs(cfg, selection))
    for run in planned:
        st = run["settings"]
        shift = 0.05 * st["draw"] + 0.01 * st["seed"]
        if st["method"] == "vanilla":
            row = _attacked(_row(1.0, 1.0), 0.9, 80.0, 1.0)
        elif st["method"] == "gold":
            row = _attacked(_row(0.05, 0.95), 0.5, 0.0, 0.1 + 0.01 * st["draw"])
        else:
            forget, retain = (0.6, 0.7) if st["budget"] == 8 else (0.2, 0.4)
            row = _attacked(_row(forget, retain - shift + keep[st["method"]]), 0.6, 20.0, 0.5 - shift)
        (out / "runs" / run["key"]).mkdir()
        (out / "runs" / run["key"] / "done.json").write_text(json.dumps({**run, "row": row, "seconds": 1.0}))
    return cfg, over


def test_report_only_on_a_finished_study_has_the_paired_sections(tmp_path):
    from click.testing import CliRunner
    from pipeline.cli import main
    cfg, over = _finished_study(tmp_path)
    result = study.report_only(cfg, command="viker study --report-only", log=lambda *_: None)
    assert result["runs"] == result["planned"] == 79        # 25 selection runs, 6 vanilla/gold, 48 test runs
    text = (tmp_path / "STUDY.md").read_text()
    assert "95% Student t interval on the per-draw means" in text and "t = 4.30 with 3 draws" in text
    assert "overlap" not in text.lower()
    for section in ("## Paired differences", "### forget_10, matched forgetting at 25% of vanilla Forget ACC",
                    "## Relearning against the gold control"):
        assert section in text
    # Every seed of a draw moves with the draw: the difference is 20 points on every unit, so the interval is
    # [20, 20] and excludes 0; GradDiff - GA (2 points) likewise; every ViKeR variant is also read against ViKeR.
    assert "| ViKeR − GA | Retain fact | +20.0 | [+20.0, +20.0] | 6/6 (3) | ViKeR > GA |" in text
    assert "| ViKeR − GradDiff | Retain fact | +18.0 | [+18.0, +18.0] | 6/6 (3) | ViKeR > GradDiff |" in text
    assert "| ViKeR+NLL − GradDiff | Retain fact | +20.0 |" in text
    assert "| ViKeR+NLL − ViKeR | Retain fact | +2.0 | [+2.0, +2.0] | 6/6 (3) | ViKeR+NLL > ViKeR |" in text
    assert "| ViKeR − GA | Real fact | +0.0 | [+0.0, +0.0] | 6/6 (3) | no difference shown |" in text
    assert re.search(r"\| GA − gold \| Relearn \| \+\d+\.\d \| \[\+\d+\.\d, \+\d+\.\d\] \| 6/6 \(3\) \| GA > gold \|",
                     text)
    assert "| MIA AUC (min-k) | PrivLeak (min-k) | Relearn |" in text
    # The same through the command line.
    (tmp_path / "STUDY.md").unlink()
    res = CliRunner().invoke(main, ["study", "--report-only", *over])
    assert res.exit_code == 0, res.output
    assert "79 of 79 planned runs finished" in res.output
    assert "## Paired differences" in (tmp_path / "STUDY.md").read_text()
