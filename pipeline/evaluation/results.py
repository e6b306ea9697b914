"""The results files every evaluation writes: a JSON-lines row per run, its CSV view, per-sample JSON lines.

Shared by evaluate.py (MLLMU-Bench) and clear_eval.py (CLEAR), below both, so
neither imports the other for them.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def read_jsonl(path) -> list[dict]:
    """Every row of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def append_result(results_path: Path, row: dict) -> Path:
    """Append one row to the JSON-lines results, then rewrite the CSV view (same name, .csv) from all rows."""
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with results_path.open("a") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    rows = read_jsonl(results_path)
    csv_path = results_path.with_suffix(".csv")
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    tmp.write_text(to_csv(rows))
    tmp.replace(csv_path)
    return csv_path


def to_csv(rows: list[dict]) -> str:
    flat = [flatten(r) for r in rows]
    columns = list(dict.fromkeys(key for r in flat for key in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return out.getvalue()


def flatten(row: dict, prefix: str = "") -> dict:
    """Nested dicts become dotted columns; `metrics` is dropped from names (forget.mc_acc, as report reads)."""
    flat = {}
    for key, value in row.items():
        name = prefix if key == "metrics" and not prefix else f"{prefix}{key}."
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name[:-1]] = json.dumps(value) if isinstance(value, list) else value
    return flat


def sample_row(set_name, profile_id, kind, question, reference, answer, scores, item_type=None) -> dict:
    """One line of a per-sample file: what was asked, expected, answered, and how it scored."""
    return {"set": set_name, "profile": profile_id, "kind": kind, "type": item_type, "question": question,
            "reference": reference, "answer": answer, "scores": scores}


def mean(values) -> float | None:
    """Mean of the values, None for none (a metric with no items)."""
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None
