"""Evaluation metrics on plain strings (MLLMU-Bench protocol; docs/REAL_BENCHMARKS.md section 6).

Everything here is a pure function of text, so the evaluator can score saved
per-sample outputs again without a model. No torch, no transformers.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Callable, Iterable, Sequence

BLEU_NOTE = (
    "BLEU is sacrebleu sentence BLEU (default smoothing 'exp'); MLLMU-Bench used "
    "NLTK sentence_bleu with smoothing method 1, so absolute BLEU values differ "
    "from the paper's."
)
COHERENCE_LABEL = (
    "model-free coherence (viker heuristic: repetition + vocabulary; "
    "not the paper's GIB classifier)"
)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# Exact (case-insensitive) label names, never substrings: "incoherent" contains
# "coherent" and "unclean" contains "clean".  "clean" is the clean class of the
# gibberish detector MLLMU-Bench used; its other classes ("mild gibberish",
# "noise", "word salad") all count as not coherent.
DEFAULT_CLEAN_LABELS = frozenset({"clean", "normal", "coherent"})


# ---------------------------------------------------------------- multiple choice

_ANSWER_PREFIX = re.compile(
    r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)\s*(?:is\s*)?[:\-]?\s*",
    re.IGNORECASE,
)
_OPENERS = "\"'`*([{ \t"


def parse_choice_letter(text: str, options: str = "ABCD") -> str | None:
    """The option letter a greedy multiple-choice response commits to, or None.

    MLLMU-Bench reads the first letter of the response; we keep that rule but
    insist the letter stands alone, so a word that merely starts with an option
    letter ("Alice", "ABBA", "US US US") is malformed rather than an answer.
    Accepted: "B", "B.", "B) text", "(B)", "**B**", "Answer: B",
    "The answer is C".  Only upper-case letters count, because a lower-case
    "a" is usually the article.  As in MLLMU-Bench, "A dog ..." reads as "A":
    a standalone capital option letter at the start is taken at its word.
    Letters outside `options` (e.g. "E" for ABCD) give None.
    """
    if not options or not options.isalpha() or not options.isupper():
        raise ValueError(f"options must be upper-case letters, got {options!r}")
    body = _ANSWER_PREFIX.sub("", text.strip(), count=1).lstrip(_OPENERS)
    match = re.match(rf"([{re.escape(options)}])(?![A-Za-z0-9])", body)
    return match.group(1) if match else None


def choice_accuracy(responses: Sequence[str], correct_letters: Sequence[str]) -> float:
    """Share of responses whose parsed letter equals the correct one (None is wrong)."""
    _check_pairs(responses, correct_letters)
    hits = sum(
        parse_choice_letter(resp) == letter.strip().upper()
        for resp, letter in zip(responses, correct_letters)
    )
    return hits / len(responses)


def _check_pairs(left: Sequence, right: Sequence) -> None:
    if len(left) != len(right):
        raise ValueError(f"length mismatch: {len(left)} vs {len(right)}")
    if not left:
        raise ValueError("nothing to score: empty input")


# -------------------------------------------------------------------- generation

@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    # Building the scorer loads the Porter stemmer; do it once, and only when used.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measure with the Porter stemmer, as MLLMU-Bench reports."""
    scores = _rouge_scorer().score(reference, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def bleu_score(prediction: str, reference: str) -> float:
    """sacrebleu sentence BLEU rescaled from 0-100 to [0, 1]; see BLEU_NOTE."""
    if not reference.strip():
        raise ValueError("empty reference: BLEU is undefined")
    if not prediction.strip():
        return 0.0
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, [reference]).score / 100.0


def aggregate_generation(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F and BLEU over aligned (prediction, reference) pairs."""
    _check_pairs(preds, refs)
    totals = dict.fromkeys((*ROUGE_TYPES, "bleu"), 0.0)
    for pred, ref in zip(preds, refs):
        for name, value in rouge_scores(pred, ref).items():
            totals[name] += value
        totals["bleu"] += bleu_score(pred, ref)
    return {name: total / len(preds) for name, total in totals.items()}


def cloze_correct(answer: str, ground_truth: str) -> bool:
    """MLLMU-Bench cloze rule: the ground truth occurs in the answer, ignoring case.

    Trailing punctuation of the ground truth is dropped ("Paris." must match
    "... in Paris, France") and runs of whitespace are collapsed on both sides.
    """
    truth = _squash(ground_truth).rstrip(".,;:!?")
    if not truth:
        raise ValueError("empty ground truth: every answer would match")
    return truth in _squash(answer)


def _squash(text: str) -> str:
    return " ".join(text.split()).casefold()


# --------------------------------------------------------------------- coherence

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_VOWEL = re.compile(r"[aeiouy]")
# Distinct-n ratios at or above this count as free of loops, at or below
# _LOOP as pure looping; fluent 50-token answers sit near 1.0.
_FLUENT, _LOOP = 0.8, 0.3


def coherence_score(text: str, vocabulary: set[str] | None = None) -> float:
    """OUR model-free coherence score in [0, 1]; NOT the paper's GIB classifier.

    The paper judges coherence with a gibberish classifier.  When none is
    configured we use this heuristic (label: COHERENCE_LABEL), the product of:

    * repetition: mean distinct-bigram and distinct-trigram ratio, mapped
      linearly from 0.3 (pure loop, 0) to 0.8 (no loop, 1);
    * runs: 2 / longest run of one repeated word, capped at 1, so "that that"
      is fine and "the the the the" is not;
    * lexicon: with `vocabulary` (the benchmark's own words, lower-case) the
      share of words found in it, numbers counting as known, which catches
      subword salad; without it the share of words that contain a vowel or are
      numbers, which catches only crude noise ("zq xv").

    Empty or one-character text scores 0.  Text is lower-cased and split into
    alphanumeric words (apostrophe suffixes kept).
    """
    words = _WORD.findall(text.lower())
    if len(text.strip()) <= 1 or not words:
        return 0.0
    return _repetition_factor(words) * _run_factor(words) * _lexicon_factor(words, vocabulary)


def is_coherent(text: str, vocabulary: set[str] | None = None, threshold: float = 0.5) -> bool:
    return coherence_score(text, vocabulary) >= threshold


def _distinct_ratio(words: list[str], n: int) -> float:
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def _repetition_factor(words: list[str]) -> float:
    ratio = (_distinct_ratio(words, 2) + _distinct_ratio(words, 3)) / 2
    return min(1.0, max(0.0, (ratio - _LOOP) / (_FLUENT - _LOOP)))


def _run_factor(words: list[str]) -> float:
    longest = run = 1
    for prev, cur in zip(words, words[1:]):
        run = run + 1 if cur == prev else 1
        longest = max(longest, run)
    return min(1.0, 2 / longest)


def _lexicon_factor(words: list[str], vocabulary: set[str] | None) -> float:
    if vocabulary is None:
        known = [w.isdigit() or bool(_VOWEL.search(w)) for w in words]
    else:
        known = [w.isdigit() or w in vocabulary for w in words]
    return sum(known) / len(words)


def classifier_coherence(
    texts: Sequence[str],
    classifier: Callable[[list[str]], Iterable],
    clean_labels: Iterable[str] = DEFAULT_CLEAN_LABELS,
    threshold: float = 0.5,
) -> list[bool]:
    """Coherent/not per text from any text classifier (e.g. a local HF pipeline).

    `classifier(texts)` may return, per text: a label string, an HF-style dict
    {"label", "score"}, a list of such dicts (top_k=None; the best-scoring one
    is used), a bool, or a number read as P(coherent) and compared to
    `threshold`.  A label is coherent iff it equals one of `clean_labels`
    ignoring case.  Generic names such as "LABEL_0" mean nothing on their own,
    so they must be listed in `clean_labels` explicitly (e.g. {"LABEL_0"}) or a
    ValueError is raised rather than silently calling everything gibberish.
    """
    clean = {label.casefold() for label in clean_labels}
    outputs = list(classifier(list(texts)))
    if len(outputs) != len(texts):
        raise ValueError(f"classifier returned {len(outputs)} outputs for {len(texts)} texts")
    return [_is_clean(output, clean, threshold) for output in outputs]


def _is_clean(output, clean: set[str], threshold: float) -> bool:
    if isinstance(output, bool):
        return output
    if isinstance(output, (int, float)):
        if math.isnan(output):
            raise ValueError("classifier returned NaN")
        return output >= threshold
    if isinstance(output, list):
        output = max(output, key=lambda item: item["score"])
    label = (output["label"] if isinstance(output, dict) else str(output)).casefold()
    if re.fullmatch(r"label_\d+", label) and not any(re.fullmatch(r"label_\d+", c) for c in clean):
        raise ValueError(
            f"classifier label {label!r} is generic; pass clean_labels naming the coherent class"
        )
    return label in clean


def bleu_official(prediction: str, reference: str) -> float:
    """MLLMU-Bench's BLEU (eval.py compute_bleu): NLTK sentence BLEU-4 on whitespace tokens, smoothing method1.

    Used by the official protocol; `bleu_score` (sacrebleu) is viker's own.
    """
    import warnings

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    hypothesis = prediction.split()
    if not hypothesis:
        return 0.0
    with warnings.catch_warnings():       # NLTK warns on short sentences; the value is what the authors got
        warnings.simplefilter("ignore")
        return float(sentence_bleu([reference.split()], hypothesis, smoothing_function=SmoothingFunction().method1))


# ------------------------------------------------------------------ CLEAR's statistics (numpy, no scipy)

def ks_2samp_pvalue(a, b) -> tuple[float, float]:
    """(D, p): the two-sided two-sample Kolmogorov-Smirnov test, exact p-value.

    What CLEAR's mm/calculate_metrics.py evaluate_forget_quality reports as Forget
    Quality (scipy.stats.ks_2samp(...).pvalue, whose default is this exact test for
    samples up to 10 000). p = P(D' >= D) over the C(n+m, n) equally likely orders
    of the pooled sample, by a lattice-path walk that keeps every partial path
    inside the band |i/n - j/m| < D (Hodges 1957); tested against scipy's values.
    """
    import numpy as np
    x, y = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("the KS test needs two non-empty samples")
    pooled = np.concatenate([x, y])
    cdf_x = np.searchsorted(x, pooled, side="right") / n
    cdf_y = np.searchsorted(y, pooled, side="right") / m
    d = float(np.max(np.abs(cdf_x - cdf_y)))
    # In integer units of 1/(n*m), so that the band test has no rounding.
    band = round(d * n * m)
    if band == 0:
        return d, 1.0
    # The mass of walks absorbed where they first touch the band's edge is the p-value itself,
    # summed directly (1 - P(inside) would cancel to 0 for the tiny p-values unlearning produces).
    outside, inside = 0.0, np.zeros(m + 1)
    for i in range(n + 1):
        row = np.zeros(m + 1)
        for j in range(m + 1):
            if i == 0 and j == 0:
                row[j] = 1.0
                continue
            left = inside[j] * (n - i + 1) if i > 0 else 0.0      # one more x taken
            below = row[j - 1] * (m - j + 1) if j > 0 else 0.0    # one more y taken
            arrival = (left + below) / (n + m - i - j + 1)
            if abs(i * m - j * n) >= band:
                outside += arrival
            else:
                row[j] = arrival
        inside = row
    return d, float(min(1.0, outside))


def js_distance(p, q) -> float:
    """scipy.spatial.distance.jensenshannon(p, q) (natural log): CLEAR's "JS metric" on truth-ratio arrays."""
    import numpy as np
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    p, q = p / p.sum(), q / q.sum()
    mid = (p + q) / 2

    def rel(a, b):
        return np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0) / b), 0.0)

    return float(np.sqrt(max(0.0, float((rel(p, mid).sum() + rel(q, mid).sum()) / 2))))


def harmonic_mean(values) -> float | None:
    """scipy.stats.hmean of non-negative values (0 if any is 0); None if a value is missing."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    if any(v < 0 for v in values):
        raise ValueError("the harmonic mean needs non-negative values")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)
