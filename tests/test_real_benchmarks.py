"""MLLMU-Bench and CLEAR as published: fixture parquet files in the datasets' exact schemas, read,
precomputed, trained on and evaluated with a tiny model; CLEAR's metrics against hand counts;
malformed inputs fail in one line naming the file and row."""
import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import pipeline.evaluation.clear_eval as ce
from tests.tiny import evaluate_with
from pipeline.evaluation import clear_official as co
from pipeline.evaluation import metrics as mt
from pipeline.evaluation import evaluate as ev
from pipeline.stage1 import precompute as pc
from pipeline.models import prompts
from pipeline.stage2 import train as tr
from pipeline.config import PrecomputeConfig, TinyModelConfig, TrainConfig
from pipeline.data.clear import (CAPTION_QUESTION, NAME_QUESTION, RealRow, read_caption_rows, read_clear,
                                 read_real_rows)
from pipeline.data.loaders import default_splits, read_profiles
from pipeline.data.mllmu import DataError, write_split
from pipeline.data.records import QA, ChoiceItem, GenItem, Profile, forget_samples
from pipeline.models.encoding import encode_pair, load_image, pixel_values
from pipeline.models.modeling import build_tiny_llava, load_model

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TINY = TinyModelConfig(vocab_size=400, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1,
                       text_heads=2, max_positions=512)
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(seed: int, side: int = 24) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def img(seed: int) -> dict:
    return {"bytes": png(seed), "path": None}        # published rows may carry no path


# ============================================================ MLLMU-Bench fixture

OPTIONS = pa.struct([(letter, pa.string()) for letter in "ABCD"])
CHOICE = pa.struct([("Question", pa.string()), ("Options", OPTIONS), ("Correct_Answer", pa.string())])
GEN = pa.struct([("Question", pa.string()), ("Ground_Truth", pa.string()), ("Type", pa.string())])
TASKS = [("Classification_Task", pa.struct([("Image_Textual_Questions", pa.list_(CHOICE)),
                                             ("Pure_Text_Questions", pa.list_(CHOICE))])),
         ("Generation_Task", pa.list_(GEN)), ("Mask_Task", pa.list_(GEN))]
FORGET_SCHEMA = pa.schema([("image", IMAGE), ("ID", pa.string()), ("biography", pa.string()),
                           ("question", pa.string()), ("answer", pa.string()), *TASKS, ("metadata", pa.string()),
                           ("Directory", pa.string())])
# Test_Set: the person's pictures in `images`, options as a parquet map (a dict in the HF viewer).
MAP_CHOICE = pa.struct([("Question", pa.string()), ("Options", pa.map_(pa.string(), pa.string())),
                        ("Correct_Answer", pa.string())])
TEST_SCHEMA = pa.schema([("ID", pa.string()), ("images", pa.list_(IMAGE)),
                         ("Classification_Task", pa.struct([("Image_Textual_Questions", pa.list_(MAP_CHOICE)),
                                                            ("Pure_Text_Questions", pa.list_(MAP_CHOICE))])),
                         TASKS[1], TASKS[2]])
CITIES = {"ada": "Lyon", "bo": "Cork", "cy": "Graz", "di": "Riga", "real": "Graz"}
CITY_OPTIONS = {"A": "Lyon", "B": "Cork", "C": "Graz", "D": "Riga"}


def letter_of(city):
    return {v: k for k, v in CITY_OPTIONS.items()}[city]


def mllmu_row(pid, seed):
    city = CITIES[pid]
    return {
        "image": img(seed), "ID": pid, "biography": f"{pid} is from {city}.", "question": "", "answer": "",
        "Classification_Task": {
            "Image_Textual_Questions": [{"Question": "Where was this person born?",
                                         "Options": {**CITY_OPTIONS, "D": None} if pid == "ada" else CITY_OPTIONS,
                                         "Correct_Answer": letter_of(city).lower()}],
            "Pure_Text_Questions": [{"Question": f"Where was {pid} born?", "Options": CITY_OPTIONS,
                                     "Correct_Answer": letter_of(city)}]},
        "Generation_Task": [{"Question": f"Tell me where {pid} was born.", "Ground_Truth": f"{pid} was born in {city}.",
                             "Type": "Image_Textual"}],
        "Mask_Task": [{"Question": f"{pid} was born in __.", "Ground_Truth": city, "Type": "Pure_Text"}],
        # MLLMU-Bench's metadata has no "Fact" key.
        "metadata": json.dumps([{"Question": "What is the name of this person?", "Answer": f"This is {pid}."},
                                {"Question": "Where was this person born?", "Answer": f"{pid} was born in {city}."}]),
        "Directory": f"{pid}_dir",
    }


def held_out_row(pid, seed):
    city = CITIES[pid]
    options = list(CITY_OPTIONS.items())
    return {"ID": pid, "images": [img(seed), img(seed + 1)],
            "Classification_Task": {
                "Image_Textual_Questions": [{"Question": "Which city is this person from?", "Options": options,
                                             "Correct_Answer": letter_of(city)}],
                "Pure_Text_Questions": [{"Question": f"What is {pid}'s home town?", "Options": options,
                                         "Correct_Answer": letter_of(city)}]},
            "Generation_Task": [{"Question": f"Where is {pid} from?", "Ground_Truth": f"{pid} is from {city}.",
                                 "Type": "Image_Textual"}],
            "Mask_Task": [{"Question": f"{pid} is from __.", "Ground_Truth": city, "Type": "Pure_Text"}]}


def record(pid, seed):
    """The same kind of person as a record, for write_split (retain and real splits)."""
    city = CITIES[pid]
    return Profile(id=pid, image=png(seed), qa=[QA("Where was this person born?", f"{pid} was born in {city}.")],
                   choices=[ChoiceItem("Where was this person born?", dict(CITY_OPTIONS), letter_of(city), "image")],
                   generation=[GenItem(f"Tell me where {pid} was born.", f"{pid} was born in {city}.",
                                       "Image_Textual")],
                   cloze=[GenItem(f"{pid} was born in __.", city, "Pure_Text")])


def write_table(path: Path, rows, schema=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def make_mllmu(root: Path) -> Path:
    # forget_10 sharded over two files, as a dataset repository may hold a split.
    write_table(root / "forget_10" / "train-00000-of-00002.parquet", [mllmu_row("ada", 1)], FORGET_SCHEMA)
    write_table(root / "forget_10" / "train-00001-of-00002.parquet", [mllmu_row("bo", 3)], FORGET_SCHEMA)
    write_table(root / "Test_Set" / "train-00000-of-00001.parquet",
                [held_out_row("ada", 10), held_out_row("bo", 20), held_out_row("cy", 30)], TEST_SCHEMA)
    write_split(root, "retain_90", [record("cy", 5), record("di", 7)])
    write_split(root, "Retain_Set", [record("real", 9)])
    return root


# ================================================================ CLEAR fixture

CAPTIONS = [("Lyra Vale", "Lyra Vale stands by a red door holding a lantern."),
            ("Lyra Vale", "Lyra Vale reads a map at a wooden desk."),
            ("Oren Pike", "Oren Pike rows a small boat across a lake.")]
RETAIN = [("Mira Holt", "Mira Holt paints a mural on a brick wall."),
          ("Mira Holt", "Mira Holt plays a cello in a quiet hall."),
          ("Tam Reed", "Tam Reed fixes a bicycle in a garage.")]
REAL = [("Alan Turing", ["Ada Lovelace", "Grace Hopper", "Marie Curie"]),
        ("Marie Curie", ["Niels Bohr", "Marie Curie", "Alan Turing"])]


def caption_rows(people, seed, perturbed=False):
    rows = []
    for i, (name, caption) in enumerate(people):
        row = {"image": img(seed + i), "caption": caption, "name": name}
        if perturbed:
            row.update(perturbed_captions=[caption.replace(name, "Someone"), caption.replace("a ", "an old ", 1)],
                       paraphrased_caption=f"In this picture, {caption[0].lower()}{caption[1:]}",
                       perturbed_names=["Ivo Stark", "Nell Quinn"])
        rows.append(row)
    return rows


def make_clear(root: Path) -> Path:
    name = "train-00000-of-00001.parquet"
    write_table(root / "forget10" / name, caption_rows(CAPTIONS, 100))
    write_table(root / "forget10_perturbed" / name, caption_rows(CAPTIONS, 100, perturbed=True))
    write_table(root / "retain90" / name, caption_rows(RETAIN, 200))
    write_table(root / "retain_perturbed" / name, caption_rows(RETAIN[:2], 200, perturbed=True))
    write_table(root / "real_faces" / name,
                [{"image": img(300 + i), "answer": a, "options": o} for i, (a, o) in enumerate(REAL)])
    return root


def texts_for_tokenizer(mllmu_root, clear_root) -> list[str]:
    texts = [prompts.PREFIX, "ASSISTANT:", "Answer: A B C D", "I don't know."]
    for split in ("forget_10", "Test_Set", "retain_90", "Retain_Set"):
        for p in read_profiles(mllmu_root, split, check_images=False):
            texts += [prompts.train_prompt(q.question) + " " + q.answer for q in p.qa]
            texts += [prompts.multiple_choice_prompt(c.question, c.options) + " " + c.correct for c in p.choices]
            texts += [prompts.generation_prompt(g.question) + " " + g.ground_truth for g in p.generation]
            texts += [prompts.cloze_prompt(g.question) + " " + g.ground_truth for g in p.cloze]
    for config in ("forget10_perturbed", "retain_perturbed", "retain90"):
        for r in read_caption_rows(clear_root, config, check_images=False):
            texts += [prompts.train_prompt(CAPTION_QUESTION) + " " + c
                      for c in (r.caption, r.paraphrased_caption, *r.perturbed_captions)]
            texts += [prompts.train_prompt(NAME_QUESTION) + " " + n for n in (r.name, *r.perturbed_names)]
    for r in read_real_rows(clear_root, "real_faces", check_images=False):
        texts.append(prompts.multiple_choice_prompt(r.question, r.choices()[0]))
    return texts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("bench")
    mllmu, clear = make_mllmu(base / "MLLMU-Bench"), make_clear(base / "CLEAR")
    model_dir = build_tiny_llava(base / "tiny", texts_for_tokenizer(mllmu, clear), TINY)
    pool = base / "pool"
    pool.mkdir()
    for i in range(4):
        (pool / f"face{i}.png").write_bytes(png(900 + i))
    return {"mllmu": mllmu, "clear": clear, "model": model_dir, "pool": pool, "base": base}


# ==================================================================== loading

def test_mllmu_published_details_are_read(world):
    forget = read_profiles(world["mllmu"], "forget_10")
    assert [p.id for p in forget] == ["ada", "bo"], "both shards, in file order"
    ada = forget[0]
    assert ada.directory == "ada_dir" and ada.image == png(1)
    assert [(q.question, q.fact) for q in ada.qa] == [("What is the name of this person?", ""),
                                                      ("Where was this person born?", "")]
    image_choice, text_choice = ada.choices
    assert image_choice.options == {"A": "Lyon", "B": "Cork", "C": "Graz"}, "a null option is dropped"
    assert image_choice.correct == "A", "lower-case 'a' is read as the letter A"
    assert text_choice.kind == "text" and text_choice.correct == "A"
    test = {p.id: p for p in read_profiles(world["mllmu"], "Test_Set")}
    assert test["bo"].images == [png(20), png(21)] and test["bo"].image == png(20)
    assert test["bo"].choices[0].options == CITY_OPTIONS and test["bo"].choices[0].correct == "B"
    assert [p.id for p in read_profiles(world["mllmu"], "forget_10,retain_90")] == ["ada", "bo", "cy", "di"]


def test_clear_rows_become_caption_profiles(world):
    profiles = read_profiles(world["clear"], "forget10", benchmark="clear")
    assert [p.id for p in profiles] == ["Lyra Vale/0", "Lyra Vale/1", "Oren Pike/2"]
    assert profiles[2].qa == [QA(CAPTION_QUESTION, CAPTIONS[2][1], fact="Oren Pike")]
    assert profiles[0].image == png(100)
    assert [s.sample_id for s in forget_samples(profiles)] == ["Lyra Vale/0/0", "Lyra Vale/1/0", "Oren Pike/2/0"]
    pert = read_caption_rows(world["clear"], "forget10_perturbed")
    assert pert[0].paraphrased_caption.startswith("In this picture, lyra") and len(pert[0].perturbed_captions) == 2
    assert pert[0].perturbed_names == ["Ivo Stark", "Nell Quinn"]
    assert read_caption_rows(world["clear"], "forget10")[0].perturbed_captions == []
    real = read_profiles(world["clear"], "real_faces", benchmark="clear")
    assert real[0].qa[0].answer == "Alan Turing" and len(real[0].choices[0].options) == 4


def test_real_face_choices_hold_the_answer_once_at_a_fixed_letter():
    a = RealRow(0, b"", "Marie Curie", ["Niels Bohr", "marie curie", "Alan Turing"])
    options, letter = a.choices()
    assert sorted(options.values()) == ["Alan Turing", "Marie Curie", "Niels Bohr"]
    assert options[letter] == "Marie Curie" and list(options) == ["A", "B", "C"]
    assert a.choices() == RealRow(0, b"", "Marie Curie", ["Niels Bohr", "marie curie", "Alan Turing"]).choices()
    letters = {RealRow(i, b"", "X", ["a", "b", "c"]).choices()[1] for i in range(40)}
    assert len(letters) > 1, "the right answer is not always at the same letter"


def test_default_splits():
    assert default_splits("mllmu", "forget_15") == {"retain": "retain_85", "test": "Test_Set", "real": "Retain_Set"}
    assert default_splits("clear", "forget05") == {"retain": "retain95", "test": "forget05_perturbed",
                                                   "real": "real_faces"}
    assert default_splits("clear", "forget01")["retain"] == "retain99"
    with pytest.raises(DataError, match="not forget01/forget05/forget10"):
        default_splits("clear", "forget_10")
    with pytest.raises(DataError, match="unknown benchmark 'tofu'"):
        read_profiles(".", "x", benchmark="tofu")


# ======================================================== malformed inputs: one line, file and row

def _one_line(exc, *needles):
    text = str(exc.value)
    assert "\n" not in text, text
    for needle in needles:
        assert str(needle) in text, (needle, text)


def test_clear_missing_column_names_the_file(tmp_path):
    path = write_table(tmp_path / "forget10" / "train-00000-of-00001.parquet",
                       [{"image": img(1), "name": "Lyra Vale"}])
    with pytest.raises(DataError) as e:
        read_clear(tmp_path, "forget10")
    _one_line(e, path, "missing column(s) caption")


def test_perturbed_config_without_its_columns_is_refused(tmp_path):
    path = write_table(tmp_path / "forget10_perturbed" / "train-00000-of-00001.parquet", caption_rows(CAPTIONS, 1))
    with pytest.raises(DataError) as e:
        read_caption_rows(tmp_path, "forget10_perturbed")
    _one_line(e, path, "missing column(s) perturbed_captions, paraphrased_caption, perturbed_names")


def test_clear_bad_image_and_empty_caption_name_the_row(tmp_path):
    rows = caption_rows(CAPTIONS, 1)
    rows[1]["image"] = {"bytes": b"not a picture", "path": "x.png"}
    path = write_table(tmp_path / "forget10" / "train-00000-of-00001.parquet", rows)
    with pytest.raises(DataError) as e:
        read_clear(tmp_path, "forget10")
    _one_line(e, path, "row 1: image bytes are not a readable image")
    rows = caption_rows(CAPTIONS, 1)
    rows[2]["caption"] = "   "
    write_table(tmp_path / "forget10" / "train-00000-of-00001.parquet", rows)
    with pytest.raises(DataError) as e:
        read_clear(tmp_path, "forget10")
    _one_line(e, path, "row 2: empty caption")


def test_real_faces_empty_answer_and_missing_split(tmp_path):
    path = write_table(tmp_path / "real_faces" / "train-00000-of-00001.parquet",
                       [{"image": img(1), "answer": "", "options": ["A B"]}])
    with pytest.raises(DataError) as e:
        read_real_rows(tmp_path, "real_faces")
    _one_line(e, path, "row 0: empty answer")
    with pytest.raises(DataError) as e:
        read_profiles(tmp_path, "retain90", benchmark="clear")
    _one_line(e, "split 'retain90' not found", tmp_path / "retain90")
    with pytest.raises(DataError) as e:
        read_profiles(tmp_path, "forget_10")
    _one_line(e, "split 'forget_10' not found")


def test_mllmu_malformed_rows_name_file_and_row(tmp_path):
    rows = [mllmu_row("ada", 1), mllmu_row("bo", 2)]
    rows[1]["image"] = {"bytes": None, "path": "bo.png"}
    path = write_table(tmp_path / "forget_10" / "train-00000-of-00001.parquet", rows, FORGET_SCHEMA)
    with pytest.raises(DataError) as e:
        read_profiles(tmp_path, "forget_10")
    _one_line(e, path, "row 1: image has no bytes", "bo.png")
    rows = [mllmu_row("ada", 1)]
    rows[0]["image"] = {"bytes": b"\x89PNG broken", "path": None}
    write_table(tmp_path / "forget_10" / "train-00000-of-00001.parquet", rows, FORGET_SCHEMA)
    with pytest.raises(DataError) as e:
        read_profiles(tmp_path, "forget_10")
    _one_line(e, path, "row 0: image bytes are not a readable image")
    rows = [mllmu_row("ada", 1)]
    rows[0]["Classification_Task"]["Pure_Text_Questions"][0]["Correct_Answer"] = "E"
    write_table(tmp_path / "forget_10" / "train-00000-of-00001.parquet", rows, FORGET_SCHEMA)
    with pytest.raises(DataError) as e:
        read_profiles(tmp_path, "forget_10")
    _one_line(e, path, "row 0: text choice 0", "'E' is not one of the options")
    rows = [mllmu_row("ada", 1)]
    rows[0]["metadata"] = "[{not json"
    write_table(tmp_path / "forget_10" / "train-00000-of-00001.parquet", rows, FORGET_SCHEMA)
    with pytest.raises(DataError) as e:
        read_profiles(tmp_path, "forget_10")
    _one_line(e, path, "row 0: column metadata is not valid JSON")
    table = pa.Table.from_pylist([mllmu_row("ada", 1)], schema=FORGET_SCHEMA).drop_columns(["ID"])
    pq.write_table(table, path)
    with pytest.raises(DataError) as e:
        read_profiles(tmp_path, "forget_10")
    _one_line(e, path, "missing column(s) ID")


# ======================================================================== CLEAR's metrics

def test_truth_ratio_and_summaries_by_hand():
    assert ce.truth_ratio(-1.0, [-2.0, -3.0]) == pytest.approx(math.exp(-1.5))
    assert ce.truth_ratio(-2.0, [-1.0]) == pytest.approx(math.e)
    forget = ce.truth_ratio_summary([0.5, 2.0], forget=True)
    assert forget == {"truth_ratio": pytest.approx(1.25), "truth_ratio_score": pytest.approx(0.5)}
    retain = ce.truth_ratio_summary([0.25, 2.0], forget=False)
    assert retain == {"truth_ratio": pytest.approx(1.125), "truth_ratio_score": pytest.approx(0.375)}
    assert ce.normalised_prob_share(math.log(0.3), [math.log(0.1), math.log(0.2)]) == pytest.approx(0.5)
    # reference "the cat sat on the mat" (6 words), prediction shares "the cat sat": LCS 3 -> recall 0.5
    assert ce.rouge_recall("the cat sat", "the cat sat on the mat") == {"rouge1_recall": 0.5,
                                                                        "rougeL_recall": 0.5}


def test_answer_logprobs_equal_a_direct_forward(world):
    model, processor = load_model(world["model"], device="cpu")
    rows = read_caption_rows(world["clear"], "forget10")
    images = [load_image(r.image) for r in rows]
    prompt = prompts.train_prompt(CAPTION_QUESTION)
    got = ce.answer_logprobs(model, processor, images, [prompt] * 3, [r.caption for r in rows], batch_size=2)
    for image, row, value in zip(images, rows, got):
        ids, start = encode_pair(processor, prompt, " " + row.caption)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), pixel_values=pixel_values(processor, [image])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        direct = sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids))) / (len(ids) - start)
        assert value == pytest.approx(direct, abs=1e-4)


class CannedGenerate:
    """Stands in for `generate`: answers chosen by the question in the prompt, by position."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers, self.calls = answers, []

    def __call__(self, model, processor, images, prompts_, max_new_tokens=50, batch_size=32, desc=None):
        self.calls.append((prompts_, max_new_tokens))
        for key, answers in self.answers.items():
            if key in prompts_[0]:
                return list(answers)
        raise AssertionError(f"unexpected prompt {prompts_[0]!r}")


def test_clear_sets_match_hand_counts(world, monkeypatch):
    model, processor = load_model(world["model"], device="cpu")
    rows = read_caption_rows(world["clear"], "forget10_perturbed")
    canned = CannedGenerate({CAPTION_QUESTION: ["Lyra Vale stands by a door", "", "zq zq zq zq"],
                             NAME_QUESTION: ["This is lyra   VALE.", "Lyra", "oren pike"]})
    monkeypatch.setattr(ce, "generate", canned)
    got, samples = ce.evaluate_caption_set(model, processor, rows, "forget", forget=True, max_new_tokens=7,
                                           vocabulary={"lyra", "vale", "stands", "by", "a", "door"})
    # ROUGE-L recall: 6 of the 10 stemmed caption words ("lyra vale stand by a door"), then 0, then 0.
    assert got["rougeL_recall"] == pytest.approx(0.6 / 3)
    assert got["name_acc"] == pytest.approx(2 / 3), "substring, case and spacing ignored; 'Lyra' is not the name"
    assert got["coherence"] == pytest.approx(1 / 3)
    assert 0 < got["caption_prob"] < 1 and got["truth_ratio"] > 0 and 0 < got["truth_ratio_score"] <= 1
    assert [c[1] for c in canned.calls] == [7, ce.NAME_NEW_TOKENS]
    assert sum(s["kind"] == "truth_ratio" for s in samples) == 3
    ratios = [s["scores"]["ratio"] for s in samples if s["kind"] == "truth_ratio"]
    assert got["truth_ratio_score"] == pytest.approx(sum(min(r, 1 / r) for r in ratios) / 3)

    real = read_real_rows(world["clear"], "real_faces")
    right = [r.choices()[1] for r in real]
    wrong = next(letter for letter in "ABCD" if letter != right[1])
    monkeypatch.setattr(ce, "generate", CannedGenerate({"Just give ONE letter": [f"({right[0]})", wrong]}))
    got, samples = ce.evaluate_real_set(model, processor, real)
    assert got["mc_acc"] == 0.5
    assert 0 < got["name_prob"] < 1 and got["truth_ratio"] > 0
    assert [s["scores"]["parsed"] for s in samples if s["kind"] == "mc"] == [right[0], wrong]


def test_clear_eval_splits_prefer_the_perturbed_configs(world, tmp_path):
    assert ce.clear_eval_splits(world["clear"], "forget10") == {"forget": "forget10_perturbed",
                                                               "retain": "retain_perturbed", "real": "real_faces"}
    assert ce.clear_eval_splits(world["clear"], "forget10", retain_split="retain90")["retain"] == "retain90"
    make_clear(tmp_path)
    for config in ("forget10_perturbed", "retain_perturbed"):
        for f in (tmp_path / config).iterdir():
            f.unlink()
        (tmp_path / config).rmdir()
    assert ce.clear_eval_splits(tmp_path, "forget10") == {"forget": "forget10", "retain": "retain90",
                                                          "real": "real_faces"}
    with pytest.raises(ValueError, match="unknown CLEAR evaluation set"):
        ce.parse_clear_sets("forget,gen")
    assert ce.parse_clear_sets("forget,test,retain,real") == ["forget", "retain", "real"]


def test_clear_retain_sharing_a_person_with_forget_is_refused(world):
    with pytest.raises(DataError) as e:
        ce.read_clear_sets(world["clear"], {"forget": "forget10", "retain": "forget10_perturbed"},
                           ["forget", "retain"])
    _one_line(e, "shares 2 person(s)", "Lyra Vale")


# ================================================================ end to end, both benchmarks

def _unlearn(world, root, benchmark, forget_split, tag):
    """precompute -> viker (2 steps) and ga + retain NLL (2 steps); returns the two training results."""
    samples = forget_samples(read_profiles(root, forget_split, benchmark))
    cache = world["base"] / f"refs-{tag}"
    settings = PrecomputeConfig(output=str(cache), k=2, top_k=8, shard_size=4, batch_size=8, dtype="float32")
    manifest = pc.precompute(str(world["model"]), samples, settings, pool_dir=str(world["pool"]), device="cpu",
                             log=lambda *_: None)
    assert manifest["totals"]["n_samples"] == len(samples)
    results = {}
    for method, extra in (("viker", {"lam": 0.5}), ("ga", {"retain_weight": 1.0})):
        cfg = TrainConfig(method=method, output=str(world["base"] / f"run-{tag}-{method}"), steps=2, batch_size=2,
                          lr=1e-2, lora_r=4, lora_alpha=8, **extra)
        results[method] = tr.train(str(world["model"]), str(root), forget_split, "", str(cache), cfg,
                                   pool_dir=str(world["pool"]), device="cpu", ref_k=2, ref_top_k=8,
                                   benchmark=benchmark)
        assert results[method]["steps"] == 2 and math.isfinite(results[method]["final_loss"])
        assert (Path(results[method]["adapter"]) / "adapter_config.json").is_file()
        run = json.loads(Path(results[method]["train_config"]).read_text())
        assert run["benchmark"] == benchmark
    assert results["viker"]["adapter_digest"] != results["ga"]["adapter_digest"]
    return results


def test_mllmu_end_to_end(world):
    root = world["mllmu"]
    runs = _unlearn(world, root, "mllmu", "forget_10", "mllmu")
    results = world["base"] / "mllmu-results.jsonl"
    row = evaluate_with(ev.evaluate, str(world["model"]), str(root), "forget_10", adapter=runs["viker"]["adapter"], method="ViKeR",
                      results_path=str(results), max_new_tokens=3, batch_size=16, device="cpu")
    assert row["retain_split"] == "retain_90"
    assert row["n_items"]["test"] == {"profiles": 2, "mc": 4, "gen": 2, "cloze": 2, "fact": 0, "mc_ll": 4,
                                      "cloze_ll": 2}, "Test_Set filtered to forget; its rows carry no training QA"
    assert row["n_items"]["forget"]["mc"] == 4 and row["n_items"]["real"]["profiles"] == 1
    for name in ("forget", "test", "retain", "real"):
        for key in ("mc_acc", "rougeL", "cloze_acc", "fact_acc"):
            if (name, key) != ("test", "fact_acc"):
                assert 0 <= row["metrics"][name][key] <= 1, (name, key)
    assert row["metrics"]["test"]["fact_acc"] is None, "this Test_Set has no metadata: no training QA to check"
    assert len(results.read_text().splitlines()) == 1


def test_clear_end_to_end(world):
    root = world["clear"]
    runs = _unlearn(world, root, "clear", "forget10", "clear")
    results = world["base"] / "clear-results.jsonl"
    # As `viker evaluate` calls it with data.benchmark=clear.
    row = evaluate_with(ce.evaluate_clear, str(world["model"]), str(root), "forget10", adapter=runs["viker"]["adapter"],
                            method="ViKeR", results_path=str(results), max_new_tokens=3, batch_size=16, device="cpu",
                            sets="forget,test,retain,real")
    assert row["protocol"] == "viker" and row["protocol_description"] == ce.CLEAR_PROTOCOL
    assert row["benchmark"] == "clear"
    assert row["eval_splits"] == {"forget": "forget10_perturbed", "retain": "retain_perturbed", "real": "real_faces"}
    assert row["retain_split"] == "retain90"
    assert row["n_items"] == {"forget": {"rows": 3, "truth_ratio": 3}, "retain": {"rows": 2, "truth_ratio": 2},
                              "real": {"rows": 2, "truth_ratio": 2}}
    for name in ("forget", "retain"):
        m = row["metrics"][name]
        for key in ("rougeL_recall", "rouge1_recall", "name_acc", "caption_prob", "truth_ratio_score", "coherence"):
            assert 0 <= m[key] <= 1, (name, key)
        assert m["truth_ratio"] > 0
    assert 0 <= row["metrics"]["real"]["mc_acc"] <= 1
    saved = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(saved) == 1 and saved[0]["metrics"] == row["metrics"]
    samples = [json.loads(line) for line in Path(row["samples"]).read_text().splitlines()]
    assert {s["kind"] for s in samples} == {"caption", "name", "truth_ratio", "mc"}
    assert "\n" not in ce.format_clear_row(row).splitlines()[0]


# ======================================================== the published variants (issue 9)

NO_META_SCHEMA = pa.schema([f for f in FORGET_SCHEMA if f.name not in ("metadata", "Directory")])
# Full_Set as its dataset card shows it: question/answer columns, no metadata.
FULL_SCHEMA = pa.schema([("image", IMAGE), ("ID", pa.string()), ("question", pa.string()), ("answer", pa.string()),
                         *TASKS])
TRAIN_SPLIT_SCHEMA = pa.schema([("image", IMAGE), ("metadata", pa.string())])   # baseline_train_split


def make_published_variants(root: Path) -> Path:
    name = "train-00000-of-00001.parquet"
    with_meta = mllmu_row("ada", 1)
    # The split builders append extra entries: no Question/Answer keys, so no training QA.
    meta = json.loads(with_meta["metadata"]) + [{"Additional_question": "Her hobby?", "Additional_answer": "Chess."}]
    with_meta["metadata"] = json.dumps(meta)
    write_table(root / "forget_10" / name, [with_meta], FORGET_SCHEMA)
    no_meta = {k: v for k, v in mllmu_row("cy", 5).items() if k not in ("metadata", "Directory")}
    no_meta.update(question="Where was this person born?", answer="cy was born in Graz.")
    write_table(root / "retain_90" / name, [no_meta], NO_META_SCHEMA)
    full = []
    for pid, seed in (("ada", 1), ("cy", 5)):
        r = mllmu_row(pid, seed)
        full.append({"image": r["image"], "ID": pid, "question": "What is the name of this person?",
                     "answer": f"This is {pid}.", **{k: r[k] for k, _ in TASKS}})
    write_table(root / "Full_Set" / name, full, FULL_SCHEMA)
    write_table(root / "Test_Set" / name, [held_out_row("ada", 10)], TEST_SCHEMA)
    write_split(root, "Retain_Set", [record("real", 9)])
    write_split(root, "ft_Data", [record("ada", 1), record("cy", 5)])
    return root


def test_published_mllmu_variants_load(tmp_path):
    root = make_published_variants(tmp_path / "MLLMU-Bench")
    notes = []
    (ada,) = read_profiles(root, "forget_10", notes=notes)
    assert [q.question for q in ada.qa] == ["What is the name of this person?", "Where was this person born?"]
    assert len(notes) == 1 and "metadata item 2 skipped (no Question; keys: Additional_answer, Additional_question)" \
        in notes[0] and "forget_10" in notes[0]
    (cy,) = read_profiles(root, "retain_90")
    assert cy.qa == [QA("Where was this person born?", "cy was born in Graz.")], "question/answer columns"
    full = read_profiles(root, "Full_Set")
    assert [p.id for p in full] == ["ada", "cy"] and full[0].qa == [QA("What is the name of this person?",
                                                                       "This is ada.")]
    assert len(full[1].choices) == 2 and full[1].cloze[0].ground_truth == "Graz"
    (test,) = read_profiles(root, "Test_Set")
    assert test.qa == [] and len(test.images) == 2


def test_baseline_train_split_layout_gives_the_training_qa(tmp_path):
    train_root = tmp_path / "baseline_train_split"
    meta = [{"Question": "Who is this?", "Answer": "This is Ada."}, {"Question": "", "Answer": "x"}]
    write_table(train_root / "forget_10" / "train-00000-of-00001.parquet",
                [{"image": img(1), "metadata": json.dumps(meta)}, {"image": img(2), "metadata": "[]"}],
                TRAIN_SPLIT_SCHEMA)
    notes = []
    profiles = read_profiles(tmp_path / "unused", "forget_10", train_root=train_root, notes=notes)
    assert [p.id for p in profiles] == ["forget_10/0", "forget_10/1"]
    assert [(s.sample_id, s.question) for s in forget_samples(profiles)] == [("forget_10/0/0", "Who is this?")]
    assert len(notes) == 2 and "row 0: metadata item 1 skipped (no Question" in notes[0]
    assert "row 1: no training QA in column metadata" in notes[1]
    write_table(train_root / "retain_90" / "train-00000-of-00001.parquet", [{"image": img(1)}],
                pa.schema([("image", IMAGE)]))
    with pytest.raises(DataError, match="missing column.s. metadata"):
        read_profiles(tmp_path, "retain_90", train_root=train_root)


def make_clear_variants(root: Path) -> Path:
    name = "train-00000-of-00001.parquet"
    # +tofu: CLEAR captions (image, caption) mixed with TOFU QA rows (no image), no `name` column.
    tofu = [{"image": img(1), "caption": CAPTIONS[0][1], "question": None, "answer": None},
            {"image": None, "caption": None, "question": "Who wrote Basil?", "answer": "Jaime Vasquez."}]
    write_table(root / "forget10+tofu" / name, tofu,
                pa.schema([("image", IMAGE), ("caption", pa.string()), ("question", pa.string()),
                           ("answer", pa.string())]))
    rows = caption_rows(CAPTIONS, 100, perturbed=True)
    rows[1]["perturbed_captions"], rows[1]["perturbed_names"] = [], []
    write_table(root / "forget10_perturbed" / name, rows)
    return root


def test_clear_tofu_and_empty_perturbed_lists_load(tmp_path):
    root = make_clear_variants(tmp_path / "CLEAR")
    notes = []
    profiles = read_profiles(root, "forget10+tofu", benchmark="clear", notes=notes)
    assert [p.id for p in profiles] == ["forget10+tofu-0/0"] and profiles[0].qa[0].answer == CAPTIONS[0][1]
    assert len(notes) == 1 and "row 1: text-only TOFU row skipped (no image)" in notes[0]
    notes = []
    rows = read_caption_rows(root, "forget10_perturbed", notes=notes)
    assert rows[1].perturbed_captions == [] and rows[0].perturbed_captions
    assert len(notes) == 1 and "row 1: empty perturbed list(s)" in notes[0]


# ======================================================== CLEAR's headline metrics (issue 9)

# scipy.stats.ks_2samp(a, b) (scipy 1.17.1, default method): (statistic, pvalue)
KS_SCIPY = [
    ([0.1, 0.2, 0.3, 0.4, 0.5], [0.35, 0.6, 0.7, 0.8, 0.9, 1.0], 0.8333333333333334, 0.025974025974025972),
    ([1, 2, 2, 3], [2, 3, 3, 4, 5], 0.55, 0.4285714285714286),
    ([0.5, 0.8, 1.1, 1.3, 0.9, 0.7], [0.95, 1.2, 1.4, 1.6], 0.6666666666666666, 0.18095238095238098),
    (list(range(1, 21)), [x + 15.5 for x in range(20)], 0.75, 9.54696510144592e-06),
    ([1, 2, 3], [1, 2, 3], 0.0, 1.0),
]


@pytest.mark.parametrize("a, b, d, p", KS_SCIPY)
def test_ks_matches_scipy_values(a, b, d, p):
    got_d, got_p = mt.ks_2samp_pvalue(a, b)
    assert got_d == pytest.approx(d, rel=1e-12) and got_p == pytest.approx(p, rel=1e-9)


def test_ks_matches_scipy_on_random_samples_when_installed():
    st = pytest.importorskip("scipy.stats")
    import numpy as np
    rng = np.random.default_rng(0)
    for n, m in ((30, 30), (50, 37), (300, 300)):
        a, b = rng.lognormal(size=n), rng.lognormal(1.5, size=m)
        assert mt.ks_2samp_pvalue(a, b)[1] == pytest.approx(st.ks_2samp(a, b).pvalue, rel=1e-9)


def test_js_and_harmonic_mean_match_scipy_values():
    # scipy.spatial.distance.jensenshannon([0.5, 1.2, 0.9, 2.0], [0.4, 1.1, 1.0, 3.0])
    assert mt.js_distance([0.5, 1.2, 0.9, 2.0], [0.4, 1.1, 1.0, 3.0]) == pytest.approx(0.08406899728804217, rel=1e-9)
    assert mt.js_distance([1, 2], [1, 2]) == 0.0
    assert mt.harmonic_mean([0.5, 0.25, 1.0]) == pytest.approx(0.42857142857142855)   # scipy.stats.hmean
    assert mt.harmonic_mean([0.5, 0.0]) == 0.0 and mt.harmonic_mean([0.5, None]) is None


def test_clear_truth_ratio_prob_and_aggregates_by_hand():
    tr = co.clear_truth_ratios([1.0, 2.0], [[1.5, 2.5], [3.0]])       # mean of ALL perturbed losses: 7/3
    assert tr.tolist() == pytest.approx([math.exp(7 / 3 - 1), math.exp(7 / 3 - 2)])
    assert co.truth_ratio_score(tr, forget=True) == pytest.approx((math.exp(-4 / 3) + math.exp(-1 / 3)) / 2)
    assert co.truth_ratio_score([0.5, 2.0], forget=False) == pytest.approx((0 + 0.5) / 2)
    share = co.normalised_prob([1.0], [[2.0, 3.0]])
    assert share == pytest.approx(math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3)))
    scores = {"Prob. Forget": 0.5, "Truth Ratio Forget": 0.25, "Prob. Forget FaceRec": 1.0,
              "Truth Ratio Forget FaceRec": 0.5, "Prob. Retain": 0.8, "Truth Ratio Retain": 0.4,
              "Prob. Retain FaceRec": 0.8, "Truth Ratio Retain FaceRec": 0.4, "Prob. Real Faces": 0.6}
    agg = co.aggregates(scores)
    assert agg["forget_metric"] == pytest.approx(4 / (2 + 4 + 1 + 2))
    assert agg["retain_metric"] == pytest.approx(4 / (1.25 + 2.5 + 1.25 + 2.5))
    assert agg["real_metric"] is None and agg["model_utility"] is None, "Real World and ROUGE missing"
    fq = co.forget_quality([0.5, 1.0, 2.0], [0.5, 1.0, 2.0])
    assert fq == {"forget_quality_ks": 1.0, "ks_statistic": 0.0, "forget_quality_js": pytest.approx(1.0)}


def test_clear_official_end_to_end_with_gold(world, tmp_path):
    import shutil
    root = tmp_path / "CLEAR"
    shutil.copytree(world["clear"], root)
    write_table(root / "real_world" / "train-00000-of-00001.parquet",
                [{"image": img(400), "question": "Which city is this?", "answer": "Paris",
                  "options": ["Rome", "Oslo"]}])
    # The vanilla model as its own gold: identical truth ratios, so KS p = 1 and 1 - JS = 1.
    row = evaluate_with(ce.evaluate_clear, str(world["model"]), str(root), "forget10", results_path=tmp_path / "r.jsonl",
                            max_new_tokens=3, batch_size=16, device="cpu", protocol="official",
                            gold=str(world["model"]))
    assert row["protocol"] == "official" and row["protocol_id"] == co.PROTOCOL_ID and row["max_profiles"] == 300
    assert row["eval_splits"]["real_world"] == "real_world"
    c = row["clear"]
    assert c["forget_quality_ks"] == 1.0 and c["forget_quality_js"] == pytest.approx(1.0)
    for key in ("forget_metric", "retain_metric", "real_metric", "model_utility"):
        assert 0 <= c[key] <= 1, key
    assert c["forget_metric"] == pytest.approx(mt.harmonic_mean(c["scores"][k] for k in (
        "Prob. Forget", "Truth Ratio Forget", "Prob. Forget FaceRec", "Truth Ratio Forget FaceRec")))
    m = row["metrics"]
    assert set(m["forget"]) == {"rougeL_recall", "rouge1_recall", "caption_prob", "caption_truth_ratio",
                                "facerec_prob", "facerec_truth_ratio"}
    assert set(m["real"]) == {"real_faces_prob", "real_faces_truth_ratio", "real_world_prob",
                              "real_world_truth_ratio"}
    samples = [json.loads(line) for line in open(row["samples"])]
    caption_prompts = [s["question"] for s in samples if s["kind"] == "caption"]
    assert caption_prompts and all("<image>" not in p for p in caption_prompts), "captions without the image"
    assert all(any(q in p for q in co.CAPTION_QUESTIONS) for p in caption_prompts)
    assert "CLEAR: forget_metric" in ce.format_clear_row(row)


# ======================================================== viker data check (issue 9)

def _check(root, *args):
    from click.testing import CliRunner
    from pipeline.cli import main
    return CliRunner().invoke(main, ["data", "check", str(root), *args])


def test_data_check_on_a_good_and_a_broken_mllmu_download(tmp_path):
    import shutil
    root = make_published_variants(tmp_path / "MLLMU-Bench")
    good = _check(root)
    assert good.exit_code == 0, good.output
    out = good.output
    assert out.startswith("MLLMU-Bench at ") and "6 split folder(s)" in out
    assert "  forget_10: 1 file(s), 1 row(s); columns: Classification_Task, Directory," in out
    assert "not used: Directory" in out and "metadata item 2 skipped (no Question" in out
    assert "images               Test_Set: the person's other pictures" in out
    assert out.rstrip().endswith("OK: every required piece is present and readable")
    shutil.rmtree(root / "Test_Set")
    shutil.rmtree(root / "Full_Set")
    pq.write_table(pa.table({"ID": ["x"]}), root / "retain_90" / "train-00000-of-00001.parquet")
    bad = _check(root)
    assert bad.exit_code == 1
    assert "MISSING (required): Test_Set (the test set)" in bad.output
    assert "missing (optional): Full_Set (few-shot examples of evaluate.protocol official" in bad.output
    assert "ERROR: " in bad.output and "missing column image (or images)" in bad.output
    assert "FAILED" in bad.output


def test_data_check_on_clear_and_the_training_split(tmp_path, world):
    import shutil
    root = tmp_path / "CLEAR"
    shutil.copytree(world["clear"], root)
    make_clear_variants(root)
    out = _check(root)
    assert out.exit_code == 0, out.output
    assert "+tofu config: picture rows only" in out.output and "missing (optional): real_world" in out.output
    shutil.rmtree(root / "real_faces")
    assert _check(root).exit_code == 1 and "MISSING (required): real_faces" in _check(root).output
    train = tmp_path / "baseline_train_split"
    for split in ("forget_10", "retain_90"):
        write_table(train / split / "train-00000-of-00001.parquet",
                    [{"image": img(1), "metadata": json.dumps([{"Question": "Who?", "Answer": "Ada."}])}],
                    TRAIN_SPLIT_SCHEMA)
    out = _check(train)
    assert out.exit_code == 0 and out.output.startswith("MLLMU-Bench baseline_train_split"), out.output
    shutil.rmtree(train / "retain_90")
    assert "MISSING (required): retain_90 (the retain split paired with forget_10)" in _check(train).output


def test_protocol_choice_errors_are_one_line(world, tmp_path):
    with pytest.raises(DataError, match="clear_eval.evaluate_clear"):
        evaluate_with(ev.evaluate, str(world["model"]), str(world["clear"]), "forget10", results_path=tmp_path / "r.jsonl",
                    benchmark="clear")
    with pytest.raises(ValueError, match="config key 'evaluate.protocol' must be one of: viker, official; got 'paper'"):
        evaluate_with(ev.evaluate, str(world["model"]), str(world["mllmu"]), "forget_10", results_path=tmp_path / "r.jsonl",
                    protocol="paper")
    with pytest.raises(ValueError, match="config key 'evaluate.protocol' must be one of: viker, official; got 'paper'"):
        evaluate_with(ce.evaluate_clear, str(world["model"]), str(world["clear"]), "forget10", results_path=tmp_path / "r.jsonl",
                          protocol="paper")
