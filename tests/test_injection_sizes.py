"""Knowledge injection converges whatever the size of the world, with no per-size setting (issue #23).

Slow (about 8 min on 2 cores): four vanilla models from the demo's own
configuration, only the world changed: the default 60 fictitious + 12 real
people and 90 + 12, each drawn with two seeds. Every one must pass the
vanilla gate (>= 90% of the forget and retain facts). 90 is 1.5x, not the 2x
issue #23 asks for: the portrait generator holds about 130 identities that
differ in 3 traits (people + the 24 reference portraits), so 120 + 12 people
cannot be drawn (tested in test_a_world_too_large_for_the_portraits_is_refused).
"""
import json

import pytest

from pipeline import demo
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
@pytest.mark.parametrize("n_fictitious,n_real", [(60, 12), (90, 12)])
@pytest.mark.parametrize("seed", [0, 1])
def test_vanilla_gate_passes_at_two_world_sizes(tmp_path, n_fictitious, n_real, seed):
    cfg, gate, info = vanilla_for_world(tmp_path, n_fictitious, n_real, seed)
    print(f"\n{n_fictitious}+{n_real} people, seed {seed}: {info['steps']} of at most {info['max_steps']} steps "
          f"({info['stopped']}), {info['train_seconds']} s; forget {100 * gate['forget']['acc']:.1f}%, "
          f"retain {100 * gate['retain']['acc']:.1f}%, real {100 * gate['real']['acc']:.1f}%")
    assert info["max_steps"] == -(-100 * info["n_examples"] // 32)          # the budget grew with the world
    demo.check_gate(gate, cfg.finetune.gate_min_acc, info)


def test_a_world_too_large_for_the_portraits_is_refused(tmp_path):
    from pipeline.config import MiniConfig
    from pipeline.data.mini import make_mini
    with pytest.raises(ValueError, match=r"mini.n_fictitious \+ mini.n_real \+ mini.pool_size = 156 portraits"):
        make_mini(tmp_path, MiniConfig(n_fictitious=120, n_real=12))
