import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import MiniConfig
from pipeline.data.mini import FORGET_FRACTIONS, is_complete, make_mini
from pipeline.data.mllmu import DataError, read_split, write_split
from pipeline.data.records import QA, ChoiceItem, GenItem, Profile, forget_samples
from pipeline.data.portraits import png_bytes, portrait, draw_identities

import numpy as np

SMALL = MiniConfig(n_fictitious=20, n_real=4, pool_size=3, train_images=2, test_images=1)
MLLMU_COLUMNS = ["image", "ID", "biography", "question", "answer", "Classification_Task",
                 "Generation_Task", "Mask_Task", "metadata"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return make_mini(tmp_path_factory.mktemp("mini"), SMALL)


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_byte_identical_for_the_same_seed(mini, tmp_path):
    again = make_mini(tmp_path / "again", SMALL)
    assert _digests(mini) == _digests(again)
    other = make_mini(tmp_path / "other", MiniConfig(**{**SMALL.__dict__, "seed": 1}))
    assert _digests(mini)["ft_Data/train-00000-of-00001.parquet"] != \
        _digests(other)["ft_Data/train-00000-of-00001.parquet"]


def test_splits_have_mllmu_columns_and_sizes(mini):
    for split in ["ft_Data", "forget_5", "forget_10", "forget_15", "retain_95", "retain_90", "retain_85",
                  "Test_Set", "Retain_Set"]:
        table = pq.read_table(mini / split / "train-00000-of-00001.parquet")
        assert table.column_names[:9] == MLLMU_COLUMNS, split
        assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert "images" in pq.read_table(mini / "Test_Set" / "train-00000-of-00001.parquet").column_names
    for name, frac in FORGET_FRACTIONS.items():
        forget = {p.id for p in read_split(mini, name)}
        retain = {p.id for p in read_split(mini, f"retain_{100 - int(frac * 100)}")}
        assert len(forget) == max(1, round(frac * SMALL.n_fictitious))
        assert not forget & retain and len(forget | retain) == SMALL.n_fictitious
    f5, f15 = ({p.id for p in read_split(mini, s)} for s in ("forget_5", "forget_15"))
    assert f5 <= f15, "forget splits are nested, as in MLLMU-Bench"
    real = {p.id for p in read_split(mini, "Retain_Set")}
    assert not real & {p.id for p in read_split(mini, "ft_Data")}


def test_profiles_carry_all_item_kinds(mini):
    p = read_split(mini, "forget_10")[0]
    assert len(p.qa) >= 4 and all(q.fact and q.fact in q.answer for q in p.qa)
    kinds = {c.kind for c in p.choices}
    assert kinds == {"image", "text"}
    for c in p.choices:
        assert sorted(c.options) == list("ABCD") and c.correct in "ABCD"
        assert len(set(c.options.values())) == 4, "distractors differ from the answer and each other"
    assert {g.kind for g in p.generation} == {"Image_Textual", "Pure_Text"}
    assert all("__" in g.question for g in p.cloze)
    test = {t.id: t for t in read_split(mini, "Test_Set")}[p.id]
    assert test.images and all(b != p.image for b in test.images)
    assert {c.question for c in test.choices} != {c.question for c in p.choices}, "Test_Set paraphrases"


def test_pools_exist(mini):
    for pool in ("people", "pets", "scenes", "patterns"):
        assert len(list((mini / "pools" / pool).glob("*.png"))) == SMALL.pool_size
    assert is_complete(mini, SMALL)
    assert not is_complete(mini, MiniConfig())


def _profile(pid="p1", image=None, answer="This person is named Ada."):
    image = image or png_bytes(portrait(draw_identities(np.random.default_rng(0), 1)[0], np.random.default_rng(1)))
    return Profile(id=pid, image=image, biography="bio", question="q", answer="a",
                   qa=[QA("What is the name of this person?", answer, "Ada")],
                   choices=[ChoiceItem("Name?", {"A": "Ada", "B": "Bo", "C": "Cy", "D": "Di"}, "A", "image"),
                            ChoiceItem("Ada's name?", {"A": "x", "B": "Ada", "C": "y", "D": "z"}, "B", "text")],
                   generation=[GenItem("Name?", "This person is named Ada.", "Image_Textual")],
                   cloze=[GenItem("This person is named __.", "Ada", "Image_Textual")])


def test_round_trip_preserves_every_field(tmp_path):
    p = _profile()
    write_split(tmp_path, "forget_10", [p])
    (back,) = read_split(tmp_path, "forget_10")
    assert back == p
    meta = json.loads(pq.read_table(tmp_path / "forget_10" / "train-00000-of-00001.parquet")
                      .column("metadata")[0].as_py())
    assert meta == [{"Question": "What is the name of this person?", "Answer": "This person is named Ada.",
                     "Fact": "Ada"}]
    assert [s.sample_id for s in forget_samples([back])] == ["p1/0"]


def test_a_split_read_again_is_remembered_until_its_files_change(tmp_path):
    write_split(tmp_path, "forget_10", [_profile()])
    first = read_split(tmp_path, "forget_10")
    again = read_split(tmp_path, "forget_10")
    assert again == first and again is not first and again[0] is first[0], "the same profiles, a new list"
    write_split(tmp_path, "forget_10", [_profile("p2"), _profile("p3")])     # rewritten: size and mtime change
    assert [p.id for p in read_split(tmp_path, "forget_10")] == ["p2", "p3"]
    # A read asked for its notes is read in full, so the notes come every time.
    write_split(tmp_path, "forget_10", [_profile(answer="  ")])
    for _ in range(2):
        notes = []
        read_split(tmp_path, "forget_10", notes=notes)
        assert len(notes) == 1


def test_missing_split_is_one_line(tmp_path):
    with pytest.raises(DataError, match="split 'forget_10' not found"):
        read_split(tmp_path, "forget_10")


def test_unreadable_image_names_file_and_row(tmp_path):
    write_split(tmp_path, "forget_10", [_profile(), _profile("p2", image=b"not an image")])
    with pytest.raises(DataError) as e:
        read_split(tmp_path, "forget_10")
    assert "row 1" in str(e.value) and "not a readable image" in str(e.value) and "\n" not in str(e.value)


def test_empty_answer_is_skipped_and_noted(tmp_path):
    # As the authors' reader (data_preprocess.py flatten_dataset): no answer, no training QA.
    write_split(tmp_path, "forget_10", [_profile(answer="  ")])
    notes = []
    (p,) = read_split(tmp_path, "forget_10", notes=notes)
    assert p.qa == [QA("q", "a")], "falls back to the question/answer columns"
    assert len(notes) == 1 and "row 0: metadata item 0 skipped (no Answer" in notes[0]


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "forget_10" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"question": ["a"], "image": [{"bytes": b"x", "path": "x"}]}), path)
    with pytest.raises(DataError, match="missing column.s. ID"):
        read_split(tmp_path, "forget_10")
    pq.write_table(pa.table({"ID": ["a"], "question": ["a"]}), path)
    with pytest.raises(DataError, match="missing column image .or images."):
        read_split(tmp_path, "forget_10")
