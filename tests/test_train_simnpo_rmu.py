"""SimNPO and RMU on a tiny model: a few steps do what each loss says, and `viker train` runs both.

The model is the demo's shipped vanilla model, which knows the forget answers
(SimNPO does little on answers a model never knew). The losses themselves are
checked by hand in test_losses.py and test_methods.py; here the whole loop runs
(no reference cache: neither method reads one).
"""
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from pipeline.config import MiniConfig, TrainConfig
from pipeline.data.mini import make_mini
from pipeline.data.mllmu import read_split
from pipeline.data.records import forget_samples
from pipeline.jobs import prebuilt
from pipeline.jobs.demo import tokenizer_texts
from pipeline.models.encoding import load_image, pixel_values
from pipeline.models.forward import language_model
from pipeline.models.modeling import load_model
from pipeline.stage1 import precompute as pc
from pipeline.stage2 import losses
from pipeline.stage2 import train as tr
from pipeline.stage2.errors import TrainError
from pipeline.stage2.methods import AnswerLogits, forward_parts, frozen
from pipeline.stage2.methods.forward import decoder_layer, forward_hidden, frozen_hidden
from tests.tiny import crash_on_call, torchrun_two

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The demo's shipped vanilla model (it knows the forget answers) and the miniature benchmark it was made on."""
    torch.set_num_threads(1)
    record = json.loads((prebuilt.SHIPPED / prebuilt.PROVENANCE).read_text())
    mini = json.loads(record["models"]["vanilla"]["stamp"])[0]
    root = make_mini(tmp_path_factory.mktemp("mini"), MiniConfig(**mini))
    assert prebuilt.world_digest(tokenizer_texts(root)) == record["world_sha256"], "not the shipped model's world"
    model_dir = tmp_path_factory.mktemp("vanilla") / "vanilla"
    shutil.copytree(prebuilt.SHIPPED / "vanilla", model_dir)
    return {"root": root, "model": model_dir, "pool": root / "pools" / "people",
            "forget": forget_samples(read_split(root, "forget_10")),
            "retain": forget_samples(read_split(root, "retain_90"))}


def train(w, out, **overrides):
    args = dict(output=str(out), steps=4, batch_size=2, lr=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    args.update(overrides)
    return tr.train(str(w["model"]), str(w["root"]), "forget_10", "retain_90", None, TrainConfig(**args),
                    pool_dir=str(w["pool"]), device="cpu")


def trained_model(monkeypatch):
    """A handle on the peft model train() builds."""
    seen = {}
    original = tr.wrap_lora

    def wrap(*args, **kwargs):
        seen["model"] = original(*args, **kwargs)
        return seen["model"]

    monkeypatch.setattr(tr, "wrap_lora", wrap)
    return seen


def examples(processor, samples):
    """The samples as the forwards take them: (examples, inputs) with every image in the bank."""
    enc = pc.encode_samples(processor, samples, "", None)
    exs = [SimpleNamespace(ids=e.ids, start=e.answer_start, image=i) for i, e in enumerate(enc)]
    bank = pixel_values(processor, [load_image(s.image) for s in samples])
    return exs, SimpleNamespace(bank=bank, pad_id=processor.tokenizer.pad_token_id)


def token_loglik(model, exs, inputs) -> float:
    """Mean per-token answer log-likelihood of the examples under `model` (adapter as it is)."""
    with torch.no_grad():
        logits, labels, mask = forward_parts(AnswerLogits(model), model, {"f": exs}, inputs, CPU)["f"]
    return float(losses.per_token(losses.sequence_logprob(logits, labels, mask), mask).mean())


def log_lines(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def forget_loglik_before_after(w, model):
    _, processor = load_model(w["model"], device="cpu")
    exs, inputs = examples(processor, w["forget"])
    with frozen(model):
        before = token_loglik(model, exs, inputs)
    return before, token_loglik(model.eval(), exs, inputs)


@pytest.mark.parametrize("convention,steps,drop", [("viker", 6, 0.2), ("openunlearning", 6, 0.01)])
def test_simnpo_lowers_the_forget_log_likelihood(world, tmp_path, monkeypatch, convention, steps, drop):
    # viker: the authors' plain loss (beta 2.5); openunlearning: 0.125 x SimNPO (beta 4.5) + NLL(retain), whose
    # retain term (the same answer template) holds the forget answers up: a smaller drop.
    seen = trained_model(monkeypatch)
    train(world, tmp_path / "run", method="simnpo", convention=convention, steps=steps)
    before, after = forget_loglik_before_after(world, seen["model"])
    print(f"SimNPO ({convention}, {steps} steps) forget per-token log-likelihood: {before:.4f} -> {after:.4f}")
    assert before > -0.1, "the vanilla model knows the forget answers"
    assert after < before - drop
    log = log_lines(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert all(math.isfinite(v) for r in log for v in r.values() if isinstance(v, float))
    assert log[-1]["forget/token_nll"] > log[0]["forget/token_nll"]
    if convention == "openunlearning":
        assert all(r["loss"] == pytest.approx(r["forget/loss"] + r["retain/nll"], abs=1e-5) for r in log)
    else:
        assert not [k for k in log[0] if k.startswith("retain/")]


def test_the_loaders_workers_are_gone_when_train_returns_or_fails(world, tmp_path, monkeypatch):
    """A run ends with batches prefetched; left to the garbage collector, each worker's shutdown waited out
    torch's 5 s join timeout (20 s for a forget and a retain loader of two workers, billed to whatever test
    ran next). train() stops them itself, after the last step and after a failure."""
    import gc
    import multiprocessing
    import time
    before = set(multiprocessing.active_children())
    gc.disable()          # what the collector would do later is the point: it must be done already
    try:
        train(world, tmp_path / "ok", method="simnpo", convention="openunlearning", steps=3, data_workers=2)
        assert not set(multiprocessing.active_children()) - before
        crash_on_call(monkeypatch, tr, "next_micro_batch", 2, RuntimeError("planted failure after the loaders started"))
        with pytest.raises(RuntimeError, match="planted failure"):
            train(world, tmp_path / "failed", method="simnpo", convention="openunlearning", steps=3, data_workers=2)
        assert not set(multiprocessing.active_children()) - before
    finally:
        gc.enable()
    t = time.time()
    gc.collect()
    assert time.time() - t < 2, "a worker shutdown waited out its join timeout"


def test_rmu_moves_the_forget_hidden_states_toward_c_u(world, tmp_path, monkeypatch):
    seen = trained_model(monkeypatch)
    layer, c, seed = 1, 4.0, 3
    train(world, tmp_path / "run", method="rmu", rmu_layer=layer, rmu_steering=c, seed=seed, steps=6)
    model = seen["model"].eval()
    _, processor = load_model(world["model"], device="cpu")
    target = losses.steering_target(model.config.text_config.hidden_size, c, seed)
    exs, inputs = examples(processor, world["forget"])
    r_exs, r_inputs = examples(processor, world["retain"][:8])

    def distances():
        with torch.no_grad():
            out, _ = forward_hidden(AnswerLogits(model), model, {"f": exs}, inputs, CPU, layer)
            hidden, _, mask = out["f"]
            r_out, _ = forward_hidden(AnswerLogits(model), model, {"r": r_exs}, r_inputs, CPU, layer)
            r_hidden, _, r_mask = r_out["r"]
        return (float(losses.hidden_distance(hidden, target, mask).mean()),
                float(losses.hidden_distance(r_hidden, vanilla, r_mask).mean()))

    vanilla, _ = frozen_hidden(model, r_exs, r_inputs, CPU, layer)
    forget_after, retain_after = distances()
    with model.disable_adapter():
        forget_before, retain_before = distances()
    print(f"RMU forget distance to c*u: {forget_before:.4f} -> {forget_after:.4f} (retain drift {retain_after:.5f})")
    assert retain_before == 0.0
    assert forget_after < 0.8 * forget_before
    assert retain_after < forget_before - forget_after
    log = log_lines(tmp_path / "run")
    assert all(r["loss"] == pytest.approx(r["forget/loss"] + r["retain/hidden"], abs=1e-5) for r in log)
    assert log[0]["retain/hidden"] == pytest.approx(0.0, abs=1e-10), "a fresh adapter is the vanilla model"
    assert log[-1]["forget/loss"] < log[0]["forget/loss"]


def test_rmu_layer_minus_one_is_the_middle_and_out_of_range_is_one_line(world, tmp_path):
    model, _ = load_model(world["model"], device="cpu")
    layers = language_model(model).layers
    assert len(layers) == 3 and decoder_layer(model, -1) is layers[1] and decoder_layer(model, 2) is layers[2]
    with pytest.raises(TrainError) as err:
        train(world, tmp_path / "run", method="rmu", rmu_layer=3, steps=1)
    assert str(err.value) == ("train.rmu_layer 3 is out of range: the model has 3 decoder layers "
                              "(0..2, or -1 for the middle one)")


def test_rmu_with_activation_checkpointing_gives_the_same_loss(world, tmp_path):
    # The hook is gone before the backward recomputes the layer, so checkpointing changes nothing.
    plain = train(world, tmp_path / "a", method="rmu", steps=2)
    ckpt = train(world, tmp_path / "b", method="rmu", steps=2, grad_checkpointing=True)
    assert ckpt["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5)


@pytest.mark.parametrize("method,key", [("simnpo", "forget/token_nll"), ("rmu", "retain/hidden")])
def test_viker_train_runs_each_method_end_to_end(world, tmp_path, method, key):
    from pipeline.cli import main
    out = tmp_path / "run"
    args = [f"data.root={world['root']}", f"model.path={world['model']}", "model.device=cpu",
            f"precompute.output={tmp_path / 'no-cache'}", f"train.output={out}", f"train.method={method}",
            "train.steps=2", "train.batch_size=2", "train.lr=1e-3", "train.lora_r=2"]
    result = CliRunner().invoke(main, ["train", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"{method}: 2 steps" in result.output and (out / "adapter" / "adapter_config.json").exists()
    log = log_lines(out)
    assert [r["step"] for r in log] == [1, 2] and key in log[-1]
    assert json.loads((out / "train_config.json").read_text())["method"] == method


RMU_DDP_SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(1)
from pipeline.config import TrainConfig
from pipeline.stage2.train import train
w = json.loads(sys.argv[1])
cfg = TrainConfig(method="rmu", rmu_layer=0, output=w["out"], steps=3, batch_size=1, grad_accum=2, lr=1e-2,
                  lora_r=4, lora_alpha=8, lora_dropout=0.1)
result = train(w["model"], w["root"], "forget_10", "retain_90", None, cfg, pool_dir=w["pool"], device="cpu")
with open(os.path.join(w["out"], "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(result, f)
"""


@pytest.mark.slow
def test_rmu_trains_under_two_gloo_processes(world, tmp_path):
    # Layer 0: the layers above it and the LM head get no gradient from RMU's loss, which DDP (find_unused_parameters
    # off) refuses at the next step unless every parameter is reached (RMU.loss's zero term).
    ranks = torchrun_two(RMU_DDP_SCRIPT, tmp_path, world)
    assert ranks[0]["adapter_digest"] == ranks[1]["adapter_digest"] and ranks[0]["steps"] == 3
    log = log_lines(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
