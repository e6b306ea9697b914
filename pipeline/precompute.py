"""Stage one (`viker precompute`): visual-guided reference distributions -> HDF5 shards.

For each forget sample s = (I, x, y) and k reference images I'_1..I'_k drawn
(seeded per sample) from a pool, the frozen model is teacher-forced on the
ground-truth answer with each reference image, and the answer-position
distributions are averaged in probability space:

    R_i(v) = (1/k) * sum_j softmax(z(I'_j, x, y_<i))(v)

Stored per answer token: top-K indices and probabilities, the tail mass, and
the exact entropy of the full R_i. Stored per sample: the frozen model's
answer log-likelihood on the sample's own image (NPO) and of an "I don't
know" answer (IdkPO), so stage two never needs a second model.

Two paths compute the same numbers:
- naive (`prefix_cache=False`): one full forward per (sample, image) pair; the oracle in tests;
- prefix reuse (default): the prompt starts with the image, and the k images
  come from a small shared pool, so each pool image's `USER: <image>` prefix
  is run once and its key/value cache reused for every question asked about
  it; per pair only the question+answer tokens are run.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import refcache
from .data.records import Sample
from .encoding import encode_pair, load_image, max_positions, pixel_values
from .fingerprint import cache_fingerprint, cache_sources, pool_files
from .forward import answer_logits, make_text_batch, unwrap
from .modeling import check_model_dir, load_model, resolve_device, resolve_dtype
from .prompts import TEMPLATE_ID, train_text
from .references import benchmark_leaks, draw_reference_images


@dataclass
class Encoded:
    sample: Sample
    ids: list[int]           # prompt + answer ids (image tokens expanded, BOS first)
    answer_start: int
    idk_ids: list[int] | None
    idk_start: int | None


def encode_samples(processor, samples: list[Sample], idk_answer: str, max_length: int | None) -> list[Encoded]:
    out = []
    for s in samples:
        prompt, answer = train_text(s.question, s.answer)
        ids, start = encode_pair(processor, prompt, answer, f"sample {s.sample_id}", max_length)
        idk_ids = idk_start = None
        if idk_answer:
            idk_ids, idk_start = encode_pair(processor, prompt, " " + idk_answer.strip(), f"sample {s.sample_id}", max_length)
        out.append(Encoded(s, ids, start, idk_ids, idk_start))
    return out


# ---------------------------------------------------------------- the reduction

def summarise(avg_probs: torch.Tensor, top_k: int):
    """Top-K indices/probabilities, tail mass and exact entropy of averaged distributions [T, V]."""
    probs, idx = torch.topk(avg_probs, top_k, dim=-1)
    tail = (1.0 - probs.sum(-1)).clamp_min(0.0)
    entropy = -torch.special.xlogy(avg_probs, avg_probs).sum(-1)
    return idx, probs, tail, entropy


def to_ref_sample(enc: Encoded, avg_probs: torch.Tensor, top_k: int, logp_own=None, logp_idk=None,
                  pool_indices=None):
    idx, probs, tail, entropy = summarise(avg_probs, top_k)
    return refcache.RefSample(
        sample_id=enc.sample.sample_id,
        answer_ids=np.asarray(enc.ids[enc.answer_start:], dtype=np.int32),
        topk_idx=idx.cpu().numpy(), topk_prob=probs.cpu().numpy(),
        tail_mass=tail.float().cpu().numpy(), entropy=entropy.float().cpu().numpy(),
        ref_logp_own=logp_own, ref_logp_idk=logp_idk, question=enc.sample.question,
        pool_indices=None if pool_indices is None else np.asarray(pool_indices, np.int32))


# ---------------------------------------------------------------- naive path

@torch.no_grad()
def answer_probs_naive(model, pad_id: int, seqs, starts, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Float32 answer-position distributions, one full forward per (sequence, image) row."""
    dev = pixels.device
    batch = make_text_batch(seqs, starts, pad_id).to(dev)
    logits = answer_logits(model, batch, pixels)
    probs = torch.softmax(logits.float(), dim=-1)
    return [probs[i, : len(s) - a] for i, (s, a) in enumerate(zip(seqs, starts))]


@torch.no_grad()
def sequence_logprobs(model, pad_id: int, seqs, starts, pixels: torch.Tensor) -> list[float]:
    batch = make_text_batch(seqs, starts, pad_id).to(pixels.device)
    logp = torch.log_softmax(answer_logits(model, batch, pixels).float(), dim=-1)
    tok = torch.gather(logp, -1, batch.answer_ids.unsqueeze(-1)).squeeze(-1)
    return (tok * batch.answer_mask).sum(-1).tolist()


def reference_distribution(model, processor, enc: Encoded, images) -> torch.Tensor:
    """The naive definition, for one sample: mean over images of full-forward softmaxes. [T, V] float32."""
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pixels = pixel_values(processor, images).to(dev, dtype)
    n = len(images)
    probs = answer_probs_naive(model, processor.tokenizer.pad_token_id, [enc.ids] * n, [enc.answer_start] * n, pixels)
    return torch.stack(probs).mean(0)


# ---------------------------------------------------------------- prefix path

def image_prefix_length(ids: list[int], image_token_id: int) -> int:
    """Split after the last image token: everything before is the same for every question on that image."""
    last = max(i for i, t in enumerate(ids) if t == image_token_id)
    return last + 1


def _forward_kwarg(language_model) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache`; 5.17 only knows the old name."""
    import inspect
    params = inspect.signature(language_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class PrefixCache:
    """Key/value caches of `USER: <image>` for each pool image, computed once."""

    def __init__(self, model, prefix_ids: list[int], pool_pixels: torch.Tensor):
        self.llava = unwrap(model)
        self.kwarg = _forward_kwarg(self.llava.model.language_model)
        self.length = len(prefix_ids)
        self.layers: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.prefix_ids = torch.tensor([prefix_ids], device=pool_pixels.device)
        self.pool_pixels = pool_pixels

    @torch.no_grad()
    def get(self, image: int):
        if image not in self.layers:
            out = self.llava.model(input_ids=self.prefix_ids, pixel_values=self.pool_pixels[image: image + 1],
                                   use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            self.layers[image] = [(layer.keys, layer.values) for layer in cache.layers]
        return self.layers[image]

    def expanded(self, image: int, n: int):
        """A fresh DynamicCache holding the prefix n times: expand() is a view, so the only copy
        is the one the cache's first concatenation makes anyway."""
        from transformers import DynamicCache
        cache = DynamicCache()
        for i, (k, v) in enumerate(self.get(image)):
            cache.update(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), i)
        return cache


@torch.no_grad()
def answer_probs_prefix(prefix: PrefixCache, image: int, pad_id: int, seqs, starts) -> list[torch.Tensor]:
    """Same numbers as `answer_probs_naive` for rows sharing one pool image, from the text tokens alone."""
    P = prefix.length
    texts = [s[P:] for s in seqs]
    text_starts = [a - P for a in starts]
    dev = prefix.prefix_ids.device
    batch = make_text_batch(texts, text_starts, pad_id).to(dev)
    n, L = batch.input_ids.shape
    mask = torch.cat([torch.ones(n, P, dtype=batch.attention_mask.dtype, device=dev), batch.attention_mask], 1)
    position_ids = (P + torch.arange(L, device=dev)).unsqueeze(0).expand(n, -1)
    lm = prefix.llava.model.language_model
    out = lm(input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids,
             use_cache=True, **{prefix.kwarg: prefix.expanded(image, n)})
    hidden = out.last_hidden_state
    index = batch.answer_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    logits = prefix.llava.lm_head(torch.gather(hidden, 1, index))
    probs = torch.softmax(logits.float(), dim=-1)
    return [probs[i, : len(s) - a] for i, (s, a) in enumerate(zip(texts, text_starts))]


# ---------------------------------------------------------------- one shard

def pool_reference_sums(model, pad_id: int, encoded: list[Encoded], draws: list[list[int]], pool_pixels,
                        batch_size: int, prefix: PrefixCache | None) -> dict[int, torch.Tensor]:
    """Sum over each sample's drawn pool images of its answer distributions ([T, V] float32 per sample).

    Pairs are grouped by image so that one prefix cache serves a whole batch.
    """
    pairs_by_image: dict[int, list[int]] = {}
    for row, images in enumerate(draws):
        for img in images:
            pairs_by_image.setdefault(img, []).append(row)
    sums: dict[int, torch.Tensor] = {}
    for img, rows in sorted(pairs_by_image.items()):
        for b in range(0, len(rows), batch_size):
            chunk = rows[b: b + batch_size]
            seqs = [encoded[r].ids for r in chunk]
            starts = [encoded[r].answer_start for r in chunk]
            if prefix is not None:
                probs = answer_probs_prefix(prefix, img, pad_id, seqs, starts)
            else:
                pix = pool_pixels[img: img + 1].expand(len(chunk), -1, -1, -1)
                probs = answer_probs_naive(model, pad_id, seqs, starts, pix)
            for r, p in zip(chunk, probs):
                sums[r] = p if r not in sums else sums[r] + p
    return sums


def compute_shard(model, processor, encoded: list[Encoded], *, pool_pixels, reference: str, k: int, top_k: int,
                  seed: int, batch_size: int, prefix: PrefixCache | None, own_pixels, progress=None):
    """RefSamples for a list of encoded samples (one shard's worth)."""
    pad_id = processor.tokenizer.pad_token_id
    dev = next(model.parameters()).device
    if reference == "pool":
        draws = [draw_reference_images(e.sample.sample_id, len(pool_pixels), k, seed) for e in encoded]
        sums = pool_reference_sums(model, pad_id, encoded, draws, pool_pixels, batch_size, prefix)
    # Own image: NPO/IdkPO references, and R itself for the "w/o Vis" ablation.
    own_probs, logp_own, logp_idk = {}, {}, {}
    for b in range(0, len(encoded), batch_size):
        rows = list(range(b, min(b + batch_size, len(encoded))))
        pix = own_pixels[b: b + len(rows)].to(dev)
        seqs = [encoded[r].ids for r in rows]
        starts = [encoded[r].answer_start for r in rows]
        probs = answer_probs_naive(model, pad_id, seqs, starts, pix)
        for r, p in zip(rows, probs):
            y = torch.tensor(seqs[r - b][starts[r - b]:], device=p.device)
            logp_own[r] = float(torch.log(p.gather(-1, y.unsqueeze(-1)).clamp_min(1e-38)).sum())
            if reference == "own":
                own_probs[r] = p
        if encoded[rows[0]].idk_ids is not None:
            lls = sequence_logprobs(model, pad_id, [encoded[r].idk_ids for r in rows],
                                    [encoded[r].idk_start for r in rows], pix)
            logp_idk.update(zip(rows, lls))
        if progress is not None:
            progress.update(len(rows))
    out = []
    for r, enc in enumerate(encoded):
        avg = sums[r] / k if reference == "pool" else own_probs[r]
        out.append(to_ref_sample(enc, avg, top_k, logp_own[r], logp_idk.get(r),
                                 pool_indices=draws[r] if reference == "pool" else None))
    return out


# ---------------------------------------------------------------- the command

def dist_env() -> tuple[int, int, int]:
    """(rank, world, local_rank) as torchrun / accelerate launch set them."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def precompute(model_dir: str, samples: list[Sample], out_dir: str, *, pool_dir: str | None, reference: str = "pool",
               k: int = 5, top_k: int = 64, seed: int = 0, shard_size: int = 64, batch_size: int = 64,
               prefix_cache: bool = True, idk_answer: str = "I don't know.", dtype: str = "auto",
               device: str = "auto", rank: int = 0, world: int = 1, overwrite: bool = False,
               log=print, benchmark_sets: dict | None = None, allow_benchmark_images: bool = False) -> dict | None:
    """Compute this rank's shards (shards rank::world) and, once all exist, the manifest.

    `benchmark_sets` (set name -> [(where, image bytes)], e.g. from runs.benchmark_images):
    a pool image equal to one of them is refused unless `allow_benchmark_images`.

    Finished shards (checksum and fingerprint match) are skipped, so a killed
    run resumes where it stopped. Shards of another layout (shard_size) or
    fingerprint in `out_dir` are refused, or removed first with `overwrite`.
    Returns the manifest, or None while shards of other ranks/jobs are still missing.
    """
    if reference not in ("pool", "own"):
        raise ValueError(f"precompute.reference must be 'pool' or 'own', not {reference!r}")
    if not samples:
        raise ValueError("no forget samples to precompute")
    check_settings(k=k, top_k=top_k, shard_size=shard_size, batch_size=batch_size, seed=seed)
    check_model_dir(model_dir)
    if reference == "own":
        k = 1
    dev = resolve_device(device)
    dtype_name = str(resolve_dtype(dtype, dev)).replace("torch.", "")
    pool = pool_files(pool_dir) if reference == "pool" else []
    # Bounds that need the pool and the model: before hashing or loading anything large.
    check_against_inputs(k=k, top_k=top_k, pool_size=len(pool) if reference == "pool" else None,
                         vocab_size=config_vocab_size(model_dir), pool_dir=pool_dir, model_dir=model_dir)
    if pool and benchmark_sets and not allow_benchmark_images:
        leaks = benchmark_leaks(pool, benchmark_sets)
        if leaks:
            raise ValueError(f"{leaks[0]}" + (f" (and {len(leaks) - 1} more)" if len(leaks) > 1 else "")
                             + ": reference images must be irrelevant to the benchmark; "
                             "use --allow-benchmark-images only for that ablation")
    fingerprint = cache_fingerprint(model_dir, samples, pool_dir=pool_dir, reference=reference, k=k, top_k=top_k,
                                    seed=seed, dtype=dtype_name, idk_answer=idk_answer)
    num_shards = math.ceil(len(samples) / shard_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 or not _distributed():   # under torchrun rank 0 alone tidies, the others wait for it
        claim_output(out, num_shards, fingerprint["digest"], overwrite, log)
    _barrier(world)
    settings = {"k": k, "K": top_k, "reference": reference, "pool": str(pool_dir) if pool else "",
                "pool_size": len(pool), "seed": seed, "prompt_template": TEMPLATE_ID, "dtype": dtype_name,
                "idk_answer": idk_answer, "model": str(model_dir), "n_samples": len(samples),
                "shard_size": shard_size, "allow_benchmark_images": bool(allow_benchmark_images)}
    sources = cache_sources(model_dir, pool_dir if pool else None)
    done = refcache.finished_shards(out, num_shards, fingerprint["digest"])
    mine = [i for i in range(rank, num_shards, world) if i not in done]
    if (out / refcache.MANIFEST).is_file() and len(done) == num_shards:
        manifest = json.loads((out / refcache.MANIFEST).read_text())
        if manifest.get("fingerprint", {}).get("digest") == fingerprint["digest"]:
            log(f"[precompute] {out} is complete ({num_shards} shards); nothing to do")
            return manifest
    if mine:
        _compute_shards(model_dir, samples, out, mine, num_shards, pool, fingerprint, settings, reference=reference,
                        k=k, top_k=top_k, seed=seed, shard_size=shard_size, batch_size=batch_size,
                        prefix_cache=prefix_cache, idk_answer=idk_answer, dtype=dtype, device=dev, log=log,
                        skipped=len([i for i in range(rank, num_shards, world) if i in done]), sources=sources)
    elif world == 1 or rank == 0:
        log(f"[precompute] all {num_shards} shards already finished; writing the manifest")
    _barrier(world)
    if refcache.finished_shards(out, num_shards, fingerprint["digest"]) == set(range(num_shards)):
        # Under torchrun, rank 0 writes it after the barrier; independent jobs cannot wait
        # for each other, so whichever finds every shard finished writes it (same bytes).
        if rank == 0 or not _distributed():
            return refcache.finalize(out, num_shards, fingerprint, settings)
        return None
    log(f"[precompute] rank {rank}: my shards are done; other jobs' shards are missing — "
        f"run `viker cache merge {out}` once they finish")
    return None


def check_settings(*, k: int, top_k: int, shard_size: int, batch_size: int, seed: int) -> None:
    """The ranges config.RANGES checks, again for callers that pass arguments directly."""
    for name, value in (("k", k), ("top_k", top_k), ("shard_size", shard_size), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"precompute.{name} must be >= 1, got {value}")
    if seed < 0:
        raise ValueError(f"precompute.seed must be >= 0, got {seed}")


def config_vocab_size(model_dir) -> int | None:
    """The language model's vocabulary size from config.json (LLaVA keeps it in text_config)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None   # load_model reports an unreadable config with its own message
    size = (config.get("text_config") or {}).get("vocab_size", config.get("vocab_size"))
    return size if isinstance(size, int) else None


def check_against_inputs(*, k: int, top_k: int, pool_size: int | None, vocab_size: int | None,
                         pool_dir=None, model_dir=None) -> None:
    if pool_size is not None and k > pool_size:
        raise ValueError(f"precompute.k must be <= the reference pool size {pool_size} ({pool_dir}), got {k}")
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(f"precompute.top_k must be <= the vocabulary size {vocab_size} of {model_dir}, "
                         f"got {top_k}")


_CACHE_FILE = re.compile(r"^refs-(\d{5})-of-(\d{5})\.(h5|json)(\.tmp)?$")


def foreign_files(out: Path, num_shards: int, digest: str) -> tuple[list[Path], list[Path]]:
    """(cache files of another layout or fingerprint, files that belong to no cache) in `out`.

    Ours: shards and completion records of this layout (`num_shards`) whose
    record, where one exists, names this fingerprint, and manifest.json (it is
    rewritten last). A shard of our layout without a record is an interrupted
    write of ours or of another run: it is recomputed either way.
    """
    stale, unrelated = [], []
    for path in sorted(out.iterdir()):
        if path.name in (refcache.MANIFEST, refcache.MANIFEST + ".tmp"):
            continue
        m = _CACHE_FILE.match(path.name)
        if m is None or not path.is_file():
            unrelated.append(path)
        elif int(m[2]) != num_shards:
            stale.append(path)
        elif m[3] == "json" and not m[4] and _record_digest(path) != digest:
            stale += [path, path.with_suffix(".h5")]
    stale = sorted(set(p for p in stale if p.exists()))
    return stale, unrelated


def _record_digest(path: Path) -> str | None:
    try:
        return (json.loads(path.read_text()).get("fingerprint") or {}).get("digest")
    except (OSError, ValueError, AttributeError):
        return None


def _names(paths: list[Path], shown: int = 4) -> str:
    names = ", ".join(p.name for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def claim_output(out: Path, num_shards: int, digest: str, overwrite: bool, log=print) -> None:
    """The output directory holds this cache only: refuse (or, with overwrite, remove) other runs' shards."""
    stale, unrelated = foreign_files(out, num_shards, digest)
    if unrelated:
        raise refcache.CacheError(f"precompute.output {out} holds files that are not part of a reference cache "
                                  f"({_names(unrelated)}): choose an empty or cache-only directory")
    if not stale:
        return
    if not overwrite:
        raise refcache.CacheError(f"precompute.output {out} holds shards of another run (other shard_size or "
                                  f"fingerprint): {_names(stale)}; pass --overwrite to remove them")
    for path in stale + [out / refcache.MANIFEST]:
        path.unlink(missing_ok=True)
    log(f"[precompute] --overwrite: removed {len(stale)} file(s) of another run from {out}")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier(world: int) -> None:
    if world > 1 and _distributed():
        torch.distributed.barrier()


def _compute_shards(model_dir, samples, out, mine, num_shards, pool, fingerprint, settings, *, reference, k, top_k,
                    seed, shard_size, batch_size, prefix_cache, idk_answer, dtype, device, log, skipped,
                    sources=None):
    model, processor = load_model(model_dir, dtype=dtype, device=str(device))
    model.requires_grad_(False)
    mdtype = next(model.parameters()).dtype
    encoded_all = encode_samples(processor, samples, idk_answer, max_positions(model))
    pool_pixels = (pixel_values(processor, [load_image(p.read_bytes(), str(p)) for p in pool]).to(device, mdtype)
                   if pool else None)
    prefix = None
    if reference == "pool" and prefix_cache:
        P = image_prefix_length(encoded_all[0].ids, unwrap(model).config.image_token_index)
        heads = {tuple(e.ids[:P]) for e in encoded_all}
        if len(heads) != 1:
            raise ValueError("forget samples do not share one image prefix; rerun with --no-prefix-cache")
        prefix = PrefixCache(model, list(heads.pop()), pool_pixels)
    vocab = unwrap(model).lm_head.out_features
    n_mine = sum(len(samples[i * shard_size:(i + 1) * shard_size]) for i in mine)
    if skipped:
        log(f"[precompute] resuming: {skipped} finished shard(s) kept")
    t0 = time.time()
    bar = tqdm(total=n_mine, desc="precompute", unit="sample")
    for index in mine:
        encoded = encoded_all[index * shard_size:(index + 1) * shard_size]
        own = pixel_values(processor, [load_image(e.sample.image, f"sample {e.sample.sample_id}") for e in encoded])
        refs = compute_shard(model, processor, encoded, pool_pixels=pool_pixels, reference=reference, k=k,
                             top_k=top_k, seed=seed, batch_size=batch_size, prefix=prefix,
                             own_pixels=own.to(mdtype), progress=bar)
        refcache.write_shard(out, index, num_shards, refs, vocab_size=vocab, fingerprint=fingerprint,
                             settings=settings, sources=sources)
    bar.close()
    secs = time.time() - t0
    log(f"[precompute] {n_mine} samples in {secs:.1f}s ({n_mine / max(secs, 1e-9):.1f} samples/s, k={k}, "
        f"{'prefix reuse' if prefix else 'naive'})")
