"""Stage two: the training loop moves only LoRA weights, resumes exactly, saves loadable adapters,
refuses foreign caches, and the cached and online ViKeR paths agree."""
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.stage1 import precompute as pc
from pipeline.stage2 import losses
from pipeline.stage2 import train as tr
from pipeline.stage2.errors import TrainError, TrainingDiverged
from pipeline.stage2.inputs import build_inputs
from pipeline.stage2.methods import LossSpec, online_references, resolve_method
from pipeline.stage2.stream import pad_references
from pipeline.config import PrecomputeConfig, TrainConfig
from pipeline.data.mllmu import read_split
from pipeline.data.records import forget_samples
from pipeline.models.forward import answer_logits, make_text_batch
from pipeline.models.modeling import load_model
from pipeline.cache.refcache import FingerprintMismatch
from tests.tiny import Interrupted, crash_on_call, make_world, tiny_config, torchrun_two

# peft calls a transformers helper that transformers 5.2x deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TINY = tiny_config(text_layers=2)
K_IMAGES, TOP_K = 3, 8


def _sharpen(model_dir, factor=30.0, noise_seed=None):
    """Scale the LM head so the random model predicts peaked, image-dependent distributions.

    A freshly initialised tiny model is near-uniform over its vocabulary: R and
    Q would then agree to 1e-6 and a test comparing ViKeR losses could not see
    a wrong reference.
    """
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
        if noise_seed is not None:
            g = torch.Generator().manual_seed(noise_seed)
            for p in model.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root, model_dir = make_world(tmp_path_factory, TINY, n_fictitious=10, pool_size=6)
    _sharpen(model_dir)
    pool = root / "pools" / "people"
    samples = forget_samples(read_split(root, "forget_10"))
    caches = {}
    for name, reference, span in (("pool", "pool", "none"), ("own", "own", "none"), ("chain", "pool", "chain")):
        caches[name] = tmp_path_factory.mktemp(f"refs-{name}")
        settings = PrecomputeConfig(output=str(caches[name]), reference=reference, k=K_IMAGES, top_k=TOP_K,
                                    seed=0, shard_size=4, batch_size=8, dtype="float32", span=span)
        pc.precompute(str(model_dir), samples, settings, pool_dir=str(pool), device="cpu", log=lambda *_: None)
    return {"root": root, "model": model_dir, "pool": pool, "cache": caches["pool"], "own_cache": caches["own"],
            "chain_cache": caches["chain"], "samples": samples}


def run(w, out, cache=None, resume=False, **overrides):
    args = dict(output=str(out), steps=2, batch_size=2, lr=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.1)
    args.update(overrides)
    return tr.train(str(w["model"]), str(w["root"]), "forget_10", "retain_90", str(cache or w["cache"]),
                    TrainConfig(**args), pool_dir=str(w["pool"]), device="cpu", resume=resume,
                    ref_k=K_IMAGES, ref_top_k=TOP_K)


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def capture_model(monkeypatch):
    """Keep a handle on the peft model train() builds, and a copy of its initial LoRA weights."""
    seen = {}
    original = tr.wrap_lora

    def wrap(*args, **kwargs):
        model = original(*args, **kwargs)
        seen["model"] = model
        seen["init"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return model

    monkeypatch.setattr(tr, "wrap_lora", wrap)
    return seen


def some_logits(model, processor, samples):
    enc = pc.encode_samples(processor, samples, "", None)
    batch = make_text_batch([e.ids for e in enc], [e.answer_start for e in enc], processor.tokenizer.pad_token_id)
    from pipeline.models.encoding import load_image, pixel_values
    pixels = pixel_values(processor, [load_image(s.image) for s in samples])
    with torch.no_grad():
        return answer_logits(model, batch, pixels.to(next(model.parameters()).dtype))


# ------------------------------------------------------------------ weights


def test_training_moves_lora_weights_and_leaves_the_base_bit_identical(world, tmp_path, monkeypatch):
    seen = capture_model(monkeypatch)
    run(world, tmp_path / "run", method="viker", steps=3)
    trained = seen["model"]
    lora = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert any("lora_B" in n for n in lora)
    for name, p in lora.items():
        assert not torch.equal(p.detach(), seen["init"][name]), f"{name} did not move"
        if "lora_B" in name:
            assert p.detach().abs().sum() > 0, f"{name} is still zero"
    base, _ = load_model(world["model"], device="cpu")
    base_state = base.state_dict()
    frozen = {n.replace("base_model.model.", "", 1).replace(".base_layer", ""): t
              for n, t in trained.state_dict().items() if "lora_" not in n}
    assert set(frozen) == set(base_state)
    changed = [n for n in base_state if not torch.equal(base_state[n], frozen[n])]
    assert not changed, f"frozen weights changed: {changed[:3]}"


def test_saved_adapter_reloads_with_the_in_memory_logits_and_merges(world, tmp_path, monkeypatch):
    from peft import PeftModel
    seen = capture_model(monkeypatch)
    result = run(world, tmp_path / "run", method="ga", steps=2)
    trained = seen["model"].eval()
    base, processor = load_model(world["model"], device="cpu")
    reloaded = PeftModel.from_pretrained(base, result["adapter"]).eval()
    assert (Path(result["adapter"]) / "adapter_model.safetensors").is_file()
    want = some_logits(trained, processor, world["samples"][:3])
    got = some_logits(reloaded, processor, world["samples"][:3])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, some_logits(load_model(world["model"], device="cpu")[0], processor,
                                               world["samples"][:3]), atol=1e-4), "the adapter changed nothing"
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert config["method"] == "ga" and config["train"]["lr"] == 1e-2 and config["result"]["steps"] == 2
    assert config["cache_fingerprint"] is None   # ga reads no cache

    merged_run = run(world, tmp_path / "merged", method="ga", steps=2, merge=True)
    merged, _ = load_model(merged_run["merged"], device="cpu")
    torch.testing.assert_close(some_logits(merged, processor, world["samples"][:3]), want, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ references


@pytest.mark.parametrize("span", ["none", "chain"])
def test_online_references_equal_the_cached_ones(world, span):
    from pipeline.cache.refcache import RefCacheReader
    model, processor = load_model(world["model"], device="cpu")
    model = tr.wrap_lora(model, r=4, alpha=8, dropout=0.1)
    inputs = build_inputs(processor, world["samples"], [], None, "", world["pool"])
    spec = LossSpec("viker", online=True, k=K_IMAGES, top_k=TOP_K, ref_seed=0, span=span)
    online = online_references(model, inputs.forget, inputs, spec, torch.device("cpu"))
    with RefCacheReader(world["chain_cache" if span == "chain" else "cache"]) as reader:
        cached = pad_references([reader.get(ex.sample_id) for ex in inputs.forget], online.topk_idx.shape[1])
    if span == "chain":   # the chain must change R by more than the tolerances below for the test to mean anything
        plain = online_references(model, inputs.forget, inputs, dataclasses.replace(spec, span="none"),
                                  torch.device("cpu"))
        assert (plain.entropy - online.entropy).abs().max() > 3e-3
    assert online.topk_prob.shape == cached.topk_prob.shape
    assert float(cached.topk_prob.sum(-1).max()) > 0.5, "references too flat to test anything"
    # Both are float16-rounded top-K probabilities: equal up to one float16 step on a rounding boundary.
    torch.testing.assert_close(online.topk_prob, cached.topk_prob, rtol=0, atol=2e-4)
    torch.testing.assert_close(online.tail_mass, cached.tail_mass, rtol=0, atol=1e-5)
    torch.testing.assert_close(online.entropy, cached.entropy, rtol=0, atol=1e-4)
    assert (online.topk_idx == cached.topk_idx).float().mean() > 0.99


def test_cached_and_online_viker_give_the_same_loss(world, tmp_path):
    # The cached run shuffles shard by shard (its reads stay sequential), the online one has no shards:
    # whole-set batches without dropout make the comparison independent of the order.
    same = dict(method="viker", steps=2, lam=1.0, batch_size=len(world["samples"]), lora_dropout=0.0)
    run(world, tmp_path / "cached", **same)
    run(world, tmp_path / "online", online_reference=True, **same)
    cached, online = read_log(tmp_path / "cached"), read_log(tmp_path / "online")
    assert len(cached) == len(online) == 2
    for a, b in zip(cached, online):
        assert a["forget/divergence"] > 1e-3, "the regulariser must be visible for the comparison to mean anything"
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert abs(a["forget/divergence"] - b["forget/divergence"]) < 1e-5
    ga = read_log(tmp_path / "cached")[0]["forget/logprob"]
    assert abs(cached[0]["loss"] - ga) > 1e-3


def test_cache_from_another_model_is_refused_in_one_line(world, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(world["model"], other)
    _sharpen(other, factor=1.0, noise_seed=1)
    with pytest.raises(FingerprintMismatch) as err:
        tr.train(str(other), str(world["root"]), "forget_10", "retain_90", str(world["cache"]),
                 TrainConfig(method="viker", output=str(tmp_path / "run"), steps=1), device="cpu")
    message = str(err.value)
    assert "model weights differ" in message and "\n" not in message
    assert "model config" not in message and "tokenizer" not in message


# ------------------------------------------------------------------ methods


METHOD_CASES = {
    "ga": (dict(method="GA"), "forget/nll"),
    "graddiff": (dict(method="graddiff"), "retain/nll"),
    "kl_min": (dict(method="kl_min"), "retain/kl"),
    "npo": (dict(method="npo"), "forget/log_ratio"),
    "idkpo": (dict(method="idkpo", beta=0.1), "forget/reward_margin"),
    "kl_min-mllmu": (dict(method="kl_min", convention="mllmu"), "retain/nll"),
    "npo-mllmu": (dict(method="npo", convention="mllmu"), "forget/log_ratio"),
    "idkpo-openunlearning+retain": (dict(method="idkpo", convention="openunlearning", retain_weight=1.0),
                                    "retain/nll"),
    "viker-kl": (dict(method="viker", regulariser="kl"), "forget/divergence"),
    "viker-jsd": (dict(method="viker", regulariser="jsd"), "forget/divergence"),
    "viker-cos": (dict(method="viker", regulariser="cos"), "forget/divergence"),
    "viker-wo-ga": (dict(method="viker", use_ga=False), "forget/reg"),
    "viker-wo-vis": (dict(method="viker"), "forget/divergence"),
    "viker-token-lambda+retain": (dict(method="viker", token_lambda=True, retain_weight=0.5), "retain/nll"),
    "viker-grad-ckpt": (dict(method="viker", grad_checkpointing=True, grad_accum=2), "forget/divergence"),
    "viker+nll": (dict(method="viker", retain_term="nll"), "retain/nll"),
    "viker+kl": (dict(method="viker", retain_term="kl"), "retain/kl"),
}


# viker+nll and viker+kl are the retain-aware test's runs at retain_weight 0 (below): here they are slow.
SAME_AS_RETAIN_AWARE = ("viker+nll", "viker+kl")


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SAME_AS_RETAIN_AWARE else c
                                  for c in METHOD_CASES])
def test_every_method_runs_two_steps_with_finite_logged_losses(world, tmp_path, case):
    overrides, key = METHOD_CASES[case]
    cache = world["own_cache"] if case == "viker-wo-vis" else None
    result = run(world, tmp_path / "run", cache=cache, **overrides)
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2]
    for record in log:
        assert key in record, f"{case}: {key} not logged ({sorted(record)})"
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))
        assert record["grad_norm"] > 0
    assert result["final_loss"] == log[-1]["loss"]
    if overrides.get("use_ga") is False:
        assert all(r["loss"] >= 0 for r in log), "lambda * D alone is non-negative"


@pytest.mark.parametrize("term,weight,key", [("nll", 0.0, "retain/nll"), ("nll", 0.5, "retain/nll"),
                                             ("kl", 0.0, "retain/kl"), ("kl", 2.0, "retain/kl")])
def test_retain_aware_viker_adds_its_weighted_retain_term(world, tmp_path, term, weight, key):
    # The logged loss is ViKeR's forget loss plus alpha x the retain term (alpha = retain_weight, 1 when 0),
    # and nothing else: KL's alpha must not also add an NLL, NLL's must not add a KL.
    run(world, tmp_path / "run", method="viker", retain_term=term, retain_weight=weight)
    alpha = weight or 1.0
    log = read_log(tmp_path / "run")
    assert log[-1][key] > 0       # step 1's KL is 0: a fresh LoRA is the vanilla model
    for r in log:
        assert r["loss"] == pytest.approx(r["forget/loss"] + alpha * r[key], abs=1e-5)
        other = "retain/kl" if term == "nll" else "retain/nll"
        assert other not in r


def test_retain_term_is_checked_in_one_line(world, tmp_path):
    with pytest.raises(TrainError, match="one of: none, nll, kl") as err:
        run(world, tmp_path / "a", method="viker", retain_term="mse")
    assert "\n" not in str(err.value)
    with pytest.raises(TrainError, match="viker only"):
        run(world, tmp_path / "b", method="ga", retain_term="nll")


def test_epochs_set_the_number_of_steps():
    cfg = TrainConfig(steps=0, epochs=1.0, batch_size=4, grad_accum=2)
    assert tr.total_steps(cfg, 50) == 7
    assert tr.total_steps(cfg, 50, world=2) == 4
    assert tr.total_steps(TrainConfig(steps=3), 50) == 3


def test_unknown_method_is_a_one_line_error(world, tmp_path):
    with pytest.raises(TrainError) as err:
        run(world, tmp_path / "run", method="gradient_descent")
    assert "unknown training method 'gradient_descent'" in str(err.value)
    assert "ga, graddiff, kl_min, npo, idkpo, viker" in str(err.value) and "\n" not in str(err.value)
    assert resolve_method("ViKeR") == "viker" and resolve_method("KL-Min") == "kl_min"


# ------------------------------------------------------------------ failure and resume


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_adapter(world, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = losses.ga_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, diag = original(*args, **kwargs)
        return (loss * float("nan"), diag) if calls["n"] == 3 else (loss, diag)

    monkeypatch.setattr(losses, "ga_loss", poisoned)   # methods/ga.py calls it through losses
    with pytest.raises(TrainingDiverged) as err:
        run(world, tmp_path / "run", method="ga", steps=5)
    message = str(err.value)
    # The traceback holds this frame and the run's frames, whose data loader has worker processes: left to
    # the garbage collector, that cycle is torn down in no order and stopping the workers waits 10 s.
    del err
    assert "step 3" in message and "nan" in message and "\n" not in message
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values()), "the bad step was applied"
    assert any("lora_B" in n and t.abs().sum() > 0 for n, t in weights.items()), "steps 1-2 were not kept"
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]


def test_resume_after_a_checkpoint_reproduces_the_uninterrupted_run(world, tmp_path, monkeypatch):
    settings = dict(method="viker", steps=4, save_every=2, grad_accum=2, retain_weight=0.5, lora_dropout=0.2)
    whole = run(world, tmp_path / "whole", **settings)

    # the 6th micro-batch: step 3's second, after the step-2 checkpoint
    original = crash_on_call(monkeypatch, tr, "micro_batch_loss", 6)
    with pytest.raises(Interrupted):
        run(world, tmp_path / "split", **settings)
    assert (tmp_path / "split" / "checkpoint" / "state.pt").is_file()
    monkeypatch.setattr(tr, "micro_batch_loss", original)
    resumed = run(world, tmp_path / "split", resume=True, **settings)

    assert resumed["start_step"] == 2
    a = load_file(Path(whole["adapter"]) / "adapter_model.safetensors")
    b = load_file(Path(resumed["adapter"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed["adapter_digest"] == whole["adapter_digest"]
    assert [r["loss"] for r in read_log(tmp_path / "split")] == [r["loss"] for r in read_log(tmp_path / "whole")]
    assert not (tmp_path / "split" / "checkpoint").exists()


def test_resume_refuses_a_checkpoint_of_another_run(world, tmp_path, monkeypatch):
    original = crash_on_call(monkeypatch, tr, "micro_batch_loss", 3)
    with pytest.raises(Interrupted):
        run(world, tmp_path / "run", method="ga", steps=4, save_every=2)
    monkeypatch.setattr(tr, "micro_batch_loss", original)
    with pytest.raises(TrainError, match="differs on: train.lr"):
        run(world, tmp_path / "run", method="ga", steps=4, save_every=2, lr=1e-3, resume=True)
    with pytest.raises(TrainError, match="no checkpoint"):
        run(world, tmp_path / "fresh", method="ga", steps=4, resume=True)


# ------------------------------------------------------------------ two processes

DDP_SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(1)
from pipeline.config import TrainConfig
from pipeline.stage2.train import train
w = json.loads(sys.argv[1])
cfg = TrainConfig(method="viker", output=w["out"], steps=3, batch_size=1, grad_accum=2, lr=1e-2, lora_r=4,
                  lora_alpha=8, lora_dropout=0.1)
result = train(w["model"], w["root"], "forget_10", "retain_90", w["cache"], cfg, pool_dir=w["pool"], device="cpu")
with open(os.path.join(w["out"], "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(result, f)
"""


@pytest.mark.slow
def test_two_gloo_processes_train_identical_adapters(world, tmp_path):
    ranks = torchrun_two(DDP_SCRIPT, tmp_path, world)
    assert ranks[0]["adapter_digest"] == ranks[1]["adapter_digest"]
    assert ranks[0]["steps"] == 3
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in n and t.abs().sum() > 0 for n, t in saved.items())
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["world_size"] == 2
