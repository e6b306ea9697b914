"""Distance to the gold model: the coarse KL against hand values, and end to end in `evaluate`."""
import math
import shutil

import pytest
import torch

import pipeline.evaluation.evaluate as ev
from pipeline.data.mllmu import read_split
from pipeline.evaluation import oracle
from pipeline.evaluation.mia import qa_items
from pipeline.models.modeling import load_model
from tests.tiny import evaluate_with, make_world, tiny_config

TINY = tiny_config(max_positions=512)


def test_coarse_kl_matches_a_hand_computed_value():
    # P keeps tokens 0 and 1 (0.5, 0.3) and 0.2 outside; Q is uniform over 4 tokens (rest bucket 0.5).
    q = torch.full((1, 4), 0.25, dtype=torch.float64).log()
    got = oracle.coarse_kl(torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.3]], dtype=torch.float64), q)
    want = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_coarse_kl_is_a_lower_bound_exact_on_the_full_support():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(50, 30, dtype=torch.float64) * 2, -1)
    q = torch.log_softmax(torch.randn(50, 30, dtype=torch.float64) * 2, -1)
    full = (p * (p.log() - q)).sum(-1)
    every = torch.arange(30).expand(50, 30)
    assert torch.allclose(oracle.coarse_kl(every, p, q), full.double(), atol=1e-9)
    top = p.topk(5, dim=-1)
    coarse = oracle.coarse_kl(top.indices, top.values, q)
    assert (coarse <= full.double() + 1e-9).all() and (coarse > 0).all()
    assert torch.all(oracle.coarse_kl(top.indices, top.values, p.log()) < 1e-9)   # P against itself


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory, TINY, n_fictitious=10, pool_size=2, train_images=1, test_images=2)


def test_a_model_is_at_distance_zero_from_itself_and_farther_when_changed(world):
    root, model_dir = world
    model, processor = load_model(model_dir, device="cpu")
    items = qa_items(read_split(root, "forget_10"))
    gold = oracle.gold_answers(model, processor, items, batch_size=4, top_k=8)
    assert set(gold) == {sid for sid, *_ in items}
    same, rows = oracle.distance_to_gold(model, processor, items, gold, batch_size=3)
    assert same["kl_gold"] == pytest.approx(0, abs=1e-6) and same["n_items"] == len(items) == len(rows)
    assert 0 <= same["key_share"] <= 1
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    moved, rows = oracle.distance_to_gold(model, processor, items, gold, batch_size=8)
    assert moved["kl_gold"] > 0.01
    # The item means are the means of their positions' classes; every position is key or normal.
    for r in rows:
        assert r["n"] >= r["n_key"] >= 0
        if 0 < r["n_key"] < r["n"]:
            share = r["n_key"] / r["n"]
            assert r["kl"] == pytest.approx(share * r["kl_key"] + (1 - share) * r["kl_normal"], rel=1e-6)


def test_evaluate_reports_the_distance_and_remembers_the_gold_side(world, tmp_path, monkeypatch):
    root, model_dir = world
    gold = tmp_path / "gold"
    shutil.copytree(model_dir, gold)
    calls = []
    real = oracle.gold_answers
    monkeypatch.setattr(oracle, "gold_answers", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(sets="forget", likelihood_sets="forget", gold=str(gold), mia="off", max_new_tokens=4, batch_size=64)
    row = evaluate_with(ev.evaluate, model_dir, root, "forget_10", results_path=tmp_path / "a.jsonl", **kw)
    d = row["metrics"]["gold_distance"]
    assert d["kl_gold"] == pytest.approx(0, abs=1e-6) and d["n_items"] > 0 and calls == [1]
    assert (gold / "gold-answers.json").is_file()
    evaluate_with(ev.evaluate, model_dir, root, "forget_10", results_path=tmp_path / "b.jsonl", **kw)
    assert calls == [1], "the gold model's answers are remembered, not recomputed"
    off = evaluate_with(ev.evaluate, model_dir, root, "forget_10", results_path=tmp_path / "c.jsonl",
                        **{**kw, "gold_distance": False})
    assert "gold_distance" not in off["metrics"]
