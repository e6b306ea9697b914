"""The reference-distribution cache: the one module that knows its on-disk format.

Stage one (``viker precompute``) writes, per forget sample, the frozen model's
reference distribution averaged over k irrelevant images, truncated to its top
K entries; stage two streams it back. Only numpy, h5py and the standard library
are imported here, so both stages load this module cheaply.

A cache directory (every name relative, so the directory can be copied anywhere
and still verifies)::

    refs-00000-of-00004.h5     one shard; ragged samples stored flat (see write_shard)
    refs-00000-of-00004.json   its completion record, written after the shard is in place
    manifest.json              written last, by finalize() / merge(); readers need it

A shard is *finished* when its .h5 and .json both exist, the .h5's sha256 and
size match the record and the record's fingerprint is the expected one. Resume
recomputes only unfinished shards; ranks or machines each write their own
shards and ``merge`` turns the directory into a cache. Every file is written as
``X.tmp``, fsynced and renamed, so nothing half-written ever reads as valid.

Fingerprint parts (values are strings; see make_fingerprint): ``model_config``,
``model_weights`` (fingerprint.weights_identity), ``tokenizer``, ``prompt_template``,
``reference_pool`` (hash_files), ``k``, ``K``, ``seed``, ``dtype`` (plain values,
so a mismatch can show both), ``format_version`` (added when absent).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import h5py
import numpy as np

from . import filememo  # standard library only
from .filememo import hash_file  # noqa: F401  (plain sha256; re-exported for callers of refcache)


# 2: per-sample pool_indices and question, a `sources` record (model and pool paths as given
#    and as content hashes, every pool file's sha256, prompt template text, units).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"

_SHARD_RE = re.compile(r"^refs-(\d{5})-of-(\d{5})\.h5$")
_SIDECAR_RE = re.compile(r"^refs-(\d{5})-of-(\d{5})\.json$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TOKEN_FIELDS = ("answer_ids", "topk_idx", "topk_prob", "tail_mass", "entropy")
_SAMPLE_FIELDS = ("ref_logp_own", "ref_logp_idk")
_CHUNK_ROWS = 1024
_READ_CACHE_BYTES = 4 << 20  # a few decompressed chunks per dataset: sequential reads hit it
_BLOCK_SAMPLES = 64  # samples read together by RefCacheReader.get (stream.Stream's window size)
_MAX_BLOCKS = 8
_MAX_OPEN_FILES = 4
_PART_LABELS = {
    "model_config": "model config",
    "model_weights": "model weights",
    "tokenizer": "tokenizer",
    "prompt_template": "prompt template",
    "reference_pool": "reference pool",
    "format_version": "cache format version",
}
_PLURAL_LABELS = {"model_weights"}  # "model weights differ", not "differs"


class CacheError(Exception):
    """A reference cache is missing, unfinished, corrupt or made for another setup."""


class FingerprintMismatch(CacheError):
    """The cache was computed for another model/data/settings; str() is one line."""

    def __init__(self, cache_dir, differences: Iterable[str]):
        differences = [" ".join(str(d).split()) for d in differences]
        super().__init__(str(cache_dir), differences)  # args must rebuild us when unpickled
        self.cache_dir = str(cache_dir)
        self.differences = differences

    def __str__(self) -> str:
        what = "; ".join(self.differences) or "fingerprint digest differs"
        return f"reference cache {self.cache_dir} was made for a different setup: {what}"


@dataclass(eq=False)
class RefSample:
    """One forget sample's reference targets, one row per answer token.

    Read back, ``topk_idx`` is int64 and ``topk_prob`` float32 (stored uint16/int32
    and float16) because that is what a gather over logits wants.
    """

    sample_id: str
    answer_ids: np.ndarray  # int32 [T]
    topk_idx: np.ndarray  # [T, K] vocabulary indices, most probable first
    topk_prob: np.ndarray  # [T, K]
    tail_mass: np.ndarray  # float32 [T]: 1 - sum(top-K) of the full averaged distribution
    entropy: np.ndarray  # float32 [T]: exact entropy (nats) of the full averaged distribution
    ref_logp_own: float | None = None
    ref_logp_idk: float | None = None
    pool_indices: np.ndarray | None = None  # int32 [k]: rows of sources["pool"]["files"] averaged over
    question: str | None = None  # the question text; with answer_ids and the template it rebuilds the input

    @property
    def num_tokens(self) -> int:
        return int(np.asarray(self.answer_ids).shape[0])


# ---------------------------------------------------------------- names, dtypes


def shard_name(index: int, num_shards: int) -> str:
    _check_shard_args(index, num_shards)
    return f"refs-{index:05d}-of-{num_shards:05d}.h5"


def index_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def _check_shard_args(index: int, num_shards: int) -> None:
    if not 1 <= num_shards <= 99999 or not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} of {num_shards} is out of range")


def _sidecar_path(shard_path: Path) -> Path:
    return shard_path.with_suffix(".json")


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


# ---------------------------------------------------------------- hashing & fingerprints


def hash_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def hash_json(obj) -> str:
    """sha256 of canonical JSON, so dict order and whitespace never change a hash."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hash_bytes(text.encode("utf-8"))


def hash_files(paths: Iterable, root=None) -> str:
    """Order-independent hash of a set of files.

    sha256 over the sorted (name, content sha256) pairs, where name is the path
    relative to ``root`` (posix separators) or, without ``root``, the basename.
    Names count (a renamed pool image can change which images a seed draws);
    where the tree lives does not, so a copied pool hashes the same.
    """
    entries = sorted((_relative_name(p, root), hash_file(p)) for p in paths)
    return hash_json(entries)


def _relative_name(path, root) -> str:
    path = Path(path)
    return path.relative_to(root).as_posix() if root is not None else path.name


def make_fingerprint(parts: Mapping[str, object]) -> dict:
    """{"digest": sha256 over the sorted parts, "parts": parts as strings}.

    Hashes of files go in as hex strings; short settings (k, K, seed, dtype) as
    their plain value (``str(5)``), so a mismatch message can show both values.
    ``format_version`` is added when absent, since it changes what is on disk.
    """
    parts = {str(k): str(v) for k, v in parts.items()}
    parts.setdefault("format_version", str(FORMAT_VERSION))
    return {"digest": hash_json(parts), "parts": parts}


def diff_fingerprints(expected: Mapping, actual: Mapping) -> list[str]:
    """Human messages naming each part where ``actual`` (the cache) differs."""
    exp, act = expected.get("parts", {}), actual.get("parts", {})
    messages = [_part_message(name, exp.get(name), act.get(name))
                for name in sorted(set(exp) | set(act)) if exp.get(name) != act.get(name)]
    if not messages and expected.get("digest") != actual.get("digest"):
        messages.append("fingerprint digest differs")
    return messages


def _part_message(name: str, expected: str | None, cached: str | None) -> str:
    label = _PART_LABELS.get(name, name)
    verb = "differ" if name in _PLURAL_LABELS else "differs"
    if cached is None:
        return f"{label} {verb} (not recorded in the cache)"
    if expected is None:
        return f"{label} {verb} (the cache records it, the expected setup does not)"
    if _is_plain(expected) and _is_plain(cached):
        return f"{label} {verb} (cache {cached}, expected {expected})"
    return f"{label} {verb}"


def _is_plain(value: str) -> bool:
    return len(value) <= 40 and not _HEX64.match(value) and value.split() == [value]


def check_fingerprint(cache_dir, expected: Mapping, actual: Mapping) -> None:
    if expected.get("digest") != actual.get("digest"):
        raise FingerprintMismatch(cache_dir, diff_fingerprints(expected, actual))


# ---------------------------------------------------------------- durable writes


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds: rename is the best we get
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_json(path: Path, obj) -> None:
    tmp = _tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)   # a full disk leaves nothing half-written behind
        raise
    _fsync_dir(path.parent)


def _remove_durably(paths: Iterable[Path]) -> None:
    removed = [p for p in paths if p.exists()]
    for path in removed:
        path.unlink()
    if removed:
        _fsync_dir(removed[0].parent)


def _read_json(path: Path):
    """Parsed JSON, or None for a file that is missing or not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- writing shards


def write_shard(cache_dir, index: int, num_shards: int, samples: list[RefSample], *,
                vocab_size: int, fingerprint: Mapping, settings: Mapping,
                sources: Mapping | None = None) -> dict:
    """Write one shard and then its completion record, both atomically.

    Returns the record {name, n_samples, n_tokens, bytes, sha256, fingerprint}.
    Any manifest.json in the directory is removed first; ``settings`` is stored
    with ``K`` and ``vocab_size`` filled in when absent; ``sources`` (what the
    cache was made from, see make_sources) is stored in the shard and the manifest.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / shard_name(index, num_shards)
    K = _validate_samples(samples, vocab_size, settings)
    settings = _complete_settings(settings, vocab_size, K)
    cache_dir.mkdir(parents=True, exist_ok=True)
    sidecar = _sidecar_path(path)
    # The manifest goes first: it no longer describes the shards. A leftover
    # *.tmp of this shard needs no removal, writing the new one truncates it.
    _remove_durably([cache_dir / MANIFEST, sidecar])
    attrs = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint["digest"],
             "fingerprint_parts": json.dumps(fingerprint.get("parts", {}), sort_keys=True),
             "settings": json.dumps(settings, sort_keys=True), "shard_index": index,
             "num_shards": num_shards, "vocab_size": int(vocab_size), "K": K}
    tmp = _tmp_path(path)
    try:
        _write_h5(tmp, samples, K, index_dtype(vocab_size), attrs, sources)
        _fsync_file(tmp)
        record = {"name": path.name, "n_samples": len(samples),
                  "n_tokens": sum(s.num_tokens for s in samples), "bytes": tmp.stat().st_size,
                  "sha256": hash_file(tmp), "fingerprint": dict(fingerprint)}
        os.replace(tmp, path)
        _fsync_dir(cache_dir)
        atomic_write_json(sidecar, record)
    except OSError as err:  # disk full, read-only directory: leave no half-written file behind
        for leftover in (tmp, _tmp_path(sidecar)):
            leftover.unlink(missing_ok=True)
        raise CacheError(f"cannot write shard {path}: {os_cause(err)}") from err
    return record


def os_cause(err: OSError) -> str:
    """The cause of an OSError in a few words ("No space left on device"), without its traceback noise."""
    cause = err.strerror or str(err)
    return " ".join(str(cause).split()) or type(err).__name__


def _complete_settings(settings: Mapping, vocab_size: int, K: int) -> dict:
    settings = json.loads(json.dumps(dict(settings)))  # what a reader will see
    settings.setdefault("vocab_size", int(vocab_size))
    settings.setdefault("K", K)
    return settings


def _validate_samples(samples: list[RefSample], vocab_size: int, settings: Mapping) -> int:
    """Check every sample; return the shared K."""
    if not 0 < vocab_size <= np.iinfo(np.int32).max:
        raise ValueError(f"vocab_size {vocab_size} is out of range")
    if not samples:  # a rank can own no samples; K must still be known for the attributes
        if "K" not in settings:
            raise ValueError("an empty shard needs settings['K']")
        return int(settings["K"])
    widths = {s.sample_id: _validate_sample(s, vocab_size) for s in samples}
    _validate_draws(samples)
    if len(widths) != len(samples):
        ids = [s.sample_id for s in samples]
        raise ValueError(f"duplicate sample_id in shard: {sorted({i for i in ids if ids.count(i) > 1})}")
    if len(set(widths.values())) > 1:
        raise ValueError(f"K differs between samples in one shard: {sorted(set(widths.values()))}")
    return next(iter(widths.values()))


def _validate_sample(s: RefSample, vocab_size: int) -> int:
    sid = s.sample_id
    if not isinstance(sid, str) or not sid:
        raise ValueError(f"sample_id must be a non-empty string, got {sid!r}")
    ids, idx = np.asarray(s.answer_ids), np.asarray(s.topk_idx)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"sample {sid!r} has an empty answer (answer_ids shape {ids.shape})")
    T, K = ids.shape[0], (idx.shape[1] if idx.ndim == 2 else 0)
    shapes = {"topk_idx": (T, K), "topk_prob": (T, K), "tail_mass": (T,), "entropy": (T,)}
    for name, shape in shapes.items():
        if np.shape(getattr(s, name)) != shape or K == 0:
            raise ValueError(f"sample {sid!r}: {name} has shape {np.shape(getattr(s, name))}, "
                             f"expected {shape} for {T} answer tokens and K >= 1")
    for name, arr in (("answer_ids", ids), ("topk_idx", idx)):
        if arr.dtype.kind not in "iu":
            raise ValueError(f"sample {sid!r}: {name} must be integers, got {arr.dtype}")
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise ValueError(f"sample {sid!r}: {name} has ids outside [0, {vocab_size})")
    for name in ("topk_prob", "tail_mass", "entropy"):
        if not np.all(np.isfinite(getattr(s, name))):
            raise ValueError(f"sample {sid!r}: {name} has NaN or infinite values")
    return idx.shape[1]


def _validate_draws(samples: list[RefSample]) -> None:
    """pool_indices: given for every sample or none, one length k, non-negative integers."""
    draws = [s.pool_indices for s in samples]
    if all(d is None for d in draws):
        return
    if any(d is None for d in draws):
        raise ValueError("pool_indices given for some samples of a shard but not all")
    shapes = {np.shape(d) for d in draws}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"pool_indices must all have one shape [k], got {sorted(shapes)}")
    for s in samples:
        d = np.asarray(s.pool_indices)
        if d.dtype.kind not in "iu" or (d.size and d.min() < 0):
            raise ValueError(f"sample {s.sample_id!r}: pool_indices must be non-negative integers")


def _token_columns(samples: list[RefSample], K: int, idx_dtype: np.dtype) -> dict:
    def cat(name, dtype, width=None):
        shape = (0,) if width is None else (0, width)
        parts = [np.asarray(getattr(s, name)) for s in samples]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)
    return {"answer_ids": cat("answer_ids", np.int32), "topk_idx": cat("topk_idx", idx_dtype, K),
            "topk_prob": cat("topk_prob", np.float16, K), "tail_mass": cat("tail_mass", np.float32),
            "entropy": cat("entropy", np.float32)}


def _write_h5(path: Path, samples: list[RefSample], K: int, idx_dtype: np.dtype, attrs: dict,
              sources: Mapping | None = None) -> None:
    offsets = np.zeros(len(samples) + 1, np.int64)
    offsets[1:] = np.cumsum([s.num_tokens for s in samples])
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs)
        _create_checked(f, "sample_id", _sample_id_column(samples))
        _create_checked(f, "offsets", offsets)
        for name, column in _token_columns(samples, K, idx_dtype).items():
            _create_token_dataset(f, name, column)
        for name in _SAMPLE_FIELDS:
            values = [getattr(s, name) for s in samples]
            if any(v is not None for v in values):
                _create_checked(f, name, np.array([np.nan if v is None else v for v in values], np.float32))
        _write_provenance(f, samples, sources)


def _write_provenance(f: h5py.File, samples: list[RefSample], sources: Mapping | None) -> None:
    """Per-sample pool draws and questions, and the sources record: what an auditor needs.

    All checksummed like the rest: fixed-length utf-8 questions, and the sources JSON
    as utf-8 bytes (a uint8 dataset; an attribute would stop at 64 KiB).
    """
    draws = [s.pool_indices for s in samples]
    if samples and all(d is not None for d in draws):
        _create_checked(f, "pool_indices", np.stack([np.asarray(d, np.int32) for d in draws]))
    questions = [s.question for s in samples]
    if samples and all(q is not None for q in questions):
        encoded = [q.encode("utf-8") for q in questions]
        width = max(max(len(b) for b in encoded), 1)
        _create_checked(f, "question", np.array(encoded, dtype=h5py.string_dtype("utf-8", width)))
    if sources is not None:
        data = json.dumps(sources, sort_keys=True).encode("utf-8")
        _create_checked(f, "sources", np.frombuffer(data, np.uint8))


def _read_sources(f: h5py.File) -> dict | None:
    return json.loads(f["sources"][()].tobytes().decode("utf-8")) if "sources" in f else None


def _sample_id_column(samples: list[RefSample]) -> np.ndarray:
    """Fixed-length utf-8 strings: HDF5 cannot checksum variable-length ones (they live in a heap)."""
    encoded = [s.sample_id.encode("utf-8") for s in samples]
    width = max((len(b) for b in encoded), default=1)
    return np.array(encoded, dtype=h5py.string_dtype("utf-8", width))


def _create_checked(f: h5py.File, name: str, data: np.ndarray, **filters) -> None:
    """A chunked dataset with HDF5's Fletcher32 checksum on every chunk.

    A damaged chunk then fails with an OSError wherever it is read, not only
    when `viker cache verify` hashes the whole file. An empty extent cannot be
    chunked unless the dataset is resizable, hence the maxshape.
    """
    rows = min(max(data.shape[0], 1), _CHUNK_ROWS)
    f.create_dataset(name, data=data, chunks=(rows,) + data.shape[1:], maxshape=(None,) + data.shape[1:],
                     fletcher32=True, **filters)


def _create_token_dataset(f: h5py.File, name: str, data: np.ndarray) -> None:
    _create_checked(f, name, data, compression="gzip", compression_opts=4, shuffle=True)


# ---------------------------------------------------------------- resume & merge


def finished_shards(cache_dir, num_shards: int, fingerprint_digest: str) -> set[int]:
    """Indices of shards that are completely written for this fingerprint."""
    cache_dir = Path(cache_dir)
    return {i for i in range(num_shards)
            if _unfinished_reason(cache_dir, i, num_shards, fingerprint_digest) is None}


def _unfinished_reason(cache_dir: Path, index: int, num_shards: int, digest: str) -> str | None:
    path = cache_dir / shard_name(index, num_shards)
    if not path.is_file():
        return "missing"
    record = _read_json(_sidecar_path(path))
    if not isinstance(record, dict):
        return "no completion record"
    if (record.get("fingerprint") or {}).get("digest") != digest:
        return "made for a different fingerprint"
    if record.get("bytes") != path.stat().st_size or record.get("sha256") != hash_file(path):
        return "checksum differs from its completion record"
    return None


def finalize(cache_dir, num_shards: int, fingerprint: Mapping, settings: Mapping) -> dict:
    """Check that all shards are finished and agree, then write manifest.json last."""
    cache_dir = Path(cache_dir)
    reasons = {i: _unfinished_reason(cache_dir, i, num_shards, fingerprint["digest"])
               for i in range(num_shards)}
    missing = {i: r for i, r in reasons.items() if r is not None}
    if missing:
        listed = ", ".join(f"{i} ({shard_name(i, num_shards)}: {r})" for i, r in missing.items())
        raise CacheError(f"cannot finalize {cache_dir}: {len(missing)} of {num_shards} shards "
                         f"unfinished: {listed}")
    names = [shard_name(i, num_shards) for i in range(num_shards)]
    stored = _shards_settings(cache_dir, names, settings)
    records = [_read_json(_sidecar_path(cache_dir / n)) for n in names]
    shards = [{k: r[k] for k in ("name", "n_samples", "n_tokens", "bytes", "sha256")} for r in records]
    sources = _shards_sources(cache_dir, names)
    manifest = {"format_version": FORMAT_VERSION, "fingerprint": dict(fingerprint),
                "settings": stored, "sources": sources, "shards": shards,
                "totals": {k: sum(s[k] for s in shards) for k in ("n_samples", "n_tokens", "bytes")}}
    if sources is not None and "dropped" in sources:
        # The shards carry it in their sources (merge builds the manifest from shards alone);
        # the manifest shows it at the top, where an auditor looks first, and once.
        manifest["sources"] = {k: v for k, v in sources.items() if k != "dropped"}
        manifest["dropped"] = sources["dropped"]
    atomic_write_json(cache_dir / MANIFEST, manifest)
    return manifest


def _shards_settings(cache_dir: Path, names: list[str], settings: Mapping) -> dict:
    """The settings all shards share; refuse shards that disagree or duplicate ids."""
    stored, seen = [], {}
    for name in names:
        with _open_h5(cache_dir / name) as f:
            stored.append(json.loads(f.attrs["settings"]))
            for sid in f["sample_id"].asstr()[()]:
                if seen.setdefault(sid, name) != name:
                    raise CacheError(f"sample {sid!r} is in both {seen[sid]} and {name}")
    if any(s != stored[0] for s in stored):
        raise CacheError(f"shards in {cache_dir} were written with different settings")
    given = json.loads(json.dumps(dict(settings)))
    differing = sorted(k for k in given if given[k] != stored[0].get(k))
    if differing:
        raise CacheError(f"settings given to finalize differ from the shards' on: {', '.join(differing)}")
    return stored[0]


def _shards_sources(cache_dir: Path, names: list[str]) -> dict | None:
    """The sources record all shards carry (None for shards written without one)."""
    found = []
    for name in names:
        with _open_h5(cache_dir / name) as f:
            found.append(_read_sources(f))
    if any(s != found[0] for s in found):
        raise CacheError(f"shards in {cache_dir} record different sources (model, pool or template)")
    return found[0]


def merge(cache_dir) -> dict:
    """finalize() with num_shards, fingerprint and settings read from the shards themselves."""
    cache_dir = Path(cache_dir)
    records = {}
    for path in sorted(cache_dir.glob("refs-*-of-*.json")):
        m, record = _SIDECAR_RE.match(path.name), _read_json(path)
        if m and isinstance(record, dict):
            records[(int(m[1]), int(m[2]))] = record
    if not records:
        raise CacheError(f"no completed shards in {cache_dir}: nothing to merge")
    counts = sorted({n for _, n in records})
    if len(counts) > 1:
        raise CacheError(f"{cache_dir} mixes runs with {counts} shards: remove the stale ones")
    digests = sorted({(r.get("fingerprint") or {}).get("digest") or "?" for r in records.values()})
    if len(digests) > 1:
        short = ", ".join(d[:12] for d in digests)
        raise CacheError(f"shards in {cache_dir} were made for different setups "
                         f"(fingerprints {short}): remove the stale ones")
    (index, num_shards), record = next(iter(records.items()))
    with _open_h5(cache_dir / record["name"]) as f:
        settings = json.loads(f.attrs["settings"])
    return finalize(cache_dir, num_shards, record["fingerprint"], settings)


# ---------------------------------------------------------------- reading


def _open_h5(path: Path) -> h5py.File:
    # No file locking: readers never see files being written (those are *.tmp),
    # and locks fail on many shared filesystems.
    return h5py.File(path, "r", locking=False, rdcc_nbytes=_READ_CACHE_BYTES)


def _load_manifest(cache_dir: Path) -> dict:
    path = cache_dir / MANIFEST
    if not path.is_file():
        raise CacheError(f"no manifest.json in {cache_dir}: run viker precompute "
                         f"(or viker cache merge) first")
    manifest = _read_json(path)
    if not (isinstance(manifest, dict) and isinstance(manifest.get("fingerprint"), dict)
            and isinstance(manifest.get("settings"), dict) and isinstance(manifest.get("shards"), list)
            and all(isinstance(e, dict) for e in manifest["shards"])):
        raise CacheError(f"manifest.json in {cache_dir} is not a valid cache manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"reference cache {cache_dir} has format version "
                         f"{manifest.get('format_version')}; this viker reads version "
                         f"{FORMAT_VERSION} (which records each sample's reference images): "
                         f"recompute it with viker precompute")
    return manifest


def _check_directory(cache_dir: Path, manifest: dict) -> None:
    """What verify rejects is not trained on: shards of another run or stray files beside the cache."""
    problems = [p for p in _directory_problems(cache_dir, manifest) if not p.startswith("warning:")]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CacheError(f"reference cache {cache_dir}: {problems[0]}{more}; remove it or run viker cache verify")


def _check_manifest_digest(cache_dir: Path, manifest: dict) -> None:
    """A hand-edited fingerprint part (k, seed, ...) no longer hashes to the recorded digest."""
    fp = manifest["fingerprint"]
    if hash_json(fp.get("parts")) != fp.get("digest"):
        raise CacheError(f"manifest.json in {cache_dir} was modified: its fingerprint digest does not "
                         f"match its parts; run viker cache verify")


def _attribute_problems(f: h5py.File, manifest: dict) -> list[str]:
    """What the manifest says about the settings, against what the shard itself records."""
    try:
        stored = json.loads(f.attrs.get("settings", "null"))
    except ValueError:
        stored = None
    if stored == manifest["settings"]:
        return []
    if not isinstance(stored, dict):
        return ["its settings attribute is missing or unreadable"]
    keys = sorted(k for k in set(stored) | set(manifest["settings"])
                  if stored.get(k) != manifest["settings"].get(k))
    shown = ", ".join(f"{k} (manifest {manifest['settings'].get(k)!r}, shard {stored.get(k)!r})" for k in keys[:3])
    return [f"its settings attribute differs from the manifest's on {shown}"]


def _shard_sha256(path: Path, verify: bool | str) -> str:
    return filememo.memo_file_hash(path) if verify == "memo" else filememo.hash_file(path)


def _check_shard_file(cache_dir: Path, entry: Mapping, verify: bool | str) -> Path:
    name = str(entry.get("name"))
    if not _SHARD_RE.match(name):
        raise CacheError(f"manifest of {cache_dir} lists {name!r}, not a shard file name")
    path = cache_dir / name
    if not path.is_file():
        raise CacheError(f"shard {name} listed in the manifest of {cache_dir} is missing")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise CacheError(f"shard {name} in {cache_dir} is {size} bytes, the manifest says "
                         f"{entry.get('bytes')}: truncated or modified; run viker cache verify")
    if verify and _shard_sha256(path, verify) != entry.get("sha256"):
        raise CacheError(f"shard {name} in {cache_dir} does not match its sha256 in the manifest "
                         f"(corrupted or modified): run viker cache verify")
    return path


def _structure_problems(f: h5py.File, entry: Mapping, digest: str) -> list[str]:
    """Inconsistencies inside one open shard, relative to its manifest entry."""
    missing = [n for n in ("sample_id", "offsets", *_TOKEN_FIELDS) if n not in f]
    if missing:
        return [f"missing datasets: {', '.join(missing)}"]
    n, rows, K = f["sample_id"].shape[0], f["answer_ids"].shape[0], f.attrs.get("K")
    offsets = f["offsets"][()]
    problems = []
    if offsets.shape != (n + 1,):
        problems.append(f"offsets has {offsets.shape[0]} entries for {n} samples")
    elif offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] != rows:
        problems.append(f"offsets do not rise from 0 to the {rows} token rows")
    problems += [f"{name} has {f[name].shape[0]} rows, answer_ids {rows}"
                 for name in _TOKEN_FIELDS if f[name].shape[0] != rows]
    problems += [f"{name} has shape {f[name].shape}, K is {K}"
                 for name in ("topk_idx", "topk_prob") if f[name].shape[1:] != (K,)]
    problems += [f"{name} has {f[name].shape[0]} values for {n} samples"
                 for name in _SAMPLE_FIELDS if name in f and f[name].shape != (n,)]
    problems += _provenance_problems(f, n)
    if f.attrs.get("fingerprint") != digest:
        problems.append("its fingerprint attribute differs from the manifest's")
    if (n, rows) != (entry.get("n_samples"), entry.get("n_tokens")):
        problems.append(f"holds {n} samples / {rows} tokens, the manifest says "
                        f"{entry.get('n_samples')} / {entry.get('n_tokens')}")
    return problems


def _provenance_problems(f: h5py.File, n: int) -> list[str]:
    problems = [f"{name} has {f[name].shape[0]} rows for {n} samples"
                for name in ("pool_indices", "question") if name in f and f[name].shape[0] != n]
    if "pool_indices" in f and f["pool_indices"].ndim != 2:
        problems.append(f"pool_indices has shape {f['pool_indices'].shape}, expected [samples, k]")
    return problems


class RefCacheReader:
    """Random access to a finished cache by sample id.

    Opening reads only the manifest and each shard's small ``sample_id`` and
    ``offsets`` datasets; ``get`` reads just that sample's rows. HDF5 handles
    open lazily and are reopened in a new process (DataLoader workers after
    fork), and the reader pickles without them. Shard sizes are always checked
    against the manifest, and so is every shard's sha256: hashed in full the
    first time this file version is opened, then remembered by
    ``filememo.memo_file_hash`` (path, size, mtime, inode), so a second run
    pays one small JSON read per shard. ``verify=True`` hashes again regardless
    of the memo; ``verify=False`` skips the sha256 (tools that only look).
    Every dataset carries HDF5's Fletcher32 checksum, so a chunk damaged after
    the sha256 was remembered still fails when it is read (``get`` raises
    CacheError). The manifest's settings and fingerprint must equal each
    shard's own attributes.
    """

    def __init__(self, cache_dir, expected_fingerprint: Mapping | None = None, *,
                 verify: bool | str = "memo"):
        self.cache_dir = Path(cache_dir)
        self._manifest = _load_manifest(self.cache_dir)
        _check_manifest_digest(self.cache_dir, self._manifest)
        if expected_fingerprint is not None:
            check_fingerprint(self.cache_dir, expected_fingerprint, self._manifest["fingerprint"])
        self._paths = [_check_shard_file(self.cache_dir, e, verify) for e in self._manifest["shards"]]
        if verify:
            _check_directory(self.cache_dir, self._manifest)
        # A compact index (sorted utf-8 ids + int arrays, ~40 bytes per sample instead of a dict's
        # ~300), so a reader over millions of samples stays small in every DataLoader worker.
        ids, shard, row, self._offsets = [], [], [], []
        for pos, entry in enumerate(self._manifest["shards"]):
            shard_ids, offsets = self._index_shard(pos, entry)
            ids.append(shard_ids)
            shard.append(np.full(len(shard_ids), pos, np.int32))
            row.append(np.arange(len(shard_ids), dtype=np.int32))
            self._offsets.append(offsets)
        ids = np.concatenate(ids) if ids else np.zeros(0, "S1")
        order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[order]
        self._shard = np.concatenate(shard)[order] if shard else np.zeros(0, np.int32)
        self._row = np.concatenate(row)[order] if row else np.zeros(0, np.int32)
        dup = np.flatnonzero(self._sorted_ids[1:] == self._sorted_ids[:-1])
        if dup.size:
            sid = self._sorted_ids[dup[0]].decode("utf-8")
            raise CacheError(f"sample {sid!r} appears twice in {self.cache_dir}")
        self._files: dict[int, h5py.File] = {}
        self._blocks: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def _index_shard(self, pos: int, entry: Mapping) -> tuple[np.ndarray, np.ndarray]:
        """(ids as fixed-width utf-8 bytes, offsets) of one shard, after checking its structure."""
        path = self._paths[pos]
        try:
            with _open_h5(path) as f:
                columns = {}
                for name in ("sample_id", "offsets"):   # before the structure check: a damaged chunk is named
                    try:
                        columns[name] = f[name][()] if name in f else None
                    except (OSError, ValueError) as err:
                        raise damaged(self.cache_dir, path.name, name, err) from err
                problems = _structure_problems(f, entry, self._manifest["fingerprint"]["digest"])
                problems += _attribute_problems(f, self._manifest)
                if problems:
                    raise CacheError(f"shard {path.name} in {self.cache_dir} is corrupt: "
                                     + "; ".join(problems))
                raw, offsets = columns["sample_id"], columns["offsets"]
        except (OSError, KeyError, ValueError) as err:
            raise CacheError(f"shard {path.name} in {self.cache_dir} cannot be read: {err}") from err
        encoded = [x if isinstance(x, bytes) else str(x).encode("utf-8") for x in raw]
        return np.array(encoded, dtype="S") if encoded else np.zeros(0, "S1"), offsets.astype(np.int64)

    def _find(self, sample_id) -> int | None:
        if not isinstance(sample_id, str):
            return None
        key = sample_id.encode("utf-8")
        i = int(np.searchsorted(self._sorted_ids, key))
        if i < len(self._sorted_ids) and self._sorted_ids[i] == key and not key.endswith(b"\0"):
            return i
        return None

    # -- mapping-like access
    def __len__(self) -> int:
        return len(self._sorted_ids)

    def __contains__(self, sample_id) -> bool:
        return self._find(sample_id) is not None

    def __iter__(self):
        return iter(self.sample_ids)

    @property
    def sample_ids(self) -> list[str]:
        """Every id in shard order (built on demand: the reader keeps only the compact index)."""
        return list(self.iter_sample_ids())

    def iter_sample_ids(self):
        """Every id in shard order, one at a time (no list of N strings)."""
        for i in np.lexsort((self._row, self._shard)):
            yield self._sorted_ids[i].decode("utf-8")

    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def settings(self) -> dict:
        return self._manifest["settings"]

    @property
    def fingerprint(self) -> dict:
        return self._manifest["fingerprint"]

    @property
    def sources(self) -> dict:
        """What the cache was made from (make_sources); {} for a cache written without it."""
        return self._manifest.get("sources") or {}

    def locate(self, sample_id: str) -> tuple[int, int, int, int]:
        """(shard position, row, first token row, end token row) of a sample."""
        i = self._find(sample_id)
        if i is None:
            raise KeyError(f"sample {sample_id!r} is not in reference cache {self.cache_dir}")
        pos, row = int(self._shard[i]), int(self._row[i])
        return pos, row, int(self._offsets[pos][row]), int(self._offsets[pos][row + 1])

    def slot(self, sample_id: str) -> int:
        """The sample's place in this reader's index: a 4-byte handle that stands for its id (KeyError if absent)."""
        i = self._find(sample_id)
        if i is None:
            raise KeyError(f"sample {sample_id!r} is not in reference cache {self.cache_dir}")
        return i

    def sample_id_at(self, slot: int) -> str:
        return self._sorted_ids[slot].decode("utf-8")

    def slot_locations(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard positions, rows) of many slots at once, as int32 arrays."""
        return self._shard[slots], self._row[slots]

    def shard_column(self, pos: int, name: str) -> np.ndarray | None:
        """One whole dataset of shard `pos` (e.g. answer_ids, offsets), or None where it is absent."""
        f = self._file(pos)
        return self._read(pos, name, lambda d: d[()]) if name in f else None

    def _read(self, pos: int, name: str, how):
        """how(dataset) of one dataset of shard `pos`; a damaged chunk becomes a CacheError naming shard and dataset."""
        try:
            return how(self._file(pos)[name])
        except (OSError, ValueError) as err:   # h5py: "filter returned failure during read" (Fletcher32, gzip)
            raise damaged(self.cache_dir, self._paths[pos].name, name, err) from err

    def get(self, sample_id: str, stored: bool = False) -> RefSample:
        """The sample's references; `stored`: topk_idx and topk_prob left as stored (uint16/int32, float16),
        a third of the bytes for a DataLoader worker to hand over (widening them later is exact)."""
        pos, row, _, _ = self.locate(sample_id)
        block = self._block(pos, row // _BLOCK_SAMPLES)
        i = row - block["first"]
        a, b = block["offsets"][i] - block["offsets"][0], block["offsets"][i + 1] - block["offsets"][0]
        extra = {name: _nan_to_none(block[name][i]) if block[name] is not None else None
                 for name in _SAMPLE_FIELDS}
        extra["pool_indices"] = block["pool_indices"][i] if block["pool_indices"] is not None else None
        extra["question"] = block["question"][i] if block["question"] is not None else None
        idx, prob = block["topk_idx"][a:b], block["topk_prob"][a:b]
        if not stored:
            idx, prob = idx.astype(np.int64), prob.astype(np.float32)
        return RefSample(sample_id, block["answer_ids"][a:b], idx, prob, block["tail_mass"][a:b],
                         block["entropy"][a:b], **extra)

    def _block(self, pos: int, number: int) -> dict:
        """Rows [number * B, (number + 1) * B) of shard `pos`, every dataset read in one slice.

        One h5py read costs ~0.1-0.5 ms whatever its size, so per-sample reads
        cap streaming at a few hundred samples/s; the shuffle visits a block's
        samples together (stream.Stream windows), so one read serves them all.
        """
        self._check_process()
        key = (pos, number)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        f = self._file(pos)
        first = number * _BLOCK_SAMPLES
        offsets = self._offsets[pos][first: first + _BLOCK_SAMPLES + 1]
        a, b = int(offsets[0]), int(offsets[-1])
        last = first + len(offsets) - 1
        block = {name: self._read(pos, name, lambda d: d[a:b]) for name in _TOKEN_FIELDS}
        for name in (*_SAMPLE_FIELDS, "pool_indices"):
            block[name] = self._read(pos, name, lambda d: d[first:last]) if name in f else None
        block["question"] = self._read(pos, "question", lambda d: d.asstr()[first:last]) if "question" in f else None
        block.update(first=first, offsets=offsets)
        self._blocks[key] = block
        while len(self._blocks) > _MAX_BLOCKS:
            self._blocks.popitem(last=False)
        return block

    # -- handles
    def _check_process(self) -> None:
        if self._pid != os.getpid():  # inherited handles belong to the parent: never share them
            self._close_handles()
            self._blocks = OrderedDict()
            self._pid = os.getpid()

    def _file(self, pos: int) -> h5py.File:
        self._check_process()
        if pos not in self._files:
            # Each open file holds a chunk cache per dataset: keep a few open, so memory
            # does not grow with the number of shards a run has touched.
            while len(self._files) >= _MAX_OPEN_FILES:
                oldest = next(iter(self._files))
                self._files.pop(oldest).close()
            self._files[pos] = _open_h5(self._paths[pos])
        return self._files[pos]

    def _close_handles(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # a handle from another process may already be invalid
                pass
        self._files = {}

    def close(self) -> None:
        self._close_handles()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"], state["_blocks"] = {}, None, OrderedDict()
        return state


def damaged(cache_dir, shard: str, dataset: str, err: Exception) -> CacheError:
    """The one-line error of a dataset that cannot be read: which shard, which dataset, what to do.

    Raised wherever training reads the cache, a DataLoader worker included
    (stream.ExampleData carries it to the loop as this line).
    """
    cause = " ".join(str(err).split()) or type(err).__name__
    return CacheError(f"shard {shard} in {cache_dir}: dataset {dataset} cannot be read ({cause}; the file is "
                      f"damaged): run viker cache verify {cache_dir}, then recompute that shard (delete it and "
                      f"its .json, rerun viker precompute)")


def _nan_to_none(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


# ---------------------------------------------------------------- verify


def verify_cache(cache_dir, quick: bool = False) -> list[str]:
    """Every problem found in a cache directory; an empty list means it is sound.

    Every dataset of every shard is read in full, so each chunk's Fletcher32
    checksum is checked (a sha256 that was rewritten along with the damage would
    not catch it), and so are the format's value ranges (read_problems).
    `quick`: sha256 and structure only, no chunk read (large caches).
    """
    cache_dir = Path(cache_dir)
    try:
        manifest = _load_manifest(cache_dir)
    except CacheError as err:
        return [str(err)]
    problems = _manifest_problems(manifest)
    for entry in manifest["shards"]:
        problems += [f"{entry.get('name')}: {p}" for p in _shard_problems(cache_dir, entry, manifest, quick)]
    problems += _duplicate_id_problems(cache_dir, manifest)
    problems += _directory_problems(cache_dir, manifest)
    return problems


def _manifest_problems(manifest: dict) -> list[str]:
    problems = []
    fp = manifest["fingerprint"]
    if hash_json(fp.get("parts")) != fp.get("digest"):
        problems.append("manifest: fingerprint digest does not match its parts")
    shards = manifest["shards"]
    keys = ("n_samples", "n_tokens", "bytes")
    try:
        totals = {k: sum(s[k] for s in shards) for k in keys}
    except (KeyError, TypeError):
        return problems + ["manifest: shard entries lack counts"]
    if totals != {k: (manifest.get("totals") or {}).get(k) for k in keys}:
        problems.append(f"manifest: totals {manifest.get('totals')} != sum over shards {totals}")
    return problems


def _shard_problems(cache_dir: Path, entry: Mapping, manifest: dict, quick: bool = False) -> list[str]:
    try:
        path = _check_shard_file(cache_dir, entry, verify=False)
    except CacheError as err:
        return [str(err)]
    if hash_file(path) != entry.get("sha256"):
        return ["sha256 differs from the manifest (corrupted or modified)"]
    try:
        with _open_h5(path) as f:
            unreadable, out_of_range = ([], []) if quick else read_problems(f, manifest["settings"])
            if unreadable:   # the structure check would stumble on the same chunks
                return unreadable
            problems = _structure_problems(f, entry, manifest["fingerprint"].get("digest"))
            problems += _attribute_problems(f, manifest)
            return problems + out_of_range
    except (OSError, KeyError, ValueError) as err:
        return [f"unreadable HDF5: {err}"]


_READ_ROWS = 1 << 16   # rows verify reads at a time: memory stays flat whatever shard_size made the shard
_PROB_SLACK = 1e-2     # float16 rounding of K probabilities (~K * 2**-12) and the tail's own rounding


def read_problems(f: h5py.File, settings: Mapping) -> tuple[list[str], list[str]]:
    """Read every dataset of an open shard in full: (datasets that cannot be read, values outside the ranges).

    One line per dataset at most. Reading is what checks each chunk's Fletcher32
    checksum (h5py reports a mismatch as a filter failure); the ranges are those
    of docs/CACHE_FORMAT.md: token ids below the vocabulary size, probabilities
    and the tail in [0, 1] with each row's top-K summing to at most 1, entropy
    finite and >= 0, log-likelihoods <= 0 or NaN, pool rows inside the pool.
    """
    vocab = int(f.attrs.get("vocab_size", settings.get("vocab_size", 0)) or 0)
    pool_size = int(settings.get("pool_size") or 0)
    unreadable, out_of_range = [], []
    for name in f:
        dataset = f[name]
        if not isinstance(dataset, h5py.Dataset):
            continue
        try:
            bad = None
            for start in range(0, max(dataset.shape[0], 1), _READ_ROWS):   # every block: each one's checksums
                block = dataset[start: start + _READ_ROWS]
                bad = bad or _range_problem(name, block, start, vocab, pool_size)
        except (OSError, ValueError) as err:
            unreadable.append(_unreadable(name, err))
            continue
        if bad:
            out_of_range.append(f"dataset {name}: {bad}; recompute this shard")
    return unreadable, out_of_range


def _unreadable(dataset: str, err: Exception) -> str:
    cause = " ".join(str(err).split()) or type(err).__name__
    return (f"dataset {dataset} cannot be read ({cause}): a chunk fails its Fletcher32 checksum or "
            f"decompression, the file is damaged; recompute this shard")


def _range_problem(name: str, block: np.ndarray, start: int, vocab: int, pool_size: int) -> str | None:
    """The first value of one block outside its dataset's range, described; None when all are inside."""
    def first(mask, what, values=block):
        if not mask.any():
            return None
        at = np.unravel_index(int(np.argmax(mask)), mask.shape)
        return f"{int(mask.sum())} value(s) {what}, first at row {start + int(at[0])} ({values[at]})"
    if name in ("answer_ids", "topk_idx") and vocab:
        return first((block < 0) | (block >= vocab), f"outside [0, {vocab})")
    if name == "topk_prob":
        prob = block.astype(np.float32)
        found = first(~np.isfinite(prob) | (prob < 0) | (prob > 1), "outside [0, 1]")
        mass = prob.sum(axis=-1)
        return found or first(mass > 1 + _PROB_SLACK, "of top-K mass above 1", mass)
    if name == "tail_mass":
        return first(~np.isfinite(block) | (block < 0) | (block > 1 + _PROB_SLACK), "outside [0, 1]")
    if name == "entropy":
        top = np.log(vocab) + _PROB_SLACK if vocab else np.inf
        return first(~np.isfinite(block) | (block < -_PROB_SLACK) | (block > top), "outside [0, log(vocab)]")
    if name in _SAMPLE_FIELDS:
        return first(np.isinf(block) | (block > _PROB_SLACK), "not a log-likelihood (<= 0, or NaN)")
    if name == "pool_indices" and pool_size:
        return first((block < 0) | (block >= pool_size), f"outside the pool's [0, {pool_size})")
    return None


def _duplicate_id_problems(cache_dir: Path, manifest: dict) -> list[str]:
    seen, problems = {}, []
    for entry in manifest["shards"]:
        try:
            with _open_h5(cache_dir / entry["name"]) as f:
                ids = f["sample_id"].asstr()[()]
        except (OSError, KeyError, ValueError):
            continue  # already reported by _shard_problems
        for sid in ids:
            if seen.setdefault(sid, entry["name"]) != entry["name"]:
                problems.append(f"sample {sid!r} is in both {seen[sid]} and {entry['name']}")
    return problems


def _directory_problems(cache_dir: Path, manifest: dict) -> list[str]:
    """Every file the manifest does not account for: a cache directory holds one cache and nothing else."""
    listed = {str(e.get("name")) for e in manifest["shards"]}
    expected = {MANIFEST} | listed | {_sidecar_path(Path(n)).name for n in listed}
    problems = []
    for path in sorted(cache_dir.iterdir()):
        if path.name in expected:
            continue
        if path.suffix == ".tmp":
            problems.append(f"warning: stray temporary file {path.name} "
                            f"(left by an interrupted run; safe to delete)")
        elif _SHARD_RE.match(path.name):
            problems.append(f"extra shard file {path.name} is not listed in the manifest")
        elif _SIDECAR_RE.match(path.name):
            problems.append(f"extra completion record {path.name} belongs to no shard in the manifest")
        else:
            kind = "directory" if path.is_dir() else "file"
            problems.append(f"unexpected {kind} {path.name} is not part of the cache")
    return problems


# ---------------------------------------------------------------- sources: what a cache was made from

# How to read the numbers without this code (recorded in every manifest).
UNITS = {
    "entropy": "nats (natural log) of the full averaged distribution R_i, before truncation",
    "topk_prob": "probabilities of R_i (float16), most probable first; R_i = mean over the k images "
                 "of softmax(logits) at answer position i, teacher-forced on the ground-truth prefix",
    "topk_idx": "vocabulary ids of those probabilities",
    "tail_mass": "1 - sum of the top-K probabilities of R_i (float32, before float16 rounding)",
    "ref_logp_own": "nats: summed log-probability of the answer on the sample's own image",
    "ref_logp_idk": "nats: summed log-probability of the idk answer on the sample's own image",
    "pool_indices": "rows of sources.pool.files (sorted by name) whose images were averaged",
}


def pool_entries(paths: Iterable, root=None) -> list[list[str]]:
    """[[name, sha256], ...] sorted by name: the pool as a cache records it (hash_files hashes this)."""
    return sorted([_relative_name(p, root), hash_file(p)] for p in paths)


def make_sources(model_path, model_parts: Mapping[str, str], pool_path, pool: list | None,
                 template: Mapping) -> dict:
    """The manifest's record of inputs: each path as given and as content hashes.

    ``model_parts``: config / weights / tokenizer hashes (fingerprint.model_parts);
    ``pool``: pool_entries() of the reference pool, or None (own-image references);
    ``template``: the prompt template text and how it is tokenised.
    """
    return {"model": {"path": str(model_path), **{k: str(v) for k, v in model_parts.items()}},
            "pool": None if pool is None else {"path": str(pool_path), "files": [list(e) for e in pool],
                                               "sha256": hash_json([list(e) for e in pool])},
            "prompt_template": dict(template), "units": dict(UNITS)}


def source_problems(sources: Mapping, model_parts: Mapping[str, str] | None,
                    pool: list | None) -> list[str]:
    """Where this machine's model (its model_parts) and pool (pool_entries) differ from a cache's sources."""
    if not sources:
        return ["the manifest records no sources (written before format 2): recompute the cache"]
    problems = []
    if model_parts is not None:
        recorded = sources.get("model") or {}
        for name, value in sorted(model_parts.items()):
            if recorded.get(name) != value:
                problems.append(f"{_PART_LABELS.get(name, name)} differ from the cache's "
                                f"(made from {recorded.get('path')!r})")
    if pool is not None:
        problems += _pool_problems(sources.get("pool"), pool)
    return problems


def _pool_problems(recorded: Mapping | None, pool: list) -> list[str]:
    if recorded is None:
        return ["the cache used each sample's own image (reference=own), not a pool"]
    mine = {name: digest for name, digest in pool}
    theirs = {name: digest for name, digest in recorded.get("files", [])}
    problems = [f"pool image {n} is missing here" for n in sorted(set(theirs) - set(mine))]
    problems += [f"pool image {n} is not in the cache's pool (it would shift every draw)"
                 for n in sorted(set(mine) - set(theirs))]
    problems += [f"pool image {n} differs (sha256 {mine[n][:12]} here, {theirs[n][:12]} in the cache)"
                 for n in sorted(set(mine) & set(theirs)) if mine[n] != theirs[n]]
    return problems
