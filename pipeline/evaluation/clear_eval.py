"""Evaluation by CLEAR's protocol (Dontsov et al. 2024, HF `therem/CLEAR`): one results row per run.

What is measured, per set (CLEAR_PROTOCOL names it in every row):

forget, retain  (one row = one picture of one person, with its caption)
    rougeL_recall, rouge1_recall
        the greedy answer to CAPTION_QUESTION against the caption:
        `rouge_score` ROUGE-L / ROUGE-1 *recall*, Porter stemmer on, as CLEAR's
        authors score captions (mm/eval.py, mm/calculate_metrics.py).
    name_acc
        face recognition: greedy answer to NAME_QUESTION, correct when the
        person's name is a case-insensitive substring of it (whitespace
        collapsed). This is the MLLMU-style adaptation of CLEAR used by later
        MLLM-unlearning work; CLEAR's own code prompts "The name of the person
        on the image is" and scores ROUGE.
    caption_prob
        mean over rows of P(caption | image, CAPTION_QUESTION)^(1/|caption|)
        (CLEAR's "Prob." for its caption tasks).
    truth_ratio, truth_ratio_score   (rows with perturbed captions only)
        Per row, with length-normalised teacher-forced log-likelihoods
        l(a) = (1/|a|) * sum_t log P(a_t | image, CAPTION_QUESTION, a_<t)
        of the paraphrased caption a~ and of the m perturbed captions a^_j:

            R = exp( (1/m) * sum_j l(a^_j) - l(a~) )
              = [ prod_j P(a^_j)^(1/|a^_j|) ]^(1/m) / P(a~)^(1/|a~|)

        i.e. the geometric mean over the perturbed captions of P^(1/len),
        divided by the paraphrase's P^(1/len). This is what TOFU's and
        CLEAR's code compute (exp of mean per-token loss differences); TOFU's
        paper writes an arithmetic mean in the numerator instead. R < 1: the
        model prefers the true caption. `truth_ratio` is the mean R over rows;
        `truth_ratio_score` is TOFU's aggregate: forget mean(min(R, 1/R))
        (1 = cannot tell true from false, the goal of forgetting), retain
        mean(max(0, 1 - R)) (higher = knowledge kept). CLEAR's
        calculate_metrics.py averages the perturbed losses over *all* rows
        before the ratio; we keep TOFU's per-row ratio.
    coherence
        share of caption answers judged coherent by metrics.is_coherent over
        the captions' own vocabulary (model-free; not the paper's classifier).

real  (real_faces: a real celebrity, the right name and wrong options)
    mc_acc
        multiple choice: the right name is inserted among the options at a
        position fixed by (row, answer) (clear.RealRow.choices), letters A..,
        viker's multiple-choice prompt, zero-shot; the first standalone letter
        of the greedy answer is read (metrics.parse_choice_letter).
    name_prob, truth_ratio, truth_ratio_score
        the same likelihood scores on the name question, the right name
        against the wrong options (CLEAR's "Prob." and "Truth Ratio" for
        real faces: P_true / (P_true + sum P_wrong) with P = P^(1/len)).

Which split feeds which set: CLEAR's authors evaluate on the `*_perturbed`
configs (forget10_perturbed, retain_perturbed), which carry the perturbed
captions. So forget = `test_split` (default `<forget>_perturbed`) where it
exists, else the forget split itself (no truth ratio then); retain = an
explicitly given retain split, else `retain_perturbed` where it exists, else
the retain split paired with the forget split; real = `real_faces`.
`max_profiles` keeps the first N rows of each set (the authors used 300).
CLEAR has no separate generalisation set: "test" in `sets` is accepted and
folded into forget (its split is the perturbed one).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from pipeline.config import DataConfig, EvalConfig, ModelConfig
from pipeline.data.clear import (CAPTION_QUESTION, NAME_QUESTION, CaptionRow, RealRow, read_caption_rows,
                                 read_real_rows, split_exists)
from pipeline.data.loaders import default_splits
from pipeline.data.mllmu import DataError
from pipeline.models.encoding import encode_pair, load_image, max_positions, pixel_values
from pipeline.models.forward import answer_logits, make_text_batch
from pipeline.models.generation import generate
from pipeline.models.modeling import load_for_eval
from pipeline.models.prompts import multiple_choice_prompt, train_prompt
from pipeline.progress import progress as tqdm  # plain log lines off a terminal

from . import clear_official as co
from . import metrics
from .clear_official import OFFICIAL_ROWS
from .evaluate import default_samples_path
from .protocol_mllmu import Item, generate_items
from .results import append_result, mean, sample_row, write_jsonl


CLEAR_PROTOCOL = (
    "viker-clear-v1: CLEAR (therem/CLEAR) scored as its authors' mm/eval.py: greedy caption for a fixed "
    f"caption question ({CAPTION_QUESTION!r}), rouge_score ROUGE-L recall (stemmer); TOFU truth ratio per row "
    "(geometric mean over perturbed captions of P^(1/len) over the paraphrase's P^(1/len)); caption Prob.; "
    f"plus MLLMU-style name recognition ({NAME_QUESTION!r}, name is a case-insensitive substring) and zero-shot "
    "real_faces multiple choice; forget/retain on the *_perturbed configs where present"
)
CLEAR_SETS = ("forget", "retain", "real")
NAME_NEW_TOKENS = 20
MC_NEW_TOKENS = 8


# ------------------------------------------------------------------ scores on strings

def rouge_recall(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1 / ROUGE-L recall with the Porter stemmer (CLEAR's caption score)."""
    scores = _scorer().score(reference, prediction)
    return {"rouge1_recall": float(scores["rouge1"].recall), "rougeL_recall": float(scores["rougeL"].recall)}


_SCORER = []


def _scorer():
    if not _SCORER:
        from rouge_score import rouge_scorer
        _SCORER.append(rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True))
    return _SCORER[0]


def truth_ratio(true_logp: float, wrong_logps: list[float]) -> float:
    """R = exp(mean_j l(wrong_j) - l(true)) from length-normalised log-likelihoods (module doc)."""
    if not wrong_logps:
        raise ValueError("truth ratio needs at least one perturbed answer")
    return math.exp(sum(wrong_logps) / len(wrong_logps) - true_logp)


def truth_ratio_summary(ratios: list[float], forget: bool) -> dict[str, float | None]:
    if not ratios:
        return {"truth_ratio": None, "truth_ratio_score": None}
    score = [min(r, 1 / r) if forget else max(0.0, 1 - r) for r in ratios]
    return {"truth_ratio": sum(ratios) / len(ratios), "truth_ratio_score": sum(score) / len(score)}


def normalised_prob_share(true_logp: float, wrong_logps: list[float]) -> float:
    """P_true / (P_true + sum P_wrong) with P = exp(length-normalised log-likelihood)."""
    top = max([true_logp, *wrong_logps])
    p_true = math.exp(true_logp - top)
    return p_true / (p_true + sum(math.exp(w - top) for w in wrong_logps))


# ------------------------------------------------------------------ model scores

@torch.no_grad()
def answer_logprobs(model, processor, images, prompts: list[str], answers: list[str], batch_size: int = 16,
                    desc: str | None = None) -> list[float]:
    """Length-normalised teacher-forced log-likelihood (1/|a|) sum_t log P(a_t | image, prompt, a_<t) per item.

    Tokenised exactly as training sees an answer (prompt, one space, answer), so
    the caption scored here is the sequence stage two unlearns.
    """
    tok = processor.tokenizer
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    limit = max_positions(model)
    out: list[float] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False):
        end = start + batch_size
        encoded = [encode_pair(processor, p, " " + a.strip(), f"{desc or 'item'} {start + i}", limit)
                   for i, (p, a) in enumerate(zip(prompts[start:end], answers[start:end]))]
        batch = make_text_batch([e[0] for e in encoded], [e[1] for e in encoded],
                                0 if tok.pad_token_id is None else tok.pad_token_id).to(device)
        pixels = pixel_values(processor, images[start:end]).to(device, dtype)
        logp = torch.log_softmax(answer_logits(model, batch, pixels).float(), dim=-1)
        token = torch.gather(logp, -1, batch.answer_ids.unsqueeze(-1)).squeeze(-1) * batch.answer_mask
        out += (token.sum(-1) / batch.answer_mask.sum(-1)).tolist()
    return out


def _scored_options(model, processor, items, question_of, true_of, wrong_of, batch_size, desc):
    """(true l, [wrong l]) per item: every answer of every item scored in one flat batched pass."""
    images, prompts, answers, spans = [], [], [], []
    for image, item in items:
        texts = [true_of(item), *wrong_of(item)]
        spans.append(len(texts))
        images += [image] * len(texts)
        prompts += [train_prompt(question_of(item))] * len(texts)
        answers += texts
    flat = answer_logprobs(model, processor, images, prompts, answers, batch_size, desc)
    scored, at = [], 0
    for n in spans:
        scored.append((flat[at], flat[at + 1: at + n]))
        at += n
    return scored


# ------------------------------------------------------------------ one set

def evaluate_caption_set(model, processor, rows: list[CaptionRow], set_name: str, *, forget: bool,
                         max_new_tokens: int = 300, batch_size: int = 16, vocabulary: set[str] | None = None):
    """(metrics, per-sample rows) of a forget or retain set of CLEAR rows."""
    if not rows:
        raise DataError(f"CLEAR set '{set_name}' has no rows")
    images = [load_image(r.image, f"{set_name} row {r.row}") for r in rows]
    captions = generate(model, processor, images, [train_prompt(CAPTION_QUESTION)] * len(rows),
                        max_new_tokens=max_new_tokens, batch_size=batch_size, desc=f"{set_name} caption")
    names = generate(model, processor, images, [train_prompt(NAME_QUESTION)] * len(rows),
                     max_new_tokens=NAME_NEW_TOKENS, batch_size=batch_size, desc=f"{set_name} name")
    own = answer_logprobs(model, processor, images, [train_prompt(CAPTION_QUESTION)] * len(rows),
                          [r.caption for r in rows], batch_size, f"{set_name} caption prob")
    perturbed = [(img, r) for img, r in zip(images, rows) if r.perturbed_captions]
    scored = _scored_options(model, processor, perturbed, lambda r: CAPTION_QUESTION,
                             lambda r: r.paraphrased_caption, lambda r: r.perturbed_captions, batch_size,
                             f"{set_name} truth ratio")
    samples, rouge, named, coherent = [], [], [], []
    for r, caption, name, logp in zip(rows, captions, names, own):
        scores = {**rouge_recall(caption, r.caption), "coherent": metrics.is_coherent(caption, vocabulary),
                  "caption_prob": math.exp(logp)}
        rouge.append(scores)
        coherent.append(scores["coherent"])
        samples.append(_sample(set_name, r.id, "caption", CAPTION_QUESTION, r.caption, caption, scores))
        hit = metrics.cloze_correct(name, r.name)
        named.append(hit)
        samples.append(_sample(set_name, r.id, "name", NAME_QUESTION, r.name, name, {"correct": hit}))
    ratios = []
    for (_, r), (true, wrong) in zip(perturbed, scored):
        ratios.append(truth_ratio(true, wrong))
        samples.append(_sample(set_name, r.id, "truth_ratio", CAPTION_QUESTION, r.paraphrased_caption, "",
                               {"ratio": ratios[-1], "paraphrased_logp": true, "perturbed_logp": wrong}))
    result = {"rougeL_recall": mean(s["rougeL_recall"] for s in rouge),
              "rouge1_recall": mean(s["rouge1_recall"] for s in rouge),
              "name_acc": mean(named), "caption_prob": mean(s["caption_prob"] for s in rouge),
              **truth_ratio_summary(ratios, forget), "coherence": mean(coherent)}
    return result, samples


def evaluate_real_set(model, processor, rows: list[RealRow], set_name: str = "real", *, batch_size: int = 16):
    """(metrics, per-sample rows) of real_faces: multiple choice, name probability and truth ratio."""
    if not rows:
        raise DataError(f"CLEAR set '{set_name}' has no rows")
    images = [load_image(r.image, f"{set_name} row {r.row}") for r in rows]
    choices = [r.choices() for r in rows]
    prompts = [multiple_choice_prompt(r.question, options) for r, (options, _) in zip(rows, choices)]
    answers = generate(model, processor, images, prompts, max_new_tokens=MC_NEW_TOKENS, batch_size=batch_size,
                       desc=f"{set_name} mc")
    scored = _scored_options(model, processor, list(zip(images, rows)), lambda r: r.question, lambda r: r.answer,
                             lambda r: [o for o in r.options if o.casefold() != r.answer.casefold()], batch_size,
                             f"{set_name} truth ratio")
    samples, correct, ratios, shares = [], [], [], []
    for r, (options, letter), answer, (true, wrong) in zip(rows, choices, answers, scored):
        parsed = metrics.parse_choice_letter(answer, "".join(options))
        correct.append(parsed == letter)
        samples.append(_sample(set_name, r.id, "mc", r.question, letter, answer,
                               {"parsed": parsed, "correct": parsed == letter, "options": options}))
        if wrong:
            ratios.append(truth_ratio(true, wrong))
            shares.append(normalised_prob_share(true, wrong))
            samples.append(_sample(set_name, r.id, "truth_ratio", r.question, r.answer, "",
                                   {"ratio": ratios[-1], "true_logp": true, "wrong_logp": wrong}))
    return {"mc_acc": mean(correct), "name_prob": mean(shares), **truth_ratio_summary(ratios, forget=False)}, samples


def _sample(set_name, row_id, kind, question, reference, answer, scores) -> dict:
    # CLEAR's items all carry an image: the row type is always Image_Textual.
    return sample_row(set_name, row_id, kind, question, reference, answer, scores, "Image_Textual")


# ------------------------------------------------------------------ a run

def parse_clear_sets(sets) -> list[str]:
    names = [s.strip() for s in sets.split(",")] if isinstance(sets, str) else list(sets)
    unknown = [s for s in names if s not in (*CLEAR_SETS, "test")]
    if unknown or not names:
        raise ValueError(f"unknown CLEAR evaluation set(s) {unknown or names}: choose from forget, retain, real "
                         f"(test is folded into forget)")
    chosen = [s for s in CLEAR_SETS if s in names or (s == "forget" and "test" in names)]
    return chosen


def clear_eval_splits(data_root, forget_split: str, retain_split: str = "", test_split: str = "",
                      real_split: str = "real_faces") -> dict[str, str]:
    """The config each set is read from (module doc: the *_perturbed configs where the data has them)."""
    defaults = default_splits("clear", forget_split)
    test = test_split or defaults["test"]
    forget = test if split_exists(data_root, test) else forget_split
    if retain_split:
        retain = retain_split
    else:
        retain = "retain_perturbed" if split_exists(data_root, "retain_perturbed") else defaults["retain"]
    return {"forget": forget, "retain": retain, "real": real_split or defaults["real"]}


def read_clear_sets(data_root, splits: dict[str, str], names, max_profiles: int = 0) -> dict[str, list]:
    """Rows of every requested set, checked before any model is loaded; forget and retain must not share people."""
    rows = {}
    for name in names:
        read = read_real_rows if name == "real" else read_caption_rows
        rows[name] = read(data_root, splits[name])
        if max_profiles:
            rows[name] = rows[name][:max_profiles]
    if "forget" in rows and "retain" in rows:
        shared = sorted({r.name for r in rows["forget"]} & {r.name for r in rows["retain"]})
        if shared:
            raise DataError(f"CLEAR retain config '{splits['retain']}' shares {len(shared)} person(s) with forget "
                            f"config '{splits['forget']}' (e.g. {shared[0]}): retain must be disjoint from forget")
    return rows


def _vocabulary(rows: dict[str, list]) -> set[str]:
    words: set[str] = set()
    for name, items in rows.items():
        for r in items:
            texts = ([r.answer, r.question, *r.options] if name == "real" else
                     [r.caption, r.name, r.paraphrased_caption, *r.perturbed_captions, *r.perturbed_names])
            for text in texts:
                words.update(metrics._WORD.findall(text.lower()))
    return words


def evaluate_clear(model: ModelConfig, data: DataConfig, settings: EvalConfig, *, adapter=None, method: str = "Vanilla",
                   setting: dict | None = None, budget: float = 0, seed: int = 0, cache_fingerprint: str = "",
                   results_path=None, samples_path=None, config: dict | None = None) -> dict:
    """Evaluate model.path (+ adapter) by CLEAR's protocol; append its row to the results file and return it.

    Takes the model, data and evaluate config sections, as evaluate.evaluate
    does. The row has the keys of evaluate.py's rows (method, forget_split,
    setting, budget, seed, model, adapter, metrics: {forget, retain, real}) plus
    `benchmark`, `protocol` (viker | official), `protocol_description` and
    `eval_splits`. settings.protocol "official" follows the authors' code
    (clear_official.py: the first 300 rows unless max_profiles says otherwise,
    captions generated without the image, CLEAR's truth ratio and Prob., the
    Forget/Retain/Real harmonic means, and Forget Quality against settings.gold
    when given). Evaluation sets "test" and "forget" both name the forget set
    (CLEAR has no other-images test set).
    """
    model_dir, dtype, device = model.path, model.dtype, model.device
    data_root, forget_split, retain_split = data.root, data.forget_split, data.retain_split
    test_split, real_split = data.test_split, data.real_split     # empty: clear_eval_splits takes CLEAR's pair
    sets, max_new_tokens, max_profiles, batch_size = settings.sets, settings.max_new_tokens, settings.max_profiles, \
        settings.batch_size
    protocol, gold, eval_seed = settings.protocol, settings.gold, settings.seed
    results_path = results_path or settings.results
    if protocol == "official":
        return _evaluate_clear_official(model_dir, data_root, forget_split, retain_split, adapter=adapter,
                                        method=method, setting=setting, budget=budget, seed=seed,
                                        cache_fingerprint=cache_fingerprint, sets=sets, test_split=test_split,
                                        real_split=real_split, max_new_tokens=max_new_tokens,
                                        max_profiles=max_profiles or OFFICIAL_ROWS, batch_size=batch_size,
                                        results_path=results_path, samples_path=samples_path, dtype=dtype,
                                        device=device, gold=gold, eval_seed=eval_seed, config=config)
    if protocol != "viker":
        raise DataError(f"evaluate.protocol is one of: official, viker; got {protocol!r}")
    names = parse_clear_sets(sets)
    splits = clear_eval_splits(data_root, forget_split, retain_split, test_split, real_split)
    rows = read_clear_sets(data_root, splits, names, max_profiles)   # bad data fails before the model loads
    vocabulary = _vocabulary(rows)
    model, processor = load_for_eval(model_dir, adapter, dtype, device)
    results, samples = {}, []
    for name in tqdm(names, desc="evaluate CLEAR"):
        if name == "real":
            results[name], found = evaluate_real_set(model, processor, rows[name], name, batch_size=batch_size)
        else:
            results[name], found = evaluate_caption_set(model, processor, rows[name], name, forget=name == "forget",
                                                        max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                        vocabulary=vocabulary)
        samples += found
    results_path = Path(results_path)
    samples_path = Path(samples_path) if samples_path else default_samples_path(results_path, method, forget_split,
                                                                               budget, seed)
    row = {
        "method": method, "benchmark": "clear", "protocol": "viker", "protocol_description": CLEAR_PROTOCOL,
        "forget_split": forget_split, "retain_split": retain_split or default_splits("clear", forget_split)["retain"],
        "eval_splits": {name: splits[name] for name in names},
        "setting": dict(setting or {}), "budget": budget, "seed": seed,
        "model": str(model_dir), "adapter": None if adapter is None else str(adapter),
        "cache_fingerprint": cache_fingerprint, "coherence_kind": metrics.COHERENCE_LABEL,
        "caption_question": CAPTION_QUESTION, "name_question": NAME_QUESTION,
        "data_root": str(data_root), "max_new_tokens": max_new_tokens, "max_profiles": max_profiles,
        "samples": str(samples_path),
        "n_items": {name: {"rows": len(rows[name]),
                           "truth_ratio": sum(1 for r in rows[name]
                                              if (r.options if name == "real" else r.perturbed_captions))}
                    for name in names},
        "metrics": results,
    }
    if config is not None:
        row["config"] = config
    write_jsonl(samples_path, samples)
    append_result(results_path, row)
    return row


# ------------------------------------------------------------------ the official protocol

def _evaluate_clear_official(model_dir, data_root, forget_split, retain_split, *, adapter, method, setting, budget,
                             seed, cache_fingerprint, sets, test_split, real_split, max_new_tokens, max_profiles,
                             batch_size, results_path, samples_path, dtype, device, gold, eval_seed,
                             config=None) -> dict:
    names = parse_clear_sets(sets)
    splits = clear_eval_splits(data_root, forget_split, retain_split, test_split, real_split)
    rows = read_clear_sets(data_root, splits, names, max_profiles)
    if "real" in names and split_exists(data_root, "real_world"):
        splits["real_world"] = "real_world"
        rows["real_world"] = read_real_rows(data_root, "real_world")[:max_profiles]
    if gold and "forget" not in names:
        raise DataError("Forget Quality (evaluate.gold) needs the forget set in evaluate.sets")
    model, processor = load_for_eval(model_dir, adapter, dtype, device)
    results, samples, scores, forget_tr = _official_sets(model, processor, rows, names, eval_seed, max_new_tokens,
                                                         batch_size)
    clear = {**co.aggregates(scores), "scores": scores}
    if gold:
        del model
        gold_model, gold_processor = load_for_eval(gold, None, dtype, device)
        gold_tr = _forget_truth_ratios(gold_model, gold_processor, rows["forget"], eval_seed, batch_size)
        clear.update(co.forget_quality(forget_tr, gold_tr), gold_truth_ratios=gold_tr)
    results_path = Path(results_path)
    samples_path = Path(samples_path) if samples_path else default_samples_path(results_path, method, forget_split,
                                                                               budget, seed)
    row = {
        "method": method, "benchmark": "clear", "protocol": "official", "protocol_id": co.PROTOCOL_ID,
        "forget_split": forget_split, "retain_split": retain_split or default_splits("clear", forget_split)["retain"],
        "eval_splits": {name: splits[name] for name in splits if name in names or name == "real_world"},
        "setting": dict(setting or {}), "budget": budget, "seed": seed, "eval_seed": eval_seed,
        "model": str(model_dir), "adapter": None if adapter is None else str(adapter), "gold": gold or None,
        "cache_fingerprint": cache_fingerprint, "data_root": str(data_root), "max_new_tokens": max_new_tokens,
        "max_profiles": max_profiles, "samples": str(samples_path),
        "n_items": {name: {"rows": len(items)} for name, items in rows.items()},
        "metrics": results, "clear": clear,
    }
    if config is not None:
        row["config"] = config
    write_jsonl(samples_path, samples)
    append_result(results_path, row)
    return row


def _scorer_for(model, processor, batch_size):
    def score(images, prompts, answers, desc):
        return answer_logprobs(model, processor, images, prompts, answers, batch_size, desc) if prompts else []
    return score


def _forget_truth_ratios(model, processor, rows, eval_seed, batch_size) -> list[float]:
    task = co.caption_task(_scorer_for(model, processor, batch_size), rows, co.load_images(rows, "forget"),
                           co._Questions(eval_seed), "eval_log_forget", forget=True)
    return task["tr"]


def _official_sets(model, processor, rows, names, eval_seed, max_new_tokens, batch_size):
    """(metrics per set, samples, CLEAR's named scores, the forget caption TR array)."""
    score = _scorer_for(model, processor, batch_size)
    questions = co._Questions(eval_seed)
    results, samples, scores, forget_tr = {}, [], {}, []
    for name in names:
        if name == "real":
            out = {}
            for config, column_question, label in (("real", False, "Real Faces"), ("real_world", True, "Real World")):
                if config not in rows:
                    continue
                task = co.real_task(score, rows[config], co.load_images(rows[config], config), config, column_question)
                scores[f"Prob. {label}"], scores[f"Truth Ratio {label}"] = task["prob"], task["truth_ratio"]
                key = "real_faces" if config == "real" else "real_world"
                out.update({f"{key}_prob": task["prob"], f"{key}_truth_ratio": task["truth_ratio"]})
            results[name] = out
            continue
        forget = name == "forget"
        label, task_name = ("Forget", "eval_log_forget") if forget else ("Retain", "eval_log")
        items = rows[name]
        images = co.load_images(items, name)
        caption = co.caption_task(score, items, images, questions, task_name, forget)
        face = co.facerec_task(score, items, images, f"{name} facerec", forget)
        prompts = co.caption_prompts_without_image(items, questions, task_name)
        answers = generate_items(model, processor, [Item("gen", "text", r.id, "", r.caption, p)
                                                    for r, p in zip(items, prompts)],
                                 max_new_tokens, batch_size, desc=f"{name} caption (no image)")
        rouge = [rouge_recall(a, r.caption) for a, r in zip(answers, items)]
        for r, p, a, sc, gt in zip(items, prompts, answers, rouge, caption["losses"]["gt"]):
            samples.append(_sample(name, r.id, "caption", p, r.caption, a, {**sc, "gt_loss": gt}))
        scores[f"ROUGE {label}"] = mean(s["rougeL_recall"] for s in rouge)
        scores[f"Prob. {label}"], scores[f"Truth Ratio {label}"] = caption["prob"], caption["truth_ratio"]
        scores[f"Prob. {label} FaceRec"], scores[f"Truth Ratio {label} FaceRec"] = face["prob"], face["truth_ratio"]
        if forget:
            forget_tr = caption["tr"]
        samples.append(_sample(name, "", "truth_ratios", task_name, "", "", {"tr": caption["tr"]}))
        results[name] = {"rougeL_recall": scores[f"ROUGE {label}"],
                         "rouge1_recall": mean(s["rouge1_recall"] for s in rouge),
                         "caption_prob": caption["prob"], "caption_truth_ratio": caption["truth_ratio"],
                         "facerec_prob": face["prob"], "facerec_truth_ratio": face["truth_ratio"]}
    return results, samples, scores, forget_tr


def format_clear_row(row: dict) -> str:
    """The row's metrics as a small table (percentages; truth ratios as plain numbers)."""
    shown = (("R-L rec", "rougeL_recall", True), ("name", "name_acc", True), ("MC", "mc_acc", True),
             ("prob", "caption_prob", False), ("TR", "truth_ratio", False), ("TR score", "truth_ratio_score", False),
             ("coher.", "coherence", True))
    if row.get("protocol") == "official":
        shown = (("R-L rec", "rougeL_recall", True), ("cap prob", "caption_prob", False),
                 ("cap TR", "caption_truth_ratio", False), ("face prob", "facerec_prob", False),
                 ("face TR", "facerec_truth_ratio", False), ("RF prob", "real_faces_prob", False),
                 ("RF TR", "real_faces_truth_ratio", False), ("RW prob", "real_world_prob", False),
                 ("RW TR", "real_world_truth_ratio", False))
    lines = [f"{row['method']} on CLEAR {row['forget_split']} (budget {row['budget']}, seed {row['seed']})",
             f"{'set':8s}" + "".join(f"{label:>10s}" for label, _, _ in shown)]
    for name, values in row["metrics"].items():
        cells = []
        for _, key, pct in shown:
            fallback = values.get("name_prob") if key == "caption_prob" and row.get("protocol") != "official" else None
            value = values.get(key, fallback)
            cells.append(f"{'-':>10s}" if value is None else (f"{100 * value:9.1f}%" if pct else f"{value:10.3f}"))
        lines.append(f"{name:8s}" + "".join(cells))
    if row.get("clear"):
        lines.append("CLEAR: " + ", ".join(f"{k} {v:.3f}" for k, v in row["clear"].items()
                                         if isinstance(v, float)))
    lines.append(f"protocol: {row['protocol']} {row.get('protocol_description', row.get('protocol_id', ''))}")
    return "\n".join(lines)
