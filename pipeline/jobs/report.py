"""Tables and plots from an evaluation results file (JSON lines, one row per run).

matplotlib is imported inside the plotting functions so that reading results
and building tables stays light.  Plots use a bare `Figure` rather than
pyplot, so no global backend or figure state is touched.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import pandas as pd

from pipeline.evaluation.metrics import BLEU_NOTE


METHOD_ORDER = ("Vanilla", "Gold", "GA", "GradDiff", "KL_Min", "NPO", "IdkPO", "ViKeR")
ID_COLUMNS = ("method", "forget_split", "budget", "setting")
# (table header, results column, what it measures) in the paper's column order.
TABLE_COLUMNS = (
    ("Forget ACC", "forget.mc_acc",
     "multiple-choice accuracy on the forget set (lower = more forgetting)"),
    ("Test ACC", "test.mc_acc",
     "multiple-choice accuracy on forget identities with unseen images/paraphrases "
     "(lower = forgetting generalises)"),
    ("Retain ROUGE", "retain.rougeL", "ROUGE-L F on retain-set generation (higher = utility kept)"),
    ("Retain BLEU", "retain.bleu", "BLEU on retain-set generation (higher = utility kept)"),
    ("Real ROUGE", "real.rougeL",
     "ROUGE-L F on real-celebrity generation (higher = world knowledge kept)"),
    ("Real BLEU", "real.bleu", "BLEU on real-celebrity generation (higher = world knowledge kept)"),
    # Fact accuracy next to ROUGE/BLEU: template answers keep a high ROUGE-L when the fact inside is
    # wrong (measured: retain ROUGE-L 96.6 while retain fact accuracy fell from 95.7% to 79.6%).
    ("Retain fact", "retain.fact_acc",
     "share of retain-set training facts the greedy answer still contains (higher = knowledge kept)"),
    ("Real fact", "real.fact_acc",
     "share of real-celebrity facts the greedy answer still contains (higher = world knowledge kept)"),
    ("Forget MC-LL", "forget.mc_ll_acc",
     "multiple-choice accuracy on the forget set by option likelihood (the option with the highest "
     "answer log-likelihood; lower = more forgetting; readable when the model never learned the MC format)"),
    ("Coherence", "forget.coherence",
     "share of forget-set answers judged coherent (higher = no gibberish)"),
    # Attacks (pipeline/evaluation/mia.py, pipeline/evaluation/relearn.py): n/a where they did not run. One
    # membership attack, declared before any run: min-k% (mia.FIXED_ATTACK); g is the gold model's AUC.
    ("MIA AUC (min-k)", "mia.mia_auc_min_k",
     "membership-inference ROC AUC of the min-k% attack (the mean of the k lowest answer-token log-probabilities, "
     "k = evaluate.mia_k, 0.4 by default; the attack declared before any run, as OpenUnlearning's privleak), "
     "forget QA (members) vs QA of people never trained on (non-members); 50 = chance. The Gold row's, read "
     "against chance, is g: the target the other rows' AUC should come down to"),
    ("PrivLeak viker (min-k)", "mia.privleak_min_k",
     "viker's convention, 100 x (AUC - g) / g, min-k%: 0 = like a model that never saw the forget people, "
     "> 0 = membership leaks, < 0 = over-unlearned; already a percentage; empty on the Gold row (undefined: "
     "it is the reference)"),
    ("PrivLeak OU (min-k)", "mia.privleak_ou_min_k",
     "OpenUnlearning's / MUSE's convention, 100 x (g - AUC) / (1 - g), min-k% (their privleak; opposite sign, "
     "< 0 = leaks, and relative to 1 - g: g = 60, AUC = 90 gives viker +50, OU -75), to set beside their "
     "published numbers; already a percentage; empty on the Gold row"),
    ("KL to gold", "gold_distance.kl_gold",
     "distance to the oracle: KL(gold || this model) on the forget QA's answer tokens, in nats, over the gold "
     "model's top-64 tokens plus one bucket for the rest (a lower bound of the full KL), mean over items "
     "(0 = answers like a model never trained on the forget people; pipeline/evaluation/oracle.py)"),
    ("KL to gold (key)", "gold_distance.kl_gold_key",
     "the same on the key tokens only: positions whose true token the gold model gives < 0.5 probability "
     "(what only the forget people's training made predictable: names, places, years)"),
    ("Relearn", "relearn.recovery",
     "relearning attack: Forget ACC on 90% of the forget QA after fine-tuning on the other 10%, / the vanilla "
     "model's (lower = more robust; the Gold row is what the 10% alone teaches)"),
    ("Relearn - gold", "relearn.recovery_minus_gold",
     "Relearn minus the Gold row's Relearn from the same results file and forget split (its mean over seeds), "
     "in points: what comes back beyond what the attacker's items alone teach a model that never knew the "
     "people (0 = like the gold model); empty on the Gold row"),
    ("Relearn worst - gold", "relearn.worst_recovery_minus_gold",
     "the worst (largest) recovery over the attacker grid (relearn.grid_lrs x relearn.grid_steps, "
     "relearn.worst_recovery) minus the Gold row's, paired the same way"),
    ("Relearn people - gold", "relearn.people_recovery_minus_gold",
     "attack on every QA of half the forget people, Forget ACC on the other half / the vanilla model's "
     "(relearn.people_recovery: no test item shares a person with the attacker's), minus the Gold row's, "
     "paired the same way"),
    # The attacks of evaluate.attacks (evaluation/logit_lens.py, probe.py, quantize.py), where they ran.
    ("Lens", "logit_lens.recovery",
     "logit-lens attack: the forget facts' top-1 rate read through the final norm and LM head at the best decoder "
     "layer before the output, / the vanilla model's at that layer (the attacker picks the layer: optimistic); "
     "the Gold row is the control"),
    ("Probe", "probe.mean_recovery",
     "probing attack: fact accuracy on the forget people's held-out portraits, cropped, noised and mirrored "
     "pictures and paraphrased questions, / the vanilla model's under the same probe, mean over the probes "
     "(declared before any run); the Gold row is the control"),
    ("Quant int4", "quantize.recovery_int4",
     "quantization attack: Forget ACC after int4 round-to-nearest of the merged weights / the vanilla model's "
     "int4 Forget ACC; the Gold row is the control"),
    # Last, after every result: the old MIA AUC column, kept to read old tables by, named so nobody uses it.
    ("MIA AUC best-of-4 (biased)", "mia.mia_auc_best_of_4_biased",
     "diagnostic only, not a result: the AUC of whichever of LOSS, zlib, min-k%, min-k%++ lies farthest from g "
     "in this row (the MIA AUC of tables before 2026-12-04); a per-row maximum, biased away from the gold model "
     "even under perfect unlearning (tests/test_mia.py simulates it), and the chosen attack "
     "(mia_best_of_4_attack) can change from row to row; empty on the Gold row (there it was read against "
     "chance)"),
)
# Columns already in percent (not x100 in the table).
PERCENT_COLUMNS = {"mia.privleak_min_k", "mia.privleak_ou_min_k"}
# Columns in nats: shown as they are, with two decimals (a KL of 0.04 is not 0.0).
NATS_COLUMNS = {"gold_distance.kl_gold", "gold_distance.kl_gold_key"}
# Left out of a table when no row has them (older results, attacks that did not run).
OPTIONAL_COLUMNS = {"mia.privleak_ou_min_k", "mia.mia_auc_best_of_4_biased", "relearn.recovery_minus_gold",
                    "gold_distance.kl_gold", "gold_distance.kl_gold_key",
                    "relearn.worst_recovery_minus_gold", "relearn.people_recovery_minus_gold",
                    "logit_lens.recovery", "probe.mean_recovery", "quantize.recovery_int4"}
# Relearning recoveries reported against the gold control of the same split.
PAIRED_WITH_GOLD = ("relearn.recovery", "relearn.worst_recovery", "relearn.people_recovery")
# Undefined on the Gold row, which is their reference: an empty cell there, never 0 (n/a = not measured).
GOLD_METHOD = "Gold"
UNDEFINED_FOR_GOLD = {"mia.privleak_min_k", "mia.privleak_ou_min_k", "mia.mia_auc_best_of_4_biased",
                      *NATS_COLUMNS,
                      *(column + "_minus_gold" for column in PAIRED_WITH_GOLD)}
TRADEOFF_X, TRADEOFF_Y = "forget.mc_acc", "retain.rougeL"
ACC_METRICS = {
    "mc_acc": "multiple-choice accuracy",
    # A tiny model without instruction tuning may not follow the MC prompt: the
    # share of facts its greedy answers still contain measures the same knowledge.
    "fact_acc": "attribute accuracy (greedy answer to the training question contains the fact)",
    "mc_ll_acc": "multiple-choice accuracy by option likelihood",
}


def table_columns(acc_metric: str = "mc_acc") -> tuple:
    """TABLE_COLUMNS with the ACC columns read from `acc_metric` (mc_acc or fact_acc)."""
    if acc_metric not in ACC_METRICS:
        raise ValueError(f"unknown ACC metric {acc_metric!r}; use one of {', '.join(ACC_METRICS)}")
    what = ACC_METRICS[acc_metric]
    columns = list(TABLE_COLUMNS)
    columns[0] = ("Forget ACC", f"forget.{acc_metric}", f"{what} on the forget set (lower = more forgetting)")
    columns[1] = ("Test ACC", f"test.{acc_metric}", f"{what} on forget identities with unseen images/paraphrases "
                  "(lower = forgetting generalises)")
    if acc_metric != "fact_acc":     # generalisation of forgetting, on facts too
        columns.insert(2, ("Test fact", "test.fact_acc", f"{ACC_METRICS['fact_acc']} on forget identities with "
                           "unseen images (lower = forgetting generalises)"))
    return tuple(columns)


# ---------------------------------------------------------------------- loading

def load_results(path) -> pd.DataFrame:
    """One flat row per run: ids, run metadata and `<set>.<metric>` floats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    rows = [
        _flatten(_parse_line(line, path, number))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if line.strip()
    ]
    if not rows:
        raise ValueError(f"results file is empty: {path}")
    return pd.DataFrame(rows)


def _parse_line(line: str, path: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: malformed JSON ({err.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("method"), str):
        raise ValueError(f"{path}:{number}: expected a JSON object with a 'method' string")
    if not isinstance(row.get("metrics", {}), dict):
        raise ValueError(f"{path}:{number}: 'metrics' must be an object")
    return row


def _flatten(row: dict) -> dict:
    flat = {key: value for key, value in row.items() if key not in ("metrics", "setting")}
    flat["setting"] = compact_setting(row.get("setting") or {})
    flat.setdefault("forget_split", "")
    flat["budget"] = _as_float(row.get("budget"))
    flat["seed"] = _as_float(row.get("seed"))
    for split, values in row.get("metrics", {}).items():
        for name, value in (values or {}).items():
            flat[f"{split}.{name}"] = _as_float(value)
    return flat


def compact_setting(setting: dict) -> str:
    return ",".join(f"{key}={setting[key]}" for key in sorted(setting))


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _method_rank(method: str) -> tuple:
    # Known methods in paper order (variants such as "ViKeR λ=0.05" or "ViKeR w/o GA" right
    # after their method), then any others alphabetically.
    base = method.split(" ")[0]
    if base in METHOD_ORDER:
        return (0, METHOD_ORDER.index(base), method)
    return (1, 0, method)


# ------------------------------------------------------------------------ table

def comparison_table(df: pd.DataFrame, acc_metric: str = "mc_acc") -> pd.DataFrame:
    """Paper-shaped table: one row per (method, split, budget, setting), seeds averaged.

    Cells are percentages with one decimal, "mean ± std" (sample std, ddof=1)
    when more than one seed has the metric, NaN when none has it; "" on the
    Gold row for what is undefined there (UNDEFINED_FOR_GOLD), even if a row has it.
    """
    rows = []
    df = paired_with_gold(df)
    for key, group in df.groupby(list(ID_COLUMNS), dropna=False, sort=False):
        row = dict(zip(("Method", "Split", "Budget", "Setting"), key))
        for header, column, _ in present_columns(df, acc_metric):
            values = group[column] if column in group else pd.Series(dtype=float)
            row[header] = "" if key[0] == GOLD_METHOD and column in UNDEFINED_FOR_GOLD else \
                _mean_std_cell(values, 1 if column in PERCENT_COLUMNS | NATS_COLUMNS else 100,
                               2 if column in NATS_COLUMNS else 1)
        row["n_seeds"] = len(group)
        rows.append(row)
    table = pd.DataFrame(rows)
    order = sorted(
        table.index,
        key=lambda i: (str(table.at[i, "Split"]), _method_rank(table.at[i, "Method"]),
                       _nan_last(table.at[i, "Budget"]), str(table.at[i, "Setting"])),
    )
    table = table.loc[order].reset_index(drop=True)
    table["Budget"] = table["Budget"].map(lambda b: "" if pd.isna(b) else f"{b:g}")
    return table


def paired_with_gold(df: pd.DataFrame) -> pd.DataFrame:
    """`<recovery>_minus_gold` columns: each row's recovery minus the Gold row's on the same forget split."""
    df = df.copy()
    gold = df[df["method"] == GOLD_METHOD]
    for column in PAIRED_WITH_GOLD:
        if column not in df:
            continue
        control = {split: values[column].dropna().mean() for split, values in gold.groupby("forget_split")
                   if column in values}
        df[column + "_minus_gold"] = [value - control.get(split, math.nan) if method != GOLD_METHOD else math.nan
                                      for value, split, method in zip(df[column], df["forget_split"], df["method"])]
    return df


def present_columns(df: pd.DataFrame, acc_metric: str = "mc_acc") -> tuple:
    """table_columns without the optional ones no row has."""
    return tuple(c for c in table_columns(acc_metric)
                 if c[1] not in OPTIONAL_COLUMNS or (c[1] in df and df[c[1]].notna().any()))


def _nan_last(value: float) -> tuple:
    return (1, 0.0) if pd.isna(value) else (0, float(value))


def _mean_std_cell(values: pd.Series, scale: float = 100, decimals: int = 1):
    values = values.dropna() * scale
    if values.empty:
        return math.nan
    if len(values) == 1:
        return f"{values.iloc[0]:.{decimals}f}"
    return f"{values.mean():.{decimals}f} ± {values.std(ddof=1):.{decimals}f}"


def to_markdown(table: pd.DataFrame) -> str:
    """GitHub-style markdown table; NaN shows as "n/a"."""
    headers = [str(column) for column in table.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for record in table.itertuples(index=False):
        lines.append("| " + " | ".join(_markdown_cell(value) for value in record) + " |")
    return "\n".join(lines) + "\n"


def _markdown_cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return str(value).replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------ plots

def tradeoff_plot(df: pd.DataFrame, path, acc_metric: str = "mc_acc") -> Path:
    """Forget ACC vs retain ROUGE-L, one curve per method through its budgets.

    Rows sharing a method and budget are pooled (mean, sample std as error
    bars), so filter `df` to one sweep first if several settings share a budget.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    x_column = table_columns(acc_metric)[0][1]
    points = _tradeoff_points(df, x_column)
    if points.empty:
        ax.text(0.5, 0.5, f"no rows with both {x_column} and {TRADEOFF_Y}",
                ha="center", va="center", transform=ax.transAxes)
    for curve, group in points.groupby("curve", sort=False):
        _draw_curve(ax, curve, group)
    kind = {"mc_acc": "MC", "mc_ll_acc": "MC (likelihood)"}.get(acc_metric, "attribute")
    ax.set_xlabel(f"Forget {kind} accuracy (%)  — lower = more forgetting")
    ax.set_ylabel("Retain ROUGE-L (%)  — higher = utility kept")
    ax.set_title("Forgetting vs utility (better: left and up)")
    ax.grid(alpha=0.3)
    if not points.empty:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def _tradeoff_points(df: pd.DataFrame, x_column: str = TRADEOFF_X) -> pd.DataFrame:
    """Mean and std of the two axes per (method, split, budget), in percent."""
    if x_column not in df or TRADEOFF_Y not in df:
        return pd.DataFrame(columns=["curve", "budget", "x", "y", "x_err", "y_err"])
    usable = df.dropna(subset=[x_column, TRADEOFF_Y])
    several_splits = usable["forget_split"].nunique() > 1
    points = []
    for (method, split, budget), group in usable.groupby(
        ["method", "forget_split", "budget"], dropna=False, sort=False
    ):
        x, y = group[x_column] * 100, group[TRADEOFF_Y] * 100
        points.append({
            "curve": f"{method} ({split})" if several_splits else method,
            "rank": _method_rank(method), "vanilla": method == "Vanilla", "budget": budget,
            "x": x.mean(), "y": y.mean(),
            "x_err": x.std(ddof=1) if len(x) > 1 else 0.0,
            "y_err": y.std(ddof=1) if len(y) > 1 else 0.0,
        })
    if not points:
        return pd.DataFrame(columns=["curve", "budget", "x", "y", "x_err", "y_err"])
    frame = pd.DataFrame(points)
    order = sorted(frame.index, key=lambda i: (frame.at[i, "rank"], frame.at[i, "curve"],
                                               _nan_last(frame.at[i, "budget"])))
    return frame.loc[order]


def _draw_curve(ax, curve: str, group: pd.DataFrame) -> None:
    vanilla = bool(group["vanilla"].iloc[0])
    style = dict(marker="*", markersize=16, linestyle="none", color="black") if vanilla \
        else dict(marker="o", linestyle="-")
    ax.errorbar(group["x"], group["y"], xerr=group["x_err"], yerr=group["y_err"],
                label=curve, capsize=3, **style)
    if vanilla:
        return
    for point in group.itertuples():
        if not pd.isna(point.budget):
            ax.annotate(f"{point.budget:g}", (point.x, point.y), textcoords="offset points",
                        xytext=(4, 4), fontsize="x-small")


def key_token_plot(examples: Sequence[tuple], path, max_chars: int = 60) -> Path:
    """Answers as rows of token boxes coloured by reference entropy.

    High-entropy (key) tokens such as names and places stand out from the
    low-entropy template tokens around them.  Long answers wrap at
    `max_chars` characters.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    boxes, labels = _layout_tokens(examples, max_chars)
    n_lines = max(box[0] for box in boxes) + 1
    top = max(box[5] for box in boxes)
    norm = Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)
    scalar = ScalarMappable(norm=norm, cmap="viridis")
    fig = Figure(figsize=(max(6.0, 0.13 * max_chars + 2), 0.45 * n_lines + 1.2))
    ax = fig.add_subplot()
    for line, x, width, _, text, entropy in boxes:
        color = scalar.to_rgba(entropy)
        ax.add_patch(Rectangle((x, -line - 0.4), width, 0.8, facecolor=color, edgecolor="white"))
        ax.text(x + width / 2, -line, text, ha="center", va="center", fontsize=7,
                color="white" if norm(entropy) < 0.6 else "black", parse_math=False)
    ax.set_xlim(0, max_chars + 2)
    ax.set_ylim(-n_lines + 0.4, 0.6)
    ax.set_yticks([-line for line in labels], list(labels.values()), fontsize=7)
    ax.set_xticks([])
    ax.set_title("Key tokens (high reference entropy) vs template tokens")
    fig.colorbar(scalar, ax=ax, label="reference entropy (nats)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def _layout_tokens(examples: Sequence[tuple], max_chars: int):
    """(line, x, width, sample, text, entropy) boxes and the first line of each sample."""
    if not examples:
        raise ValueError("key_token_plot needs at least one example")
    boxes, labels, line = [], {}, 0
    for sample_id, tokens, entropies in examples:
        if len(tokens) != len(entropies) or not tokens:
            raise ValueError(
                f"sample {sample_id!r}: {len(tokens)} tokens vs {len(entropies)} entropies")
        labels[line], x = str(sample_id), 0.0
        for token, entropy in zip(tokens, entropies):
            # SentencePiece/BPE space markers are noise in a picture of the answer.
            text = token.replace("▁", "").replace("Ġ", "").strip() or "␣"
            width = float(len(text) + 1)
            if x > 0 and x + width > max_chars:
                line, x = line + 1, 0.0
            boxes.append((line, x, width, sample_id, text, float(entropy)))
            x += width
        line += 1
    return boxes, labels


# ----------------------------------------------------------------------- report

def write_report(results_path, out_dir, key_token_examples=None, acc_metric: str = "mc_acc") -> dict[str, Path]:
    """table.md, table.csv, tradeoff.png and (with examples) key_tokens.png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = load_results(results_path)
    table = comparison_table(df, acc_metric)
    paths = {"markdown": out / "table.md", "csv": out / "table.csv",
             "tradeoff": out / "tradeoff.png"}
    paths["markdown"].write_text(_markdown_report(df, table, Path(results_path),
                                                  present_columns(paired_with_gold(df), acc_metric)))
    table.to_csv(paths["csv"], index=False)
    tradeoff_plot(df, paths["tradeoff"], acc_metric)
    if key_token_examples:
        paths["key_tokens"] = key_token_plot(key_token_examples, out / "key_tokens.png")
    return paths


def _markdown_report(df: pd.DataFrame, table: pd.DataFrame, source: Path, columns=TABLE_COLUMNS) -> str:
    legend = [f"- **{header}**: `{column}`, {meaning}." for header, column, meaning in columns]
    legend.append("- **n_seeds**: runs averaged; cells are % (x100), "
                  "mean ± sample std over seeds when several.")
    legend.append("- An empty cell is undefined (the Gold row's PrivLeak and paired columns: the Gold row is their "
                  "reference); n/a is not measured.")
    if "mia_attack" in df or "mia_k" in df:
        legend.append(f"- Membership attack of the rows: {_distinct_text(df, 'mia_attack', 'not recorded')}, "
                      f"k = {_distinct_text(df, 'mia_k', 'not recorded')}.")
    legend.append(f"- Coherence is {_distinct_text(df, 'coherence_kind', 'not recorded')}.")
    legend.append(f"- {_distinct_text(df, 'bleu_note', BLEU_NOTE)}")
    return (f"# Unlearning results\n\nSource: `{source}`\n\n{to_markdown(table)}\n"
            "## Legend\n\n" + "\n".join(legend) + "\n")


def _distinct_text(df: pd.DataFrame, column: str, fallback: str) -> str:
    present = df[column].dropna().unique() if column in df else []
    values = [value for value in present if str(value).strip()]
    return "; ".join(map(str, values)) if values else fallback
