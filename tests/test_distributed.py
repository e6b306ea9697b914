"""models/distributed.py: the process's place among its peers (accelerate's PartialState) and the autocast choice."""
from __future__ import annotations

import contextlib
import importlib
import warnings
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import PartialState

from pipeline.models import distributed as D

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
                 "MV2_COMM_WORLD_SIZE", "ACCELERATE_TORCH_DEVICE", D.MIXED_PRECISION_ENV)
CUDA = SimpleNamespace(type="cuda")   # a CUDA device as far as the choice is concerned, on a machine without one
CPU = torch.device("cpu")


@pytest.fixture
def single(monkeypatch):
    """One process, no launcher: none of its variables set, accelerate's singleton fresh before and after."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    PartialState._reset_state()
    yield monkeypatch
    PartialState._reset_state()


# ---------------------------------------------------------------- precision

@pytest.mark.parametrize("value, cuda, cpu", [
    (None, torch.bfloat16, None),          # unset: what viker always did
    ("no", None, None),
    ("bf16", torch.bfloat16, torch.bfloat16),
    ("BF16", torch.bfloat16, torch.bfloat16),
    ("fp16", torch.float16, None),         # accelerate's fp16 is GPU-only
])
def test_the_launchers_choice_picks_the_autocast_dtype(single, value, cuda, cpu):
    if value is not None:
        single.setenv(D.MIXED_PRECISION_ENV, value)
    choice = D.mixed_precision()
    assert choice == (value.lower() if value else None)
    assert D.autocast_dtype(CUDA, choice) == cuda and D.autocast_dtype("cuda", choice) == cuda
    assert D.autocast_dtype(CPU, choice) == cpu


def test_an_empty_variable_is_no_choice(single):
    single.setenv(D.MIXED_PRECISION_ENV, " ")
    assert D.mixed_precision() is None


@pytest.mark.parametrize("value", ["bogus", "fp8", "fp32"])
def test_an_unknown_choice_is_a_one_line_error_naming_the_variable(single, value):
    single.setenv(D.MIXED_PRECISION_ENV, value)
    with pytest.raises(ValueError) as err:
        D.autocast(CPU)
    message = str(err.value)
    assert "\n" not in message and D.MIXED_PRECISION_ENV in message and repr(value) in message
    assert all(p in message for p in D.PRECISIONS)


def test_the_autocast_context_on_the_cpu(single):
    assert isinstance(D.autocast(CPU), contextlib.nullcontext)     # unset: none, as before
    single.setenv(D.MIXED_PRECISION_ENV, "bf16")
    ctx = D.autocast(CPU)
    assert isinstance(ctx, torch.autocast) and ctx.device == "cpu" and ctx.fast_dtype == torch.bfloat16
    with ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    single.setenv(D.MIXED_PRECISION_ENV, "no")
    assert isinstance(D.autocast(CPU), contextlib.nullcontext)
    single.setenv(D.MIXED_PRECISION_ENV, "fp16")
    assert isinstance(D.autocast(CPU), contextlib.nullcontext)     # nothing to scale: no refusal


def test_the_autocast_context_on_cuda(single):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "CUDA is not available ... Disabling autocast" on this machine
        ctx = D.autocast(CUDA)
        assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
        single.setenv(D.MIXED_PRECISION_ENV, "no")
        assert isinstance(D.autocast(CUDA), contextlib.nullcontext)
        single.setenv(D.MIXED_PRECISION_ENV, "fp16")
        with pytest.raises(ValueError, match="GradScaler.*--mixed_precision bf16 or no") as err:
            D.autocast(CUDA)
        assert "\n" not in str(err.value)
        ctx = D.autocast(CUDA, grad_scaler=True)
        assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16


# ---------------------------------------------------------------- the process's state

@pytest.mark.parametrize("setting, device", [("cpu", "cpu"), ("auto", "cuda" if torch.cuda.is_available() else "cpu")])
def test_one_process_is_rank_0_of_1_on_the_settings_device_with_no_group(single, setting, device):
    state = D.distributed_state(setting)
    assert (state.rank, state.world, state.local_rank) == (0, 1, 0)
    assert state.device == torch.device(device) and not state.created_group
    assert not torch.distributed.is_initialized()
    assert PartialState().distributed_type == D.DistributedType.NO and PartialState().backend is None
    D.release(state)   # nothing to release
    assert not torch.distributed.is_initialized()


def test_one_process_keeps_the_cuda_index_it_was_given(single, monkeypatch):
    # accelerate's own choice would be its default device ("cuda", or "cpu" here); the setting wins in one process.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    state = D.distributed_state("cuda:1")
    assert state.device == torch.device("cuda", 1) and (state.rank, state.world, state.created_group) == (0, 1, False)


def test_cuda_asked_for_without_cuda_is_a_one_line_error(single, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(D.ModelError, match="model.device is 'cuda' but torch sees no CUDA device"):
        D.distributed_state("cuda")


def test_importing_the_module_constructs_no_state(single, monkeypatch):
    def constructed(self, *args, **kwargs):
        raise AssertionError("PartialState() ran at import")

    monkeypatch.setattr(PartialState, "__init__", constructed)
    importlib.reload(D)   # runs the module's top level again, as an import does
    assert PartialState._shared_state == {} and not torch.distributed.is_initialized()


def test_train_refuses_a_bad_choice_before_loading_the_model(single, tmp_path, monkeypatch):
    import pipeline.stage2.train as tr
    from pipeline.config import TrainConfig

    def setup(*args, **kwargs):
        raise AssertionError("setup ran: the model would have been loaded")

    monkeypatch.setattr(tr, "setup", setup)
    single.setenv(D.MIXED_PRECISION_ENV, "bogus")
    with pytest.raises(ValueError, match=f"{D.MIXED_PRECISION_ENV}='bogus'"):
        tr.train(tmp_path / "model", tmp_path / "data", "forget_10", "retain_90", None,
                 TrainConfig(method="ga", output=str(tmp_path / "out")), device="cpu")
    assert not torch.distributed.is_initialized()
