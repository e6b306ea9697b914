"""Cache format 2: per-sample draws, the sources record, checks on another machine, `cache show`, leaks."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.config import PrecomputeConfig
from pipeline.stage1 import precompute as pc
from pipeline.cache import refcache
from pipeline.cli import main
from pipeline.data.mllmu import read_split
from pipeline.data.records import forget_samples
from pipeline.cache.fingerprint import machine_problems, pool_files
from pipeline.stage1.references import benchmark_leaks, draw_reference_images
from pipeline.jobs.runs import benchmark_images
from tests.tiny import make_world, tiny_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root, model_dir = make_world(tmp_path_factory, tiny_config(), n_fictitious=20, pool_size=6)
    samples = forget_samples(read_split(root, "forget_10"))[:5]
    out = tmp_path_factory.mktemp("refs")
    settings = PrecomputeConfig(output=str(out), k=3, top_k=8, seed=0, shard_size=3, batch_size=4)
    pc.precompute(str(model_dir), samples, settings, pool_dir=str(root / "pools" / "people"), device="cpu",
                  log=lambda *_: None)
    return root, model_dir, samples, out


def test_shards_record_draws_questions_and_sources(world):
    root, model_dir, samples, out = world
    pool = pool_files(root / "pools" / "people")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    src = manifest["sources"]
    assert src["model"]["path"] == str(model_dir)
    assert [f[0] for f in src["pool"]["files"]] == [p.name for p in pool]
    assert src["pool"]["files"][0][1] == refcache.hash_file(pool[0])
    assert src["pool"]["sha256"] == manifest["fingerprint"]["parts"]["reference_pool"]
    assert src["model"]["model_weights"] == manifest["fingerprint"]["parts"]["model_weights"]
    assert src["prompt_template"]["prompt"] == "USER: <image>\n{question}\nASSISTANT:"
    assert "nats" in src["units"]["entropy"]
    with refcache.RefCacheReader(out) as reader:
        for s in samples:
            ref = reader.get(s.sample_id)
            assert ref.pool_indices.tolist() == draw_reference_images(s.sample_id, len(pool), 3, 0)
            assert ref.question == s.question
    with h5py.File(out / manifest["shards"][0]["name"], "r") as f:   # each shard describes itself
        assert json.loads(f["sources"][()].tobytes()) == src and f["sources"].fletcher32
        assert f["pool_indices"].shape == (3, 3) and f["pool_indices"].dtype == np.int32


def test_a_format_1_cache_is_refused_with_recompute_advice(world, tmp_path):
    out = shutil.copytree(world[3], tmp_path / "old")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(refcache.CacheError, match="format version 1.*recompute it with viker precompute"):
        refcache.RefCacheReader(out)


def test_verify_a_copied_cache_against_this_machines_model_and_pool(world, tmp_path):
    root, model_dir, samples, out = world
    cache = shutil.copytree(out, tmp_path / "cache")
    model = shutil.copytree(model_dir, tmp_path / "elsewhere" / "model")
    pool = shutil.copytree(root / "pools" / "people", tmp_path / "elsewhere" / "pool")
    sources = refcache.RefCacheReader(cache).sources
    assert machine_problems(sources, model, pool) == []      # other paths, same contents
    ok = CliRunner().invoke(main, ["cache", "verify", str(cache), "--model", str(model), "--pool", str(pool)])
    assert ok.exit_code == 0, ok.output
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1                                   # one bit deep inside the weights
    weights.write_bytes(bytes(data))
    names = sorted(p.name for p in pool.iterdir())
    (pool / names[0]).unlink()
    shutil.copy(pool / names[1], pool / "zz-extra.png")
    problems = machine_problems(sources, model, pool)
    assert problems == [f"model weights differ from the cache's (made from {str(model_dir)!r})",
                        f"pool image {names[0]} is missing here",
                        "pool image zz-extra.png is not in the cache's pool (it would shift every draw)"]
    bad = CliRunner().invoke(main, ["cache", "verify", str(cache), "--model", str(model), "--pool", str(pool)])
    assert bad.exit_code == 1 and "model weights differ" in bad.output


def test_cache_show_lists_tokens_entropy_alternatives_and_images(world):
    root, model_dir, samples, out = world
    sid = samples[1].sample_id
    result = CliRunner().invoke(main, ["cache", "show", str(out), sid])
    assert result.exit_code == 0, result.output
    with refcache.RefCacheReader(out) as reader:
        ref = reader.get(sid)
    from pipeline.models.modeling import load_processor
    tok = load_processor(model_dir).tokenizer
    lines = result.output.splitlines()
    assert lines[0] == f"sample {sid}"
    assert f"question: {samples[1].question!r}" in result.output
    names = [p.name for p in pool_files(root / "pools" / "people")]
    for i in ref.pool_indices:
        assert f"[{i}] {names[i]}" in result.output
    rows = [line for line in lines if line.strip().split(" ")[0].isdigit()]
    assert len(rows) == ref.num_tokens
    for t, row in enumerate(rows):
        assert f"{float(ref.entropy[t]):>8.3f} {float(ref.tail_mass[t]):>7.4f}" in row
        assert repr(tok.decode([int(ref.answer_ids[t])])) in row
        assert row.count(" 0.") + row.count(" 1.0") >= 5          # five alternatives with probabilities
    assert repr(tok.decode([int(ref.topk_idx[0, 0])])) in rows[0]
    assert f"{float(ref.topk_prob[0, 0]):.3f}" in rows[0]
    missing = CliRunner().invoke(main, ["cache", "show", str(out), "nobody/0"])
    assert missing.exit_code == 1 and "not in reference cache" in missing.output


def test_leak_check_refuses_benchmark_images_in_the_pool(world, tmp_path):
    root, model_dir, samples, _ = world
    pool = shutil.copytree(root / "pools" / "people", tmp_path / "pool")
    forget = read_split(root, "forget_10")
    (pool / "a-copy.png").write_bytes(forget[0].image)            # the same file
    from PIL import Image
    import io
    test = read_split(root, "Test_Set")[0]
    img = Image.open(io.BytesIO(test.images[-1]))
    img.save(pool / "b-resaved.bmp")                               # other bytes, same pixels
    sets = benchmark_images(str(root), "mllmu", {"forget": "forget_10", "retain": "retain_90",
                                                 "test": "Test_Set", "real": "Retain_Set"}, log=lambda *_: None)
    leaks = benchmark_leaks(pool_files(pool), sets)
    assert leaks == [f"pool image {pool / 'a-copy.png'} equals (bytes) forget image forget_10/{forget[0].id}",
                     f"pool image {pool / 'b-resaved.bmp'} equals (pixels) test image "
                     f"Test_Set/{test.id}#{test.all_images.index(test.images[-1])}"]
    with pytest.raises(ValueError, match="a-copy.png equals .*forget image.*and 1 more.*--allow-benchmark-images"):
        pc.precompute(str(model_dir), samples, PrecomputeConfig(output=str(tmp_path / "out"), k=3, top_k=8),
                      pool_dir=str(pool), device="cpu", log=lambda *_: None, benchmark_sets=sets)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert benchmark_leaks(pool_files(root / "pools" / "people"), sets) == []


def test_precompute_cli_leak_refusal_and_override(world, tmp_path):
    root, model_dir, samples, _ = world
    pool = shutil.copytree(root / "pools" / "people", tmp_path / "pool")
    (pool / "leak.png").write_bytes(read_split(root, "retain_90")[0].image)
    args = ["precompute", f"model.path={model_dir}", f"data.root={root}", f"precompute.pool={pool}",
            f"precompute.output={tmp_path / 'out'}", "precompute.k=2", "precompute.top_k=4", "model.device=cpu",
            "data.forget_split=forget_10"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "leak.png equals (bytes) retain image retain_90/" in refused.output
    assert [line for line in refused.output.strip().splitlines() if not line.startswith("[config] ")] == [
        refused.output.strip().splitlines()[-1]]                # one line of error after the settings line
    allowed = CliRunner().invoke(main, ["precompute", "--allow-benchmark-images", *args[1:]])
    assert allowed.exit_code == 0, allowed.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["allow_benchmark_images"] is True
