"""Stage two's data path: streamed micro-batches give the in-memory losses; the shuffle is shard-aware."""
import numpy as np
import pytest
import torch

from pipeline.config import PrecomputeConfig
from pipeline.stage1 import precompute as pc
from pipeline.stage2 import train as tr
from pipeline.stage2.errors import TrainError
from pipeline.stage2.inputs import CachedExamples, Inputs, build_inputs, open_cache
from pipeline.stage2.methods import AnswerLogits, LossSpec, get_method
from pipeline.stage2.stream import MicroBatch, Stream, next_micro_batch, pad_references, shard_groups
from pipeline.data.mllmu import read_split
from pipeline.data.records import forget_samples
from pipeline.models.encoding import load_image, pixel_values
from pipeline.models.modeling import load_model
from pipeline.cache.refcache import RefCacheReader
from tests.test_train import _sharpen
from tests.tiny import make_world, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root, model_dir = make_world(tmp_path_factory, tiny_config(text_layers=1), n_fictitious=10, pool_size=6)
    _sharpen(model_dir)
    forget = forget_samples(read_split(root, "forget_10"))
    retain = forget_samples(read_split(root, "retain_90"))[:12]
    cache = tmp_path_factory.mktemp("refs")
    settings = PrecomputeConfig(output=str(cache), k=3, top_k=8, seed=0, shard_size=4, batch_size=8, dtype="float32")
    pc.precompute(str(model_dir), forget, settings, pool_dir=str(root / "pools" / "people"), device="cpu",
                  log=lambda *_: None)
    model, processor = load_model(model_dir, device="cpu")
    model = tr.wrap_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():   # a non-zero adapter, so kl_min's vanilla and current models differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return {"forget": forget, "retain": retain, "cache": cache, "model": model, "processor": processor,
            "model_dir": model_dir}


def in_memory_batch(w, inputs, rows, rrows, method):
    """The pre-streaming data path: every image decoded into one bank, every reference in a dict."""
    bank = pixel_values(w["processor"], [load_image(b) for b in inputs.images])
    with RefCacheReader(w["cache"]) as reader:
        refs = {ex.sample_id: reader.get(ex.sample_id) for ex in inputs.forget}
    mem = Inputs(inputs.forget, inputs.idk, inputs.retain, refs, bank, None, inputs.pad_id)
    forget = [inputs.forget[i] for i in rows]
    mb = MicroBatch(forget)
    cached = [refs[ex.sample_id] for ex in forget]
    if method == "viker":
        mb.refs = pad_references(cached, max(len(ex.ids) - ex.start for ex in forget))
    if method in ("npo", "idkpo"):
        mb.ref_logp_own = torch.tensor([r.ref_logp_own for r in cached])
    if method == "idkpo":
        mb.ref_logp_idk = torch.tensor([r.ref_logp_idk for r in cached])
        mb.idk = [inputs.idk[i] for i in rows]
    if rrows:
        mb.retain = [inputs.retain[j] for j in rrows]
    return mem, mb


@pytest.mark.parametrize("method,workers", [("ga", 0), ("graddiff", 2), ("kl_min", 0), ("npo", 0),
                                            ("idkpo", 0), ("viker", 2)])
def test_streamed_losses_equal_the_in_memory_path(world, method, workers):
    w = world
    spec = LossSpec(method, lam=1.0)
    m = get_method(method)
    retain = w["retain"] if m.needs_retain(spec) else []
    idk = "I don't know." if m.idk_answers else ""
    held = build_inputs(w["processor"], w["forget"], retain, None, idk, None)   # every token made at setup
    reader = None
    if m.uses_cache(spec):   # as train does: examples rebuilt per batch from the cache
        reader, _ = open_cache(w["cache"], w["model_dir"], w["forget"], m, None, "I don't know.")
    inputs = build_inputs(w["processor"], w["forget"], retain, None, idk, None, reader=reader, method=m)
    inputs.workers = workers
    if reader is not None:
        assert isinstance(inputs.forget, CachedExamples) and inputs.forget.nbytes() == 8 * len(w["forget"])
    streams = {"forget": Stream(len(inputs.forget), 0, groups=shard_groups(inputs.reader, inputs.forget)),
               "retain": Stream(len(inputs.retain or []), 1)}
    twin = {k: s.copy() for k, s in streams.items()}
    net = AnswerLogits(w["model"])
    for _ in range(3):
        rows = twin["forget"].take(3)
        rrows = twin["retain"].take(3) if inputs.retain else []
        mb = next_micro_batch(inputs, streams, 3, method)
        streamed, d_stream = tr.micro_batch_loss(net, w["model"], mb, spec, inputs, torch.device("cpu"))
        mem, mb_mem = in_memory_batch(w, held, rows, rrows, method)
        for part in ("forget", "idk"):   # the examples themselves, token for token
            got, want = getattr(mb, part), getattr(mb_mem, part)
            assert (got is None) == (want is None)
            for a, b in zip(got or [], want or []):
                assert (a.sample_id, a.start) == (b.sample_id, b.start) and np.array_equal(a.ids, b.ids)
        expected, d_mem = tr.micro_batch_loss(net, w["model"], mb_mem, spec, mem, torch.device("cpu"))
        assert torch.equal(streamed, expected), (method, float(streamed), float(expected))
        assert d_stream.keys() == d_mem.keys()
        assert abs(float(streamed.detach())) > 1e-3
    if inputs.reader is not None:
        inputs.reader.close()


def test_shard_aware_shuffle_keeps_windows_and_respects_epochs():
    groups = [np.arange(0, 10), np.arange(10, 20), np.arange(20, 25)]
    s = Stream(25, seed=3, groups=groups, window=4)
    epoch = []
    while True:
        batch = s.take(4)
        epoch += batch
        if len(s.pending) == 0:
            break
    assert sorted(epoch) == list(range(25))                     # an epoch is a permutation ...
    assert [len(b) for b in [epoch[i:i + 4] for i in range(0, 25, 4)]][-1] == 1   # ... ending in a short batch
    shard_of = [i // 10 for i in epoch]
    assert sum(a != b for a, b in zip(shard_of, shard_of[1:])) == 2   # each shard read in one stretch
    for shard in range(3):                                       # each window (4 neighbours) read in one stretch
        win = [(i - 10 * shard) // 4 for i in epoch if i // 10 == shard]
        assert sum(x != y for x, y in zip(win, win[1:])) == len(set(win)) - 1
    assert epoch != list(range(25))
    again = s.take(4)                                           # the next epoch starts afresh, shuffled anew
    assert len(again) == 4 and s.take(100) and len(s.pending) == 0


def test_stream_state_round_trips_and_ranks_get_equal_epochs():
    a = Stream(10, seed=5, groups=[np.arange(10)], window=3)
    a.take(4)
    b = Stream(10, seed=99, groups=[np.arange(10)], window=3)
    b.load_state_dict(a.state_dict())
    assert [a.take(3) for _ in range(5)] == [b.take(3) for _ in range(5)]
    ranks = [Stream(11, seed=0, rank=r, world=3) for r in range(3)]
    epochs = [r.take(100) for r in ranks]
    assert [len(e) for e in epochs] == [3, 3, 3]                # 11 cut to 9: same batch count on every rank
    assert len(set(sum(epochs, []))) == 9


def test_example_table_reads_like_the_list_and_costs_tokens_not_objects():
    from pipeline.stage2.inputs import Example, ExampleTable
    rng = np.random.default_rng(0)
    examples = [Example(f"person-{i:05d}/{i % 7}", rng.integers(0, 32064, 54).astype(np.int32), 24, i % 3)
                for i in range(5000)]
    table = ExampleTable(iter(examples))
    assert len(table) == 5000 and all(c["ids"].dtype == np.uint16 for c in table.chunks)   # 32k vocabulary: 16 bits
    for i in (0, 1, 4095, 4096, 4999, -1):                         # across the packing chunk boundary
        got, want = table[i], examples[i]
        assert (got.sample_id, got.start, got.image) == (want.sample_id, want.start, want.image)
        assert got.ids.dtype == np.int32 and np.array_equal(got.ids, want.ids)
    assert [e.sample_id for e in table][:3] == [e.sample_id for e in examples[:3]]
    # 54 tokens x 2 B + offset 4 + start 4 + image 4 + 14-byte id = 134 B per sample (a list of objects: ~530 B).
    assert table.nbytes() <= 5000 * 140
    wide = ExampleTable([Example("x/0", np.array([1, 151000], np.int32), 1, 0)])  # Qwen-size ids stay int32
    assert wide.chunks[0]["ids"].dtype == np.int32 and wide[0].ids.tolist() == [1, 151000]
    with pytest.raises(IndexError):
        table[5000]


def _copies_cache(w, tmp, n: int, question=None):
    """n copies of the forget samples (new ids, same images) and a cache holding their answer tokens."""
    from dataclasses import replace

    from pipeline.cache import refcache
    samples = [replace(s, sample_id=f"copy-{i:05d}/0") for i, s in
               zip(range(n), (w["forget"][i % len(w["forget"])] for i in range(n)))]
    refs = []
    for e in pc.encode_samples(w["processor"], samples, "", None):
        T = len(e.ids) - e.answer_start
        refs.append(refcache.RefSample(e.sample.sample_id, np.asarray(e.ids[e.answer_start:], np.int32),
                                       np.zeros((T, 4), np.int64), np.full((T, 4), 0.25, np.float32),
                                       np.zeros(T, np.float32), np.ones(T, np.float32),
                                       question=question or e.sample.question))
    fp = refcache.make_fingerprint({"test": "copies"})
    refcache.write_shard(tmp, 0, 1, refs, vocab_size=400, fingerprint=fp, settings={"k": 1})
    refcache.finalize(tmp, 1, fp, {"k": 1})
    return samples, RefCacheReader(tmp)


def _held_bytes(build) -> int:
    """Bytes of Python/numpy allocations still alive after build() (numpy reports its buffers to tracemalloc)."""
    import gc
    import tracemalloc
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = build()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del kept
    return held


# The wider the gap between the two sizes, the less a few KB of allocator noise weigh per sample:
# ~2 B at 300 -> 2400, ~4 B at 200 -> 1400 (measured there: 8-12 B per cached sample, 127 B per held one);
# ~10 B at 50 -> 350 still leaves the held examples far above their bound.
# Slow (~4.5 s at the smaller sizes): the fast suite checks the same layout structurally, nbytes() of the
# CachedExamples being 8 B per sample (test_streamed_losses_equal_the_in_memory_path above).
@pytest.mark.slow
@pytest.mark.parametrize("sizes", [{"cached": (200, 1400), "held": (50, 350)},
                                   {"cached": (300, 2400), "held": (300, 2400)}], ids=["narrow", "wide"])
def test_with_a_cache_memory_per_forget_sample_is_eight_bytes_not_its_tokens(world, tmp_path, sizes):
    w = world
    grown = {}
    for path in ("cached", "held"):
        held = {}
        small, large = sizes[path]
        for n in (small, large):
            samples, reader = _copies_cache(w, tmp_path / f"{path}{n}", n)
            use = reader if path == "cached" else None
            held[n] = _held_bytes(lambda: build_inputs(w["processor"], samples, [], None, "", None,
                                                          reader=use, method=get_method("viker")).forget)
            reader.close()
        grown[path] = (held[large] - held[small]) / (large - small)
    # Held tokens cost their bytes per sample (uint16 ids, offsets, starts, image rows,
    # ids); the cached examples keep a slot and an image row, 8 B (plus the noise above).
    assert grown["held"] > 60, grown
    assert grown["cached"] <= 16, grown


def test_cached_examples_refuse_a_cache_that_does_not_match_at_setup(world, tmp_path):
    from dataclasses import replace

    from pipeline.models.encoding import InputError
    w = world
    samples, reader = _copies_cache(w, tmp_path / "other-question", 6, question="Who is this?")
    with pytest.raises(TrainError, match="holds another question for sample 'copy-00000/0'"):
        build_inputs(w["processor"], samples, [], None, "", None, reader=reader, method=get_method("viker"))
    samples, reader = _copies_cache(w, tmp_path / "ok", 6)
    with pytest.raises(TrainError, match="forget sample 'extra/0' is not in reference cache"):
        build_inputs(w["processor"], samples + [replace(samples[0], sample_id="extra/0")], [], None, "", None,
                        reader=reader, method=get_method("viker"))
    with pytest.raises(TrainError, match="needs ref_logp_own"):
        build_inputs(w["processor"], samples, [], None, "", None, reader=reader, method=get_method("npo"))
    with pytest.raises(InputError, match="exceeds the model's limit of 8"):
        build_inputs(w["processor"], samples, [], 8, "", None, reader=reader, method=get_method("viker"))
    built = build_inputs(w["processor"], samples, [], None, "", None, reader=reader, method=get_method("viker"))
    held = build_inputs(w["processor"], samples, [], None, "", None)
    for i in range(6):   # indexing a CachedExamples reads the cache and gives the tokenised example
        assert np.array_equal(built.forget[i].ids, held.forget[i].ids) and built.forget[i].start == held.forget[i].start
    reader.close()
