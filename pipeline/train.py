"""Stage two (`viker train`): LoRA unlearning in one explicit loop (setup -> loop -> save).

`train` reads top to bottom like torchtune's `lora_dpo_single_device.py`: load
the vanilla model and wrap its language model in LoRA, tokenise the forget (and
retain) samples once, open the stage-one reference cache and check it was made
for this model and forget set, then run a plain loop of micro-batches, gradient
accumulation, clipping, AdamW and a linear schedule, and save the adapter.

Methods (DESIGN.md section 5; the losses live in `losses.py`):

    ga        gradient ascent on the forget answers       (= ViKeR "w/o Reg")
    graddiff  ga + alpha * NLL(retain)
    kl_min    ga + KL(vanilla || current) on retain
    npo       NPO against the cached own-image log-likelihood
    idkpo     DPO towards "I don't know" with cached reference log-likelihoods
    viker     ga + lambda * D(R, Q) against the cached reference distribution R
              (use_ga=False: "w/o GA"; a cache made with reference=own: "w/o Vis")

The frozen model is never a second copy: it is the base with the adapter
disabled, under no_grad. With `online_reference` ViKeR computes R during
training (k frozen forwards per sample, drawn exactly like stage one draws
them); it exists to measure what the cache saves and to check that both paths
give the same loss.

Multi-process: launched by torchrun / accelerate launch (WORLD_SIZE > 1) each
rank takes forget items rank::world of every epoch's shuffled order, the
gradients are averaged by torch DDP, and rank 0 alone logs and saves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from .progress import progress as tqdm  # plain log lines off a terminal

from .config import TrainConfig
from .data.loaders import default_splits, read_profiles
from .data.records import Sample, forget_samples
from .encoding import encode_pair, encode_prompt, load_image, max_positions, pixel_values
from .fingerprint import pool_files, training_fingerprint
from .refcache import hash_files
from .forward import TextBatch, answer_logits, make_text_batch
from .losses import (DIVERGENCES, LOSS_CONVENTIONS, entropy_token_lambda, ga_loss, idkpo_loss, idkpo_scale,
                     kl_retain_loss, nll_loss, npo_loss, per_token, retain_nll_weight, sequence_logprob, viker_loss)
from .modeling import load_model, resolve_device, wrap_lora
from .precompute import encode_samples, summarise
from .prompts import train_prompt, train_text
from .refcache import RefCacheReader, RefSample, atomic_write_json, check_fingerprint
from .references import draw_reference_images

METHODS = ("ga", "graddiff", "kl_min", "npo", "idkpo", "viker")
CHECKPOINT = "checkpoint"


class TrainError(ValueError):
    """A training run that cannot start or continue; the message is one line."""


class TrainingDiverged(FloatingPointError):
    """The loss or gradient became NaN/inf; the last good adapter was saved first."""


# ================================================================ small records


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
class Refs:
    """Reference targets of one micro-batch, padded to [B, T, K] (padding: prob 0, tail 1)."""
    topk_idx: torch.Tensor
    topk_prob: torch.Tensor
    tail_mass: torch.Tensor
    entropy: torch.Tensor

    def to(self, device) -> "Refs":
        return Refs(*(t.to(device) for t in dataclasses.astuple(self)))


@dataclass
class LossSpec:
    """The loss hyper-parameters as plain values (the config is flattened here, at the edge)."""
    method: str
    lam: float = 0.5
    regulariser: str = "kl"
    use_ga: bool = True
    token_lambda: bool = False
    beta: float = 0.4
    retain_weight: float = 0.0
    retain_term: str = "none"      # ViKeR's optional retain term: none (the paper's) | nll | kl
    online: bool = False
    convention: str = "viker"      # losses.LOSS_CONVENTIONS: how NPO / IdkPO / KL_Min are written
    idk_beta: float = 0.1          # IdkPO's beta under the mllmu / openunlearning conventions
    k: int = 5
    top_k: int = 64
    ref_seed: int = 0


@dataclass
class Inputs:
    """What the loop draws micro-batches from.

    References and images are read on demand (see Loader). With a cache the
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
    loaders: dict | None = None      # "forget"/"retain" -> Loader, made at the first micro-batch


@dataclass
class MicroBatch:
    forget: list[Example]
    idk: list[Example] | None = None
    retain: list[Example] | None = None
    refs: Refs | None = None
    ref_logp_own: torch.Tensor | None = None
    ref_logp_idk: torch.Tensor | None = None


# ================================================================ the command


def train(model_dir, data_root, forget_split: str, retain_split: str, cache_dir, cfg: TrainConfig, *,
          pool_dir=None, idk_answer: str = "I don't know.", dtype: str = "auto", device: str = "auto",
          resume: bool = False, ref_k: int = 5, ref_top_k: int = 64, ref_seed: int = 0,
          benchmark: str = "mllmu", overwrite: bool = False, expect_cache: dict | None = None,
          log=print, train_root: str = "") -> dict:
    """Unlearn the forget split with LoRA; write the adapter, log and config to `cfg.output`.

    `ref_k`, `ref_top_k`, `ref_seed` are the reference settings of online ViKeR
    (the cache records its own). `benchmark` (mllmu | clear) picks the data
    reader; `train_root` a directory in MLLMU-Bench's baseline_train_split layout
    holding the training QA (data.train_root). `expect_cache` ({k, K, seed, reference}, the config's precompute
    settings): a cache made otherwise is refused unless cfg.use_cache_settings.
    A directory holding another run's adapter or train_config.json is refused
    unless `overwrite` (removes them first) or `resume`. The adapter and
    train_config.json appear together at the end (after a NaN stop: the last
    good adapter, with the steps done). Returns steps, timings, final loss and paths.
    """
    method = resolve_method(cfg.method)
    spec = loss_spec(cfg, method, ref_k, ref_top_k, ref_seed)
    check_options(cfg, method, cache_dir, pool_dir)
    out = Path(cfg.output)
    claim_output(out, resume, overwrite, remove=False)   # refuse before any work, remove on rank 0 below
    rank, world, dev, own_group = init_distributed(device)
    try:
        # ---------------------------------------------------------- setup
        seed_everything(cfg.seed)
        forget = forget_samples(read_profiles(data_root, forget_split, benchmark, train_root=train_root))
        recorded = None
        if needs_cache(method, spec):
            # Refuse a cache for another model or forget set before paying for loading the model.
            recorded = check_cache(cache_dir, model_dir, forget, pool_dir, expected=expect_cache,
                                   use_cache_settings=cfg.use_cache_settings, log=log if rank == 0 else None)
        model, processor = load_model(model_dir, dtype=dtype, device=str(dev))
        if cfg.grad_checkpointing:
            enable_checkpointing(model)
        model = wrap_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          targets=cfg.lora_targets)
        model.train()
        # Same LoRA init on every rank (seeded above); different dropout masks per rank from here.
        torch.manual_seed(cfg.seed + rank)
        retain = []
        if needs_retain(method, cfg.retain_weight, spec.retain_term):
            retain_split = retain_split or default_splits(benchmark, forget_split)["retain"]
            retain = forget_samples(read_profiles(data_root, retain_split, benchmark, train_root=train_root))
        reader, cache = None, {}
        if needs_cache(method, spec):
            reader, cache = open_cache(cache_dir, model_dir, forget, method, pool_dir, idk_answer, recorded)
        try:   # with a cache the forget examples keep no tokens: they are read from it per batch
            inputs = build_inputs(processor, forget, retain, max_positions(model),
                                  idk_answer if method == "idkpo" else "", pool_dir if spec.online else None,
                                  reader=reader, method=method)
        except BaseException:
            if reader is not None:
                reader.close()
            raise
        if inputs.pool is not None:   # each pool image is reused for many samples: keep it on the device
            inputs.pool = inputs.pool.to(dev, _dtype_of(model))
        inputs.workers = cfg.data_workers
        n_forget = len(forget)
        del forget, retain   # the samples are not needed past setup (memory must not grow with their number)
        if n_forget < world:
            raise TrainError(f"{n_forget} forget samples cannot be split over {world} processes")

        steps = total_steps(cfg, n_forget, world)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = linear_schedule(optimizer, cfg.warmup_steps, steps)
        streams = {"forget": Stream(len(inputs.forget), cfg.seed, rank, world,
                                    groups=shard_groups(inputs.reader, inputs.forget)),
                   "retain": Stream(len(inputs.retain or []), cfg.seed + 1, rank, world)}
        net = AnswerLogits(model)
        if world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=False)
        run = describe_run(cfg, method, model_dir, data_root, forget_split, retain_split, cache_dir, cache,
                           pool_dir, idk_answer, spec, world, steps)
        run["benchmark"] = benchmark
        start = 0
        if resume:
            start = load_checkpoint(out / CHECKPOINT, model, optimizer, scheduler, streams, run, rank, world)
        if rank == 0:
            claim_output(out, resume, overwrite, remove=True)
            prepare_output(out, run, resume, start)
        log_path = out / "log.jsonl"
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                    else contextlib.nullcontext())

        # ---------------------------------------------------------- loop
        t_loop, last_loss, step_seconds = time.perf_counter(), float("nan"), []
        bar = tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc=f"train {method}",
                   leave=False, disable=rank != 0)
        for step in bar:
            t_step = time.perf_counter()
            loss_sum = torch.zeros((), device=dev)
            diags = defaultdict(list)
            for micro in range(cfg.grad_accum):
                mb = next_micro_batch(inputs, streams, cfg.batch_size, method)
                # DDP averages gradients only on the last micro-batch of the step.
                sync = (net.no_sync() if world > 1 and micro < cfg.grad_accum - 1 else contextlib.nullcontext())
                with sync:
                    with autocast:
                        loss, d = micro_batch_loss(net, model, mb, spec, inputs, dev)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach() / cfg.grad_accum
                for key, value in d.items():
                    diags[key].append(value.detach().float())
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
            last_loss = float(loss_sum)
            if not (math.isfinite(last_loss) and math.isfinite(grad_norm)):
                # No optimizer step on a bad loss: the adapter in memory is still step-1's.
                optimizer.zero_grad(set_to_none=True)
                what = f"loss is {last_loss}" if not math.isfinite(last_loss) else f"gradient norm is {grad_norm}"
                if rank == 0:   # the steps done, recorded as such: never the steps planned
                    publish(out, model, {**run, "steps": step - 1, "planned_steps": steps},
                            {"method": method, "steps": step - 1, "start_step": start, "final_loss": None,
                             "stopped": f"diverged at step {step}: {what}", "adapter": str(out / "adapter")})
                raise TrainingDiverged(f"training stopped at step {step}: {what}; the adapter from step "
                                       f"{step - 1} is saved in {out / 'adapter'} (lower train.lr?)")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - t_step)
            if rank == 0:
                bar.set_postfix(loss=f"{last_loss:.4f}")
                append_log(log_path, {"step": step, "epoch": round(step * cfg.batch_size * cfg.grad_accum * world
                                                                   / n_forget, 4),
                                      "lr": lr, "loss": last_loss, "grad_norm": grad_norm,
                                      **{k: float(torch.cat(v).mean()) for k, v in sorted(diags.items())},
                                      "sec_per_step": round(step_seconds[-1], 4)})
            if cfg.save_every > 0 and step % cfg.save_every == 0 and step < steps:
                save_checkpoint(out / CHECKPOINT, step, model, optimizer, scheduler, streams, run, rank, world)
        bar.close()
        seconds = time.perf_counter() - t_loop

        # ---------------------------------------------------------- save
        result = {"method": method, "steps": steps, "start_step": start, "seconds": round(seconds, 3),
                  "sec_per_step": seconds / max(1, steps - start), "final_loss": last_loss,
                  "output": str(out), "adapter": str(out / "adapter"), "log": str(log_path),
                  "train_config": str(out / "train_config.json"), "adapter_digest": adapter_digest(model)}
        if rank == 0:
            if cfg.merge:
                result["merged"] = str(save_merged(model, processor, out / "merged"))
            result["adapter_sha256"] = publish(out, model, run, result)
            shutil.rmtree(out / CHECKPOINT, ignore_errors=True)   # the run is complete: nothing to resume
        if world > 1:
            dist.barrier()
        return result
    finally:
        if rank == 0:
            remove_temporary(out)   # a failed save (disk full) must not leave half an adapter behind
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


# ================================================================ options


def resolve_method(name: str) -> str:
    method = str(name).strip().lower().replace("-", "_")
    if method not in METHODS:
        raise TrainError(f"unknown training method {name!r}; choose one of: {', '.join(METHODS)}")
    return method


def needs_retain(method: str, retain_weight: float, retain_term: str = "none") -> bool:
    return method in ("graddiff", "kl_min") or retain_weight > 0 or retain_term != "none"


RETAIN_TERMS = ("none", "nll", "kl")


def check_retain_term(term: str, method: str) -> str:
    """train.retain_term, checked: ViKeR's retain-aware variants (none is the paper's loss)."""
    name = str(term).strip().lower()
    if name not in RETAIN_TERMS:
        raise TrainError(f"train.retain_term {term!r} is not one of: {', '.join(RETAIN_TERMS)}")
    if name != "none" and method != "viker":
        raise TrainError(f"train.retain_term applies to viker only (graddiff and kl_min are {method}'s "
                         f"retain-aware forms); got retain_term={name} with method {method}")
    return name


def loss_spec(cfg: TrainConfig, method: str, k: int, top_k: int, ref_seed: int) -> LossSpec:
    convention = str(cfg.convention).strip().lower()
    if convention not in LOSS_CONVENTIONS:
        raise TrainError(f"train.convention {cfg.convention!r} is not one of: {', '.join(LOSS_CONVENTIONS)}")
    return LossSpec(method=method, lam=cfg.lam, regulariser=cfg.regulariser.lower(), use_ga=cfg.use_ga,
                    token_lambda=cfg.token_lambda, beta=cfg.beta, retain_weight=cfg.retain_weight,
                    retain_term=check_retain_term(cfg.retain_term, method),
                    online=cfg.online_reference and method == "viker", k=k, top_k=top_k, ref_seed=ref_seed,
                    convention=convention, idk_beta=cfg.idk_beta)


def check_options(cfg: TrainConfig, method: str, cache_dir, pool_dir) -> None:
    if cfg.regulariser.lower() not in DIVERGENCES:
        raise TrainError(f"train.regulariser {cfg.regulariser!r} is not one of: {', '.join(DIVERGENCES)}")
    if cfg.online_reference and method != "viker":
        raise TrainError(f"train.online_reference applies to viker only, not {method}")
    if cfg.online_reference and not pool_dir:
        raise TrainError("online ViKeR needs the reference pool directory (pool_dir)")
    if (method in ("npo", "idkpo") or (method == "viker" and not cfg.online_reference)) and not cache_dir:
        raise TrainError(f"method {method} needs a reference cache: run viker precompute first")
    for name in ("batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"train.{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.output:
        raise TrainError("train.output is empty: name the run's output directory")
    if cfg.steps <= 0 and cfg.epochs <= 0:
        raise TrainError("set train.steps > 0 or train.epochs > 0")


def total_steps(cfg: TrainConfig, n_forget: int, world: int = 1) -> int:
    if cfg.steps > 0:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * n_forget / (cfg.batch_size * cfg.grad_accum * world)))


def linear_schedule(optimizer, warmup: int, total: int):
    """Linear warm-up from 0, then linear decay to 0 at `total` (the MLLMU-Bench baselines' schedule)."""
    from transformers import get_linear_schedule_with_warmup
    return get_linear_schedule_with_warmup(optimizer, warmup, total)


def enable_checkpointing(model) -> None:
    """Activation checkpointing that works with LoRA (inputs need grads) and DDP (non-reentrant)."""
    kwargs = {"use_reentrant": False}   # the reentrant kind breaks DDP's gradient hooks
    if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.2x; older only has the old name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_distributed(device: str):
    """(rank, world, device, whether we created the process group) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        return 0, 1, dev, False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev, created


# ================================================================ data


def build_inputs(processor, forget: list[Sample], retain: list[Sample], max_length, idk_answer: str,
                 pool_dir, reader: RefCacheReader | None = None, method: str = "") -> Inputs:
    """Tokenise every sample once; images stay encoded and are decoded per micro-batch by the loader.

    With `reader` (the open reference cache of a method that uses one) the forget
    examples are checked against the cache and kept as CachedExamples (no tokens
    held: the cache has them); `method` names the cached columns that must be there.
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
                  images=images, processor=processor, reader=reader)


SETUP_CHUNK = 1024   # samples tokenised together when checking them against the cache (bounds setup memory)


def build_cached_examples(processor, samples: list[Sample], reader: RefCacheReader, image_row, max_length,
                          idk_answer: str, method: str) -> CachedExamples:
    """The forget samples as CachedExamples, after checking every one against the cache.

    One pass in cache order, SETUP_CHUNK samples at a time, keeping nothing per
    sample but its slot and image row: each is tokenised as stage one did (an
    empty answer or a too-long sequence fails here, as does a bad image in
    `image_row`), must be cached with the same question, prompt ids and answer
    tokens, and must carry the reference log-likelihoods the method needs.
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
    needed = {"npo": ("ref_logp_own",), "idkpo": ("ref_logp_own", "ref_logp_idk")}.get(method, ())
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
            _check_shard_rows(reader, pos, rows, needed, method, cache_dir)
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


def _compact(ids: list[int]) -> np.ndarray:
    """int32 token ids: a tenth of a Python list's memory (LLaVA prompts carry ~600 image tokens each)."""
    return np.asarray(ids, np.int32)


def needs_cache(method: str, spec) -> bool:
    return method in ("npo", "idkpo") or (method == "viker" and not spec.online)


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
    """'k (config 3, cache 5)' for each of k, K, seed, reference and pool the cache was made otherwise."""
    want = dict(expected)
    if want.get("reference") == "own":
        want["k"] = 1   # precompute forces k=1 for the own-image reference
    found = []
    for key, name in (("k", "precompute.k"), ("K", "precompute.top_k"), ("seed", "precompute.seed"),
                      ("reference", "precompute.reference")):
        if key in want and str(settings.get(key)) != str(want[key]):
            found.append(f"{name} (config {want[key]}, cache {settings.get(key)})")
    cached_pool = recorded.get("parts", {}).get("reference_pool")
    if (want.get("reference", "pool") == "pool" and settings.get("reference") == "pool" and pool_dir
            and Path(pool_dir).is_dir() and cached_pool is not None
            and hash_files(pool_files(pool_dir)) != cached_pool):   # by content: a copied pool is the same pool
        found.append(f"precompute.pool (config {pool_dir}, cache {settings.get('pool') or 'another pool'})")
    return found


def open_cache(cache_dir, model_dir, samples: list[Sample], method: str, pool_dir, idk_answer: str,
               recorded: dict | None = None) -> tuple[RefCacheReader, dict]:
    """The open reader of a cache made for this run, and what the cache is (fingerprint, settings).

    `recorded`: the fingerprint an earlier `check_cache` already accepted (skips
    hashing again). The samples are checked against it by build_cached_examples.
    """
    if recorded is None:
        recorded = check_cache(cache_dir, model_dir, samples, pool_dir)
    cached_idk = recorded.get("parts", {}).get("idk_answer")
    if method == "idkpo" and cached_idk is not None and cached_idk != idk_answer:
        raise TrainError(f"reference cache {cache_dir} scored the idk answer {cached_idk!r}, "
                         f"this run uses {idk_answer!r}")
    reader = RefCacheReader(cache_dir)
    return reader, {"fingerprint": recorded.get("digest"), "settings": reader.settings}


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
            ref = self.reader.get(self.examples.sample_id(i), stored=True)
            ex = self.examples.example(i, ref)
            idk = self.idk.example(i, ref) if self.idk is not None else None
        else:   # held tokens: no cache (with one, build_inputs makes CachedExamples)
            ex, ref = self.examples[i], None
            idk = self.idk[i] if self.idk is not None else None
        return i, self.images[ex.image], ex, idk, ref


class Collate:
    """Decode a batch's images and pad its references (in the DataLoader worker, off the training loop).

    The batch's examples come back with `image` renumbered to their row of the batch's pixels.
    """

    def __init__(self, processor, method: str):
        self.processor, self.method = processor, method

    def __call__(self, items) -> dict:
        # numpy, not torch: a worker hands torch tensors over one shared-memory segment each,
        # which costs more than pickling these few arrays (measured: 1.6k vs 4.5k samples/s).
        rows = [item[0] for item in items]
        forget = [dataclasses.replace(ex, image=j) for j, (_, _, ex, _, _) in enumerate(items)]
        images = [load_image(data, f"sample {ex.sample_id}") for (_, data, _, _, _), ex in zip(items, forget)]
        out = {"rows": rows, "examples": forget, "pixels": pixel_values(self.processor, images).numpy()}
        if items[0][3] is not None:
            out["idk"] = [dataclasses.replace(idk, image=j) for j, (_, _, _, idk, _) in enumerate(items)]
        cached = [item[4] for item in items]
        if cached and cached[0] is not None:
            if self.method == "viker":
                out["refs"] = pad_stored(cached, max(len(ex.ids) - ex.start for ex in forget))
            if self.method in ("npo", "idkpo"):
                out["ref_logp_own"] = np.array([r.ref_logp_own for r in cached], np.float32)
            if self.method == "idkpo":
                out["ref_logp_idk"] = np.array([r.ref_logp_idk for r in cached], np.float32)
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
            generator=torch.Generator().manual_seed(0))
        self.iterator = iter(self.loader)

    def next(self, rows: list[int]) -> dict:
        got = next(self.iterator)
        if got["rows"] != rows:
            raise RuntimeError(f"data loader out of step with its stream ({got['rows'][:4]} vs {rows[:4]})")
        return got


def make_loaders(inputs: Inputs, streams: dict[str, Stream], batch_size: int, method: str) -> dict[str, Loader]:
    loaders = {"forget": Loader(ExampleData(inputs.forget, inputs.images, inputs.reader, inputs.idk),
                                Collate(inputs.processor, method), streams["forget"], batch_size, inputs.workers)}
    if inputs.retain:
        loaders["retain"] = Loader(ExampleData(inputs.retain, inputs.images, None),
                                   Collate(inputs.processor, method), streams["retain"], batch_size, inputs.workers)
    return loaders


def next_micro_batch(inputs: Inputs, streams: dict[str, Stream], batch_size: int, method: str) -> MicroBatch:
    """The next micro-batch; leaves its images in inputs.bank, rows renumbered from 0 (forget, then retain)."""
    if inputs.loaders is None:   # made here, after a resumed run has restored the streams
        inputs.loaders = make_loaders(inputs, streams, batch_size, method)
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


# ================================================================ forward and losses


class AnswerLogits(torch.nn.Module):
    """answer_logits as a module, so DDP sees (and synchronises) the gradient forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, answer_pos, pixel_values):
        # answer_logits reads only these three fields of the batch.
        batch = TextBatch(input_ids, attention_mask, answer_pos, answer_ids=None, answer_mask=None)
        return answer_logits(self.model, batch, pixel_values)


@contextlib.contextmanager
def frozen(model):
    """The vanilla model: adapter off, no grad, eval mode (no dropout draws, so no RNG is consumed)."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter(), torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _dtype_of(model) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if not p.requires_grad)


def forward_parts(net, model, parts: dict[str, list[Example]], inputs: Inputs, dev):
    """One gradient forward over every part (forget, idk, retain) concatenated.

    One call, not one per part: DDP synchronises one forward per backward, and
    one larger batch is faster. Returns name -> (logits, answer ids, mask),
    each sliced back to that part's own answer width.
    """
    examples = [ex for part in parts.values() for ex in part]
    batch = make_text_batch([ex.ids for ex in examples], [ex.start for ex in examples], inputs.pad_id).to(dev)
    pixels = inputs.bank[[ex.image for ex in examples]].to(dev, _dtype_of(model))
    logits = net(batch.input_ids, batch.attention_mask, batch.answer_pos, pixels)
    out, row = {}, 0
    for name, part in parts.items():
        width = max(len(ex.ids) - ex.start for ex in part)
        rows = slice(row, row + len(part))
        out[name] = (logits[rows, :width], batch.answer_ids[rows, :width], batch.answer_mask[rows, :width])
        row += len(part)
    return out


def frozen_logits(model, examples: list[Example], inputs: Inputs, dev, images=None):
    """Vanilla-model answer logits; `images` overrides the examples' own image rows (pool pixels)."""
    batch = make_text_batch([ex.ids for ex in examples], [ex.start for ex in examples], inputs.pad_id).to(dev)
    pixels = images if images is not None else inputs.bank[[ex.image for ex in examples]]
    with frozen(model):
        return answer_logits(model, batch, pixels.to(dev, _dtype_of(model))), batch


def online_references(model, examples: list[Example], inputs: Inputs, spec: LossSpec, dev) -> Refs:
    """R for a micro-batch during training: k frozen forwards per sample, averaged like stage one.

    Top-K probabilities are rounded to float16 as the cache stores them, so the
    online and cached paths train on the same numbers.
    """
    k = spec.k
    repeated = [ex for ex in examples for _ in range(k)]
    picks = [j for ex in examples for j in draw_reference_images(ex.sample_id, len(inputs.pool), k, spec.ref_seed)]
    logits, batch = frozen_logits(model, repeated, inputs, dev, images=inputs.pool[picks])
    B, T = len(examples), logits.shape[1]
    avg = torch.softmax(logits.float(), dim=-1).view(B, k, T, -1).mean(1)
    idx, prob, tail, entropy = summarise(avg, spec.top_k)
    mask = batch.answer_mask.view(B, k, T)[:, 0] > 0
    prob = prob.half().float()
    return Refs(torch.where(mask[..., None], idx, 0), torch.where(mask[..., None], prob, 0.0),
                torch.where(mask, tail, 1.0), torch.where(mask, entropy, 0.0))


def micro_batch_loss(net, model, mb: MicroBatch, spec: LossSpec, inputs: Inputs, dev):
    """(scalar loss for this micro-batch, per-example diagnostics named forget/... and retain/...)."""
    method = spec.method
    # Frozen-model targets first: the gradient forward's activations are not alive during them.
    refs = vanilla = None
    if method == "viker":
        refs = online_references(model, mb.forget, inputs, spec, dev) if spec.online else mb.refs.to(dev)
    kl_retain = method == "kl_min" or spec.retain_term == "kl"
    if kl_retain:
        vanilla, _ = frozen_logits(model, mb.retain, inputs, dev)
    parts = {"forget": mb.forget}
    if method == "idkpo":
        parts["idk"] = mb.idk
    if mb.retain:
        parts["retain"] = mb.retain
    out = forward_parts(net, model, parts, inputs, dev)
    logits, labels, mask = out["forget"]

    if method == "viker":
        lam_t = entropy_token_lambda(refs.entropy, mask, spec.lam) if spec.token_lambda else None
        forget, d = viker_loss(logits, labels, mask, refs.topk_idx, refs.topk_prob, refs.tail_mass, spec.lam,
                               kind=spec.regulariser, use_ga=spec.use_ga, token_lambda=lam_t)
    elif method == "npo":
        ll_cur, ll_ref = sequence_logprob(logits, labels, mask), mb.ref_logp_own.to(dev)
        if spec.convention == "mllmu":      # per-token mean log-ratio (losses.LOSS_CONVENTIONS)
            ll_cur, ll_ref = per_token(ll_cur, mask), per_token(ll_ref, mask)
        forget, d = npo_loss(ll_cur, ll_ref, spec.beta)
    elif method == "idkpo":
        idk_logits, idk_labels, idk_mask = out["idk"]
        beta, scale = idkpo_scale(spec.convention, spec.beta, spec.idk_beta)
        forget, d = idkpo_loss(sequence_logprob(idk_logits, idk_labels, idk_mask), mb.ref_logp_idk.to(dev),
                               sequence_logprob(logits, labels, mask), mb.ref_logp_own.to(dev), beta, scale=scale)
    else:
        forget, d = ga_loss(logits, labels, mask)
    total = forget.mean()
    diags = {"forget/loss": forget, **{"forget/" + _short(k, "forget_"): v for k, v in d.items()}}

    if "retain" in out:
        r_logits, r_labels, r_mask = out["retain"]
        if kl_retain:
            kl, d = kl_retain_loss(r_logits, vanilla, r_mask)
            # KL_Min's KL has weight 1; ViKeR+KL weighs it like ViKeR+NLL's NLL (alpha, 1 when unset).
            kl_weight = (spec.retain_weight or 1.0) if spec.retain_term == "kl" else 1.0
            total = total + kl_weight * kl.mean()
            diags.update({"retain/" + _short(k, "retain_"): v for k, v in d.items()})
        weight = spec.retain_weight or retain_nll_weight(spec.convention, method, spec.retain_term)
        if spec.retain_term == "kl":
            weight = 0.0              # retain_weight is the KL's alpha here, not an added NLL
        if weight > 0:
            nll, d = nll_loss(r_logits, r_labels, r_mask)
            total = total + weight * nll.mean()
            diags.update({"retain/" + _short(k, "retain_"): v for k, v in d.items()})
    return total, diags


def _short(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


# ================================================================ outputs and checkpoints


def describe_run(cfg, method, model_dir, data_root, forget_split, retain_split, cache_dir, cache: dict,
                 pool_dir, idk_answer, spec: LossSpec, world: int, steps: int) -> dict:
    import peft
    import transformers
    run = {"method": method, "train": dataclasses.asdict(cfg), "steps": steps, "model_dir": str(model_dir),
           "data_root": str(data_root), "forget_split": forget_split, "retain_split": retain_split,
           "cache_dir": str(cache_dir) if cache_dir else None, "cache_fingerprint": cache.get("fingerprint"),
           "cache_settings": cache.get("settings"),
           "pool_dir": str(pool_dir) if pool_dir else None, "idk_answer": idk_answer, "world_size": world,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__}}
    if spec.online:
        run["online_reference"] = {"k": spec.k, "K": spec.top_k, "seed": spec.ref_seed}
    return run


# Keys that may change between an interrupted run and its resumption.
_RESUMABLE = {"output", "save_every", "merge"}


def _run_identity(run: dict) -> dict:
    ident = {k: v for k, v in run.items() if k not in ("versions", "train")}
    ident["train"] = {k: v for k, v in run["train"].items() if k not in _RESUMABLE}
    return ident


# A run's published results; another run's are refused (or removed by --overwrite) at the start.
RESULTS = ("adapter", "train_config.json", "merged")
# The run's temporary area: everything is written here first and renamed into place.
TMP_AREA = ".tmp"


def claim_output(out: Path, resume: bool, overwrite: bool, remove: bool) -> None:
    """Refuse an output directory holding another run's results; with overwrite remove them (remove=True)."""
    if resume and overwrite:
        raise TrainError("--resume continues the run in train.output, --overwrite discards it: choose one")
    found = [name for name in RESULTS if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise TrainError(f"train.output {out} holds another run's results ({', '.join(found)}): pass "
                         f"--overwrite to replace them, --resume to continue that run, or choose another "
                         f"train.output")
    if remove:
        for name in RESULTS + (CHECKPOINT, "log.jsonl"):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def remove_temporary(out: Path) -> None:
    """The run's temporary area and any half-renamed directories it left."""
    for path in [out / TMP_AREA] + [out / f"{name}.tmp" for name in ("adapter", "merged", CHECKPOINT)]:
        shutil.rmtree(path, ignore_errors=True)


def adapter_files_digest(adapter_dir: Path) -> str:
    """sha256 over the adapter directory's files (names and contents), as viker evaluate recomputes it."""
    return hash_files([p for p in Path(adapter_dir).iterdir() if p.is_file()], root=adapter_dir)


def publish(out: Path, model, run: dict, result: dict) -> str:
    """Write the adapter and train_config.json in the temporary area, then rename both into place.

    train_config.json records the adapter's file digest, so an adapter that is
    not the one it describes (a crash between the two renames, an older run's
    adapter) is refused by viker evaluate instead of being mislabeled.
    """
    area = out / TMP_AREA
    shutil.rmtree(area, ignore_errors=True)
    area.mkdir(parents=True)
    model.save_pretrained(str(area / "adapter"), safe_serialization=True)
    digest = adapter_files_digest(area / "adapter")
    atomic_write_json(area / "train_config.json", {**run, "result": {**result, "adapter_sha256": digest},
                                              "adapter_sha256": digest})
    os.replace(area / "train_config.json", out / "train_config.json")
    _replace_dir(area / "adapter", out / "adapter")
    shutil.rmtree(area, ignore_errors=True)
    return digest


def prepare_output(out: Path, run: dict, resume: bool, start: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.jsonl"
    if resume:
        # The interrupted run may have logged steps past its checkpoint: they are redone.
        lines = log.read_text().splitlines() if log.is_file() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= start]
        log.write_text("".join(line + "\n" for line in kept))
    else:
        log.write_text("")
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)   # a stale one must never be resumed later


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished tmp directory in: a crash leaves the old or the new one, never half of one."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(model, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    _replace_dir(tmp, path)
    return path


def save_merged(model, processor, path: Path) -> Path:
    """Base + LoRA folded into plain weights (the peft wrapper is consumed: call last)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged = model.merge_and_unload()
    merged.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    _replace_dir(tmp, path)
    return path


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def adapter_digest(model) -> str:
    """sha256 of the trainable weights' bytes: equal across ranks and runs iff the adapters are identical."""
    import hashlib
    h = hashlib.sha256()
    for name, tensor in sorted(trainable_state(model).items()):
        h.update(name.encode())
        h.update(tensor.float().numpy().tobytes())
    return h.hexdigest()


def _rank_state(streams: dict[str, Stream]) -> dict:
    state = {"torch_rng": torch.get_rng_state(), "streams": {k: s.state_dict() for k, s in streams.items()}}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(path: Path, step: int, model, optimizer, scheduler, streams, run: dict, rank: int,
                    world: int) -> None:
    """Adapter, optimizer, schedule, every RNG and data position: enough to continue bit-identically."""
    ranks = [_rank_state(streams)]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, _rank_state(streams))
    if rank == 0:
        tmp = path.parent / TMP_AREA / path.name
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        torch.save({"step": step, "run": _run_identity(run), "trainable": trainable_state(model),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "ranks": ranks},
                   tmp / "state.pt")
        # The checkpoint's adapter with its own description: evaluable, labeled with the steps it has.
        digest = adapter_files_digest(tmp / "adapter")
        atomic_write_json(tmp / "train_config.json", {**run, "steps": step, "checkpoint": True,
                                                 "result": {"steps": step, "adapter_sha256": digest},
                                                 "adapter_sha256": digest})
        _replace_dir(tmp, path)
    if world > 1:
        dist.barrier()


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    names = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            names += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            names.append(prefix + key)
    return names


def load_checkpoint(path: Path, model, optimizer, scheduler, streams, run: dict, rank: int, world: int) -> int:
    if not (path / "state.pt").is_file() and (path.with_name(path.name + ".old") / "state.pt").is_file():
        path = path.with_name(path.name + ".old")    # a crash fell between the two renames
    if not (path / "state.pt").is_file():
        raise TrainError(f"no checkpoint to resume from in {path} (set train.save_every > 0)")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    differing = _differences(_run_identity(run), state["run"])
    if differing:
        raise TrainError(f"checkpoint in {path} is from a different run; differs on: {', '.join(differing)}")
    if len(state["ranks"]) != world:
        raise TrainError(f"checkpoint in {path} was written by {len(state['ranks'])} processes, not {world}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    mine = state["ranks"][rank]
    torch.set_rng_state(mine["torch_rng"])
    if "cuda_rng" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda_rng"])
    for name, stream in streams.items():
        stream.load_state_dict(mine["streams"][name])
    return int(state["step"])
