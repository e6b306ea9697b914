"""MLLMU-Bench's official protocol: the exact prompts and image inputs its eval.py builds (read from the code)."""
import pytest

from pipeline.evaluation import protocol_mllmu as pm
from pipeline.data.records import ChoiceItem, GenItem, Profile

IMG_ADA, IMG_BO = b"ada-image", b"bo-image"
OTHER = [b"bo-other-1", b"bo-other-2", b"bo-other-3"]


def _ada():
    return Profile(
        id="ada", image=IMG_ADA,
        choices=[ChoiceItem("Where was this person born?", {"A": "Paris", "B": "Rome", "C": "Oslo", "D": "Bern"},
                            "B", "image"),
                 ChoiceItem("What is Ada's job?", {"A": "Baker", "B": "Pilot", "C": "Judge", "D": "Nurse"},
                            "D", "text")],
        cloze=[GenItem("This person was born in __.", "Rome", "Image_Textual"),
               GenItem("Ada works as a __.", "Nurse", "Pure_Text")],
        generation=[GenItem("What is this person's job?", "She is a nurse.", "Image_Textual"),
                    GenItem("Where does Ada live?", "Ada lives in Rome.", "Pure_Text")])


def _bo(images=()):
    return Profile(
        id="bo", image=IMG_BO, images=list(images),
        choices=[ChoiceItem("What is this person's hobby?", {"A": "Chess", "B": "Golf", "C": "Yoga", "D": "Ski"},
                            "C", "image"),
                 ChoiceItem("Where does Bo work?", {"A": "Bank", "B": "Farm", "C": "Port", "D": "Mill"},
                            "A", "text")],
        cloze=[GenItem("This person plays __.", "Yoga", "Image_Textual"),
               GenItem("Bo works at the __.", "Bank", "Pure_Text")],
        generation=[GenItem("What does this person do?", "He works at a bank.", "Image_Textual"),
                    GenItem("Where does Bo live?", "Bo lives in Oslo.", "Pure_Text")])


def _by(items, task, kind):
    return [it for it in items if it.task == task and it.kind == kind]


def test_forget_set_prompts_and_images_for_two_profiles():
    profiles = [_ada(), _bo()]
    source = {p.id: p for p in profiles}          # Full_Set holds both people
    items = pm.build_items(profiles, "forget", source, use_other_images=False, seed=0)
    # Seed 0 draws ada as the one multiple-choice shot profile: its questions become the shots and are
    # not scored; cloze draws two profiles = both people here, so no cloze item is left (as in eval.py).
    assert {it.profile for it in items if it.task == "mc"} == {"bo"}
    assert [it for it in items if it.task == "cloze"] == []
    (mc_img,) = _by(items, "mc", "image")
    assert mc_img.prompt == (
        "USER: <image>\nQuestion: Where was this person born?\nA: Paris\nB: Rome\nC: Oslo\nD: Bern\n"
        "Correct Answer: B\n"
        "USER: <image>\nWhat is this person's hobby?\nA: Chess\nB: Golf\nC: Yoga\nD: Ski\n"
        "Just give ONE letter representing the answer directly.\nASSISTANT:")
    assert mc_img.images == [IMG_ADA, IMG_BO] and mc_img.reference == "C"
    (mc_txt,) = _by(items, "mc", "text")
    assert mc_txt.prompt == (
        "USER:\nQuestion: What is Ada's job?\nA: Baker\nB: Pilot\nC: Judge\nD: Nurse\nCorrect Answer: D\n"
        "USER:\nWhere does Bo work?\nA: Bank\nB: Farm\nC: Port\nD: Mill\n"
        "Just give ONE letter representing the answer directly.\nASSISTANT:")
    assert mc_txt.images == [], "Pure_Text questions go through the tokenizer alone: no image"
    gen = [it for it in items if it.task == "gen"]
    assert [(it.profile, it.kind) for it in gen] == [("ada", "image"), ("ada", "text"), ("bo", "image"),
                                                     ("bo", "text")]
    assert gen[0].prompt == ("USER: <image>\nWhat is this person's job?\nAnswer the question based on your trained "
                             "knowledge in one sentence accurately in ENGLISH.\nASSISTANT: ")
    assert gen[0].images == [IMG_ADA]
    assert gen[1].prompt == ("USER: Where does Ada live?\nAnswer the question based on your trained knowledge in "
                             "one sentence in ENGLISH.\nASSISTANT:")
    assert gen[1].images == []


def test_real_set_has_no_shots_and_cloze_uses_blank():
    profiles = [_ada(), _bo()]
    items = pm.build_items(profiles, "real", {}, use_other_images=False, seed=0)   # Full_Set lacks real people
    mc = _by(items, "mc", "image")
    assert [it.profile for it in mc] == ["ada", "bo"]
    assert mc[0].prompt == ("USER: <image>\nWhere was this person born?\nA: Paris\nB: Rome\nC: Oslo\nD: Bern\n"
                            "Just give ONE letter representing the answer directly.\nASSISTANT:")
    assert mc[0].images == [IMG_ADA]
    cloze_img = _by(items, "cloze", "image")
    assert cloze_img[0].prompt == ("USER: <image>\nThis person was born in [Blank].\nPlease **ONLY** provide the "
                                   "correct answer that should replace the [Blank].\nASSISTANT:")
    assert cloze_img[0].images == [IMG_ADA]
    cloze_txt = _by(items, "cloze", "text")
    assert cloze_txt[1].prompt == ("USER:\nBo works at the [Blank].\nPlease **ONLY** provide the correct answer "
                                   "that should replace the [Blank].\nASSISTANT:")
    assert cloze_txt[1].images == []


def test_cloze_shot_blocks():
    shots = [("This person was born in __.", "Rome")]
    assert pm.cloze_prompt("This person plays __.", "image", shots) == (
        "USER:<image>\nThis person was born in [Blank].\nPlease **ONLY** provide the correct answer that should "
        "replace the [Blank].\nCorrect Answer: Rome\n"
        "USER: <image>\nThis person plays [Blank].\nPlease **ONLY** provide the correct answer that should "
        "replace the [Blank].\nASSISTANT:")
    assert pm.cloze_prompt("Bo works at the __.", "text", [("Ada works as a __.", "Nurse")]).startswith(
        "USER:\nAda works as a [Blank].\nPlease **ONLY** provide the correct answer that should replace the "
        "[Blank].\nCorrect Answer: Nurse\nUSER:\nBo works at the [Blank].")


def test_cloze_shots_with_three_profiles_carry_their_images():
    cy = _bo()
    cy.id, cy.image = "cy", b"cy-image"
    profiles = [_ada(), _bo(), cy]
    items = pm.build_items(profiles, "retain", {p.id: p for p in profiles}, use_other_images=False, seed=0)
    cloze = [it for it in items if it.task == "cloze"]
    scored = {it.profile for it in cloze}
    assert len(scored) == 1, "two of three people are the shots"
    (person,) = scored
    shot_images = [p.image for p in profiles if p.id != person]
    img_item = _by(cloze, "cloze", "image")[0]
    assert sorted(img_item.images[:-1]) == sorted(shot_images) and img_item.images[-1] == \
        {p.id: p.image for p in profiles}[person]
    assert img_item.prompt.count("<image>") == 3
    assert _by(cloze, "cloze", "text")[0].images == []


def test_test_set_images_are_drawn_with_the_seed_or_all():
    bo = _bo(OTHER)
    items = pm.build_items([bo], "test", {}, use_other_images=True, seed=3)
    gen_img = _by(items, "gen", "image")
    assert len(gen_img) == 1 and gen_img[0].images[0] in OTHER
    again = pm.build_items([_bo(OTHER)], "test", {}, use_other_images=True, seed=3)
    assert [it.images for it in again] == [it.images for it in items]
    every = pm.build_items([bo], "test", {}, use_other_images=True, seed=3, test_images="all")
    assert [it.images for it in _by(every, "gen", "image")] == [[b] for b in OTHER]
    assert len(_by(every, "gen", "text")) == 1, "a text-only item is asked once"


@pytest.mark.parametrize("reply, letter", [("b", "B"), ("(B)", None), (" B.", "B"), ("B) Rome", "B"),
                                           ("Rome", None), ("", None), ("E", None)])
def test_first_character_letter_parser(reply, letter):
    assert pm.parse_first_letter(reply, {"A": "x", "B": "y", "C": "z", "D": "w"}) == letter


def test_summary_keeps_image_and_text_apart():
    items = [pm.Item("mc", "image", "a", "q", "B", "p", [], {"A": "", "B": ""}),
             pm.Item("mc", "text", "a", "q", "A", "p", [], {"A": "", "B": ""}),
             pm.Item("mc", "text", "a", "q", "A", "p", [], {"A": "", "B": ""}),
             pm.Item("cloze", "image", "a", "q", "Rome", "p")]
    rows = pm.score_items(items, ["B", "a", "C", "born in rome, Italy"])
    out = pm.summarise(rows)
    assert out["mc_acc_image"] == 1.0 and out["mc_acc_text"] == 0.5
    assert out["cloze_acc_image"] == 1.0 and out["cloze_acc_text"] is None and out["rouge1_image"] is None
