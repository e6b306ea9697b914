"""Matched forgetting: a metric read where a forgetting curve first falls to a target.

A curve is one run's points in budget order, the vanilla model first (budget
0). The first budget interval in which Forget ACC falls to the target is
interpolated linearly, and every other metric is read at the same fraction of
that interval. A point whose Forget ACC is unknown (NaN) is skipped: the
interval runs from the last known point before it. A curve that never reaches
the target has no value there (NaN); it is never extrapolated. The demo's
findings and the study's tables both read curves this way.
"""
from __future__ import annotations

import math


def metric(row: dict, column: str) -> float:
    """A results row's `<set>.<metric>` value (e.g. "retain.fact_acc"); NaN when missing or null."""
    split, name = column.split(".", 1)
    value = (row.get("metrics", {}).get(split) or {}).get(name)
    return math.nan if value is None else float(value)


def at_matched(curve: list[dict], forget_col: str, share: float, column: str) -> float:
    """`column` of a curve of rows (vanilla first) where `forget_col` first falls to `share` of the vanilla's."""
    forget = [metric(r, forget_col) for r in curve]
    return interpolate_at(forget, [metric(r, column) for r in curve], share * forget[0])


def interpolate_at(forget: list[float], values: list[float], target: float) -> float:
    """`values` where the curve `forget` (budget order, vanilla first) first falls to `target`; NaN if never."""
    previous = None
    for i, f in enumerate(forget):
        if math.isnan(f):
            continue
        if f <= target:
            if previous is None:
                return values[i]
            f0, v0 = forget[previous], values[previous]
            frac = 1.0 if f0 == f else (f0 - target) / (f0 - f)
            return v0 + frac * (values[i] - v0)
        previous = i
    return math.nan
