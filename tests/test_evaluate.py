"""Evaluation: the protocol on hand-built profiles with canned answers, and end to end on a tiny model."""
import csv
import io
import json
import re

import shutil

import pytest
import torch
from PIL import Image

import pipeline.evaluation.evaluate as ev
from tests.tiny import evaluate_with
from pipeline.evaluation import metrics, mia
from pipeline.data.mllmu import DataError, read_split
from pipeline.data.records import ChoiceItem, GenItem, Profile, QA
from pipeline.models.encoding import encode_prompt, pixel_values, load_image
from pipeline.models.modeling import ModelError, load_model, wrap_lora
from pipeline.models.prompts import fact_prompt, multiple_choice_prompt
from pipeline.jobs.report import load_results
from tests.tiny import make_world, tiny_config

TINY = tiny_config(max_positions=512)
FAST = dict(max_new_tokens=6, batch_size=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory, TINY, n_fictitious=10, pool_size=2, train_images=1, test_images=2)


# ------------------------------------------------------- canned answers, hand counts

def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (side, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _person(pid, side, letters, city):
    """Two choices (image, text), one generation and one cloze item; held-out pictures twice the size."""
    opts = {"A": "Lyon", "B": "Graz", "C": "Cork", "D": "Riga"}
    return Profile(
        id=pid, image=_png(side), images=[_png(2 * side), _png(3 * side)],
        qa=[QA(f"Where was {pid} born?", f"{pid} was born in {city}.", city)],
        choices=[ChoiceItem(f"Where was this person {pid} born?", opts, letters[0], "image"),
                 ChoiceItem(f"Which city is {pid} from?", opts, letters[1], "text")],
        generation=[GenItem(f"Tell me where {pid} was born.", f"{pid} was born in {city}.", "Image_Textual")],
        cloze=[GenItem(f"{pid} was born in __.", city, "Image_Textual")])


PEOPLE = [_person("ann", 10, "AB", "Lyon"), _person("bob", 11, "CD", "Cork")]
# Image questions right, text questions wrong: 2 of 4 overall, image 2 of 2, text 0 of 2.
CANNED_MC = {"Where was this person ann born?": "A", "Which city is ann from?": "Answer: A",
             "Where was this person bob born?": "(C) Cork", "Which city is bob from?": "Bob"}
CANNED_GEN = {"ann": "ann was born in Lyon.", "bob": "zq zq zq zq zq zq"}
CANNED_CLOZE = {"ann": "in lyon, France", "bob": "Paris"}


class Recorder:
    """Stands in for `generate`: canned answers keyed on the prompt, and remembers what it was shown."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, processor, images, prompts, max_new_tokens=50, batch_size=32, desc=None):
        self.calls.append({"images": list(images), "prompts": list(prompts), "max_new_tokens": max_new_tokens})
        return [self._answer(p) for p in prompts]

    @staticmethod
    def _answer(prompt):
        last = prompt.rsplit("\nASSISTANT:", 1)[0]
        for question, answer in CANNED_MC.items():
            if last.endswith(question + "\nA: Lyon\nB: Graz\nC: Cork\nD: Riga\n"
                             "Just give ONE letter representing the answer directly."):
                return answer
        who = "ann" if re.search(r"\bann\b", last) else "bob"
        return (CANNED_CLOZE if "Fill in the blank" in last else CANNED_GEN)[who]


@pytest.fixture
def canned(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(ev, "generate", recorder)
    # Likelihood metrics need a model; they are tested in test_scoring.py.
    monkeypatch.setattr(ev, "likelihood_metrics", lambda *a, **k: (dict.fromkeys(ev.LL_METRIC_KEYS), []))
    return recorder


def _fact_items_of(call):
    """(image side, token limit) of the fact-check items of a recorded call (PEOPLE's training questions)."""
    asked = {fact_prompt(qa.question) for p in PEOPLE for qa in p.qa}
    return [(im.size[0], n) for im, p, n in zip(call["images"], call["prompts"], call["max_new_tokens"]) if p in asked]


def test_metrics_match_hand_counts(canned):
    recorder = canned
    vocab = {"ann", "bob", "was", "born", "in", "lyon", "cork"}
    result, rows = ev.evaluate_profiles(None, None, PEOPLE, False, vocabulary=vocab, set_name="forget")
    assert result["mc_acc"] == 0.5 and result["mc_acc_image"] == 1.0 and result["mc_acc_text"] == 0.0
    assert result["cloze_acc"] == 0.5
    # Fact check: ann's answer names Lyon, bob's names nothing.
    assert result["fact_acc"] == 0.5
    # ann's answer is the reference word for word; bob's shares nothing with his.
    assert result["rouge1"] == pytest.approx(0.5) and result["rougeL"] == pytest.approx(0.5)
    assert result["coherence"] == 0.5, "the looping 'zq zq ...' answer must not count as coherent"
    mc = {r["question"]: r for r in rows if r["kind"] == "mc"}
    assert [mc[q]["scores"]["correct"] for q in CANNED_MC] == [True, False, True, False]
    assert mc["Which city is bob from?"]["scores"]["parsed"] is None
    gen = {r["profile"]: r for r in rows if r["kind"] == "gen"}
    assert gen["ann"]["scores"]["rouge1"] == 1.0 and gen["ann"]["scores"]["bleu"] == pytest.approx(1.0)
    assert {r["kind"] for r in rows} == {"mc", "gen", "cloze", "fact"} and all(r["set"] == "forget" for r in rows)
    mc_call = next(c for c in recorder.calls if "Just give ONE letter" in c["prompts"][0])
    assert mc_call["max_new_tokens"] == ev.MC_NEW_TOKENS
    # Open generation and the fact check share one decoding pass, each item with its own token limit.
    (both,) = [c for c in recorder.calls if isinstance(c["max_new_tokens"], list)]
    assert sorted(both["max_new_tokens"]) == [ev.FACT_NEW_TOKENS] * 2 + [50] * 2
    assert [n for _, n in _fact_items_of(both)] == [ev.FACT_NEW_TOKENS] * 2


def test_classifier_decides_coherence_when_given(canned):
    judged = []

    def classifier(texts):
        judged.extend(texts)
        return ["noise" for _ in texts]

    result, _ = ev.evaluate_profiles(None, None, PEOPLE, False, classifier=classifier)
    assert result["coherence"] == 0.0 and sorted(judged) == sorted(CANNED_GEN.values())


def test_few_shot_examples_come_from_other_profiles(canned):
    recorder = canned
    ev.evaluate_profiles(None, None, PEOPLE, False, few_shot=1, vocabulary=set())
    prompts = next(c for c in recorder.calls if "Just give ONE letter" in c["prompts"][0])["prompts"]
    bob_first = PEOPLE[1].choices[0]
    shot = (bob_first.question, bob_first.options, bob_first.correct)
    assert prompts[0] == multiple_choice_prompt(PEOPLE[0].choices[0].question, PEOPLE[0].choices[0].options, [shot])
    assert f"Answer: {bob_first.correct}" in prompts[0]
    # A profile's own other items would leak its answers: never used as its shots.
    assert "Which city is ann from?" not in prompts[0] and prompts[0].count("Answer:") == 1
    recorder.calls.clear()
    ev.evaluate_profiles(None, None, PEOPLE, False, few_shot=0, vocabulary=set())
    prompts = next(c for c in recorder.calls if "Just give ONE letter" in c["prompts"][0])["prompts"]
    assert all("Answer:" not in p for p in prompts)
    assert ev.few_shot_examples(PEOPLE[:1], 0, 0, 3) == [], "a one-profile set has nobody to borrow shots from"


@pytest.mark.parametrize("other, sides, fact_sides", [(False, {10, 11}, [10, 11]), (True, {20, 22}, [20, 30, 22, 33])])
def test_test_set_is_shown_the_other_images(canned, other, sides, fact_sides):
    """The test set's questions show each person's first other picture; its fact check asks about every one."""
    recorder = canned
    ev.evaluate_profiles(None, None, PEOPLE, other, vocabulary=set())
    (both,) = [c for c in recorder.calls if isinstance(c["max_new_tokens"], list)]
    facts = [side for side, _ in _fact_items_of(both)]
    asked = {fact_prompt(qa.question) for p in PEOPLE for qa in p.qa}
    shown = {im.size[0] for call in recorder.calls for im, p in zip(call["images"], call["prompts"]) if p not in asked}
    assert shown == sides and facts == fact_sides


def test_missing_other_images_is_one_line(canned):
    bare = Profile(id="cy", image=_png(5), choices=PEOPLE[0].choices)
    with pytest.raises(DataError, match="profile cy has no other images"):
        ev.evaluate_profiles(None, None, [bare], True)


# ---------------------------------------------------------------- data selection

def test_eval_sets_select_the_four_sets(world):
    root, _ = world
    sets = ev.eval_sets(root, "forget_10", "")
    forget_ids = {p.id for p in sets["forget"][0]}
    assert {k: v[1] for k, v in sets.items()} == {"forget": False, "test": True, "retain": False, "real": False}
    assert {p.id for p in sets["test"][0]} == forget_ids and len(forget_ids) == 1
    assert all(p.images for p in sets["test"][0])
    assert not forget_ids & {p.id for p in sets["retain"][0]} and len(sets["retain"][0]) == 9
    assert [p.id for p in sets["real"][0]] == [p.id for p in read_split(root, "Retain_Set")]


def test_missing_split_and_bad_inputs_are_one_line(world, tmp_path):
    root, model_dir = world
    with pytest.raises(DataError, match="split 'forget_99' not found") as err:
        evaluate_with(ev.evaluate, model_dir, root, "forget_99", "retain_90", results_path=tmp_path / "r.jsonl")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="shares 1 profile"):
        ev.eval_sets(root, "forget_10", "forget_15")
    with pytest.raises(ValueError, match="unknown evaluation set"):
        ev.parse_sets("forget,holdout")
    with pytest.raises(ModelError, match="not a local Hugging Face model directory"):
        ev.load_coherence_classifier(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="no adapter_config.json"):
        ev.load_for_eval(model_dir, adapter=tmp_path)
    assert not (tmp_path / "r.jsonl").exists()


def test_vocabulary_holds_the_benchmarks_words(world):
    root, _ = world
    vocab = ev.benchmark_vocabulary(root)
    p = read_split(root, "Test_Set")[0]
    assert {"this", "person", "born"} <= vocab and all(w == w.lower() for w in vocab)
    assert set(p.choices[0].options["A"].lower().split()) <= vocab
    assert metrics.is_coherent(p.generation[0].ground_truth, vocab)
    assert not metrics.is_coherent("Qorvath blenxu zintrapel", vocab)


def test_vocabulary_follows_the_benchmark_files(tmp_path):
    from pipeline.data.mllmu import write_split
    person = lambda word: Profile(id="p1", image=b"not checked", question=f"Who is {word}?", answer=word)
    write_split(tmp_path, "forget_10", [person("Qorvath")])
    assert "qorvath" in ev.benchmark_vocabulary(tmp_path)
    write_split(tmp_path, "forget_10", [person("Blenxuzin")])       # rewritten: read again, not remembered
    vocab = ev.benchmark_vocabulary(tmp_path)
    assert "blenxuzin" in vocab and "qorvath" not in vocab


# ----------------------------------------------------------- end to end, tiny model

@pytest.fixture(scope="module")
def two_runs(world, tmp_path_factory):
    root, model_dir = world
    out = tmp_path_factory.mktemp("eval")
    first = evaluate_with(ev.evaluate, model_dir, root, "forget_10", method="Vanilla", results_path=out / "results.jsonl", **FAST)
    second = evaluate_with(ev.evaluate, model_dir, root, "forget_10", method="GA", setting={"steps": 5, "lr": 1e-3}, budget=5,
                         seed=1, sets="forget", cache_fingerprint="ab12", results_path=out / "results.jsonl", **FAST)
    return out, first, second


def test_evaluate_writes_a_full_row(two_runs):
    out, first, _ = two_runs
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert row == first
    # The world has never-trained people (Holdout_Set): evaluate.mia auto scores membership.
    assert set(row["metrics"]) == {"forget", "test", "retain", "real", "mia"}
    m = row["metrics"].pop("mia")
    assert m["n_members"] == 6 * row["n_items"]["forget"]["profiles"] and m["n_nonmembers"] == 6 * 12
    assert all(0.0 <= m[f"mia_auc_{a}"] <= 1.0 for a in mia.ATTACKS) and "privleak_min_k" not in m
    assert m["mia_auc_best_of_4_biased"] == m[f"mia_auc_{mia.ATTACKS[int(m['best_of_4_attack'])]}"]
    assert row["mia_attack"] == "min_k"
    assert "membership AUC" in ev.format_row(first) and "(no gold model)" in ev.format_row(first)
    for name, values in row["metrics"].items():
        assert set(values) == set(ev.METRIC_KEYS), name
        # A one-profile set has one cloze candidate per blank: likelihood cloze is not scored (scoring.py).
        alone = row["n_items"][name]["profiles"] == 1
        assert (values["cloze_ll_acc"] is None) == alone, name
        assert all(0.0 <= v <= 1.0 for k, v in values.items() if k != "cloze_ll_acc" or not alone), (name, values)
    assert row["coherence_kind"] == metrics.COHERENCE_LABEL and row["bleu_note"] == metrics.BLEU_NOTE
    assert row["retain_split"] == "retain_90" and row["n_items"]["forget"]["mc"] == 6
    assert "test" in ev.format_row(row) and "%" in ev.format_row(row)


def test_per_sample_file_has_the_answers(two_runs):
    out, first, _ = two_runs
    rows = [json.loads(line) for line in open(first["samples"])]
    assert first["samples"] == str(out / "samples-vanilla-forget_10-0-0.jsonl")
    assert {r["set"] for r in rows} == {"forget", "test", "retain", "real", "mia"}
    scored = [r for r in rows if r["set"] == "mia"]     # every member and non-member QA, with its four scores
    assert len(scored) == 6 + 6 * 12 and {r["reference"] for r in scored} == {"member", "non-member"}
    assert all(set(r["scores"]) == set(mia.ATTACKS) for r in scored)
    gen = [r for r in rows if r["kind"] == "gen"]
    assert len(gen) == 6 * (1 + 1 + 9 + 2)
    assert all(isinstance(r["answer"], str) for r in gen) and any(r["answer"] for r in gen)
    assert {"rouge1", "bleu", "coherent"} <= set(gen[0]["scores"])


def test_results_accumulate_and_csv_has_one_line_per_run(two_runs):
    out, _, second = two_runs
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["Vanilla", "GA"]
    assert table[1]["setting.steps"] == "5" and table[1]["test.mc_acc"] == ""
    assert float(table[0]["test.mc_acc"]) == pytest.approx(_first_row(out)["metrics"]["test"]["mc_acc"])
    df = load_results(out / "results.jsonl")
    assert list(df["method"]) == ["Vanilla", "GA"] and "forget.rougeL" in df.columns
    assert set(second["metrics"]) == {"forget", "mia"}


def test_tasks_left_out_cost_nothing_and_read_none(world, tmp_path):
    root, model_dir = world
    row = evaluate_with(ev.evaluate, model_dir, root, "forget_10", sets="forget", likelihood_sets="forget", tasks="gen,fact",
                      results_path=tmp_path / "r.jsonl", mia="off", **FAST)
    m = row["metrics"]["forget"]
    assert m["mc_acc"] is None and m["cloze_acc"] is None and m["rougeL"] is not None and m["fact_acc"] is not None
    assert m["mc_ll_acc"] is not None, "the likelihood reading of MC stays"
    kinds = {json.loads(line)["kind"] for line in open(row["samples"])}
    assert "mc" not in kinds and "cloze" not in kinds and "gen" in kinds and row["tasks"] == ["gen", "fact"]
    with pytest.raises(ValueError, match="config key 'evaluate.tasks' must be one of"):
        evaluate_with(ev.evaluate, model_dir, root, "forget_10", tasks="gen,essay", results_path=tmp_path / "r.jsonl", **FAST)


def test_sets_outside_gen_sets_skip_open_generation_only(world, tmp_path):
    root, model_dir = world
    row = evaluate_with(ev.evaluate, model_dir, root, "forget_10", sets="forget,test", likelihood_sets="forget",
                        tasks="gen,fact", gen_sets="forget", results_path=tmp_path / "r.jsonl", mia="off", **FAST)
    forget, test = row["metrics"]["forget"], row["metrics"]["test"]
    assert forget["rougeL"] is not None and forget["coherence"] is not None
    assert test["rougeL"] is None and test["bleu"] is None and test["coherence"] is None
    assert test["fact_acc"] is not None and row["n_items"]["test"]["gen"] == 0 < row["n_items"]["test"]["fact"]
    # A set whose only task is left out is still a row, every metric None.
    alone = evaluate_with(ev.evaluate, model_dir, root, "forget_10", sets="test", likelihood_sets="forget",
                          tasks="gen", gen_sets="forget", results_path=tmp_path / "r2.jsonl", mia="off", **FAST)
    assert all(v is None for v in alone["metrics"]["test"].values())


def test_membership_needs_never_trained_people(world, tmp_path):
    root, model_dir = world
    bare = tmp_path / "bare"
    shutil.copytree(root, bare, ignore=shutil.ignore_patterns("Holdout_Set"))
    out = tmp_path / "r.jsonl"
    row = evaluate_with(ev.evaluate, model_dir, bare, "forget_10", sets="forget", results_path=out, likelihood_sets="forget", **FAST)
    assert "mia" not in row["metrics"] and "skipped: no split 'Holdout_Set'" in row["mia_note"]
    assert row["mia_note"] in ev.format_row(row)
    with pytest.raises(DataError, match="MLLMU-Bench has none") as err:
        evaluate_with(ev.evaluate, model_dir, bare, "forget_10", sets="forget", results_path=out, mia="on", **FAST)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="config key 'evaluate.mia' must be one of"):
        evaluate_with(ev.evaluate, model_dir, root, "forget_10", sets="forget", results_path=out, mia="maybe", **FAST)
    off = evaluate_with(ev.evaluate, model_dir, root, "forget_10", sets="forget", results_path=out, mia="off", **FAST)
    assert "mia" not in off["metrics"]


def test_gold_model_gives_privleak_and_is_scored_once(world, tmp_path, monkeypatch):
    """PrivLeak = 100 (AUC - gold AUC) / gold AUC per attack; the gold model's AUCs are kept beside it."""
    root, model_dir = world
    gold = tmp_path / "gold"
    shutil.copytree(model_dir, gold)
    calls = []
    real = mia.membership
    monkeypatch.setattr(mia, "membership", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(sets="forget", likelihood_sets="forget", gold=str(gold), **FAST)
    row = evaluate_with(ev.evaluate, model_dir, root, "forget_10", results_path=tmp_path / "a.jsonl", **kw)
    m = row["metrics"]["mia"]
    for a in mia.ATTACKS:   # the same weights: the gold model's AUC is the model's, PrivLeak 0
        assert m[f"gold_auc_{a}"] == pytest.approx(m[f"mia_auc_{a}"]) and m[f"privleak_{a}"] == pytest.approx(0)
    assert (gold / "mia-gold.json").is_file() and len(calls) == 2
    evaluate_with(ev.evaluate, model_dir, root, "forget_10", results_path=tmp_path / "b.jsonl", **kw)
    assert len(calls) == 3, "the gold model's scores are remembered, not recomputed"
    assert "PrivLeak +0.0% (viker: 100(AUC-g)/g), +0.0% (OpenUnlearning/MUSE" in ev.format_row(row)


def _first_row(out):
    return json.loads((out / "results.jsonl").read_text().splitlines()[0])


def _logits(model, processor, profile):
    ids = torch.tensor([encode_prompt(processor, "USER: <image>\nWhere was this person born?\nASSISTANT:")])
    pixels = pixel_values(processor, [load_image(profile.image)])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def test_adapter_changes_the_model_and_merges(world, tmp_path):
    root, model_dir = world
    peft_model = wrap_lora(load_model(model_dir)[0], r=4, alpha=8)
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    profile = read_split(root, "forget_10")[0]
    base, processor = ev.load_for_eval(model_dir)
    tuned, _ = ev.load_for_eval(model_dir, adapter=tmp_path / "adapter")
    assert not any("lora" in n for n, _ in tuned.named_parameters()), "the adapter must be merged"
    peft_model.eval()
    expected = _logits(peft_model, processor, profile)
    assert torch.allclose(_logits(tuned, processor, profile), expected, atol=1e-4)
    assert not torch.allclose(_logits(base, processor, profile), expected, atol=1e-2)
    alone, _ = ev.load_for_eval(tmp_path / "adapter")   # an adapter directory names its own base
    assert torch.allclose(_logits(alone, processor, profile), expected, atol=1e-4)


def _always_clean_classifier(folder):
    """A tiny local BERT whose bias makes every text 'clean': coherence must then be 1.0."""
    from transformers import BertConfig, BertForSequenceClassification
    from pipeline.models.modeling import train_tokenizer
    tok = train_tokenizer(["this person was born in Lyon"], 300)
    tok.model_max_length = 64
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                     id2label={0: "clean", 1: "noise"}, label2id={"clean": 0, "noise": 1})
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([10.0, -10.0]))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_configured_classifier_replaces_the_model_free_score(world, tmp_path, monkeypatch):
    root, model_dir = world
    clf = _always_clean_classifier(tmp_path / "gib")
    # Loops the model-free score calls incoherent: only the classifier can make them coherent.
    monkeypatch.setattr(ev, "generate", lambda m, p, images, prompts, **kw: ["zq zq zq zq zq"] * len(prompts))
    assert not metrics.is_coherent("zq zq zq zq zq", ev.benchmark_vocabulary(root))
    row = evaluate_with(ev.evaluate, model_dir, root, "forget_10", sets=("forget",), coherence_classifier=str(clf),
                      results_path=tmp_path / "results.jsonl", device="cpu", **FAST)
    assert row["coherence_kind"] == f"classifier: {clf}"
    assert row["metrics"]["forget"]["coherence"] == 1.0
    assert [json.loads(line)["coherence_kind"] for line in open(tmp_path / "results.jsonl")] == [row["coherence_kind"]]


# ------------------------------------------------------- the official MLLMU-Bench protocol

@pytest.fixture(scope="module")
def official_root(world, tmp_path_factory):
    import shutil
    root, _ = world
    copy = tmp_path_factory.mktemp("official") / "mini"
    shutil.copytree(root, copy)
    shutil.copytree(copy / "ft_Data", copy / "Full_Set")     # the few-shot source eval.py reads
    return copy


def test_official_protocol_end_to_end(world, official_root, tmp_path):
    _, model_dir = world
    row = evaluate_with(ev.evaluate, model_dir, official_root, "forget_10", results_path=tmp_path / "r.jsonl",
                      sets="forget,test,retain,real", protocol="official", eval_seed=1, **FAST)
    assert row["protocol"] == "official" and row["protocol_id"] == "mllmu-official-v2" and row["eval_seed"] == 1
    assert "mia" in row["metrics"]        # membership inference does not depend on the protocol
    for name, values in row["metrics"].items():
        if name == "mia":
            continue
        for key in ("mc_acc", "rouge1", "rouge2", "rougeL", "bleu", "cloze_acc", "coherence"):
            assert values[key] is None, "the official protocol never pools Image_Textual with Pure_Text"
        for key in ("rougeL_image", "rougeL_text", "bleu_image"):
            assert 0.0 <= values[key] <= 1.0, (name, key)
    # forget_10 holds one person here: eval.py's one shot profile is that person, whose questions are then
    # the shots and not scored; retain has several people, so it is scored.
    assert row["n_items"]["forget"]["profiles"] == 1 and row["metrics"]["forget"]["mc_acc_image"] is None
    assert 0.0 <= row["metrics"]["retain"]["mc_acc_image"] <= 1.0
    assert 0.0 <= row["metrics"]["retain"]["cloze_acc_text"] <= 1.0
    samples = [json.loads(line) for line in open(row["samples"])]
    mc_text = [s for s in samples if s["kind"] == "mc" and s["type"] == "text"]
    assert mc_text and all(s["n_images"] == 0 for s in mc_text)
    forget_mc_img = [s for s in samples if s["set"] == "retain" and s["kind"] == "mc" and s["type"] == "image"]
    assert forget_mc_img and all(s["n_images"] >= 2 for s in forget_mc_img), "shot images + the item's image"
    assert all(s["n_images"] == 1 for s in samples if s["set"] == "real" and s["kind"] == "mc" and s["type"] == "image")
    with pytest.raises(DataError, match="few-shot examples from split 'Full_Set'"):
        evaluate_with(ev.evaluate, model_dir, world[0], "forget_10", results_path=tmp_path / "r2.jsonl", sets="forget",
                    protocol="official", **FAST)


def test_official_batches_mix_text_only_and_multi_image_items(world):
    from pipeline.evaluation import protocol_mllmu as pm
    root, model_dir = world
    model, processor = load_model(model_dir, device="cpu")
    p, q = read_split(root, "retain_90")[:2]
    items = [pm.Item("gen", "text", p.id, "q", "r", pm.generation_prompt("Who is she?", "text")),
             pm.Item("mc", "image", p.id, "q", "A", "USER: <image>\nx\nUSER: <image>\nWho?\nASSISTANT:",
                     [q.image, p.image]),
             pm.Item("gen", "image", q.id, "q", "r", pm.generation_prompt("Who is he?", "image"), [q.image])]
    together = pm.generate_items(model, processor, items, max_new_tokens=4, batch_size=3)
    alone = [pm.generate_items(model, processor, [it], max_new_tokens=4, batch_size=1)[0] for it in items]
    assert together == alone


def test_official_row_counts_scored_items_names_nltk_bleu_and_honours_tasks(world, official_root, tmp_path,
                                                                           monkeypatch):
    """No model: canned replies. n_items after max_profiles and the shot profiles; bleu_note; evaluate.tasks."""
    from pipeline.evaluation import protocol_mllmu as pm
    asked = []

    def replies(model, processor, items, max_new_tokens, batch_size=16, desc=None):
        asked.extend((it.task, max_new_tokens) for it in items)
        return ["A ASSISTANT: B"] * len(items)

    def no_fact(*args, **kwargs):
        raise AssertionError("fact is not in evaluate.tasks")
    monkeypatch.setattr(pm, "generate_items", replies)
    monkeypatch.setattr(ev, "load_for_eval", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(ev, "fact_accuracy", no_fact)
    _, model_dir = world
    row = evaluate_with(ev.evaluate, model_dir, official_root, "forget_10", results_path=tmp_path / "r.jsonl",
                        sets="retain", protocol="official", eval_seed=2, max_profiles=2, mia="off", tasks="mc,gen",
                        max_new_tokens=9)
    assert row["bleu_note"] == pm.BLEU_NOTE and "NLTK sentence_bleu" in row["bleu_note"]
    assert row["mc_new_tokens"] == 50 and row["tasks"] == ["mc", "gen"]
    assert {task for task, _ in asked} == {"mc", "gen"} and {n for task, n in asked if task == "mc"} == {50}
    m = row["metrics"]["retain"]
    assert m["cloze_acc_image"] is None and m["cloze_acc_text"] is None and m["fact_acc"] is None
    assert m["mc_acc_image"] is not None and m["rougeL_image"] is not None
    two = read_split(official_root, "retain_90")[:2]
    source = ev.official_shot_source(official_root, "Full_Set")
    (shot,) = pm.shot_profiles([p.id for p in two], source, 1, pm._rng(2, "retain", "mc"))
    scored_mc = sum(len(p.choices) for p in two if p.id != shot.id)
    assert row["n_items"]["retain"] == {"profiles": 2, "mc": scored_mc, "cloze": 0, "fact": 0,
                                        "gen": sum(len(p.generation) for p in two)}
    assert scored_mc < ev._counts(two)["mc"], "the shot profile's questions are not counted"
    samples = [json.loads(line) for line in open(row["samples"])]
    assert sum(s["kind"] == "mc" for s in samples) == scored_mc
    assert all(s["answer"] == "A" and s["reply"] == "A ASSISTANT: B" for s in samples)
    assert all(s["scores"]["parsed"] == "A" for s in samples if s["kind"] == "mc")


def test_items_with_their_own_token_limits_answer_as_if_asked_alone(world):
    """One decoding pass for items of several tasks: each answer is the one its own limit gives."""
    from pipeline.models.generation import generate
    from pipeline.models.prompts import generation_prompt
    root, model_dir = world
    model, processor = load_model(model_dir, device="cpu")
    p, q = read_split(root, "retain_90")[:2]
    images = [load_image(p.image), load_image(q.image), load_image(p.image)]
    prompts = [generation_prompt(p.generation[0].question), fact_prompt(q.qa[0].question), fact_prompt(p.qa[0].question)]
    limits = [7, 2, 4]
    together = generate(model, processor, images, prompts, max_new_tokens=limits, batch_size=3)
    alone = [generate(model, processor, [im], [pr], max_new_tokens=n, batch_size=1)[0]
             for im, pr, n in zip(images, prompts, limits)]
    assert together == alone
    assert len(processor.tokenizer(together[1], add_special_tokens=False).input_ids) <= 2 < len(
        processor.tokenizer(together[0], add_special_tokens=False).input_ids)
    with pytest.raises(ValueError, match="2 token limits for 3 prompts"):
        generate(model, processor, images, prompts, max_new_tokens=[1, 2])
