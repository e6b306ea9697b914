"""What the training loop reads: the examples, tokenised as stage one did, and the reference cache, checked.

With a cache the forget (and idk) examples hold no tokens: a CachedExamples
keeps a slot and an image row per sample and rebuilds a batch's token ids
from what the cache stores (the prompt from its question, the answer from
its answer ids). Without one they are tokenised once at setup into an
ExampleTable. Either way a cache made for another model, tokenizer, prompt,
forget set, pool or settings is refused here, before the loop, with an error
that names what differs; so is a forget sample whose cached tokens are not
this run's.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.fingerprint import pool_files, training_fingerprint
from pipeline.cache.refcache import RefCacheReader, RefSample, check_fingerprint, hash_files
from pipeline.data.records import Sample
from pipeline.models.encoding import encode_pair, encode_prompt, load_image, max_positions, pixel_values
from pipeline.models.prompts import train_prompt, train_text
from pipeline.stage1.precompute import encode_samples

from .errors import TrainError


@dataclass(slots=True)   # one per forget sample: no per-object __dict__
class Example:
    sample_id: str
    ids: np.ndarray         # int32 prompt + answer ids, image tokens expanded
    start: int              # first answer token
    image: int              # row of the image bank


class ExampleTable:
    """Many Examples stored column-wise: one flat token array plus offsets, starts, image rows and ids.

    A list of Example objects cost ~530 B per forget sample (numpy object, slots
    object, id string); at 200k samples that alone moved stage two's peak memory
    by a third. Here a sample costs its tokens (uint16 when the vocabulary fits,
    as LLaVA's 32k does) plus 12 bytes (int32 offset, start, image row) and its id's bytes. It reads like the list
    it replaces: len(), table[i] (a fresh Example with int32 ids) and iteration.
    """

    CHUNK = 4096   # examples per packed chunk: the build holds at most one chunk as objects

    def __init__(self, examples=()):
        # Kept as chunks, never concatenated: joining them would hold the table twice at its peak.
        self.chunks: list[dict[str, np.ndarray]] = []
        pending: list[Example] = []
        for ex in examples:
            pending.append(ex)
            if len(pending) == self.CHUNK:
                self.chunks.append(self._pack(pending))
                pending = []
        if pending:
            self.chunks.append(self._pack(pending))
        self.n = sum(len(c["starts"]) for c in self.chunks)

    @staticmethod
    def _pack(examples: list[Example]) -> dict[str, np.ndarray]:
        ids = np.concatenate([np.asarray(ex.ids) for ex in examples])
        fits = ids.size == 0 or (ids.min() >= 0 and ids.max() < 2 ** 16)
        return {"ids": ids.astype(np.uint16 if fits else np.int32),
                "offsets": np.concatenate([[0], np.cumsum([len(ex.ids) for ex in examples])]).astype(np.int32),
                "starts": np.array([ex.start for ex in examples], np.int32),
                "images": np.array([ex.image for ex in examples], np.int32),
                "names": np.array([ex.sample_id.encode() for ex in examples], dtype=bytes)}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Example:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        c = self.chunks[(i % self.n) // self.CHUNK]
        j = (i % self.n) % self.CHUNK
        ids = c["ids"][c["offsets"][j]: c["offsets"][j + 1]].astype(np.int32)
        return Example(c["names"][j].decode(), ids, int(c["starts"][j]), int(c["images"][j]))

    def __iter__(self):
        return (self[i] for i in range(self.n))

    def nbytes(self) -> int:
        return sum(a.nbytes for c in self.chunks for a in c.values())


class PromptIds:
    """Token ids of a question's training prompt, remembered for the last `size` distinct questions.

    The same call encode_pair makes for the prompt part (encoding.encode_prompt of
    prompts.train_prompt), so prompt ids made here equal the setup's tokenisation
    (and build_cached_examples checks that they do, for every sample).
    """

    def __init__(self, processor, size: int = 1024):
        self.processor, self.size = processor, size
        self.memo: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, question: str) -> np.ndarray:
        if question in self.memo:
            self.memo.move_to_end(question)
            return self.memo[question]
        ids = self.encode(question)
        self.memo[question] = ids
        if len(self.memo) > self.size:
            self.memo.popitem(last=False)
        return ids

    def encode(self, question: str) -> np.ndarray:
        return np.asarray(encode_prompt(self.processor, train_prompt(question)), np.int32)

    def with_answer(self, question: str, answer: str) -> tuple[np.ndarray, int]:
        """(prompt + answer ids, answer start), tokenised together as encode_pair does (the idk answer)."""
        prompt, answer = train_text(question, answer)
        ids, start = encode_pair(self.processor, prompt, answer)
        return np.asarray(ids, np.int32), start


class CachedExamples:
    """Forget examples whose tokens come from the reference cache, built when a batch needs them.

    Per sample only two int32 numbers are held: its slot in the cache reader's
    index (which stands for its id) and its image row. A batch's token ids are
    made in the DataLoader worker from what the cache stores for the sample:
    the prompt from its question (PromptIds), the answer from its answer_ids;
    with `idk_answer` the answer is that text instead (IdkPO's second sequence).
    build_cached_examples checked at setup that these equal the run's own tokenisation.
    Indexing (table[i]) reads the cache: for tests and tools, not for the loop.
    """

    def __init__(self, reader: RefCacheReader, slots: np.ndarray, images: np.ndarray, prompts: PromptIds,
                 idk_answer: str = ""):
        self.reader, self.slots, self.images = reader, slots, images
        self.prompts, self.idk_answer = prompts, idk_answer

    def __len__(self) -> int:
        return len(self.slots)

    def sample_id(self, i: int) -> str:
        return self.reader.sample_id_at(self.slots[i])

    def example(self, i: int, ref: RefSample) -> Example:
        """Example i, from its cached sample `ref` (reader.get of its id)."""
        if self.idk_answer:
            ids, start = self.prompts.with_answer(ref.question, self.idk_answer)
        else:
            prompt = self.prompts(ref.question)
            ids, start = np.concatenate([prompt, np.asarray(ref.answer_ids, np.int32)]), len(prompt)
        return Example(ref.sample_id, ids, start, int(self.images[i]))

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.example(i, self.reader.get(self.sample_id(i)))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def nbytes(self) -> int:
        return self.slots.nbytes + self.images.nbytes


@dataclass
class Inputs:
    """What the loop draws micro-batches from.

    References and images are read on demand (see stream.Loader). With a cache the
    forget (and idk) examples are CachedExamples, rebuilt per batch from the
    cache, so memory does not grow with the number of cached samples beyond 8
    bytes each; without one, token ids are made once at setup (ExampleTable).
    """
    forget: ExampleTable | CachedExamples   # (or a list of Example: all three index alike)
    idk: ExampleTable | CachedExamples | None
    retain: ExampleTable | None
    refs: dict[str, RefSample]       # references held in memory (benchmarks); training streams `reader`
    bank: torch.Tensor | None        # pixel values of the current micro-batch's images, rows = Example.image
    pool: torch.Tensor | None        # pixel values of the reference pool (online ViKeR)
    pad_id: int
    images: list[bytes] = dataclasses.field(default_factory=list)  # distinct sample images, still encoded
    reader: RefCacheReader | None = None   # the open reference cache, when the method uses one
    processor: object = None
    workers: int = 0
    loaders: dict | None = None      # "forget"/"retain" -> stream.Loader, made at the first micro-batch
    method: str = ""                 # the method these inputs were built for ("" in tests and benchmarks)
    reads: tuple[str, ...] = ()      # the cache fields its loss reads (Method.cache_fields), sent per batch


def open_inputs(processor, model, forget: list[Sample], retain: list[Sample], method, *, use_cache: bool,
                online: bool, cache_dir, model_dir, pool_dir, idk_answer: str,
                recorded: dict | None) -> tuple[Inputs, dict]:
    """The loop's Inputs, and what the cache is ({} without one); `use_cache`: the method reads the cache.

    `method`: the run's methods.Method (what it reads is asked of it). `recorded`: the
    fingerprint check_cache accepted. Online ViKeR gets the pool's pixels.
    """
    reader, cache = None, {}
    if use_cache:
        reader, cache = open_cache(cache_dir, model_dir, forget, method, pool_dir, idk_answer, recorded)
    try:   # with a cache the forget examples keep no tokens: they are read from it per batch
        inputs = build_inputs(processor, forget, retain, max_positions(model),
                              idk_answer if method.idk_answers else "", pool_dir if online else None,
                              reader=reader, method=method)
    except BaseException:
        if reader is not None:
            reader.close()
        raise
    return inputs, cache


def build_inputs(processor, forget: list[Sample], retain: list[Sample], max_length, idk_answer: str,
                 pool_dir, reader: RefCacheReader | None = None, method=None) -> Inputs:
    """Tokenise every sample once; images stay encoded and are decoded per micro-batch by the loader.

    With `reader` (the open reference cache of a method that uses one) the forget
    examples are checked against the cache and kept as CachedExamples (no tokens
    held: the cache has them); `method` (a methods.Method) names the cached columns
    that must be there (Method.scores) and the fields each batch carries (Method.cache_fields).
    """
    if not forget:
        raise TrainError("the forget split holds no samples")
    images: list = []
    image_row: dict[bytes, int] = {}

    def row(sample: Sample) -> int:
        if sample.image not in image_row:
            load_image(sample.image, f"sample {sample.sample_id}")   # refuse a bad image at setup, not mid-run
            image_row[sample.image] = len(images)
            images.append(sample.image)
        return image_row[sample.image]

    # Stage one's tokenisation, reused so that cached answer ids can only match by construction.
    # Chunks, so that the Python lists of one chunk's token ids are all that is held beside the tables.
    def encoded(samples, idk):
        for first in range(0, len(samples), 4096):
            yield from encode_samples(processor, samples[first: first + 4096], idk, max_length)

    if reader is not None:
        forget_ex = build_cached_examples(processor, forget, reader, row, max_length, idk_answer, method)
        idk_ex = (CachedExamples(reader, forget_ex.slots, forget_ex.images, forget_ex.prompts, idk_answer)
                  if idk_answer else None)
    else:
        forget_ex = ExampleTable(Example(e.sample.sample_id, _compact(e.ids), e.answer_start, row(e.sample))
                                 for e in encoded(forget, ""))
        idk_ex = (ExampleTable(Example(e.sample.sample_id, _compact(e.idk_ids), e.idk_start, row(e.sample))
                               for e in encoded(forget, idk_answer)) if idk_answer else None)
    retain_ex = None
    if retain:
        retain_ex = ExampleTable(Example(e.sample.sample_id, _compact(e.ids), e.answer_start, row(e.sample))
                                 for e in encoded(retain, ""))
    pool = None
    if pool_dir:
        pool = pixel_values(processor, [load_image(p.read_bytes(), str(p)) for p in pool_files(pool_dir)])
    pad_id = processor.tokenizer.pad_token_id
    return Inputs(forget_ex, idk_ex, retain_ex, {}, None, pool, 0 if pad_id is None else pad_id,
                  images=images, processor=processor, reader=reader, method=method.name if method else "",
                  reads=method.cache_fields if method else ())


SETUP_CHUNK = 1024   # samples tokenised together when checking them against the cache (bounds setup memory)


def build_cached_examples(processor, samples: list[Sample], reader: RefCacheReader, image_row, max_length,
                          idk_answer: str, method) -> CachedExamples:
    """The forget samples as CachedExamples, after checking every one against the cache.

    One pass in cache order, SETUP_CHUNK samples at a time, keeping nothing per
    sample but its slot and image row: each is tokenised as stage one did (an
    empty answer or a too-long sequence fails here, as does a bad image in
    `image_row`), must be cached with the same question, prompt ids and answer
    tokens, and must carry the reference log-likelihoods the method needs (`method`: a
    methods.Method, or None for none).
    """
    cache_dir = reader.cache_dir
    slots = np.empty(len(samples), np.int32)
    images = np.empty(len(samples), np.int32)
    for i, s in enumerate(samples):
        if s.sample_id not in reader:
            raise TrainError(f"forget sample {s.sample_id!r} is not in reference cache {cache_dir}")
        slots[i], images[i] = reader.slot(s.sample_id), image_row(s)
    prompts = PromptIds(processor)
    shard, row = reader.slot_locations(slots)
    order = np.lexsort((row, shard))
    needed = method.scores if method is not None else ()
    name = method.name if method is not None else ""
    for first in range(0, len(order), SETUP_CHUNK):
        chunk = order[first: first + SETUP_CHUNK]
        by_shard: dict[int, list[tuple[int, Example]]] = defaultdict(list)
        questions: dict[int, list[tuple[int, Sample]]] = defaultdict(list)
        for i, e in zip(chunk, encode_samples(processor, [samples[i] for i in chunk], idk_answer, max_length)):
            ex = Example(e.sample.sample_id, _compact(e.ids), e.answer_start, 0)
            if not np.array_equal(prompts(e.sample.question), ex.ids[:ex.start]):
                raise TrainError(f"sample {ex.sample_id!r}: its prompt tokenised alone differs from the "
                                 f"prompt part of its training sequence")
            by_shard[int(shard[i])].append((int(row[i]), ex))
            questions[int(shard[i])].append((int(row[i]), e.sample))
        for pos, rows in by_shard.items():
            _check_shard_rows(reader, pos, rows, needed, name, cache_dir)
            _check_shard_questions(reader, pos, questions[pos], cache_dir)
    return CachedExamples(reader, slots, images, prompts)


def _check_shard_questions(reader: RefCacheReader, pos: int, rows: list[tuple[int, Sample]], cache_dir) -> None:
    """The cached question of each sample is this run's: the loop rebuilds its prompt from the cached one."""
    cached = reader.shard_column(pos, "question")
    for row, sample in rows:
        text = None if cached is None else cached[row]
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        if text != sample.question:
            what = "lacks the question" if text is None else "holds another question"
            raise TrainError(f"reference cache {cache_dir} {what} for sample {sample.sample_id!r}: "
                             f"recompute it with viker precompute")


def _check_shard_rows(reader: RefCacheReader, pos: int, rows: list[tuple[int, Example]], needed, method: str,
                      cache_dir) -> None:
    offsets = reader.shard_column(pos, "offsets")
    answers = reader.shard_column(pos, "answer_ids")
    for row, ex in rows:
        cached = answers[offsets[row]:offsets[row + 1]]
        if not np.array_equal(cached, np.asarray(ex.ids[ex.start:])):
            raise TrainError(f"reference cache {cache_dir}: the answer tokens of {ex.sample_id!r} differ "
                             f"from this run's tokenisation ({len(cached)} vs {len(ex.ids) - ex.start})")
    for name in needed:
        values = reader.shard_column(pos, name)
        missing = [ex.sample_id for row, ex in rows if values is None or np.isnan(values[row])]
        if missing:
            raise TrainError(f"method {method} needs {name} but reference cache {cache_dir} lacks it for "
                             f"{len(missing)} sample(s), e.g. {missing[0]!r}")


def _compact(ids: list[int]) -> np.ndarray:
    """int32 token ids: a tenth of a Python list's memory (LLaVA prompts carry ~600 image tokens each)."""
    return np.asarray(ids, np.int32)


def check_cache(cache_dir, model_dir, samples: list[Sample], pool_dir, expected: dict | None = None,
                use_cache_settings: bool = False, log=print) -> dict:
    """The cache's recorded fingerprint, if it matches this model, prompts, forget set and pool.

    Opening the cache checks every shard's sha256 (remembered per file version).
    Raises FingerprintMismatch naming the part (model weights, tokenizer, forget set, ...).
    `expected` ({k, K, seed, reference}): the config's precompute settings; a cache
    made with others is refused naming both values, unless `use_cache_settings`.
    """
    with RefCacheReader(cache_dir) as reader:
        recorded, settings = reader.fingerprint, reader.settings
    if expected is not None:
        differences = cache_setting_differences(settings, recorded, expected, pool_dir)
        if differences and not use_cache_settings:
            raise TrainError(f"reference cache {cache_dir} was made with other settings than the config: "
                             f"{'; '.join(differences)}; run viker precompute with these settings, or set "
                             f"train.use_cache_settings=true to train with the cache's")
        if differences:
            if log is not None:
                log(f"[train] train.use_cache_settings: training with the cache's settings "
                    f"({'; '.join(differences)})")
            pool_dir = None   # the cache's pool is taken as recorded
    check_fingerprint(cache_dir, training_fingerprint(model_dir, samples, recorded, pool_dir), recorded)
    return recorded


def cache_setting_differences(settings: dict, recorded: dict, expected: dict, pool_dir) -> list[str]:
    """'k (config 3, cache 5)' for each of k, K, seed, reference, span, names and pool the cache was made otherwise."""
    want = dict(expected)
    if want.get("reference") == "own":
        want["k"] = 1   # precompute forces k=1 for the own-image reference
    found = []
    for key, name in (("k", "precompute.k"), ("K", "precompute.top_k"), ("seed", "precompute.seed"),
                      ("reference", "precompute.reference"), ("span", "precompute.span"),
                      ("names", "precompute.names")):
        made = settings.get(key, "none" if key in ("span", "names") else None)   # older caches: none
        if key in want and str(made) != str(want[key]):
            found.append(f"{name} (config {want[key]}, cache {made})")
    cached_pool = recorded.get("parts", {}).get("reference_pool")
    if (want.get("reference", "pool") == "pool" and settings.get("reference") == "pool" and pool_dir
            and Path(pool_dir).is_dir() and cached_pool is not None
            and hash_files(pool_files(pool_dir)) != cached_pool):   # by content: a copied pool is the same pool
        found.append(f"precompute.pool (config {pool_dir}, cache {settings.get('pool') or 'another pool'})")
    return found


def open_cache(cache_dir, model_dir, samples: list[Sample], method, pool_dir, idk_answer: str,
               recorded: dict | None = None) -> tuple[RefCacheReader, dict]:
    """The open reader of a cache made for this run, and what the cache is (fingerprint, settings).

    `method`: the run's methods.Method; one that reads idk answers must find this run's
    idk answer in the cache. `recorded`: the fingerprint an earlier `check_cache` already accepted (skips
    hashing again). The samples are checked against it by build_cached_examples.
    """
    if recorded is None:
        recorded = check_cache(cache_dir, model_dir, samples, pool_dir)
    cached_idk = recorded.get("parts", {}).get("idk_answer")
    if method.idk_answers and cached_idk is not None and cached_idk != idk_answer:
        raise TrainError(f"reference cache {cache_dir} scored the idk answer {cached_idk!r}, "
                         f"this run uses {idk_answer!r}")
    reader = RefCacheReader(cache_dir)
    return reader, {"fingerprint": recorded.get("digest"), "settings": reader.settings}
