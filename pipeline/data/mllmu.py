"""MLLMU-Bench parquet files <-> `Profile` records.

The layout is the published dataset's: one folder per split
(`forget_10/train-00000-of-00001.parquet`, `Test_Set/...`), columns exactly as
DESIGN.md 3.1 lists them. The miniature benchmark is written with the same
writer and read back through the same reader, so the loader is exercised on
every demo run.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from .records import QA, ChoiceItem, GenItem, Profile

SPLITS = ("forget_5", "forget_10", "forget_15", "retain_95", "retain_90", "retain_85",
          "Test_Set", "Retain_Set", "ft_Data")
PARQUET_NAME = "train-00000-of-00001.parquet"
REQUIRED_COLUMNS = ("image", "ID", "question", "answer", "Classification_Task",
                    "Generation_Task", "Mask_Task", "metadata")


class DataError(ValueError):
    """Bad benchmark input; the message is one line naming the file and row."""


_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_OPTIONS = pa.struct([(letter, pa.string()) for letter in "ABCD"])
_CHOICE = pa.struct([("Question", pa.string()), ("Options", _OPTIONS), ("Correct_Answer", pa.string())])
_GEN = pa.struct([("Question", pa.string()), ("Ground_Truth", pa.string()), ("Type", pa.string())])


def _schema(with_images: bool) -> pa.Schema:
    fields = [
        ("image", _IMAGE), ("ID", pa.string()), ("biography", pa.string()),
        ("question", pa.string()), ("answer", pa.string()),
        ("Classification_Task", pa.struct([("Image_Textual_Questions", pa.list_(_CHOICE)),
                                           ("Pure_Text_Questions", pa.list_(_CHOICE))])),
        ("Generation_Task", pa.list_(_GEN)), ("Mask_Task", pa.list_(_GEN)),
        ("metadata", pa.string()),
    ]
    if with_images:
        fields.append(("images", pa.list_(_IMAGE)))
    return pa.schema(fields)


def _row(p: Profile, with_images: bool) -> dict:
    def choice(c):
        return {"Question": c.question, "Options": {k: c.options[k] for k in "ABCD"},
                "Correct_Answer": c.correct}

    def gen(g):
        return {"Question": g.question, "Ground_Truth": g.ground_truth, "Type": g.kind}

    meta = [{"Question": q.question, "Answer": q.answer, **({"Fact": q.fact} if q.fact else {})}
            for q in p.qa]
    row = {
        "image": {"bytes": p.image, "path": f"{p.id}.png"},
        "ID": p.id, "biography": p.biography, "question": p.question, "answer": p.answer,
        "Classification_Task": {
            "Image_Textual_Questions": [choice(c) for c in p.choices if c.kind == "image"],
            "Pure_Text_Questions": [choice(c) for c in p.choices if c.kind == "text"],
        },
        "Generation_Task": [gen(g) for g in p.generation],
        "Mask_Task": [gen(g) for g in p.cloze],
        "metadata": json.dumps(meta, ensure_ascii=False),
    }
    if with_images:
        row["images"] = [{"bytes": b, "path": f"{p.id}-{i}.png"} for i, b in enumerate(p.images)]
    return row


def write_split(root: str | Path, split: str, profiles: list[Profile]) -> Path:
    """Write one split folder; deterministic bytes for deterministic input."""
    with_images = any(p.images for p in profiles)
    table = pa.Table.from_pylist([_row(p, with_images) for p in profiles], schema=_schema(with_images))
    path = Path(root) / split / PARQUET_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
    return path


def split_path(root: str | Path, split: str) -> Path:
    folder = Path(root) / split
    if not folder.is_dir():
        raise DataError(f"split '{split}' not found: no folder {folder}")
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DataError(f"split '{split}' has no parquet file in {folder}")
    return files[0]


def check_image(data: bytes, where: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{where}: image bytes are not a readable image ({type(exc).__name__})") from None


def _image_bytes(value, where: str) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes")
    if not value:
        raise DataError(f"{where}: image has no bytes")
    return bytes(value)


def _choices(items, kind: str, where: str) -> list[ChoiceItem]:
    out = []
    for i, c in enumerate(items or []):
        options = dict(c["Options"] or {})
        if c["Correct_Answer"] not in options:
            raise DataError(f"{where}: {kind} choice {i} has answer {c['Correct_Answer']!r} not among its options")
        out.append(ChoiceItem(c["Question"], options, c["Correct_Answer"], kind))
    return out


def _profile(row: dict, where: str, check_images: bool) -> Profile:
    image = _image_bytes(row["image"], where)
    if check_images:
        check_image(image, where)
    try:
        meta = json.loads(row["metadata"]) if row["metadata"] else []
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: metadata is not valid JSON ({exc.msg})") from None
    qa = []
    for j, m in enumerate(meta):
        answer = (m.get("Answer") or "").strip()
        if not answer:
            raise DataError(f"{where}: metadata item {j} has an empty answer")
        qa.append(QA(m["Question"], answer, m.get("Fact", "")))
    cls = row["Classification_Task"] or {}
    images = []
    for i, img in enumerate(row.get("images") or []):
        b = _image_bytes(img, f"{where} images[{i}]")
        if check_images:
            check_image(b, f"{where} images[{i}]")
        images.append(b)
    return Profile(
        id=str(row["ID"]), image=image, biography=row.get("biography") or "",
        question=row.get("question") or "", answer=row.get("answer") or "", qa=qa,
        choices=_choices(cls.get("Image_Textual_Questions"), "image", where)
        + _choices(cls.get("Pure_Text_Questions"), "text", where),
        generation=[GenItem(g["Question"], g["Ground_Truth"], g["Type"]) for g in row["Generation_Task"] or []],
        cloze=[GenItem(g["Question"], g["Ground_Truth"], g["Type"]) for g in row["Mask_Task"] or []],
        directory=row.get("Directory") or "", images=images,
    )


def read_split(root: str | Path, split: str, check_images: bool = True) -> list[Profile]:
    """Read one split; any malformed row fails with the file and row named."""
    path = split_path(root, split)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    profiles = []
    for i, row in enumerate(table.to_pylist()):
        profiles.append(_profile(row, f"{path} row {i}", check_images))
    return profiles


def forget_ids(root: str | Path, split: str) -> set[str]:
    return {p.id for p in read_split(root, split, check_images=False)}
