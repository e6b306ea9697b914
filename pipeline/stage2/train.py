"""Stage two (`viker train`): the recipe of LoRA unlearning, setup -> loop -> save, in one explicit loop.

`train` reads top to bottom like torchtune's `lora_dpo_single_device.py`:

    setup   load the vanilla model and wrap its language model in LoRA, read the
            forget (and retain) samples, open the stage-one reference cache and check
            it was made for this model and forget set (inputs.py), let the method
            prepare its gradient edit (MMUnlearner's saliency mask), build the
            seeded streams (stream.py), the optimizer and the linear schedule;
    loop    micro-batches, gradient accumulation, the method's gradient edit,
            clipping, AdamW, one log line a step, a checkpoint every
            train.save_every steps (checkpoint.py);
    save    the adapter and train_config.json, published together.

What each method computes on a micro-batch is in methods/ (a module a method;
the losses themselves in losses.py); this file only runs the steps.

Multi-process: launched by torchrun / accelerate launch (read through
accelerate's PartialState, models/distributed.py) each rank takes forget items
rank::world of every epoch's shuffled order, the gradients are averaged by
torch DDP, and rank 0 alone logs and saves. The gradient forward's autocast
follows `accelerate launch --mixed_precision` (default: bf16 on CUDA).
"""
from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import TrainConfig
from pipeline.data.loaders import default_splits, read_profiles, report_drops
from pipeline.data.records import forget_samples
from pipeline.models.distributed import autocast, distributed_state, release
from pipeline.models.modeling import load_model, wrap_lora
from pipeline.progress import progress as tqdm  # plain log lines off a terminal

from .checkpoint import (CHECKPOINT, adapter_digest, append_log, claim_output, describe_run, load_checkpoint,
                         prepare_output, publish, remove_temporary, save_checkpoint, save_merged)
from .errors import TrainError, TrainingDiverged
from .inputs import Inputs, check_cache, open_inputs
from .methods import (AnswerLogits, LossSpec, check_options, frozen_dtype, get_method, loss_spec, micro_batch_loss,
                      resolve_method)
from .stream import Stream, close_loaders, make_streams, next_micro_batch


def train(model_dir, data_root, forget_split: str, retain_split: str, cache_dir, cfg: TrainConfig, *,
          pool_dir=None, idk_answer: str = "I don't know.", dtype: str = "auto", device: str = "auto",
          resume: bool = False, ref_k: int = 5, ref_top_k: int = 64, ref_seed: int = 0, ref_span: str = "none",
          benchmark: str = "mllmu", overwrite: bool = False, expect_cache: dict | None = None,
          log=print, train_root: str = "", strict: bool = False, config: dict | None = None) -> dict:
    """Unlearn the forget split with LoRA; write the adapter, log and config to `cfg.output`.

    `ref_k`, `ref_top_k`, `ref_seed`, `ref_span` are the reference settings of online ViKeR
    (the cache records its own). `benchmark` (mllmu | clear) picks the data
    reader; `train_root` a directory in MLLMU-Bench's baseline_train_split layout
    holding the training QA (data.train_root). `expect_cache` ({k, K, seed, reference}, the config's precompute
    settings): a cache made otherwise is refused unless cfg.use_cache_settings.
    A directory holding another run's adapter or train_config.json is refused
    unless `overwrite` (removes them first) or `resume`. The adapter and
    train_config.json appear together at the end (after a NaN stop: the last
    good adapter, with the steps done). `config` (the resolved configuration,
    jobs.runs.config_record) is recorded in train_config.json. Forget and retain
    items the reader drops for their content are named in the log and in
    train_config.json (`dropped`); `strict` (data.strict) refuses any. Returns steps,
    timings, final loss and paths.
    """
    method = resolve_method(cfg.method)
    spec = loss_spec(cfg, method, ref_k, ref_top_k, ref_seed, ref_span)
    check_options(cfg, method, cache_dir, pool_dir)
    out = Path(cfg.output)
    claim_output(out, resume, overwrite, remove=False)   # refuse before any work, remove on rank 0 below
    group = distributed_state(device)   # torchrun / accelerate launch: joins (or forms) the process group
    rank, world, dev = group.rank, group.world, group.device
    try:
        autocast(dev)   # a bad or unsupported ACCELERATE_MIXED_PRECISION fails here, before the model loads
        run = setup(model_dir, data_root, forget_split, retain_split, cache_dir, cfg, spec, rank=rank,
                    world=world, dev=dev, pool_dir=pool_dir, idk_answer=idk_answer, dtype=dtype, resume=resume,
                    benchmark=benchmark, expect_cache=expect_cache, log=log, train_root=train_root,
                    strict=strict)
        if rank == 0:
            claim_output(out, resume, overwrite, remove=True)
            prepare_output(out, run.description, resume, run.start)
        if config is not None:      # the resolved configuration, recorded beside the adapter (not part of its identity)
            run.description["config"] = config
        try:
            last_loss, seconds = loop(run)
        finally:
            close_loaders(run.inputs)
        return save(run, last_loss, seconds)
    finally:
        if rank == 0:
            remove_temporary(out)   # a failed save (disk full) must not leave half an adapter behind
        release(group)   # only a group this call formed: train may run inside the caller's


@dataclass
class Run:
    """One training run as setup() leaves it: what the loop reads, updates and saves."""
    cfg: TrainConfig
    spec: LossSpec
    out: Path
    rank: int
    world: int
    dev: torch.device
    model: torch.nn.Module         # the vanilla model with LoRA; its adapter off is the frozen model
    processor: object
    inputs: Inputs
    net: torch.nn.Module           # the gradient forward (DDP-wrapped under several processes)
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    streams: dict[str, Stream]
    description: dict              # what train_config.json records (and a checkpoint must match)
    n_forget: int
    steps: int
    start: int                     # the step a resumed run continues after (0 for a fresh one)
    edit: object = None            # the method's gradient edit (Method.gradient_edit), applied before clipping

    @property
    def method(self) -> str:
        return self.spec.method


# ================================================================ setup


def setup(model_dir, data_root, forget_split, retain_split, cache_dir, cfg: TrainConfig, spec: LossSpec, *,
          rank, world, dev, pool_dir, idk_answer, dtype, resume, benchmark, expect_cache, log, train_root,
          strict: bool = False) -> Run:
    """The model, the inputs, the optimizer and the streams, in the order that fixes every random draw."""
    method = get_method(spec.method)   # what it needs is asked of it (methods/)
    seed_everything(cfg.seed)
    dropped: list = []
    forget = forget_samples(read_profiles(data_root, forget_split, benchmark, train_root=train_root, dropped=dropped))
    retain = []
    if method.needs_retain(spec):   # read before the model loads: a refused item must cost no model load
        retain_split = retain_split or default_splits(benchmark, forget_split)["retain"]
        retain = forget_samples(read_profiles(data_root, retain_split, benchmark, train_root=train_root,
                                              dropped=dropped))
    dropped = report_drops(dropped, strict, log if rank == 0 else None, "train")
    recorded = None
    if method.uses_cache(spec):
        # Refuse a cache for another model or forget set before paying for loading the model.
        recorded = check_cache(cache_dir, model_dir, forget, pool_dir, expected=expect_cache,
                               use_cache_settings=cfg.use_cache_settings, log=log if rank == 0 else None)
    model, processor = lora_model(model_dir, cfg, dtype, dev)
    # Same LoRA init on every rank (seeded above); different dropout masks per rank from here.
    torch.manual_seed(cfg.seed + rank)
    inputs, cache = open_inputs(processor, model, forget, retain, method, use_cache=method.uses_cache(spec),
                                online=spec.online, cache_dir=cache_dir, model_dir=model_dir, pool_dir=pool_dir,
                                idk_answer=idk_answer, recorded=recorded)
    if inputs.pool is not None:   # each pool image is reused for many samples: keep it on the device
        inputs.pool = inputs.pool.to(dev, frozen_dtype(model))
    inputs.workers = cfg.data_workers
    n_forget = len(forget)
    del forget, retain   # the samples are not needed past setup (memory must not grow with their number)
    if n_forget < world:
        raise TrainError(f"{n_forget} forget samples cannot be split over {world} processes")
    # Made from the vanilla model (adapter off, eval mode: no random draw), so the run's streams are untouched.
    edit = method.gradient_edit(model, inputs, spec, cfg.batch_size, dev, rank=rank, world=world,
                                log=log if rank == 0 else None)

    steps = total_steps(cfg, n_forget, world)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = linear_schedule(optimizer, cfg.warmup_steps, steps)
    streams = make_streams(inputs, cfg.seed, rank, world)
    net = gradient_net(model, world, dev)
    description = describe_run(cfg, method.name, model_dir, data_root, forget_split, retain_split, cache_dir, cache,
                               pool_dir, idk_answer, spec, world, steps)
    description["benchmark"] = benchmark
    description["dropped"] = dropped   # follows from data_root and the splits: not part of the run's identity
    if edit is not None:   # part of the run's identity: a resumed run must make the same one
        description["gradient_edit"] = edit.summary
    run = Run(cfg, spec, Path(cfg.output), rank, world, dev, model, processor, inputs, net, params, optimizer,
              scheduler, streams, description, n_forget, steps, start=0, edit=edit)
    if resume:
        run.start = load_checkpoint(run.out / CHECKPOINT, model, optimizer, scheduler, streams, description,
                                    rank, world)
    return run


def lora_model(model_dir, cfg: TrainConfig, dtype: str, dev: torch.device):
    """(the vanilla model with LoRA on its language model, in training mode; its processor)."""
    model, processor = load_model(model_dir, dtype=dtype, device=str(dev))
    if cfg.grad_checkpointing:
        enable_checkpointing(model)
    model = wrap_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)
    model.train()
    return model, processor


def gradient_net(model, world: int, dev: torch.device) -> torch.nn.Module:
    """The gradient forward as a module; under several processes wrapped in DDP, which averages gradients."""
    net = AnswerLogits(model)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=False)
    return net


# ================================================================ loop


def loop(run: Run) -> tuple[float, float]:
    """Steps start+1 .. steps: accumulate, edit the gradients, clip, stop on a non-finite loss, step, log, checkpoint.

    Returns the last step's loss and the loop's seconds.
    """
    cfg, log_path = run.cfg, run.out / "log.jsonl"
    t_loop, last_loss = time.perf_counter(), float("nan")
    bar = tqdm(range(run.start + 1, run.steps + 1), initial=run.start, total=run.steps, desc=f"train {run.method}",
               leave=False, disable=run.rank != 0)
    for step in bar:
        t_step = time.perf_counter()
        loss, diags = accumulate(run)
        if run.edit is not None:   # before clipping: the norm clipped and logged is that of the step taken
            run.edit()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            run.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
        last_loss = float(loss)
        if not (math.isfinite(last_loss) and math.isfinite(grad_norm)):
            stop_diverged(run, step, last_loss, grad_norm)
        lr = run.scheduler.get_last_lr()[0]
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t_step
        if run.rank == 0:
            bar.set_postfix(loss=f"{last_loss:.4f}")
            epoch = round(step * cfg.batch_size * cfg.grad_accum * run.world / run.n_forget, 4)
            append_log(log_path, {"step": step, "epoch": epoch, "lr": lr, "loss": last_loss, "grad_norm": grad_norm,
                                  **{k: float(torch.cat(v).mean()) for k, v in sorted(diags.items())},
                                  "sec_per_step": round(seconds, 4)})
        if cfg.save_every > 0 and step % cfg.save_every == 0 and step < run.steps:
            save_checkpoint(run.out / CHECKPOINT, step, run.model, run.optimizer, run.scheduler, run.streams,
                            run.description, run.rank, run.world)
    bar.close()
    return last_loss, time.perf_counter() - t_loop


def accumulate(run: Run) -> tuple[torch.Tensor, dict]:
    """One step's gradients over cfg.grad_accum micro-batches: (mean loss over ranks, diagnostics)."""
    cfg = run.cfg
    loss_sum = torch.zeros((), device=run.dev)
    diags = defaultdict(list)
    for micro in range(cfg.grad_accum):
        mb = next_micro_batch(run.inputs, run.streams, cfg.batch_size, run.method)
        # DDP averages gradients only on the last micro-batch of the step.
        sync = (run.net.no_sync() if run.world > 1 and micro < cfg.grad_accum - 1 else contextlib.nullcontext())
        with sync:
            with autocast(run.dev):
                loss, d = micro_batch_loss(run.net, run.model, mb, run.spec, run.inputs, run.dev)
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach() / cfg.grad_accum
        for key, value in d.items():
            diags[key].append(value.detach().float())
    if run.world > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= run.world
    return loss_sum, diags


def stop_diverged(run: Run, step: int, loss: float, grad_norm: float) -> None:
    """No optimizer step on a bad loss: publish step-1's adapter (the one in memory), then raise."""
    run.optimizer.zero_grad(set_to_none=True)
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
    if run.rank == 0:   # the steps done, recorded as such: never the steps planned
        publish(run.out, run.model, {**run.description, "steps": step - 1, "planned_steps": run.steps},
                {"method": run.method, "steps": step - 1, "start_step": run.start, "final_loss": None,
                 "stopped": f"diverged at step {step}: {what}", "adapter": str(run.out / "adapter")})
    raise TrainingDiverged(f"training stopped at step {step}: {what}; the adapter from step "
                           f"{step - 1} is saved in {run.out / 'adapter'} (lower train.lr?)")


# ================================================================ save


def save(run: Run, last_loss: float, seconds: float) -> dict:
    """Publish the adapter and train_config.json (rank 0), drop the checkpoint; the run's result."""
    out = run.out
    result = {"method": run.method, "steps": run.steps, "start_step": run.start, "seconds": round(seconds, 3),
              "sec_per_step": seconds / max(1, run.steps - run.start), "final_loss": last_loss,
              "output": str(out), "adapter": str(out / "adapter"), "log": str(out / "log.jsonl"),
              "train_config": str(out / "train_config.json"), "adapter_digest": adapter_digest(run.model),
              "cache_fingerprint": run.description.get("cache_fingerprint")}   # None: the method read no cache
    if run.rank == 0:
        if run.cfg.merge:
            result["merged"] = str(save_merged(run.model, run.processor, out / "merged"))
        result["adapter_sha256"] = publish(out, run.model, run.description, result)
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)   # the run is complete: nothing to resume
    if run.world > 1:
        dist.barrier()
    return result


# ================================================================ the pieces setup uses


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
