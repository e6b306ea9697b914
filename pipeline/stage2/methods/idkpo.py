"""IdkPO: DPO with chosen = the "I don't know" answer, rejected = the ground truth.

    -scale * logsigmoid(beta * ((ll_cur - ll_ref)[idk] - (ll_cur - ll_ref)[gt]))

ll = summed answer log-likelihood; both ll_ref come from stage one's cache
(ref_logp_idk, ref_logp_own). Per convention:
    viker                  beta = train.beta (0.4 when 0, shared with NPO), scale 1 (DPO's paper form)
    mllmu, openunlearning  beta = train.idk_beta (0.1), scale 2/beta (OpenUnlearning's compute_dpo_loss;
                           MLLMU-Bench has no IdkPO)
Retain term: NLL(retain), alpha = train.retain_weight, off by default in every
convention (OpenUnlearning's DPO class: gamma * forget + alpha * retain; set
train.retain_weight=1 for it).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import IDK, IDK_LOGP, OWN_LOGP, Defaults, Method, every_convention


@dataclass(frozen=True)
class IdkPODefaults(Defaults):
    idk_beta: bool = False     # beta = train.idk_beta and scale 2/beta; else beta = train.beta, scale 1


class IdkPO(Method):
    name, label, position = "idkpo", "IdkPO", 50
    cache_fields = (OWN_LOGP, IDK_LOGP)
    idk_answers = True
    conventions = every_convention(IdkPODefaults(retain_weight=0.0, retain=("nll",), idk_beta=True),
                                   viker=IdkPODefaults(retain_weight=0.0, retain=("nll",), idk_beta=False))

    def beta_scale(self, spec) -> tuple[float, float]:
        """(beta, scale) of the loss under spec's convention."""
        if self.defaults(spec).idk_beta:
            return spec.idk_beta, 2.0 / spec.idk_beta
        return spec.beta or 0.4, 1.0      # train.beta 0: the convention's, 0.4

    def forget_loss(self, out, mb, spec, refs, dev):
        from ..losses import idkpo_loss, sequence_logprob
        logits, labels, mask = out["forget"]
        idk_logits, idk_labels, idk_mask = out[IDK]
        beta, scale = self.beta_scale(spec)
        return idkpo_loss(sequence_logprob(idk_logits, idk_labels, idk_mask), mb.ref_logp_idk.to(dev),
                          sequence_logprob(logits, labels, mask), mb.ref_logp_own.to(dev), beta, scale=scale)


METHOD = IdkPO()
