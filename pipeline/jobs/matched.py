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
