"""Where this process stands among its peers, and the mixed precision of its gradient forward.

`distributed_state(device)` gives rank, world size, local rank, the device to
run on and whether the call created the process group; `release(state)`
destroys a group that call created (one that was already there belongs to the
caller). `autocast(device)` is the gradient forward's autocast, chosen by
`accelerate launch --mixed_precision X` (the ACCELERATE_MIXED_PRECISION it sets)
and otherwise as it always was: bf16 on CUDA, none on the CPU.

Why accelerate's `PartialState` and not our own reading of RANK / WORLD_SIZE /
LOCAL_RANK: every launcher spells "you are process r of W" differently
(torchrun and `accelerate launch`, also as a SLURM job's per-node command:
RANK, WORLD_SIZE, LOCAL_RANK; Open MPI, MVAPICH and Intel MPI / mpirun:
OMPI_COMM_WORLD_*, MV2_COMM_WORLD_*, PMI_*; SageMaker; DeepSpeed), and each
needs a backend (nccl on CUDA, gloo or mpi on the CPU), a device per local
rank, and rank/world passed explicitly for CPU groups. `PartialState` is one
well-kept implementation of all of that, tested by the people who write the
launchers; we had three hand-written copies (stage one, stage two, the CLI)
that knew torchrun only and disagreed on the backend. What we keep here is
only viker's own policy: the `model.device` setting wins in a single
process, a group someone else made is theirs to destroy, and the precision
defaults below.

What PartialState does in one process on the CPU (no launcher: LOCAL_RANK and
WORLD_SIZE unset): no backend, DistributedType.NO, process 0 of 1, device
cpu, and no process group is created. With `cpu=False` on a machine with CUDA
it picks the device `cuda` (no set_device) and runs accelerate's nvidia-smi
check for old-driver RTX 40xx multi-GPU boxes. Under a launcher on the CPU it
needs `cpu=True` to form a gloo group (with `cpu=False` and no accelerator it
would quietly report one process), which is why the call below passes the
setting's device type.

PartialState is a process-wide singleton: nothing here constructs it at import,
and `release` resets it after destroying its group, so a later call in the
same process does not report peers it no longer has a group with; it asks the
launcher's environment again. (Re-forming a gloo/nccl default group inside one
torchrun process fails in torch itself, on stale rendezvous keys, as it did
before this module: one run a launched process.)
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

from .modeling import ModelError, resolve_device

# What `accelerate launch --mixed_precision X` (or `accelerate config`) exports to every process.
MIXED_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
PRECISIONS = ("no", "bf16", "fp16")   # accelerate's fp8 needs TransformerEngine/torchao recipes: not supported


@dataclass(frozen=True)
class DistState:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    created_group: bool   # this call initialised the default process group: release() destroys it


def has_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def distributed_state(device: str = "auto") -> DistState:
    """This process's rank, world, local rank and device, forming the process group if a launcher started us.

    `device` is the `model.device` setting (auto | cpu | cuda | cuda:N). In one
    process it is the device used. Under a launcher (torchrun, accelerate
    launch, MPI) its type picks the backend (cpu: gloo, cuda: nccl) and each
    rank runs on accelerate's device for it (cuda:LOCAL_RANK; an N in cuda:N
    is ignored, as one GPU per rank is the point). A process group that
    already exists is used as it is, its rank and size taken from it.
    """
    wanted = resolve_device(device)
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device is {device!r} but torch sees no CUDA device (use auto or cpu)")
    cpu = wanted.type == "cpu"
    had_group = has_group()
    state = PartialState(cpu=cpu)
    if state.distributed_type != DistributedType.NO and not has_group():
        # The singleton outlived its group (destroyed by release() or by the caller): ask the environment again.
        PartialState._reset_state()
        state = PartialState(cpu=cpu)
    if has_group():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = state.process_index, state.num_processes
    if state.distributed_type == DistributedType.NO:
        dev, local = wanted, 0
    else:
        # accelerate names the CPU of rank r torch.device("cpu", 0); models and tensors say plain "cpu".
        dev = torch.device("cpu") if state.device.type == "cpu" else state.device
        local = max(0, state.local_process_index)
    return DistState(rank=rank, world=world, local_rank=local, device=dev,
                     created_group=not had_group and has_group())


def release(state: DistState) -> None:
    """Destroy the process group if `state`'s call created it, and forget accelerate's state with it."""
    if not (state.created_group and has_group()):
        return
    PartialState().destroy_process_group()   # accelerate's: leaves a notebook_launcher's (fork) group alone
    if not has_group():
        PartialState._reset_state()


# ---------------------------------------------------------------- mixed precision

def mixed_precision() -> str | None:
    """The launcher's mixed-precision choice (no | bf16 | fp16), or None when none was made."""
    raw = os.environ.get(MIXED_PRECISION_ENV, "").strip()
    if not raw:
        return None
    choice = raw.lower()
    if choice not in PRECISIONS:
        raise ValueError(f"{MIXED_PRECISION_ENV}={raw!r} is not supported: use one of {', '.join(PRECISIONS)} "
                         f"(accelerate launch --mixed_precision ...)")
    return choice


def autocast_dtype(device, choice: str | None) -> torch.dtype | None:
    """The autocast dtype for a forward on `device` (a torch.device or its type), or None for no autocast.

        choice \\ device   cuda        cpu
        None (unset)      bfloat16    none        what viker always did
        "no"              none        none
        "bf16"            bfloat16    bfloat16    asked for explicitly, as accelerate does on the CPU
        "fp16"            float16     none        accelerate's fp16 is GPU-only: on the CPU it runs fp32
    """
    kind = getattr(device, "type", device)
    if choice is None:
        return torch.bfloat16 if kind == "cuda" else None
    if choice == "no":
        return None
    if choice == "bf16":
        return torch.bfloat16
    if choice == "fp16":
        return None if kind == "cpu" else torch.float16
    raise ValueError(f"{MIXED_PRECISION_ENV}={choice!r} is not supported: use one of {', '.join(PRECISIONS)}")


def autocast(device, *, grad_scaler: bool = False):
    """The gradient forward's autocast context on `device`, as ACCELERATE_MIXED_PRECISION asks (see autocast_dtype).

    fp16 autocast is refused unless the caller scales its loss (`grad_scaler`):
    fp16's range is narrow enough that unscaled gradients underflow to zero and
    overflows must be skipped, not trained on. viker's loops (train, finetune)
    use no GradScaler on purpose: they stop on the first non-finite loss or
    gradient norm (a GradScaler's overflows would look like divergence) and
    their checkpoints hold no scaler state; bf16 has float32's range and needs
    none. So fp16 is a one-line error here, not a silent fp32 run.
    """
    dtype = autocast_dtype(device, mixed_precision())
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == torch.float16 and not grad_scaler:
        raise ValueError(f"{MIXED_PRECISION_ENV}=fp16 is not supported for training (it needs a GradScaler, which "
                         f"viker's loop does not use): launch with --mixed_precision bf16 or no")
    return torch.autocast(getattr(device, "type", device), dtype=dtype)
