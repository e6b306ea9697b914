"""What a run writes, and how a killed run continues where it stopped.

The adapter and train_config.json are written in a temporary area and renamed
into place (publish): a crash leaves the old results or the new ones, never
half of them, and train_config.json records the adapter's digest so that a
mismatched pair is refused by viker evaluate. A checkpoint (train.save_every)
holds the adapter, optimizer, schedule, every RNG and each stream's position:
enough to continue bit-identically. load_checkpoint refuses one from another
run, naming the settings that differ.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.cache.refcache import atomic_write_json, hash_files

from .errors import TrainError
from .methods import LossSpec
from .stream import Stream


CHECKPOINT = "checkpoint"


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
    ident = {k: v for k, v in run.items() if k not in ("versions", "train", "config", "dropped")}
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
