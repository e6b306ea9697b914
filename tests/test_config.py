from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads_and_names_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# viker "), f"{path.name} must start with the command that runs it"


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-4", "train.steps=7", "train.use_ga=false", "data.root=/x"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.use_ga is False
    assert cfg.data.root == "/x"


def test_override_beats_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("# viker train --config c.yaml\ntrain:\n  lr: 0.5\n  lam: 0.05\n")
    cfg = load_config(f, ["train.lr=0.25"])
    assert cfg.train.lr == 0.25 and cfg.train.lam == 0.05


@pytest.mark.parametrize("override,needle", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("trian.lr=1", "unknown config section 'trian'"),
    ("train.steps=1.5", "config key 'train.steps' expects an integer"),
    ("train.lr=fast", "config key 'train.lr' expects a number"),
    ("train.use_ga=maybe", "config key 'train.use_ga' expects true/false"),
    ("train.lr", "must be KEY=VALUE"),
    ("lr=1", "must look like section.name"),
])
def test_bad_overrides_fail_with_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_file_fails(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lamda: 0.5\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.lamda'"):
        load_config(f)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    f = tmp_path / "broken.yaml"
    f.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_retain_split_pairs_with_forget_split():
    from pipeline.data.loaders import default_splits
    from pipeline.data.mllmu import DataError
    assert default_splits("mllmu", "forget_10")["retain"] == "retain_90"
    assert default_splits("mllmu", "forget_5")["retain"] == "retain_95"
    with pytest.raises(DataError):
        default_splits("mllmu", "mine")
