"""The relearning attack: the forget split's QA split by item, the attack's arithmetic, and a tiny end to end."""
import json

import pytest
import torch

import pipeline.evaluation.evaluate as ev
from tests.tiny import evaluate_with
from pipeline.config import RelearnConfig
from pipeline.evaluation import relearn as rl
from pipeline.data.mllmu import DataError, read_split
from pipeline.models.modeling import load_model
from tests.tiny import make_world, tiny_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root, model_dir = make_world(tmp_path_factory, tiny_config(max_positions=512), n_fictitious=10, pool_size=2,
                                 train_images=1, test_images=1, n_holdout=2)
    return root, model_dir, read_split(root, "forget_15")


def _items(profiles):
    return {(p.id, qa.question) for p in profiles for qa in p.qa}


def test_split_is_by_item_seeded_disjoint_and_complete(world):
    *_, forget = world
    everything = _items(forget)
    n = len(everything)
    attacker, held_out = rl.split_forget(forget, 0.1, seed=0)
    assert _items(attacker) | _items(held_out) == everything and not _items(attacker) & _items(held_out)
    assert len(_items(attacker)) == max(1, round(0.1 * n))
    again, _ = rl.split_forget(forget, 0.1, seed=0)
    other, _ = rl.split_forget(forget, 0.1, seed=1)
    assert _items(again) == _items(attacker) and _items(other) != _items(attacker)
    # Every profile keeps its image and id: the attacker sees the person as in training.
    assert {p.id for p in attacker} <= {p.id for p in forget}
    assert all(p.image == next(q.image for q in forget if q.id == p.id) for p in attacker)
    # 0.9 of 12 items leaves at least one to test.
    big, rest = rl.split_forget(forget, 0.9, seed=0)
    assert len(_items(rest)) >= 1


def test_split_refuses_what_cannot_be_attacked(world):
    *_, forget = world
    one = [forget[0].__class__(**{**forget[0].__dict__, "qa": forget[0].qa[:1]})]
    with pytest.raises(DataError, match=">= 2 forget QA items"):
        rl.split_forget(one, 0.1, 0)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        rl.split_forget(forget, 1.0, 0)


def test_recovery_is_after_over_vanilla():
    r = rl.with_recovery({"acc_after": 0.3, "acc_before": 0.1}, 0.6)
    assert r["recovery"] == pytest.approx(0.5) and r["acc_vanilla"] == 0.6
    assert rl.with_recovery({"acc_after": 0.3}, 0.0)["recovery"] != rl.with_recovery({"acc_after": 0.3}, 0.0)["recovery"]


def test_the_attack_teaches_its_items_and_tests_the_others(world, monkeypatch):
    root, model_dir, forget = world
    model, processor = load_model(model_dir, dtype="float32", device="cpu")
    asked = []
    real = rl.held_out_accuracy
    monkeypatch.setattr(rl, "held_out_accuracy", lambda m, p, profiles, bs=32: asked.append(_items(profiles))
                        or real(m, p, profiles, bs))
    from pipeline.stage2 import finetune as ft
    taught, real_teach = [], ft.teach
    monkeypatch.setattr(ft, "teach", lambda *a, **k: taught.append(a[3]) or real_teach(*a, **k))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    settings = RelearnConfig(fraction=0.25, steps=3, lr=1e-3, batch_size=2, seed=0)
    result = rl.attack_model(model, processor, forget, settings)
    attacker, held_out = rl.split_forget(forget, 0.25, 0)
    assert taught == [rl.attack_recipe(settings)], "the attack fine-tunes with its own recipe"
    assert asked == [_items(held_out), _items(held_out)], "accuracy before and after, on the held-out items only"
    assert result["n_attack_qa"] == len(_items(attacker)) and result["n_held_out_qa"] == len(_items(held_out))
    assert any(not torch.equal(before[n], t) for n, t in model.state_dict().items()), "the attack trained the model"
    assert 0 <= result["acc_before"] <= 1 and 0 <= result["acc_after"] <= 1


def test_the_attack_recipe_comes_from_the_relearn_section_alone():
    """The attacker trains relearn.steps steps exactly: no warm-up, no stop rule, no jitter, whatever finetune says."""
    r = RelearnConfig(steps=7, lr=3e-4, batch_size=5, seed=2, lora=True, lora_r=8, lora_alpha=16)
    recipe = rl.attack_recipe(r)
    assert (recipe.steps, recipe.lr, recipe.batch_size, recipe.seed, recipe.lora, recipe.lora_r,
            recipe.lora_alpha) == (7, 3e-4, 5, 2, True, 8, 16)
    assert (recipe.warmup_steps, recipe.stop_known, recipe.augment, recipe.formats) == (0, 0.0, False, False)
    assert (recipe.epochs, recipe.weight_decay, recipe.max_grad_norm, recipe.check_every, recipe.check_size) == (
        100.0, 0.0, 1.0, 50, 128)


def test_evaluate_runs_the_attack_last_against_the_reference(world, tmp_path):
    root, model_dir, _ = world
    settings = dict(fraction=0.1, steps=2, lr=1e-3, batch_size=2, seed=0)
    row = evaluate_with(ev.evaluate, model_dir, root, "forget_10", sets="forget", likelihood_sets="forget", max_new_tokens=6,
                      results_path=tmp_path / "r.jsonl", relearn=settings)
    r = row["metrics"]["relearn"]
    if r["acc_vanilla"]:
        assert r["recovery"] == pytest.approx(r["acc_after"] / r["acc_vanilla"])
    else:      # an untrained tiny model knows nothing: no recovery to speak of, stored as null (not NaN)
        assert r["recovery"] is None and "null" in (tmp_path / "r.jsonl").read_text()
    memo = json.loads((model_dir / "relearn-reference.json").read_text())
    assert list(memo.values()) == [r["acc_vanilla"]]
    assert "relearning attack" in ev.format_row(row)
