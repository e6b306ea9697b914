"""The miniature benchmark's settings (the `mini` config section), apart from its generator.

A module of its own, importing only the schema helper (standard library), so
that loading a config (every `viker` command, every worker process) does not
import numpy, PIL and pandas with the generator in mini.py: measured with
`python -X importtime` on the 2-core machine, that made `import
pipeline.config` take 0.50-0.68 s instead of 0.17-0.20 s.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.schema import setting


@dataclass
class MiniConfig:
    """The miniature benchmark generator (`viker data make-mini`)."""
    seed: int = setting(0, "the draw: which people, facts and portraits", ge=0)
    n_fictitious: int = setting(60, "profiles that forget/retain splits are drawn from", ge=1)
    n_real: int = setting(12, "'real' people: learned, never in a forget split", ge=0)
    train_images: int = setting(3, "jittered training portraits per person", ge=1)
    test_images: int = setting(2, "held-out portraits (other pose/background/accessories)", ge=0)
    pool_size: int = setting(24, "images per reference pool", ge=1)
    # Drawn from their own generator: the rest of the world stays the same whatever their number.
    n_holdout: int = setting(12, "people never trained on (Holdout_Set): the non-members of membership inference", ge=0)
    image_size: int = setting(64, "stored PNG side; the processor resizes", ge=1)
