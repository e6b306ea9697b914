"""GA: gradient ascent on the forget answers, minimise mean_t log Q_t(y_t) (= ViKeR's "w/o Reg").

The same in every convention (MLLMU-Bench's GA.py: -outputs.loss). Retain
term: NLL(retain), alpha = train.retain_weight, off by default (alpha 0: no
retain data is read); with alpha > 0 it is GradDiff's loss.
"""
from __future__ import annotations

from .base import Defaults, Method, every_convention


class GA(Method):
    name, label, position = "ga", "GA", 10
    conventions = every_convention(Defaults(retain_weight=0.0, retain=("nll",)))

    def forget_loss(self, out, mb, spec, refs, dev):
        from ..losses import ga_loss
        return ga_loss(*out["forget"])


METHOD = GA()
