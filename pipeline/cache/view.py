"""Looking into a reference cache: `viker cache inspect` (sizes, top-K mass, entropy histogram, key
tokens) and `viker cache show` (one sample's answer tokens with their references).

Built on the reader of `refcache`, the one module that knows the on-disk format;
nothing here writes. Entropies are in nats.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .refcache import RefCacheReader, index_dtype


# ---------------------------------------------------------------- inspect


def inspect_cache(cache_dir, decode: Callable[[int], str] | None = None, top_n: int = 10,
                  bins: int = 10) -> dict:
    """Size and content statistics; the highest-entropy answer tokens are the key tokens.

    Entropies are in nats. ``decode`` (token id -> text) labels the key tokens.
    """
    with RefCacheReader(cache_dir, verify=False) as reader:   # looks only; Fletcher32 still guards reads
        columns = _gather_columns(reader)
        manifest = reader.manifest
    K, vocab = columns["K"], manifest["settings"].get("vocab_size")
    n_tokens = manifest["totals"]["n_tokens"]
    nbytes = manifest["totals"]["bytes"]
    raw = K * columns["idx_itemsize"] + K * 2 + 4 + 4 + 4  # idx + float16 prob + tail, entropy, answer id
    return {"cache_dir": str(cache_dir), "settings": manifest["settings"],
            "n_shards": len(manifest["shards"]), "n_samples": manifest["totals"]["n_samples"],
            "n_tokens": n_tokens, "K": K, "vocab_size": vocab, "bytes": nbytes,
            "bytes_per_token": nbytes / n_tokens if n_tokens else None,
            "bytes_per_token_uncompressed": raw,
            "bytes_per_token_dense_fp16": 2 * vocab if vocab else None,
            "topk_mass": _mass_stats(1.0 - columns["tail_mass"]),
            "entropy": _entropy_stats(columns["entropy"], bins),
            "key_tokens": _key_tokens(columns, top_n, decode)}


def _gather_columns(reader: RefCacheReader) -> dict:
    """Per-token tail mass, entropy, answer id and owner, concatenated over shards."""
    names = ("tail_mass", "entropy", "answer_ids", "sample_id", "position")
    parts = {name: [] for name in names}
    K = reader.settings.get("K", 0)
    itemsize = index_dtype(reader.settings.get("vocab_size", 0)).itemsize
    for pos in range(len(reader.manifest["shards"])):
        f = reader._file(pos)
        offsets = f["offsets"][()]
        counts = np.diff(offsets)
        for name in ("tail_mass", "entropy", "answer_ids"):
            parts[name].append(f[name][()])
        parts["sample_id"].append(np.repeat(f["sample_id"].asstr()[()].astype(object), counts))
        parts["position"].append(np.arange(offsets[-1]) - np.repeat(offsets[:-1], counts))
        if counts.size:
            K, itemsize = f["topk_idx"].shape[1], f["topk_idx"].dtype.itemsize
    columns = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    return {**columns, "K": int(K), "idx_itemsize": int(itemsize)}


def _mass_stats(mass: np.ndarray) -> dict:
    if mass.size == 0:
        return {"mean": None, "min": None}
    return {"mean": float(mass.mean(dtype=np.float64)), "min": float(mass.min())}


def _entropy_stats(entropy: np.ndarray, bins: int) -> dict:
    if entropy.size == 0:
        return {"mean": None, "max": None, "bins": [], "counts": []}
    top = max(float(entropy.max()), 1e-6)
    counts, edges = np.histogram(entropy, bins=bins, range=(0.0, top))
    return {"mean": float(entropy.mean(dtype=np.float64)), "max": float(entropy.max()),
            "bins": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _key_tokens(columns: dict, top_n: int, decode) -> list[dict]:
    order = np.argsort(-columns["entropy"], kind="stable")[:top_n]
    tokens = []
    for i in order:
        token = {"sample_id": str(columns["sample_id"][i]), "position": int(columns["position"][i]),
                 "token_id": int(columns["answer_ids"][i]), "entropy": float(columns["entropy"][i])}
        if decode is not None:
            token["token"] = decode(token["token_id"])
        tokens.append(token)
    return tokens


def format_inspect(stats: Mapping) -> str:
    """Human-readable report of inspect_cache's stats."""
    s = stats["settings"]
    lines = [f"reference cache {stats['cache_dir']}",
             "  settings: " + ", ".join(f"{k}={s[k]}" for k in sorted(s)),
             f"  {stats['n_samples']} samples, {stats['n_tokens']} answer tokens, "
             f"{stats['n_shards']} shards, {_human_bytes(stats['bytes'])} on disk"]
    if stats["n_tokens"]:
        dense = stats["bytes_per_token_dense_fp16"]
        lines.append(f"  bytes per answer token: {stats['bytes_per_token']:.1f} on disk, "
                     f"{stats['bytes_per_token_uncompressed']} uncompressed"
                     + (f", {dense} as a dense float16 distribution" if dense else ""))
        m = stats["topk_mass"]
        lines.append(f"  top-{stats['K']} mass kept: mean {m['mean']:.4f}, min {m['min']:.4f}")
        lines += _format_histogram(stats["entropy"])
        lines += _format_key_tokens(stats["key_tokens"])
    return "\n".join(lines)


def _format_histogram(ent: Mapping, width: int = 40) -> list[str]:
    lines = [f"  entropy (nats): mean {ent['mean']:.3f}, max {ent['max']:.3f}"]
    peak = max(ent["counts"]) or 1
    for lo, hi, c in zip(ent["bins"], ent["bins"][1:], ent["counts"]):
        lines.append(f"    {lo:6.2f}-{hi:6.2f} {c:8d} {'#' * round(width * c / peak)}")
    return lines


def _format_key_tokens(tokens: list[dict]) -> list[str]:
    lines = ["  key tokens (highest entropy):"]
    for t in tokens:
        label = f" {t['token']!r}" if "token" in t else ""
        lines.append(f"    H={t['entropy']:.3f}  {t['sample_id']}[{t['position']}]  "
                     f"id {t['token_id']}{label}")
    return lines


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ---------------------------------------------------------------- show one sample


def show_sample(cache_dir, sample_id: str, decode: Callable[[int], str] | None = None,
                top: int = 5) -> dict:
    """One sample's key-token view: per answer token its entropy, top alternatives and tail mass."""
    decode = decode or (lambda i: f"#{i}")
    with RefCacheReader(cache_dir) as reader:
        ref = reader.get(sample_id)
        sources = reader.sources
    files = ((sources.get("pool") or {}).get("files")) or []
    images = [{"index": int(i), "name": files[i][0] if i < len(files) else None,
               "sha256": files[i][1] if i < len(files) else None}
              for i in (ref.pool_indices if ref.pool_indices is not None else [])]
    tokens = []
    for t in range(ref.num_tokens):
        alts = [{"token_id": int(ref.topk_idx[t, j]), "token": decode(int(ref.topk_idx[t, j])),
                 "prob": float(ref.topk_prob[t, j])} for j in range(min(top, ref.topk_idx.shape[1]))]
        tokens.append({"position": t, "token_id": int(ref.answer_ids[t]), "token": decode(int(ref.answer_ids[t])),
                       "entropy": float(ref.entropy[t]), "tail_mass": float(ref.tail_mass[t]),
                       "top": alts})
    return {"sample_id": sample_id, "question": ref.question, "images": images, "tokens": tokens,
            "ref_logp_own": ref.ref_logp_own, "ref_logp_idk": ref.ref_logp_idk}


def format_show(view: Mapping) -> str:
    lines = [f"sample {view['sample_id']}"]
    if view.get("question"):
        lines.append(f"  question: {view['question']!r}")
    lines.append("  answer: " + repr("".join(t["token"] for t in view["tokens"])))
    if view["images"]:
        lines.append(f"  reference images ({len(view['images'])}):")
        lines += [f"    [{im['index']}] {im['name']}  sha256 {str(im['sha256'])[:12]}" for im in view["images"]]
    else:
        lines.append("  reference images: the sample's own image (reference=own)")
    lines.append(f"  {'pos':>3}  {'token':<16} {'H (nats)':>8} {'tail':>7}  top alternatives (probability)")
    for t in view["tokens"]:
        alts = "  ".join(f"{a['token']!r} {a['prob']:.3f}" for a in t["top"])
        lines.append(f"  {t['position']:>3}  {t['token']!r:<16} {t['entropy']:>8.3f} {t['tail_mass']:>7.4f}  {alts}")
    return "\n".join(lines)
