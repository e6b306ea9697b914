"""Metric tests against values worked out by hand."""
import pytest

from pipeline.evaluation.metrics import (BLEU_NOTE, COHERENCE_LABEL, aggregate_generation, bleu_score,
                                         choice_accuracy, classifier_coherence, cloze_correct, coherence_score,
                                         is_coherent, parse_choice_letter, rouge_scores)


# ---------------------------------------------------------------- multiple choice

@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("  B\n", "B"), ("B.", "B"), ("(B)", "B"), ("B) Lisbon", "B"),
    ("Answer: B", "B"), ("answer: (D)", "D"), ("The answer is C", "C"),
    ("The correct answer is A.", "A"), ("**D**", "D"), ("C: a marine biologist", "C"),
])
def test_parse_choice_letter_accepts_common_forms(text, letter):
    assert parse_choice_letter(text) == letter


@pytest.mark.parametrize("text", [
    "", "   ", "US US US", "E", "ABBA", "Alice", "Because", "b", "Answer:", "42",
])
def test_parse_choice_letter_rejects_malformed(text):
    assert parse_choice_letter(text) is None


def test_parse_choice_letter_respects_options():
    assert parse_choice_letter("E", options="ABCDE") == "E"
    assert parse_choice_letter("D", options="ABC") is None
    with pytest.raises(ValueError):
        parse_choice_letter("A", options="abcd")


def test_choice_accuracy_counts_malformed_as_wrong():
    responses = ["A", "(B) Paris", "US US US", "D."]
    assert choice_accuracy(responses, ["A", "b", "C", "C"]) == pytest.approx(2 / 4)


def test_choice_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        choice_accuracy(["A"], ["A", "B"])
    with pytest.raises(ValueError):
        choice_accuracy([], [])


# ------------------------------------------------------------------------ ROUGE

def test_rouge_partial_overlap_by_hand():
    # unigrams: P = 3/3, R = 3/6 -> F = 2PR/(P+R) = 2/3
    # bigrams: "the cat", "cat sat" both in the 5 reference bigrams: P = 1, R = 2/5 -> 4/7
    # LCS = 3 words: P = 1, R = 1/2 -> 2/3
    scores = rouge_scores("the cat sat", "the cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(4 / 7)
    assert scores["rougeL"] == pytest.approx(2 / 3)


def test_rouge_uses_stemmer():
    # "cats"/"cat" and "sitting"/"sit" only match after Porter stemming.
    assert rouge_scores("cats sitting", "cat sit")["rouge1"] == pytest.approx(1.0)


def test_rouge_identical_and_disjoint():
    assert rouge_scores("she lives in Lisbon", "she lives in Lisbon") == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert rouge_scores("red green blue", "one two three") == pytest.approx(
        {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0})


def test_rouge_l_differs_from_rouge1_on_word_order():
    # same bag of words -> rouge1 = 1; LCS "a b" is 2 of 3 -> rougeL = 2/3;
    # bigrams: only "a b" of 2 is shared on each side -> rouge2 = 1/2
    scores = rouge_scores("c a b", "a b c")
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rougeL"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(1 / 2)


# ------------------------------------------------------------------------- BLEU

def test_bleu_identical_disjoint_empty():
    assert bleu_score("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert bleu_score("red green blue yellow", "one two three four") == 0.0
    assert bleu_score("", "one two three four") == 0.0
    assert bleu_score("   ", "one two three four") == 0.0


def test_bleu_by_hand_without_smoothing():
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu_score("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(expected)


def test_bleu_exp_smoothing_by_hand():
    # precisions 4/5, 2/4, 1/3 and 0/2 -> 'exp' smoothing replaces the zero by 1/(2*2)
    expected = (4 / 5 * 2 / 4 * 1 / 3 * 1 / 4) ** 0.25
    assert bleu_score("a b c d e", "a b c x e") == pytest.approx(expected)
    assert "sacrebleu" in BLEU_NOTE and "NLTK" in BLEU_NOTE


def test_bleu_empty_reference_is_an_error():
    with pytest.raises(ValueError):
        bleu_score("anything", " ")


def test_aggregate_generation_means_pairs():
    result = aggregate_generation(["the cat sat", "red green blue"],
                                  ["the cat sat on the mat", "one two three"])
    assert result["rouge1"] == pytest.approx((2 / 3 + 0) / 2)
    assert result["rouge2"] == pytest.approx((4 / 7 + 0) / 2)
    assert result["rougeL"] == pytest.approx((2 / 3 + 0) / 2)
    assert set(result) == {"rouge1", "rouge2", "rougeL", "bleu"}
    with pytest.raises(ValueError):
        aggregate_generation(["a"], [])


# ------------------------------------------------------------------------ cloze

def test_cloze_matching():
    assert cloze_correct("She was born in LISBON, Portugal.", "Lisbon")
    assert cloze_correct("She works as a marine biologist", "Marine Biologist.")
    assert cloze_correct("born in New   York", "new york")
    assert not cloze_correct("She was born in Porto.", "Lisbon")
    assert not cloze_correct("a biologist", "marine biologist")


def test_cloze_empty_ground_truth_is_an_error():
    with pytest.raises(ValueError):
        cloze_correct("anything", " . ")


# -------------------------------------------------------------------- coherence

FLUENT = [
    "She was born in Lisbon in 1984 and works as a marine biologist.",
    "The photograph shows him standing in front of the old town hall.",
]
VOCAB = {w for text in FLUENT for w in text.lower().replace(".", "").split()}
DEGENERATE = ["the the the the the the", "zq xv zq xv zq xv", "", "x",
              "Paris is the capital. Paris is the capital. Paris is the capital."]


@pytest.mark.parametrize("vocabulary", [None, VOCAB])
def test_coherence_fluent_scores_high(vocabulary):
    for text in FLUENT:
        assert coherence_score(text, vocabulary) > 0.7
        assert is_coherent(text, vocabulary)


@pytest.mark.parametrize("vocabulary", [None, VOCAB])
def test_coherence_degenerate_scores_low(vocabulary):
    for text in DEGENERATE:
        assert coherence_score(text, vocabulary) < 0.3, text
        assert not is_coherent(text, vocabulary)


def test_coherence_vocabulary_catches_subword_salad():
    salad = "bior ingly lisb tion ography marin"
    assert coherence_score(salad) > 0.7  # looks word-like without a lexicon
    assert coherence_score(salad, VOCAB) < 0.3


def test_coherence_short_repeat_is_tolerated():
    # one doubled word ("that that") is English; only longer runs are penalised
    assert coherence_score("I think that that is fine") == pytest.approx(1.0)
    # 8 words, run of 4 -> run factor 2/4; distinct bigrams 5/7, trigrams 5/6;
    # repetition factor = (mean - 0.3) / 0.5, so the product is mean - 0.3
    distinct = (5 / 7 + 5 / 6) / 2
    assert coherence_score("I think that that that that is fine") == pytest.approx(distinct - 0.3)


def test_coherence_label_says_it_is_not_the_paper_classifier():
    assert "not the paper's GIB classifier" in COHERENCE_LABEL


# ------------------------------------------------------------ classifier mapping

def test_classifier_coherence_maps_labels_dicts_and_scores():
    outputs = ["clean", {"label": "word salad", "score": 0.9},
               [{"label": "noise", "score": 0.2}, {"label": "Clean", "score": 0.7}],
               {"label": "incoherent", "score": 0.99}, 0.8, 0.1]
    texts = [f"t{i}" for i in range(len(outputs))]
    assert classifier_coherence(texts, lambda batch: outputs) == [True, False, True, False, True, False]


def test_classifier_coherence_custom_and_generic_labels():
    generic = lambda batch: ["LABEL_0", "LABEL_1"]
    assert classifier_coherence(["a", "b"], generic, clean_labels={"LABEL_0"}) == [True, False]
    with pytest.raises(ValueError, match="generic"):
        classifier_coherence(["a", "b"], generic)


def test_classifier_coherence_checks_output_count():
    with pytest.raises(ValueError):
        classifier_coherence(["a", "b"], lambda batch: ["clean"])
