"""CLEAR's official protocol and headline metrics (evaluate.protocol: official for data.benchmark: clear).

Read from somvy/multimodal_unlearning (the CLEAR authors' code; docs/REAL_BENCHMARKS.md
lists each rule against viker's own CLEAR protocol):

    tasks (config/mm/eval.yaml)    forget / retain caption tasks (eval_log_forget, eval_log) on the
                                   *_perturbed configs: answer caption, base paraphrased_caption,
                                   perturbed perturbed_captions, question drawn from nine phrasings
                                   (mm/dataset.py ImageCaptioningDataset, random_caption);
                                   FaceRec tasks: answer = base = name, perturbed perturbed_names,
                                   question "The name of the person on the image is " (random_faces);
                                   real_faces (same question) and real_world (its `question` column):
                                   answer, perturbed `options`. ds_size 300: the first 300 rows.
    losses (mm/eval.py)            per-token mean NLL of each answer given image + question.
    generation (mm/eval.py get_all_evals)
                                   the question re-tokenised as text alone (image tokens dropped by
                                   batch_decode(skip_special_tokens=True)): captions WITHOUT the image;
                                   rouge_score ROUGE-L recall, stemmer.
    Prob. (calculate_metrics.py compute_model_utility)
                                   caption tasks: mean exp(-loss); others: mean of
                                   P_true / (P_true + sum P_perturbed), P = exp(-loss).
    Truth Ratio (same)             TR_i = exp(mean over ALL rows and perturbations of the perturbed
                                   loss - paraphrase loss_i); forget tasks mean(min(TR, 1/TR)),
                                   others mean(max(0, 1 - 1/TR)).
    Forget Quality (calculate_metrics.py evaluate_forget_quality)
                                   KS test p-value of the forget caption task's TR array against a
                                   gold model's (trained without the forget set); build_vllm_table.py
                                   prints 1 - JS distance under that name: both are reported.
    aggregates (build_vllm_table.py)
                                   harmonic means: Forget = Prob./TR of Forget and Forget FaceRec,
                                   Retain likewise, Real = Prob./TR of Real Faces and Real World;
                                   Model utility over its util_metrics list.

Differences that remain (docs/REAL_BENCHMARKS.md): viker's own prompt template (the
authors apply the model's chat template), and the seeded question draw.
"""
from __future__ import annotations

import math
import random

import numpy as np

from pipeline.data.clear import CaptionRow, RealRow
from pipeline.data.mllmu import DataError
from pipeline.models.encoding import load_image
from pipeline.models.prompts import IMAGE_TOKEN, train_prompt

from . import metrics


OFFICIAL_ROWS = 300                 # config/mm/eval.yaml ds_size
FACE_QUESTION = "The name of the person on the image is "     # mm/dataset.py, random_faces
CAPTION_QUESTIONS = (               # mm/dataset.py IMAGE_CAPTION_QUESTIONS
    "What can you see in this picture?",
    "Tell me about the content of this image",
    "Can you give a description of the image?",
    "What is depicted in the image?",
    "Explain what you observe in the picture.",
    "Describe the image in detail.",
    "What is the main subject of this image?",
    "Can you describe the scene or objects in the image?",
    "What is happening in this image?",
)
PROTOCOL_ID = "clear-official-v1"


# ------------------------------------------------------------------ scores from losses (hand-checkable)

def clear_truth_ratios(paraphrase_loss, perturbed_losses) -> np.ndarray:
    """TR_i = exp(mean of every perturbed loss of every row - paraphrase_loss_i) (calculate_metrics.py)."""
    flat = [x for row in perturbed_losses for x in row]
    if not flat:
        raise DataError("CLEAR's truth ratio needs perturbed answers; none found")
    return np.exp(float(np.mean(flat)) - np.asarray(paraphrase_loss, dtype=float))


def truth_ratio_score(ratios, forget: bool) -> float:
    ratios = np.asarray(ratios, dtype=float)
    if forget:
        return float(np.mean(np.minimum(ratios, 1 / ratios)))
    return float(np.mean(np.maximum(0.0, 1 - 1 / ratios)))


def normalised_prob(true_loss, perturbed_losses) -> float:
    """mean_i P_true / (P_true + sum_j P_j), P = exp(-loss) (compute_model_utility, non-caption tasks)."""
    shares = []
    for t, wrong in zip(true_loss, perturbed_losses):
        p_true = math.exp(-t)
        shares.append(p_true / (p_true + sum(math.exp(-w) for w in wrong)))
    return float(np.mean(shares))


def aggregates(scores: dict[str, float | None]) -> dict[str, float | None]:
    """build_vllm_table.py's harmonic means over the named scores ("Prob. Forget", ...); None where one is missing."""
    groups = {
        "forget_metric": ("Prob. Forget", "Truth Ratio Forget", "Prob. Forget FaceRec", "Truth Ratio Forget FaceRec"),
        "retain_metric": ("Prob. Retain", "Truth Ratio Retain", "Prob. Retain FaceRec", "Truth Ratio Retain FaceRec"),
        "real_metric": ("Prob. Real Faces", "Truth Ratio Real Faces", "Prob. Real World", "Truth Ratio Real World"),
        "model_utility": ("Prob. Real Faces", "Truth Ratio Real Faces", "Prob. Real World", "Truth Ratio Real World",
                          "ROUGE Retain", "Prob. Retain", "Truth Ratio Retain", "Prob. Retain FaceRec",
                          "Truth Ratio Retain FaceRec", "ROUGE Forget", "Prob. Forget", "Truth Ratio Forget",
                          "Prob. Forget FaceRec", "Truth Ratio Forget FaceRec"),
    }
    return {name: metrics.harmonic_mean(scores.get(k) for k in keys) for name, keys in groups.items()}


def forget_quality(unlearned_tr, gold_tr) -> dict[str, float]:
    """KS p-value (calculate_metrics.py) and 1 - JS distance (build_vllm_table.py) of two forget TR arrays."""
    d, p = metrics.ks_2samp_pvalue(unlearned_tr, gold_tr)
    out = {"forget_quality_ks": p, "ks_statistic": d}
    if len(unlearned_tr) == len(gold_tr):      # jensenshannon compares the arrays position by position
        out["forget_quality_js"] = 1.0 - metrics.js_distance(unlearned_tr, gold_tr)
    return out


# ------------------------------------------------------------------ model passes

class _Questions:
    """Seeded stand-in for the authors' unseeded random.choice: one draw per (task, row, role, answer)."""

    def __init__(self, seed: int):
        self.seed = seed

    def caption(self, task: str, row: int, role: str, j: int = 0) -> str:
        return random.Random(f"{self.seed}:{task}:{row}:{role}:{j}").choice(CAPTION_QUESTIONS)


def _losses(score, images, questions, answers, desc):
    """Per-token mean NLL of each answer (answer_logprobs gives the mean log-likelihood)."""
    logps = score(images, [train_prompt(q) for q in questions], answers, desc)
    return [-x for x in logps]


def task_losses(score, rows, images, *, question_of, true_of, base_of, wrong_of, desc: str) -> dict:
    """{gt, para, pert}: per-row losses of the answer, the base (paraphrase) answer and each perturbed answer."""
    gt = _losses(score, images, [question_of(i, "gt", 0) for i in range(len(rows))], [true_of(r) for r in rows],
                 f"{desc} gt")
    para = _losses(score, images, [question_of(i, "base", 0) for i in range(len(rows))], [base_of(r) for r in rows],
                   f"{desc} base")
    flat_img, flat_q, flat_a, spans = [], [], [], []
    for i, r in enumerate(rows):
        wrong = wrong_of(r)
        spans.append(len(wrong))
        flat_img += [images[i]] * len(wrong)
        flat_q += [question_of(i, "perturbed", j) for j in range(len(wrong))]
        flat_a += wrong
    flat = _losses(score, flat_img, flat_q, flat_a, f"{desc} perturbed") if flat_a else []
    pert, at = [], 0
    for n in spans:
        pert.append(flat[at: at + n])
        at += n
    return {"gt": gt, "para": para, "pert": pert}


def summarise_task(losses: dict, *, caption: bool, forget: bool) -> dict:
    """Prob. and Truth Ratio of one task, over the rows that have perturbed answers."""
    keep = [i for i, p in enumerate(losses["pert"]) if p]
    if not keep:
        return {"prob": None, "truth_ratio": None, "tr": []}
    para = [losses["para"][i] for i in keep]
    pert = [losses["pert"][i] for i in keep]
    tr = clear_truth_ratios(para, pert)
    if caption:
        prob = float(np.mean(np.exp(-np.asarray(losses["gt"], dtype=float))))
    else:
        prob = normalised_prob([losses["gt"][i] for i in keep], pert)
    return {"prob": prob, "truth_ratio": truth_ratio_score(tr, forget), "tr": tr.tolist()}


def caption_task(score, rows: list[CaptionRow], images, questions: _Questions, task: str, forget: bool) -> dict:
    losses = task_losses(score, rows, images, question_of=lambda i, role, j: questions.caption(task, i, role, j),
                         true_of=lambda r: r.caption, base_of=lambda r: r.paraphrased_caption or r.caption,
                         wrong_of=lambda r: r.perturbed_captions, desc=task)
    return {**summarise_task(losses, caption=True, forget=forget), "losses": losses}


def facerec_task(score, rows: list[CaptionRow], images, task: str, forget: bool) -> dict:
    losses = task_losses(score, rows, images, question_of=lambda i, role, j: FACE_QUESTION, true_of=lambda r: r.name,
                         base_of=lambda r: r.name, wrong_of=lambda r: r.perturbed_names, desc=task)
    return {**summarise_task(losses, caption=False, forget=forget), "losses": losses}


def real_task(score, rows: list[RealRow], images, task: str, column_question: bool) -> dict:
    # real_faces asks FACE_QUESTION (random_faces); real_world its own `question` column. The
    # perturbed answers are `options` as published (eval.yaml perturbed_answer_key: options).
    losses = task_losses(score, rows, images,
                         question_of=lambda i, role, j: rows[i].question if column_question else FACE_QUESTION,
                         true_of=lambda r: r.answer, base_of=lambda r: r.answer, wrong_of=lambda r: r.options,
                         desc=task)
    return {**summarise_task(losses, caption=False, forget=False), "losses": losses}


def caption_prompts_without_image(rows: list[CaptionRow], questions: _Questions, task: str) -> list[str]:
    """The generation prompts: the gt question with the image placeholder dropped (mm/eval.py get_all_evals)."""
    return [train_prompt(questions.caption(task, i, "gt")).replace(IMAGE_TOKEN, "") for i in range(len(rows))]


def load_images(rows, set_name: str):
    return [load_image(r.image, f"{set_name} row {r.row}") for r in rows]
