"""Membership-inference attacks (MIA): does the model still treat the forget set as training data?

Four per-sample attacks score each training QA from the model's teacher-forced
log-probabilities of its answer; the ROC AUC of those scores, members (data the
model was trained on, e.g. the forget set) against non-members (data it never
saw, e.g. held-out people), says how well membership can be read off the model.
Compared with the same AUC of a gold model (trained on the retain data only,
so it never saw the forget set) it gives a MUSE-style PrivLeak.

Definitions (answer tokens only: logits position t predicts labels[:, t], mask
is 1 on real answer tokens; every statistic in float32/float64 whatever the
model's dtype):

- lp_t = log softmax(logits_t)[y_t], the log-probability of answer token t.
- LOSS = mean_t(-lp_t); the attack's score is -LOSS.
- zlib = LOSS / zlib_entropy(answer text), zlib_entropy = len(zlib.compress(text.encode("utf-8")))
  in bytes; the score is -zlib. The text is the answer as written in the data
  (stripped, no special tokens, no leading space).
- min-k%: the mean of the n = max(1, int(T * k)) lowest lp_t over the T answer
  tokens; the score is that mean (OpenUnlearning returns its negative).
- min-k%++: z_t = (lp_t - mu_t) / sigma_t with mu_t = sum_v p_v log p_v (the
  expected log-probability under the model's own next-token distribution) and
  sigma_t^2 = sum_v p_v (log p_v)^2 - mu_t^2, computed as the equal and
  cancellation-free sum_v p_v (log p_v - mu_t)^2 (p_v = 0 terms count 0). Guard:
  sigma_t^2 is clamped below at VAR_FLOOR = 1e-6 (sigma_t >= 1e-3), as
  OpenUnlearning does; a zero variance means a one-hot distribution, and a
  target that is its argmax then gets z_t = 0 instead of 0/0. The score is the
  mean of the n lowest z_t, same n as min-k%.

Orientation: every score returned here is HIGHER = MORE MEMBER-LIKE (a lower
loss, a higher log-probability). OpenUnlearning signs its scores the other way
(like a loss) and labels members 0; both give the same AUC.

AUC (Mann-Whitney, exact, numpy): P(score_member > score_nonmember) + 0.5 P(tie).
1.0 = members perfectly identified, 0.5 = chance, < 0.5 = members look LESS
member-like than non-members (a sign of over-unlearning).

PrivLeak = 100 * (auc - gold_auc) / gold_auc, gold_auc being the AUC of the
gold (retain-only) model on the same members/non-members: 0 is ideal, positive
= membership leaks more than from a model that never saw the forget data
(under-unlearning), negative = over-unlearned. NOTE the sign: MUSE and
OpenUnlearning report the opposite sign (see below and privleak_openunlearning).

Which tokens: exactly the answer tokens the fine-tuning / unlearning loss
trains on (prompt and answer from prompts.train_text, tokenised together by
encoding.encode_pair, the profile's own image), EXCEPT the EOS id that
finetune.build_examples appends: EOS is not scored. Its probability says how
well the model learned to stop, the same for every answer, not which facts it
holds; OpenUnlearning also drops the EOS prediction for min-k%/min-k%++
(tokenwise_logprobs) and leaves special tokens out of the zlib text.

Source (OpenUnlearning, github.com/locuslab/open-unlearning, commit d3d7cf9e,
read for the definitions, no code copied):
- src/evals/metrics/mia/loss.py, LOSSAttack.compute_score: the per-sample
  average token loss (evals/metrics/utils.py::evaluate_probability, summed
  cross-entropy over labelled tokens / their count; its labels include EOS).
- src/evals/metrics/mia/zlib.py, ZLIBAttack.compute_score:
  avg_loss / len(zlib.compress(text.encode("utf-8"))), text decoded from the
  label tokens with skip_special_tokens=True
  (utils.py::extract_target_texts_from_processed_data).
- src/evals/metrics/mia/min_k.py, MinKProbAttack: setup(k=0.2) is the class
  default; compute_score takes num_k = max(1, int(len(lp) * k)) lowest token
  log-probs and returns -mean. Every shipped config sets k: 0.4
  (configs/eval/{tofu,muse}_metrics/mia_min_k.yaml and mia_min_k_plus_plus.yaml),
  and PrivLeak is built on that min-k AUC, so DEFAULT_K = 0.4 here.
- src/evals/metrics/mia/min_k_plus_plus.py, MinKPlusPlusAttack.compute_score:
  mu = sum(exp(lp_v) * lp_v), variance = sum(exp(lp_v) * lp_v^2) - mu^2 clamped
  at min 1e-6, z = (lp - mu) / sqrt(variance), -mean of the num_k lowest.
- src/evals/metrics/mia/utils.py, mia_auc: labels forget (members) 0, holdout
  (non-members) 1, sklearn roc_auc_score on the loss-like scores, i.e.
  P(member looks more member-like); "auc is 1 when the forget data is much more
  likely than the holdout data". The same quantity as auc() here.
- src/evals/metrics/privacy.py, privleak: score = 1 - auc, ref = 1 - ref_auc,
  (score - ref) / (ref + 1e-10) * 100, ref from the retain model's logs or
  ref_value 0.5 (configs/eval/{tofu,muse}_metrics/privleak.yaml, on mia_min_k).
  Its docstring: MUSE reports AUC as 1 - x, hence the flip. So OpenUnlearning's
  PrivLeak = 100 * (gold_auc - auc) / (1 - gold_auc): negative = leaking.
  privleak() here follows this project's convention (positive = leaking,
  relative to gold_auc); at gold_auc = 0.5 the two differ only in sign.

Deviations from OpenUnlearning, on purpose: LOSS averages the answer tokens
without EOS (theirs includes EOS: see above); an answer with no scored token
raises ValueError (theirs scores 0 for min-k, and divides by zero for LOSS);
AUC in exact numpy, no sklearn (not a dependency; same value).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from pipeline.data.records import Profile
from pipeline.models.encoding import encode_pair, load_image, max_positions, pixel_values
from pipeline.models.forward import answer_logits, make_text_batch
from pipeline.models.prompts import train_text


ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")
DEFAULT_K = 0.4        # OpenUnlearning's configured k for min-k% and min-k%++ (module doc)
VAR_FLOOR = 1e-6       # min-k%++ variance floor (OpenUnlearning's clamp)


# ------------------------------------------------------------------ token statistics

def token_statistics(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """(lp, mu, sigma), each [B, T] float32: target log-prob, its expectation and spread under the model.

    Positions off the mask hold lp = mu = 0, sigma = 1 (never read by attack_scores).
    """
    on = mask > 0
    logp = torch.log_softmax(logits.float(), dim=-1)
    # Labels off the mask may be padding or -100: any valid index will do there.
    lp = logp.gather(-1, torch.where(on, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    # p_v = 0 has log p_v = -inf: its term is 0, not 0 * inf.
    mu = torch.where(p > 0, p * logp, 0.0).sum(-1)
    var = torch.where(p > 0, p * (logp - mu.unsqueeze(-1)) ** 2, 0.0).sum(-1)
    sigma = var.clamp(min=VAR_FLOOR).sqrt()
    return lp.masked_fill(~on, 0.0), mu.masked_fill(~on, 0.0), sigma.masked_fill(~on, 1.0)


def zlib_entropy(text: str) -> int:
    """Bytes of the zlib-compressed UTF-8 text (OpenUnlearning ZLIBAttack)."""
    return len(zlib.compress(text.encode("utf-8")))


def lowest_k_mean(values: np.ndarray, k: float) -> float:
    """Mean of the max(1, int(len * k)) lowest values (OpenUnlearning MinKProbAttack)."""
    n = max(1, int(len(values) * k))
    return float(np.sort(values)[:n].mean())


def attack_scores(lp, mu, sigma, mask, texts: list[str], k: float = DEFAULT_K) -> dict[str, list[float]]:
    """Per attack (ATTACKS), one score per example, higher = more member-like (module doc)."""
    if not 0 < k <= 1:
        raise ValueError(f"min-k fraction k must be in (0, 1], got {k}")
    if len(texts) != len(lp):
        raise ValueError(f"{len(texts)} texts for {len(lp)} examples")
    lp, mu, sigma = (torch.as_tensor(t).double().cpu().numpy() for t in (lp, mu, sigma))
    on = torch.as_tensor(mask).cpu().numpy() > 0
    out: dict[str, list[float]] = {a: [] for a in ATTACKS}
    for i, text in enumerate(texts):
        row = on[i]
        if not row.any():
            raise ValueError(f"example {i}: no answer token to score")
        lp_i = lp[i, row]
        loss = float(-lp_i.mean())
        z = (lp_i - mu[i, row]) / sigma[i, row]
        out["loss"].append(-loss)
        out["zlib"].append(-loss / zlib_entropy(text))
        out["min_k"].append(lowest_k_mean(lp_i, k))
        out["min_k_pp"].append(lowest_k_mean(z, k))
    return out


# ------------------------------------------------------------------ AUC and PrivLeak

def auc(member_scores, nonmember_scores) -> float:
    """Exact Mann-Whitney AUC: P(member > non-member) + 0.5 P(tie), scores higher = more member-like."""
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.sort(np.asarray(nonmember_scores, dtype=np.float64).ravel())
    if m.size == 0 or n.size == 0:
        raise ValueError(f"AUC needs both groups: {m.size} members, {n.size} non-members")
    if np.isnan(m).any() or np.isnan(n).any():
        raise ValueError("AUC of NaN scores")
    # For each member: non-members strictly below it, and those equal to it (integer counts, exact).
    below = np.searchsorted(n, m, side="left")
    ties = np.searchsorted(n, m, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (m.size * n.size))


def privleak(auc_value: float, gold_auc: float) -> float:
    """100 * (auc - gold_auc) / gold_auc: positive = leaks more than the gold model, negative = over-unlearned."""
    if not gold_auc > 0:
        raise ValueError(f"PrivLeak needs a positive gold AUC, got {gold_auc}")
    return 100.0 * (auc_value - gold_auc) / gold_auc


def privleak_openunlearning(auc_value: float, gold_auc: float) -> float:
    """OpenUnlearning's / MUSE's PrivLeak (privacy.py::privleak), for comparing with published numbers.

    100 * ((1 - auc) - (1 - gold)) / (1 - gold): the OPPOSITE sign of privleak()
    (negative = leaking) and relative to 1 - gold (g=0.6, auc=0.9: -75, against +50).
    """
    if not gold_auc < 1:
        raise ValueError(f"OpenUnlearning's PrivLeak needs a gold AUC below 1, got {gold_auc}")
    return 100.0 * ((1 - auc_value) - (1 - gold_auc)) / (1 - gold_auc)


# The attack every table reports, declared before any number is seen: min-k% (k = evaluate.mia_k, 0.4), as
# OpenUnlearning's privleak metric. Choosing the attack per row by its distance to the gold model (the
# "best of four" kept below as a diagnostic) pushes PrivLeak away from 0 even when unlearning is perfect
# (tests/test_mia.py simulates it).
FIXED_ATTACK = "min_k"


def gold_comparison(metrics: dict, gold_metrics: dict | None) -> dict:
    """PrivLeak per attack against the gold model's AUCs, in both conventions, and a biased diagnostic.

    `privleak_<attack>`: viker's 100 (auc - g) / g; `privleak_ou_<attack>`:
    OpenUnlearning's / MUSE's 100 (g - auc) / (1 - g) (opposite sign, another
    denominator). The diagnostic `mia_best_of_4_attack` is the attack under
    which the model looks least like one that never saw the members (largest
    |auc - gold_auc|; without gold metrics, largest |auc - 0.5|), with its AUC
    and PrivLeak as `*_best_of_4_biased`: a per-row maximum, biased away from
    the gold model; tables report FIXED_ATTACK. Ties go to the earlier attack.
    """
    aucs = {a: metrics[f"mia_auc_{a}"] for a in ATTACKS}
    out: dict = {}
    if gold_metrics:
        gold = {a: gold_metrics[f"mia_auc_{a}"] for a in ATTACKS}
        out.update({f"privleak_{a}": privleak(aucs[a], gold[a]) for a in ATTACKS})
        # undefined (None) for a gold AUC of 1: its denominator 1 - g is 0
        out.update({f"privleak_ou_{a}": privleak_openunlearning(aucs[a], gold[a]) if gold[a] < 1 else None
                    for a in ATTACKS})
    else:
        gold = dict.fromkeys(ATTACKS, 0.5)
    best = max(ATTACKS, key=lambda a: abs(aucs[a] - gold[a]))   # max keeps the first of equals
    out.update({"mia_best_of_4_attack": best, "mia_auc_best_of_4_biased": aucs[best]})
    if gold_metrics:
        out["privleak_best_of_4_biased"] = out[f"privleak_{best}"]
    return out


# ------------------------------------------------------------------ the model

def qa_items(profiles: list[Profile]) -> list[tuple[str, object, str, str]]:
    """(sample_id, image, prompt, answer) of every training QA, on the profile's own image.

    prompt and answer (leading space included) are train_text's: the text the
    fine-tuning and unlearning losses train on. One image object per profile,
    so sample_scores preprocesses it once.
    """
    items = []
    for p in profiles:
        image = load_image(p.image, f"profile {p.id} image")
        for j, qa in enumerate(p.qa):
            prompt, answer = train_text(qa.question, qa.answer)
            items.append((f"{p.id}/{j}", image, prompt, answer))
    return items


def answer_batches(model, processor, items: list[tuple], batch_size: int, what: str):
    """Yield (chunk, answer logits, batch) per batch of (sample_id, image, prompt, answer) items (qa_items).

    Teacher-forced on the answer; each distinct image object is preprocessed once.
    The caller holds torch.no_grad. `what` names the items in an encoding error.
    """
    param = next(model.parameters())
    pad_id = processor.tokenizer.pad_token_id
    limit = max_positions(model)
    distinct = {id(image): image for _, image, _, _ in items}
    slot = {key: n for n, key in enumerate(distinct)}
    all_pixels = pixel_values(processor, list(distinct.values())) if distinct else None
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pairs = [encode_pair(processor, prompt, answer, f"{what} {sid}", limit) for sid, _, prompt, answer in chunk]
        batch = make_text_batch([ids for ids, _ in pairs], [a for _, a in pairs], pad_id).to(param.device)
        pixels = all_pixels[[slot[id(image)] for _, image, _, _ in chunk]].to(param.device, param.dtype)
        yield chunk, answer_logits(model, batch, pixels), batch


@torch.no_grad()
def sample_scores(model, processor, items: list[tuple], batch_size: int = 32, k: float = DEFAULT_K) -> list[dict]:
    """One {"id", **{attack: score}} per (sample_id, image, prompt, answer) item (qa_items), in order.

    Teacher-forced, answer tokens only, EOS not scored (module doc); one forward per batch.
    """
    rows: list[dict] = []
    for chunk, logits, batch in answer_batches(model, processor, items, batch_size, "MIA sample"):
        stats = token_statistics(logits, batch.answer_ids, batch.answer_mask)
        scores = attack_scores(*stats, batch.answer_mask, [answer.strip() for *_, answer in chunk], k)
        rows += [{"id": item[0], **{a: scores[a][i] for a in ATTACKS}} for i, item in enumerate(chunk)]
    return rows


def membership(model, processor, members: list[Profile], nonmembers: list[Profile], batch_size: int = 32,
               k: float = DEFAULT_K) -> tuple[dict, list[dict]]:
    """({"mia_auc_<attack>", "n_members", "n_nonmembers"}, per-sample rows {"id", "member", **scores}).

    Members are the profiles' training QA the model was trained on (e.g. the
    forget set), non-members those of profiles it never saw; n_* count QA
    samples, not profiles.
    """
    inside, outside = qa_items(members), qa_items(nonmembers)
    scored = sample_scores(model, processor, inside + outside, batch_size, k)
    rows = [{"id": r["id"], "member": i < len(inside), **{a: r[a] for a in ATTACKS}} for i, r in enumerate(scored)]
    metrics = {f"mia_auc_{a}": auc([r[a] for r in rows if r["member"]], [r[a] for r in rows if not r["member"]])
               for a in ATTACKS}
    metrics.update(n_members=len(inside), n_nonmembers=len(outside))
    return metrics, rows
