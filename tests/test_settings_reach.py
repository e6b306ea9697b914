"""Every setting reaches its stage, on every path that starts the stage (the CLI, the demo, the study).

Each key of the sections the stages read is set to a sentinel: a valid value
other than its default, generated from the schema (so a new key is covered
without touching this file). The stage functions are replaced by recorders
and every command path runs; then each key's sentinel must be found where the
stage receives it. The stages take their config sections whole (finetune,
precompute, train, evaluate, relearn, quantize, logit_lens, probe), so the sections that arrive must equal
the configured ones, except for the fields a path sets on purpose (listed per
path below); the keys a mapping or job consumes itself are listed in CONSUMED.
A mapping that drops or forgets a key (as `viker demo` once dropped
evaluate.protocol) fails here.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.config import SECTIONS, Config, check_config, config_dict
from pipeline.jobs.runs import pool_dir
from pipeline.schema import bounds, choices, element_type, field_types, is_list

# Keys whose sentinel must keep a rule between keys true (check_rules): these keep their default.
KEEP_DEFAULT = {"train.retain_term", "train.online_reference", "precompute.names"}
# Keys that arrive in a stage's section but that the stage does not read: the mapping or a job consumes them, and where.
CONSUMED = {
    "finetune.exclude_split": "jobs.runs.run_finetune leaves that split's people out of the profiles",
    "finetune.gate_min_acc": "jobs.demo.vanilla_gate / check_gate, after knowledge injection",
    "evaluate.attacks": "jobs.runs.run_evaluate runs them (attack_metrics) and hands evaluate their summaries",
}


def sentinel(key: str, f: dataclasses.Field, tp):
    """A valid value of the field other than its default."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    options = choices(tp)
    if is_list(tp):
        if options:
            picked = [o for o in options if o not in default][:1] or list(options[:1])
            return sorted(set(default[:1]) | set(picked), key=options.index)
        inner = element_type(tp)
        if inner is str:
            return [f"sentinel-{key}"]
        one = dataclasses.field(default=default[0] if default else 1, metadata=f.metadata)
        return [sentinel(key, one, inner)]
    if options:
        return next(o for o in options if o != default)
    if tp is bool:
        return not default
    b = bounds(f)
    if tp is int:
        return default + 3
    if tp is float:
        if "le" in b or "lt" in b:
            top = b.get("le", b.get("lt"))
            low = b.get("ge", b.get("gt", 0))
            return round(low + 0.37 * (top - low), 4) if round(low + 0.37 * (top - low), 4) != default else low + 0.11
        return round(default * 1.5 + 0.37, 4)
    if key == "model.device":
        return "cpu"     # a device this machine has: the CLI resolves it
    return f"sentinel-{key}"


def sentinel_config() -> Config:
    cfg = Config()
    for name, cls in SECTIONS.items():
        if name in ("mini", "tiny", "demo", "study"):
            continue        # the jobs' own sections: they shape the work, no stage receives them
        section = getattr(cfg, name)
        types = field_types(cls)
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            if key not in KEEP_DEFAULT:
                setattr(section, f.name, sentinel(key, f, types[f.name]))
    cfg.precompute.scores = ["reference", "own"]            # the rule: reference is always scored
    return check_config(cfg)


def test_sentinels_differ_from_defaults_and_are_valid():
    cfg, default = sentinel_config(), Config()
    for name in ("data", "model", "finetune", "precompute", "train", "evaluate", "relearn", "quantize", "logit_lens",
                 "probe"):
        for f in dataclasses.fields(getattr(cfg, name)):
            key = f"{name}.{f.name}"
            if key not in KEEP_DEFAULT:
                assert getattr(getattr(cfg, name), f.name) != getattr(getattr(default, name), f.name), key


# ------------------------------------------------------------------ recorders

class Fake:
    """A profile as far as the mapping looks at it."""

    def __init__(self, pid: str, split: str):
        self.id, self.split, self.all_images, self.qa = pid, split, [], []


@pytest.fixture
def calls(monkeypatch, tmp_path):
    # Modules that bind read_profiles & co. at import must be imported before those are replaced, or they
    # would keep the fakes after this test (the patch is undone on the module attribute, not on their copy).
    import importlib
    for name in ("pipeline.stage1.precompute", "pipeline.stage2.train", "pipeline.stage2.finetune",
                 "pipeline.evaluation.evaluate", "pipeline.evaluation.clear_eval", "pipeline.evaluation.relearn",
                 "pipeline.evaluation.quantize", "pipeline.evaluation.logit_lens", "pipeline.evaluation.probe",
                 "pipeline.jobs.demo", "pipeline.study.grid"):
        importlib.import_module(name)
    monkeypatch.chdir(tmp_path)           # relative sentinel paths (e.g. finetune.output) land in the test's folder
    seen: dict[str, list] = {}

    def record(name, result):
        def fn(*args, **kwargs):
            seen.setdefault(name, []).append((args, kwargs))
            return result(*args, **kwargs) if callable(result) else result
        return fn

    def profiles(root, split, benchmark="mllmu", **kwargs):
        seen.setdefault("read_profiles", []).append(((root, split, benchmark), kwargs))
        return [Fake(f"{split}/p{i}", split) for i in range(2)]

    monkeypatch.setattr("pipeline.data.loaders.read_profiles", profiles)
    monkeypatch.setattr("pipeline.data.records.forget_samples", lambda ps: list(ps))
    monkeypatch.setattr("pipeline.stage2.finetune.finetune",
                        record("finetune", lambda *a, **k: Path(a[0].output).mkdir(parents=True, exist_ok=True) or
                               {"train_seconds": 0, "final_loss": 0.0}))
    monkeypatch.setattr("pipeline.stage1.precompute.precompute", record("precompute", None))
    monkeypatch.setattr("pipeline.stage2.train.train",
                        record("train", lambda *a, **k: {"method": a[5].method, "steps": 1, "seconds": 0.0,
                                                          "final_loss": 0.0, "adapter": "sentinel-adapter"}))
    row = {"method": "m", "forget_split": "f", "budget": 0, "seed": 0, "metrics": {}, "coherence_kind": ""}
    monkeypatch.setattr("pipeline.evaluation.evaluate.evaluate", record("evaluate", row))
    monkeypatch.setattr("pipeline.evaluation.clear_eval.evaluate_clear", record("evaluate_clear", row))
    monkeypatch.setattr("pipeline.evaluation.evaluate.format_row", lambda r: "row")
    monkeypatch.setattr("pipeline.evaluation.clear_eval.format_clear_row", lambda r: "row")
    monkeypatch.setattr("pipeline.evaluation.evaluate.relearn_metrics", record("relearn_metrics", {}))
    monkeypatch.setattr("pipeline.evaluation.relearn.format_attack", lambda r, label: "attack")
    # Results shaped as the attacks return them: the row keeps their summaries (jobs.runs.attack_metrics).
    monkeypatch.setattr("pipeline.evaluation.quantize.attack", record("quantize_attack", {"by_scheme": {}}))
    monkeypatch.setattr("pipeline.evaluation.quantize.format_attack", lambda r, label: "attack")
    shapes = {"logit_lens": {"summary": {}}, "probe": {"summary": {}, "by_probe": {}}}
    for name in ("logit_lens", "probe"):
        monkeypatch.setattr(f"pipeline.evaluation.{name}.attack", record(f"{name}_attack", shapes[name]))
        monkeypatch.setattr(f"pipeline.evaluation.{name}.format_attack", lambda r, label: "attack")
    monkeypatch.setattr("pipeline.models.modeling.load_for_eval", lambda *a, **k: (None, None))
    monkeypatch.setattr("pipeline.jobs.demo.vanilla_gate", lambda *a, **k: {})
    monkeypatch.setattr("pipeline.cli._model_libraries", lambda: None)
    return seen


# ------------------------------------------------------------------ what must arrive

def check_finetune(cfg: Config, call, excluded_split: str = ""):
    args, kw = call
    settings, profiles = args
    assert settings == cfg.finetune, "the finetune section arrives whole"
    assert (kw["dtype"], kw["device"]) == (cfg.model.dtype, cfg.model.device)
    if excluded_split:
        assert not [p for p in profiles if p.split == excluded_split], "finetune.exclude_split's people left out"
    assert any(p.split == cfg.data.real_split for p in profiles) == cfg.data.finetune_real


def check_precompute(cfg: Config, call, model_dir: str):
    args, kw = call
    p = cfg.precompute
    assert args[0] == model_dir
    assert args[2] == p, "the precompute section arrives whole"
    assert kw["pool_dir"] == pool_dir(p.pool, cfg.data.root), "precompute.pool (a name: the benchmark's folder)"
    assert kw.get("prefix_cache") is None, "precompute.prefix_cache: the section's (only --no-prefix-cache overrides)"
    assert kw["device"] == cfg.model.device
    assert kw["strict"] == cfg.data.strict, "data.strict: precompute refuses dropped forget items"


def check_train(cfg: Config, call, model_dir: str, train=None):
    args, kw = call
    d, p = cfg.data, cfg.precompute
    assert args[:5] == (model_dir, d.root, d.forget_split, d.retain_split, p.output)
    assert args[5] == (train or cfg.train), "the train section arrives whole"
    assert (kw["pool_dir"], kw["idk_answer"], kw["dtype"], kw["device"]) == (
        pool_dir(p.pool, d.root), p.idk_answer, cfg.model.dtype, cfg.model.device)
    assert (kw["ref_k"], kw["ref_top_k"], kw["ref_seed"], kw["ref_span"], kw["benchmark"], kw["train_root"],
            kw["strict"]) == (p.k, p.top_k, p.seed, p.span, d.benchmark, d.train_root, d.strict)
    assert kw["expect_cache"] == {"k": p.k, "K": p.top_k, "seed": p.seed, "reference": p.reference, "span": p.span,
                                  "names": p.names}
    assert kw["config"] == config_dict(replace(cfg, train=train or cfg.train)), "the adapter records the config"


def check_evaluate(cfg: Config, call, model_dir: str, gold=None, relearn=False, train=None):
    args, kw = call
    model, data, settings = args
    assert model == replace(cfg.model, path=str(model_dir))
    assert data == cfg.data
    assert settings == (cfg.evaluate if gold is None else replace(cfg.evaluate, gold=gold))
    if "relearn" in kw or relearn:
        assert kw["relearn"] == (cfg.relearn if relearn else None)
    # evaluate.attacks: run beside the relearning attack, each with its own section, their summaries in the row
    assert set(kw.get("attacks") or {}) == (set(cfg.evaluate.attacks) if relearn else set())
    expected = config_dict(cfg if train is None else replace(cfg, train=train))
    assert kw["config"] == expected, "the row records the resolved configuration"


def check_quantize(cfg: Config, call, adapter=None, reference="", gold="", section="quantize"):
    args, kw = call
    assert args == (cfg.model, cfg.data, getattr(cfg, section)), f"the model, data and {section} sections arrive whole"
    assert kw == {"adapter": adapter, "reference": reference, "gold": gold, "batch_size": cfg.evaluate.batch_size}


# ------------------------------------------------------------------ the CLI

def invoke(tmp_path, cfg: Config, *args):
    from pipeline.cli import main
    path = tmp_path / "sentinel.yaml"
    path.write_text(yaml.safe_dump(config_dict(cfg)))
    result = CliRunner().invoke(main, [*args, "--config", str(path)])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("benchmark", ["mllmu", "clear"])
def test_cli_paths(tmp_path, calls, benchmark):
    cfg = sentinel_config()
    cfg.data.benchmark = benchmark
    cfg.relearn.results = str(tmp_path / "attack.jsonl")
    cfg.quantize.results = str(tmp_path / "quantize.jsonl")
    cfg.logit_lens.results = str(tmp_path / "logit_lens.jsonl")
    cfg.probe.results = str(tmp_path / "probe.jsonl")
    invoke(tmp_path, cfg, "finetune")
    check_finetune(cfg, calls["finetune"][-1], cfg.finetune.exclude_split)
    invoke(tmp_path, cfg, "precompute")
    check_precompute(cfg, calls["precompute"][-1], cfg.model.path)
    invoke(tmp_path, cfg, "precompute", "--no-prefix-cache")
    args, kw = calls["precompute"][-1]
    assert args[2] == cfg.precompute and kw["prefix_cache"] is False, "--no-prefix-cache overrides the section"
    invoke(tmp_path, cfg, "train")
    check_train(cfg, calls["train"][-1], cfg.model.path)
    invoke(tmp_path, cfg, "evaluate")
    check_evaluate(cfg, calls["evaluate_clear" if benchmark == "clear" else "evaluate"][-1], cfg.model.path)
    if benchmark == "mllmu":
        invoke(tmp_path, cfg, "attack", "relearn", "--reference", "sentinel-vanilla")
        model, processor, members, settings, reference, key, dtype, device, batch = calls["relearn_metrics"][-1][0]
        assert reference == "sentinel-vanilla"
        assert settings == cfg.relearn and (dtype, device, batch) == (cfg.model.dtype, cfg.model.device,
                                                                      cfg.evaluate.batch_size)
        invoke(tmp_path, cfg, "attack", "quantize", "--reference", "sentinel-vanilla")
        check_quantize(cfg, calls["quantize_attack"][-1], reference="sentinel-vanilla", gold=cfg.evaluate.gold)
        invoke(tmp_path, cfg, "attack", "quantize", "--adapter", "sentinel-adapter", "--gold", "sentinel-gold")
        check_quantize(cfg, calls["quantize_attack"][-1], adapter="sentinel-adapter", reference=cfg.model.path,
                       gold="sentinel-gold")
        assert [json.loads(line)["config"] for line in Path(cfg.quantize.results).read_text().splitlines()] == \
            [config_dict(cfg)] * 2, "quantize.results: each row appended, with the resolved configuration"
        for section, command in (("logit_lens", "logit-lens"), ("probe", "probe")):
            invoke(tmp_path, cfg, "attack", command, "--reference", "sentinel-vanilla")
            check_quantize(cfg, calls[f"{section}_attack"][-1], reference="sentinel-vanilla", gold=cfg.evaluate.gold,
                           section=section)
            invoke(tmp_path, cfg, "attack", command, "--adapter", "sentinel-adapter", "--gold", "sentinel-gold")
            check_quantize(cfg, calls[f"{section}_attack"][-1], adapter="sentinel-adapter", reference=cfg.model.path,
                           gold="sentinel-gold", section=section)
            rows = Path(getattr(cfg, section).results).read_text().splitlines()
            assert [json.loads(line)["config"] for line in rows] == [config_dict(cfg)] * 2, f"{section}.results"


# ------------------------------------------------------------------ the demo

def test_demo_paths(tmp_path, calls):
    from pipeline.jobs import demo
    cfg = sentinel_config()
    cfg.train.output = str(tmp_path / "runs")
    cfg.finetune.output = str(tmp_path / "vanilla")
    cfg.data.benchmark = "mllmu"          # the miniature benchmark's layout
    demo.ensure_vanilla(cfg, log=lambda *_: None)
    check_finetune(cfg, calls["finetune"][-1], cfg.finetune.exclude_split)
    demo.ensure_gold(cfg, log=lambda *_: None)
    gold_cfg = demo.gold_config(cfg)
    check_finetune(gold_cfg, calls["finetune"][-1], gold_cfg.finetune.exclude_split)
    assert gold_cfg.finetune.exclude_split == cfg.data.forget_split
    calls["precompute"] = []
    with pytest.raises(Exception):      # the demo inspects the cache it made; the recorder made none
        demo.ensure_references(cfg, "sentinel-model", log=lambda *_: None)
    check_precompute(cfg, calls["precompute"][-1], "sentinel-model")

    cfg.demo.attack_budget = 7
    demo.sweep_run(cfg, "sentinel-model", None)
    check_evaluate(cfg, calls["evaluate"][-1], "sentinel-model")
    demo.sweep_run(cfg, "sentinel-model", "gold")
    check_evaluate(cfg, calls["evaluate"][-1], demo.gold_dir(cfg), gold="", relearn=True)
    run = {"name": "r", "method": "viker+nll", "budget": 7, "seed": 5, "lam": 0.25, "label": "ViKeR+NLL"}
    demo.sweep_run(cfg, "sentinel-model", run)
    tcfg = replace(cfg.train, method="viker", retain_term="nll", steps=7, lr=cfg.demo.lr, seed=5, lam=0.25,
                   output=str(Path(cfg.train.output) / "r"))
    check_train(cfg, calls["train"][-1], "sentinel-model", train=tcfg)
    check_evaluate(cfg, calls["evaluate"][-1], "sentinel-model", relearn=True, train=tcfg)


# ------------------------------------------------------------------ the study

def test_study_paths(tmp_path, calls):
    from pipeline.study import grid
    cfg = sentinel_config()
    cfg.study.output = str(tmp_path / "study")
    cfg.data.benchmark = "mllmu"
    run = grid.make_run(cfg, 1, "forget_10", 0, "graddiff", 4, 1e-3, 0.5, "GradDiff", "main")
    grid.execute_run(cfg, run)
    c = grid._cache_config(cfg, 1, "forget_10", run["settings"]["ref"])
    args, _ = calls["train"][-1]
    check_train(c, calls["train"][-1], c.finetune.output, train=args[5])
    assert dataclasses.asdict(args[5]) == {**dataclasses.asdict(c.train), **grid._changed(c.train),
                                           **{k: getattr(args[5], k) for k in ("method", "steps", "lr", "lam",
                                                                                "seed", "output")}}
    from pipeline.jobs.demo import gold_dir
    gold = str(gold_dir(grid.split_config(cfg, 1, "forget_10")))
    check_evaluate(c, calls["evaluate"][-1], c.finetune.output, gold=gold,
                   relearn=(run["settings"].get("attacks") or {}).get("relearn") is not None, train=args[5])
    grid.prepare_cache(cfg, 1, "forget_10", run["settings"]["ref"])
    check_precompute(c, calls["precompute"][-1], c.finetune.output)


# ------------------------------------------------------------------ stages that take a section read all of it

@pytest.mark.parametrize("section,modules,unread", [
    ("finetune", ("stage2/finetune.py",), {k.split(".")[1] for k in CONSUMED if k.startswith("finetune.")}),
    ("precompute", ("stage1/precompute.py",), {"pool"}),                  # pool: runs.pool_dir resolves it
    ("train", ("stage2/train.py", "stage2/methods/__init__.py"), set()),  # the loop's keys; loss_spec the losses'
    ("evaluate", ("evaluation/evaluate.py", "evaluation/clear_eval.py"), {"table_acc", "attacks"}),   # table_acc: viker report; attacks: jobs.runs
    ("relearn", ("evaluation/relearn.py",), {"results"}),                                   # results: the CLI's file
    ("quantize", ("evaluation/quantize.py",), {"results"}),                                  # results: the CLI's file
    ("logit_lens", ("evaluation/logit_lens.py",), {"results"}),                              # results: the CLI's file
    ("probe", ("evaluation/probe.py",), {"results"}),                                        # results: the CLI's file
    ("model", ("evaluation/evaluate.py", "evaluation/clear_eval.py"), {"family"}),           # family: the demo's
])
def test_a_stage_given_a_section_reads_every_key(section, modules, unread):
    """Each field is read as an attribute somewhere in the stage (a key nobody reads would be a silent no-op)."""
    import ast
    root = Path(__file__).resolve().parent.parent / "pipeline"
    read = {node.attr for m in modules for node in ast.walk(ast.parse((root / m).read_text()))
            if isinstance(node, ast.Attribute)}
    fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
    assert fields - unread - read == set(), f"{section} keys the stage never reads"
    assert unread <= fields
