"""Which pool images a forget sample's reference distribution is averaged over.

Both stages need the same draw: stage one to compute R, online ViKeR in stage
two to recompute it. Stage two imports it from here: a later stage may read an
earlier one, never the reverse (tests/test_layers.py). Since cache format 2 the
draw is also stored per sample in the shards (``pool_indices``), so a cache can
be audited without this code.
"""
from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np


def draw_reference_images(sample_id: str, pool_size: int, k: int, seed: int) -> list[int]:
    """The k pool images (indices into the sorted pool file names) for one sample.

    Seeded by (seed, crc32 of the sample id), so any rank or rerun draws the same.
    """
    if k > pool_size:
        raise ValueError(f"k={k} reference images requested but the pool holds only {pool_size}")
    rng = np.random.default_rng([seed, zlib.crc32(sample_id.encode())])
    return rng.choice(pool_size, size=k, replace=False).tolist()


def image_keys(data: bytes) -> tuple[str, str | None]:
    """(sha256 of the file bytes, sha256 of the decoded RGB pixels and size); pixels None if undecodable.

    Pixels catch the same picture saved again (PNG re-encoded, metadata stripped).
    """
    import io

    from PIL import Image
    raw = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except Exception:  # unreadable images are refused later, with their own message
        return raw, None
    h = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}\0".encode())
    h.update(rgb.tobytes())
    return raw, h.hexdigest()


def benchmark_leaks(pool: list[Path], benchmark: dict[str, list[tuple[str, bytes]]]) -> list[str]:
    """Pool images equal (bytes or decoded pixels) to an image of the benchmark, one message each.

    ``benchmark``: set name (forget, retain, test, real) -> [(where, image bytes)].
    A reference image that is itself a forget/retain/test image defeats the point
    of "irrelevant" references and leaks evaluation data into training targets.
    """
    known: dict[str, str] = {}
    for set_name, images in benchmark.items():
        for where, data in images:
            for key in image_keys(data):
                if key is not None:
                    known.setdefault(key, f"{set_name} image {where}")
    leaks = []
    for path in pool:
        raw, pixels = image_keys(Path(path).read_bytes())
        hit = known.get(raw) or (known.get(pixels) if pixels else None)
        if hit:
            how = "bytes" if raw in known else "pixels"
            leaks.append(f"pool image {path} equals ({how}) {hit}")
    return leaks
