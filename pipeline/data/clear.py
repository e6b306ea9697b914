"""CLEAR (HF `therem/CLEAR`, Dontsov et al. 2024) parquet files -> records.

Layout: one folder per dataset config, as the dataset repository holds them
(`<root>/forget10/train-00000-of-00001.parquet`; every `*.parquet` of the
folder is read, in name order). Columns, exactly as published:

    forget01/05/10, retain99/95/90    image {bytes, path}, caption, name
    forget10_perturbed, retain_perturbed
                                      + perturbed_captions (list), paraphrased_caption, perturbed_names (list)
    real_faces                        image, answer, options (list of wrong names)
    real_world                        image, question, answer, options (read like real_faces)

A CLEAR row is one picture of one (fictitious) person with its caption. For
the rest of viker it becomes one `Profile` with one training QA:

    Profile(id=f"{name}/{row}", image, qa=[QA(CAPTION_QUESTION, caption, fact=name)])

so stage one and stage two run on CLEAR unchanged: the unlearning target is
the caption given the picture. The row number counts over the config's files
in order, so an id is stable as long as the published files are.

CAPTION_QUESTION: CLEAR's authors ask for the caption with a question drawn at
random from nine phrasings ("What can you see in this picture?", ...,
"Describe the image in detail.", ...). viker fixes one of them, so that the
stage-one cache (keyed on the exact tokens) and every evaluation are
deterministic. NAME_QUESTION is the face-recognition question of the
MLLMU-style adaptation of CLEAR used by later MLLM-unlearning work.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .mllmu import DataError, image_bytes, read_table, split_files
from .records import QA, ChoiceItem, Profile


CAPTION_QUESTION = "Describe the image in detail."
NAME_QUESTION = "What is the name of the person in the image?"

CONFIGS = ("forget01", "forget05", "forget10", "retain99", "retain95", "retain90",
           "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
           "real_faces", "real_world", "forget01+tofu", "forget05+tofu", "forget10+tofu", "retain99+tofu",
           "retain95+tofu", "retain90+tofu", "full+tofu")
CAPTION_COLUMNS = ("image", "caption", "name")
PERTURBED_COLUMNS = ("perturbed_captions", "paraphrased_caption", "perturbed_names")
REAL_COLUMNS = ("image", "answer", "options")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class CaptionRow:
    """One forget/retain row; the perturbed fields are empty where the config has none."""
    row: int                       # position in the config (over its files, in order)
    image: bytes
    caption: str
    name: str
    paraphrased_caption: str = ""
    perturbed_captions: list[str] = field(default_factory=list)
    perturbed_names: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.name}/{self.row}"


@dataclass
class RealRow:
    """One real_faces (or real_world) row: the right answer and the wrong options, as published."""
    row: int
    image: bytes
    answer: str
    options: list[str]             # wrong answers (the right one is added if absent, see choices())
    question: str = NAME_QUESTION

    @property
    def id(self) -> str:
        return f"{self.answer}/{self.row}"

    def choices(self) -> tuple[dict[str, str], str]:
        """({letter: option}, right letter): the answer inserted among the options at a position fixed
        by (row, answer), so every run and every model sees the same letters."""
        wrong = [o for o in self.options if o.casefold() != self.answer.casefold()]
        at = zlib.crc32(f"{self.row}:{self.answer}".encode()) % (len(wrong) + 1)
        ordered = wrong[:at] + [self.answer] + wrong[at:]
        if len(ordered) > len(LETTERS):
            raise DataError(f"real row {self.row}: {len(ordered)} options, more than {len(LETTERS)} letters")
        return dict(zip(LETTERS, ordered)), LETTERS[at]


# ------------------------------------------------------------------ reading

def _rows(root, config: str, required):
    """(file, row in file, row in config, cell dict) over the config's files."""
    n = 0
    for path in split_files(root, config):
        table = read_table(path, required)
        for i, row in enumerate(table.to_pylist()):
            yield path, i, n, row
            n += 1


def _columns(root, config: str) -> list[str]:
    path = split_files(root, config)[0]
    try:
        return pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable parquet file ({first})") from None


def _text(value, what: str, where: str, required: bool = True) -> str:
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    text = (value or "").strip()
    if required and not text:
        raise DataError(f"{where}: empty {what}")
    return text


def _texts(value, what: str, where: str, allow_empty: bool = False) -> list[str]:
    if value is None:
        if allow_empty:
            return []
        raise DataError(f"{where}: {what} is null")
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: {what} must be a list of strings, got {type(value).__name__}")
    texts = [_text(v, f"{what}[{j}]", where) for j, v in enumerate(value)]
    if not texts and not allow_empty:
        raise DataError(f"{where}: {what} is empty")
    return texts


def is_tofu_config(config: str, columns) -> bool:
    """A `+tofu` config (forget10+tofu, ...): CLEAR's captions mixed with TOFU's text-only QA, no `name` column."""
    return "+tofu" in config or ("name" not in columns and "question" in columns and "caption" in columns)


def read_caption_rows(root, config: str, check_images: bool = True, notes: list | None = None) -> list[CaptionRow]:
    """A forget/retain config (perturbed or not); the perturbed fields are read where present.

    Perturbed rows whose lists are empty are kept without a truth ratio (noted).
    `+tofu` configs (no `name`; TOFU rows have no image, mm/dataset.py MMMixedDataset)
    give their picture rows, named by row; their text-only TOFU rows are skipped and
    noted: viker's stages need a picture for every sample.
    """
    columns = _columns(root, config)
    tofu = is_tofu_config(config, columns)
    perturbed = all(c in columns for c in PERTURBED_COLUMNS) or config.endswith("_perturbed")
    required = ("image", "caption") if tofu else CAPTION_COLUMNS + (PERTURBED_COLUMNS if perturbed else ())
    rows = []
    for path, i, n, cells in _rows(root, config, required):
        where = f"{path} row {i}"
        if tofu and cells.get("image") is None:
            if notes is not None:
                notes.append(f"{where}: text-only TOFU row skipped (no image)")
            continue
        name = _text(cells.get("name"), "name", where, required=False) if tofu else _text(cells["name"], "name", where)
        row = CaptionRow(n, image_bytes(cells["image"], where, check_images),
                         _text(cells["caption"], "caption", where), name or f"{config}-{n}")
        if perturbed and not tofu:
            row.paraphrased_caption = _text(cells["paraphrased_caption"], "paraphrased_caption", where)
            row.perturbed_captions = _texts(cells["perturbed_captions"], "perturbed_captions", where, True)
            row.perturbed_names = _texts(cells["perturbed_names"], "perturbed_names", where, True)
            if notes is not None and not (row.perturbed_captions and row.perturbed_names):
                notes.append(f"{where}: empty perturbed list(s): no truth ratio for this row")
        rows.append(row)
    return rows


def read_real_rows(root, config: str = "real_faces", check_images: bool = True) -> list[RealRow]:
    rows = []
    for path, i, n, cells in _rows(root, config, REAL_COLUMNS):
        where = f"{path} row {i}"
        question = _text(cells.get("question"), "question", where, required=False) or NAME_QUESTION
        rows.append(RealRow(n, image_bytes(cells["image"], where, check_images),
                            _text(cells["answer"], "answer", where), _texts(cells["options"], "options", where),
                            question))
    return rows


def is_real_config(root, config: str) -> bool:
    columns = _columns(root, config)
    return "caption" not in columns and all(c in columns for c in ("answer", "options"))


# ------------------------------------------------------------------ records

def caption_profile(row: CaptionRow) -> Profile:
    return Profile(id=row.id, image=row.image, answer=row.caption,
                   qa=[QA(CAPTION_QUESTION, row.caption, fact=row.name)])


def real_profile(row: RealRow) -> Profile:
    """A real person: the name question as training QA (knowledge injection) and as one multiple choice."""
    options, letter = row.choices()
    return Profile(id=row.id, image=row.image, question=row.question, answer=row.answer,
                   qa=[QA(row.question, row.answer, fact=row.answer)],
                   choices=[ChoiceItem(row.question, options, letter, "image")])


def read_clear(root, config: str, check_images: bool = True, notes: list | None = None) -> list[Profile]:
    """One CLEAR config as viker profiles (forget/retain rows: the caption QA; real_faces: the name QA)."""
    if is_real_config(root, config):
        return [real_profile(r) for r in read_real_rows(root, config, check_images)]
    return [caption_profile(r) for r in read_caption_rows(root, config, check_images, notes)]


def split_exists(root, config: str) -> bool:
    folder = Path(root) / config
    return folder.is_dir() and any(folder.rglob("*.parquet"))
