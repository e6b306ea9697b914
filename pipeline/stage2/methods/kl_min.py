"""KL_Min: GA(forget) + alpha * KL(P_vanilla || P_cur) on retain.

Retain term, weighted by alpha = train.retain_weight (1 when 0):
    viker, openunlearning  KL(P_vanilla || P_cur)   (OpenUnlearning: GradDiff with retain_loss_type KL)
    mllmu                  KL + NLL(retain)          (MLLMU-Bench's KL_Min.py: loss_retain = outputs.loss
                                                      + kl_div; both terms weighed by alpha)
train.retain_weight never adds a term of its own: it is this term's alpha.
The vanilla model is the base with the adapter off (forward.frozen_logits).
"""
from __future__ import annotations

from .base import Defaults, every_convention
from .ga import GA


class KLMin(GA):              # GA's forget loss; what differs is the retain term
    name, label, position = "kl_min", "KL_Min", 30
    conventions = every_convention(Defaults(retain_weight=1.0, retain=("kl",)),
                                   mllmu=Defaults(retain_weight=1.0, retain=("kl", "nll")))


METHOD = KLMin()
