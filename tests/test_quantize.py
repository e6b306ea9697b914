"""The quantization attack: the rounding functions against hand-computed values, the model-level rounding, the
attack end to end on a tiny model, and `viker attack quantize`."""
import json
import math
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.config import DataConfig, ModelConfig, QuantizeConfig
from pipeline.evaluation import quantize as qz
from pipeline.models.modeling import load_model, wrap_lora
from tests.tiny import make_world, tiny_config


# ------------------------------------------------------------------ the pure functions

def test_rtn_4_bit_of_a_known_tensor():
    # absmax 3.5, qmax 7: one step is 0.5; -1.2 -> -2.4 steps -> -2 -> -1.0; 0.3 -> 0.6 steps -> 1 -> 0.5.
    w = torch.tensor([[3.5, -1.2, 0.3, 0.0]])
    torch.testing.assert_close(qz.rtn(w, 4, 4), torch.tensor([[3.5, -1.0, 0.5, 0.0]]))
    # 8 bits, qmax 127: -1.2 -> -43.54 -> -44; 0.3 -> 10.89 -> 11.
    torch.testing.assert_close(qz.rtn(w, 8, 4), torch.tensor([[3.5, -44 * 3.5 / 127, 11 * 3.5 / 127, 0.0]]))


def test_rtn_scales_each_group_and_the_row_when_group_size_is_0():
    w = torch.tensor([[3.5, -1.2, 0.3, 0.0, 0.7, 0.2, -0.1, 0.04]])
    # Second group: absmax 0.7, step 0.1.
    torch.testing.assert_close(qz.rtn(w, 4, 4), torch.tensor([[3.5, -1.0, 0.5, 0.0, 0.7, 0.2, -0.1, 0.0]]))
    # One scale for the row (step 0.5): the small second half rounds to 0.5 or 0.
    row = torch.tensor([[3.5, -1.0, 0.5, 0.0, 0.5, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(qz.rtn(w, 4, 0), row)
    torch.testing.assert_close(qz.rtn(w, 4, 128), row), "a group larger than the row is the row"


def test_rtn_ragged_last_group_has_its_own_scale():
    w = torch.tensor([[3.5, -1.2, 0.3, 0.0, 0.7, -0.2], [1.0, 2.0, -7.0, 0.0, 0.0, 0.0]])
    got = qz.rtn(w, 4, 4)
    torch.testing.assert_close(got, torch.tensor([[3.5, -1.0, 0.5, 0.0, 0.7, -0.2], [1.0, 2.0, -7.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(got, torch.cat([qz.rtn(w[:, :4], 4, 4), qz.rtn(w[:, 4:], 4, 4)], dim=1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [0, 5, 16, 64])
def test_rtn_error_is_at_most_half_a_step_and_rounding_twice_changes_nothing(bits, group_size):
    w = torch.randn(6, 37, generator=torch.Generator().manual_seed(bits * 100 + group_size)) * 0.02
    q = qz.rtn(w, bits, group_size)
    size = group_size or 37
    qmax = 2 ** (bits - 1) - 1
    for start in range(0, 37, size):
        g, qg = w[:, start:start + size], q[:, start:start + size]
        bound = g.abs().amax(1, keepdim=True) / (2 * qmax)
        assert ((g - qg).abs() <= bound * (1 + 1e-5)).all()
        assert len(torch.unique(qg[0])) <= 2 * qmax + 1, "each group holds at most 2 qmax + 1 values"
    assert torch.equal(qz.rtn(q, bits, group_size), q), "idempotent"


def test_nf4_leaves_values_on_its_levels_unchanged():
    levels = torch.tensor(qz.NF4_LEVELS)
    picks = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(0))
    w = levels[picks] * 0.5          # a power of two: the products are exact
    w[:, 0], w[:, 1] = -0.5, 0.5     # every block holds the level +-1: absmax 0.5
    assert torch.equal(qz.nf4(w, 64), w)
    assert torch.equal(qz.nf4(w.reshape(-1), 64), w.reshape(-1)), "blocks run over the flattened weight"


def test_nf4_rounds_to_the_nearest_level_of_its_block():
    # absmax 2: 1.0 -> 0.5 lies nearer 0.4407 than 0.5626; 0.6 -> 0.3 nearer 0.3379; -0.2 -> -0.1 nearer -0.0911.
    w = torch.tensor([1.0, 0.6, -0.2, 2.0])
    expected = 2 * torch.tensor([0.44070982933044434, 0.33791524171829224, -0.09105003625154495, 1.0])
    torch.testing.assert_close(qz.nf4(w, 4), expected)
    # Ragged: 6 values in blocks of 4, the last block [0.1, -0.2] scaled by its own absmax 0.2 (0.1 -> 0.5).
    w = torch.tensor([1.0, 0.6, -0.2, 2.0, 0.1, -0.2])
    torch.testing.assert_close(qz.nf4(w, 4), torch.cat([expected, 0.2 * torch.tensor([0.44070982933044434, -1.0])]))
    r = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(qz.nf4(qz.nf4(r, 64), 64), qz.nf4(r, 64)), "idempotent"
    assert len(torch.unique(qz.nf4(r, 64).reshape(-1)[:64])) <= 16


def test_half_precision_casts_round_and_come_back_in_the_original_dtype():
    w = torch.tensor([1 + 2 ** -9, 1 + 2 ** -12, 70000.0, 3.0])
    bf = qz.cast(w, torch.bfloat16)
    assert bf.dtype == torch.float32 and bf.tolist() == [1.0, 1.0, 70144.0, 3.0]
    half = qz.quantize_tensor(w, "fp16")
    assert half[0] == 1 + 2 ** -9 and half[1] == 1.0 and math.isinf(half[2]), "fp16: finer mantissa, smaller range"
    assert torch.equal(qz.quantize_tensor(half, "fp16"), half)


def test_a_delta_below_half_a_step_rounds_away():
    """The mechanism 2410.16454 describes: a small unlearning delta and the original round to the same grid."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g) * 0.02
    delta = torch.randn(64, 128, generator=g) * 1e-5      # ~1/400 of an int4 step here
    assert not torch.equal(w + delta, w)
    def same_code(bits):      # one step apart or more: another integer code (the scales differ by a hair only)
        step = w.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        return ((qz.rtn(w + delta, bits, 128) - qz.rtn(w, bits, 128)).abs() < step / 2).float().mean()
    assert same_code(4) > 0.97
    assert same_code(8) < same_code(4), "8 bits keep more of it"


def test_rounding_keeps_shape_and_dtype_and_refuses_bad_settings():
    w = torch.randn(4, 10, dtype=torch.bfloat16)
    for scheme in qz.SCHEMES:
        out = qz.quantize_tensor(w, scheme, group_size=3, nf4_block=7)
        assert out.shape == w.shape and out.dtype == w.dtype
    assert qz.quantize_tensor(torch.zeros(3, 4), "int4").abs().sum() == 0, "an all-zero group stays zero"
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        qz.quantize_tensor(w, "int3")
    with pytest.raises(ValueError, match="bits >= 2"):
        qz.rtn(w, 1)
    with pytest.raises(ValueError, match="group size"):
        qz.rtn(w, 4, -1)
    with pytest.raises(ValueError, match="block size"):
        qz.nf4(w, 0)


# ------------------------------------------------------------------ a model

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root, model_dir = make_world(tmp_path_factory, tiny_config(max_positions=512), n_fictitious=10, pool_size=2,
                                 train_images=1, test_images=1, n_holdout=2)
    adapter = tmp_path_factory.mktemp("unlearned") / "adapter"
    peft_model = wrap_lora(load_model(model_dir, dtype="float32", device="cpu")[0], r=4, alpha=8)
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    peft_model.save_pretrained(adapter)
    return root, model_dir, adapter


def _names(model, layers):
    by_id = {id(m): n for n, m in model.named_modules()}
    return {by_id[id(m)] for m in layers}


def test_the_linear_layers_rounded_are_the_language_models_never_the_head(world):
    _, model_dir, _ = world
    model, _ = load_model(model_dir, dtype="float32", device="cpu")
    language, every = (_names(model, qz.rounded_linears(model, m)) for m in ("language", "all"))
    assert language and all(".language_model." in n for n in language)
    assert "lm_head" not in every and any("vision_tower" in n for n in every) and language < every
    with pytest.raises(ValueError, match="merge the adapter"):
        qz.rounded_linears(wrap_lora(model, r=2, alpha=4))


def test_quantize_model_rounds_linear_weights_only_and_casts_round_everything(world):
    _, model_dir, _ = world
    model, _ = load_model(model_dir, dtype="float32", device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rounded = {n + ".weight" for n in _names(model, qz.rounded_linears(model))}
    settings = QuantizeConfig(group_size=32)
    assert qz.quantize_model(model, "int4", settings) == len(rounded)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == rounded, "int4: the language model's Linear weights, nothing else (head, embeddings, norms)"
    for n, p in model.named_parameters():
        if n in rounded:
            assert torch.equal(p, qz.rtn(before[n], 4, 32))
    model, _ = load_model(model_dir, dtype="float32", device="cpu")
    qz.quantize_model(model, "bf16", settings)
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"]), "a half-precision deployment: all of it"
    assert torch.equal(model.lm_head.weight, qz.cast(before["lm_head.weight"], torch.bfloat16))


def test_each_scheme_starts_from_the_weights_the_model_came_with(world):
    _, model_dir, _ = world
    model, _ = load_model(model_dir, dtype="float32", device="cpu")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rounder = qz.Rounder(model, QuantizeConfig())
    rounder("int4")
    int4 = {k: v.clone() for k, v in model.state_dict().items()}
    rounder("nf4")
    fresh, _ = load_model(model_dir, dtype="float32", device="cpu")
    qz.quantize_model(fresh, "nf4", QuantizeConfig())
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items()), "nf4 of the original"
    assert any(not torch.equal(v, int4[k]) for k, v in model.state_dict().items())
    rounder("none")
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_int8_keeps_the_vanilla_models_answers(world):
    """Sanity: 8 bits move the logits by a small fraction of their spread; the greedy next tokens stay."""
    _, model_dir, _ = world
    model, processor = load_model(model_dir, dtype="float32", device="cpu")
    ids = torch.randint(5, 300, (4, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        qz.quantize_model(model, "int8", QuantizeConfig())
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() < 0.05 * before.std()
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.95


# ------------------------------------------------------------------ the attack

def test_recovery_is_over_the_vanilla_model_quantized_the_same_way():
    attacked = {"none": {"forget": 0.2, "retain": 0.9}, "int4": {"forget": 0.5, "retain": 0.8}}
    vanilla = {"none": {"forget": 0.8, "retain": 1.0}, "int4": {"forget": 0.625, "retain": 0.9}}
    gold = {"none": {"forget": 0.1}, "int4": {"forget": 0.125}}
    rows = qz.with_recovery(attacked, vanilla, gold)
    assert rows["int4"] == pytest.approx({"acc_forget": 0.5, "acc_retain": 0.8, "vanilla_acc_forget": 0.625,
                                          "vanilla_acc_retain": 0.9, "recovery": 0.8, "change": 0.3,
                                          "gold_acc_forget": 0.125, "gold_recovery": 0.2})
    assert rows["none"]["recovery"] == pytest.approx(0.25) and rows["none"]["change"] == 0
    nothing = qz.with_recovery({"none": {"forget": 0.0}}, {"none": {"forget": 0.0}})
    assert math.isnan(nothing["none"]["recovery"]) and "gold_recovery" not in nothing["none"]
    shown = qz.format_attack({"n_qa": {"forget": 4, "retain": 8}, "sets": ["forget", "retain"], "group_size": 0,
                              "nf4_block": 64, "modules": "language", "by_scheme": qz.finite(rows)}, "GA")
    assert "GA: quantization attack, Forget ACC on 4 forget QA, retain ACC on 8 QA (int8/int4 group row" in shown
    assert shown.splitlines()[-1].split() == ["int4", "50.0%", "+30.0", "pts", "62.5%", "80.0%", "12.5%", "20.0%",
                                              "80.0%", "90.0%"]
    shown = qz.format_attack({"n_qa": {"forget": 4}, "sets": ["forget"], "group_size": 128, "nf4_block": 64,
                              "modules": "all", "by_scheme": qz.finite(nothing)}, "GA")
    assert shown.splitlines()[-1].split() == ["none", "0.0%", "-", "0.0%", "n/a"], "a vanilla model that knows nothing"


def test_the_attack_end_to_end_on_a_tiny_model(world, tmp_path, monkeypatch):
    root, model_dir, adapter = world
    vanilla, gold = tmp_path / "vanilla", tmp_path / "gold"
    shutil.copytree(model_dir, vanilla)
    shutil.copytree(model_dir, gold)
    model = ModelConfig(path=str(vanilla), dtype="float32", device="cpu")
    data = DataConfig(root=str(root), forget_split="forget_15")
    settings = QuantizeConfig(schemes=["int8", "nf4", "int8"], sets=["forget", "retain"], group_size=16)
    result = qz.attack(model, data, settings, adapter=str(adapter), gold=str(gold), batch_size=16)
    assert result["schemes"] == ["none", "int8", "nf4"] and result["sets"] == ["forget", "retain"]
    sets = qz.fact_sets(data, ["forget", "retain"])
    assert result["n_qa"] == {n: sum(len(p.qa) for p in profiles) for n, (profiles, _, _) in sets.items()}
    for scheme, row in result["by_scheme"].items():
        assert set(row) == {"acc_forget", "acc_retain", "vanilla_acc_forget", "vanilla_acc_retain", "recovery",
                            "change", "gold_acc_forget", "gold_recovery"}
        assert row["change"] == pytest.approx(row["acc_forget"] - result["by_scheme"]["none"]["acc_forget"])
        assert row["gold_acc_forget"] == row["vanilla_acc_forget"], "the gold copy is the same model here"
    memo = json.loads((vanilla / "quantize-reference.json").read_text())
    assert len(memo) == 6 and any("int8|group16|language" in k for k in memo)
    assert len(json.loads((gold / "quantize-reference.json").read_text())) == 3, "the gold model: forget only"
    # The references are remembered: a second attack loads the attacked model only.
    import pipeline.models.modeling as modeling
    loads, real = [], modeling.load_for_eval
    monkeypatch.setattr(modeling, "load_for_eval", lambda *a, **k: loads.append(a) or real(*a, **k))
    again = qz.attack(model, data, settings, adapter=str(adapter), gold=str(gold), batch_size=16)
    assert len(loads) == 1 and qz.finite(again) == qz.finite(result)


def test_each_number_comes_from_its_model_under_its_scheme(world, tmp_path, monkeypatch):
    """Accuracy replaced by a fingerprint of the weights: each cell must be the right model, rounded the right way."""
    from pipeline.models.modeling import load_for_eval
    root, model_dir, adapter = world
    vanilla, gold = tmp_path / "vanilla", tmp_path / "gold"
    shutil.copytree(model_dir, vanilla)
    shutil.copytree(model_dir, gold)
    with torch.no_grad():       # another gold model: its language model's weights scaled
        g, _ = load_model(gold, dtype="float32", device="cpu")
        for layer in qz.rounded_linears(g):
            layer.weight.mul_(0.5)
        g.save_pretrained(gold)

    def probe(model, profiles):
        weights = sum(m.weight.detach().double().abs().sum() for m in qz.rounded_linears(model))
        return float(weights) + len(profiles) / 1000
    monkeypatch.setattr(qz, "set_accuracy", lambda m, p, profiles, other, bs, desc: probe(m, profiles))
    settings = QuantizeConfig(schemes=["int4", "bf16"], sets=["forget", "retain"], group_size=16)
    data = DataConfig(root=str(root), forget_split="forget_15")
    result = qz.attack(ModelConfig(path=str(vanilla), dtype="float32", device="cpu"), data, settings,
                       adapter=str(adapter), gold=str(gold))
    sets = qz.fact_sets(data, ["forget", "retain"])

    def expected(path, adapter, scheme, name):
        model, _ = load_for_eval(path, adapter, "float32", "cpu")
        if scheme != "none":
            qz.quantize_model(model, scheme, settings)
        return probe(model, sets[name][0])
    rows = result["by_scheme"]
    for scheme in ("none", "int4", "bf16"):
        for name in ("forget", "retain"):
            assert rows[scheme][f"acc_{name}"] == pytest.approx(expected(vanilla, adapter, scheme, name), rel=1e-9)
            assert rows[scheme][f"vanilla_acc_{name}"] == pytest.approx(expected(vanilla, None, scheme, name),
                                                                        rel=1e-9)
        assert rows[scheme]["gold_acc_forget"] == pytest.approx(expected(gold, None, scheme, "forget"), rel=1e-9)
        row = rows[scheme]
        assert row["recovery"] == pytest.approx(row["acc_forget"] / row["vanilla_acc_forget"])
    assert len({rows[s]["acc_forget"] for s in rows}) == 3, "each scheme rounds differently"


def test_the_cli_prints_the_table_and_appends_the_row(world, tmp_path):
    from pipeline.cli import main
    root, model_dir, adapter = world
    vanilla = tmp_path / "vanilla"
    shutil.copytree(model_dir, vanilla)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(root), "forget_split": "forget_15"},
                                      "model": {"path": str(vanilla), "device": "cpu"}}))
    results = tmp_path / "q.jsonl"
    out = CliRunner().invoke(main, ["attack", "quantize", "--config", str(config), "--adapter", str(adapter),
                                    "quantize.schemes=int4", "quantize.sets=forget", f"quantize.results={results}"])
    assert out.exit_code == 0, out.output
    assert "adapter: quantization attack, Forget ACC on" in out.output
    lines = out.output.splitlines()
    assert any(line.split()[:1] == ["none"] for line in lines) and any(line.split()[:1] == ["int4"] for line in lines)
    row = json.loads(results.read_text())
    assert row["quantize"]["schemes"] == ["none", "int4"] and row["adapter"] == str(adapter)
    assert row["config"]["quantize"]["schemes"] == ["int4"]


@pytest.mark.parametrize("args,message", [
    (["--reference", "x", "quantize.schemes=int3"],
     "Error: config key 'quantize.schemes' must be one of: fp16, bf16, int8, int4, nf4; got 'int3'"),
    (["--reference", "x", "quantize.sets=retain"], "Error: config key 'quantize.sets' must include forget"),
    (["--reference", "x", "data.benchmark=clear", "data.forget_split=forget10", "model.path=nowhere"],
     "Error: the quantization attack runs on MLLMU-layout benchmarks"),
])
def test_the_cli_refuses_bad_settings_in_one_line(args, message, monkeypatch):
    from pipeline.cli import main
    monkeypatch.setattr("pipeline.cli._model_libraries", lambda: None)
    out = CliRunner().invoke(main, ["attack", "quantize", *args])
    assert out.exit_code == 1 and out.output.splitlines()[-1].startswith(message), out.output
    assert "Traceback" not in out.output
    none = CliRunner().invoke(main, ["attack", "quantize"])
    assert none.exit_code == 2 and "recovery needs a reference" in none.output
