"""GradDiff: GA(forget) + alpha * NLL(retain).

Retain term: NLL(retain), alpha = train.retain_weight, 1 when 0, in every
convention (MLLMU-Bench's GA_Difference.py, OpenUnlearning's GradDiff).
"""
from __future__ import annotations

from .base import Defaults, Method, every_convention


class GradDiff(Method):
    name, label, position = "graddiff", "GradDiff", 20
    conventions = every_convention(Defaults(retain_weight=1.0, retain=("nll",)))

    def forget_loss(self, out, mb, spec, refs, dev):
        from ..losses import ga_loss
        return ga_loss(*out["forget"])


METHOD = GradDiff()
