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


def test_people_split_is_by_person_seeded_disjoint_and_complete(world):
    *_, forget = world
    attacker, held_out = rl.split_people(forget, seed=0)
    ids = [p.id for p in forget if p.qa]
    assert len(attacker) == len(ids) // 2 and len(held_out) == len(ids) - len(ids) // 2
    assert not {p.id for p in attacker} & {p.id for p in held_out}, "no person on both sides"
    assert _items(attacker) | _items(held_out) == _items(forget), "each person with all their QA"
    again, _ = rl.split_people(forget, seed=0)
    assert [p.id for p in again] == [p.id for p in attacker]
    assert {tuple(p.id for p in rl.split_people(forget, s)[0]) for s in range(6)} != {tuple(p.id for p in attacker)}
    with pytest.raises(DataError, match=">= 2 forget people"):
        rl.split_people(forget[:1], 0)


def test_both_splits_depend_on_data_and_seed_only(world):
    """Every method is attacked with the same items: nothing but the profiles and relearn.seed/fraction decide."""
    *_, forget = world
    settings = RelearnConfig(fraction=0.25, seed=3, lr=1e-2, steps=9, grid_lrs=[1e-3], grid_steps=[5])
    other = RelearnConfig(fraction=0.25, seed=3, lr=1e-5, steps=1, grid_lrs=[], grid_steps=[], lora=True)
    one, two = rl.splits(forget, settings), rl.splits(forget, other)
    assert set(one) == {"item", "people"}
    assert {k: [_items(x) for x in v] for k, v in one.items()} == {k: [_items(x) for x in v] for k, v in two.items()}
    assert set(rl.splits(forget, RelearnConfig(people=False))) == {"item"}
    assert set(rl.splits(forget[:1], RelearnConfig())) == {"item"}, "one person: no people split"


def test_cells_are_the_default_then_the_grid_each_once():
    assert rl.cells(RelearnConfig(lr=1e-4, steps=40, grid_lrs=[], grid_steps=[20])) == [(1e-4, 40)]
    assert rl.cells(RelearnConfig(lr=1e-4, steps=40, grid_lrs=[1e-4, 3e-4], grid_steps=[40, 80])) == [
        (1e-4, 40), (1e-4, 80), (3e-4, 40), (3e-4, 80)]


def test_recovery_is_after_over_vanilla():
    r = rl.with_recovery({"acc_after": 0.3, "acc_before": 0.1}, 0.6)
    assert r["recovery"] == pytest.approx(0.5) and r["acc_vanilla"] == 0.6
    assert rl.with_recovery({"acc_after": 0.3}, 0.0)["recovery"] != rl.with_recovery({"acc_after": 0.3}, 0.0)["recovery"]
    # Each split over the vanilla accuracy of its own held-out items; the worst cell over the item split's.
    r = rl.with_recovery({"acc_after": 0.3, "worst_acc_after": 0.45, "people_acc_after": 0.2},
                         {"item": 0.6, "people": 0.8})
    assert (r["recovery"], r["worst_recovery"], r["people_recovery"]) == pytest.approx((0.5, 0.75, 0.25))
    assert r["people_acc_vanilla"] == 0.8


def test_the_grid_attacks_from_the_same_weights_and_reports_the_worst_cell(world, monkeypatch):
    """Each cell (and the people split) starts from the model as it came; worst = the highest acc_after."""
    root, model_dir, forget = world
    model, processor = load_model(model_dir, dtype="float32", device="cpu")
    first = next(model.parameters())
    start = first.detach().clone()
    from pipeline.stage2 import finetune as ft
    taught = []

    def teach(model, processor, profiles, recipe, **kw):
        p = next(model.parameters())
        taught.append((recipe.lr, recipe.steps, _items(profiles), torch.equal(p.detach(), start)))
        with torch.no_grad():
            p.add_(1.0)                       # "training": every attack changes the weights
        return model, {"final_loss": recipe.lr}
    monkeypatch.setattr(ft, "teach", teach)
    # After-accuracy = the cell's lr x 100 (and 0.5 on the people split); before = 0.1.
    seen = {"n": 0}

    def accuracy(m, p, profiles, bs=32):
        seen["n"] += 1
        if torch.equal(next(m.parameters()).detach(), start):
            return 0.1
        return 0.5 if _items(profiles) == _items(rl.split_people(forget, 0)[1]) else taught[-1][0] * 100
    monkeypatch.setattr(rl, "held_out_accuracy", accuracy)
    settings = RelearnConfig(fraction=0.25, steps=3, lr=2e-3, seed=0, grid_lrs=[1e-3, 4e-3], grid_steps=[3, 5])
    result = rl.attack_model(model, processor, forget, settings)
    item_attacker, _ = rl.split_forget(forget, 0.25, 0)
    people_attacker, people_held = rl.split_people(forget, 0)
    assert [t[:2] for t in taught] == [(2e-3, 3), (1e-3, 3), (1e-3, 5), (4e-3, 3), (4e-3, 5), (2e-3, 3)]
    assert all(t[3] for t in taught), "every attack starts from the weights the model came with"
    assert [t[2] for t in taught] == [_items(item_attacker)] * 5 + [_items(people_attacker)]
    assert seen["n"] == 2 + 6, "before once per split, after once per attack"
    assert (result["acc_before"], result["acc_after"], result["final_loss"]) == pytest.approx((0.1, 0.2, 2e-3))
    assert (result["worst_acc_after"], result["worst_lr"], result["worst_steps"], result["n_cells"]) == \
        pytest.approx((0.4, 4e-3, 3, 5)), "the first of the best cells"
    assert (result["people_acc_before"], result["people_acc_after"]) == (0.1, 0.5)
    assert (result["n_attack_people"], result["n_people_attack_qa"], result["n_people_held_out_qa"]) == (
        len(people_attacker), len(_items(people_attacker)), len(_items(people_held)))
    assert all(isinstance(v, (int, float)) for v in result.values()), "numbers only: results rows stay numeric"
    # No grid: no worst case (it would repeat the default cell under another name, and another table column).
    alone = rl.attack_model(model, processor, forget, RelearnConfig(fraction=0.25, steps=3, lr=1e-3, seed=0,
                                                                    grid_lrs=[], people=False))
    assert alone["n_cells"] == 1 and not any(k.startswith("worst") for k in alone)
    assert "people_acc_after" not in alone and "worst_recovery" not in rl.with_recovery(alone, 0.5)


def test_a_lora_attacker_restarts_from_the_same_weights_too(world, monkeypatch):
    """relearn.lora: teach wraps and merges an adapter per cell; each cell still starts from the weights as they came."""
    root, model_dir, forget = world
    model, processor = load_model(model_dir, dtype="float32", device="cpu")
    start = {n: t.clone() for n, t in model.state_dict().items()}
    from pipeline.stage2 import finetune as ft
    starts, real_teach = [], ft.teach

    def teach(model, *a, **k):
        starts.append(all(torch.equal(start[n], t) for n, t in model.state_dict().items()))
        return real_teach(model, *a, **k)
    monkeypatch.setattr(ft, "teach", teach)
    settings = RelearnConfig(fraction=0.25, steps=2, lr=1e-2, batch_size=2, seed=0, lora=True, lora_r=4,
                             lora_alpha=8, grid_lrs=[1e-2], grid_steps=[1])
    result = rl.attack_model(model, processor, forget, settings)
    assert starts == [True, True, True] and result["n_cells"] == 2
    assert any(not torch.equal(start[n], t) for n, t in model.state_dict().items()), "the last attack trained it"


def test_reference_accuracy_once_per_data_split_fraction_and_seed(world, tmp_path, monkeypatch):
    root, model_dir, forget = world
    import pipeline.models.modeling as modeling
    loads = []
    monkeypatch.setattr(modeling, "load_for_eval", lambda *a, **k: loads.append(a) or ("model", "processor"))
    monkeypatch.setattr(rl, "held_out_accuracy", lambda m, p, profiles, bs=32: len(_items(profiles)) / 100)
    store = tmp_path / "vanilla"
    store.mkdir()
    settings = RelearnConfig(fraction=0.25, seed=0)
    got = rl.reference_accuracy(store, forget, settings, "data")
    assert got == {"item": len(_items(rl.split_forget(forget, 0.25, 0)[1])) / 100,
                   "people": len(_items(rl.split_people(forget, 0)[1])) / 100}
    assert len(loads) == 1, "the vanilla model is loaded once for both splits"
    # The grid's cells share it: another grid, another people setting, the same memo; no new load.
    assert rl.reference_accuracy(store, forget, RelearnConfig(fraction=0.25, seed=0, grid_lrs=[1e-3], lr=1e-2),
                                 "data") == got and len(loads) == 1
    memo = json.loads((store / "relearn-reference.json").read_text())
    assert sorted(memo) == ["data|item|0.25|0", "data|people|0"]
    rl.reference_accuracy(store, forget, RelearnConfig(fraction=0.5, seed=1), "data")
    assert len(loads) == 2 and len(json.loads((store / "relearn-reference.json").read_text())) == 4


def test_attacking_without_adapter_or_reference_is_refused():
    from click.testing import CliRunner
    from pipeline.cli import main
    result = CliRunner().invoke(main, ["attack", "relearn"])
    assert result.exit_code == 2
    assert "Error: recovery needs a reference: the vanilla model, --reference DIR" in result.output


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
    settings = RelearnConfig(fraction=0.25, steps=3, lr=1e-3, batch_size=2, seed=0, grid_lrs=[], people=False)
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
    settings = dict(fraction=0.1, steps=2, lr=1e-3, batch_size=2, seed=0, grid_lrs=[1e-3, 3e-3], grid_steps=[2])
    row = evaluate_with(ev.evaluate, model_dir, root, "forget_10", sets="forget", likelihood_sets="forget", max_new_tokens=6,
                      results_path=tmp_path / "r.jsonl", relearn=settings)
    r = row["metrics"]["relearn"]
    assert r["n_attack_people"] == 0 and r["people_recovery"] is None, "forget_10 is one person: no people split"
    if r["acc_vanilla"]:
        assert r["recovery"] == pytest.approx(r["acc_after"] / r["acc_vanilla"])
    else:      # an untrained tiny model knows nothing: no recovery to speak of, stored as null (not NaN)
        assert r["recovery"] is None and "null" in (tmp_path / "r.jsonl").read_text()
    memo = json.loads((model_dir / "relearn-reference.json").read_text())
    assert list(memo.values()) == [r["acc_vanilla"]]
    assert {k for k in r if k.endswith("recovery")} == {"recovery", "worst_recovery", "people_recovery"}
    assert (r["n_cells"], r["worst_steps"]) == (2, 2) and r["worst_lr"] in (1e-3, 3e-3)
    assert all(v is None or isinstance(v, float) for v in r.values()), "numbers or null only"
    shown = ev.format_row(row)
    assert "relearning attack" in shown and "worst of 2 (lr, steps) cells" in shown
    assert "held-out people: n/a (the forget set has one person)" in shown
