"""Report tests on a small hand-built results file."""
import json
import math

import matplotlib.image
import pandas as pd
import pytest

from pipeline.evaluation.metrics import BLEU_NOTE
from pipeline.jobs.report import (_tradeoff_points, comparison_table, key_token_plot, load_results, to_markdown,
                                  write_report)

COHERENCE_KIND = "model-free coherence (test)"
# GA forget accuracy per (budget, seed); budget 10 averages to 55.0 with sample std 7.1
GA_FORGET = {(5, 0): 0.70, (5, 1): 0.74, (10, 0): 0.50, (10, 1): 0.60, (20, 0): 0.30, (20, 1): 0.20}


def _row(method, budget, seed, forget_acc, retain_rouge, **extra_metrics):
    metrics = {
        "forget": {"mc_acc": forget_acc, "coherence": 0.9},
        "test": {"mc_acc": forget_acc + 0.05},
        "retain": {"rougeL": retain_rouge, "bleu": retain_rouge / 2},
        "real": {"rougeL": 0.5, "bleu": 0.25},
    }
    for key, value in extra_metrics.items():
        split, name = key.split("__")
        metrics[split][name] = value
    return {
        "method": method, "forget_split": "forget_10", "budget": budget, "seed": seed,
        "setting": {} if method == "Vanilla" else {"steps": budget, "lr": 0.001, "lam": 0.5},
        "model": "cache/models/vanilla", "cache_fingerprint": "ab12",
        "coherence_kind": COHERENCE_KIND, "bleu_note": BLEU_NOTE, "metrics": metrics,
    }


def _rows():
    # ViKeR and a shuffled GA come first so that ordering is the code's, not the file's.
    rows = [_row("ViKeR", b, 0, 0.8 - b / 40, 0.6) for b in (20, 5, 10)]
    rows[0]["metrics"]["real"].pop("bleu")  # ViKeR budget 20 lacks Real BLEU
    rows += [_row("GA", b, s, acc, 0.5 - b / 100) for (b, s), acc in reversed(GA_FORGET.items())]
    rows.append(_row("Vanilla", 0, 0, 0.82, 0.62))
    return rows


@pytest.fixture
def results_path(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in _rows()) + "\n\n")
    return path


# ---------------------------------------------------------------------- loading

def test_load_results_flattens(results_path):
    df = load_results(results_path)
    assert len(df) == 10
    vanilla = df[df["method"] == "Vanilla"].iloc[0]
    assert vanilla["forget.mc_acc"] == pytest.approx(0.82)
    assert vanilla["setting"] == ""
    ga = df[(df["method"] == "GA") & (df["budget"] == 10)]
    assert set(ga["setting"]) == {"lam=0.5,lr=0.001,steps=10"}
    assert math.isnan(df[(df["method"] == "ViKeR") & (df["budget"] == 20)]["real.bleu"].iloc[0])


def test_load_results_names_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_row("GA", 5, 0, 0.5, 0.5)) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        load_results(path)


def test_load_results_rejects_rows_without_method(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r"r\.jsonl:1:"):
        load_results(path)


def test_load_results_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_results(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty"):
        load_results(empty)


# ------------------------------------------------------------------------ table

def test_comparison_table_order_and_means(results_path):
    table = comparison_table(load_results(results_path))
    assert list(zip(table["Method"], table["Budget"])) == [
        ("Vanilla", "0"), ("GA", "5"), ("GA", "10"), ("GA", "20"),
        ("ViKeR", "5"), ("ViKeR", "10"), ("ViKeR", "20"),
    ]
    ga10 = table[(table["Method"] == "GA") & (table["Budget"] == "10")].iloc[0]
    # mean(50, 60) = 55.0; sample std = sqrt(((50-55)^2 + (60-55)^2) / 1) = 7.07
    assert ga10["Forget ACC"] == "55.0 ± 7.1"
    assert ga10["Retain ROUGE"] == "40.0 ± 0.0"
    assert ga10["n_seeds"] == 2
    viker5 = table[(table["Method"] == "ViKeR") & (table["Budget"] == "5")].iloc[0]
    assert viker5["Forget ACC"] == "67.5"  # one seed: no ± part
    assert viker5["n_seeds"] == 1
    viker20 = table[(table["Method"] == "ViKeR") & (table["Budget"] == "20")].iloc[0]
    assert pd.isna(viker20["Real BLEU"])


def test_unknown_methods_follow_known_ones_alphabetically():
    rows = [_row(m, 5, 0, 0.5, 0.5) for m in ("Zeta", "NPO", "Alpha", "Vanilla", "ViKeR", "GA")]
    df = pd.DataFrame([{"method": r["method"], "forget_split": "f", "budget": 5.0,
                        "setting": "", "forget.mc_acc": 0.5} for r in rows])
    assert list(comparison_table(df)["Method"]) == ["Vanilla", "GA", "NPO", "ViKeR", "Alpha", "Zeta"]


def test_to_markdown_renders_nan_and_escapes_pipes():
    table = pd.DataFrame({"Method": ["GA", "a|b"], "Forget ACC": ["55.0", math.nan]})
    assert to_markdown(table) == (
        "| Method | Forget ACC |\n"
        "|---|---|\n"
        "| GA | 55.0 |\n"
        "| a\\|b | n/a |\n"
    )


# ------------------------------------------------------------------------ plots

def test_tradeoff_points_follow_budgets_with_seed_means(results_path):
    points = _tradeoff_points(load_results(results_path))
    ga = points[points["curve"] == "GA"]
    assert list(ga["budget"]) == [5.0, 10.0, 20.0]
    assert list(ga["x"]) == pytest.approx([72.0, 55.0, 25.0])
    assert ga["x_err"].iloc[1] == pytest.approx(math.sqrt(50))
    assert list(points["curve"].unique()) == ["Vanilla", "GA", "ViKeR"]


def _assert_image(path):
    assert path.exists() and path.stat().st_size > 0
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0


def test_key_token_plot_checks_lengths(tmp_path):
    with pytest.raises(ValueError, match="s1"):
        key_token_plot([("s1", ["a", "b"], [0.1])], tmp_path / "k.png")
    with pytest.raises(ValueError):
        key_token_plot([], tmp_path / "k.png")


# ----------------------------------------------------------------------- report

def test_write_report_end_to_end(results_path, tmp_path):
    examples = [
        ("forget_3", ["▁She", "▁was", "▁born", "▁in", "▁Lisbon", "."],
         [0.1, 0.05, 0.2, 0.1, 3.2, 0.01]),
        # "$" would start mathtext if not escaped; x3 forces line wrapping
        ("forget_7", ["He", " works", " as", " a", " $", "marine", " biologist"] * 3,
         [0.2, 0.1, 0.1, 0.1, 0.5, 2.5, 2.9] * 3),
    ]
    out = tmp_path / "report"
    paths = write_report(results_path, out, key_token_examples=examples)
    assert set(paths) == {"markdown", "csv", "tradeoff", "key_tokens"}

    markdown = paths["markdown"].read_text()
    rows = [line for line in markdown.splitlines()
            if line.startswith("| ") and "Method" not in line]
    assert [line.split(" | ")[0] for line in rows] == ["| Vanilla"] + ["| GA"] * 3 + ["| ViKeR"] * 3
    assert "55.0 ± 7.1" in rows[2]
    assert COHERENCE_KIND in markdown and BLEU_NOTE in markdown
    assert "forget.mc_acc" in markdown

    csv = pd.read_csv(paths["csv"])
    assert len(csv) == 7 and csv["n_seeds"].tolist() == [1, 2, 2, 2, 1, 1, 1]

    _assert_image(paths["tradeoff"])
    _assert_image(paths["key_tokens"])


def test_write_report_without_examples_skips_key_tokens(results_path, tmp_path):
    paths = write_report(results_path, tmp_path / "r")
    assert "key_tokens" not in paths and not (tmp_path / "r" / "key_tokens.png").exists()


def test_metrics_and_report_stay_free_of_torch():
    import subprocess
    import sys

    code = ("import sys, pipeline.evaluation.metrics, pipeline.jobs.report; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_acc_metric_switches_the_acc_columns(tmp_path):
    from pipeline.jobs import report
    import json
    rows = [{"method": "Vanilla", "forget_split": "forget_10", "budget": 0, "seed": 0,
             "metrics": {"forget": {"mc_acc": 0.25, "fact_acc": 1.0, "rougeL": 0.9},
                         "retain": {"rougeL": 0.9}}},
            {"method": "GA", "forget_split": "forget_10", "budget": 4, "seed": 0,
             "metrics": {"forget": {"mc_acc": 0.25, "fact_acc": 0.5, "rougeL": 0.5},
                         "retain": {"rougeL": 0.8}}}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = report.load_results(path)
    assert list(report.comparison_table(df, "fact_acc")["Forget ACC"]) == ["100.0", "50.0"]
    assert list(report.comparison_table(df)["Forget ACC"]) == ["25.0", "25.0"]
    paths = report.write_report(path, tmp_path / "out", acc_metric="fact_acc")
    assert "forget.fact_acc" in paths["markdown"].read_text()
    with pytest.raises(ValueError, match="unknown ACC metric"):
        report.comparison_table(df, "nope")


def test_method_variants_sort_after_their_method():
    from pipeline.jobs.report import _method_rank
    names = ["ViKeR λ=0.5", "Zeta", "GA", "ViKeR λ=0.05", "Vanilla", "NPO"]
    assert sorted(names, key=_method_rank) == ["Vanilla", "GA", "NPO", "ViKeR λ=0.05", "ViKeR λ=0.5", "Zeta"]


def _attack_row(method, budget, mia, split="forget_10", seed=0, **relearn):
    metrics = {"forget": {"mc_acc": 0.5}, "mia": mia}
    if relearn:
        metrics["relearn"] = relearn
    return {"method": method, "forget_split": split, "budget": budget, "seed": seed, "metrics": metrics,
            "mia_attack": "min_k", "mia_k": 0.4}


def _attack_results(tmp_path, rows):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_attack_columns_fixed_min_k_both_conventions_and_relearning_against_gold(tmp_path):
    """The MIA columns are the pre-declared min-k% attack in both PrivLeak conventions; Relearn is paired with Gold."""
    gold_mia = {"mia_auc_min_k": 0.45, "mia_auc_best_of_4_biased": 0.40}
    ga_mia = {"mia_auc_min_k": 0.9, "privleak_min_k": 100.0, "privleak_ou_min_k": -81.8,
              "mia_auc_best_of_4_biased": 0.95}
    rows = [_attack_row("Gold", 0, gold_mia, recovery=0.05, worst_recovery=0.15),
            _attack_row("GA", 8, ga_mia, recovery=0.35, worst_recovery=0.45),
            _attack_row("GA", 4, ga_mia)]
    table = comparison_table(load_results(_attack_results(tmp_path, rows)))
    attack = ["MIA AUC (min-k)", "PrivLeak viker (min-k)", "PrivLeak OU (min-k)", "Relearn", "Relearn - gold",
              "Relearn worst - gold", "MIA AUC best-of-4 (biased)"]
    assert list(table.columns)[-len(attack) - 1:] == attack + ["n_seeds"], "the biased diagnostic comes last"
    assert "Relearn people - gold" not in table.columns, "a column no row has is left out"
    by = {(r["Method"], r["Budget"]): r for r in table.to_dict("records")}
    ga, gold = by[("GA", "8")], by[("Gold", "0")]
    assert ga["MIA AUC (min-k)"] == "90.0" and ga["PrivLeak viker (min-k)"] == "100.0"   # % already: not x100
    assert ga["PrivLeak OU (min-k)"] == "-81.8" and ga["MIA AUC best-of-4 (biased)"] == "95.0"
    # Paired with the Gold row of the same split: 35 - 5 and 45 - 15 points; the raw recovery stays.
    assert ga["Relearn"] == "35.0" and ga["Relearn - gold"] == "30.0" and ga["Relearn worst - gold"] == "30.0"
    assert math.isnan(by[("GA", "4")]["Relearn - gold"]), "no attack on the row: n/a"
    # The Gold row: its AUC (against chance) is shown; what is undefined for it is empty, not 0 and not n/a.
    assert gold["MIA AUC (min-k)"] == "45.0" and gold["Relearn"] == "5.0"
    for header in ("PrivLeak viker (min-k)", "PrivLeak OU (min-k)", "Relearn - gold", "Relearn worst - gold",
                   "MIA AUC best-of-4 (biased)"):
        assert gold[header] == "", header
    gold_line = next(line for line in to_markdown(table).splitlines() if line.startswith("| Gold |"))
    assert gold_line.endswith("| 45.0 |  |  | 5.0 |  |  |  | 1 |"), gold_line


def test_gold_row_privleak_is_empty_even_when_the_row_has_one(tmp_path):
    """A gold model evaluated against itself records PrivLeak 0: the table still leaves it empty."""
    rows = [_attack_row("Gold", 0, {"mia_auc_min_k": 0.5, "privleak_min_k": 0.0, "privleak_ou_min_k": 0.0}),
            _attack_row("GA", 8, {"mia_auc_min_k": 0.75, "privleak_min_k": 50.0, "privleak_ou_min_k": -50.0})]
    by = {r["Method"]: r for r in comparison_table(load_results(_attack_results(tmp_path, rows))).to_dict("records")}
    assert by["Gold"]["PrivLeak viker (min-k)"] == "" and by["Gold"]["PrivLeak OU (min-k)"] == ""
    assert by["GA"]["PrivLeak viker (min-k)"] == "50.0" and by["GA"]["PrivLeak OU (min-k)"] == "-50.0"
    assert "MIA AUC best-of-4 (biased)" not in by["GA"], "an optional column no row has is left out"


def test_relearn_paired_with_the_gold_row_of_the_same_split_over_its_seeds(tmp_path):
    """worst_recovery and people_recovery are paired like recovery: gold mean over seeds, per forget split."""
    rows = [_attack_row("Gold", 0, {"mia_auc_min_k": 0.5}, seed=s, recovery=r, worst_recovery=r + 0.1,
                        people_recovery=r + 0.2) for s, r in ((0, 0.0), (1, 0.2))]
    rows += [_attack_row("Gold", 0, {"mia_auc_min_k": 0.5}, split="forget_5", recovery=0.5, people_recovery=0.5),
             _attack_row("NPO", 8, {"mia_auc_min_k": 0.8}, recovery=0.4, worst_recovery=0.6, people_recovery=0.7),
             _attack_row("NPO", 8, {"mia_auc_min_k": 0.8}, split="forget_5", recovery=0.6, people_recovery=0.6),
             _attack_row("NPO", 8, {"mia_auc_min_k": 0.8}, split="forget_1", recovery=0.6)]
    table = comparison_table(load_results(_attack_results(tmp_path, rows)))
    by = {(r["Method"], r["Split"]): r for r in table.to_dict("records")}
    npo = by[("NPO", "forget_10")]
    # Gold on forget_10: recovery 10 (mean of 0 and 20), worst 20, people 30.
    assert (npo["Relearn"], npo["Relearn - gold"], npo["Relearn worst - gold"], npo["Relearn people - gold"]) == \
        ("40.0", "30.0", "40.0", "40.0")
    assert by[("NPO", "forget_5")]["Relearn - gold"] == "10.0" and by[("NPO", "forget_5")]["Relearn people - gold"] \
        == "10.0" and math.isnan(by[("NPO", "forget_5")]["Relearn worst - gold"]), "the split's own Gold row"
    assert math.isnan(by[("NPO", "forget_1")]["Relearn - gold"]), "no Gold row for the split: n/a"
    assert by[("Gold", "forget_10")]["Relearn"] == "10.0 ± 14.1" and by[("Gold", "forget_10")]["Relearn - gold"] == ""


def test_legend_defines_the_attack_columns(tmp_path):
    """The Legend spells out the fixed attack, both PrivLeak formulas, the pairing and the biased diagnostic."""
    rows = [_attack_row("Gold", 0, {"mia_auc_min_k": 0.45, "mia_auc_best_of_4_biased": 0.4}, recovery=0.05,
                        people_recovery=0.1),
            _attack_row("GA", 8, {"mia_auc_min_k": 0.9, "privleak_min_k": 100.0, "privleak_ou_min_k": -81.8,
                                  "mia_auc_best_of_4_biased": 0.95}, recovery=0.35, people_recovery=0.3)]
    text = write_report(_attack_results(tmp_path, rows), tmp_path / "out")["markdown"].read_text()
    legend = text.split("## Legend")[1]
    assert "| MIA AUC (min-k) | PrivLeak viker (min-k) | PrivLeak OU (min-k) | Relearn | Relearn - gold | " \
           "Relearn people - gold | MIA AUC best-of-4 (biased) | n_seeds |" in text
    assert "- **MIA AUC (min-k)**: `mia.mia_auc_min_k`, membership-inference ROC AUC of the min-k% attack" in legend
    assert "k = evaluate.mia_k, 0.4 by default" in legend and "read against chance, is g" in legend
    assert "- **PrivLeak viker (min-k)**: `mia.privleak_min_k`, viker's convention, 100 x (AUC - g) / g" in legend
    assert "- **PrivLeak OU (min-k)**: `mia.privleak_ou_min_k`, OpenUnlearning's / MUSE's convention, " \
           "100 x (g - AUC) / (1 - g)" in legend and "g = 60, AUC = 90 gives viker +50, OU -75" in legend
    assert "- **Relearn - gold**: `relearn.recovery_minus_gold`, Relearn minus the Gold row's Relearn from the " \
           "same results file and forget split" in legend
    assert "- **Relearn people - gold**:" in legend and "Relearn worst - gold" not in legend
    assert "- **MIA AUC best-of-4 (biased)**: `mia.mia_auc_best_of_4_biased`, diagnostic only, not a result" in legend
    assert "An empty cell is undefined" in legend and "n/a is not measured" in legend
    assert "- Membership attack of the rows: min_k, k = 0.4." in legend
