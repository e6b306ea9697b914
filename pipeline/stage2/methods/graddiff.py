"""GradDiff: GA(forget) + alpha * NLL(retain).

Retain term: NLL(retain), alpha = train.retain_weight, 1 when 0, in every
convention (MLLMU-Bench's GA_Difference.py, OpenUnlearning's GradDiff).
"""
from __future__ import annotations

from .base import Defaults, every_convention
from .ga import GA


class GradDiff(GA):              # GA's forget loss; what differs is the retain term
    name, label, position = "graddiff", "GradDiff", 20
    conventions = every_convention(Defaults(retain_weight=1.0, retain=("nll",)))


METHOD = GradDiff()
