"""What a demo sweep shows, written from its own numbers at matched forgetting.

One budget is not a comparison: at 32 steps one method has collapsed while
another has barely started (their curves cross the collapse at different
budgets, and float summation order moves where). So the demo compares methods
where each forgets the same share: every method's curve (the vanilla point,
then its budgets) is read at 50% and 25% of the vanilla model's Forget ACC
(matched.interpolate_at), and a finding is stated only when the difference is
at least MARGIN points; smaller differences are "no difference shown". A
method that never forgets that much says so.

Each finding has a stable id, so `benchmarks/demo_robustness.py` can check
that a conclusion holds in every run (one and two threads, two seeds) before
the docs state it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from .matched import at_matched, metric

FORGET = "forget.fact_acc"
LEVELS = (0.5, 0.25)                 # shares of the vanilla model's Forget ACC
BASELINE = "GA"                      # every method is compared with plain gradient ascent
UTILITY = (("retain fact", "retain.fact_acc"), ("real fact", "real.fact_acc"))
MIA = ("MIA AUC (min-k)", "mia.mia_auc_min_k")
# Points (x100) a difference must reach to be stated: two of the 72 evaluated retain facts (12 people x 6),
# well above one forget item (2.8 points of 36) that separates neighbouring budgets.
MARGIN = 5.0


@dataclass(frozen=True)
class Finding:
    key: str          # stable id: what is compared, where, between whom
    text: str         # the sentence, with this run's numbers
    sign: int         # +1: the first named is higher, -1: lower (or never reaches the level), 0: no difference shown


def curves(rows: list[dict]) -> dict[str, list[dict]]:
    """{method label: [vanilla row, rows by budget]}; several seeds of one label are kept apart (label#seed)."""
    vanilla = next((r for r in rows if r["method"] == "Vanilla"), None)
    if vanilla is None:
        return {}
    points = defaultdict(list)
    seeds = {r.get("seed", 0) for r in rows if r["method"] not in ("Vanilla", "Gold")}
    for r in rows:
        if r["method"] not in ("Vanilla", "Gold"):
            label = r["method"] if len(seeds) == 1 else f"{r['method']}#{r.get('seed', 0)}"
            points[label].append((float(r["budget"]), r))
    return {label: [vanilla] + [r for _, r in sorted(p, key=lambda x: x[0])] for label, p in points.items()}


def _sign(difference: float) -> int:
    """+1 / -1 past the margin (in points), 0 under it."""
    return 0 if abs(difference) < MARGIN else (1 if difference > 0 else -1)


def findings(rows: list[dict]) -> list[Finding]:
    """Every comparison with the baseline at every level, and the membership gap to the gold model."""
    out: list[Finding] = []
    by_label = curves(rows)
    gold = next((r for r in rows if r["method"] == "Gold"), None)
    base = by_label.get(BASELINE)
    for share in LEVELS:
        where = f"{100 * share:g}% of vanilla Forget ACC"
        for label, curve in by_label.items():
            reached = not math.isnan(at_matched(curve, FORGET, share, FORGET))
            if not reached:
                out.append(Finding(f"reach@{share}:{label}", f"{label} never forgets down to {where}", -1))
                continue
            if base is not None and label != BASELINE:
                for name, column in UTILITY:
                    mine, theirs = at_matched(curve, FORGET, share, column), at_matched(base, FORGET, share, column)
                    if math.isnan(theirs) or math.isnan(mine):
                        continue
                    sign = _sign(100 * (mine - theirs))
                    verb = {1: f"keeps more {name} than", -1: f"keeps less {name} than",
                            0: f"keeps about as much {name} as"}[sign]
                    out.append(Finding(f"{name}@{share}:{label}-vs-{BASELINE}",
                                       f"at {where}, {label} {verb} {BASELINE} "
                                       f"({100 * mine:.1f} vs {100 * theirs:.1f})", sign))
            if gold is not None:
                name, column = MIA
                mine, target = at_matched(curve, FORGET, share, column), metric(gold, column)
                if not (math.isnan(mine) or math.isnan(target)):
                    sign = _sign(100 * (mine - target))
                    verb = {1: "above", -1: "below", 0: "within 5 points of"}[sign]
                    out.append(Finding(f"mia@{share}:{label}-vs-Gold",
                                       f"at {where}, {label}'s {name} is {verb} the gold model's "
                                       f"({100 * mine:.1f} vs {100 * target:.1f})", sign))
    return out


def format_findings(found: list[Finding]) -> str:
    if not found:
        return "No findings: the results hold no vanilla row or no unlearning run."
    lines = [f"## Findings of this run, at matched forgetting (differences under {MARGIN:g} points are not "
             "stated as differences)", ""]
    lines += [f"- {f.text}" for f in found]
    return "\n".join(lines) + "\n"
