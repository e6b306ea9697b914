"""In what order the loop sees the examples, and how each micro-batch is made from them.

A Stream deals seeded shuffled epochs (shard by shard with a cache, so reads
stay near each other on disk), split over ranks; it is what a checkpoint
saves. A Loader is a torch DataLoader that follows a copy of the stream: its
workers decode images and read references, the loop checks each batch is the
one the stream asked for. References travel in the cache's stored dtypes and
are widened in the loop (pad_stored, widen_stored); pad_references is the
plain form they are tested against.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache.refcache import CacheError, RefCacheReader, RefSample
from pipeline.models.encoding import load_image, pixel_values
from pipeline.threads import die_with_parent

from .errors import TrainError
from .inputs import CachedExamples, Example, Inputs


@dataclass
class Refs:
    """Reference targets of one micro-batch, padded to [B, T, K] (padding: prob 0, tail 1)."""
    topk_idx: torch.Tensor
    topk_prob: torch.Tensor
    tail_mass: torch.Tensor
    entropy: torch.Tensor

    def to(self, device) -> "Refs":
        return Refs(*(t.to(device) for t in dataclasses.astuple(self)))


@dataclass
class MicroBatch:
    forget: list[Example]
    idk: list[Example] | None = None
    retain: list[Example] | None = None
    refs: Refs | None = None
    ref_logp_own: torch.Tensor | None = None
    ref_logp_idk: torch.Tensor | None = None


def shard_groups(reader: RefCacheReader | None, examples) -> list[np.ndarray] | None:
    """Example indices grouped by cache shard, in row order: what a sequential-read shuffle needs.

    With a reader the forget examples are CachedExamples (build_inputs), whose slots locate them.
    """
    if reader is None:
        return None
    shard, row = reader.slot_locations(examples.slots)
    order = np.lexsort((row, shard))
    cuts = np.flatnonzero(np.diff(shard[order])) + 1
    return [part.astype(np.int32) for part in np.split(order, cuts)]


class Stream:
    """Seeded shuffled epochs over n items; this rank keeps items rank::world of each epoch's order.

    With `groups` (item indices per cache shard, in row order) an epoch shuffles
    the shards, then windows of `window` neighbouring items within each shard,
    then the items within a window: every order is reachable at window scale
    while reads stay near each other on disk. Batches never straddle epochs, so
    the last batch of an epoch may be short. Under several processes each epoch
    is cut to a multiple of `world`, so every rank sees the same number of batches.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, groups: list | None = None,
                 window: int = 64):
        self.n, self.rank, self.world, self.window = n, rank, world, window
        self.groups = groups
        self.generator = torch.Generator().manual_seed(seed)
        self.pending = np.zeros(0, np.int32)

    def _epoch(self) -> np.ndarray:
        if self.groups is None:
            order = torch.randperm(self.n, generator=self.generator).numpy()
        else:
            parts = []
            for g in torch.randperm(len(self.groups), generator=self.generator).tolist():
                items = self.groups[g]
                starts = list(range(0, len(items), self.window))
                for w in torch.randperm(len(starts), generator=self.generator).tolist():
                    win = items[starts[w]: starts[w] + self.window]
                    parts.append(win[torch.randperm(len(win), generator=self.generator).numpy()])
            order = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        if self.world > 1:
            order = order[: len(order) - len(order) % self.world]
        return order[self.rank::self.world].astype(np.int32)    # 4 B per sample, several copies live

    def take(self, count: int) -> list[int]:
        if len(self.pending) == 0:
            self.pending = self._epoch()
            if len(self.pending) == 0:
                raise TrainError(f"{self.n} items cannot be split over {self.world} processes")
        taken, self.pending = self.pending[:count], self.pending[count:]
        return taken.tolist()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "pending": self.pending.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.pending = np.asarray(state["pending"], np.int32)

    def copy(self) -> "Stream":
        twin = Stream(self.n, 0, self.rank, self.world, self.groups, self.window)
        twin.generator.set_state(self.generator.get_state())
        twin.pending = self.pending.copy()      # not via state_dict: its list costs ~36 B per sample
        return twin


def make_streams(inputs: Inputs, seed: int, rank: int, world: int) -> dict[str, Stream]:
    """The forget stream (shard-aware when the examples come from a cache) and the retain stream, seeded apart."""
    return {"forget": Stream(len(inputs.forget), seed, rank, world, groups=shard_groups(inputs.reader, inputs.forget)),
            "retain": Stream(len(inputs.retain or []), seed + 1, rank, world)}


class ExampleData(torch.utils.data.Dataset):
    """Item i: (i, the encoded image of example i, example i, its idk twin or None, its cached references or None).

    Runs in the DataLoader workers: CachedExamples are built here from the references just read.
    """

    def __init__(self, examples, images: list[bytes], reader: RefCacheReader | None, idk=None):
        self.examples, self.images, self.reader, self.idk = examples, images, reader, idk

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        # stored=True: the references travel to the loop in the cache's own dtypes (see pad_stored)
        if isinstance(self.examples, CachedExamples):
            try:
                ref = self.reader.get(self.examples.sample_id(i), stored=True)
            except CacheError as err:
                # Handed to the loop as data: raised here, torch would re-raise it in the loop as
                # "Caught CacheError in DataLoader worker process 1." and the line that says what is wrong is lost.
                return ReadFailure(str(err))
            ex = self.examples.example(i, ref)
            idk = self.idk.example(i, ref) if self.idk is not None else None
        else:   # held tokens: no cache (with one, build_inputs makes CachedExamples)
            ex, ref = self.examples[i], None
            idk = self.idk[i] if self.idk is not None else None
        return i, self.images[ex.image], ex, idk, ref


@dataclass
class ReadFailure:
    """An item a DataLoader worker could not read: the error's one line, raised again by Loader.next."""
    message: str


class Collate:
    """Decode a batch's images and pad its references (in the DataLoader worker, off the training loop).

    The batch's examples come back with `image` renumbered to their row of the batch's pixels;
    `reads`: the cache fields the method's loss reads (Inputs.reads: refs, ref_logp_own, ref_logp_idk).
    """

    def __init__(self, processor, reads: tuple[str, ...]):
        self.processor, self.reads = processor, tuple(reads)

    def __call__(self, items) -> dict:
        # numpy, not torch: a worker hands torch tensors over one shared-memory segment each,
        # which costs more than pickling these few arrays (measured: 1.6k vs 4.5k samples/s).
        failed = [item for item in items if isinstance(item, ReadFailure)]
        if failed:
            return {"failure": failed[0].message}
        rows = [item[0] for item in items]
        forget = [dataclasses.replace(ex, image=j) for j, (_, _, ex, _, _) in enumerate(items)]
        images = [load_image(data, f"sample {ex.sample_id}") for (_, data, _, _, _), ex in zip(items, forget)]
        out = {"rows": rows, "examples": forget, "pixels": pixel_values(self.processor, images).numpy()}
        if items[0][3] is not None:
            out["idk"] = [dataclasses.replace(idk, image=j) for j, (_, _, _, idk, _) in enumerate(items)]
        cached = [item[4] for item in items]
        if cached and cached[0] is not None:
            for name in self.reads:
                if name == "refs":
                    out["refs"] = pad_stored(cached, max(len(ex.ids) - ex.start for ex in forget))
                else:   # a per-sample score, named as the cache's RefSample field
                    out[name] = np.array([getattr(r, name) for r in cached], np.float32)
        return out


def _tensor(value):
    return None if value is None else torch.from_numpy(value)


class _Lookahead:
    """The batch sampler of a Loader: a copy of the stream running ahead of the loop by the prefetch depth."""

    def __init__(self, stream: Stream, batch_size: int):
        self.stream, self.batch_size = stream, batch_size

    def __iter__(self):
        while True:
            yield self.stream.take(self.batch_size)


class Loader:
    """Batches of one stream read by a torch DataLoader (workers decode images and read references).

    The loop's own Stream decides what comes next and is what checkpoints save;
    the DataLoader follows a copy of it, so prefetching never moves the saved
    position, and every batch is checked to be the one the stream asked for.
    """

    def __init__(self, dataset: ExampleData, collate: Collate, stream: Stream, batch_size: int, workers: int):
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_Lookahead(stream.copy(), batch_size), collate_fn=collate,
            num_workers=workers, prefetch_factor=2 if workers > 0 else None,
            # Its own generator: starting an iterator draws a seed, which must not move the global RNG
            # (dropout masks), or a resumed run would diverge from the uninterrupted one.
            generator=torch.Generator().manual_seed(0),
            # Workers die with the trainer, however it dies: PR_SET_PDEATHSIG, not torch's watchdog. Measured
            # (tests/test_reliability.py, trainer SIGKILLed mid-checkpoint, 2 workers): with the watchdog alone
            # both workers still ran 60 s later (the issue saw 17+ min): its 5 s poll ends the worker loop, but
            # exit then joins the queue's feeder thread, blocked writing a prefetched batch into a pipe no one
            # reads yet never broken (every worker holds its read end), and the other worker waits for the lock
            # that thread holds. With PR_SET_PDEATHSIG (SIGKILL) both were gone 0.1 s after the kill.
            worker_init_fn=functools.partial(die_with_parent, os.getpid()) if workers > 0 else None)
        self.iterator = iter(self.loader)

    def close(self) -> None:
        """Stop the workers now, not whenever the iterator is collected.

        A run stops with batches still prefetched: on exit each worker joins its queue's feeder thread,
        blocked writing into a pipe nobody reads, so torch's shutdown waits out its 5 s join timeout per
        worker before terminating it (measured: 20 s for a forget and a retain loader of 2 workers, paid by
        whatever ran when the garbage collector got to them). The workers hold nothing to save: they are
        terminated first, then shut down.
        """
        for worker in getattr(self.iterator, "_workers", ()):
            if worker.is_alive():
                worker.terminate()
        shutdown = getattr(self.iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def next(self, rows: list[int]) -> dict:
        got = next(self.iterator)
        if "failure" in got:   # a worker could not read the cache (ExampleData): its own line, not torch's wrapper
            raise CacheError(got["failure"])
        if got["rows"] != rows:
            raise RuntimeError(f"data loader out of step with its stream ({got['rows'][:4]} vs {rows[:4]})")
        return got


def make_loaders(inputs: Inputs, streams: dict[str, Stream], batch_size: int) -> dict[str, Loader]:
    loaders = {"forget": Loader(ExampleData(inputs.forget, inputs.images, inputs.reader, inputs.idk),
                                Collate(inputs.processor, inputs.reads), streams["forget"], batch_size,
                                inputs.workers)}
    if inputs.retain:
        loaders["retain"] = Loader(ExampleData(inputs.retain, inputs.images, None),
                                   Collate(inputs.processor, ()), streams["retain"], batch_size, inputs.workers)
    return loaders


def close_loaders(inputs: Inputs) -> None:
    """The run's DataLoader workers stopped (Loader.close), after the last step or a failure."""
    for loader in (inputs.loaders or {}).values():
        loader.close()
    inputs.loaders = None


def next_micro_batch(inputs: Inputs, streams: dict[str, Stream], batch_size: int, method: str = "") -> MicroBatch:
    """The next micro-batch; leaves its images in inputs.bank, rows renumbered from 0 (forget, then retain).

    What it carries besides the examples is what `inputs` were built for (Inputs.reads); `method`,
    the run's method name, is checked against theirs.
    """
    if method and inputs.method and method != inputs.method:
        raise TrainError(f"micro-batches for method {method} asked of inputs built for {inputs.method}")
    if inputs.loaders is None:   # made here, after a resumed run has restored the streams
        inputs.loaders = make_loaders(inputs, streams, batch_size)
    rows = streams["forget"].take(batch_size)
    got = inputs.loaders["forget"].next(rows)
    refs = widen_stored(got["refs"]) if "refs" in got else None
    mb = MicroBatch(got["examples"], idk=got.get("idk"), refs=refs, ref_logp_own=_tensor(got.get("ref_logp_own")),
                    ref_logp_idk=_tensor(got.get("ref_logp_idk")))
    pixels = [torch.from_numpy(got["pixels"])]
    if inputs.retain:
        rrows = streams["retain"].take(batch_size)
        rgot = inputs.loaders["retain"].next(rrows)
        pixels.append(torch.from_numpy(rgot["pixels"]))
        mb.retain = [dataclasses.replace(ex, image=len(rows) + ex.image) for ex in rgot["examples"]]
    inputs.bank = torch.cat(pixels)
    return mb


def pad_stored(samples: list[RefSample], width: int) -> list[np.ndarray]:
    """pad_references in numpy and in the cache's stored dtypes (uint16/int32 indices, float16 probabilities).

    What a DataLoader worker hands to the loop: a third of the bytes of int64/float32
    (pickling ~190 KB per batch of 8 at K = 64 is what held 2 workers below 1 worker's rate).
    widen_stored turns it into the Refs pad_references makes, value for value.
    """
    B, K = len(samples), samples[0].topk_idx.shape[1]
    idx = np.zeros((B, width, K), samples[0].topk_idx.dtype)
    prob = np.zeros((B, width, K), samples[0].topk_prob.dtype)
    tail, entropy = np.ones((B, width), np.float32), np.zeros((B, width), np.float32)
    for i, s in enumerate(samples):
        T = s.num_tokens
        idx[i, :T], prob[i, :T], tail[i, :T], entropy[i, :T] = s.topk_idx, s.topk_prob, s.tail_mass, s.entropy
    return [idx, prob, tail, entropy]


def widen_stored(arrays: list[np.ndarray]) -> Refs:
    """The Refs of pad_stored's arrays: int64 indices, float32 probabilities (exact conversions)."""
    idx, prob, tail, entropy = arrays
    return Refs(torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(prob.astype(np.float32)),
                torch.from_numpy(tail), torch.from_numpy(entropy))


def pad_references(samples: list[RefSample], width: int) -> Refs:
    K = samples[0].topk_idx.shape[1]
    B = len(samples)
    refs = Refs(torch.zeros(B, width, K, dtype=torch.long), torch.zeros(B, width, K),
                torch.ones(B, width), torch.zeros(B, width))
    for i, s in enumerate(samples):
        T = s.num_tokens
        refs.topk_idx[i, :T] = torch.from_numpy(np.asarray(s.topk_idx, np.int64))
        refs.topk_prob[i, :T] = torch.from_numpy(np.asarray(s.topk_prob, np.float32))
        refs.tail_mass[i, :T] = torch.from_numpy(np.asarray(s.tail_mass, np.float32))
        refs.entropy[i, :T] = torch.from_numpy(np.asarray(s.entropy, np.float32))
    return refs
