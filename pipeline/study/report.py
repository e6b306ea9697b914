"""The study's numbers: matched forgetting, areas under curves, intervals, paired differences, docs/STUDY.md.

A *unit* is one (draw, split, seed) of one variant: its curve is the vanilla
model's point (budget 0) followed by the variant's runs in budget order.

Matched forgetting (`pipeline.jobs.matched.interpolate_at`, shared with the
demo's findings): the first budget interval in which the unit's Forget ACC
falls to the target (50% or 25% of the same draw's vanilla Forget ACC) is
interpolated linearly; every other metric is read at the same fraction of
that interval. A point whose Forget ACC is NaN is skipped (the interval runs
from the last finite point before it; with no finite point before it, the
point that reached the target gives the value as it is). A unit that never
reaches the target has no value there (the "reached" column counts them); it
is not extrapolated.

Area under the curve: with forgetting g = 1 - ForgetACC / vanilla ForgetACC
in [0, 1], AUC = integral over g of the utility read at matched forgetting g
(0 where the unit never forgets that much), on a grid of 101 levels. 1 would
be all the utility kept at every level of forgetting up to complete.

Intervals (`draw_interval`): the seeds of a draw are not independent units.
They share the draw's benchmark, vanilla model, gold model and reference
cache, so a draw's effect moves all its seeds together. The estimate is the
mean over draws of each draw's mean over its seeds; the 95% interval is a
Student t interval on the per-draw means, with (number of draws - 1) degrees
of freedom. A unit without a value (a target not reached) is left out and
counted; a draw none of whose seeds has a value is left out; with one seed
per draw this is a t interval over draws; with a single draw there is no
interval ("n/a"). Paired differences (method A - method B on the same
(draw, split, seed) unit, or a run minus the gold model of its draw and
split) get the same interval.

Why t and not a bootstrap: simulated studies with the study's structure
(draw effect and seed noise of equal variance, known mean; 2000 studies
per case) gave these coverages of the nominal 95% interval:

  ============================  ============  ============  ============
  interval                       3 draws x 2   5 draws x 2   3 draws x 1
  ============================  ============  ============  ============
  units pooled, percentile       0.75          0.81          0.74
  bootstrap (the old one)
  two-stage bootstrap (draws,    0.83          0.89          0.75
  then seeds within a draw)
  t on per-draw means (chosen)   0.95          0.95          0.95
  ============================  ============  ============  ============

tests/test_intervals.py repeats it with 300 seeded studies per case (t:
0.95, 0.97, 0.95, and 0.94-0.95 for paired differences with a known
effect; pooled bootstrap 0.74 and 0.83; two-stage bootstrap 0.81) and
fails an interval that covers less than 90%.

The two-stage bootstrap resamples the right units but, with 3 draws, only 10
distinct draw multisets exist and its percentiles act like a normal quantile
(about 1.96 standard errors) where the uncertainty of a spread estimated
from 3 numbers needs t with 2 df (4.30). The t interval is exact for normal
draw means and stayed at 0.94 with skewed (exponential) draw effects and
with 30% of units missing. With 3 draws it is wide; it is honest. Methods
are compared by the paired differences, never by whether two methods'
intervals overlap.
"""
from __future__ import annotations

import math
import subprocess
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.jobs.matched import at_matched, interpolate_at, metric
from pipeline.stage2.labels import METHOD_LABELS, is_viker


SELECTION_RULE = ("per method, the candidate (lr, and lambda for ViKeR) with the largest area under its "
                  "retain-utility vs forgetting curve on the validation draw; ties go to the candidate listed first")

UTILITY = (("Retain fact", "retain.fact_acc"), ("Real fact", "real.fact_acc"), ("Test fact", "test.fact_acc"),
           ("Retain R-L", "retain.rougeL"), ("Coherence", "forget.coherence"), ("Forget MC-LL", "forget.mc_ll_acc"))
# The attacks, read at matched forgetting like the utility columns (pipeline/evaluation/mia.py, relearn.py), with the
# scale to percent: PrivLeak is a percentage already. Membership inference is the fixed min-k% attack (not the
# best of four); PrivLeak is viker's 100 (auc - gold) / gold, PrivLeak OU OpenUnlearning's / MUSE's
# 100 (gold - auc) / (1 - gold) (opposite sign). A column no row of a table has is left out of it.
ATTACK_COLUMNS = (("MIA AUC (min-k)", "mia.mia_auc_min_k", 100), ("PrivLeak (min-k)", "mia.privleak_min_k", 1),
                  ("PrivLeak OU (min-k)", "mia.privleak_ou_min_k", 1), ("Relearn", "relearn.recovery", 100),
                  ("Relearn (worst)", "relearn.worst_recovery", 100),
                  ("Relearn (people)", "relearn.people_recovery", 100),
                  ("KL to gold", "gold_distance.kl_gold", 1), ("KL to gold (key)", "gold_distance.kl_gold_key", 1),
                  ("Lens", "logit_lens.recovery", 100), ("Probe", "probe.mean_recovery", 100),
                  ("Quant int4", "quantize.recovery_int4", 100))
# Columns in nats (evaluation/oracle.py: KL from the gold model's answer distributions), shown with 2 decimals.
NATS = {"gold_distance.kl_gold", "gold_distance.kl_gold_key"}
# The relearning numbers that are also read against the gold model of the unit's draw and split: the default
# cell's recovery, the worst (largest) over relearn's lr x steps grid, and the held-out-people split's
# (evaluation/relearn.py); the last two only where the rows have them.
RELEARN_COLUMNS = (("Relearn", "relearn.recovery", 100), ("Relearn (worst)", "relearn.worst_recovery", 100),
                   ("Relearn (people)", "relearn.people_recovery", 100), ("Lens", "logit_lens.recovery", 100),
                   ("Probe", "probe.mean_recovery", 100), ("Quant int4", "quantize.recovery_int4", 100))
GROUP_TITLES = {
    "ablation": "Ablations (w/o Reg = GA, w/o GA, w/o Vis = reference from the sample's own image, k=1)",
    "reference": "Reference source (main: people)",
    "k": "Reference images k (main: precompute.k)",
    "lambda": "lambda sweep",
    "regulariser": "Regulariser D (main: KL)",
    "token_lambda": "Per-token lambda from the reference entropy (ours) vs constant lambda",
}


# ------------------------------------------------------------------ pure maths

def curve_auc(forget: list[float], utility: list[float], levels: int = 101) -> float:
    """Area under utility vs normalised forgetting (module doc); forget[0] is the vanilla point."""
    f0 = forget[0]
    if not f0 > 0:
        return math.nan
    grid = np.linspace(0.0, 1.0, levels)
    u = [interpolate_at(forget, utility, f0 * (1.0 - g)) for g in grid]
    u = np.nan_to_num(np.array(u, dtype=float), nan=0.0)
    return float(np.sum((u[1:] + u[:-1]) / 2 * np.diff(grid)))


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer number of degrees of freedom (the closed form of the series)."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    term, total = 1.0, 1.0
    if df % 2:                                   # odd: (2/pi) (theta + s c (1 + 2/3 c^2 + 2*4/(3*5) c^4 ...))
        for j in range(1, (df - 1) // 2):
            term *= c * c * (2 * j) / (2 * j + 1)
            total += term
        return 2 / math.pi * (theta + (s * c * total if df > 1 else 0.0))
    for j in range(1, df // 2):                  # even: s (1 + 1/2 c^2 + 1*3/(2*4) c^4 ...)
        term *= c * c * (2 * j - 1) / (2 * j)
        total += term
    return s * total


@lru_cache(maxsize=None)
def t_quantile(df: int, level: float = 0.95) -> float:
    """The t with P(|T| <= t) = level, T Student's t with `df` (>= 1) degrees of freedom (12.71 at 1, 4.30 at 2)."""
    if df < 1:
        raise ValueError(f"a t quantile needs >= 1 degree of freedom, got {df}")
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < level else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


class Interval(NamedTuple):
    """A mean over draws of per-draw means and its 95% interval (module doc)."""
    mean: float
    low: float
    high: float
    n: int              # units with a value
    draws: int          # draws with at least one such unit
    left_out: int       # units without a value (NaN: a target not reached, a metric not measured)


def draw_interval(pairs, level: float = 0.95) -> Interval:
    """The structured interval of (draw, value) pairs, one pair per unit (seed): a t interval on the per-draw means
    with draws - 1 degrees of freedom. NaN or None values are left out and counted; one draw: no interval (NaN)."""
    by_draw: dict = defaultdict(list)
    left_out = 0
    for draw, value in pairs:
        if value is None or math.isnan(value):
            left_out += 1
        else:
            by_draw[draw].append(float(value))
    if not by_draw:
        return Interval(math.nan, math.nan, math.nan, 0, 0, left_out)
    means = np.array([np.mean(v) for v in by_draw.values()])
    n = sum(len(v) for v in by_draw.values())
    centre = float(means.mean())
    if means.size < 2:
        return Interval(centre, math.nan, math.nan, n, 1, left_out)
    half = t_quantile(means.size - 1, level) * float(means.std(ddof=1)) / math.sqrt(means.size)
    return Interval(centre, centre - half, centre + half, n, int(means.size), left_out)


def verdict(iv: Interval, a: str, b: str) -> str:
    """Plain words for a difference a - b: a direction only where the interval excludes 0."""
    if iv.n == 0:
        return "n/a"
    if iv.low > 0:
        return f"{a} > {b}"
    if iv.high < 0:
        return f"{a} < {b}"
    return "no difference shown"


# ------------------------------------------------------------------ records -> units

def units(records: list[dict]) -> dict[tuple, list[dict]]:
    """{(variant, group, draw, split, seed): [vanilla row, rows by budget]} for every trained variant."""
    vanilla = {(r["settings"]["draw"], r["settings"]["split"]): r["row"] for r in records
               if r["settings"]["method"] == "vanilla"}
    curves = defaultdict(list)
    for r in records:
        st = r["settings"]
        if st["method"] not in ("vanilla", "gold"):      # the gold model is a reference, not a curve
            curves[(r["variant"], r["group"], st["draw"], st["split"], st["seed"])].append((st["budget"], r["row"]))
    return {key: [vanilla[(key[2], key[3])]] + [row for _, row in sorted(points, key=lambda p: p[0])]
            for key, points in curves.items() if (key[2], key[3]) in vanilla}


def gold_rows(records: list[dict]) -> dict[tuple, dict]:
    """{(draw, split): the gold model's row}: the control every unit of that draw and split is read against."""
    return {(r["settings"]["draw"], r["settings"]["split"]): r["row"] for r in records
            if r["settings"]["method"] == "gold"}


def first_seed_units(all_units: dict, seed: int) -> dict:
    """The units (variant, group, draw, split, seed) of one training seed."""
    return {key: rows for key, rows in all_units.items() if key[4] == seed}


def variant_units(all_units: dict, variant: str, split: str) -> dict[tuple, list[dict]]:
    """{(draw, seed): rows} of one variant on one split."""
    return {(key[2], key[4]): rows for key, rows in all_units.items() if key[0] == variant and key[3] == split}


def unit_values(rows: list[dict], forget_col: str, target_share: float, columns) -> dict[str, float]:
    return {col: at_matched(rows, forget_col, target_share, col) for _, col in columns}


def paired_differences(all_units: dict, a: str, b: str, split: str, forget_col: str, share: float,
                       columns) -> dict[str, Interval]:
    """{column: interval of A - B}: per (draw, seed) unit both variants ran, the difference of their values at
    matched forgetting (`share` of vanilla Forget ACC); a unit where either has no value is left out and counted."""
    ua, ub = variant_units(all_units, a, split), variant_units(all_units, b, split)
    both = sorted(set(ua) & set(ub))
    va = {k: unit_values(ua[k], forget_col, share, columns) for k in both}
    vb = {k: unit_values(ub[k], forget_col, share, columns) for k in both}
    return {col: draw_interval((k[0], va[k][col] - vb[k][col]) for k in both) for _, col in columns}


def minus_gold(all_units: dict, variant: str, split: str, forget_col: str, share: float, gold: dict,
               columns) -> dict[str, Interval]:
    """{column: interval of the variant minus the gold model}: per unit, its value at matched forgetting minus the
    gold row of the unit's draw and split (a unit whose draw has no gold value is left out and counted)."""
    out = {}
    for _, col in columns:
        pairs = []
        for (draw, _seed), rows in sorted(variant_units(all_units, variant, split).items()):
            g = gold.get((draw, split))
            value = at_matched(rows, forget_col, share, col)
            pairs.append((draw, value - metric(g, col) if g is not None else math.nan))
        out[col] = draw_interval(pairs)
    return out


def select(val_records: list[dict], forget_metric: str, utility_metric: str) -> dict:
    """The selection rule (SELECTION_RULE) on the validation runs: {method: {lr, lam, auc, candidates}}."""
    chosen: dict[str, dict] = {}
    for (variant, _, _, _, _), rows in units(val_records).items():
        st = next(r["settings"] for r in val_records if r["variant"] == variant)
        auc = curve_auc([metric(r, f"forget.{forget_metric}") for r in rows],
                        [metric(r, f"retain.{utility_metric}") for r in rows])
        entry = chosen.setdefault(st["method"], {"candidates": []})
        entry["candidates"].append({"lr": st["lr"], "lam": st["lam"], "auc": auc})
    for entry in chosen.values():
        # max() keeps the first of equal scores: the candidate listed first wins a tie.
        best = max(entry["candidates"], key=lambda c: -1.0 if math.isnan(c["auc"]) else c["auc"])
        entry.update(lr=best["lr"], lam=best["lam"], auc=best["auc"])
    return chosen


# ------------------------------------------------------------------ tables

def _cell(iv: Interval, scale: float = 100, digits: int = 1) -> str:
    if iv.n == 0:
        return "n/a"
    if math.isnan(iv.low):
        return f"{scale * iv.mean:.{digits}f} [n/a]"
    return f"{scale * iv.mean:.{digits}f} [{scale * iv.low:.{digits}f}, {scale * iv.high:.{digits}f}]"


def _digits(column: str) -> int:
    return 2 if column in NATS else 1


def _columns() -> list[tuple[str, str, float]]:
    return [(h, c, 100) for h, c in UTILITY] + list(ATTACK_COLUMNS)


def _kept(all_units: dict, variants: list[str], split: str, columns,
          utility: bool = True) -> list[tuple[str, str, float]]:
    """The columns some run (past the vanilla point) of these variants has; with `utility`, every utility column."""
    runs = [r for key, rows in all_units.items() if key[0] in variants and key[3] == split for r in rows[1:]]
    return [(h, c, k) for h, c, k in columns
            if (utility and (h, c) in UTILITY) or any(not math.isnan(metric(r, c)) for r in runs)]


def matched_table(all_units: dict, variants: list[str], split: str, forget_col: str, share: float,
                  absolute: bool = False) -> str:
    """Markdown: each variant's utility and attack numbers at matched forgetting (mean [95% interval over draws],
    module doc), reached n/N, AUC. Attack columns that no unit of the table has are left out."""
    kept = _kept(all_units, variants, split, _columns())
    found = []
    for variant in variants:
        by_unit = variant_units(all_units, variant, split)
        if not by_unit:
            continue
        per_unit = {}
        for key, rows in by_unit.items():
            f0 = metric(rows[0], forget_col)
            s = share / f0 if absolute and f0 > 0 else share
            per_unit[key] = unit_values(rows, forget_col, s, [(h, c) for h, c, _ in kept])
        reached = sum(not math.isnan(u[UTILITY[0][1]]) for u in per_unit.values())
        aucs = [(draw, curve_auc([metric(r, forget_col) for r in rows], [metric(r, "retain.fact_acc") for r in rows]))
                for (draw, _), rows in by_unit.items()]
        stats = {c: draw_interval((key[0], u[c]) for key, u in per_unit.items()) for _, c, _ in kept}
        found.append((variant, f"{reached}/{len(per_unit)}", stats, draw_interval(aucs)))
    head = ["Method", "reached"] + [h for h, _, _ in kept] + ["AUC (retain fact)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, reached, stats, auc in found:
        cells = [_cell(stats[c], k, _digits(c)) for _, c, k in kept]
        lines.append("| " + " | ".join([variant, reached] + cells + [_cell(auc)]) + " |")
    return "\n".join(lines) + "\n"


def _difference_row(label: str, header: str, iv: Interval, scale: float, a: str, b: str, digits: int = 1) -> str:
    if iv.n == 0:
        diff, interval = "n/a", "n/a"
    else:
        d = digits
        diff = f"{scale * iv.mean:+.{d}f}"
        interval = ("n/a (one draw)" if math.isnan(iv.low)
                    else f"[{scale * iv.low:+.{d}f}, {scale * iv.high:+.{d}f}]")
    return (f"| {label} | {header} | {diff} | {interval} | {iv.n}/{iv.n + iv.left_out} ({iv.draws}) | "
            f"{verdict(iv, a, b)} |")


_DIFF_HEAD = ["| Comparison | Metric | difference | 95% interval | units (draws) | verdict |",
              "|---|---|---|---|---|---|"]


def comparison_pairs(variants: list[str]) -> list[tuple[str, str]]:
    """The comparisons the report makes: every method against GA; every ViKeR variant against GradDiff and NPO;
    every other ViKeR variant (references, retain term, no ascent) against the paper's ViKeR."""
    pairs = [(v, "GA") for v in variants if v != "GA"] if "GA" in variants else []
    vikers = [v for v in variants if v.startswith("ViKeR")]
    for base in ("GradDiff", "NPO"):
        if base in variants and "GA" not in variants:
            pairs += [(a, base) for a in vikers]
        elif base == "GradDiff" and base in variants:
            pairs += [(a, base) for a in ("ViKeR", "ViKeR+NLL") if a in variants]
    if "ViKeR" in variants:
        pairs += [(v, "ViKeR") for v in vikers if v != "ViKeR"]
    return list(dict.fromkeys(pairs))


def paired_table(all_units: dict, pairs: list[tuple[str, str]], split: str, forget_col: str, share: float) -> str:
    """Markdown: A - B at matched forgetting per (draw, seed) unit both ran, mean over draws [95% interval],
    units with both values / paired units (draws), and a verdict that names a direction only where the interval
    excludes 0. Columns neither variant has are left out."""
    lines = list(_DIFF_HEAD)
    for a, b in pairs:
        if not (variant_units(all_units, a, split) and variant_units(all_units, b, split)):
            continue
        kept = _kept(all_units, [a, b], split, _columns(), utility=False)
        diffs = paired_differences(all_units, a, b, split, forget_col, share, [(h, c) for h, c, _ in kept])
        lines += [_difference_row(f"{a} − {b}", h, diffs[c], k, a, b, _digits(c)) for h, c, k in kept]
    return "\n".join(lines) + "\n"


def relearn_gold_table(all_units: dict, records: list[dict], variants: list[str], split: str, forget_col: str,
                       share: float) -> str | None:
    """Markdown: each variant's relearning recovery at matched forgetting minus the gold model's of the same
    draw and split, per unit, with the same interval; None where no gold run of the split has a recovery."""
    gold = gold_rows(records)
    on_split = [row for (_, sp), row in gold.items() if sp == split]
    cols = [(h, c, k) for h, c, k in RELEARN_COLUMNS if any(not math.isnan(metric(r, c)) for r in on_split)]
    if not cols:
        return None
    lines = list(_DIFF_HEAD)
    for variant in variants:
        if not variant_units(all_units, variant, split):
            continue
        diffs = minus_gold(all_units, variant, split, forget_col, share, gold, [(h, c) for h, c, _ in cols])
        lines += [_difference_row(f"{variant} − gold", h, diffs[c], k, variant, "gold") for h, c, k in cols]
    return "\n".join(lines) + "\n"


# The goal a variant is held to, declared before any run: at 25% of vanilla Forget ACC, membership leaks no more
# than 10 points of PrivLeak (min-k) from the gold model's (0) and retain fact accuracy keeps >= 85% of vanilla's.
GOAL_PRIVLEAK, GOAL_RETAIN = 10.0, 0.85
GOAL_WORDS = (f"Declared before the runs: a variant meets the goal when, at matched forgetting, its PrivLeak (min-k) "
              f"is within {GOAL_PRIVLEAK:g} points of the gold model's 0 and its retain fact accuracy is >= "
              f"{100 * GOAL_RETAIN:g}% of the same draw's vanilla model's. *met* means the whole 95% interval over "
              f"draws satisfies both; *mean only* that the means do and the intervals do not; *no* that a mean "
              f"misses. MIA − gold is the min-k AUC minus the gold model's of the same draw and split, in points; "
              f"Relearn − gold likewise for the relearning recovery.\n")


BEST_RULE = (f"the ViKeR variant whose |PrivLeak (min-k)| at 25% of vanilla Forget ACC is smallest on the "
             f"validation draw (its chosen lambda), among those that keep retain fact >= {100 * GOAL_RETAIN:g}% of "
             f"vanilla there (all of them if none does)")


def best_on_validation(val_records: list[dict], selection: dict, forget_col: str,
                       share: float = 0.25) -> tuple[str | None, dict]:
    """BEST_RULE on the validation runs: (the sweep key picked or None, {key: (PrivLeak, retain / vanilla)}).

    Declared before the test draws are read, so the variant the report singles out is not chosen on them.
    """
    found = {}
    for key, pick in selection.items():
        if not is_viker(key):
            continue
        chosen = [r for r in val_records if r["settings"]["method"] == "vanilla" or (
            r["settings"]["method"] == key and r["settings"]["lr"] == pick["lr"] and r["settings"]["lam"] == pick["lam"])]
        curves = [rows for (_, group, *_), rows in units(chosen).items()]
        if len(curves) != 1:
            continue
        rows = curves[0]
        base = metric(rows[0], "retain.fact_acc")
        found[key] = (at_matched(rows, forget_col, share, "mia.privleak_min_k"),
                      at_matched(rows, forget_col, share, "retain.fact_acc") / base if base > 0 else math.nan)
    measured = {k: v for k, v in found.items() if not math.isnan(v[0])}
    keeping = {k: v for k, v in measured.items() if v[1] >= GOAL_RETAIN}
    pool = keeping or measured
    return (min(pool, key=lambda k: abs(pool[k][0])) if pool else None), found


def retain_relative(all_units: dict, variant: str, split: str, forget_col: str, share: float) -> Interval:
    """Retain fact accuracy at matched forgetting over the unit's vanilla model's, per unit, over draws."""
    pairs = []
    for (draw, _seed), rows in sorted(variant_units(all_units, variant, split).items()):
        base = metric(rows[0], "retain.fact_acc")
        value = at_matched(rows, forget_col, share, "retain.fact_acc")
        pairs.append((draw, value / base if base > 0 else math.nan))
    return draw_interval(pairs)


def goal_table(all_units: dict, records: list[dict], variants: list[str], split: str, forget_col: str,
               share: float) -> str:
    """Markdown: per variant, the goal's two numbers (GOAL_WORDS) with their intervals, the distance to gold and
    the gold-paired attacks, and whether the goal was met."""
    gold = gold_rows(records)
    head = ["Method", "PrivLeak (min-k)", "MIA − gold (pts)", "Retain fact / vanilla (%)", "KL to gold",
            "KL to gold (key)", "Relearn − gold (pts)", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant in variants:
        by_unit = variant_units(all_units, variant, split)
        if not by_unit:
            continue
        at = {c: draw_interval((k[0], at_matched(rows, forget_col, share, c)) for k, rows in by_unit.items())
              for c in ("mia.privleak_min_k", "gold_distance.kl_gold", "gold_distance.kl_gold_key")}
        versus = minus_gold(all_units, variant, split, forget_col, share, gold,
                            [("MIA", "mia.mia_auc_min_k"), ("Relearn", "relearn.recovery")])
        kept = retain_relative(all_units, variant, split, forget_col, share)
        leak = at["mia.privleak_min_k"]
        if leak.n == 0 or kept.n == 0:
            met = "n/a"
        elif abs(leak.mean) <= GOAL_PRIVLEAK and kept.mean >= GOAL_RETAIN:
            whole = (not math.isnan(leak.low) and -GOAL_PRIVLEAK <= leak.low and leak.high <= GOAL_PRIVLEAK
                     and kept.low >= GOAL_RETAIN)
            met = "met" if whole else "mean only"
        else:
            met = "no"
        lines.append("| " + " | ".join([variant, _cell(leak, 1), _cell(versus["mia.mia_auc_min_k"]), _cell(kept),
                                         _cell(at["gold_distance.kl_gold"], 1, 2),
                                         _cell(at["gold_distance.kl_gold_key"], 1, 2),
                                         _cell(versus["relearn.recovery"]), met]) + " |")
    return "\n".join(lines) + "\n"


def gold_table(records: list[dict], splits: list[str], forget_col: str) -> str:
    """The gold models (never trained on the forget people): what perfect unlearning would score, mean over
    draws [95% t interval over draws]. The extra relearning columns appear when some gold run has them."""
    cols = [(forget_col.replace("forget.", "Forget "), forget_col, 100), ("Retain fact", "retain.fact_acc", 100),
            ("MIA AUC (min-k)", "mia.mia_auc_min_k", 100), ("Relearn", "relearn.recovery", 100),
            ("Relearned ACC", "relearn.acc_after", 100)]
    golds = [r for r in records if r["settings"]["method"] == "gold"]
    cols += [(h, c, k) for h, c, k in RELEARN_COLUMNS[1:] if any(not math.isnan(metric(r["row"], c)) for r in golds)]
    lines = ["| split | n | " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for split in splits:
        rows = [r for r in golds if r["settings"]["split"] == split]
        if rows:
            cells = [_cell(draw_interval((r["settings"]["draw"], metric(r["row"], c)) for r in rows), k)
                     for _, c, k in cols]
            lines.append(f"| {split} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def share_above(all_units: dict, variant: str, split: str, forget_col: str, level: float, floor: float) -> str:
    """How many units keep retain fact >= floor where Forget ACC first reaches `level` (absolute)."""
    hits, n = 0, 0
    for key, rows in all_units.items():
        if key[0] == variant and key[3] == split:
            n += 1
            forget = [metric(r, forget_col) for r in rows]
            v = interpolate_at(forget, [metric(r, "retain.fact_acc") for r in rows], level)
            hits += (not math.isnan(v)) and v >= floor
    return f"{hits}/{n}"


def curve_plot(all_units: dict, variants: list[str], split: str, forget_col: str, path: Path, title: str) -> Path:
    """Mean Forget ACC vs mean retain fact accuracy per budget, one line per variant."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for variant in variants:
        rows_of = [rows for key, rows in all_units.items() if key[0] == variant and key[3] == split]
        if not rows_of:
            continue
        width = min(len(r) for r in rows_of)
        x = [100 * np.nanmean([metric(r[i], forget_col) for r in rows_of]) for i in range(width)]
        y = [100 * np.nanmean([metric(r[i], "retain.fact_acc") for r in rows_of]) for i in range(width)]
        ax.plot(x, y, marker="o", label=variant)
    ax.set_xlabel(f"Forget ACC: forget.{forget_col.split('.', 1)[1]} (%), lower = more forgetting")
    ax.set_ylabel("Retain fact accuracy (%)")
    ax.set_title(title, fontsize="small")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ------------------------------------------------------------------ STUDY.md

def _load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _vanilla_table(records: list[dict]) -> str:
    cols = (("Forget fact", "forget.fact_acc"), ("Retain fact", "retain.fact_acc"), ("Real fact", "real.fact_acc"),
            ("Test fact", "test.fact_acc"), ("Forget MC (letter)", "forget.mc_acc"),
            ("Forget MC-LL", "forget.mc_ll_acc"), ("Retain MC-LL", "retain.mc_ll_acc"),
            ("Forget cloze-LL", "forget.cloze_ll_acc"))
    lines = ["| draw | split | " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for r in sorted((r for r in records if r["settings"]["method"] == "vanilla"),
                    key=lambda r: (r["settings"]["draw"], r["settings"]["split"])):
        vals = [metric(r["row"], c) for _, c in cols]
        lines.append(f"| {r['settings']['draw']} | {r['settings']['split']} | "
                     + " | ".join("n/a" if math.isnan(v) else f"{100 * v:.1f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def _interval_words(n_draws: int) -> str:
    t = f"t = {t_quantile(n_draws - 1):.2f} with {n_draws} draws" if n_draws > 1 else "no interval with one draw"
    return (f"- Units and intervals: a unit is one (draw, split, seed). The seeds of a draw share its benchmark, "
            f"vanilla model, gold model and reference cache, so they are not independent units: a cell is the mean "
            f"over draws of each draw's mean over its seeds, in %, with a 95% Student t interval on the per-draw "
            f"means (draws - 1 degrees of freedom; {t}; it covered the true mean 95% of the time in simulated "
            f"studies of this shape, where the earlier bootstrap over draws x seeds as if independent covered 75%: "
            f"pipeline/study/report.py). With few draws these intervals are wide. A method's interval says how "
            f"well its own number is known; it is not a test between methods: methods are compared in "
            f"**Paired differences**, per unit both ran.")


_PAIRED_WORDS = (
    "A − B per (draw, split, seed) unit where both methods reach the target (50% or 25% of the draw's vanilla "
    "Forget ACC), in percentage points (PrivLeak columns in their own units): the mean over draws of each draw's "
    "mean difference [95% t interval on the per-draw means, as above]. `units (draws)`: units where both have a "
    "value / units both ran (the draws they come from). The verdict names a direction (`A > B`, `A < B`) only "
    "where the interval excludes 0; otherwise it says no difference shown, which is not evidence of equality. "
    "For the attack columns larger is not better: MIA AUC should be near the gold model's, PrivLeak near 0, and "
    "a lower relearn recovery is better.\n")

_GOLD_PAIRED_WORDS = (
    "Per unit, the relearning attack's recovery at matched forgetting (and, where the rows have them, the "
    "logit-lens, probing and int4 quantization recoveries of evaluate.attacks) minus the recovery of the gold "
    "model of the same draw and split (the vanilla recipe without the forget people, attacked the same way): above 0 "
    "(`X > gold`) is knowledge the unlearning hid rather than removed. Same interval and verdict as the paired "
    "differences; a unit whose draw has no gold recovery is left out and counted.\n")


def write_study_report(cfg, records: list[dict], val_records: list[dict], selection: dict, *, command: str,
                       wall_seconds: float, note: str = "") -> dict[str, Path]:
    s = cfg.study
    md_path = Path(s.report)
    img_dir = md_path.parent / (md_path.stem.lower() + "_img")
    forget_col = f"forget.{s.forget_metric}"
    all_units = units(records)
    seconds = [r["seconds"] for r in records + val_records if "seconds" in r]
    main_variants = [METHOD_LABELS.get(m, m) for m in s.methods]
    when = (f"in **{wall_seconds / 60:.1f} min** wall time" if not math.isnan(wall_seconds)
            else "from the runs finished so far")
    out = ["# Study: methods at matched forgetting over draws, splits and seeds\n",
           f"Generated by `{command}` {when} "
           f"(load at the end: `{_load()}`; runs reused from earlier invocations cost nothing here).\n",
           *([f"**{note}.**\n"] if note else []),
           f"- Grid: test draws mini.seed = {s.draws}; validation draw {s.val_draw} ({s.val_split}); "
           f"splits {s.splits}; training seeds {s.seeds}; methods {s.methods}; budgets (steps) {s.budgets}; "
           f"candidates lr {s.lrs}, ViKeR lambda {s.lams}. {len(records) + len(val_records)} runs; median "
           f"{np.median(seconds) if seconds else float('nan'):.1f} s per run (train + evaluate, one thread).",
           f"- Forget ACC here is `{forget_col}`; utility and attack columns are read where it reaches the target. "
           f"`reached` counts the units that got there; the others have no value there (not extrapolated) and are "
           f"left out of the means.",
           _interval_words(len(set(s.draws))),
           f"- Hyper-parameters frozen before the test draws by one rule for every method: {SELECTION_RULE} "
           f"(AUC of retain.{s.utility_metric}).\n",
           "## Chosen hyper-parameters (validation draw)\n",
           "| Method | lr | lambda | AUC | candidates (lr, lambda: AUC) |", "|---|---|---|---|---|"]
    for method, pick in selection.items():
        cands = "; ".join(f"{c['lr']:g}, {c['lam']:g}: {c['auc']:.3f}" for c in pick["candidates"])
        out.append(f"| {METHOD_LABELS.get(method, method)} | {pick['lr']:g} | {pick['lam']:g} | {pick['auc']:.3f} | {cands} |")
    out += ["", "## Vanilla models (before unlearning)\n", _vanilla_table(records)]
    out += ["## Gold models (the vanilla recipe without the forget people: what perfect unlearning gives)\n",
            "Membership inference (MIA AUC: the min-k% attack; 50 = chance) and the relearning attack's recovery "
            "on these models are the targets: the main tables' MIA AUC should come down to this, their PrivLeak "
            "(relative to this AUC, same attack) to 0, and a relearn recovery above the gold model's is knowledge "
            "the unlearning hid rather than removed (read per unit in *Relearning against the gold control*).\n",
            gold_table(records, s.splits, forget_col)]
    paths = {"markdown": md_path}
    for split in s.splits:
        for share in (0.5, 0.25):
            out.append(f"## Main table: {split}, matched forgetting at {int(share * 100)}% of vanilla Forget ACC\n")
            out.append(matched_table(all_units, main_variants, split, forget_col, share))
        png = curve_plot(all_units, main_variants, split, forget_col, img_dir / f"main-{split}.png",
                         f"Forgetting vs retain facts, {split} (mean over draws x seeds)")
        out.append(f"![main {split}]({img_dir.name}/{png.name})\n")
    pairs = comparison_pairs(main_variants)
    if pairs:
        out += ["## Paired differences\n", _PAIRED_WORDS]
        for split in s.splits:
            for share in (0.5, 0.25):
                out.append(f"### {split}, matched forgetting at {int(share * 100)}% of vanilla Forget ACC\n")
                out.append(paired_table(all_units, pairs, split, forget_col, share))
    if gold_rows(records):
        out += ["## Against the gold model: the goal\n", GOAL_WORDS]
        best, on_val = best_on_validation(val_records, selection, forget_col)
        if on_val:
            shown = "; ".join(f"{METHOD_LABELS.get(k, k)} {v[0]:.1f}, {100 * v[1]:.0f}%" for k, v in on_val.items())
            out.append(f"The variant singled out, by a rule declared before the runs ({BEST_RULE}): "
                       f"**{METHOD_LABELS.get(best, best) if best else 'none (no variant reached 25% there)'}**. "
                       f"Validation draw (PrivLeak, retain fact / vanilla at 25%): {shown}.\n")
        for split in s.splits:
            out.append(f"### {split}, matched forgetting at 25% of vanilla Forget ACC\n")
            out.append(goal_table(all_units, records, main_variants, split, forget_col, 0.25))
    out += ["## Relearning against the gold control\n", _GOLD_PAIRED_WORDS]
    for split in s.splits:
        for share in (0.5, 0.25):
            table = relearn_gold_table(all_units, records, main_variants, split, forget_col, share)
            if table is None:
                out.append(f"- {split}: no gold run of this split has a relearning recovery "
                           f"(`relearn.recovery`): nothing to pair.\n")
                break
            out.append(f"### {split}, matched forgetting at {int(share * 100)}% of vanilla Forget ACC\n")
            out.append(table)
    if s.ablations:
        split = s.ablation_split
        # The variants ran on the first seed only; the GA/ViKeR rows beside them must too, or they
        # would average over more units than the rows they are compared with.
        all_units = first_seed_units(all_units, s.seeds[0])
        for group, title in GROUP_TITLES.items():
            variants = sorted({k[0] for k in all_units if k[1] == group})
            if not variants:
                continue
            base = ["GA", "ViKeR"] if group == "ablation" else ["ViKeR"]
            shown = base + variants
            out.append(f"## {title}: {split}, first seed, 50% of vanilla Forget ACC\n")
            out.append(matched_table(all_units, shown, split, forget_col, 0.5))
            out.append("Paired differences against ViKeR on the same (draw, seed) units (as in *Paired "
                       "differences*):\n")
            out.append(paired_table(all_units, [(v, "ViKeR") for v in shown if v != "ViKeR"], split, forget_col,
                                    0.5))
            if group == "token_lambda":
                out.append("Retain fact accuracy where Forget ACC first reaches 10% (absolute):\n")
                out.append(matched_table(all_units, shown, split, forget_col, 0.10, absolute=True))
                for v in shown:
                    out.append(f"- {v}: retain fact >= 90% at Forget ACC <= 10% in "
                               f"{share_above(all_units, v, split, forget_col, 0.10, 0.90)} draws.")
                out.append("")
            png = curve_plot(all_units, shown, split, forget_col, img_dir / f"{group}.png", title)
            out.append(f"![{group}]({img_dir.name}/{png.name})\n")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(out) + "\n")
    return paths
