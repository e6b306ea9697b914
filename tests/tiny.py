"""A tiny benchmark + a tiny model (LLaVA, or another family) for tests, built locally in seconds."""
import numpy as np
import pytest

from pipeline.cache import refcache
from pipeline.config import MiniConfig, TinyModelConfig
from pipeline.data.mini import make_mini
from pipeline.jobs.demo import tokenizer_texts
from pipeline.models.modeling import build_tiny


def tiny_config(text_layers: int = 1, **kw) -> TinyModelConfig:
    return TinyModelConfig(vocab_size=400, vision_hidden=32, vision_layers=1, text_hidden=32,
                           text_layers=text_layers, text_heads=2, **kw)


def make_world(tmp_path_factory, model_cfg: TinyModelConfig | None = None, family: str = "llava", **mini):
    """(benchmark root, model dir): a miniature benchmark and an untrained tiny model of `family` for it."""
    root = make_mini(tmp_path_factory.mktemp("mini"), MiniConfig(**{"n_real": 2, **mini}))
    model_dir = build_tiny(family, tmp_path_factory.mktemp("tiny"), tokenizer_texts(root), model_cfg or tiny_config())
    return root, model_dir


def assert_caches_agree(prefix_dir, naive_dir, atol: float = 1e-5) -> None:
    """Two reference caches of one model agree sample by sample (stage one's prefix path vs its naive path)."""
    with refcache.RefCacheReader(prefix_dir) as a, refcache.RefCacheReader(naive_dir) as b:
        assert a.sample_ids == b.sample_ids
        for sid in a.sample_ids:
            x, y = a.get(sid), b.get(sid)
            np.testing.assert_allclose(x.topk_prob, y.topk_prob, atol=atol)
            np.testing.assert_allclose(x.entropy, y.entropy, atol=atol)
            np.testing.assert_allclose(x.tail_mass, y.tail_mass, atol=atol)
            # indices must agree wherever the probabilities are not (near-)tied
            gaps = np.diff(-x.topk_prob, axis=-1, prepend=np.inf, append=np.inf)
            untied = np.minimum(gaps[:, :-1], gaps[:, 1:]) > 1e-4
            assert np.array_equal(x.topk_idx[untied], y.topk_idx[untied])
            # own-image and idk scores run through prefix reuse too (grouped by the own image)
            assert x.ref_logp_own == pytest.approx(y.ref_logp_own, rel=1e-5, abs=1e-4)
            assert x.ref_logp_idk == pytest.approx(y.ref_logp_idk, rel=1e-5, abs=1e-4)


_RUN_KEYS = ("adapter", "method", "setting", "budget", "seed", "cache_fingerprint", "results_path", "samples_path",
             "relearn", "relearn_reference", "config")


def evaluate_with(fn, model_dir, root, forget_split: str, retain_split: str = "", **kw):
    """Call an evaluation stage (evaluate.evaluate, clear_eval.evaluate_clear) the short way tests like.

    model.*, data.* and evaluate.* keys given as keywords become the config
    sections the stage takes, each value coerced and range-checked as a config
    file's would be (`eval_seed` is evaluate.seed: `seed` is the run's);
    `relearn` may be a dict of relearn.* keys.
    """
    from pipeline.config import DataConfig, EvalConfig, ModelConfig, RelearnConfig
    from pipeline.schema import check_section, coerce, field_types

    def section(cls, name, values):
        types = field_types(cls)
        made = cls(**{k: coerce(f"{name}.{k}", v, types[k]) for k, v in values.items()})
        check_section(name, made)
        return made
    run = {k: kw.pop(k) for k in _RUN_KEYS if k in kw}
    if isinstance(run.get("relearn"), dict):
        run["relearn"] = section(RelearnConfig, "relearn", run["relearn"])
    model = section(ModelConfig, "model", {"path": str(model_dir), **{k: kw.pop(k) for k in ("dtype", "device")
                                                                      if k in kw}})
    data = section(DataConfig, "data", {"root": str(root), "forget_split": forget_split, "retain_split": retain_split,
                                        **{k: kw.pop(k) for k in ("benchmark", "test_split", "real_split") if k in kw}})
    if "eval_seed" in kw:
        kw["seed"] = kw.pop("eval_seed")
    return fn(model, data, section(EvalConfig, "evaluate", kw), **run)


class Interrupted(Exception):
    """A planted crash: a run killed mid-way, seen from inside."""


def crash_on_call(monkeypatch, module, name: str, n: int, error: Exception | None = None):
    """module.<name> replaced by a wrapper raising `error` (Interrupted) on its n-th call; returns the original."""
    original, calls = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise error or Interrupted()
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return original


def torchrun_two(script: str, tmp_path, world) -> list[dict]:
    """`script` under torchrun with two processes on the world's model, data and pool; each rank's rank<r>.json.

    The script reads its arguments as JSON from argv[1] (out, model, root, pool, and cache where the world has
    one) and writes <out>/rank<r>.json.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    path = tmp_path / "ddp.py"
    path.write_text(script)
    args = {"out": str(tmp_path / "run"), **{k: str(world[k]) for k in ("model", "root", "cache", "pool") if k in world}}
    (tmp_path / "run").mkdir()
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(path), json.dumps(args)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1)]
