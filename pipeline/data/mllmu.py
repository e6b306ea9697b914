"""MLLMU-Bench parquet files <-> `Profile` records.

The layout is the published dataset's: one folder per split
(`forget_10/train-00000-of-00001.parquet`, `Test_Set/...`), columns as
docs/DATA.md lists them, of which only `ID` and a picture are required: the
published variants (with or without `metadata`, Full_Set's `question`/`answer`,
MLLMMU/baseline_train_split's image + metadata) all read, as the authors'
readers read them (docs/REAL_BENCHMARKS.md section 2). The miniature benchmark
is written with the same writer and read back through the same reader, so the
loader is exercised on every demo run.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from .records import QA, ChoiceItem, Dropped, GenItem, Profile


SPLITS = ("forget_5", "forget_10", "forget_15", "retain_95", "retain_90", "retain_85",
          "Test_Set", "Retain_Set", "ft_Data", "Full_Set")
PARQUET_NAME = "train-00000-of-00001.parquet"
# Every split needs ID and a picture (`image`, or Test_Set's `images`); everything else is
# optional, as in the authors' readers: eval.py reads ID, image(s) and the three task
# columns; the training readers read image + metadata (data_process/data_preprocess.py).
REQUIRED_COLUMNS = ("ID",)
TASK_COLUMNS = ("Classification_Task", "Generation_Task", "Mask_Task")
# The published dataset repository also has Full_Set (all fictitious profiles: eval.py's
# few-shot source) and, separately, MLLMMU/baseline_train_split (training QA).
FULL_SPLIT = "Full_Set"


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


def split_files(root: str | Path, split: str) -> list[Path]:
    """Every parquet file of a split folder, in name order (the dataset repositories may shard a split)."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise DataError(f"split '{split}' not found: no folder {folder}")
    files = sorted(folder.glob("*.parquet")) or sorted(folder.rglob("*.parquet"))
    if not files:
        raise DataError(f"split '{split}' has no parquet file in {folder}")
    return files


def read_table(path: Path, required) -> pa.Table:
    """One parquet file, with its required columns checked (one-line errors naming the file)."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable parquet file ({first})") from None
    check_columns(path, table, required)
    return table


def check_columns(path: Path, table: pa.Table, required) -> None:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(table.column_names)})")


def check_image(data: bytes, where: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: image bytes are not a readable image ({type(exc).__name__})") from None


def image_bytes(value, where: str, check: bool = False) -> bytes:
    """Bytes of an HF `Image` cell: a {bytes, path} struct (path may be null) or raw bytes."""
    path = None
    if isinstance(value, dict):
        path = value.get("path")
        value = value.get("bytes")
    if not value:
        hint = f" (only a path, {path!r}: the parquet must embed the bytes)" if path else ""
        raise DataError(f"{where}: image has no bytes{hint}")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise DataError(f"{where}: image bytes have type {type(value).__name__}, not binary")
    data = bytes(value)
    if check:
        check_image(data, where)
    return data


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _options(value, where: str) -> dict[str, str]:
    """`Options` as published: a struct {A..D} (absent letters null), a map, a dict or a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: Options is a string but not JSON") from None
    if isinstance(value, list):          # a parquet map reads back as [(key, value), ...]
        value = dict(value)
    if not isinstance(value, dict):
        raise DataError(f"{where}: Options must map letters to texts, got {type(value).__name__}")
    options = {str(k).strip().upper(): _text(v) for k, v in value.items() if v is not None and _text(v)}
    if len(options) < 2:
        raise DataError(f"{where}: Options has {len(options)} non-empty option(s); need at least 2")
    return options


def _correct_letter(value, options: dict[str, str], where: str) -> str:
    """The letter of the right option; accepts "B", " b ", "B." or "B) text", or the option's text."""
    answer = _text(value)
    letter = answer[:1].upper()
    if letter in options and (len(answer) == 1 or not answer[1].isalnum()):
        return letter
    for key, text in options.items():
        if answer and answer.casefold() == text.casefold():
            return key
    raise DataError(f"{where}: answer {answer!r} is not one of the options {', '.join(sorted(options))}")


def _choices(items, kind: str, where: str) -> list[ChoiceItem]:
    out = []
    for i, c in enumerate(items or []):
        here = f"{where}: {kind} choice {i}"
        if not isinstance(c, dict) or "Question" not in c or "Options" not in c or "Correct_Answer" not in c:
            raise DataError(f"{here} lacks Question, Options or Correct_Answer")
        options = _options(c["Options"], here)
        out.append(ChoiceItem(_text(c["Question"]), options, _correct_letter(c["Correct_Answer"], options, here),
                              kind))
    return out


def _gen_items(items, column: str, where: str) -> list[GenItem]:
    out = []
    for i, g in enumerate(items or []):
        if not isinstance(g, dict) or "Question" not in g or "Ground_Truth" not in g:
            raise DataError(f"{where}: {column} item {i} lacks Question or Ground_Truth")
        out.append(GenItem(_text(g["Question"]), _text(g["Ground_Truth"]), _text(g.get("Type"))))
    return out


def _metadata(value, where: str, notes: list | None = None, empty: list | None = None) -> list[QA]:
    """`metadata`: a JSON string of [{Question, Answer, Fact?}] (one object alone is accepted too).

    As the authors' reader (data_process/data_preprocess.py, LLAVA_multimodal_Dataset.flatten_dataset)
    does, an entry without a non-empty Question and Answer is not a training QA: it is skipped
    (the split builders also append `Additional_question`/`Additional_answer` entries) and,
    when `notes` is given, one line per skip is added to it. `empty` collects (j, reason) of the
    skipped entries that were meant as a QA (they have a Question or Answer key, left empty):
    a bad item, where an Additional_* entry is only another kind of entry.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    try:
        meta = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: column metadata is not valid JSON ({exc.msg})") from None
    if isinstance(meta, dict):
        meta = [meta]
    if not isinstance(meta, list):
        raise DataError(f"{where}: column metadata must be a JSON list of {{Question, Answer}} objects")
    qa = []
    for j, m in enumerate(meta):
        if not isinstance(m, dict):
            raise DataError(f"{where}: column metadata item {j} is a {type(m).__name__}, not an object")
        question, answer = _text(m.get("Question")), _text(m.get("Answer"))
        if not question or not answer:
            missing = "Question" if not question else "Answer"
            if notes is not None:
                notes.append(f"{where}: metadata item {j} skipped (no {missing}; keys: {', '.join(sorted(m))})")
            if empty is not None and ("Question" in m or "Answer" in m):
                empty.append((j, f"{'empty' if missing in m else 'no'} {missing}"))
            continue
        qa.append(QA(question, answer, _text(m.get("Fact"))))
    return qa


def _training_qa(row: dict, where: str, notes: list | None, empty: list | None = None) -> list[QA]:
    """The training QA of a row: its `metadata` where that holds any, else its `question`/`answer` columns."""
    qa = _metadata(row.get("metadata"), where, notes, empty)
    if qa:
        return qa
    question, answer = _text(row.get("question")), _text(row.get("answer"))
    return [QA(question, answer)] if question and answer else []


def _drops(split: str, pid: str, qa: list[QA], empty: list, dropped: list | None) -> None:
    """Record a row's bad items (entries meant as QA but empty) or, with none and no QA at all, the row itself."""
    if dropped is None:
        return
    dropped += [Dropped(split, f"{pid}/metadata[{j}]", reason) for j, reason in empty]
    if not qa and not empty:
        dropped.append(Dropped(split, pid, "no training QA"))


def _profile(row: dict, where: str, check_images: bool, notes: list | None = None, split: str = "",
             dropped: list | None = None) -> Profile:
    if _text(row.get("ID")) == "":
        raise DataError(f"{where}: column ID is empty")
    images = [image_bytes(img, f"{where} images[{i}]", check_images) for i, img in enumerate(row.get("images") or [])]
    if row.get("image") is not None:
        image = image_bytes(row["image"], where, check_images)
    elif images:        # Test_Set: the person's pictures are all in `images`
        image = images[0]
    else:
        raise DataError(f"{where}: no image (neither column image nor images)")
    cls = row.get("Classification_Task") or {}
    empty: list = []
    qa = _training_qa(row, where, notes, empty)
    _drops(split, _text(row["ID"]), qa, empty, dropped)
    return Profile(
        id=_text(row["ID"]), image=image, biography=row.get("biography") or "",
        question=row.get("question") or "", answer=row.get("answer") or "",
        qa=qa,
        choices=_choices(cls.get("Image_Textual_Questions"), "image", where)
        + _choices(cls.get("Pure_Text_Questions"), "text", where),
        generation=_gen_items(row.get("Generation_Task"), "Generation_Task", where),
        cloze=_gen_items(row.get("Mask_Task"), "Mask_Task", where),
        directory=row.get("Directory") or "", images=images,
    )


def check_layout(path: Path, table: pa.Table) -> None:
    """ID and a picture (`image`, or `images` as in Test_Set) are the only columns every split needs."""
    check_columns(path, table, REQUIRED_COLUMNS)
    if "image" not in table.column_names and "images" not in table.column_names:
        raise DataError(f"{path}: missing column image (or images) (has: {', '.join(table.column_names)})")


def read_split(root: str | Path, split: str, check_images: bool = True, notes: list | None = None,
               dropped: list | None = None) -> list[Profile]:
    """Read one split (every parquet file of its folder); a malformed row fails naming the file, row and column.

    Accepted layouts (docs/REAL_BENCHMARKS.md): with or without `metadata`, with or without
    the task columns (a missing one reads as no items), Test_Set's `images`, Full_Set's
    `question`/`answer`. Skipped metadata entries are described in `notes` when given;
    `dropped` collects a records.Dropped per training item left out for its content
    (give it only for splits whose training QA are used: a Test_Set row has none by design).
    """
    files = split_files(root, split)
    # A read with no side outputs is remembered for this process: the demo's and the study's workers
    # evaluate run after run on the same splits (one split read 15-30 ms, 15 reads per evaluation).
    key = (files_signature(files), split, check_images) if notes is None and dropped is None else None
    if key is not None and key in _READ_MEMO:
        return list(_READ_MEMO[key])
    profiles = []
    for path in files:
        table = read_table(path, ())
        check_layout(path, table)
        for i, row in enumerate(table.to_pylist()):
            profiles.append(_profile(row, f"{path} row {i}", check_images, notes, split, dropped))
    if key is not None:
        if len(_READ_MEMO) >= _READ_MEMO_SIZE:
            _READ_MEMO.pop(next(iter(_READ_MEMO)))
        _READ_MEMO[key] = tuple(profiles)
    return profiles


# Profiles read, by (files_signature, split, check_images). Callers treat a Profile as read-only (they
# derive new ones with dataclasses.replace), so one read may serve every later caller of the process.
_READ_MEMO: dict = {}
_READ_MEMO_SIZE = 32


def files_signature(files) -> tuple:
    """(real path, size, mtime, inode) of each file: any rewrite of one changes it."""
    out = []
    for f in files:
        st = Path(f).stat()
        out.append((str(Path(f).resolve()), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def read_train_split(train_root: str | Path, split: str, check_images: bool = True,
                     notes: list | None = None, dropped: list | None = None) -> list[Profile]:
    """Training QA in the `MLLMMU/baseline_train_split` layout: <train_root>/<split>/*.parquet, image + metadata.

    The authors' baselines learn from these files (baselines/GA.py main: forget_N / retain_M
    folders, LLAVA_multimodal_Dataset over `image` and `metadata`). ID is optional there: a
    row without one gets `<split>/<row>`. Only the training QA are read.
    """
    profiles, n = [], 0
    for path in split_files(train_root, split):
        table = read_table(path, ("image", "metadata"))
        for i, row in enumerate(table.to_pylist()):
            where = f"{path} row {i}"
            pid = _text(row.get("ID")) or f"{split}/{n}"
            empty: list = []
            qa = _metadata(row.get("metadata"), where, notes, empty)
            if not qa and notes is not None:
                notes.append(f"{where}: no training QA in column metadata")
            _drops(split, pid, qa, empty, dropped)
            profiles.append(Profile(id=pid, image=image_bytes(row["image"], where, check_images),
                                    qa=qa))
            n += 1
    return profiles


def forget_ids(root: str | Path, split: str) -> set[str]:
    return {p.id for p in read_split(root, split, check_images=False)}
