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


# ------------------------------------------------------------ the typed schema

def test_lists_come_from_yaml_lists_or_comma_strings(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("demo:\n  budgets: [8, 16]\n  lams: 0.5\nevaluate:\n  sets:\n    - forget\n    - retain\n")
    cfg = load_config(f, ["study.lrs=1e-3,2e-3", "precompute.scores=[reference, own]"])
    assert cfg.demo.budgets == [8, 16] and cfg.demo.lams == [0.5] and cfg.evaluate.sets == ["forget", "retain"]
    assert cfg.study.lrs == [1e-3, 2e-3] and cfg.precompute.scores == ["reference", "own"]
    assert load_config(None, ["train.method=GA"]).train.method == "ga", "choices are matched case-insensitively"


def test_lists_are_not_shared_between_configs():
    a, b = Config(), Config()
    a.demo.budgets.append(99)
    assert b.demo.budgets == [16, 32]


def test_rules_between_keys_are_checked_at_load():
    for bad, needle in (("train.retain_term=nll", "applies to method viker only"),
                        ("train.online_reference=true", "online_reference' applies to method viker only"),
                        ("precompute.scores=own,idk", "must include reference"),
                        ("model.device=gpu", "'model.device' must be auto, cpu, cuda or cuda:N")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, ["train.method=npo", bad] if "viker only" in needle else [bad])
    assert load_config(None, ["model.device=cuda:1"]).model.device == "cuda:1"


def test_family_choices_are_the_family_table():
    import typing
    from pipeline.config import ModelConfig
    from pipeline.models.families import FAMILIES
    choices = typing.get_args(typing.get_type_hints(ModelConfig)["family"])
    assert set(choices) == {"auto", *FAMILIES}


def test_docs_config_md_is_generated_from_the_schema():
    from pipeline.config import reference_markdown
    doc = Path(__file__).parent.parent / "docs" / "CONFIG.md"
    assert doc.read_text() == reference_markdown(), \
        "docs/CONFIG.md is out of date: python -m pipeline.config > docs/CONFIG.md"


def test_every_key_has_a_meaning_in_the_docs():
    import dataclasses
    from pipeline.config import SECTIONS
    missing = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
               if not f.metadata.get("doc")]
    assert missing == []


def test_config_show_prints_the_resolved_yaml():
    import yaml
    from click.testing import CliRunner
    from pipeline.cli import main
    result = CliRunner().invoke(main, ["config", "show", "--config", "configs/demo.yaml", "train.lr=3e-4",
                                       "demo.budgets=4,8"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["train"]["lr"] == 3e-4 and shown["demo"]["budgets"] == [4, 8]
    assert shown["data"]["finetune_real"] is True, "the file's values are in it"
    assert load_config(None, [f"{s}.{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                              for s, keys in shown.items() for k, v in keys.items()]) == load_config(
        "configs/demo.yaml", ["train.lr=3e-4", "demo.budgets=4,8"]), "what it prints loads back to the same config"
    bad = CliRunner().invoke(main, ["config", "show", "evaluate.mia=of"])
    assert bad.exit_code == 1 and "config key 'evaluate.mia' must be one of: auto, on, off" in bad.output


def test_a_bad_setting_stops_the_demo_at_once_without_loading_a_model_library():
    """`viker demo evaluate.mia=of` is refused with one line before anything heavy is imported."""
    import subprocess
    import sys
    import time
    code = ("import sys\nfrom pipeline.cli import main\ntry:\n    main(['demo', 'evaluate.mia=of'])\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print('LOADED' if any(m in sys.modules for m in ('torch', 'transformers')) else 'LIGHT', code)")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent)
    took = time.perf_counter() - t
    assert out.stdout.split() == ["LIGHT", "1"], out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == ["Error: config key 'evaluate.mia' must be one of: auto, on, off; got 'of'"]
    assert took < 5, f"refusing a bad key took {took:.1f}s"


def test_method_choices_are_the_registry():
    """train.method and the sweeps' method lists offer exactly what pipeline/stage2/methods/ registers."""
    import typing
    from pipeline.config import DemoConfig, StudyConfig, TrainConfig
    from pipeline.stage2.methods import METHOD_NAMES, SWEEP_KEYS
    assert typing.get_args(typing.get_type_hints(TrainConfig)["method"]) == METHOD_NAMES
    for section in (DemoConfig, StudyConfig):
        element = typing.get_args(typing.get_type_hints(section)["methods"])[0]
        assert typing.get_args(element) == SWEEP_KEYS


def test_a_config_holds_only_what_differs_from_its_base(tmp_path):
    """`base:` (relative to the file) is read first; the file's keys win key by key; overrides win last."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("train:\n  lr: 0.5\n  lam: 0.05\ndemo:\n  budgets: [4, 8]\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\ntrain:\n  lam: 0.2\n")
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\ndemo:\n  lr: 0.1\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.lr=0.25"])
    assert (cfg.train.lr, cfg.train.lam, cfg.demo.budgets, cfg.demo.lr) == (0.25, 0.2, [4, 8], 0.1)
    (tmp_path / "loop.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="is its own base"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone.yaml does not exist \(the base of"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "odd.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="must be the path of another config file"):
        load_config(tmp_path / "odd.yaml")


def test_the_full_demo_differs_from_the_quick_one_only_in_its_sweep():
    """configs/demo_full.yaml keeps the quick demo's world and models (the shipped ones) and runs elsewhere."""
    import dataclasses
    quick, full = load_config("configs/demo.yaml"), load_config("configs/demo_full.yaml")
    differ = {f"{section}.{f.name}" for section in ("mini", "data", "model", "tiny", "finetune", "precompute",
                                                     "train", "evaluate", "relearn", "demo")
              for f in dataclasses.fields(getattr(quick, section))
              if getattr(getattr(quick, section), f.name) != getattr(getattr(full, section), f.name)}
    assert differ == {"train.output", "evaluate.results", "evaluate.attacks", "relearn.people", "demo.methods", "demo.lams", "demo.budgets",
                      "relearn.grid_lrs", "relearn.grid_steps"}
    assert set(quick.demo.budgets) < set(full.demo.budgets)
    assert set(quick.demo.methods) < set(full.demo.methods) and "viker" in quick.demo.methods
    assert len([m for m in quick.demo.methods if m != "viker"]) >= 2      # ViKeR and two baselines at least
