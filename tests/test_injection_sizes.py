"""Knowledge injection converges whatever the size of the world, with no per-size setting (issue #23).

Slow (about 10 min on 2 cores): four vanilla models from the demo's own
configuration, only the world changed: the default 60 fictitious + 12 real
people and twice that (120 + 24), each drawn with two seeds. Every one must
pass the vanilla gate (>= 90% of the forget and retain facts).
"""
import json

import pytest

from pipeline.jobs import demo
from pipeline.config import load_config


def vanilla_for_world(tmp_path, n_fictitious: int, n_real: int, seed: int):
    over = [f"mini.n_fictitious={n_fictitious}", f"mini.n_real={n_real}", f"mini.seed={seed}",
            f"finetune.seed={seed}", f"data.root={tmp_path}/mini", f"finetune.base={tmp_path}/base",
            f"finetune.output={tmp_path}/vanilla", f"model.path={tmp_path}/vanilla"]
    cfg = load_config("configs/demo.yaml", over)
    quiet = lambda *_: None  # noqa: E731
    demo.ensure_benchmark(cfg, quiet)
    demo.ensure_base_model(cfg, quiet)
    vanilla = demo.ensure_vanilla(cfg, quiet)
    gate = demo.vanilla_gate(cfg, vanilla, quiet)
    info = json.loads((vanilla / "vanilla.json").read_text())
    return cfg, gate, info


@pytest.mark.slow
@pytest.mark.parametrize("n_fictitious,n_real", [(60, 12), (120, 24)])
@pytest.mark.parametrize("seed", [0, 1])
def test_vanilla_gate_passes_at_two_world_sizes(tmp_path, n_fictitious, n_real, seed):
    cfg, gate, info = vanilla_for_world(tmp_path, n_fictitious, n_real, seed)
    print(f"\n{n_fictitious}+{n_real} people, seed {seed}: {info['steps']} of at most {info['max_steps']} steps "
          f"({info['stopped']}), {info['train_seconds']} s; forget {100 * gate['forget']['acc']:.1f}%, "
          f"retain {100 * gate['retain']['acc']:.1f}%, real {100 * gate['real']['acc']:.1f}%")
    assert info["max_steps"] == -(-100 * info["n_examples"] // 32)          # the budget grew with the world
    demo.check_gate(gate, cfg.finetune.gate_min_acc, info)


def test_a_world_too_large_for_the_portraits_is_refused(tmp_path, monkeypatch):
    from pipeline.config import MiniConfig
    from pipeline.data import mini, portraits

    def too_many(rng, n, min_diff=3):
        raise RuntimeError(f"cannot draw {n} identities differing in {min_diff} traits")

    monkeypatch.setattr(portraits, "draw_identities", too_many)
    with pytest.raises(ValueError, match=r"cannot draw 156 identities differing in 3 traits: mini.n_fictitious \+ "
                                         r"mini.n_real \+ mini.pool_size = 156 portraits"):
        mini.make_mini(tmp_path, MiniConfig(n_fictitious=120, n_real=12))


def test_the_default_world_stays_as_it_was():
    import hashlib

    import numpy as np
    from pipeline.data.portraits import draw_identities
    default = draw_identities(np.random.default_rng(0), 96)
    assert all(i.band == 0 for i in default)
    # The six-trait identities the previous release drew for the default world (seed 0, 72 people + 24 pool).
    six = repr([i.as_tuple()[:6] for i in default]).encode()
    assert hashlib.sha256(six).hexdigest()[:16] == "343d920f16214986"


def _assert_a_seventh_trait_world(large):
    assert len(set(large)) == 168 and {i.band for i in large} == {0, 1, 2}
    assert all(sum(a != b for a, b in zip(x.as_tuple(), y.as_tuple())) >= 3
               for k, x in enumerate(large) for y in large[k + 1:])


def test_when_six_traits_give_up_the_band_is_the_seventh(monkeypatch):
    """The fallback on its own: the six-trait draw gives up at once here instead of after its 200,000
    attempts (~10 s); the slow test below lets it give up for real."""
    import numpy as np
    from pipeline.data import portraits
    tries = []

    def six_give_up(rng, n, min_diff, sizes):
        tries.append(len(sizes))
        return None if len(sizes) == 6 else draw(rng, n, min_diff, sizes)

    draw = portraits._draw
    monkeypatch.setattr(portraits, "_draw", six_give_up)
    large = portraits.draw_identities(np.random.default_rng(0), 168)
    assert tries == [6, 7]
    _assert_a_seventh_trait_world(large)


@pytest.mark.slow
def test_a_larger_world_gets_a_seventh_trait():
    """Six traits hold ~130 identities; a 2x world (168 with the pool) needs the shirt band."""
    import numpy as np
    from pipeline.data.portraits import draw_identities
    large = draw_identities(np.random.default_rng(0), 168)
    _assert_a_seventh_trait_world(large)
