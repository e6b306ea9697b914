"""The logit-lens attack: the lens against hand-computed values, the fact tokens, the best-layer arithmetic, a
planted model that knows the answers in a middle layer but does not say them, and `viker attack logit-lens`."""
import json
import math
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.config import DataConfig, LogitLensConfig, MiniConfig, ModelConfig
from pipeline.evaluation import logit_lens as ll

# ------------------------------------------------------------------ the pure functions


def test_the_lens_applies_the_norm_then_the_head_and_ranks_the_true_token():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(2, eps=0.0)
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    # h = (3, 4): rms = sqrt(12.5), normed (0.8485, 1.1314); logits (0.8485, 1.1314, 1.9799).
    logits = ll.lens_logits(torch.tensor([[3.0, 4.0]]), norm, head)
    r = math.sqrt(12.5)
    torch.testing.assert_close(logits, torch.tensor([[3 / r, 4 / r, 7 / r]]))
    torch.testing.assert_close(ll.lens_logits(torch.tensor([[30.0, 40.0]]), norm, head), logits), "scale-free"
    prob, rank = ll.true_token_stats(logits.expand(3, 3), torch.tensor([0, 1, 2]))
    assert rank.tolist() == [2, 1, 0]
    z = sum(math.exp(v / r) for v in (3, 4, 7))
    torch.testing.assert_close(prob, torch.tensor([math.exp(3 / r) / z, math.exp(4 / r) / z, math.exp(7 / r) / z]))
    # A tie with the true token counts in its favour: h = (2, 0) gives logits (2, 0, 2) before the norm.
    _, rank = ll.true_token_stats(torch.tensor([[2.0, 0.0, 2.0]]).expand(2, 3), torch.tensor([0, 2]))
    assert rank.tolist() == [0, 0]


def test_fact_tokens_are_the_answer_tokens_that_spell_the_fact():
    pieces = ["", " This", " person", " is", " named", " Or", "la", " Venn", "."]   # id i decodes to pieces[i]

    def decode(ids):
        return "".join(pieces[i] for i in ids)
    ids = list(range(1, 9))
    assert ll.fact_token_mask(decode, ids, "Orla Venn") == [False] * 4 + [True] * 3 + [False]
    assert ll.fact_token_mask(decode, ids, "orla") == [False] * 4 + [True, True, False, False], "case-insensitive"
    assert ll.fact_token_mask(decode, ids, "Venn.") == [False] * 6 + [True, True]
    assert ll.fact_token_mask(decode, ids, "Malmo") == [False] * 8, "a fact not in the answer: no fact token"
    assert ll.fact_token_mask(decode, ids, "") == [False] * 8


def test_the_best_layer_recovery_and_the_gold_control():
    curve = lambda rates: {"layers": len(rates), "top_fact": rates, "top_all": rates}  # noqa: E731
    attacked, vanilla = curve([0.2, 0.6, 0.6, 0.0]), curve([0.4, 0.8, 0.9, 1.0])
    s = ll.with_recovery(attacked, vanilla, curve([0.1, 0.05, 0.1, 0.0]), "fact")
    assert s == pytest.approx({"best_layer": 1, "score": 0.6, "vanilla_score": 0.8, "recovery": 0.75,
                               "best_layer_any": 1, "score_any": 0.6, "vanilla_score_any": 0.8, "recovery_any": 0.75,
                               "final": 0.0, "vanilla_final": 1.0, "gain": 0.6,
                               "gold_best_layer": 0, "gold_score": 0.1, "gold_recovery": 0.25, "gold_final": 0.0})
    s = ll.with_recovery(curve([0.1, 0.2, 0.9]), curve([0.5, 0.4, 1.0]), None, "all")
    assert (s["best_layer"], s["recovery"], s["best_layer_any"], s["recovery_any"]) == (1, 0.5, 2, 0.9)
    assert "gold_recovery" not in s
    assert math.isnan(ll.with_recovery(curve([0.3, 0.0]), curve([0.0, 0.0]), None, "fact")["recovery"])
    assert ll.best_layer([math.nan, 0.1, math.nan], True) == 1
    with pytest.raises(ValueError, match="1 decoder layer"):
        ll.with_recovery(curve([0.5]), curve([0.5]), None, "fact")
    with pytest.raises(ValueError, match="3 decoder layers, the vanilla model 2"):
        ll.with_recovery(curve([0.1, 0.2, 0.3]), curve([0.1, 0.2]), None, "fact")
    with pytest.raises(ValueError, match="logit_lens.tokens"):
        ll.with_recovery(attacked, vanilla, None, "key")


# ------------------------------------------------------------------ the demo's models, and one planted

DEMO = "pipeline/data/demo_models"


def _plant(vanilla, out, items, processor) -> int:
    """A copy of `vanilla` whose final layer adds one large constant vector d to every position, so that the
    final lens (the model's output) says token z everywhere; the layers before it are untouched. Returns z."""
    from pipeline.models.encoding import encode_pair
    from pipeline.models.modeling import load_model
    shutil.copytree(vanilla, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["mlp_bias"] = True          # a bias the saved model keeps; zero except in the last layer
    (out / "config.json").write_text(json.dumps(config))
    model, _ = load_model(out, dtype="float32", device="cpu")
    layers, norm, head = ll.lens_parts(model)
    w, g = head.weight.detach(), norm.weight.detach()
    answers = {t for _, _, prompt, answer, _ in items for t in (lambda p: p[0][p[1]:])(
        encode_pair(processor, prompt, answer))}
    # z: a token no answer holds, that wins the lens of its own direction (W W_z peaks at z); the final norm
    # multiplies by g, so d = W_z / g comes out of it along W_z.
    z = next(v for v in torch.argsort(w.norm(dim=1), descending=True).tolist()
             if v not in answers and int((w @ w[v]).argmax()) == v)
    direction = w[z] / g
    with torch.no_grad():
        for layer in layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.bias.zero_()
        layers[-1].mlp.down_proj.bias.copy_(1e5 * direction / direction.norm())
    model.save_pretrained(out)
    return z


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory):
    """The demo's benchmark (mini seed 0), copies of the shipped vanilla and gold models, and a planted model."""
    from pipeline.data.loaders import read_profiles
    from pipeline.data.mini import make_mini
    from pipeline.models.modeling import load_processor
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("lens")
    root = make_mini(tmp / "mini", MiniConfig())
    vanilla, gold = tmp / "vanilla", tmp / "gold"
    shutil.copytree(f"{DEMO}/vanilla", vanilla)        # copies: the references are remembered beside the model
    shutil.copytree(f"{DEMO}/gold", gold)
    items = ll.lens_items(read_profiles(root, "forget_10"))
    z = _plant(vanilla, tmp / "planted", items, load_processor(vanilla))
    return root, vanilla, gold, tmp / "planted", items, z


def test_the_final_layers_lens_is_the_models_own_output(demo_world):
    from pipeline.evaluation.mia import answer_batches
    from pipeline.models.modeling import load_model
    _, vanilla, _, _, items, _ = demo_world
    model, processor = load_model(vanilla, dtype="float32", device="cpu")
    curve = ll.lens_curve(model, processor, items, batch_size=16)
    hits = probs = n = 0
    with torch.no_grad():
        for _, logits, batch in answer_batches(model, processor, [i[:4] for i in items], 16, "check"):
            prob, rank = ll.true_token_stats(logits, batch.answer_ids)
            on = batch.answer_mask > 0
            hits, probs, n = hits + int((rank[on] == 0).sum()), probs + float(prob[on].sum()), n + int(on.sum())
    assert curve["n_all"] == n and curve["top_all"][-1] == pytest.approx(hits / n)
    assert curve["prob_all"][-1] == pytest.approx(probs / n, rel=1e-5)
    assert curve["n_items"] == 36 and curve["n_items_without_fact"] == 0 and 36 <= curve["n_fact"] < n
    assert curve["top_fact"][-1] > 0.9, "the demo's vanilla model knows the forget facts"


def test_a_planted_answer_is_found_in_a_middle_layer_while_the_output_says_nothing(demo_world):
    root, vanilla, gold, planted, items, z = demo_world
    data = DataConfig(root=str(root), forget_split="forget_10")
    model = ModelConfig(path=str(planted), dtype="float32", device="cpu")
    result = ll.attack(model, data, LogitLensConfig(), reference=str(vanilla), gold=str(gold), batch_size=36)
    s, curves = result["summary"], result["curves"]
    assert result["layers"] == 3 and result["n_tokens"]["all"] == curves["vanilla"]["n_all"]
    assert s["final"] == 0.0 and curves["unlearned"]["top_all"][-1] == 0.0, "the output says z, never the answer"
    assert curves["unlearned"]["prob_fact"][-1] < 1e-3
    assert s["best_layer"] == 1 and s["score"] > 0.8, "layer 1 still reads the facts"
    assert s["score"] == pytest.approx(curves["vanilla"]["top_fact"][1]) and s["recovery"] == pytest.approx(1.0), \
        "layers before the edit are the vanilla model's"
    assert s["gain"] == s["score"] and s["best_layer_any"] == 1
    assert s["gold_score"] < 0.2 and s["gold_recovery"] < 0.25, "the gold model never learned these people"
    assert curves["vanilla"]["top_fact"][-1] > 0.9 and s["vanilla_final"] == curves["vanilla"]["top_fact"][-1]
    memo = json.loads((vanilla / "logit-lens-reference.json").read_text())
    assert len(memo) == 1 and next(iter(memo.values())) == curves["vanilla"], "the reference curve is remembered"


def test_the_cli_explains_itself_prints_the_table_and_appends_the_row(demo_world, tmp_path):
    from pipeline.cli import main
    root, vanilla, gold, planted, _, _ = demo_world
    shown = CliRunner().invoke(main, ["attack", "logit-lens", "--help"])
    text = " ".join(shown.output.split())
    assert shown.exit_code == 0 and "through the final norm and LM head" in text and "recovery = its rate" in text
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(root), "forget_split": "forget_10"},
                                      "model": {"path": str(planted), "device": "cpu"}}))
    results = tmp_path / "lens.jsonl"
    out = CliRunner().invoke(main, ["attack", "logit-lens", "--config", str(config), "--reference", str(vanilla),
                                    "--gold", str(gold), "logit_lens.top_k=2", f"logit_lens.results={results}"])
    assert out.exit_code == 0, out.output
    assert "planted: logit-lens attack on 36 forget QA" in out.output and "lens's top-2" in out.output
    assert any(line.split()[:2] == ["2", "(final)"] for line in out.output.splitlines())
    assert "best layer before the final: 1" in out.output
    row = json.loads(results.read_text())
    assert row["logit_lens"]["top_k"] == 2 and row["gold"] == str(gold) and row["reference"] == str(vanilla)
    s = row["logit_lens"]["summary"]
    assert s["final"] < 0.05 and s["score"] > 0.9, "top-2: the planted z takes the first place, the fact the second"
    assert row["config"]["logit_lens"]["top_k"] == 2
    none = CliRunner().invoke(main, ["attack", "logit-lens", "--config", str(config)])
    assert none.exit_code == 2 and "recovery needs a reference" in none.output
    bad = CliRunner().invoke(main, ["attack", "logit-lens", "--config", str(config), "--reference", "x",
                                    "logit_lens.top_k=0"])
    assert bad.exit_code == 1 and "logit_lens.top_k" in bad.output.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl", "idefics3", "gemma3"])
def test_every_familys_final_lens_is_its_own_output(family, tmp_path_factory):
    """The final norm and LM head are found in every family: the last layer's lens equals the model's logits."""
    from pipeline.data.loaders import read_profiles
    from pipeline.evaluation.mia import answer_batches
    from pipeline.models.modeling import load_model
    from tests.tiny import make_world, tiny_config
    torch.set_num_threads(1)
    root, model_dir = make_world(tmp_path_factory, tiny_config(text_layers=2, max_positions=512), family=family,
                                 n_fictitious=12, pool_size=4, n_holdout=0)
    model, processor = load_model(model_dir, dtype="float32", device="cpu")
    items = ll.lens_items(read_profiles(root, "forget_15"))
    curve = ll.lens_curve(model, processor, items, batch_size=8)
    probs = n = 0
    with torch.no_grad():
        for _, logits, batch in answer_batches(model, processor, [i[:4] for i in items], 8, "check"):
            prob, _ = ll.true_token_stats(logits, batch.answer_ids)
            on = batch.answer_mask > 0
            probs, n = probs + float(prob[on].sum()), n + int(on.sum())
    assert curve["layers"] == 2 and curve["n_all"] == n and curve["n_items_without_fact"] == 0
    assert curve["prob_all"][-1] == pytest.approx(probs / n, rel=1e-5)
