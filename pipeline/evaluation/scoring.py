"""Knowledge read from likelihoods, not from generated text.

A model that never learned the multiple-choice format (the tiny demo model
answers "This person ..." to "Just give ONE letter") scores 0% on the
generated-letter metric whether or not it knows the fact, so Forget ACC in the
MLLMU-Bench sense cannot be read from it. Scoring every option instead asks
what the model *believes*: the chosen option is the one whose text has the
highest summed log-likelihood as the answer to the question, given the image
(teacher-forced, prompt = the training prompt `USER: <image>\\n{Q}\\nASSISTANT:`,
answer = " " + option text). The sum, not the per-token mean: it is the
log-probability of the whole option string, and a length-normalised score
would favour long options whose later tokens are predictable from the first.

Cloze gets the same treatment. Its candidate set (documented because it sets
the chance level): the truth plus up to three distractors, the next distinct
ground truths (cyclically, in file order) of the cloze items in the same
position j (the same kind of blank: city, job, year in the miniature
benchmark) over the profiles of the evaluated set. Four candidates make
chance 25% as in multiple choice and keep the cost at four forwards per item;
an item whose set offers no other value is not scored. The prompt is the
cloze prompt of evaluation and the candidate its answer.

One batched forward per `batch_size` (image, prompt, answer) triples, logits
at the answer positions only (forward.answer_logits).
"""
from __future__ import annotations

import torch

from pipeline.data.records import Profile
from pipeline.models.encoding import encode_pair, pixel_values
from pipeline.models.forward import answer_logits, make_text_batch
from pipeline.models.prompts import cloze_prompt, train_prompt

from .results import mean, sample_row


LL_METRIC_KEYS = ("mc_ll_acc", "mc_ll_acc_image", "mc_ll_acc_text", "cloze_ll_acc")


@torch.no_grad()
def answer_logliks(model, processor, items: list[tuple], batch_size: int = 32) -> list[float]:
    """Summed log-likelihood of each answer given (image, prompt): items are (image, prompt, answer)."""
    param = next(model.parameters())
    pad_id = processor.tokenizer.pad_token_id
    # Every option of an item shares its image: preprocess each distinct image once.
    distinct = {id(image): image for image, _, _ in items}
    slot = {key: n for n, key in enumerate(distinct)}
    all_pixels = pixel_values(processor, list(distinct.values())) if distinct else None
    out: list[float] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pairs = [encode_pair(processor, prompt, " " + answer.strip(), where=f"option {answer!r}")
                 for _, prompt, answer in chunk]
        batch = make_text_batch([ids for ids, _ in pairs], [a for _, a in pairs], pad_id).to(param.device)
        pixels = all_pixels[[slot[id(image)] for image, _, _ in chunk]].to(param.device, param.dtype)
        logp = torch.log_softmax(answer_logits(model, batch, pixels).float(), dim=-1)
        token_lp = logp.gather(-1, batch.answer_ids.unsqueeze(-1)).squeeze(-1)
        out += (token_lp * batch.answer_mask).sum(-1).tolist()
    return out


def _argmax(values: list[float]) -> int:
    # First maximum: ties go to the earlier option (stable, documented).
    return max(range(len(values)), key=lambda i: (values[i], -i))


def likelihood_mc(model, processor, profiles: list[Profile], images: list, batch_size: int = 32,
                  set_name: str = "") -> tuple[dict, list[dict]]:
    """MC accuracy by option likelihood: {mc_ll_acc, mc_ll_acc_image, mc_ll_acc_text}, per-item rows."""
    items = [(i, p, c) for i, p in enumerate(profiles) for c in p.choices]
    letters = [sorted(c.options) for _, _, c in items]
    flat = [(images[i], train_prompt(c.question), c.options[letter])
            for (i, _, c), opts in zip(items, letters) for letter in opts]
    scores = answer_logliks(model, processor, flat, batch_size)
    rows, at = [], 0
    for (_, p, c), opts in zip(items, letters):
        ll = scores[at:at + len(opts)]
        at += len(opts)
        chosen = opts[_argmax(ll)]
        rows.append(sample_row(set_name, p.id, "mc_ll", c.question, c.correct, chosen,
                         {"loglik": dict(zip(opts, ll)), "correct": chosen == c.correct.strip().upper()}, c.kind))
    share = {kind: mean(r["scores"]["correct"] for r in rows if kind in (None, r["type"]))
             for kind in (None, "image", "text")}
    return {"mc_ll_acc": share[None], "mc_ll_acc_image": share["image"], "mc_ll_acc_text": share["text"]}, rows


CLOZE_CANDIDATES = 4


def cloze_values(profiles: list[Profile], j: int) -> list[str]:
    """Distinct ground truths of cloze item j across the set, in first-seen order."""
    seen: dict[str, None] = {}
    for p in profiles:
        if j < len(p.cloze):
            seen.setdefault(p.cloze[j].ground_truth.strip(), None)
    return list(seen)


def cloze_candidates(values: list[str], truth: str, n: int = CLOZE_CANDIDATES) -> list[str]:
    """The truth, then the next n-1 other values after it (cyclically): module doc."""
    at = values.index(truth)
    return [values[(at + i) % len(values)] for i in range(min(n, len(values)))]


def likelihood_cloze(model, processor, profiles: list[Profile], images: list, batch_size: int = 32,
                     set_name: str = "") -> tuple[float | None, list[dict]]:
    """Cloze accuracy by candidate likelihood (candidates: module doc), per-item rows."""
    width = max((len(p.cloze) for p in profiles), default=0)
    values = [cloze_values(profiles, j) for j in range(width)]
    items = [(i, p, cloze_candidates(values[j], g.ground_truth.strip()), g)
             for i, p in enumerate(profiles) for j, g in enumerate(p.cloze) if len(values[j]) > 1]
    flat = [(images[i], cloze_prompt(g.question), cand) for i, _, cands, g in items for cand in cands]
    scores = answer_logliks(model, processor, flat, batch_size)
    rows, at = [], 0
    for _, p, cands, g in items:
        ll = scores[at:at + len(cands)]
        at += len(cands)
        chosen = cands[_argmax(ll)]
        rows.append(sample_row(set_name, p.id, "cloze_ll", g.question, g.ground_truth, chosen,
                         {"candidates": dict(zip(cands, ll)), "correct": chosen == g.ground_truth.strip()}, g.kind))
    return mean(r["scores"]["correct"] for r in rows), rows


def likelihood_metrics(model, processor, profiles: list[Profile], images: list, batch_size: int = 32,
                       set_name: str = "") -> tuple[dict, list[dict]]:
    """Every likelihood metric of one set (LL_METRIC_KEYS) and its per-item rows: evaluate's hook."""
    mc, mc_rows = likelihood_mc(model, processor, profiles, images, batch_size, set_name)
    cloze, cloze_rows = likelihood_cloze(model, processor, profiles, images, batch_size, set_name)
    return {**mc, "cloze_ll_acc": cloze}, mc_rows + cloze_rows
