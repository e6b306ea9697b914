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
