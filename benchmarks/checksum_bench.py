"""What the read-path checksums cost: sha256 at open (first and second time) and Fletcher32 per step.

    python benchmarks/checksum_bench.py --gigabytes 1.0          # ~1 GB cache in a temporary directory

Writes a cache of synthetic samples with the real writer (refcache.write_shard,
Fletcher32 on every dataset), then measures, in one process:

- open, sizes only (``verify=False``): the reader's own indexing, the baseline;
- first open (default ``verify="memo"``, empty memo): every shard hashed in full;
- second open (the memo remembers each file version): a small JSON read per shard;
- per step: reading one micro-batch of samples (``RefCacheReader.get``, random
  samples as a shuffled epoch reads them) from shards written with and without
  Fletcher32 (same data, same compression), interleaved, median of rounds.

Random top-K probabilities compress worse than a real model's, so a given
number of bytes holds fewer tokens than a real cache would: a conservative
case for the per-byte costs. The page cache is warm (the cache was just
written): the first open reads from memory, not disk; on a cold disk add the
read time of the cache at the disk's speed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cache import refcache as rc  # noqa: E402

VOCAB = 32000


def synthetic_shard(rng, first: int, n: int, K: int, mean_tokens: int) -> list[rc.RefSample]:
    lengths = rng.integers(max(1, mean_tokens // 2), mean_tokens * 3 // 2 + 1, n)
    T = int(lengths.sum())
    prob = rng.random((T, K), dtype=np.float32)
    prob = -np.sort(-prob, axis=1) / (prob.sum(1, keepdims=True) * 1.05)
    idx = rng.integers(0, VOCAB, (T, K), dtype=np.int64)
    ids = rng.integers(0, VOCAB, T, dtype=np.int32)
    tail = (1.0 - prob.sum(1)).astype(np.float32)
    entropy = rng.uniform(0, 6, T).astype(np.float32)
    samples, a = [], 0
    for i, length in enumerate(lengths):
        b = a + int(length)
        samples.append(rc.RefSample(f"person{first + i:07d}/q", ids[a:b], idx[a:b], prob[a:b], tail[a:b],
                                    entropy[a:b], ref_logp_own=float(-rng.uniform(1, 50))))
        a = b
    return samples


def build(cache_dir: Path, gigabytes: float, K: int, shard_size: int, mean_tokens: int, seed: int) -> dict:
    """Shards of synthetic samples until the cache reaches `gigabytes`; returns the manifest."""
    rng = np.random.default_rng(seed)
    settings = {"k": 5, "K": K, "seed": seed, "pool": "synthetic"}
    fingerprint = rc.make_fingerprint({"benchmark": "checksum_bench", "K": K})
    # Shard count is fixed up front (names carry it): estimate bytes per shard from a first shard.
    probe = cache_dir.parent / "probe"
    rec = rc.write_shard(probe, 0, 1, synthetic_shard(rng, 0, shard_size, K, mean_tokens), vocab_size=VOCAB,
                         fingerprint=fingerprint, settings=settings)
    num_shards = max(1, round(gigabytes * 1e9 / rec["bytes"]))
    for index in range(num_shards):
        samples = synthetic_shard(rng, index * shard_size, shard_size, K, mean_tokens)
        rc.write_shard(cache_dir, index, num_shards, samples, vocab_size=VOCAB, fingerprint=fingerprint,
                       settings=settings)
    return rc.finalize(cache_dir, num_shards, fingerprint, settings)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def open_costs(cache_dir: Path, memo: Path) -> dict:
    os.environ["VIKER_HASH_MEMO"] = str(memo)
    memo.unlink(missing_ok=True)
    sizes_only = timed(lambda: rc.RefCacheReader(cache_dir, verify=False).close())
    first = timed(lambda: rc.RefCacheReader(cache_dir).close())
    second = timed(lambda: rc.RefCacheReader(cache_dir).close())
    sizes_again = timed(lambda: rc.RefCacheReader(cache_dir, verify=False).close())
    return {"open_sizes_only_s": sizes_only, "first_open_s": first, "second_open_s": second,
            "open_sizes_only_again_s": sizes_again}


def copy_without_fletcher32(src: Path, dst: Path) -> None:
    """The same shard with the same data and compression, minus the checksum filter."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        g.attrs.update(dict(f.attrs))
        for name, ds in f.items():
            g.create_dataset(name, data=ds[()], chunks=ds.chunks, maxshape=ds.maxshape,
                             compression=ds.compression, compression_opts=ds.compression_opts,
                             shuffle=ds.shuffle, fletcher32=False)


def step_costs(cache_dir: Path, work: Path, batch: int, steps: int, rounds: int, seed: int) -> dict:
    """Median time to read one micro-batch of random samples, with and without Fletcher32."""
    manifest = json.loads((cache_dir / rc.MANIFEST).read_text())
    entries = manifest["shards"][:2]
    readers = {}
    for kind in ("fletcher32", "plain"):
        folder = work / kind
        folder.mkdir()
        for e in entries:
            if kind == "fletcher32":
                os.link(cache_dir / e["name"], folder / e["name"])
            else:
                copy_without_fletcher32(cache_dir / e["name"], folder / e["name"])
        write_subset_manifest(folder, manifest, entries)
        readers[kind] = rc.RefCacheReader(folder, verify=False)
    with h5py.File(work / "plain" / entries[0]["name"], "r") as f:
        assert not f["topk_prob"].fletcher32
    ids = readers["plain"].sample_ids
    rng = np.random.default_rng(seed)
    times = {k: [] for k in readers}
    for i in range(rounds):
        order = [rng.choice(len(ids), batch, replace=False) for _ in range(steps)]
        for kind in (("fletcher32", "plain") if i % 2 == 0 else ("plain", "fletcher32")):
            reader = readers[kind]
            t = time.perf_counter()
            for rows in order:
                for r in rows:
                    reader.get(ids[r])
            times[kind].append((time.perf_counter() - t) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "steps_per_round": steps, "rounds": rounds,
            "step_read_fletcher32_ms": med["fletcher32"] * 1e3, "step_read_plain_ms": med["plain"] * 1e3,
            "step_read_ratio": med["fletcher32"] / med["plain"]}


def write_subset_manifest(folder: Path, manifest: dict, entries: list[dict]) -> None:
    shards = [{**e, "bytes": (folder / e["name"]).stat().st_size, "sha256": rc.hash_file(folder / e["name"])}
              for e in entries]
    sub = {**manifest, "shards": shards,
           "totals": {k: sum(e[k] for e in shards) for k in ("n_samples", "n_tokens", "bytes")}}
    (folder / rc.MANIFEST).write_text(json.dumps(sub))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gigabytes", type=float, default=1.0)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=2048, help="samples per shard")
    ap.add_argument("--mean-tokens", type=int, default=24, help="mean answer tokens per sample")
    ap.add_argument("--batch", type=int, default=8, help="samples read per training step")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        cache_dir = work / "cache"
        t = time.perf_counter()
        manifest = build(cache_dir, args.gigabytes, args.K, args.shard_size, args.mean_tokens, args.seed)
        write_s = time.perf_counter() - t
        result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                  "load_before": os.getloadavg(), "h5py": h5py.version.version,
                  "hdf5": h5py.version.hdf5_version, "cache_bytes": manifest["totals"]["bytes"],
                  "shards": len(manifest["shards"]), "samples": manifest["totals"]["n_samples"],
                  "tokens": manifest["totals"]["n_tokens"], "K": args.K, "write_s": write_s}
        result.update(open_costs(cache_dir, work / "memo.json"))
        result["first_open_GBps"] = result["cache_bytes"] / 1e9 / (result["first_open_s"]
                                                                   - result["open_sizes_only_s"])
        result.update(step_costs(cache_dir, work, args.batch, args.steps, args.rounds, args.seed))
        result["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
