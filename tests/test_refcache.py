"""The reference-cache format: round trips, resume, merge, corruption, fingerprints, stats."""
import json
import multiprocessing
import os
import pickle
import shutil

import h5py
import numpy as np
import pytest

from pipeline.cache import view as cacheview
from pipeline.cache import refcache as rc

VOCAB = 32000
K = 8
SETTINGS = {"k": 5, "K": K, "pool": "pool-a", "seed": 0,
            "prompt_template": "USER: <image>\n{question}\nASSISTANT:", "dtype": "float32"}
PARTS = {"model_config": "c" * 64, "model_weights": "w" * 64, "tokenizer": "t" * 64,
         "prompt_template": "p" * 64, "reference_pool": "r" * 64,
         "k": 5, "K": K, "seed": 0, "dtype": "float32"}
FP = rc.make_fingerprint(PARTS)


def make_sample(rng, sid, T, k=K, vocab=VOCAB, logp=True):
    mass = rng.uniform(0.5, 1.0, size=(T, 1))
    prob = -np.sort(-rng.dirichlet(np.full(k, 0.5), size=T), axis=1) * mass
    return rc.RefSample(
        sample_id=sid,
        answer_ids=rng.integers(0, vocab, T).astype(np.int32),
        topk_idx=rng.integers(0, vocab, (T, k)),
        topk_prob=prob,
        tail_mass=(1.0 - prob.sum(1)).astype(np.float32),
        entropy=rng.uniform(0, 6, T).astype(np.float32),
        ref_logp_own=float(-rng.uniform(1, 50)) if logp else None,
        ref_logp_idk=None,
    )


def make_samples(n, seed=0, logp_every=2):
    rng = np.random.default_rng(seed)
    lengths = [1, 1, 2] + list(rng.integers(1, 30, n - 3))
    return [make_sample(rng, f"person{i:03d}/q{i % 4}", int(T), logp=i % logp_every == 0)
            for i, T in enumerate(lengths)]


def write_cache(cache_dir, samples, num_shards, fingerprint=FP, settings=SETTINGS, vocab=VOCAB):
    for j in range(num_shards):
        rc.write_shard(cache_dir, j, num_shards, samples[j::num_shards], vocab_size=vocab,
                       fingerprint=fingerprint, settings=settings)
    return rc.finalize(cache_dir, num_shards, fingerprint, settings)


def assert_same(got, want):
    assert got.sample_id == want.sample_id
    np.testing.assert_array_equal(got.answer_ids, want.answer_ids)
    np.testing.assert_array_equal(got.topk_idx, want.topk_idx)
    np.testing.assert_array_equal(got.topk_prob, np.asarray(want.topk_prob, np.float16).astype(np.float32))
    np.testing.assert_array_equal(got.tail_mass, want.tail_mass)
    np.testing.assert_array_equal(got.entropy, want.entropy)
    for name in ("ref_logp_own", "ref_logp_idk"):
        w = getattr(want, name)
        assert getattr(got, name) == (None if w is None else pytest.approx(w, rel=1e-6))


@pytest.fixture(scope="module")
def samples():
    return make_samples(90)


@pytest.fixture(scope="module")
def built(tmp_path_factory, samples):
    cache_dir = tmp_path_factory.mktemp("refs") / "demo"
    write_cache(cache_dir, samples, 3)
    return cache_dir


@pytest.fixture
def cache(built, tmp_path):
    """A private copy of the built cache that a test may damage."""
    return shutil.copytree(built, tmp_path / "copy")


def shard(cache_dir, i, n=3):
    return cache_dir / rc.shard_name(i, n)


def flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- round trip


def test_round_trip_across_three_shards(built, samples):
    reader = rc.RefCacheReader(built, FP)
    assert len(reader) == len(samples)
    assert reader.sample_ids == [s.sample_id for j in range(3) for s in samples[j::3]]
    order = np.random.default_rng(1).permutation(len(samples))
    for i in order:  # random access, every shard, ragged lengths including T=1
        assert samples[i].sample_id in reader
        assert_same(reader.get(samples[i].sample_id), samples[i])
    assert "nobody" not in reader
    with pytest.raises(KeyError, match="nobody"):
        reader.get("nobody")
    reader.close()


def test_manifest_is_portable_and_totals_add_up(built, samples):
    manifest = json.loads((built / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [rc.shard_name(i, 3) for i in range(3)]
    assert all("/" not in s["name"] for s in manifest["shards"])
    assert manifest["totals"]["n_samples"] == len(samples)
    assert manifest["totals"]["n_tokens"] == sum(s.num_tokens for s in samples)
    assert manifest["fingerprint"] == FP
    assert manifest["settings"] == {**SETTINGS, "vocab_size": VOCAB}
    with h5py.File(shard(built, 1), "r") as f:
        assert f["topk_idx"].dtype == np.uint16 and f["topk_prob"].dtype == np.float16
        assert f["offsets"].shape == (f["sample_id"].shape[0] + 1,)
        assert f["topk_prob"].compression == "gzip" and f["topk_prob"].shuffle
        assert f.attrs["fingerprint"] == FP["digest"] and f.attrs["K"] == K


def test_index_dtype_switches_at_65536(tmp_path):
    assert rc.index_dtype(65535) == np.uint16 and rc.index_dtype(65536) == np.int32
    rng = np.random.default_rng(2)
    big = [make_sample(rng, f"b{i}", 4, vocab=70000) for i in range(3)]
    big[0].topk_idx[0, 0] = 69999
    write_cache(tmp_path, big, 1, vocab=70000)
    with h5py.File(shard(tmp_path, 0, 1), "r") as f:
        assert f["topk_idx"].dtype == np.int32
    reader = rc.RefCacheReader(tmp_path)
    for s in big:
        assert_same(reader.get(s.sample_id), s)


def test_empty_shard_is_allowed_when_K_is_known(tmp_path):
    rng = np.random.default_rng(3)
    one = [make_sample(rng, "only", 3)]
    write_cache(tmp_path, one + [], 2)  # shard 1 gets no samples
    assert len(rc.RefCacheReader(tmp_path)) == 1
    assert rc.verify_cache(tmp_path) == []
    with pytest.raises(ValueError, match="K"):
        rc.write_shard(tmp_path, 0, 1, [], vocab_size=VOCAB, fingerprint=FP, settings={"k": 5})


@pytest.mark.parametrize("damage, message", [
    (lambda s: setattr(s, "answer_ids", np.zeros(0, np.int32)), "empty answer"),
    (lambda s: s.topk_idx.__setitem__((0, 0), VOCAB), "outside"),
    (lambda s: setattr(s, "tail_mass", s.tail_mass[:-1]), "tail_mass"),
    (lambda s: setattr(s, "topk_prob", s.topk_prob[:, :-1]), "topk_prob"),
    (lambda s: s.entropy.__setitem__(0, np.nan), "NaN"),
])
def test_write_shard_rejects_bad_samples_by_id(tmp_path, damage, message):
    rng = np.random.default_rng(4)
    good, bad = make_sample(rng, "good", 3), make_sample(rng, "bad-one", 3)
    damage(bad)
    with pytest.raises(ValueError, match=message) as err:
        rc.write_shard(tmp_path, 0, 1, [good, bad], vocab_size=VOCAB, fingerprint=FP, settings=SETTINGS)
    assert "bad-one" in str(err.value)
    assert not list(tmp_path.iterdir())  # validation happens before anything is written


def test_write_shard_rejects_mixed_K_and_duplicate_ids(tmp_path):
    rng = np.random.default_rng(5)
    a, b = make_sample(rng, "a", 2), make_sample(rng, "b", 2, k=K + 1)
    with pytest.raises(ValueError, match="K differs"):
        rc.write_shard(tmp_path, 0, 1, [a, b], vocab_size=VOCAB, fingerprint=FP, settings=SETTINGS)
    with pytest.raises(ValueError, match="duplicate"):
        rc.write_shard(tmp_path, 0, 1, [a, a], vocab_size=VOCAB, fingerprint=FP, settings=SETTINGS)


# ---------------------------------------------------------------- resume and merge


def test_finished_shards_after_a_simulated_kill(tmp_path, samples):
    for j in range(3):
        rc.write_shard(tmp_path, j, 4, samples[j::4], vocab_size=VOCAB, fingerprint=FP, settings=SETTINGS)
    (tmp_path / "refs-00001-of-00004.json").unlink()           # killed before its record
    flip_byte(shard(tmp_path, 2, 4))                            # record no longer matches
    (tmp_path / "refs-00003-of-00004.h5.tmp").write_bytes(b"half")  # killed mid-write
    assert rc.finished_shards(tmp_path, 4, FP["digest"]) == {0}
    other = rc.make_fingerprint({**PARTS, "seed": 1})
    assert rc.finished_shards(tmp_path, 4, other["digest"]) == set()
    rc.write_shard(tmp_path, 3, 4, samples[3::4], vocab_size=VOCAB, fingerprint=FP, settings=SETTINGS)
    assert not (tmp_path / "refs-00003-of-00004.h5.tmp").exists()
    assert rc.finished_shards(tmp_path, 4, FP["digest"]) == {0, 3}


def test_finalize_refuses_and_names_missing_shards(tmp_path, samples):
    for j in (0, 2):
        rc.write_shard(tmp_path, j, 3, samples[j::3], vocab_size=VOCAB, fingerprint=FP, settings=SETTINGS)
    with pytest.raises(rc.CacheError, match=r"1 \(refs-00001-of-00003\.h5: missing\)"):
        rc.finalize(tmp_path, 3, FP, SETTINGS)
    assert not (tmp_path / "manifest.json").exists()
    rc.write_shard(tmp_path, 1, 3, samples[1::3], vocab_size=VOCAB, fingerprint=FP, settings=SETTINGS)
    assert rc.finalize(tmp_path, 3, FP, SETTINGS)["totals"]["n_samples"] == len(samples)


def test_merge_of_shards_from_several_machines(tmp_path, samples, built):
    merged = tmp_path / "merged"
    merged.mkdir()
    for rank in range(3):  # each machine writes its own shard elsewhere, then syncs it
        rank_dir = tmp_path / f"rank{rank}"
        rc.write_shard(rank_dir, rank, 3, samples[rank::3], vocab_size=VOCAB,
                       fingerprint=FP, settings=SETTINGS)
        shutil.copytree(rank_dir, merged, dirs_exist_ok=True)
    manifest = rc.merge(merged)
    assert manifest == json.loads((built / "manifest.json").read_text())
    assert rc.verify_cache(merged) == []


def test_merge_refuses_shards_from_different_setups(tmp_path, samples):
    rc.write_shard(tmp_path, 0, 2, samples[0::2], vocab_size=VOCAB, fingerprint=FP, settings=SETTINGS)
    other = rc.make_fingerprint({**PARTS, "k": 3})
    rc.write_shard(tmp_path, 1, 2, samples[1::2], vocab_size=VOCAB, fingerprint=other, settings=SETTINGS)
    with pytest.raises(rc.CacheError, match="different setups"):
        rc.merge(tmp_path)


def test_rewriting_a_shard_withdraws_the_manifest(cache, samples):
    rc.write_shard(cache, 1, 3, samples[1::3], vocab_size=VOCAB, fingerprint=FP, settings=SETTINGS)
    with pytest.raises(rc.CacheError, match="no manifest.json in .*viker precompute"):
        rc.RefCacheReader(cache)


# ---------------------------------------------------------------- corruption


def _edit_manifest(cache_dir, edit):
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


DAMAGES = {
    "flipped byte": (lambda d: flip_byte(shard(d, 1)), ["refs-00001-of-00003.h5", "sha256"]),
    "truncated": (lambda d: os.truncate(shard(d, 2), shard(d, 2).stat().st_size - 100),
                  ["refs-00002-of-00003.h5", "bytes"]),
    "missing": (lambda d: shard(d, 0).unlink(), ["refs-00000-of-00003.h5", "missing"]),
    "manifest sha edited": (lambda d: _edit_manifest(d, lambda m: m["shards"][0].update(sha256="0" * 64)),
                            ["refs-00000-of-00003.h5", "sha256"]),
    "manifest settings edited": (lambda d: _edit_manifest(d, lambda m: m["settings"].update(k=3)),
                                 ["settings"]),
    "manifest totals edited": (lambda d: _edit_manifest(d, lambda m: m["totals"].update(n_tokens=1)),
                               ["totals"]),
    "manifest fingerprint edited": (
        lambda d: _edit_manifest(d, lambda m: m["fingerprint"]["parts"].update(k="9")), ["fingerprint"]),
    "stray tmp": (lambda d: (d / "refs-00001-of-00003.h5.tmp").write_bytes(b"x"), ["warning", ".tmp"]),
    "extra shard": (lambda d: shutil.copy(shard(d, 0), d / "refs-00000-of-00002.h5"), ["extra"]),
}


def test_verify_passes_a_sound_cache(built):
    assert rc.verify_cache(built) == []


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_verify_finds_damage(cache, kind):
    damage, words = DAMAGES[kind]
    damage(cache)
    problems = rc.verify_cache(cache)
    assert any(all(w in p for w in words) for p in problems), problems


def test_verify_without_manifest(cache):
    (cache / "manifest.json").unlink()
    assert rc.verify_cache(cache) == [f"no manifest.json in {cache}: run viker precompute "
                                      f"(or viker cache merge) first"]


def test_reader_refuses_truncated_or_unreadable_shards(cache, built):
    os.truncate(shard(cache, 2), shard(cache, 2).stat().st_size - 100)
    with pytest.raises(rc.CacheError, match="refs-00002-of-00003.h5.*truncated"):
        rc.RefCacheReader(cache)
    shutil.copy(shard(built, 2), shard(cache, 2))
    path = shard(cache, 1)
    data = bytearray(path.read_bytes())
    data[:512] = bytes(512)  # same size, so only opening it can tell
    path.write_bytes(bytes(data))
    with pytest.raises(rc.CacheError, match="refs-00001-of-00003.h5 .*sha256"):
        rc.RefCacheReader(cache)    # the default open checks every sha256 (remembered per file version)
    with pytest.raises(rc.CacheError, match="refs-00001-of-00003.h5 .*cannot be read"):
        rc.RefCacheReader(cache, verify=False)


def test_reader_verify_option_checks_checksums(cache):
    flip_byte(shard(cache, 0))
    with pytest.raises(rc.CacheError, match="refs-00000-of-00003.h5 .*sha256"):
        rc.RefCacheReader(cache, verify=True)


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_mismatch_names_the_parts_in_one_line(built):
    expected = rc.make_fingerprint({**PARTS, "model_weights": "x" * 64,
                                    "reference_pool": "y" * 64, "k": 3})
    with pytest.raises(rc.FingerprintMismatch) as err:
        rc.RefCacheReader(built, expected)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"reference cache {built} was made for a different setup: ")
    for part in ("model weights differ", "reference pool differs", "k differs (cache 5, expected 3)"):
        assert part in text
    assert "tokenizer" not in text and "model config" not in text
    assert str(pickle.loads(pickle.dumps(err.value))) == text


def test_diff_fingerprints_labels():
    base = rc.make_fingerprint({"model_config": "a" * 64, "tokenizer": "b" * 64, "dtype": "float32"})
    other = rc.make_fingerprint({"model_config": "c" * 64, "tokenizer": "b" * 64, "dtype": "bfloat16",
                                 "format_version": 3, "lora_rank": "8\n9"})
    assert rc.diff_fingerprints(other, base) == [
        "dtype differs (cache float32, expected bfloat16)",
        "cache format version differs (cache 2, expected 3)",
        "lora_rank differs (not recorded in the cache)",
        "model config differs",
    ]
    assert rc.diff_fingerprints(base, base) == []


def test_fingerprint_hashes_are_canonical(tmp_path):
    assert rc.make_fingerprint({"a": 1, "b": "x"}) == rc.make_fingerprint({"b": "x", "a": "1"})
    assert rc.make_fingerprint({"a": 1})["digest"] != rc.make_fingerprint({"a": 2})["digest"]
    assert rc.hash_json({"a": [1, 2], "b": 1}) == rc.hash_json({"b": 1, "a": [1, 2]})
    assert rc.hash_bytes(b"abc") == rc.hash_file(_write(tmp_path / "abc", b"abc"))
    x, y = _write(tmp_path / "pool" / "x.png", b"1"), _write(tmp_path / "pool" / "y.png", b"2")
    assert rc.hash_files([x, y]) == rc.hash_files([y, x])
    moved = shutil.copytree(tmp_path / "pool", tmp_path / "elsewhere" / "pool")
    assert rc.hash_files([moved / "x.png", moved / "y.png"], root=moved) == \
        rc.hash_files([x, y], root=tmp_path / "pool")
    z = _write(tmp_path / "pool" / "z.png", b"1")  # same bytes, another name
    assert rc.hash_files([z, y]) != rc.hash_files([x, y])


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- processes


def _read_in_child(reader, ids, queue):
    try:
        got = [(sid, int(reader.get(sid).topk_idx.sum()), float(reader.get(sid).topk_prob.sum()))
               for sid in ids]
        queue.put((got, reader._pid == os.getpid()))
    except Exception as err:  # report instead of dying silently
        queue.put((repr(err), False))


def test_reader_survives_pickle_and_fork(built, samples):
    reader = rc.RefCacheReader(built)
    ids = [s.sample_id for s in samples[:6]]
    expected = [(sid, int(reader.get(sid).topk_idx.sum()), float(reader.get(sid).topk_prob.sum()))
                for sid in ids]  # the parent now holds open handles
    clone = pickle.loads(pickle.dumps(reader))
    for s in samples[:6]:
        assert_same(clone.get(s.sample_id), s)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()
    child = ctx.Process(target=_read_in_child, args=(reader, ids, queue))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert queue.get() == (expected, True)
    assert_same(reader.get(ids[0]), samples[0])  # the parent's handles still work
    reader.close()


# ---------------------------------------------------------------- inspect


def _inspect_samples(k=64):
    rng = np.random.default_rng(7)
    a, b = make_sample(rng, "A", 2, k=k), make_sample(rng, "B", 1, k=k)
    a.tail_mass, a.entropy = np.array([0.1, 0.3], np.float32), np.array([1.0, 3.0], np.float32)
    b.tail_mass, b.entropy = np.array([0.5], np.float32), np.array([2.0], np.float32)
    return [a, b]


def test_inspect_cache_numbers(tmp_path):
    samples = _inspect_samples()
    write_cache(tmp_path, samples, 2, settings={**SETTINGS, "K": 64})
    stats = cacheview.inspect_cache(tmp_path, decode=lambda i: f"tok{i}", top_n=2)
    assert stats["bytes_per_token_uncompressed"] == 64 * 2 + 64 * 2 + 12 <= 4 * 64 + 16
    assert stats["topk_mass"]["mean"] == pytest.approx((0.9 + 0.7 + 0.5) / 3, abs=1e-6)
    assert stats["topk_mass"]["min"] == pytest.approx(0.5)
    assert (stats["n_samples"], stats["n_tokens"], stats["K"]) == (2, 3, 64)
    assert stats["bytes_per_token"] == pytest.approx(stats["bytes"] / 3)
    assert sum(stats["entropy"]["counts"]) == 3
    assert len(stats["entropy"]["bins"]) == len(stats["entropy"]["counts"]) + 1
    assert stats["entropy"]["mean"] == pytest.approx(2.0)
    top = stats["key_tokens"]
    assert [(t["sample_id"], t["position"], t["entropy"]) for t in top] == [("A", 1, 3.0), ("B", 0, 2.0)]
    assert top[0]["token"] == f"tok{samples[0].answer_ids[1]}"
    text = cacheview.format_inspect(stats)
    assert "key tokens" in text and top[0]["token"] in text and "#" in text


def test_inspect_counts_int32_indices(tmp_path):
    write_cache(tmp_path, _inspect_samples(), 1, settings={**SETTINGS, "K": 64}, vocab=70000)
    assert cacheview.inspect_cache(tmp_path)["bytes_per_token_uncompressed"] == 64 * 4 + 64 * 2 + 12
