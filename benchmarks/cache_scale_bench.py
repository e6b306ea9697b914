"""Does the reference cache scale? Write, open, stream and memory at N = 20k and 200k samples.

    python benchmarks/cache_scale_bench.py                        # N = 20000 and 200000, T = 30, K = 64
    python benchmarks/cache_scale_bench.py --n 2000 20000 --keep DIR

For each N a synthetic cache is written with the real writer (refcache.write_shard +
finalize; random top-K rows, so gzip gets no easy wins), then each measurement runs
in a fresh process so that its peak RSS (ru_maxrss, plus its DataLoader workers')
is its own:
- write MB/s (bytes on disk / seconds inside write_shard and finalize),
- open time of RefCacheReader,
- streaming read samples/s through stage two's own data path (stream.Stream with the
  shard-aware shuffle -> stream.Loader -> DataLoader with 0 and 2 workers -> padded
  [B, T, K] reference tensors), every sample of the cache once, shuffled,
- peak RSS of a reader alone (open + 2,000 random gets) and of the stage-two data
  pipeline (the N examples as train holds them with a cache, inputs.CachedExamples:
  a slot and an image row each, token ids rebuilt per batch in the loader from the
  cached question and answer ids; the reader, the stream and the loader with 0 or 2
  workers, reading every sample).
The two Ns are printed side by side with their ratio (target: pipeline RSS at 200k
within 10% of 20k; streaming >= 5,000 samples/s on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache import refcache  # noqa: E402

PROMPT_TOKENS = 24   # the question part of a prompt (image tokens excluded: the tiny synthetic setting)


def rss_mb() -> dict:
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self_mb": round(me, 1), "largest_worker_mb": round(kids, 1)}


def synthetic_shard(n: int, T: int, K: int, vocab: int, seed: int, first: int) -> list[refcache.RefSample]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, vocab, (n * T, K), dtype=np.int64)
    prob = np.sort(rng.dirichlet(np.ones(K) * 0.3, n * T).astype(np.float32) * 0.95, axis=1)[:, ::-1]
    tail = (1 - prob.sum(1)).astype(np.float32)
    ent = rng.uniform(0, 4, n * T).astype(np.float32)
    ans = rng.integers(0, vocab, n * T, dtype=np.int32)
    out = []
    for i in range(n):
        r = slice(i * T, (i + 1) * T)
        out.append(refcache.RefSample(f"bench-{first + i:07d}/0", ans[r], idx[r], prob[r], tail[r], ent[r],
                                      ref_logp_own=-3.0, pool_indices=np.arange(5, dtype=np.int32),
                                      question="Where was this person born?"))
    return out


def write(cache: Path, n: int, T: int, K: int, vocab: int, shard_size: int) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    fp = refcache.make_fingerprint({"bench": "cache_scale"})
    settings = {"k": 5, "K": K, "seed": 0}
    shards = -(-n // shard_size)
    template = synthetic_shard(min(shard_size, n), T, K, vocab, 0, 0)   # random rows reused, ids renamed
    seconds = 0.0
    for s in range(shards):
        count = min(shard_size, n - s * shard_size)
        samples = [refcache.RefSample(f"bench-{s * shard_size + i:07d}/0", *_fields(template[i]))
                   for i in range(count)]
        t0 = time.perf_counter()
        refcache.write_shard(cache, s, shards, samples, vocab_size=vocab, fingerprint=fp, settings=settings)
        seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = refcache.finalize(cache, shards, fp, settings)
    seconds += time.perf_counter() - t0
    nbytes = manifest["totals"]["bytes"]
    return {"bytes": nbytes, "bytes_per_token": round(nbytes / (n * T), 1), "write_s": round(seconds, 2),
            "write_mb_s": round(nbytes / 1e6 / seconds, 1), "shards": shards}


def _fields(s: refcache.RefSample) -> tuple:
    return (s.answer_ids, s.topk_idx, s.topk_prob, s.tail_mass, s.entropy, s.ref_logp_own, s.ref_logp_idk,
            s.pool_indices, s.question)


# ---------------------------------------------------------------- child processes


def child_reader(cache: str) -> dict:
    t0 = time.perf_counter()
    reader = refcache.RefCacheReader(cache)
    opened = time.perf_counter() - t0
    ids = reader.sample_ids
    rng = np.random.default_rng(0)
    picks = [ids[i] for i in rng.integers(0, len(ids), 2000)]
    del ids
    t0 = time.perf_counter()
    for sid in picks:
        reader.get(sid)
    random_rate = len(picks) / (time.perf_counter() - t0)
    return {"open_s": round(opened, 3), "random_get_per_s": round(random_rate), **rss_mb()}


def child_pipeline(cache: str, workers: int, batch: int, limit: int) -> dict:
    import torch

    from pipeline.stage2.inputs import CachedExamples, PromptIds
    from pipeline.stage2.stream import ExampleData, Loader, Stream, shard_groups, widen_stored
    torch.set_num_threads(1)
    reader = refcache.RefCacheReader(cache)
    # What build_inputs keeps per forget sample when a cache is used: its slot and image row (stage2.inputs.CachedExamples).
    slots = np.fromiter((reader.slot(sid) for sid in reader.iter_sample_ids()), np.int32, len(reader))
    prompts = PromptIds(None)     # its memo, with made-up ids where a tokenizer would run
    prompts.encode = synthetic_prompt
    examples = CachedExamples(reader, slots, np.zeros(len(slots), np.int32), prompts)
    stream = Stream(len(examples), 0, groups=shard_groups(reader, examples))
    loader = Loader(ExampleData(examples, [b""], reader), _RefsOnly(), stream, batch, workers)
    n = min(limit, len(examples)) if limit else len(examples)
    done, t0 = 0, time.perf_counter()
    while done < n:
        rows = stream.take(batch)
        refs = widen_stored(loader.next(rows)["refs"])   # as next_micro_batch does
        done += len(refs.topk_idx)
    seconds = time.perf_counter() - t0
    return {"workers": workers, "samples": done, "samples_per_s": round(done / seconds), **rss_mb()}


def synthetic_prompt(question: str) -> np.ndarray:
    """PROMPT_TOKENS made-up ids for a question: what a tokenizer would give, without one."""
    return np.random.default_rng(len(question)).integers(5, 1000, PROMPT_TOKENS).astype(np.int32)


class _RefsOnly:
    """stream.Collate without image decoding (synthetic examples have no images): examples + padded [B, T, K] refs."""

    def __call__(self, items):
        from pipeline.stage2.stream import pad_stored
        rows = [item[0] for item in items]
        examples = [item[2] for item in items]
        refs = pad_stored([item[4] for item in items], max(len(ex.ids) - ex.start for ex in examples))
        return {"rows": rows, "examples": examples, "refs": refs}


def run_child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[20000, 200000])
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--limit", type=int, default=0, help="stream at most this many samples (0: all)")
    ap.add_argument("--keep", default=None, help="directory for the caches (default: a temp dir, removed)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, cache, *rest = args.child
        result = child_reader(cache) if kind == "reader" else child_pipeline(cache, *map(int, rest))
        print(json.dumps(result))
        return
    root = Path(args.keep or tempfile.mkdtemp(prefix="cache-scale-"))
    results = {"load": os.getloadavg(), "cpus": os.cpu_count(), "T": args.tokens, "K": args.K, "runs": {}}
    try:
        for n in args.n:
            cache = root / f"n{n}"
            r = {"write": write(cache, n, args.tokens, args.K, args.vocab, args.shard_size)}
            r["reader"] = run_child("reader", cache)
            r["stream_0_workers"] = run_child("pipeline", cache, 0, args.batch, args.limit)
            r["stream_2_workers"] = run_child("pipeline", cache, 2, args.batch, args.limit)
            results["runs"][n] = r
            print(json.dumps({n: r}), flush=True)
            if not args.keep:
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def print_table(results: dict) -> None:
    ns = list(results["runs"])
    rows = [("write MB/s", lambda r: r["write"]["write_mb_s"]),
            ("bytes per token on disk", lambda r: r["write"]["bytes_per_token"]),
            ("open s", lambda r: r["reader"]["open_s"]),
            ("reader peak RSS MB", lambda r: r["reader"]["self_mb"]),
            ("stream samples/s, 0 workers", lambda r: r["stream_0_workers"]["samples_per_s"]),
            ("stream samples/s, 2 workers", lambda r: r["stream_2_workers"]["samples_per_s"]),
            ("pipeline peak RSS MB (main, 0 workers)", lambda r: r["stream_0_workers"]["self_mb"]),
            ("pipeline peak RSS MB (main, 2 workers)", lambda r: r["stream_2_workers"]["self_mb"]),
            ("pipeline largest worker RSS MB", lambda r: r["stream_2_workers"]["largest_worker_mb"])]
    print(f"load {results['load']} -> {results['load_after']}, {results['cpus']} CPUs, "
          f"T={results['T']}, K={results['K']}")
    print("| measure | " + " | ".join(f"N={n}" for n in ns) + (" | ratio |" if len(ns) == 2 else " |"))
    print("|---" * (len(ns) + 1 + (len(ns) == 2)) + "|")
    for name, get in rows:
        vals = [get(results["runs"][n]) for n in ns]
        ratio = f" | {vals[1] / vals[0]:.3f}" if len(ns) == 2 and vals[0] else ""
        print(f"| {name} | " + " | ".join(str(v) for v in vals) + ratio + " |")


if __name__ == "__main__":
    main()
