"""A tiny benchmark + a tiny model (LLaVA, or another family) for tests, built locally in seconds."""
from pipeline.config import MiniConfig, TinyModelConfig
from pipeline.data.mini import make_mini
from pipeline.demo import tokenizer_texts
from pipeline.modeling import build_tiny


def tiny_config(text_layers: int = 1, **kw) -> TinyModelConfig:
    return TinyModelConfig(vocab_size=400, vision_hidden=32, vision_layers=1, text_hidden=32,
                           text_layers=text_layers, text_heads=2, **kw)


def make_world(tmp_path_factory, model_cfg: TinyModelConfig | None = None, family: str = "llava", **mini):
    """(benchmark root, model dir): a miniature benchmark and an untrained tiny model of `family` for it."""
    root = make_mini(tmp_path_factory.mktemp("mini"), MiniConfig(**{"n_real": 2, **mini}))
    model_dir = build_tiny(family, tmp_path_factory.mktemp("tiny"), tokenizer_texts(root), model_cfg or tiny_config())
    return root, model_dir
