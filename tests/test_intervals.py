"""The study's intervals cover what they claim under the study's unit structure (pipeline/study/report.py).

Simulated studies with a known mean: each draw adds its own effect to every
seed trained on it (the seeds share the draw's benchmark, vanilla and gold
models and cache), each seed adds its own noise, of the same variance. A 95%
interval must cover the true mean in at least 90% of 300 seeded studies, at
3 draws x 2 seeds (the study's grid), 5 draws x 2 and 3 draws x 1 (the
comparisons: first seed only). The same for a paired difference with a known
nonzero effect, through the report's own paired_differences. And the old
interval (units pooled as if independent, percentile bootstrap) fails that
check in the same setting: the test would have caught it.
"""
import math

import numpy as np
import pytest

from pipeline.study.report import draw_interval, paired_differences, units

STUDIES = 300
MU = 0.3


def _simulate(rng, draws: int, seeds: int, sd_draw: float = 1.0, sd_seed: float = 1.0) -> np.ndarray:
    """(studies, draws, seeds) values: MU + draw effect + seed noise."""
    return (MU + sd_draw * rng.standard_normal((STUDIES, draws, 1))
            + sd_seed * rng.standard_normal((STUDIES, draws, seeds)))


def _coverage(intervals, truth) -> float:
    return float(np.mean([lo <= truth <= hi for lo, hi in intervals]))


def _structured(x: np.ndarray) -> list[tuple[float, float]]:
    """The report's interval (draw_interval) of every simulated study."""
    out = []
    for study in x:
        iv = draw_interval((d, float(v)) for d in range(study.shape[0]) for v in study[d])
        out.append((iv.low, iv.high))
    return out


def _pooled_bootstrap(x: np.ndarray, rng, n_boot: int = 2000) -> list[tuple[float, float]]:
    """The old report.bootstrap_ci, vectorised over studies: every (draw, seed) a unit, resampled with
    replacement, 95% percentile interval of the mean."""
    flat = x.reshape(len(x), -1)
    idx = rng.integers(0, flat.shape[1], size=(len(x), n_boot, flat.shape[1]))
    means = np.take_along_axis(np.broadcast_to(flat[:, None, :], idx.shape), idx, axis=2).mean(axis=2)
    return list(zip(np.percentile(means, 2.5, axis=1), np.percentile(means, 97.5, axis=1)))


def _two_stage_bootstrap(x: np.ndarray, rng, n_boot: int = 1000) -> list[tuple[float, float]]:
    """The alternative the report did not choose: draws resampled with replacement, then seeds within each
    resampled draw; percentile interval of the mean over draws of per-draw means."""
    s, d, k = x.shape
    di = rng.integers(0, d, size=(s, n_boot, d))
    si = rng.integers(0, k, size=(s, n_boot, d, k))
    picked = np.take_along_axis(np.broadcast_to(x[:, None], (s, n_boot, d, k)),
                                np.broadcast_to(di[..., None], (s, n_boot, d, k)), axis=2)
    means = np.take_along_axis(picked, si, axis=3).mean(axis=3).mean(axis=2)
    return list(zip(np.percentile(means, 2.5, axis=1), np.percentile(means, 97.5, axis=1)))


@pytest.mark.parametrize("draws,seeds", [(3, 2), (5, 2), (3, 1)])
def test_structured_interval_covers_the_true_mean(draws, seeds):
    x = _simulate(np.random.default_rng(100 + 10 * draws + seeds), draws, seeds)
    cover = _coverage(_structured(x), MU)
    print(f"t interval on per-draw means, {draws} draws x {seeds} seeds: coverage {cover:.3f}")
    assert cover >= 0.9


def test_structured_interval_covers_with_units_that_did_not_reach():
    """A third of the units have no value (NaN: the target not reached): left out, still >= 90%."""
    rng = np.random.default_rng(7)
    x = _simulate(rng, 3, 2)
    x[rng.random(x.shape) < 1 / 3] = np.nan
    ivs = [iv for iv in _structured(x) if not math.isnan(iv[0])]       # a study left with one draw has none
    assert len(ivs) >= 0.9 * STUDIES and _coverage(ivs, MU) >= 0.9


@pytest.mark.parametrize("draws", [3, 5])
def test_the_old_unit_pooled_bootstrap_undercovers(draws):
    """What the report used before: draws x seeds as independent units. It fails the check above (>= 0.9)."""
    rng = np.random.default_rng(200 + draws)
    x = _simulate(rng, draws, 2)
    cover = _coverage(_pooled_bootstrap(x, rng), MU)
    print(f"pooled percentile bootstrap, {draws} draws x 2 seeds: coverage {cover:.3f}")
    assert cover < 0.9
    assert _coverage(_structured(x), MU) >= 0.9          # the same studies, the report's interval


def test_the_two_stage_bootstrap_undercovers_at_three_draws():
    """Why the report uses t and not the two-stage bootstrap: right units, too few of them for percentiles."""
    rng = np.random.default_rng(300)
    x = _simulate(rng, 3, 2)
    cover = _coverage(_two_stage_bootstrap(x, rng), MU)
    print(f"two-stage bootstrap, 3 draws x 2 seeds: coverage {cover:.3f}")
    assert cover < 0.9


# ------------------------------------------------------------ paired differences

def _units_of(a: np.ndarray, b: np.ndarray) -> dict:
    """Study units whose one budget lands exactly on 50% of vanilla Forget ACC, so the value read at matched
    forgetting is the simulated value itself."""
    def row(forget, value):
        return {"metrics": {"forget": {"fact_acc": forget}, "retain": {"fact_acc": value}}}
    recs = []
    for d in range(a.shape[0]):
        recs.append({"variant": "Vanilla", "group": "vanilla", "row": row(0.8, 1.0),
                     "settings": {"draw": d, "split": "s", "seed": 0, "method": "vanilla", "budget": 0}})
        for name, x in (("A", a), ("B", b)):
            recs += [{"variant": name, "group": "main", "row": row(0.4, float(x[d, k])),
                      "settings": {"draw": d, "split": "s", "seed": k, "method": name.lower(), "budget": 8}}
                     for k in range(x.shape[1])]
    return units(recs)


@pytest.mark.parametrize("draws", [3, 5])
def test_paired_difference_covers_a_known_effect(draws):
    """A = B + 0.5 on average; both share the draw's effect (sd 2) and the unit's seed (sd 1); the method's
    effect varies with the draw (sd 1) and each run has its own noise (sd 0.5)."""
    rng = np.random.default_rng(400 + draws)
    delta, hits = 0.5, 0
    shared = (2.0 * rng.standard_normal((STUDIES, draws, 1)) + rng.standard_normal((STUDIES, draws, 2)))
    a = MU + delta + shared + rng.standard_normal((STUDIES, draws, 1)) + 0.5 * rng.standard_normal(shared.shape)
    b = MU + shared + 0.5 * rng.standard_normal(shared.shape)
    for i in range(STUDIES):
        iv = paired_differences(_units_of(a[i], b[i]), "A", "B", "s", "forget.fact_acc", 0.5,
                                (("Retain", "retain.fact_acc"),))["retain.fact_acc"]
        assert iv.n == 2 * draws and iv.draws == draws
        hits += iv.low <= delta <= iv.high
    print(f"paired difference, {draws} draws x 2 seeds: coverage {hits / STUDIES:.3f}")
    assert hits / STUDIES >= 0.9


def test_pairing_removes_what_the_draw_shares():
    """Why methods are compared paired, not by overlapping intervals: with a large draw effect both share
    (sd 3) and a steady difference of 1 (interaction sd 0.2, run noise 0.3), the paired verdict says A > B in
    two thirds of 3-draw studies (0.68) while the two methods' own intervals overlap in nearly all (1.00)."""
    rng = np.random.default_rng(500)
    shared = 3.0 * rng.standard_normal((STUDIES, 3, 1)) + rng.standard_normal((STUDIES, 3, 2))
    a = MU + 1.0 + shared + 0.2 * rng.standard_normal((STUDIES, 3, 1)) + 0.3 * rng.standard_normal(shared.shape)
    b = MU + shared + 0.3 * rng.standard_normal(shared.shape)
    directed = overlapping = 0
    for i in range(STUDIES):
        diff = paired_differences(_units_of(a[i], b[i]), "A", "B", "s", "forget.fact_acc", 0.5,
                                  (("Retain", "retain.fact_acc"),))["retain.fact_acc"]
        directed += diff.low > 0
        ia, ib = (draw_interval((d, float(v)) for d in range(3) for v in x[i, d]) for x in (a, b))
        overlapping += ia.low <= ib.high and ib.low <= ia.high
    print(f"paired 'A > B' in {directed / STUDIES:.3f}; unpaired intervals overlap in {overlapping / STUDIES:.3f}")
    assert directed / STUDIES > 0.6 and overlapping / STUDIES > 0.95
