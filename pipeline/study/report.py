"""The study's numbers: matched forgetting, areas under curves, bootstrap intervals, and docs/STUDY.md.

A *unit* is one (draw, split, seed) of one variant: its curve is the vanilla
model's point (budget 0) followed by the variant's runs in budget order.

Matched forgetting: the first budget interval in which the unit's Forget ACC
falls to the target (50% or 25% of the same draw's vanilla Forget ACC) is
interpolated linearly; every other metric is read at the same fraction of
that interval. A unit that never reaches the target has no value there (the
"reached" column counts them); it is not extrapolated.

Area under the curve: with forgetting g = 1 - ForgetACC / vanilla ForgetACC
in [0, 1], AUC = integral over g of the utility read at matched forgetting g
(0 where the unit never forgets that much), on a grid of 101 levels. 1 would
be all the utility kept at every level of forgetting up to complete.

Intervals: 95% percentile bootstrap of the mean over units (draws x seeds),
resampling units with replacement, seeded.
"""
from __future__ import annotations

import math
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.stage2.labels import METHOD_LABELS


SELECTION_RULE = ("per method, the candidate (lr, and lambda for ViKeR) with the largest area under its "
                  "retain-utility vs forgetting curve on the validation draw; ties go to the candidate listed first")

UTILITY = (("Retain fact", "retain.fact_acc"), ("Real fact", "real.fact_acc"), ("Test fact", "test.fact_acc"),
           ("Retain R-L", "retain.rougeL"), ("Coherence", "forget.coherence"), ("Forget MC-LL", "forget.mc_ll_acc"))
# The attacks, read at matched forgetting like the utility columns (pipeline/evaluation/mia.py, relearn.py), with the
# scale to percent: PrivLeak is a percentage already. A column no row of a table has is left out of it.
ATTACK_COLUMNS = (("MIA AUC", "mia.mia_auc_best", 100), ("PrivLeak", "mia.privleak_best", 1),
                  ("Relearn", "relearn.recovery", 100))
GROUP_TITLES = {
    "ablation": "Ablations (w/o Reg = GA, w/o GA, w/o Vis = reference from the sample's own image, k=1)",
    "reference": "Reference source (main: people)",
    "k": "Reference images k (main: precompute.k)",
    "lambda": "lambda sweep",
    "regulariser": "Regulariser D (main: KL)",
    "token_lambda": "Per-token lambda from the reference entropy (ours) vs constant lambda",
}


# ------------------------------------------------------------------ pure maths

def interpolate_at(forget: list[float], values: list[float], target: float) -> float:
    """`values` where the curve `forget` (budget order, vanilla first) first falls to `target`; NaN if never."""
    for i, f in enumerate(forget):
        if not math.isnan(f) and f <= target:
            if i == 0:
                return values[0]
            f0 = forget[i - 1]
            frac = 1.0 if f0 == f else (f0 - target) / (f0 - f)
            return values[i - 1] + frac * (values[i] - values[i - 1])
    return math.nan


def curve_auc(forget: list[float], utility: list[float], levels: int = 101) -> float:
    """Area under utility vs normalised forgetting (module doc); forget[0] is the vanilla point."""
    f0 = forget[0]
    if not f0 > 0:
        return math.nan
    grid = np.linspace(0.0, 1.0, levels)
    u = [interpolate_at(forget, utility, f0 * (1.0 - g)) for g in grid]
    u = np.nan_to_num(np.array(u, dtype=float), nan=0.0)
    return float(np.sum((u[1:] + u[:-1]) / 2 * np.diff(grid)))


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite values, 95% percentile bootstrap; NaNs when there are none."""
    x = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan, 0
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)), int(x.size)


# ------------------------------------------------------------------ records -> units

def metric(row: dict, column: str) -> float:
    split, name = column.split(".", 1)
    value = (row.get("metrics", {}).get(split) or {}).get(name)
    return math.nan if value is None else float(value)


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


def first_seed_units(all_units: dict, seed: int) -> dict:
    """The units (variant, group, draw, split, seed) of one training seed."""
    return {key: rows for key, rows in all_units.items() if key[4] == seed}


def unit_values(rows: list[dict], forget_col: str, target_share: float, columns) -> dict[str, float]:
    forget = [metric(r, forget_col) for r in rows]
    target = target_share * forget[0]
    return {col: interpolate_at(forget, [metric(r, col) for r in rows], target) for _, col in columns}


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

def _cell(stats, scale: float = 100) -> str:
    mean, lo, hi, n = stats
    if n == 0:
        return "n/a"
    return f"{scale * mean:.1f} [{scale * lo:.1f}, {scale * hi:.1f}]"


def matched_table(all_units: dict, variants: list[str], split: str, forget_col: str, share: float,
                  n_boot: int, absolute: bool = False) -> str:
    """Markdown: each variant's utility and attack numbers at matched forgetting (mean [95% CI] over units),
    reached n/N, AUC. Attack columns that no unit of the table has are left out."""
    columns = [(h, c, 100) for h, c in UTILITY] + list(ATTACK_COLUMNS)
    found = []
    for variant in variants:
        rows_of = [rows for key, rows in all_units.items() if key[0] == variant and key[3] == split]
        if not rows_of:
            continue
        per_unit = []
        for rows in rows_of:
            f0 = metric(rows[0], forget_col)
            s = share / f0 if absolute and f0 > 0 else share
            per_unit.append(unit_values(rows, forget_col, s, [(h, c) for h, c, _ in columns]))
        reached = sum(not math.isnan(u[UTILITY[0][1]]) for u in per_unit)
        aucs = [curve_auc([metric(r, forget_col) for r in rows], [metric(r, "retain.fact_acc") for r in rows])
                for rows in rows_of]
        stats = {c: bootstrap_ci([u[c] for u in per_unit], n_boot) for _, c, _ in columns}
        found.append((variant, f"{reached}/{len(per_unit)}", stats, bootstrap_ci(aucs, n_boot), rows_of))
    kept = [(h, c, k) for h, c, k in columns
            if (h, c) in UTILITY or any(not math.isnan(metric(r, c)) for *_, rows_of in found
                                        for rows in rows_of for r in rows[1:])]
    head = ["Method", "reached"] + [h for h, _, _ in kept] + ["AUC (retain fact)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, reached, stats, auc, _ in found:
        cells = [_cell(stats[c], k) for _, c, k in kept]
        lines.append("| " + " | ".join([variant, reached] + cells + [_cell(auc)]) + " |")
    return "\n".join(lines) + "\n"


def gold_table(records: list[dict], splits: list[str], forget_col: str, n_boot: int) -> str:
    """The gold models (never trained on the forget people): what perfect unlearning would score."""
    cols = ((forget_col.replace("forget.", "Forget "), forget_col, 100), ("Retain fact", "retain.fact_acc", 100),
            ("MIA AUC", "mia.mia_auc_best", 100), ("Relearn", "relearn.recovery", 100),
            ("Relearned ACC", "relearn.acc_after", 100))
    lines = ["| split | n | " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for split in splits:
        rows = [r["row"] for r in records if r["settings"]["method"] == "gold" and r["settings"]["split"] == split]
        if rows:
            cells = [_cell(bootstrap_ci([metric(r, c) for r in rows], n_boot), k) for _, c, k in cols]
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
           f"- Forget ACC here is `{forget_col}`; utility columns are read where it reaches the target. "
           f"Cells: mean [95% bootstrap interval] over draws x seeds, in %; `reached` counts the units that got "
           f"there (the others have no value: not extrapolated).",
           f"- Hyper-parameters frozen before the test draws by one rule for every method: {SELECTION_RULE} "
           f"(AUC of retain.{s.utility_metric}).\n",
           "## Chosen hyper-parameters (validation draw)\n",
           "| Method | lr | lambda | AUC | candidates (lr, lambda: AUC) |", "|---|---|---|---|---|"]
    for method, pick in selection.items():
        cands = "; ".join(f"{c['lr']:g}, {c['lam']:g}: {c['auc']:.3f}" for c in pick["candidates"])
        out.append(f"| {METHOD_LABELS.get(method, method)} | {pick['lr']:g} | {pick['lam']:g} | {pick['auc']:.3f} | {cands} |")
    out += ["", "## Vanilla models (before unlearning)\n", _vanilla_table(records)]
    out += ["## Gold models (the vanilla recipe without the forget people: what perfect unlearning gives)\n",
            "Membership inference (MIA AUC: the attack furthest from chance; 50 = chance) and the relearning "
            "attack's recovery on these models are the targets: the main tables' MIA AUC should come down to "
            "this, their PrivLeak (relative to this AUC, same attack) to 0, and a relearn recovery above the "
            "gold model's is knowledge the unlearning hid rather than removed.\n",
            gold_table(records, s.splits, forget_col, s.n_boot)]
    paths = {"markdown": md_path}
    for split in s.splits:
        for share in (0.5, 0.25):
            out.append(f"## Main table: {split}, matched forgetting at {int(share * 100)}% of vanilla Forget ACC\n")
            out.append(matched_table(all_units, main_variants, split, forget_col, share, s.n_boot))
        png = curve_plot(all_units, main_variants, split, forget_col, img_dir / f"main-{split}.png",
                         f"Forgetting vs retain facts, {split} (mean over draws x seeds)")
        out.append(f"![main {split}]({img_dir.name}/{png.name})\n")
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
            out.append(matched_table(all_units, shown, split, forget_col, 0.5, s.n_boot))
            if group == "token_lambda":
                out.append("Retain fact accuracy where Forget ACC first reaches 10% (absolute):\n")
                out.append(matched_table(all_units, shown, split, forget_col, 0.10, s.n_boot, absolute=True))
                for v in shown:
                    out.append(f"- {v}: retain fact >= 90% at Forget ACC <= 10% in "
                               f"{share_above(all_units, v, split, forget_col, 0.10, 0.90)} draws.")
                out.append("")
            png = curve_plot(all_units, shown, split, forget_col, img_dir / f"{group}.png", title)
            out.append(f"![{group}]({img_dir.name}/{png.name})\n")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(out) + "\n")
    return paths
