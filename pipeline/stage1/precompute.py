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

import hashlib
import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import refcache
from pipeline.cache.fingerprint import cache_fingerprint, cache_sources, pool_files
from pipeline.config import PrecomputeConfig
from pipeline.data.loaders import report_drops
from pipeline.data.records import Sample
from pipeline.models.encoding import encode_pair, load_image, max_positions, pixel_values
from pipeline.models.families import image_token_id, next_position
from pipeline.models.forward import (answer_logits, forward_inputs, language_model, make_text_batch, multimodal_model,
                                     output_head, unwrap)
from pipeline.models.modeling import check_model_dir, load_model, resolve_device, resolve_dtype
from pipeline.models.prompts import TEMPLATE_ID, train_text
from pipeline.progress import progress as tqdm  # plain log lines off a terminal
from pipeline.schema import check_section

from .references import benchmark_leaks, draw_reference_images
from .counterfactual import (BUILTIN, common_suffix, draw_strangers, names_the_person, person_names, stranger_pool,
                             swap_name)
from .spans import answer_pieces, chain_spans, span_starts


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


def shared_image_prefix(encoded: list[Encoded], image_id: int) -> tuple[list[int] | None, str]:
    """(the ids every sequence shares up to its last image token, "") or (None, why there is none).

    Prefix reuse needs one such head for all: then the key/value cache of the
    head depends on the image alone.
    """
    seqs = [e.ids for e in encoded] + [e.idk_ids for e in encoded if e.idk_ids]
    if any(image_id not in s for s in seqs):
        return None, "a sequence holds no image token"
    lengths = {image_prefix_length(s, image_id) for s in seqs}
    P = lengths.pop() if len(lengths) == 1 else 0
    heads = {tuple(s[:P]) for s in seqs}
    if P == 0 or len(heads) != 1:
        return None, "the tokens up to the image differ between samples"
    return list(heads.pop()), ""


def image_key(data: bytes) -> str:
    """Own images are grouped by content: MLLMU-Bench asks several questions about one person's image."""
    return hashlib.sha256(data).hexdigest()


def _forward_kwarg(language_model) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache`; 5.17 only knows the old name."""
    import inspect
    params = inspect.signature(language_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


CPU_PREFIX_IMAGES = 32      # CPU runs are small models: a 24-image pool plus a shard's own images fit
PREFIX_PASS_IMAGES = 1      # images per prefix forward: one, so a prefix's bits never depend on which
                            # images share its batch (split jobs must write the same shards as one job)


def prefix_capacity(model, prefix_len: int, requested: int = 0) -> int:
    """How many image prefixes the cache may hold: `requested`, or on GPU a quarter of free memory."""
    if requested > 0:
        return requested
    p = next(model.parameters())
    if p.device.type != "cuda":
        return CPU_PREFIX_IMAGES
    cfg = language_model(model).config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_image = 2 * cfg.num_hidden_layers * heads * head_dim * prefix_len * p.element_size()
    free, _ = torch.cuda.mem_get_info(p.device)
    return max(8, min(4096, int(0.25 * free // per_image)))


class PrefixCache:
    """Key/value caches of `USER: <image>`, at most `capacity` images at a time (least recently used leave).

    Keys name images: an int is a pool image (a row of `pool_pixels`), anything
    else an image whose pixels the caller passes to `load`.
    """

    def __init__(self, model, prefix_ids: list[int], pool_pixels: torch.Tensor | None, capacity: int = 0):
        self.model = model
        self.lm = language_model(model)
        self.kwarg = _forward_kwarg(self.lm)
        self.length = len(prefix_ids)
        dev = next(model.parameters()).device
        self.prefix_ids = torch.tensor([prefix_ids], device=dev)
        self.start = next_position(model, self.prefix_ids)   # P, except where an image's positions are 2-D (Qwen)
        self.pool_pixels = pool_pixels
        self.capacity = prefix_capacity(model, self.length, capacity)
        self.layers: OrderedDict = OrderedDict()     # key -> [(keys, values)] per layer, each [1, H, P, D]
        self.passes = 0                              # images run through the prefix forward
        self.peak_images = 0
        self.peak_bytes = 0

    @torch.no_grad()
    def load(self, keys: list, pixels_of=None) -> None:
        """Make every key in `keys` resident, evicting others first; missing ones run batched."""
        if len(set(keys)) > self.capacity:
            raise ValueError(f"{len(set(keys))} images needed at once but the prefix cache holds {self.capacity}")
        for key in keys:
            if key in self.layers:
                self.layers.move_to_end(key)
        missing = list(dict.fromkeys(k for k in keys if k not in self.layers))
        # Own images leave first (least recently used among them): a shard's own images are not asked
        # for again, while the pool's serve every shard.
        for victim in [k for k in self.layers if not isinstance(k, int)] + [k for k in self.layers if isinstance(k, int)]:
            if len(self.layers) + len(missing) <= self.capacity:
                break
            if victim not in keys:
                del self.layers[victim]
        for b in range(0, len(missing), PREFIX_PASS_IMAGES):
            chunk = missing[b: b + PREFIX_PASS_IMAGES]
            pix = torch.stack([self.pool_pixels[k] if isinstance(k, int) else pixels_of(k) for k in chunk])
            ids = self.prefix_ids.expand(len(chunk), -1)
            out = multimodal_model(self.model)(**forward_inputs(self.model, ids, None, pix.to(ids.device)),
                                               use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            # clone: a slice would keep the whole batch's tensor alive after its other images leave
            for i, key in enumerate(chunk):
                self.layers[key] = [(layer.keys[i: i + 1].clone(), layer.values[i: i + 1].clone())
                                    for layer in cache.layers]
            self.passes += len(chunk)
        self.peak_images = max(self.peak_images, len(self.layers))
        self.peak_bytes = max(self.peak_bytes, sum(t.numel() * t.element_size() for kv in self.layers.values()
                                                   for pair in kv for t in pair))

    def get(self, image):
        self.load([image])
        return self.layers[image]

    def gathered(self, keys: list):
        """A fresh DynamicCache whose row i holds the prefix of keys[i] (all prefixes have one length)."""
        from transformers import DynamicCache
        cache = DynamicCache()
        one = len(set(keys)) == 1
        for layer in range(len(self.layers[keys[0]])):
            if one:   # expand() is a view: the forward's concatenation is then the only copy
                k, v = self.layers[keys[0]][layer]
                k, v = k.expand(len(keys), -1, -1, -1), v.expand(len(keys), -1, -1, -1)
            else:
                k = torch.cat([self.layers[key][layer][0] for key in keys])
                v = torch.cat([self.layers[key][layer][1] for key in keys])
            # An empty update creates and types the layer; the prefix is then set, not concatenated
            # onto an empty tensor (which would copy it once more).
            cache.update(k[:, :, :0], v[:, :, :0], layer)
            cache.layers[layer].keys, cache.layers[layer].values = k, v
        return cache


@torch.no_grad()
def prefix_answer_logits(prefix: PrefixCache, keys: list, pad_id: int, seqs, starts):
    """([n, T, V] answer-position logits, TextBatch of the text parts) for rows continuing image prefixes."""
    P = prefix.length
    texts = [s[P:] for s in seqs]
    text_starts = [a - P for a in starts]
    dev = prefix.prefix_ids.device
    batch = make_text_batch(texts, text_starts, pad_id).to(dev)
    n, L = batch.input_ids.shape
    # Right padding after the text: real tokens keep positions start.. and never see the pads (causal).
    mask = torch.cat([torch.ones(n, P, dtype=batch.attention_mask.dtype, device=dev), batch.attention_mask], 1)
    position_ids = (prefix.start + torch.arange(L, device=dev)).unsqueeze(0).expand(n, -1)
    out = prefix.lm(input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids,
                    use_cache=True, **{prefix.kwarg: prefix.gathered(keys)})
    hidden = out.last_hidden_state
    index = batch.answer_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return output_head(prefix.model)(torch.gather(hidden, 1, index)), batch


@torch.no_grad()
def answer_probs_prefix(prefix: PrefixCache, image, pad_id: int, seqs, starts) -> list[torch.Tensor]:
    """Same numbers as `answer_probs_naive`; `image` is one key for every row or a list of keys, one per row."""
    keys = list(image) if isinstance(image, (list, tuple)) else [image] * len(seqs)
    prefix.load(keys)
    logits, batch = prefix_answer_logits(prefix, keys, pad_id, seqs, starts)
    probs = torch.softmax(logits.float(), dim=-1)
    return [probs[i, : int(batch.answer_mask[i].sum())] for i in range(len(seqs))]


# ---------------------------------------------------------------- one shard

SCORES = ("reference", "own", "idk")


def parse_scores(scores) -> tuple[str, ...]:
    """`precompute.scores` (a list, or a comma-separated string) -> the fields to compute; R is the cache's reason to exist."""
    items = scores.split(",") if isinstance(scores, str) else scores
    names = tuple(dict.fromkeys(s.strip() for s in items if s.strip()))
    unknown = [s for s in names if s not in SCORES]
    if unknown:
        raise ValueError(f"precompute.scores: unknown {unknown[0]!r} (use a subset of {','.join(SCORES)})")
    if "reference" not in names:
        raise ValueError("precompute.scores must include 'reference' (the cache's reference distributions)")
    return names


@dataclass
class Row:
    """One text continuation: `ids` read after the prefix of `image`, scored as `kind` for sample `sample`."""
    image: object
    ids: list[int]
    start: int
    kind: str        # ref | own | idk | cf (a counterfactual pair: the stranger's name for the person's)
    sample: int
    keep: int = 0    # cf: the answer's last `keep` positions, the tokens it shares with the true answer


def shard_rows(encoded: list[Encoded], draws, scores, own_keys: list[str], own_needed: bool,
               extra: list[Row] = ()) -> list[Row]:
    """Every row of a shard (`extra`: the counterfactual pairs), ordered by image so that consecutive batches
    need few prefixes at once."""
    rows = list(extra)
    if draws is not None:
        for r, images in enumerate(draws):
            rows += [Row(img, encoded[r].ids, encoded[r].answer_start, "ref", r) for img in images]
    for r, e in enumerate(encoded):
        if own_needed:
            rows.append(Row(own_keys[r], e.ids, e.answer_start, "own", r))
        if "idk" in scores and e.idk_ids is not None:
            rows.append(Row(own_keys[r], e.idk_ids, e.idk_start, "idk", r))
    first_seen = {}
    for row in rows:
        first_seen.setdefault(row.image, len(first_seen))
    pool_first = sorted(first_seen, key=lambda key: (not isinstance(key, int), first_seen[key]))
    order = {key: i for i, key in enumerate(pool_first)}
    return sorted(rows, key=lambda row: order[row.image])      # stable: a sample's rows keep their order


def counterfactual_rows(processor, encoded: list[Encoded], draws, names: dict, strangers: list[str], seed: int,
                        max_length: int | None) -> list[Row]:
    """The textual counterfactual pairs of every sample that names its person (counterfactual.py).

    Pair j is reference image j with stranger j's name in place of the person's,
    in the question and the answer; `keep` is how many trailing answer tokens
    every pair of the sample shares with the true answer (the positions whose R
    they give). A sample whose pairs share none is left to the image swap alone.
    """
    rows = []
    for r, (enc, images) in enumerate(zip(encoded, draws)):
        s = enc.sample
        name = names.get(s.profile_id, "")
        if not names_the_person(s.question, s.answer, name):
            continue
        answer = enc.ids[enc.answer_start:]
        pairs = []
        for image, stranger in zip(images, draw_strangers(s.sample_id, len(images), strangers, seed)):
            prompt, text = train_text(swap_name(s.question, name, stranger), swap_name(s.answer, name, stranger))
            ids, start = encode_pair(processor, prompt, text, f"sample {s.sample_id} (stranger {stranger})",
                                     max_length)
            pairs.append((image, ids, start))
        keep = min(common_suffix(answer, ids[start:]) for _, ids, start in pairs)
        if keep:
            rows += [Row(image, ids, start, "cf", r, keep) for image, ids, start in pairs]
    return rows


def next_batch(rows: list[Row], i: int, batch_size: int, capacity: int) -> int:
    """End of the batch starting at rows[i]: up to batch_size rows spanning at most `capacity` images."""
    images = set()
    j = i
    while j < len(rows) and j - i < batch_size:
        if rows[j].image not in images:
            if len(images) == capacity:
                break
            images.add(rows[j].image)
        j += 1
    return j


@dataclass
class Scores:
    sums: dict          # sample -> [T, V] float32 sum over its reference images
    cf_sums: dict       # sample -> [keep, V] sum over its counterfactual pairs of the shared answer positions
    own_probs: dict     # sample -> [T, V] on its own image (reference == "own")
    logp_own: dict
    logp_idk: dict


def _answer_logp(probs: torch.Tensor, ids: list[int], start: int) -> float:
    y = torch.tensor(ids[start:], device=probs.device)
    return float(torch.log(probs.gather(-1, y.unsqueeze(-1)).clamp_min(1e-38)).sum())


def _collect(out: Scores, row: Row, probs: torch.Tensor, keep_own: bool) -> None:
    if row.kind == "ref":
        out.sums[row.sample] = probs if row.sample not in out.sums else out.sums[row.sample] + probs
    elif row.kind == "cf":
        part = probs[probs.shape[0] - row.keep:]
        out.cf_sums[row.sample] = part if row.sample not in out.cf_sums else out.cf_sums[row.sample] + part
    elif row.kind == "own":
        out.logp_own[row.sample] = _answer_logp(probs, row.ids, row.start)
        if keep_own:
            out.own_probs[row.sample] = probs
    else:
        out.logp_idk[row.sample] = _answer_logp(probs, row.ids, row.start)


@torch.no_grad()
def score_rows_prefix(prefix: PrefixCache, pad_id: int, rows: list[Row], batch_size: int, own_pixels: dict,
                      keep_own: bool) -> Scores:
    """All rows through prefix reuse: mixed-image batches, at most prefix.capacity prefixes resident."""
    out = Scores({}, {}, {}, {}, {})
    i = 0
    while i < len(rows):
        j = next_batch(rows, i, batch_size, prefix.capacity)
        chunk = rows[i:j]
        keys = [row.image for row in chunk]
        prefix.load(keys, own_pixels.__getitem__)
        logits, batch = prefix_answer_logits(prefix, keys, pad_id, [r.ids for r in chunk], [r.start for r in chunk])
        probs = torch.softmax(logits.float(), dim=-1)
        for b, row in enumerate(chunk):
            _collect(out, row, probs[b, : len(row.ids) - row.start], keep_own)
        i = j
    return out


@torch.no_grad()
def score_rows_naive(model, pad_id: int, rows: list[Row], batch_size: int, pool_pixels, own_pixels: dict,
                     keep_own: bool) -> Scores:
    """The oracle: one full forward per row, image included."""
    out = Scores({}, {}, {}, {}, {})
    dev = next(model.parameters()).device
    for b in range(0, len(rows), batch_size):
        chunk = rows[b: b + batch_size]
        pix = torch.stack([pool_pixels[r.image] if isinstance(r.image, int) else own_pixels[r.image] for r in chunk])
        probs = answer_probs_naive(model, pad_id, [r.ids for r in chunk], [r.start for r in chunk], pix.to(dev))
        for row, p in zip(chunk, probs):
            _collect(out, row, p, keep_own)
    return out


def own_images(encoded: list[Encoded], own_pixels: torch.Tensor) -> tuple[list[str], dict]:
    """(key per sample, pixels per distinct key): one prefix per person image, however many questions."""
    keys, pixels = [], {}
    for r, e in enumerate(encoded):
        key = image_key(e.sample.image)
        keys.append(key)
        pixels.setdefault(key, own_pixels[r])
    return keys, pixels


def score_shard(model, pad_id: int, encoded: list[Encoded], draws, *, pool_pixels, own_pixels, batch_size: int,
                prefix: PrefixCache | None, scores=SCORES, keep_own: bool = False, extra_rows=()) -> Scores:
    """The raw scores of one shard (`scores` may name any subset: the benchmark times parts alone)."""
    keys, pixels = own_images(encoded, own_pixels)
    rows = shard_rows(encoded, draws if "reference" in scores else None, scores, keys, "own" in scores or keep_own,
                      extra_rows)
    if prefix is None:
        return score_rows_naive(model, pad_id, rows, batch_size, pool_pixels, pixels, keep_own)
    return score_rows_prefix(prefix, pad_id, rows, batch_size, pixels, keep_own)


def pool_reference_sums(model, pad_id: int, encoded: list[Encoded], draws: list[list[int]], pool_pixels,
                        batch_size: int, prefix: PrefixCache | None) -> dict[int, torch.Tensor]:
    """Sum over each sample's drawn pool images of its answer distributions ([T, V] float32 per sample)."""
    rows = shard_rows(encoded, draws, (), [], False)
    if prefix is None:
        return score_rows_naive(model, pad_id, rows, batch_size, pool_pixels, {}, False).sums
    return score_rows_prefix(prefix, pad_id, rows, batch_size, {}, False).sums


def compute_shard(model, processor, encoded: list[Encoded], *, pool_pixels, reference: str, k: int, top_k: int,
                  seed: int, batch_size: int, prefix: PrefixCache | None, own_pixels, progress=None,
                  scores=SCORES, span: str = "none", names: dict | None = None, strangers=None,
                  max_length: int | None = None):
    """RefSamples for a list of encoded samples (one shard's worth).

    `span` chain: spans.chain_spans on R. `names` (profile id -> name) and
    `strangers` (the pool): the textual counterfactual pairs of counterfactual.py.
    """
    pad_id = processor.tokenizer.pad_token_id
    draws = None
    cf_rows = []
    if reference == "pool":
        draws = [draw_reference_images(e.sample.sample_id, len(pool_pixels), k, seed) for e in encoded]
        if names:
            cf_rows = counterfactual_rows(processor, encoded, draws, names, strangers, seed, max_length)
    # reference == "own" (the "w/o Vis" ablation): R is the distribution on the sample's own image.
    got = score_shard(model, pad_id, encoded, draws, pool_pixels=pool_pixels, own_pixels=own_pixels,
                      batch_size=batch_size, prefix=prefix, scores=scores if reference == "pool" else
                      tuple(s for s in scores if s != "reference"), keep_own=reference == "own", extra_rows=cf_rows)
    if progress is not None:
        progress.update(len(encoded))
    out = []
    for r, enc in enumerate(encoded):
        avg = got.sums[r] / k if reference == "pool" else got.own_probs[r]
        if r in got.cf_sums:      # the answer positions after the name: R asked about strangers
            shared = got.cf_sums[r].shape[0]
            if shared:
                avg = torch.cat([avg[: avg.shape[0] - shared], got.cf_sums[r] / k])
        if span == "chain":
            avg = chain_spans(avg, enc.ids[enc.answer_start:],
                              span_starts(answer_pieces(processor.tokenizer, enc.ids, enc.answer_start)))
        out.append(to_ref_sample(enc, avg, top_k, got.logp_own.get(r) if "own" in scores else None,
                                 got.logp_idk.get(r), pool_indices=draws[r] if reference == "pool" else None))
    return out


# ---------------------------------------------------------------- the command

def precompute(model_dir: str, samples: list[Sample], settings: PrecomputeConfig, *, pool_dir: str | None,
               device: str = "auto", rank: int = 0, world: int = 1, overwrite: bool = False, log=print,
               benchmark_sets: dict | None = None, prefix_cache: bool | None = None, dropped: list | None = None,
               strict: bool = False, strangers: list[str] | None = None) -> dict | None:
    """Compute this rank's shards (shards rank::world) of `settings.output` and, once all exist, the manifest.

    `settings` is the precompute config section, passed whole: output, reference,
    k, top_k, seed, shard_size, batch_size, idk_answer, dtype, scores,
    prefix_cache_images and allow_benchmark_images all come from it (a
    hand-built section is range-checked like a loaded one). `pool_dir` is
    precompute.pool resolved to a directory (jobs.runs.pool_dir); `prefix_cache`
    None means settings.prefix_cache (the CLI's --no-prefix-cache passes False).
    `benchmark_sets` (set name -> [(where, image bytes)], e.g. from runs.benchmark_images):
    a pool image equal to one of them is refused unless settings.allow_benchmark_images.

    Finished shards (checksum and fingerprint match) are skipped, so a killed
    run resumes where it stopped. Shards of another layout (shard_size) or
    fingerprint in the output directory are refused, or removed first with `overwrite`.
    `dropped` (records.Dropped: forget items the reader left out for their content)
    is logged in one line and recorded in the manifest; `strict` (data.strict) refuses any.
    `strangers`: the candidate names of settings.names swap (jobs.runs.stranger_names
    resolves precompute.name_pool; None: counterfactual.BUILTIN).
    Returns the manifest, or None while shards of other ranks/jobs are still missing.
    """
    check_section("precompute", settings)
    drops = report_drops(dropped or [], strict, log if rank == 0 else None, "precompute")
    reference = settings.reference
    if reference not in ("pool", "own"):
        raise ValueError(f"precompute.reference must be 'pool' or 'own', not {reference!r}")
    if not samples:
        raise ValueError("no forget samples to precompute")
    check_model_dir(model_dir)
    score_names = parse_scores(settings.scores)
    if settings.names == "swap" and reference != "pool":
        raise ValueError("precompute.names swap pairs strangers with the pool images: it needs precompute.reference pool")
    # What this run computes: reference "own" is one image (k=1), the CLI may turn prefix reuse off.
    run = replace(settings, k=1 if reference == "own" else settings.k, scores=list(score_names),
                  prefix_cache=settings.prefix_cache if prefix_cache is None else prefix_cache)
    k, top_k, seed, shard_size, idk_answer = run.k, run.top_k, run.seed, run.shard_size, run.idk_answer
    allow_benchmark_images = run.allow_benchmark_images
    dev = resolve_device(device)
    dtype_name = str(resolve_dtype(run.dtype, dev)).replace("torch.", "")
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
    names, candidates, strangers = {}, strangers, []
    if run.names == "swap":
        names = person_names(samples)
        strangers = stranger_pool(BUILTIN if candidates is None else candidates, names.values())
        if not strangers:
            raise ValueError("precompute.names swap: the stranger pool is empty (every name in it is a forget person's)")
        swapped = sum(names_the_person(s.question, s.answer, names.get(s.profile_id, "")) for s in samples)
        if rank == 0:
            log(f"[precompute] textual counterfactuals: {swapped} of {len(samples)} samples name their person "
                f"({len(names)} of {len({s.profile_id for s in samples})} people have a name QA); "
                f"{len(strangers)} strangers ({run.name_pool})")
    fingerprint = cache_fingerprint(model_dir, samples, pool_dir=pool_dir, reference=reference, k=k, top_k=top_k,
                                    seed=seed, dtype=dtype_name, idk_answer=idk_answer,
                                    scores=None if score_names == SCORES else ",".join(score_names),
                                    span=run.span, names=refcache.hash_json(strangers) if names else None)
    num_shards = math.ceil(len(samples) / shard_size)
    out = Path(run.output)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 or not _distributed():   # under torchrun rank 0 alone tidies, the others wait for it
        claim_output(out, num_shards, fingerprint["digest"], overwrite, log)
    _barrier(world)
    record = {"k": k, "K": top_k, "reference": reference, "pool": str(pool_dir) if pool else "",
              "pool_size": len(pool), "seed": seed, "prompt_template": TEMPLATE_ID, "dtype": dtype_name,
              "idk_answer": idk_answer, "model": str(model_dir), "n_samples": len(samples),
              "shard_size": shard_size, "allow_benchmark_images": bool(allow_benchmark_images),
              "scores": list(score_names), "span": run.span, "names": run.names}
    if run.names == "swap":
        record.update(name_pool=run.name_pool, strangers=strangers)
    sources = cache_sources(model_dir, pool_dir if pool else None)
    if dropped is not None:   # the shards carry it; finalize shows it in the manifest
        sources["dropped"] = drops
    done = refcache.finished_shards(out, num_shards, fingerprint["digest"])
    mine = [i for i in range(rank, num_shards, world) if i not in done]
    if (out / refcache.MANIFEST).is_file() and len(done) == num_shards:
        manifest = json.loads((out / refcache.MANIFEST).read_text())
        if manifest.get("fingerprint", {}).get("digest") == fingerprint["digest"]:
            log(f"[precompute] {out} is complete ({num_shards} shards); nothing to do")
            return manifest
    if mine:
        _compute_shards(model_dir, samples, out, mine, num_shards, pool, fingerprint, record, run, device=dev,
                        log=log, skipped=len([i for i in range(rank, num_shards, world) if i in done]),
                        sources=sources, names=names, strangers=strangers)
    elif world == 1 or rank == 0:
        log(f"[precompute] all {num_shards} shards already finished; writing the manifest")
    _barrier(world)
    if refcache.finished_shards(out, num_shards, fingerprint["digest"]) == set(range(num_shards)):
        # Under torchrun, rank 0 writes it after the barrier; independent jobs cannot wait
        # for each other, so whichever finds every shard finished writes it (same bytes).
        if rank == 0 or not _distributed():
            return refcache.finalize(out, num_shards, fingerprint, record)
        return None
    log(f"[precompute] rank {rank}: my shards are done; other jobs' shards are missing — "
        f"run `viker cache merge {out}` once they finish")
    return None


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


def _compute_shards(model_dir, samples, out, mine, num_shards, pool, fingerprint, record, run: PrecomputeConfig, *,
                    device, log, skipped, sources=None, names=None, strangers=None):
    """Compute and write the shards `mine`; `run` is the section as this run applies it (see precompute)."""
    k, top_k, seed, shard_size, batch_size = run.k, run.top_k, run.seed, run.shard_size, run.batch_size
    model, processor = load_model(model_dir, dtype=run.dtype, device=str(device))
    model.requires_grad_(False)
    mdtype = next(model.parameters()).dtype
    encoded_all = encode_samples(processor, samples, run.idk_answer, max_positions(model))
    pool_pixels = (pixel_values(processor, [load_image(p.read_bytes(), str(p)) for p in pool]).to(device, mdtype)
                   if pool else None)
    prefix = None
    if run.prefix_cache:
        head, why = shared_image_prefix(encoded_all, image_token_id(processor))
        if head is None:   # e.g. a chat template that puts text of the sample before the image
            log(f"[precompute] prefix reuse off: {why}; every row runs the full forward (naive path)")
        else:   # kept across shards: pool prefixes computed for one shard serve the next while they fit
            prefix = PrefixCache(model, head, pool_pixels, run.prefix_cache_images)
    vocab = unwrap(model).lm_head.out_features
    n_mine = sum(len(samples[i * shard_size:(i + 1) * shard_size]) for i in mine)
    if skipped:
        log(f"[precompute] resuming: {skipped} finished shard(s) kept")
    t0 = time.time()
    bar = tqdm(total=n_mine, desc="precompute", unit="sample")
    for index in mine:
        encoded = encoded_all[index * shard_size:(index + 1) * shard_size]
        own = pixel_values(processor, [load_image(e.sample.image, f"sample {e.sample.sample_id}") for e in encoded])
        refs = compute_shard(model, processor, encoded, pool_pixels=pool_pixels, reference=run.reference, k=k,
                             top_k=top_k, seed=seed, batch_size=batch_size, prefix=prefix,
                             own_pixels=own.to(mdtype), progress=bar, scores=tuple(run.scores), span=run.span,
                             names=names, strangers=strangers, max_length=max_positions(model))
        refcache.write_shard(out, index, num_shards, refs, vocab_size=vocab, fingerprint=fingerprint,
                             settings=record, sources=sources)
    bar.close()
    secs = time.time() - t0
    log(f"[precompute] {n_mine} samples in {secs:.1f}s ({n_mine / max(secs, 1e-9):.1f} samples/s, k={k}, "
        f"{f'prefix reuse, {prefix.passes} image prefixes' if prefix else 'naive'})")
