"""SimNPO: reference-free NPO on the per-token log-likelihood, with a margin.

    w * -(2/beta) * logsigmoid(beta * (-ll/T - gamma))  [+ alpha * NLL(retain)]

(Fan et al., "Simplicity prevails: rethinking negative preference optimization
for LLM unlearning", arXiv 2410.07163.) ll = summed answer log-likelihood, T its
answer tokens; no reference model, so no cache is read. gamma = train.simnpo_gamma
(0 by default, in every convention) is the margin in per-token NLL units,
subtracted before beta as the authors' code (OPTML-Group/Unlearn-Simple,
TOFU/dataloader.py, loss_type simnpo: `get_batch_loss / loss_mask.sum(-1) -
gamma`) and OpenUnlearning (delta) do; the paper writes
-(2/beta) logsigmoid(-(beta/T) ll - gamma'), so its gamma' = beta * gamma.
Per convention (beta = train.beta when > 0, alpha = train.retain_weight when > 0):
    viker           beta 2.5, w 1, no retain term: the authors' plain `simnpo` loss with their TOFU beta
                    (Unlearn-Simple TOFU/config/forget.yaml: beta 2.5, gamma 0), forget-only like NPO
                    under viker and ViKeR's own loss, so the comparison reads the same data
    mllmu,          beta 4.5, w 0.125, + alpha * NLL(retain) with alpha 1: OpenUnlearning's SimNPO
    openunlearning  (configs/trainer/SimNPO.yaml: beta 4.5, delta 0, gamma 0.125 (the forget weight w,
                    the authors' npo_coeff), alpha 1, retain_loss_type NLL; src/trainer/unlearn/simnpo.py
                    SimNPO.compute_loss: forget_loss = compute_batch_nll / (labels != -100).sum(-1) - delta,
                    -logsigmoid(beta * forget_loss).mean() * 2 / beta, then gamma * forget_loss
                    + alpha * GradDiff.compute_retain_loss). MLLMU-Bench has no SimNPO, so mllmu
                    takes OpenUnlearning's form, as for IdkPO.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Defaults, Method, every_convention


@dataclass(frozen=True)
class SimNPODefaults(Defaults):
    beta: float = 2.5            # beta when train.beta is 0
    forget_weight: float = 1.0   # w, the forget loss's weight (OpenUnlearning's gamma)


class SimNPO(Method):
    name, label, position = "simnpo", "SimNPO", 70
    conventions = every_convention(
        SimNPODefaults(retain_weight=1.0, retain=("nll",), beta=4.5, forget_weight=0.125),
        viker=SimNPODefaults(retain_weight=0.0, retain=("nll",), beta=2.5, forget_weight=1.0))

    def beta(self, spec) -> float:
        """train.beta, or the convention's beta when it is 0."""
        return spec.beta or self.defaults(spec).beta

    def forget_loss(self, out, mb, spec, refs, dev):
        from ..losses import per_token, sequence_logprob, simnpo_loss
        logits, labels, mask = out["forget"]
        loss, diags = simnpo_loss(per_token(sequence_logprob(logits, labels, mask), mask), self.beta(spec),
                                  spec.simnpo_gamma)
        return self.defaults(spec).forget_weight * loss, diags


METHOD = SimNPO()
