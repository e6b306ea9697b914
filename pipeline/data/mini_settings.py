"""The miniature benchmark's settings (the `mini` config section), apart from its generator.

A module of its own, with no imports, so that loading a config (every `viker`
command, every worker process) does not import numpy, PIL and pandas with the
generator in mini.py: measured with `python -X importtime` on the 2-core
machine, that made `import pipeline.config` take 0.50-0.68 s instead of
0.17-0.20 s (`import pipeline.cli` 0.55-0.77 s instead of 0.28 s).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MiniConfig:
    """The miniature benchmark generator (`viker data make-mini`)."""
    seed: int = 0
    n_fictitious: int = 60        # profiles that forget/retain splits are drawn from
    n_real: int = 12              # "real" people: learned, never in a forget split
    train_images: int = 3         # jittered training portraits per person
    test_images: int = 2          # held-out portraits (other pose/background/accessories)
    pool_size: int = 24           # images per reference pool
    # People never trained on, drawn like the fictitious ones (split Holdout_Set): the non-members of
    # membership inference (evaluate.mia). Drawn from their own generator: the rest of the world is the same.
    n_holdout: int = 12
    image_size: int = 64          # stored PNG side; the processor resizes
