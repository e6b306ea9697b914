"""NPO: -(2/beta) * logsigmoid(-beta * (ll_cur - ll_ref)) [+ alpha * NLL(retain)].

ll_ref is the vanilla model's answer log-likelihood with the sample's own
image, cached by stage one (ref_logp_own). Per convention:
    viker           beta 0.4, ll = summed answer log-likelihood, no retain term
    mllmu           beta 0.4, ll / T, the per-token mean (MLLMU-Bench's NPO.py: outputs.loss), no retain term
    openunlearning  beta 0.1, ll summed, + alpha * NLL(retain) with alpha 1: OpenUnlearning's NPO
                    (configs/trainer/NPO.yaml: beta 0.1, alpha 1, gamma 1, retain_loss_type NLL;
                    src/trainer/unlearn/npo.py NPO.compute_loss: gamma * compute_dpo_loss(lose=forget)
                    + alpha * GradDiff.compute_retain_loss, the retain batch's outputs.loss;
                    src/trainer/utils.py compute_dpo_loss: -2/beta * logsigmoid(-beta * (ll - ll_ref)).mean(),
                    ll from compute_batch_nll, summed over the answer tokens)
train.beta overrides the convention's beta when > 0 (0, the default: the convention's);
train.retain_weight overrides alpha when > 0 (0: the convention's, so under openunlearning
the retain term is always on).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import OWN_LOGP, Defaults, Method, every_convention


@dataclass(frozen=True)
class NPODefaults(Defaults):
    per_token: bool = False    # the log-likelihoods as per-token means, not sums
    beta: float = 0.4          # beta when train.beta is 0


class NPO(Method):
    name, label, position = "npo", "NPO", 40
    cache_fields = (OWN_LOGP,)
    conventions = every_convention(NPODefaults(retain_weight=0.0, retain=("nll",), per_token=False, beta=0.4),
                                   mllmu=NPODefaults(retain_weight=0.0, retain=("nll",), per_token=True, beta=0.4),
                                   openunlearning=NPODefaults(retain_weight=1.0, retain=("nll",), per_token=False,
                                                              beta=0.1))

    def beta(self, spec) -> float:
        """train.beta, or the convention's beta when it is 0."""
        return spec.beta or self.defaults(spec).beta

    def forget_loss(self, out, mb, spec, refs, dev):
        from ..losses import npo_loss, per_token, sequence_logprob
        logits, labels, mask = out["forget"]
        ll_cur, ll_ref = sequence_logprob(logits, labels, mask), mb.ref_logp_own.to(dev)
        if self.defaults(spec).per_token:
            ll_cur, ll_ref = per_token(ll_cur, mask), per_token(ll_ref, mask)
        return npo_loss(ll_cur, ll_ref, self.beta(spec))


METHOD = NPO()
