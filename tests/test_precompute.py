"""Stage one against its definition: direct computation, naive vs prefix path, resume, refusal."""
import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.stage2 import losses
from pipeline.stage1 import precompute as pc
from pipeline.cache import refcache
from pipeline.config import PrecomputeConfig
from pipeline.data.mllmu import read_split
from pipeline.data.records import forget_samples
from pipeline.jobs.demo import tokenizer_texts
from pipeline.models.encoding import load_image
from pipeline.cache.fingerprint import pool_files, training_fingerprint
from pipeline.models.modeling import build_tiny_llava, load_model
from tests.tiny import assert_caches_agree, make_world, tiny_config

TINY = tiny_config(text_layers=2)
K = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root, model_dir = make_world(tmp_path_factory, TINY, n_fictitious=20, pool_size=6)
    samples = forget_samples(read_split(root, "forget_10"))[:7]
    return root, model_dir, samples


SECTION = PrecomputeConfig(k=3, top_k=K, seed=0, shard_size=3, batch_size=4)


def run(env, out, pool_dir="people", rank=0, world=1, **changes):
    """precompute into `out` with SECTION and `changes` to it (e.g. reference="own")."""
    root, model_dir, samples = env
    settings = dataclasses.replace(SECTION, output=str(out), **changes)
    return pc.precompute(str(model_dir), samples, settings, pool_dir=pool_dir and str(root / "pools" / pool_dir),
                         device="cpu", rank=rank, world=world, log=lambda *_: None)


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("refs-*.h5"))}


@pytest.fixture(scope="module")
def reference_cache(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("refs")
    run(world, out)
    return out


def test_cache_equals_direct_average_of_softmaxes(world, reference_cache):
    root, model_dir, samples = world
    model, processor = load_model(model_dir, device="cpu")
    pool = pool_files(root / "pools" / "people")
    (enc,) = pc.encode_samples(processor, samples[:1], "I don't know.", None)
    picks = pc.draw_reference_images(samples[0].sample_id, len(pool), 3, 0)
    # Direct definition, one image at a time, no batching, no shared code path with the cache.
    probs = []
    for i in picks:
        pix = processor.image_processor(images=[load_image(pool[i].read_bytes())], return_tensors="pt")["pixel_values"]
        ids = torch.tensor([enc.ids])
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pix).logits[0].float()
        probs.append(torch.softmax(logits[enc.answer_start - 1: len(enc.ids) - 1], -1))
    R = torch.stack(probs).mean(0)
    with refcache.RefCacheReader(reference_cache) as reader:
        got = reader.get(samples[0].sample_id)
    top = torch.topk(R, K, -1)
    assert np.array_equal(got.answer_ids, np.array(enc.ids[enc.answer_start:]))
    assert np.array_equal(got.topk_idx, top.indices.numpy())
    np.testing.assert_allclose(got.topk_prob, top.values.numpy(), atol=1e-3, rtol=1e-3)   # float16 on disk
    np.testing.assert_allclose(got.tail_mass, 1 - top.values.sum(-1).numpy(), atol=1e-6)
    np.testing.assert_allclose(got.entropy, -(R * R.log()).sum(-1).numpy(), rtol=1e-5)
    own = processor.image_processor(images=[load_image(samples[0].image)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        lo = torch.log_softmax(model(input_ids=torch.tensor([enc.ids]), pixel_values=own).logits[0].float(), -1)
    ll = sum(lo[p - 1, enc.ids[p]] for p in range(enc.answer_start, len(enc.ids)))
    assert got.ref_logp_own == pytest.approx(float(ll), abs=1e-4)
    assert got.ref_logp_idk is not None and got.ref_logp_idk < 0


def test_prefix_path_equals_naive_path(world, tmp_path):
    run(world, tmp_path / "prefix", prefix_cache=True)
    run(world, tmp_path / "naive", prefix_cache=False)
    assert_caches_agree(tmp_path / "prefix", tmp_path / "naive")


def test_truncated_kl_from_cache_matches_full_distribution(world, reference_cache):
    """KL(R~||Q~) on the K+1 buckets, from the cache vs from the full R computed directly.

    The cache stores top-K probabilities as float16: the bucket arithmetic must be exact
    (1e-6) on the same rounded values, and the float16 rounding itself stays below 1e-3.
    """
    root, model_dir, samples = world
    model, processor = load_model(model_dir, device="cpu")
    pool = pool_files(root / "pools" / "people")
    (enc,) = pc.encode_samples(processor, samples[:1], "", None)
    imgs = [load_image(pool[i].read_bytes()) for i in pc.draw_reference_images(samples[0].sample_id, len(pool), 3, 0)]
    R = pc.reference_distribution(model, processor, enc, imgs)                # [T, V] float32, full
    with refcache.RefCacheReader(reference_cache) as reader:
        got = reader.get(samples[0].sample_id)
    q_logits = torch.randn(1, R.shape[0], R.shape[1], generator=torch.Generator().manual_seed(0))
    idx = torch.from_numpy(got.topk_idx)[None]
    q = losses.bucket_probs(q_logits, idx)

    def bucket_kl(top_prob, tail):
        r = losses.reference_buckets(top_prob[None], tail[None])
        return losses.bucket_divergence(r, q, "kl")

    from_cache = bucket_kl(torch.from_numpy(got.topk_prob), torch.from_numpy(got.tail_mass))
    full_top = torch.gather(R, -1, idx[0])
    full_rounded = bucket_kl(full_top.half().float(), 1 - full_top.sum(-1))
    full_exact = bucket_kl(full_top, 1 - full_top.sum(-1))
    assert torch.allclose(from_cache, full_rounded, atol=1e-6)
    assert torch.allclose(from_cache, full_exact, atol=1e-3)


def test_kill_and_resume_ends_with_the_same_shards(world, reference_cache, tmp_path, monkeypatch):
    real_write = refcache.write_shard
    calls = []

    def dying_write(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(args[1])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(refcache, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "c")
    monkeypatch.setattr(refcache, "write_shard", real_write)
    assert not (tmp_path / "c" / "manifest.json").exists()
    (tmp_path / "c" / "refs-00001-of-00003.h5.tmp").write_bytes(b"half a shard")   # as if killed mid-write
    computed = []
    real_compute = pc.compute_shard
    monkeypatch.setattr(pc, "compute_shard", lambda *a, **k: computed.append(1) or real_compute(*a, **k))
    run(world, tmp_path / "c")
    assert len(computed) == 2, "the finished shard is kept, only the other two are recomputed"
    assert digests(tmp_path / "c") == digests(reference_cache)
    assert refcache.verify_cache(tmp_path / "c") == [] or all(p.startswith("warning") for p in refcache.verify_cache(tmp_path / "c"))


def test_split_jobs_merge_to_the_single_process_cache(world, reference_cache, tmp_path):
    out = tmp_path / "jobs"
    assert run(world, out, rank=1, world=2) is None        # job 1 of 2 first: no manifest yet
    assert not (out / "manifest.json").exists()
    manifest = run(world, out, rank=0, world=2)
    assert manifest is not None
    assert digests(out) == digests(reference_cache)
    assert json.loads((out / "manifest.json").read_text())["totals"] == \
        json.loads((reference_cache / "manifest.json").read_text())["totals"]


def test_rerun_of_a_complete_cache_does_nothing(world, reference_cache, monkeypatch):
    monkeypatch.setattr(pc, "compute_shard", lambda *a, **k: pytest.fail("recomputed a finished cache"))
    assert run(world, reference_cache)["totals"]["n_samples"] == 7


def test_own_image_reference_for_the_wo_vis_ablation(world, tmp_path):
    root, model_dir, samples = world
    run(world, tmp_path / "own", reference="own", pool_dir=None)
    with refcache.RefCacheReader(tmp_path / "own") as reader:
        assert reader.settings["k"] == 1 and reader.settings["reference"] == "own"
        got = reader.get(samples[0].sample_id)
    # with R the model's own distribution, log R(y) summed over the answer is the own log-likelihood
    # wherever y is in the top-K
    assert got.ref_logp_own < 0


def _expected(world, cache_dir, model_dir=None, pool_dir=None, samples=None):
    root, m, s = world
    with refcache.RefCacheReader(cache_dir) as reader:
        cached = reader.fingerprint
    return training_fingerprint(model_dir or m, samples or s, cached, pool_dir or str(root / "pools" / "people"))


def test_same_setup_is_accepted(world, reference_cache):
    refcache.RefCacheReader(reference_cache, expected_fingerprint=_expected(world, reference_cache)).close()


def test_changed_model_is_refused(world, reference_cache, tmp_path):
    root, model_dir, _ = world
    other = build_tiny_llava(tmp_path / "other", tokenizer_texts(root), TINY, seed=1)
    with pytest.raises(refcache.FingerprintMismatch) as e:
        refcache.RefCacheReader(reference_cache, expected_fingerprint=_expected(world, reference_cache, other))
    assert "model weights differ" in str(e.value) and "tokenizer" not in str(e.value)


def test_changed_tokenizer_is_refused(world, reference_cache, tmp_path):
    _, model_dir, _ = world
    copy = shutil.copytree(model_dir, tmp_path / "tok")
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 77
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(refcache.FingerprintMismatch, match="tokenizer differs"):
        refcache.RefCacheReader(reference_cache, expected_fingerprint=_expected(world, reference_cache, copy))


def test_changed_pool_is_refused(world, reference_cache, tmp_path):
    root, _, _ = world
    pool = shutil.copytree(root / "pools" / "people", tmp_path / "pool")
    first = sorted(pool.glob("*.png"))[0]
    shutil.copy(root / "pools" / "pets" / "000.png", first)
    with pytest.raises(refcache.FingerprintMismatch, match="reference pool differs"):
        refcache.RefCacheReader(reference_cache, expected_fingerprint=_expected(world, reference_cache,
                                                                                pool_dir=str(pool)))


def test_changed_forget_set_is_refused(world, reference_cache):
    _, _, samples = world
    with pytest.raises(refcache.FingerprintMismatch, match="forget_samples differs"):
        refcache.RefCacheReader(reference_cache, expected_fingerprint=_expected(world, reference_cache,
                                                                                samples=samples[:3]))


def test_reference_draw_is_seeded_per_sample():
    a = pc.draw_reference_images("mini-001/0", 24, 5, 0)
    assert a == pc.draw_reference_images("mini-001/0", 24, 5, 0)
    assert len(set(a)) == 5
    assert a != pc.draw_reference_images("mini-001/0", 24, 5, 1)
    with pytest.raises(ValueError, match="pool holds only 3"):
        pc.draw_reference_images("x", 3, 5, 0)


# ---------------------------------------------------------------- prefix path internals

@pytest.fixture(scope="module")
def tiny_model(world):
    _, model_dir, samples = world
    model, processor = load_model(model_dir, device="cpu")
    return model, processor, pc.encode_samples(processor, samples, "I don't know.", None)


def _pixels(processor, n, seed):
    size = processor.image_processor.crop_size["height"]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_mixed_image_batch_equals_naive_rows(tiny_model):
    """One forward holding rows of 3 images with answers of different lengths (right padding)."""
    model, processor, enc = tiny_model
    pad = processor.tokenizer.pad_token_id
    pix = _pixels(processor, 3, 0)
    P = pc.image_prefix_length(enc[0].ids, model.config.image_token_index)
    prefix = pc.PrefixCache(model, enc[0].ids[:P], pix, capacity=3)
    images = [0, 2, 1, 0, 2, 1, 1]
    seqs = [enc[i % len(enc)].ids for i in range(7)]
    seqs[1], seqs[4] = enc[0].idk_ids, enc[3].idk_ids
    starts = [enc[i % len(enc)].answer_start for i in range(7)]
    starts[1], starts[4] = enc[0].idk_start, enc[3].idk_start
    assert len({len(s) - a for s, a in zip(seqs, starts)}) > 1, "rows must differ in length to test padding"
    got = pc.answer_probs_prefix(prefix, images, pad, seqs, starts)
    want = pc.answer_probs_naive(model, pad, seqs, starts, pix[images])
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    assert prefix.passes == 3


def test_batches_fill_across_images_within_capacity():
    rows = [pc.Row(img, [], 0, "ref", 0) for img in [0, 0, 1, 2, 2, 2, 3, 4]]
    assert pc.next_batch(rows, 0, 4, 8) == 4           # 4 rows of images 0, 1, 2: full whatever the grouping
    assert pc.next_batch(rows, 0, 8, 2) == 3           # a third image would exceed the cache
    assert pc.next_batch(rows, 6, 8, 2) == 8


def _score_pool(model, processor, enc, pool_size, capacity):
    pad = processor.tokenizer.pad_token_id
    pix = _pixels(processor, pool_size, 1)
    draws = [pc.draw_reference_images(e.sample.sample_id, pool_size, 3, 0) for e in enc]
    P = pc.image_prefix_length(enc[0].ids, model.config.image_token_index)
    prefix = pc.PrefixCache(model, enc[0].ids[:P], pix, capacity=capacity)
    sums = pc.pool_reference_sums(model, pad, enc, draws, pix, 4, prefix)
    return prefix, sums, draws, pix


def test_prefix_memory_does_not_grow_with_the_pool(tiny_model):
    model, processor, enc = tiny_model
    enc = enc * 12                                                        # 84 samples, 252 pairs
    enc = [pc.Encoded(pc.Sample(f"x{i}", e.sample.profile_id, e.sample.image, e.sample.question, e.sample.answer),
                      e.ids, e.answer_start, e.idk_ids, e.idk_start) for i, e in enumerate(enc)]
    small, _, _, _ = _score_pool(model, processor, enc, 10, 4)
    big, sums, draws, pix = _score_pool(model, processor, enc, 200, 4)
    assert big.passes > 100 and small.passes >= 10
    assert small.peak_images == big.peak_images == 4
    assert abs(big.peak_bytes - small.peak_bytes) <= 0.1 * small.peak_bytes
    # evicting and batching across images changes no number
    want = pc.pool_reference_sums(model, processor.tokenizer.pad_token_id, enc[:5], draws[:5], pix, 4, None)
    for r in range(5):
        torch.testing.assert_close(sums[r], want[r], atol=1e-5, rtol=0)


def test_own_images_share_one_prefix_per_distinct_image(tiny_model):
    model, processor, enc = tiny_model
    own = _pixels(processor, len(enc), 2)
    P = pc.image_prefix_length(enc[0].ids, model.config.image_token_index)
    prefix = pc.PrefixCache(model, enc[0].ids[:P], None, capacity=2)
    pad = processor.tokenizer.pad_token_id
    got = pc.score_shard(model, pad, enc, None, pool_pixels=None, own_pixels=own, batch_size=3, prefix=prefix,
                         scores=("own", "idk"))
    want = pc.score_shard(model, pad, enc, None, pool_pixels=None, own_pixels=own, batch_size=3, prefix=None,
                          scores=("own", "idk"))
    assert prefix.passes == len({e.sample.image for e in enc}) < len(enc)
    for r in range(len(enc)):
        assert got.logp_own[r] == pytest.approx(want.logp_own[r], rel=1e-5, abs=1e-4)
        assert got.logp_idk[r] == pytest.approx(want.logp_idk[r], rel=1e-5, abs=1e-4)


def test_scores_subset_is_recorded_and_refused_by_methods_that_need_it(world, tmp_path):
    from pipeline.stage2.errors import TrainError
    from pipeline.stage2.inputs import build_inputs, open_cache
    from pipeline.stage2.methods import get_method
    root, model_dir, samples = world
    out = tmp_path / "viker-only"
    manifest = run(world, out, scores=["reference"])
    assert manifest["settings"]["scores"] == ["reference"]
    _, processor = load_model(model_dir, device="cpu")
    pool = str(root / "pools" / "people")
    reader, _ = open_cache(out, model_dir, samples, get_method("viker"), pool, "I don't know.")
    with reader:   # stage two's own setup accepts it for ViKeR...
        build_inputs(processor, samples, [], None, "", None, reader=reader, method=get_method("viker"))
        assert all(reader.get(s.sample_id).ref_logp_own is None for s in samples)
        assert all(reader.get(s.sample_id).ref_logp_idk is None for s in samples)
    for method in ("npo", "idkpo"):   # ...and refuses it for the methods that need the scores
        reader, _ = open_cache(out, model_dir, samples, get_method(method), pool, "I don't know.")
        with reader, pytest.raises(TrainError, match=f"method {method} needs ref_logp_own"):
            build_inputs(processor, samples, [], None, "I don't know." if method == "idkpo" else "", None,
                         reader=reader, method=get_method(method))
    with pytest.raises(ValueError, match="must include 'reference'"):
        run(world, tmp_path / "bad", scores=["own", "idk"])


def test_a_hand_built_section_is_range_checked_like_a_loaded_one(world, tmp_path):
    from pipeline.schema import ConfigError
    for change, key in (({"k": 0}, "precompute.k"), ({"shard_size": 0}, "precompute.shard_size"),
                        ({"seed": -1}, "precompute.seed")):
        with pytest.raises(ConfigError, match=f"config key '{key}' must be >= "):
            run(world, tmp_path / "bad", **change)
    assert not (tmp_path / "bad").exists()


def test_prefix_reuse_needs_one_shared_image_head():
    from types import SimpleNamespace as E
    img = 9
    same = [E(ids=[1, 2, img, img, 5, 6], idk_ids=[1, 2, img, img, 7]), E(ids=[1, 2, img, img, 8], idk_ids=None)]
    assert pc.shared_image_prefix(same, img) == ([1, 2, img, img], "")
    text_first = same + [E(ids=[1, 3, img, img, 5], idk_ids=None)]     # a sample's own text before the image
    assert pc.shared_image_prefix(text_first, img) == (None, "the tokens up to the image differ between samples")
    longer = same + [E(ids=[1, 2, 4, img, img, 5], idk_ids=None)]
    assert pc.shared_image_prefix(longer, img)[0] is None
    assert pc.shared_image_prefix(same + [E(ids=[1, 2, 5], idk_ids=None)], img) == (
        None, "a sequence holds no image token")
