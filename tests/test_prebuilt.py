"""The demo's shipped vanilla and gold models: the rebuild path, the copy, and when a copy is refused."""
import json
import shutil

import pytest

from pipeline.config import load_config
from pipeline.jobs import demo, prebuilt, rebuild
from pipeline.study.quick import QUICK

WORLD = [o for o in QUICK if not o.startswith("study.")]


def small_config(tmp_path, *extra):
    return load_config("configs/demo.yaml", WORLD + [
        f"data.root={tmp_path}/mini", f"finetune.base={tmp_path}/base", f"finetune.output={tmp_path}/vanilla",
        f"model.path={tmp_path}/vanilla", "demo.workers=1", *extra])   # injection here: no pool to start


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A small world's models rebuilt by the export path (what `python -m pipeline.jobs.rebuild` runs)."""
    tmp = tmp_path_factory.mktemp("prebuilt")
    cfg = small_config(tmp)
    logs = []
    record = rebuild.export(cfg, tmp / "shipped", log=logs.append)
    return tmp, cfg, record, logs


def test_export_trains_both_models_and_records_their_hashes(shipped):
    tmp, cfg, record, logs = shipped
    assert any("knowledge injection: vanilla and gold models" in line for line in logs)   # trained, not reused
    on_disk = json.loads((tmp / "shipped" / prebuilt.PROVENANCE).read_text())
    assert on_disk == record and set(record["models"]) == {"vanilla", "gold"}
    assert record["models"]["vanilla"]["stamp"] == demo.vanilla_stamp(cfg)
    assert record["models"]["gold"]["stamp"] == demo.vanilla_stamp(demo.gold_config(cfg))
    assert "forget" in record["models"]["vanilla"]["gate"] and record["rebuild"] == prebuilt.REBUILD
    for which, entry in record["models"].items():
        assert set(entry["files"]) == set(prebuilt.MODEL_FILES)
        for name, digest in entry["files"].items():
            assert prebuilt.sha256(tmp / "shipped" / which / name) == digest


def test_demo_copies_the_shipped_models_instead_of_training(shipped, tmp_path, monkeypatch):
    src, _, record, _ = shipped
    monkeypatch.setattr(prebuilt, "SHIPPED", src / "shipped")
    cfg = small_config(tmp_path)
    demo.ensure_benchmark(cfg, lambda *_: None)
    logs = []
    vanilla, gold = demo.ensure_models(cfg, logs.append)
    assert not any("knowledge injection" in line for line in logs), logs
    assert sum("the shipped checkpoint" in line for line in logs) == 2
    assert not (tmp_path / "base").exists()                      # no base model needed when nothing is trained
    for which, folder in (("vanilla", vanilla), ("gold", gold)):
        assert prebuilt.sha256(folder / "model.safetensors") == record["models"][which]["files"]["model.safetensors"]
    assert not list(tmp_path.glob(".vanilla.*"))                # no temporary copy left beside the model
    # reused the second time, and the copied model is a model the demo can gate
    again = []
    demo.ensure_models(cfg, again.append)
    assert all("(reused)" in line for line in again) and len(again) == 2
    assert demo.vanilla_gate(cfg, vanilla, lambda *_: None)["forget"]["n"] > 0


def test_other_settings_or_a_damaged_file_train_instead(shipped, tmp_path, monkeypatch):
    src, _, _, _ = shipped
    copy = tmp_path / "shipped"
    shutil.copytree(src / "shipped", copy)
    monkeypatch.setattr(prebuilt, "SHIPPED", copy)
    stamp = demo.vanilla_stamp(small_config(src))
    logs = []
    other = demo.vanilla_stamp(small_config(src, "finetune.lr=0.002"))
    digest = prebuilt.world_digest(demo.tokenizer_texts(str(src / "mini")))
    world = lambda: digest  # noqa: E731
    assert not prebuilt.install("vanilla", tmp_path / "a", other, world, logs.append)
    assert "finetune" in logs[-1] and "lr 0.001 -> 0.002" in logs[-1] and not (tmp_path / "a").exists()
    with open(copy / "vanilla" / "model.safetensors", "r+b") as f:   # one flipped byte
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    assert not prebuilt.install("vanilla", tmp_path / "b", stamp, world, logs.append)
    assert "does not match" in logs[-1] and "model.safetensors" in logs[-1] and not (tmp_path / "b").exists()
    gold_stamp = json.loads((copy / prebuilt.PROVENANCE).read_text())["models"]["gold"]["stamp"]
    assert prebuilt.install("gold", tmp_path / "c", gold_stamp, world, logs.append)
    # a benchmark whose texts differ (another generator) is refused even with the same settings
    assert not prebuilt.install("gold", tmp_path / "e", gold_stamp, lambda: "0" * 64, logs.append)
    assert "another miniature benchmark" in logs[-1]
    # demo.prebuilt=false never copies
    cfg = small_config(src, "demo.prebuilt=false")
    assert not demo._shipped("gold", cfg, tmp_path / "d", stamp, logs.append)


def test_the_shipped_demo_models_match_the_demo_configuration(tmp_path):
    """The checkpoints in the repository are the ones `viker demo` asks for: a change to the demo's world
    (its settings or its generator), tiny model or injection recipe must come with
    `python -m pipeline.jobs.rebuild` (else every demo trains them)."""
    from pipeline.data.mini import make_mini
    record = json.loads((prebuilt.SHIPPED / prebuilt.PROVENANCE).read_text())
    make_mini(tmp_path / "mini", load_config("configs/demo.yaml").mini)
    assert record["world_sha256"] == prebuilt.world_digest(demo.tokenizer_texts(str(tmp_path / "mini")))
    for path in ("configs/demo.yaml", "configs/demo_full.yaml"):
        cfg = load_config(path)
        assert record["models"]["vanilla"]["stamp"] == demo.vanilla_stamp(cfg), path
        assert record["models"]["gold"]["stamp"] == demo.vanilla_stamp(demo.gold_config(cfg)), path
    for which, entry in record["models"].items():
        for name, digest in entry["files"].items():
            assert prebuilt.sha256(prebuilt.SHIPPED / which / name) == digest, f"{which}/{name}"
    gate = record["models"]["vanilla"]["gate"]
    assert gate["forget"] >= 0.9 and gate["retain"] >= 0.9
