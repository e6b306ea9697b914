"""Weight identity: every byte of every weight file counts, and an unchanged model is not re-read."""
import os
import time

import numpy as np
import pytest

from pipeline.cache import filememo
from pipeline.cache.fingerprint import weights_identity
from pipeline.cache.refcache import CacheError


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_one_changed_float_in_a_large_weight_file_is_seen(tmp_path):
    """> 64 MiB (where the old identity only sampled strided blocks): one float32 changed deep inside."""
    model = tmp_path / "model"
    model.mkdir()
    path = model / "model.safetensors"
    weights = np.random.default_rng(0).standard_normal((65 << 20) // 4 + 1000).astype(np.float32)
    path.write_bytes(weights.tobytes())
    assert path.stat().st_size > 64 << 20
    before = weights_identity(model)
    offset = 4 * 12_345_677 + 1          # a byte of one float, far from any block boundary
    _flip(path, offset)
    changed = weights_identity(model)
    assert changed != before
    _flip(path, offset)
    os.utime(path, ns=(1, 1))            # content back as it was; the memo key changed, so it is hashed again
    assert weights_identity(model) == before


def test_identity_ignores_where_the_model_lives_but_not_names(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "model.safetensors").write_bytes(b"\1\2\3" * 1000)
    (a / "config.json").write_text("{}")
    b = tmp_path / "b"
    b.mkdir()
    (b / "model.safetensors").write_bytes(b"\1\2\3" * 1000)
    assert weights_identity(a) == weights_identity(b)
    (b / "model.safetensors").rename(b / "model-00001.safetensors")
    assert weights_identity(a) != weights_identity(b)
    with pytest.raises(CacheError, match="no .*weight files"):
        weights_identity(_empty(tmp_path))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


@pytest.mark.slow
def test_second_fingerprint_of_an_unchanged_1gb_file_is_free(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    block = np.random.default_rng(1).bytes(8 << 20)
    with open(model / "model.safetensors", "wb") as f:
        for _ in range(128):             # 1 GiB
            f.write(block)
    t0 = time.perf_counter()
    first = weights_identity(model)
    t1 = time.perf_counter()
    assert weights_identity(model) == first
    t2 = time.perf_counter()
    print(f"1 GiB: first {t1 - t0:.2f}s ({1.0737 / (t1 - t0):.2f} GB/s), second {t2 - t1:.4f}s")
    assert t2 - t1 < 0.1


def test_second_fingerprint_reads_nothing(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x" * 4096)
    first = weights_identity(model)
    monkeypatch.setattr(filememo, "hash_file", lambda *a: pytest.fail("an unchanged file was read again"))
    assert weights_identity(model) == first
