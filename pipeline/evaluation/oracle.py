"""Distance to the oracle: how far an unlearned model's answers are from the gold model's.

The gold model was trained like the vanilla one but never on the forget
people: perfect unlearning would make the two indistinguishable. On every
training QA of the forget set, teacher-forced on the ground-truth answer, the
distance at an answer position t is

    KL_t = KL(P_gold,t || Q_t)   over the gold model's top-K tokens S plus one "rest" bucket:
         = sum_{v in S} p_v log(p_v / q_v) + p_rest log(p_rest / q_rest),
    p_rest = 1 - sum_{v in S} p_v,   q_rest = 1 - sum_{v in S} q_v

Merging the tokens outside S into one bucket can only lower a KL (the data
processing inequality), so this is a lower bound of the full KL, exact when
the gold model's mass lies in S; K = 64 keeps the gold side small enough to
remember beside the gold model (gold-answers.json), computed once per forget set.

Token classes: a position is a **key** token when the gold model gives the
true answer token less than KEY_BELOW (0.5) probability: the gold model cannot
say it, so the forget person's training is what made it predictable (a name, a
birthplace). The others are **normal** tokens (the template, and what the
question already tells). Metrics (each a mean over items of the item's mean
over its positions of that class; metric studies of unlearning, e.g. arXiv
2605.02206, find the distance to the retrained oracle is what the usual metrics
should track): kl_gold, kl_gold_key, kl_gold_normal, key_share (the share of
answer positions that are key), n_items.
"""
from __future__ import annotations

import math

import torch

from .mia import answer_batches

TOP_K = 64
KEY_BELOW = 0.5


def coarse_kl(p_ids: torch.Tensor, p_probs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position on P's support S (p_ids, p_probs: [T, K]) plus the rest bucket; q_logprobs [T, V]."""
    p = p_probs.double()
    q_s = q_logprobs.double().gather(-1, p_ids.long()).exp()
    inside = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q_s.clamp_min(1e-300).log()), 0.0).sum(-1)
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - q_s.sum(-1)).clamp_min(1e-300)
    rest = torch.where(p_rest > 1e-12, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log()), 0.0)
    return (inside + rest).clamp_min(0.0)


@torch.no_grad()
def _answer_logprobs(model, processor, items: list[tuple], batch_size: int):
    """Yield (sample_id, [T, V] log-probs at the answer positions, [T] answer ids) per item, teacher-forced."""
    for chunk, logits, batch in answer_batches(model, processor, items, batch_size, "oracle sample"):
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        mask, ids = batch.answer_mask.cpu() > 0, batch.answer_ids.cpu()
        for i, item in enumerate(chunk):
            yield item[0], logp[i][mask[i]], ids[i][mask[i]]


def gold_answers(model, processor, items: list[tuple], batch_size: int = 32, top_k: int = TOP_K) -> dict:
    """The gold model's side, as plain data: {sample_id: {"ids": [T][K], "probs": [T][K], "true": [T]}}."""
    out = {}
    for sid, logp, ids in _answer_logprobs(model, processor, items, batch_size):
        top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        out[sid] = {"ids": top.indices.tolist(), "probs": top.values.exp().tolist(),
                    "true": logp.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1).exp().tolist()}
    return out


def distance_to_gold(model, processor, items: list[tuple], gold: dict, batch_size: int = 32) -> tuple[dict, list]:
    """(metrics, per-item rows {"id", "kl", "kl_key", "kl_normal", "n_key", "n"}) of `model` against `gold`."""
    rows = []
    for sid, logp, _ in _answer_logprobs(model, processor, items, batch_size):
        g = gold[sid]
        kl = coarse_kl(torch.tensor(g["ids"]), torch.tensor(g["probs"]), logp)
        key = torch.tensor(g["true"]) < KEY_BELOW
        rows.append({"id": sid, "n": int(kl.numel()), "n_key": int(key.sum()), "kl": float(kl.mean()),
                     "kl_key": float(kl[key].mean()) if key.any() else math.nan,
                     "kl_normal": float(kl[~key].mean()) if (~key).any() else math.nan})

    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan
    metrics = {"kl_gold": mean([r["kl"] for r in rows]), "kl_gold_key": mean([r["kl_key"] for r in rows]),
               "kl_gold_normal": mean([r["kl_normal"] for r in rows]),
               "key_share": sum(r["n_key"] for r in rows) / max(1, sum(r["n"] for r in rows)), "n_items": len(rows)}
    return metrics, rows
