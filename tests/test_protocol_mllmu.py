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


# ------------------------------------------------------------------ what the outside review found (eval.py @ 0e3098e)

def _person(pid: str) -> Profile:
    """A profile whose every question names its id, so a prompt shows whose shots it holds and in what order."""
    return Profile(
        id=pid, image=f"{pid}-image".encode(),
        choices=[ChoiceItem(f"Image question of {pid}?", {"A": "a", "B": "b", "C": "c", "D": "d"}, "A", "image"),
                 ChoiceItem(f"Text question of {pid}?", {"A": "a", "B": "b", "C": "c", "D": "d"}, "B", "text")],
        cloze=[GenItem(f"{pid} image cloze __.", f"{pid}-img", "Image_Textual"),
               GenItem(f"{pid} text cloze __.", f"{pid}-txt", "Pure_Text")],
        generation=[GenItem(f"What does {pid} do?", f"{pid} works.", "Image_Textual")])


def test_shots_follow_the_few_shot_files_row_order_not_the_draw():
    # eval.py :513-515: few_shot_df[few_shot_df['ID'].isin(selected_ids)].iterrows(): the file's row order.
    people = [_person(pid) for pid in ("ada", "bo", "cy", "dee")]
    ids = [p.id for p in people]
    source = {p.id: p for p in reversed(people)}          # Full_Set rows: dee, cy, bo, ada
    file_rank = {pid: i for i, pid in enumerate(source)}
    # A seed whose two-profile cloze draw comes out against the file's order.
    seed = next(s for s in range(100)
                if (lambda d: file_rank[d[0]] > file_rank[d[1]])(pm._rng(s, "forget", "cloze").sample(ids, 2)))
    drawn = pm._rng(seed, "forget", "cloze").sample(ids, 2)
    in_file_order = sorted(drawn, key=file_rank.get)
    assert drawn != in_file_order
    assert [p.id for p in pm.shot_profiles(ids, source, 2, pm._rng(seed, "forget", "cloze"))] == in_file_order
    items = pm.build_items(people, "forget", source, use_other_images=False, seed=seed, tasks=("cloze",))
    img = _by(items, "cloze", "image")[0]
    first, second = in_file_order
    assert img.prompt.index(f"{first} image cloze") < img.prompt.index(f"{second} image cloze")
    assert img.images[:2] == [f"{first}-image".encode(), f"{second}-image".encode()], "shot images follow too"
    txt = _by(items, "cloze", "text")[0]
    assert txt.prompt.index(f"{first} text cloze") < txt.prompt.index(f"{second} text cloze")
    assert {it.profile for it in items} == set(ids) - set(drawn)


@pytest.mark.parametrize("reply, scored", [
    ("Paris ASSISTANT: and also", "Paris"),
    ("  Paris\nUSER: again ASSISTANT: Rome ASSISTANT: x", "Paris\nUSER: again"),
    ("ASSISTANT: Paris", ""),
    ("Paris. Answer: Rome", "Paris. Answer: Rome"),       # eval.py's "Answer:" branch never runs for LLaVA
    (" Paris ", "Paris"),
])
def test_reply_cut_is_eval_pys_split_on_the_decoded_prompt_and_reply(reply, scored):
    assert pm.official_reply(reply) == scored
    # eval.py decodes prompt + reply and keeps split("ASSISTANT:")[1].strip() (:627, :759): the same text,
    # because every prompt built here holds "ASSISTANT:" exactly once, at its end.
    people = [_person("ada"), _person("bo"), _person("cy")]
    items = pm.build_items(people, "retain", {p.id: p for p in people}, use_other_images=False, seed=0)
    assert {it.task for it in items} == {"mc", "cloze", "gen"}
    for it in items:
        assert it.prompt.count("ASSISTANT:") == 1 and it.prompt.rstrip().endswith("ASSISTANT:"), it.prompt
        generated_text = it.prompt + reply
        assert generated_text.split("ASSISTANT:")[1].strip() == scored


def test_cloze_and_generation_score_the_cut_reply():
    items = [pm.Item("gen", "image", "a", "Where?", "Paris", "p"),
             pm.Item("cloze", "text", "a", "q", "Rome", "p"),
             pm.Item("cloze", "text", "a", "q", "Rome", "p")]
    rows = pm.score_items(items, ["Paris ASSISTANT: and also", "Paris ASSISTANT: Rome", "Rome ASSISTANT: x"])
    gen, cloze_after, cloze_before = rows
    assert gen["answer"] == "Paris" and gen["reply"] == "Paris ASSISTANT: and also"
    from pipeline.evaluation import metrics
    assert gen["scores"]["rougeL"] == metrics.rouge_scores("Paris", "Paris")["rougeL"] == 1.0
    assert gen["scores"]["rougeL"] != metrics.rouge_scores("Paris ASSISTANT: and also", "Paris")["rougeL"]
    assert gen["scores"]["bleu"] == metrics.bleu_official("Paris", "Paris")
    assert not cloze_after["scores"]["correct"], "the ground truth after a second turn does not count"
    assert cloze_before["scores"]["correct"]
    assert "reply" not in pm.score_items(items[:1], ["Paris"])[0], "the whole reply is kept only when cut"


def test_multiple_choice_reads_fifty_new_tokens(monkeypatch):
    # eval.py evaluate_classification: max_new_tokens=50 for llava, image (:372) and text (:428) questions.
    assert pm.MC_NEW_TOKENS == 50
    from pipeline.evaluation import evaluate as ev
    assert ev.OFFICIAL_MC_NEW_TOKENS == 50, "the official row's mc_new_tokens"
    budgets = {}

    def fake(model, processor, items, max_new_tokens, batch_size=16, desc=None):
        if items:
            budgets[items[0].task] = max_new_tokens
        return ["A"] * len(items)
    monkeypatch.setattr(pm, "generate_items", fake)
    people = [_person(pid) for pid in ("ada", "bo", "cy", "dee")]
    pm.evaluate_official(None, None, people, "retain", {p.id: p for p in people}, use_other_images=False,
                         max_new_tokens=7)
    assert budgets == {"mc": 50, "cloze": 7, "gen": 7}


def test_tasks_leave_others_out_and_keep_the_rest_as_asked():
    people = [_person(pid) for pid in ("ada", "bo", "cy", "dee")]
    for p in people:
        p.images = [f"{p.id}-other-{i}".encode() for i in range(3)]
    source = {p.id: p for p in people}
    full = pm.build_items(people, "test", source, use_other_images=True, seed=5)
    for tasks in (("mc",), ("cloze",), ("gen",), ("mc", "gen")):
        part = pm.build_items(people, "test", source, use_other_images=True, seed=5, tasks=tasks)
        assert {it.task for it in part} == set(tasks)
        assert part == [it for it in full if it.task in tasks], "same shots and pictures as in a full run"


def test_item_counts_are_the_items_scored():
    people = [_person(pid) for pid in ("ada", "bo", "cy")]
    items = pm.build_items(people, "forget", {p.id: p for p in people}, use_other_images=False, seed=0)
    rows = pm.score_items(items, ["x"] * len(items))
    # One MC shot profile (2 questions) and two cloze shot profiles (2 each) are not scored; generation has no shots.
    assert pm.item_counts(people, rows) == {"profiles": 3, "mc": 4, "cloze": 2, "gen": 3}


def test_bleu_note_names_what_the_official_rows_compute():
    from pipeline.evaluation import metrics
    assert "NLTK sentence_bleu" in pm.BLEU_NOTE and "method1" in pm.BLEU_NOTE and "compute_bleu" in pm.BLEU_NOTE
    assert pm.BLEU_NOTE != metrics.BLEU_NOTE
    # eval.py compute_bleu(ground_truth, predicted_answer), :57-78, on the same strings.
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    for reference, reply in (("She is a nurse in Rome.", "She is a nurse."), ("Ada lives in Rome.", "Rome"),
                             ("Bo works at the bank.", "Bo works at the bank.")):
        theirs = sentence_bleu([reference.split()], reply.split(), smoothing_function=SmoothingFunction().method1)
        assert metrics.bleu_official(reply, reference) == pytest.approx(theirs, abs=0)
