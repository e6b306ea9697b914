"""NPO: -(2/beta) * logsigmoid(-beta * (ll_cur - ll_ref)), beta = train.beta (0.4).

ll_ref is the vanilla model's answer log-likelihood with the sample's own
image, cached by stage one (ref_logp_own). Per convention:
    viker, openunlearning  ll = summed answer log-likelihood (OpenUnlearning's compute_batch_nll)
    mllmu                  ll / T, the per-token mean (MLLMU-Bench's NPO.py: outputs.loss)
Retain term: NLL(retain), alpha = train.retain_weight, off by default in every
convention (OpenUnlearning's NPO adds it: set train.retain_weight=1).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import OWN_LOGP, Defaults, Method, every_convention


@dataclass(frozen=True)
class NPODefaults(Defaults):
    per_token: bool = False    # the log-likelihoods as per-token means, not sums


class NPO(Method):
    name, label, position = "npo", "NPO", 40
    cache_fields = (OWN_LOGP,)
    conventions = every_convention(NPODefaults(retain_weight=0.0, retain=("nll",), per_token=False),
                                   mllmu=NPODefaults(retain_weight=0.0, retain=("nll",), per_token=True))

    def forget_loss(self, out, mb, spec, refs, dev):
        from ..losses import npo_loss, per_token, sequence_logprob
        logits, labels, mask = out["forget"]
        ll_cur, ll_ref = sequence_logprob(logits, labels, mask), mb.ref_logp_own.to(dev)
        if self.defaults(spec).per_token:
            ll_cur, ll_ref = per_token(ll_cur, mask), per_token(ll_ref, mask)
        return npo_loss(ll_cur, ll_ref, spec.beta)


METHOD = NPO()
