"""MMUnlearner: its saliency score and mask by hand, the mask on a step, its loss, and training on a tiny model.

The tensor cases are small enough to compute on paper; the training runs use
the demo's shipped vanilla model, which knows the forget answers
(test_train_simnpo_rmu's world), with few mask samples to stay fast.
"""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from pipeline.config import TrainConfig, load_config
from pipeline.models.encoding import max_positions
from pipeline.models.modeling import load_model, wrap_lora
from pipeline.schema import ConfigError
from pipeline.stage2 import methods as M
from pipeline.stage2.errors import TrainError
from pipeline.stage2.inputs import build_inputs
from pipeline.stage2.losses import nll_loss
from pipeline.stage2.methods import AnswerLogits, forward_parts
from pipeline.stage2.methods import mmunlearner as mmu
from pipeline.stage2.stream import MicroBatch
from tests.test_losses import _logits_from_probs
from tests.test_train_simnpo_rmu import forget_loglik_before_after, log_lines, train, trained_model, world  # noqa: F401
from tests.tiny import Interrupted, crash_on_call, torchrun_two

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

CPU = torch.device("cpu")


# ------------------------------------------------------------------ the score and the mask, by hand


def test_row_fisher_by_hand_and_against_autograd():
    # Two positions, 2 outputs, 2 inputs: dL/dW = g^T x = [[1, 1], [2, -2]], rows squared and summed: 2 and 8.
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    assert mmu.row_fisher(g, x).tolist() == [2.0, 8.0]
    assert mmu.row_fisher(g.view(1, 2, 2).bfloat16(), x.view(1, 2, 2).bfloat16()).dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 4, generator=gen, requires_grad=True)
    xs = torch.randn(2, 3, 4, generator=gen)
    y = xs @ w.T
    y.sin().sum().backward()
    torch.testing.assert_close(mmu.row_fisher(y.detach().cos(), xs), w.grad.pow(2).sum(1))


def test_saliency_mask_by_hand():
    forget = torch.tensor([4.0, 1.0, 0.0, 0.0, 3.0])
    retain = torch.tensor([2.0, 1.0, 3.0, 0.0, 0.0])
    # ratios 2, 1, ~0, (0 + eps) / (0 + eps) = 1 (the authors' floor: a row no gradient reaches), 3e15
    assert mmu.saliency_mask(forget, retain, 1.0).tolist() == [True, True, False, True, True]
    assert mmu.saliency_mask(forget, retain, 2.0).tolist() == [True, False, False, False, True]
    assert mmu.saliency_mask(forget, retain, 2.5).tolist() == [False, False, False, False, True]
    with pytest.raises(ValueError, match="^the saliency threshold must be > 0, got 0.0$"):
        mmu.saliency_mask(forget, retain, 0.0)


def test_evenly_spaced_samples():
    assert mmu.evenly_spaced(10, 4) == [0, 2, 5, 7]
    assert mmu.evenly_spaced(3, 0) == mmu.evenly_spaced(3, 5) == [0, 1, 2]


# ------------------------------------------------------------------ the mask on a step


def test_masked_rows_of_b_stay_exactly_zero_through_adamw_steps():
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(2, 3, generator=gen))
    b = torch.nn.Parameter(torch.zeros(4, 2))               # peft's init of B
    keep = torch.tensor([True, False, True, False])
    mask = mmu.RowMask([(b, keep)], {})
    opt = torch.optim.AdamW([a, b], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        a.grad, b.grad = torch.randn(2, 3, generator=gen), torch.randn(4, 2, generator=gen)
        expected = b.grad.clone()
        mask()
        assert torch.equal(b.grad[keep], expected[keep]) and not b.grad[~keep].any()
        opt.step()
    delta = b.detach() @ a.detach()
    assert not b.detach()[~keep].any() and not delta[~keep].any(), "the unselected rows of B A are exactly 0"
    assert delta[keep].abs().min() > 0


def test_the_retain_split_is_required():
    with pytest.raises(TrainError, match="^method mmunlearner scores its mask against retain samples: the retain "
                                         "split holds none$"):
        mmu.METHOD.gradient_edit(None, SimpleNamespace(retain=None), M.LossSpec("mmunlearner"), 2, CPU)


# ------------------------------------------------------------------ the loss, by hand


def test_loss_and_its_gradient_by_hand():
    # forget: one answer of 2 tokens; retain: one answer of 1 token. loss = mean_t log Q_t(y_t) + alpha * NLL(retain).
    forget_logits = _logits_from_probs([[[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]]]).float().requires_grad_()
    retain_logits = _logits_from_probs([[[0.1, 0.7, 0.2]]]).float().requires_grad_()
    out = {"forget": (forget_logits, torch.tensor([[2, 0]]), torch.ones(1, 2)),
           "retain": (retain_logits, torch.tensor([[1]]), torch.ones(1, 1))}
    mb = MicroBatch(forget=["f"], retain=["r"])
    for convention in M.LOSS_CONVENTIONS:
        spec = M.loss_spec(TrainConfig(method="mmunlearner", convention=convention), "mmunlearner", 5, 64, 0)
        loss, d = mmu.METHOD.combine(out, mb, spec, "cpu")
        assert loss.item() == pytest.approx((math.log(0.5) + math.log(0.6)) / 2 - math.log(0.7), rel=1e-6)
        assert d["retain/nll"].item() == pytest.approx(-math.log(0.7), rel=1e-6)
    forget_logits.grad = retain_logits.grad = None
    loss.backward()
    # d/dz of mean_t log softmax(z_t)[y_t] = (e_y - p_t) / T; of -log softmax(z)[y] = p - e_y.
    torch.testing.assert_close(forget_logits.grad, torch.tensor([[[-0.1, -0.15, 0.25], [0.2, -0.1, -0.1]]]))
    torch.testing.assert_close(retain_logits.grad, torch.tensor([[[0.1, -0.3, 0.2]]]))
    spec = M.loss_spec(TrainConfig(method="mmunlearner", retain_weight=2.0, mmu_threshold=1.5, mmu_mask_samples=7),
                       "mmunlearner", 5, 64, 0)
    assert (spec.mmu_threshold, spec.mmu_mask_samples) == (1.5, 7)
    assert mmu.METHOD.combine(out, mb, spec, "cpu")[0].item() == pytest.approx(
        (math.log(0.5) + math.log(0.6)) / 2 - 2 * math.log(0.7), rel=1e-6)
    assert mmu.METHOD.needs(M.LossSpec("mmunlearner")) == ("retain",)


def test_bad_settings_are_one_line():
    for override, needle in (("train.mmu_threshold=0", "train.mmu_threshold"),
                             ("train.mmu_mask_samples=-1", "train.mmu_mask_samples")):
        with pytest.raises(ConfigError, match=needle) as err:
            load_config(None, [override])
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------ on the tiny model


def test_the_hooked_scores_are_the_weight_gradients(world):
    """row_fisher_of (hooks, no weight gradient stored) = the base weights' autograd gradients, squared, row sums."""
    model, processor = load_model(world["model"], device="cpu")
    model = wrap_lora(model, r=2, alpha=4, dropout=0.1)
    inputs = build_inputs(processor, world["forget"][:5], world["retain"][:2], max_positions(model), "", None,
                          method=mmu.METHOD)
    layers = mmu.lora_layers(model)
    assert len(layers) == 21      # 3 decoder layers x 7 projections; nothing on the vision side
    rng = torch.get_rng_state()
    got = mmu.row_fisher_of(model, layers, inputs, inputs.forget, [0, 1, 2, 3, 4], 2, CPU)
    assert torch.equal(torch.get_rng_state(), rng) and model.training, "no random draw, training mode restored"
    assert all(not m.get_base_layer()._forward_hooks for m in layers.values())
    assert all(p.grad is None for p in model.parameters()), "no parameter gradient left behind"
    weights = [m.get_base_layer().weight for m in layers.values()]
    expected = [torch.zeros(w.shape[0]) for w in weights]
    model.eval()
    for w in weights:
        w.requires_grad_(True)
    with model.disable_adapter():
        for chunk in ([0, 1], [2, 3], [4]):
            examples, batch_inputs = mmu._micro_batch(inputs, inputs.forget, chunk)
            logits, labels, mask = forward_parts(AnswerLogits(model), model, {"s": examples}, batch_inputs, CPU)["s"]
            grads = torch.autograd.grad(nll_loss(logits, labels, mask)[0].mean(), weights)
            for e, g in zip(expected, grads):
                e += g.pow(2).sum(1) / 3
    for name, e in zip(layers, expected):
        torch.testing.assert_close(got[name], e, rtol=1e-4, atol=1e-12)


def test_training_moves_only_the_selected_rows_and_lowers_the_forget_log_likelihood(world, tmp_path, monkeypatch):
    seen = trained_model(monkeypatch)
    made = []
    original = mmu.MMUnlearner.gradient_edit

    def keep(self, *args, **kwargs):
        made.append(original(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(mmu.MMUnlearner, "gradient_edit", keep)
    train(world, tmp_path / "run", method="mmunlearner", mmu_mask_samples=8, steps=12)
    model, mask = seen["model"], made[0]
    s = mask.summary
    print(mask.describe())
    assert (s["forget_samples"], s["retain_samples"], s["threshold"], s["of_layers"]) == (8, 8, 1.0, 21)
    assert 0 < s["rows"] < s["of_rows"] and sum(int(k.sum()) for _, k in mask.factors) == s["rows"]
    moved = 0
    for name, layer in mmu.lora_layers(model).items():
        keep_rows = next(k for b, k in mask.factors if b is layer.lora_B["default"].weight)
        delta = layer.get_delta_weight("default")
        assert not delta[~keep_rows].any(), f"{name}: a row outside the mask moved"
        moved += int(delta[keep_rows].abs().sum(1).gt(0).sum())
    assert moved == s["rows"], "every selected row moved"
    before, after = forget_loglik_before_after(world, model)
    print(f"MMUnlearner forget per-token log-likelihood: {before:.4f} -> {after:.4f}")
    assert before > -0.1 and after < before - 0.1
    log = log_lines(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(1, 13))
    assert all(r["loss"] == pytest.approx(r["forget/loss"] + r["retain/nll"], abs=1e-5) for r in log)
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert recorded["gradient_edit"] == s and recorded["method"] == "mmunlearner"


def test_every_row_selected_is_graddiff_bit_for_bit(world, tmp_path):
    # The mask pass draws nothing from the run's random streams, so with no row masked the run is GradDiff's.
    mmunlearner = train(world, tmp_path / "m", method="mmunlearner", mmu_threshold=1e-30, mmu_mask_samples=4, steps=3,
                        lora_dropout=0.1)
    graddiff = train(world, tmp_path / "g", method="graddiff", steps=3, lora_dropout=0.1)
    assert mmunlearner["adapter_digest"] == graddiff["adapter_digest"]
    assert mmunlearner["final_loss"] == graddiff["final_loss"]


def test_a_resumed_run_makes_the_same_mask_and_the_same_adapter(world, tmp_path, monkeypatch):
    from pipeline.stage2 import train as tr
    settings = dict(method="mmunlearner", mmu_mask_samples=4, steps=4, save_every=2, lora_dropout=0.1)
    whole = train(world, tmp_path / "whole", **settings)
    original = crash_on_call(monkeypatch, tr, "micro_batch_loss", 3)
    with pytest.raises(Interrupted):
        train(world, tmp_path / "split", **settings)
    monkeypatch.setattr(tr, "micro_batch_loss", original)
    resumed = tr.train(str(world["model"]), str(world["root"]), "forget_10", "retain_90", None,
                       TrainConfig(output=str(tmp_path / "split"), batch_size=2, lr=1e-2, lora_r=4, lora_alpha=8,
                                   **settings), pool_dir=str(world["pool"]), device="cpu", resume=True)
    assert resumed["start_step"] == 2 and resumed["adapter_digest"] == whole["adapter_digest"]


def test_viker_train_runs_mmunlearner_end_to_end(world, tmp_path):
    from pipeline.cli import main
    out = tmp_path / "run"
    args = [f"data.root={world['root']}", f"model.path={world['model']}", "model.device=cpu",
            f"precompute.output={tmp_path / 'no-cache'}", f"train.output={out}", "train.method=mmunlearner",
            "train.mmu_mask_samples=4", "train.steps=2", "train.batch_size=2", "train.lr=1e-3", "train.lora_r=2"]
    result = CliRunner().invoke(main, ["train", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "[train] MMUnlearner mask (threshold 1; 4 forget, 4 retain samples scored)" in result.output
    assert "mmunlearner: 2 steps" in result.output and (out / "adapter" / "adapter_config.json").exists()
    assert [r["step"] for r in log_lines(out)] == [1, 2]
    assert "mmunlearner" in CliRunner().invoke(main, ["train", "--help"]).output


DDP_SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(1)
from pipeline.config import TrainConfig
from pipeline.stage2.train import train
w = json.loads(sys.argv[1])
cfg = TrainConfig(method="mmunlearner", mmu_mask_samples=6, output=w["out"], steps=2, batch_size=1, lr=1e-2,
                  lora_r=4, lora_alpha=8, lora_dropout=0.0)
result = train(w["model"], w["root"], "forget_10", "retain_90", None, cfg, pool_dir=w["pool"], device="cpu")
with open(os.path.join(w["out"], "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(result, f)
"""


@pytest.mark.slow
def test_two_gloo_processes_score_the_same_mask_as_one(world, tmp_path):
    # Rank r scores micro-batches r::2 and the sums are all-reduced: the same batches as one process, so the same mask.
    from pathlib import Path
    single = train(world, tmp_path / "single", method="mmunlearner", mmu_mask_samples=6, steps=1, batch_size=1)
    ranks = torchrun_two(DDP_SCRIPT, tmp_path, world)
    assert ranks[0]["adapter_digest"] == ranks[1]["adapter_digest"] and ranks[0]["steps"] == 2
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())["gradient_edit"]
    assert recorded == json.loads(Path(single["train_config"]).read_text())["gradient_edit"]
    assert 0 < recorded["rows"] < recorded["of_rows"]
