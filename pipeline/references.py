"""Which pool images a forget sample's reference distribution is averaged over.

Both stages need the same draw: stage one to compute R, online ViKeR in stage
two to recompute it. It lives here, below both, so neither stage reaches into
the other. Since cache format 2 the draw is also stored per sample in the
shards (``pool_indices``), so a cache can be audited without this code.
"""
from __future__ import annotations

import zlib

import numpy as np


def draw_reference_images(sample_id: str, pool_size: int, k: int, seed: int) -> list[int]:
    """The k pool images (indices into the sorted pool file names) for one sample.

    Seeded by (seed, crc32 of the sample id), so any rank or rerun draws the same.
    """
    if k > pool_size:
        raise ValueError(f"k={k} reference images requested but the pool holds only {pool_size}")
    rng = np.random.default_rng([seed, zlib.crc32(sample_id.encode())])
    return rng.choice(pool_size, size=k, replace=False).tolist()
