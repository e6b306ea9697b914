"""Unlearning losses for stage two (docs/METHODS.md).

Every function takes plain tensors and plain floats and returns per-example
losses of shape [B] plus a dict of detached float32 [B] diagnostics; the
method modules (stage2/methods/) call them, and reduce and compose them (mean
over the batch, the retain term weighted by alpha = train.retain_weight):

    GA        mean_i log Q_i(y_i)
    GradDiff  GA(forget) + alpha * NLL(retain)
    KL_Min    GA(forget) + alpha * KL(P_vanilla || P_cur) on retain
    NPO       -(2/beta) * logsigmoid(-beta * (ll_cur - ll_ref))            beta = 0.4 (openunlearning: 0.1, + NLL(retain))
    IdkPO     -logsigmoid(beta * ((ll_cur - ll_ref)[idk] - (ll_cur - ll_ref)[gt]))
    SimNPO    -(2/beta) * logsigmoid(beta * (-ll/T - gamma))                  reference-free, per-token
    RMU       (1/D) ||h_l - c*u||^2 on forget + alpha * (1/D) ||h_l - h_l^vanilla||^2 on retain
    ViKeR     mean_i [ log Q_i(y_i) + lambda_i * D(R~_i, Q~_i) ]                (the paper's; no retain data)
    ViKeR+NLL ViKeR(forget) + alpha * NLL(retain)         train.retain_term nll (ours, GradDiff's term)
    ViKeR+KL  ViKeR(forget) + alpha * KL(P_vanilla || P_cur) on retain       train.retain_term kl (ours)

Q_i is the current model's distribution at answer position i, y_i the
ground-truth token, ll = sum_i log Q_i(y_i) the summed answer log-likelihood.
With D = KL(R || Q) the ViKeR gradient on the logits of position i is
e_y - (1 - lambda) Q - lambda R (before the 1/T of the token mean).

Top-K truncation: R (the averaged reference distribution of stage one) is
cached as its top-K entries plus the tail mass, so both distributions are
compared on K+1 buckets, R~ = (R_topK, tail_R) and Q~ = (Q_topK, 1 - sum
Q_topK). KL(R~ || Q~) is a lower bound of the full KL (log-sum inequality) and
equals it when R has no mass outside the top-K.

Conventions: the caller has sliced the logits to answer positions, so
position t of `logits` predicts `labels[:, t]`; `mask` is 1 on real answer
tokens and 0 on padding. Math is done in float32 whatever the input dtype.

Ours, not the paper's: the per-example normalisation (mean over answer tokens,
then the loop's batch mean; NPO/IdkPO use summed log-likelihoods as in their
papers), the floors that keep padded positions finite (Q's tail has none: it is
computed by logsumexp, see _log_buckets), and the
optional per-token lambda (`token_lambda`, `entropy_token_lambda`).

Baseline conventions (train.convention; each method module's CONVENTIONS
table in stage2/methods/). ll = summed answer log-likelihood, lbar = ll / T (per-token mean):

    method   viker (ours; the demo)          mllmu (MLLMU-Bench baselines/)          openunlearning
    GA       mean_t log Q                    same (GA.py: -outputs.loss)              same
    GradDiff GA + NLL(retain)                same (GA_Difference.py)                  same (alpha 1)
    KL_Min   GA + KL(P_van||P_cur)           GA + NLL(retain) + KL (KL_Min.py:        GA + KL (GradDiff with
                                             loss_retain = outputs.loss + kl_div)     retain_loss_type KL)
    NPO      -(2/b) logsig(-b (ll - ll_ref)) -(2/b) logsig(-b (lbar - lbar_ref))     as viker with b = 0.1, + NLL(retain),
             b = 0.4                         b = 0.4 (NPO.py: outputs.loss are        alpha 1 (NPO.yaml; npo.py; utils.py
                                             per-token means)                          compute_dpo_loss, summed
                                                                                      compute_batch_nll)
    (NPO's b: train.beta when > 0; its default 0 means the convention's, as above.)
    IdkPO    -logsig(b * margin), b = beta   -(2/b') logsig(b' * margin), b' =        same as mllmu (utils.py
                                             train.idk_beta (0.1); retain term with   compute_dpo_loss; DPO
                                             train.retain_weight > 0 (MLLMU-Bench     class: gamma * forget +
                                             has no IdkPO: OpenUnlearning's form)     alpha * retain)
    SimNPO   -(2/b) logsig(b (-lbar - g)),   as openunlearning (MLLMU-Bench has       0.125 x that with b = 4.5,
             b = 2.5 (the authors' simnpo)   no SimNPO)                               + NLL(retain) (SimNPO.yaml)
    RMU      the same in every convention (OpenUnlearning's rmu.py; methods/rmu.py)

where margin = (ll - ll_ref)[idk] - (ll - ll_ref)[gt]. Differences that remain
in every convention: our GA/NLL/KL average over *answer* tokens (the authors'
HF `outputs.loss` also covers the prompt; KL_Min.py's kl_div(reduction=
"batchmean") sums over tokens per example), and NPO's reference is the vanilla
model cached by stage one (MLLMU-Bench's NPO.py uses an "oracle" model
fine-tuned on the retain set).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DIVERGENCES = ("kl", "jsd", "cos")

# Floor for probabilities inside a log. Softmax in float32 underflows to 0 once
# logits drift ~100 apart (GA drives them there); the smallest normal float32
# keeps log finite (~ -87) and every gradient finite, and is far below any
# probability that matters.
_TINY = torch.finfo(torch.float32).tiny


# ----------------------------------------------------------------- helpers


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example mean over answer tokens: sum(x*mask) / max(sum(mask), 1)."""
    m = mask.to(torch.float32)
    # where(), not only x*m: a non-finite value at a padded position would
    # otherwise turn into NaN (inf * 0).
    x = torch.where(m > 0, x, torch.zeros_like(x))
    return (x * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float32)
    return (torch.where(m > 0, x, torch.zeros_like(x)) * m).sum(-1)


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x * log(y), 0 where x == 0, finite value and gradient everywhere.

    torch.xlogy has the right value, but its backward is x / y, which is
    0/0 = NaN where both are zero (a padded R bucket next to an underflowed
    Q entry, or Q's own entropy term in the JSD).
    """
    return x * torch.log(y.clamp_min(_TINY))


def _kl_buckets(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (_xlogy(p, p) - _xlogy(p, q)).sum(-1)


def _gather_labels(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Padded labels may carry the ignore index (-100); gather at 0 instead of
    # failing. Those positions must have mask 0, which discards them.
    idx = labels.clamp_min(0).unsqueeze(-1)
    return logp.gather(-1, idx).squeeze(-1)


def _log_buckets(logp: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """log Q~ = (log Q at the K indices, log tail), [..., K+1], from log-probabilities.

    The tail is logsumexp over the entries *outside* the top-K minus
    logsumexp over all, never 1 - sum(top-K): the difference loses ~1e-4 of
    a small tail to float32 rounding (4e-7 this way), and a floor under it
    (the old 1e-6) both misstates a saturated model's tail (GA drives it to
    1e-20 and below) and zeroes its gradient. Entries inside the top-K are
    masked with the lowest finite float, not -inf, so a top-K that covers the
    whole vocabulary gives a tail of exactly 0 with finite gradients.
    Repeated indices (padded positions) are masked once.
    """
    idx = topk_idx.long()
    in_top = torch.zeros(logp.shape, dtype=torch.bool, device=logp.device).scatter(-1, idx, True)
    rest = logp.masked_fill(in_top, torch.finfo(logp.dtype).min)
    log_tail = torch.logsumexp(rest, -1, keepdim=True) - torch.logsumexp(logp, -1, keepdim=True)
    return torch.cat([logp.gather(-1, idx), log_tail], dim=-1)


def _buckets_from_logp(logp: torch.Tensor, topk_idx: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    # eps: an optional floor on the tail (0: none, the default; see _log_buckets).
    q = _log_buckets(logp, topk_idx).exp()
    if eps > 0:
        q = torch.cat([q[..., :-1], q[..., -1:].clamp_min(eps)], dim=-1)
    return q


def _kl_log_buckets(r: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(R~ || Q~) with Q~ given as logs: exact even where Q's tail underflows float32 (< 1e-38)."""
    cross = torch.where(r > 0, r * log_q, torch.zeros_like(r))
    return (_xlogy(r, r) - cross).sum(-1)


def _check_kind(kind: str) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence kind {kind!r}; allowed: {', '.join(DIVERGENCES)}")


def _diag(**values: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float32) for k, v in values.items()}


# ------------------------------------------------------- likelihood terms


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log Q_t(labels_t), [B, T] float32."""
    return _gather_labels(F.log_softmax(logits.float(), dim=-1), labels)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-likelihood of the answer (ll in docs/METHODS.md), [B]."""
    return _masked_sum(token_logprobs(logits, labels), mask)


def ga_loss(logits, labels, mask):
    """Gradient ascent on the forget answer: minimise mean_i log Q_i(y_i)."""
    lp = token_logprobs(logits, labels)
    mean_lp = _masked_mean(lp, mask)
    return mean_lp, _diag(forget_nll=-mean_lp, forget_prob=_masked_mean(lp.exp(), mask))


def nll_loss(logits, labels, mask):
    """Ordinary mean NLL over answer tokens (the retain term of GradDiff)."""
    nll = -_masked_mean(token_logprobs(logits, labels), mask)
    return nll, _diag(nll=nll)


def kl_retain_loss(cur_logits, ref_logits, mask):
    """KL(P_ref || P_cur) over the full vocabulary, mean over answer tokens.

    KL_Min's retain term; `ref_logits` come from the vanilla model (adapter
    disabled, no_grad) and are detached here again so no gradient reaches them.
    """
    logp_cur = F.log_softmax(cur_logits.float(), dim=-1)
    logp_ref = F.log_softmax(ref_logits.detach().float(), dim=-1)
    # kl_div(input, target) = target * (log target - input), with log_target
    # it stays exact where P_ref underflows.
    kl_tok = F.kl_div(logp_cur, logp_ref, reduction="none", log_target=True).sum(-1)
    kl = _masked_mean(kl_tok, mask)
    return kl, _diag(retain_kl=kl)


# --------------------------------------------------- preference-style terms


def npo_loss(ll_cur: torch.Tensor, ll_ref: torch.Tensor, beta: float = 0.4):
    """Negative Preference Optimisation: -(2/beta) * logsigmoid(-beta * log ratio).

    `ll_*` are answer log-likelihoods [B], summed (conventions viker, openunlearning)
    or per-token means (mllmu: `per_token`); `ll_ref` is cached from stage one.
    """
    log_ratio = ll_cur.float() - ll_ref.float()
    loss = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio)
    return loss, _diag(log_ratio=log_ratio)


def idkpo_loss(ll_cur_idk, ll_ref_idk, ll_cur_gt, ll_ref_gt, beta: float = 0.1, scale: float = 1.0):
    """DPO with chosen = the "I don't know" answer, rejected = the ground truth: -scale * logsigmoid(margin).

    scale = 1 is DPO's paper form (convention viker); OpenUnlearning writes 2/beta (methods/idkpo.py).
    """
    chosen = beta * (ll_cur_idk.float() - ll_ref_idk.float())
    rejected = beta * (ll_cur_gt.float() - ll_ref_gt.float())
    margin = chosen - rejected
    loss = -scale * F.logsigmoid(margin)
    return loss, _diag(
        chosen_rewards=chosen,
        rejected_rewards=rejected,
        reward_margin=margin,
        reward_accuracy=(margin > 0).float(),
    )


def simnpo_loss(lbar: torch.Tensor, beta: float, gamma: float = 0.0):
    """SimNPO: -(2/beta) * logsigmoid(beta * (-lbar - gamma)), [B].

    `lbar` is the per-token mean answer log-likelihood (no reference model).
    `gamma` is the margin in per-token NLL units, subtracted before beta as the
    authors' code and OpenUnlearning do; the paper's gamma is beta times it.
    """
    nll = -lbar.float()
    loss = -(2.0 / beta) * F.logsigmoid(beta * (nll - gamma))
    return loss, _diag(token_nll=nll)


def per_token(ll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A summed answer log-likelihood [B] as a per-token mean (mask: the answer tokens it summed)."""
    return ll.float() / mask.to(torch.float32).sum(-1).clamp_min(1.0)


# ----------------------------------------------------------------- RMU


def steering_target(dim: int, steering: float, seed: int) -> torch.Tensor:
    """RMU's c * u, [dim] float32: u the unit vector along a uniform [0, 1)^dim draw seeded by `seed`.

    Uniform, not Gaussian, as RMU's authors and OpenUnlearning draw it (so u
    lies in the positive orthant); a CPU generator, so every device and rank
    gets the same u.
    """
    u = torch.rand(int(dim), generator=torch.Generator().manual_seed(int(seed)))
    return float(steering) * u / u.norm()


def hidden_distance(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/D) ||h_t - target_t||^2 averaged over answer tokens, [B].

    `hidden` [B, T, D]; `target` [D] (the same at every position) or [B, T, D];
    the target is detached: no gradient reaches it.
    """
    sq = (hidden.float() - target.detach().float()).pow(2).mean(-1)
    return _masked_mean(sq, mask)


def rmu_forget_loss(hidden: torch.Tensor, mask: torch.Tensor, target: torch.Tensor):
    """RMU's forget term: the forget hidden states' distance to c*u (`target`, [D]), [B]."""
    dist = hidden_distance(hidden, target, mask)
    return dist, _diag(hidden_norm=_masked_mean(hidden.float().norm(dim=-1), mask))


def rmu_retain_loss(hidden: torch.Tensor, vanilla: torch.Tensor, mask: torch.Tensor):
    """RMU's retain term: the retain hidden states' distance to the vanilla model's (`vanilla`, [B, T, D]), [B]."""
    dist = hidden_distance(hidden, vanilla, mask)
    return dist, _diag(retain_hidden=dist)


# ----------------------------------------------------------------- ViKeR


def bucket_probs(logits: torch.Tensor, topk_idx: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Q~ = (Q at the K reference indices, tail mass outside them), [B, T, K+1] float32.

    The tail is computed by logsumexp (see _log_buckets); eps > 0 floors it.
    """
    return _buckets_from_logp(F.log_softmax(logits.float(), dim=-1), topk_idx, eps)


def reference_buckets(topk_prob: torch.Tensor, tail_mass: torch.Tensor) -> torch.Tensor:
    """R~ = (R_topK, tail), [B, T, K+1] float32, kept as stored.

    Not renormalised: float16 storage makes sum(R~) differ from 1 by ~1e-3,
    which changes the KL gradient by that fraction of Q, below what matters,
    while renormalising would move mass between the top-K and the tail and
    break exactness when the tail is 0. Only the tail is clamped to >= 0
    (1 - sum can round slightly negative).
    """
    tail = tail_mass.float().clamp_min(0.0).unsqueeze(-1)
    return torch.cat([topk_prob.float(), tail], dim=-1)


def bucket_divergence(r: torch.Tensor, q: torch.Tensor, kind: str) -> torch.Tensor:
    """D(R~, Q~) per position, [..., K+1] -> [...]; lower is closer.

    kind: "kl"  KL(R~ || Q~), R = 0 buckets contribute 0;
          "jsd" 0.5 KL(R||M) + 0.5 KL(Q||M), M = (R+Q)/2, in [0, log 2] nats;
          "cos" 1 - cosine similarity of the two bucket vectors.
    """
    _check_kind(kind)
    r, q = r.float(), q.float()
    if kind == "kl":
        return _kl_buckets(r, q)
    if kind == "jsd":
        m = 0.5 * (r + q)
        return 0.5 * _kl_buckets(r, m) + 0.5 * _kl_buckets(q, m)
    return 1.0 - F.cosine_similarity(r, q, dim=-1, eps=1e-8)


def viker_loss(
    logits,
    labels,
    mask,
    topk_idx,
    topk_prob,
    tail_mass,
    lam: float,
    kind: str = "kl",
    use_ga: bool = True,
    token_lambda: torch.Tensor | None = None,
):
    """ViKeR: mean_i [ log Q_i(y_i) + lambda_i * D(R~_i, Q~_i) ] per example.

    use_ga=False is the "w/o GA" ablation (lambda * D alone); "w/o Reg" is
    ga_loss. `token_lambda` [B, T], if given, replaces `lam` per token
    (experimental, ours; see entropy_token_lambda).
    """
    _check_kind(kind)
    # One log-softmax serves both the GA term and the buckets.
    logp = F.log_softmax(logits.float(), dim=-1)
    lp_y = _gather_labels(logp, labels)
    log_q = _log_buckets(logp, topk_idx)
    q = log_q.exp()
    r = reference_buckets(topk_prob, tail_mass)
    # KL straight from the logs: a saturated tail (GA's) keeps its true value and gradient.
    div = _kl_log_buckets(r, log_q) if kind == "kl" else bucket_divergence(r, q, kind)
    lam_t = token_lambda.float() if token_lambda is not None else torch.full_like(div, float(lam))
    reg = lam_t * div
    per_token = lp_y + reg if use_ga else reg
    loss = _masked_mean(per_token, mask)
    return loss, _diag(
        forget_logprob=_masked_mean(lp_y, mask),
        answer_prob=_masked_mean(lp_y.exp(), mask),
        divergence=_masked_mean(div, mask),
        reg=_masked_mean(reg, mask),
        q_tail_mass=_masked_mean(q[..., -1], mask),
    )


def entropy_token_lambda(entropy: torch.Tensor, mask: torch.Tensor, lam: float, scale: float = 1.0) -> torch.Tensor:
    """Experimental per-token lambda (ours, not the paper's): lam * exp(-H_i / scale).

    H_i is the stored entropy (nats) of the full reference distribution R_i.
    Normal tokens (H ~ 0, the reference agrees on one token) keep the full
    lam, so their ascent stays damped and the model is protected; key tokens
    (high H, the images disagree: the forgotten fact) get less
    regularisation, so GA acts on them more freely. Padded positions get 0.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return lam * torch.exp(-entropy.float() / scale) * mask.to(torch.float32)
