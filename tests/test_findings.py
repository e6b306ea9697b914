"""The demo's findings: read at matched forgetting, stated only past the margin, stable ids."""
import math

from pipeline.jobs.findings import MARGIN, findings, format_findings
from pipeline.jobs.matched import at_matched, interpolate_at


def test_interpolate_at_skips_an_unknown_point():
    assert math.isclose(interpolate_at([0.9, math.nan, 0.3], [1.0, math.nan, 0.0], 0.45), 0.25)   # 0.45/0.6 of the way
    assert interpolate_at([math.nan, 0.4, 0.1], [9.0, 2.0, 1.0], 0.5) == 2.0        # first known point reaches
    assert math.isnan(interpolate_at([1.0, 0.8, math.nan], [1, 2, 3], 0.5))          # never reached
    assert interpolate_at([1.0, 0.5], [10.0, 20.0], 0.75) == 15.0


def _row(method, budget, forget, retain, real=0.9, mia=0.9, seed=0):
    return {"method": method, "budget": budget, "seed": seed,
            "metrics": {"forget": {"fact_acc": forget}, "retain": {"fact_acc": retain},
                        "real": {"fact_acc": real}, "mia": {"mia_auc_min_k": mia}}}


def test_methods_are_compared_where_they_forget_the_same_share():
    rows = [_row("Vanilla", 0, 1.0, 1.0), _row("Gold", 0, 0.05, 1.0, mia=0.45),
            _row("GA", 16, 0.6, 0.8), _row("GA", 32, 0.0, 0.2),        # GA reaches 50% at 10/6 of [16, 32]
            _row("ViKeR", 16, 0.4, 0.9), _row("ViKeR", 32, 0.3, 0.85),  # ViKeR reaches 50% inside [0, 16]
            _row("IdkPO", 16, 0.95, 1.0)]
    by_key = {f.key: f for f in findings(rows)}
    ga_half = 0.8 + (0.6 - 0.5) / 0.6 * (0.2 - 0.8)
    assert math.isclose(at_matched([rows[0], rows[2], rows[3]], "forget.fact_acc", 0.5, "retain.fact_acc"), ga_half)
    viker = by_key["retain fact@0.5:ViKeR-vs-GA"]
    assert viker.sign == 1 and f"{100 * ga_half:.1f}" in viker.text
    assert by_key["reach@0.5:IdkPO"].sign == -1 and "never forgets" in by_key["reach@0.5:IdkPO"].text
    assert by_key["mia@0.5:GA-vs-Gold"].sign == 1
    assert "about as much real fact as GA" in by_key["real fact@0.5:ViKeR-vs-GA"].text   # same 0.9: under the margin
    assert MARGIN > 0 and "Findings of this run" in format_findings(list(by_key.values()))
