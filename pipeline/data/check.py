"""`viker data check ROOT`: what viker finds in a downloaded benchmark directory, before anything runs.

For every split folder: its rows and columns, which columns viker uses for
what, which columns it ignores, what it skips while reading (and why), and any
row it refuses. Then which required pieces are present. `check_root` returns
the report lines and whether every required piece is there and readable.
"""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq

from .clear import PERTURBED_COLUMNS, is_tofu_config, read_caption_rows, read_real_rows
from .loaders import default_splits
from .mllmu import DataError, read_split, read_train_split


MLLMU_USES = {
    "ID": "profile id (joins forget, Test_Set and Full_Set rows)",
    "image": "the person's picture",
    "images": "Test_Set: the person's other pictures (official: one drawn per item, or all)",
    "metadata": "training QA: its Question/Answer entries (others skipped)",
    "question": "training QA when metadata has none",
    "answer": "training QA when metadata has none",
    "Classification_Task": "multiple choice (Image_Textual / Pure_Text)",
    "Generation_Task": "generation (ROUGE, BLEU)",
    "Mask_Task": "cloze (fill in the blank)",
    "biography": "vocabulary of the model-free coherence score",
}
CLEAR_USES = {
    "image": "the picture (rows without one: text-only TOFU, skipped)",
    "caption": "the unlearning target / caption answer",
    "name": "the person (face-recognition answer; forget/retain disjointness)",
    "paraphrased_caption": "truth ratio: the paraphrase",
    "perturbed_captions": "truth ratio: the perturbed captions",
    "perturbed_names": "face recognition: the wrong names",
    "answer": "real sets: the right answer",
    "options": "real sets: the other options",
    "question": "real_world: the question (TOFU rows in +tofu configs: skipped)",
}
NOTES_SHOWN = 3


def split_folders(root: Path) -> list[Path]:
    """Folders under root holding parquet files, in name order."""
    return [d for d in sorted(root.iterdir()) if d.is_dir() and any(d.rglob("*.parquet"))]


def detect(root: Path, folders: list[Path]) -> str:
    names = {d.name for d in folders}
    if any(re.fullmatch(r"forget\d{2}(_perturbed|\+tofu)?", n) for n in names) or "real_faces" in names:
        return "clear"
    if names and all(_columns(d) <= {"image", "metadata", "ID"} for d in folders) and \
            any(re.fullmatch(r"(forget|retain)_\d+", n) for n in names):
        return "train_split"
    return "mllmu"


def _columns(folder: Path) -> set[str]:
    files = sorted(folder.rglob("*.parquet"))
    try:
        return set(pq.read_schema(files[0]).names)
    except Exception:         # an unreadable file is reported when the split is read
        return set()


def _rows(folder: Path) -> int:
    total = 0
    for f in sorted(folder.rglob("*.parquet")):
        try:
            total += pq.ParquetFile(f).metadata.num_rows
        except Exception:
            pass
    return total


def describe_split(root: Path, folder: Path, kind: str) -> tuple[list[str], bool]:
    """Report lines for one split and whether it read without error."""
    name = folder.name
    columns = sorted(_columns(folder))
    files = sorted(folder.rglob("*.parquet"))
    lines = [f"  {name}: {len(files)} file(s), {_rows(folder)} row(s); columns: {', '.join(columns)}"]
    uses = CLEAR_USES if kind == "clear" else MLLMU_USES
    used = [c for c in columns if c in uses]
    ignored = [c for c in columns if c not in uses]
    for c in used:
        lines.append(f"      {c:20s} {uses[c]}")
    if ignored:
        lines.append(f"      not used: {', '.join(ignored)}")
    notes: list[str] = []
    try:
        count = _read(root, name, kind, notes)
    except DataError as exc:
        lines.append(f"      ERROR: {exc}")
        return lines, False
    lines.append(f"      read: {count} record(s)")
    if notes:
        lines.append(f"      skipped: {len(notes)} entr{'y' if len(notes) == 1 else 'ies'}, e.g.")
        lines += [f"        {n}" for n in notes[:NOTES_SHOWN]]
    return lines, True


def _read(root: Path, name: str, kind: str, notes: list) -> int:
    if kind == "train_split":
        return len(read_train_split(root, name, notes=notes))
    if kind == "mllmu":
        return len(read_split(root, name, notes=notes))
    columns = _columns(root / name)
    if "caption" not in columns and {"answer", "options"} <= columns:
        return len(read_real_rows(root, name))
    return len(read_caption_rows(root, name, notes=notes))


def required_pieces(kind: str, names: set[str]) -> tuple[list[str], list[str]]:
    """(missing required pieces, missing optional pieces with what needs them)."""
    missing, optional = [], []
    if kind == "clear":
        forgets = sorted(n for n in names if re.fullmatch(r"forget\d{2}", n))
        if not forgets:
            missing.append("a forget config (forget01 / forget05 / forget10)")
        for f in forgets:
            retain = default_splits("clear", f)["retain"]
            if retain not in names:
                missing.append(f"{retain} (the retain config paired with {f})")
            if f"{f}_perturbed" not in names:
                optional.append(f"{f}_perturbed (truth ratio, Forget Quality)")
        if "real_faces" not in names:
            missing.append("real_faces (the real set)")
        if "retain_perturbed" not in names:
            optional.append("retain_perturbed (retain truth ratio)")
        if "real_world" not in names:
            optional.append("real_world (CLEAR's Real metric)")
        return missing, optional
    forgets = sorted(n for n in names if re.fullmatch(r"forget_\d+", n))
    if not forgets:
        missing.append("a forget split (forget_5 / forget_10 / forget_15)")
    for f in forgets:
        retain = default_splits("mllmu", f)["retain"]
        if retain not in names:
            missing.append(f"{retain} (the retain split paired with {f})")
    if kind == "train_split":
        return missing, optional
    for name, why in (("Test_Set", "the test set"), ("Retain_Set", "the real set")):
        if name not in names:
            missing.append(f"{name} ({why})")
    if "Full_Set" not in names:
        optional.append("Full_Set (few-shot examples of evaluate.protocol official; eval.py --few_shot_data)")
    if "ft_Data" not in names:
        optional.append("ft_Data (knowledge injection: viker finetune)")
    return missing, optional


def check_root(root, benchmark: str = "") -> tuple[list[str], bool]:
    """(report lines, ok): ok is False when a required piece is missing or a split does not read."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: not a directory"], False
    folders = split_folders(root)
    kind = benchmark or detect(root, folders)
    title = {"clear": "CLEAR", "mllmu": "MLLMU-Bench",
             "train_split": "MLLMU-Bench baseline_train_split (training QA: set data.train_root)"}[kind]
    lines = [f"{title} at {root}: {len(folders)} split folder(s)"]
    ok = True
    for folder in folders:
        split_lines, readable = describe_split(root, folder, kind)
        lines += split_lines
        ok = ok and readable
        if kind == "clear" and is_tofu_config(folder.name, _columns(folder)):
            lines.append("      +tofu config: picture rows only; TOFU's text-only QA are skipped")
        if kind == "clear" and folder.name.endswith("_perturbed") and \
                not set(PERTURBED_COLUMNS) <= _columns(folder):
            lines.append("      (a *_perturbed config without its perturbed columns)")
    missing, optional = required_pieces(kind, {d.name for d in folders})
    lines += [f"MISSING (required): {m}" for m in missing]
    lines += [f"missing (optional): {m}" for m in optional]
    ok = ok and not missing
    lines.append("OK: every required piece is present and readable" if ok else "FAILED: see MISSING / ERROR above")
    return lines, ok
