"""Fault injection (issue 10): damaged caches are never trained on, results are never mislabeled,
output directories hold one run, and every failure is one line that damages no existing file.

Each test reproduces a case found by injecting the fault as a user's batch job would meet it.
"""
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cache import filememo
from pipeline.cache import refcache as rc
from pipeline.stage2 import train as tr
from pipeline.stage2.checkpoint import TMP_AREA, adapter_files_digest
from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from tests.test_refcache import FP, SETTINGS, make_samples, write_cache
from tests.tiny import make_world, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TINY = tiny_config()   # vocabulary 400
POOL = 5


# ================================================================ helpers


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result) -> str:
    """The command failed with exit 1 and exactly one line of error, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", result.output)   # progress bars' cursor moves
    errors = re.findall(r"Error: [^\r\n]*", text)   # an unfinished progress bar may precede it
    assert len(errors) == 1, result.output
    assert text.rstrip().endswith(errors[0].rstrip())
    return errors[0]


def killed(result) -> bool:
    """Click reports a KeyboardInterrupt (our stand-in for a kill) as "Aborted!", exit 1."""
    return result.exit_code == 1 and "Aborted!" in result.output


def snapshot(folder: Path) -> dict:
    """Every file under folder with its sha256: "no existing file was damaged" compares two of these."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def chunk_span(path: Path, dataset: str, chunk: int = 0) -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
        return info.byte_offset, info.size


def write_bytes_silently(path: Path, offset: int, data: bytes) -> None:
    """Change bytes in place keeping size and mtime, as a silent disk or copy error would."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def flip_in_dataset(path: Path, dataset: str) -> None:
    offset, size = chunk_span(path, dataset)
    with open(path, "rb") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)[0]
    write_bytes_silently(path, offset + size // 2, bytes([byte ^ 0x10]))


@pytest.fixture
def memo(tmp_path, monkeypatch):
    path = tmp_path / "memo" / "hashes.json"
    monkeypatch.setenv("VIKER_HASH_MEMO", str(path))
    return path


@pytest.fixture
def synthetic(tmp_path):
    """A 2-shard cache of synthetic samples (every sample has ref_logp_own)."""
    samples = make_samples(12, logp_every=1)
    write_cache(tmp_path / "c", samples, 2)
    return tmp_path / "c", samples


# ================================================================ 1. checksums on the read path


def test_every_dataset_carries_a_fletcher32_checksum(synthetic):
    cache, _ = synthetic
    with h5py.File(cache / "refs-00000-of-00002.h5", "r") as f:
        names = sorted(f)
        assert {"sample_id", "offsets", "answer_ids", "topk_idx", "topk_prob", "tail_mass", "entropy",
                "ref_logp_own"} <= set(names)
        assert [n for n in names if not f[n].fletcher32] == []
        assert f["topk_prob"].compression == "gzip" and f["ref_logp_own"].compression is None


@pytest.mark.parametrize("dataset", ["topk_prob", "ref_logp_own"])   # compressed, and small uncompressed
def test_a_damaged_chunk_fails_on_read_even_when_the_sha256_is_remembered(synthetic, memo, dataset):
    cache, samples = synthetic
    rc.RefCacheReader(cache).close()      # the first open hashes every shard and remembers it
    shard = cache / "refs-00000-of-00002.h5"
    flip_in_dataset(shard, dataset)       # same size, same mtime, same inode: the memo still says "sound"
    with rc.RefCacheReader(cache) as reader:
        with pytest.raises(rc.CacheError, match=r"refs-00000-of-00002\.h5 .*cannot be read"):
            reader.get(samples[0].sample_id)


def test_a_value_corrupted_to_a_huge_number_is_refused(synthetic, memo):
    """The issue's case: ref_logp_own of one sample becomes -1.39e37 (uncompressed dataset)."""
    cache, samples = synthetic
    rc.RefCacheReader(cache).close()
    shard = cache / "refs-00000-of-00002.h5"
    offset, _ = chunk_span(shard, "ref_logp_own")
    write_bytes_silently(shard, offset, np.float32(-1.39e37).tobytes())
    with rc.RefCacheReader(cache) as reader, pytest.raises(rc.CacheError, match="cannot be read"):
        reader.get(samples[0].sample_id)
    # A process that has not remembered this file version refuses it at open, by sha256.
    memo.unlink()
    with pytest.raises(rc.CacheError, match=r"refs-00000-of-00002\.h5 .*sha256"):
        rc.RefCacheReader(cache)


def test_sha256_is_checked_at_open_and_remembered(synthetic, memo, monkeypatch):
    cache, _ = synthetic
    calls = []
    real = filememo.hash_file
    monkeypatch.setattr(filememo, "hash_file", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    rc.RefCacheReader(cache).close()
    assert sorted(Path(p).name for p in calls) == ["refs-00000-of-00002.h5", "refs-00001-of-00002.h5"]
    rc.RefCacheReader(cache).close()
    assert len(calls) == 2                # the second open pays nothing
    shard = cache / "refs-00001-of-00002.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))        # a real edit changes the mtime: hashed again, refused
    with pytest.raises(rc.CacheError, match=r"refs-00001-of-00002\.h5 .*does not match its sha256"):
        rc.RefCacheReader(cache)
    assert len(calls) == 3


def _edit(manifest_path: Path, edit) -> None:
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))


def test_hand_edited_manifest_settings_are_refused_at_open(synthetic, memo):
    cache, _ = synthetic
    _edit(cache / "manifest.json", lambda m: m["settings"].update(k=3))
    with pytest.raises(rc.CacheError, match=r"settings attribute differs .* k \(manifest 3, shard 5\)"):
        rc.RefCacheReader(cache)
    assert any("settings attribute differs" in p for p in rc.verify_cache(cache))


def test_hand_edited_manifest_fingerprint_is_refused_at_open(synthetic, memo):
    cache, _ = synthetic
    _edit(cache / "manifest.json", lambda m: m["fingerprint"]["parts"].update(k="3"))
    with pytest.raises(rc.CacheError, match="manifest.json .* was modified"):
        rc.RefCacheReader(cache)


def test_verify_flags_any_unexpected_file(synthetic):
    cache, _ = synthetic
    assert rc.verify_cache(cache) == []
    (cache / "extra.h5").write_bytes(b"not a shard")
    (cache / "notes").mkdir()
    assert rc.verify_cache(cache) == ["unexpected file extra.h5 is not part of the cache",
                                      "unexpected directory notes is not part of the cache"]
    result = invoke("cache", "verify", cache)
    assert result.exit_code == 1 and "extra.h5" in result.output


def test_the_reader_refuses_what_verify_rejects_in_the_directory(synthetic):
    cache, samples = synthetic
    write_cache(cache.parent / "other", samples, 3)
    shutil.copy(cache.parent / "other" / "refs-00001-of-00003.h5", cache)   # a shard of another layout
    with pytest.raises(rc.CacheError, match="extra shard file refs-00001-of-00003.h5 is not listed"):
        rc.RefCacheReader(cache)
    (cache / "refs-00001-of-00003.h5").unlink()
    (cache / "extra.h5").write_bytes(b"x")
    with pytest.raises(rc.CacheError, match="unexpected file extra.h5"):
        rc.RefCacheReader(cache)
    rc.RefCacheReader(cache, verify=False).close()   # tools that only look still can


def test_a_failed_shard_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    samples = make_samples(6)
    write_cache(tmp_path, samples[:3], 1)
    before = snapshot(tmp_path)

    def full_disk(path, *args):
        Path(path).write_bytes(b"\0" * 100)   # part of the file was written, then the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(rc, "_write_h5", full_disk)
    with pytest.raises(rc.CacheError, match=r"cannot write shard .*refs-00000-of-00002\.h5: No space left"):
        rc.write_shard(tmp_path, 0, 2, samples, vocab_size=32000, fingerprint=FP, settings=SETTINGS)
    assert not list(tmp_path.glob("*.tmp"))
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}


# ================================================================ config ranges


@pytest.mark.parametrize("override, message", [
    ("precompute.k=0", "config key 'precompute.k' must be >= 1, got 0"),
    ("precompute.k=-1", "config key 'precompute.k' must be >= 1, got -1"),
    ("precompute.top_k=0", "config key 'precompute.top_k' must be >= 1, got 0"),
    ("precompute.shard_size=0", "config key 'precompute.shard_size' must be >= 1, got 0"),
    ("precompute.batch_size=0", "config key 'precompute.batch_size' must be >= 1, got 0"),
    ("train.beta=-1", "config key 'train.beta' must be >= 0, got -1.0"),
    ("train.lora_dropout=1.5", "config key 'train.lora_dropout' must be >= 0 and <= 1, got 1.5"),
    ("evaluate.max_new_tokens=0", "config key 'evaluate.max_new_tokens' must be >= 1, got 0"),
])
def test_bad_numeric_settings_are_refused_at_load_with_their_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_every_numeric_key_has_a_range_and_every_range_a_numeric_key():
    """Both directions: a new int/float key without bounds fails here; bounds on a text key too."""
    import dataclasses
    from pipeline.config import SECTIONS
    from pipeline.schema import bounds, field_types, is_numeric
    cfg = load_config(None)             # the defaults pass every range
    for name, cls in SECTIONS.items():
        types = field_types(cls)
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            if types[f.name] is bool:
                assert not bounds(f), key
            elif is_numeric(types[f.name]):
                assert bounds(f), f"numeric key {key} has no range: give its setting(...) ge/gt/le/lt"
            else:
                assert not bounds(f), f"{key} is not numeric but has a range"
            assert hasattr(getattr(cfg, name), f.name)
    assert cfg.train.use_cache_settings is False


@pytest.mark.parametrize("override,message", [
    ("train.idk_beta=0", "config key 'train.idk_beta' must be > 0, got 0.0"),
    ("evaluate.seed=-1", "config key 'evaluate.seed' must be >= 0, got -1"),
    ("demo.lr=0", "config key 'demo.lr' must be > 0, got 0.0"),
    ("study.val_draw=0", "config key 'study.val_draw' must be >= 1, got 0"),
    ("study.workers=0", "config key 'study.workers' must be >= 1, got 0"),
    ("demo.budgets=16,0", "config key 'demo.budgets' must be >= 1, got [16, 0]"),
    ("evaluate.mia=of", "config key 'evaluate.mia' must be one of: auto, on, off; got 'of'"),
    ("evaluate.tasks=gen,essay", "config key 'evaluate.tasks' must be one of: mc, gen, cloze, fact; got 'essay'"),
    ("train.method=sgd", "config key 'train.method' must be one of: ga, graddiff, kl_min, npo, idkpo, viker, simnpo, "
                         "rmu, mmunlearner; got 'sgd'"),
    ("evaluate.sets=", "config key 'evaluate.sets' needs at least 1 item, got []"),
])
def test_keys_that_had_no_range_or_choice_are_refused_at_load(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


# ================================================================ the CLI on a tiny world


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_world(tmp_path_factory, TINY, n_fictitious=20, pool_size=POOL)


def overrides(env, out, *more):
    root, model = env
    return [f"data.root={root}", f"model.path={model}", f"precompute.output={out}", "precompute.k=2",
            "precompute.top_k=8", "precompute.shard_size=2", "model.device=cpu", *more]


@pytest.fixture(scope="module")
def cache(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("refs") / "c"
    result = invoke("precompute", *overrides(env, out))
    assert result.exit_code == 0, result.output
    return out


def train_args(env, cache, out, *more):
    return overrides(env, cache, f"train.output={out}", "train.steps=2", "train.batch_size=2", "train.lr=1e-3",
                     "train.lora_r=2", *more)


# ---------------------------------------------------------------- precompute


@pytest.mark.parametrize("setting, message", [
    ("precompute.k=0", "must be >= 1, got 0"),
    ("precompute.k=-1", "must be >= 1, got -1"),
    ("precompute.k=6", f"precompute.k must be <= the reference pool size {POOL}"),
    ("precompute.top_k=0", "must be >= 1, got 0"),
    ("precompute.top_k=1000", "precompute.top_k must be <= the vocabulary size 400"),
    ("precompute.shard_size=0", "'precompute.shard_size' must be >= 1, got 0"),
    ("precompute.batch_size=0", "'precompute.batch_size' must be >= 1, got 0"),
])
def test_bad_precompute_settings_are_one_line_and_write_nothing(env, tmp_path, setting, message):
    out = tmp_path / "refs"
    line = one_error_line(invoke("precompute", *overrides(env, out, setting)))
    assert message in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--shard-index", "0", "--num-shards", "0"], "--num-shards must be >= 1 (the number of jobs), got 0"),
    (["--shard-index", "3", "--num-shards", "2"], "--shard-index must be >= 0 and < --num-shards (2), got 3"),
])
def test_bad_job_options_name_the_allowed_range(env, tmp_path, args, message):
    result = invoke("precompute", *args, *overrides(env, tmp_path / "refs"))
    assert result.exit_code == 2 and message in result.output


def test_rerun_with_another_shard_size_is_refused_then_overwritten(env, tmp_path, monkeypatch):
    """The issue's case: a precompute with shard_size=2 is killed, the rerun uses shard_size=3."""
    out = tmp_path / "refs"
    real_write, written = rc.write_shard, []

    def killed_after_three(*args, **kwargs):
        if len(written) == 3:
            raise KeyboardInterrupt       # the job is killed while computing its fourth shard
        written.append(real_write(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(rc, "write_shard", killed_after_three)
    assert killed(invoke("precompute", *overrides(env, out)))
    monkeypatch.setattr(rc, "write_shard", real_write)
    before = snapshot(out)
    line = one_error_line(invoke("precompute", *overrides(env, out, "precompute.shard_size=3")))
    assert "holds shards of another run" in line and "refs-00000-of-" in line and "--overwrite" in line
    assert snapshot(out) == before        # refused without touching a file

    result = invoke("precompute", "--overwrite", *overrides(env, out, "precompute.shard_size=3"))
    assert result.exit_code == 0 and "reference cache ready" in result.output
    assert rc.verify_cache(out) == []
    assert invoke("cache", "merge", out).exit_code == 0


def test_precompute_refuses_a_directory_holding_unrelated_files(env, tmp_path):
    out = tmp_path / "refs"
    out.mkdir()
    (out / "extra.h5").write_bytes(b"mine")
    line = one_error_line(invoke("precompute", "--overwrite", *overrides(env, out)))
    assert "extra.h5" in line and "not part of a reference cache" in line
    assert (out / "extra.h5").read_bytes() == b"mine"   # --overwrite never removes what is not a cache file


def test_precompute_into_a_full_or_read_only_directory_is_one_line(env, cache, tmp_path, monkeypatch):
    out = shutil.copytree(cache, tmp_path / "refs")
    for name in ("refs-00001-of-00006.h5", "refs-00001-of-00006.json", "manifest.json"):
        (out / name).unlink()             # one shard left to compute
    before = snapshot(out)
    real = rc._write_h5
    for code, cause in ((errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")):
        def failing(path, *args, code=code, cause=cause):
            real(path, *args)             # the shard is written in full, then the file system refuses
            raise OSError(code, cause, str(path))

        monkeypatch.setattr(rc, "_write_h5", failing)
        line = one_error_line(invoke("precompute", *overrides(env, out)))
        assert "refs-00001-of-00006.h5" in line and cause in line
        assert snapshot(out) == before and not list(out.glob("*.tmp"))


def test_output_path_that_cannot_be_a_directory_is_one_line(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = one_error_line(invoke("precompute", *overrides(env, blocker / "refs")))
    assert str(blocker / "refs") in line or str(blocker) in line


@pytest.mark.parametrize("damage, message", [
    ("garbage_weights", "cannot load the model in"),
    ("processor_config.json", "has no processor_config.json or preprocessor_config.json"),
    ("tokenizer_config.json", "has no tokenizer_config.json"),
    ("tokenizer.json", "has no tokenizer.json or tokenizer.model or vocab.json"),
])
@pytest.mark.parametrize("command", ["precompute", "train"])
def test_damaged_model_directories_are_one_line(env, cache, tmp_path, damage, message, command):
    root, model = env
    broken = shutil.copytree(model, tmp_path / "model")
    if damage == "garbage_weights":
        (broken / "model.safetensors").write_bytes(os.urandom(5000))
    else:
        (broken / damage).unlink()
    if command == "precompute":
        args = overrides(env, tmp_path / "refs", f"model.path={broken}")
    else:   # ga needs no cache, so nothing else stops it before the model loads
        args = train_args(env, cache, tmp_path / "run", f"model.path={broken}", "train.method=ga")
    line = one_error_line(invoke(command, *args))
    assert message in line and str(broken) in line


# ---------------------------------------------------------------- train on damaged or foreign caches


def test_train_refuses_a_cache_that_fails_verify(env, cache, tmp_path, memo):
    bad = shutil.copytree(cache, tmp_path / "bad")
    shard = bad / "refs-00000-of-00006.h5"
    offset, _ = chunk_span(shard, "ref_logp_own")
    data = bytearray(shard.read_bytes())
    data[offset:offset + 4] = np.float32(-1.39e37).tobytes()
    shard.write_bytes(bytes(data))
    assert invoke("cache", "verify", bad).exit_code == 1
    line = one_error_line(invoke("train", *train_args(env, bad, tmp_path / "run", "train.method=npo")))
    assert "refs-00000-of-00006.h5" in line and "sha256" in line
    assert not (tmp_path / "run" / "adapter").exists()


def test_train_refuses_an_edited_manifest(env, cache, tmp_path, memo):
    bad = shutil.copytree(cache, tmp_path / "bad")
    _edit(bad / "manifest.json", lambda m: m["settings"].update(k=3))
    line = one_error_line(invoke("train", *train_args(env, bad, tmp_path / "run", "train.method=npo")))
    assert "settings attribute differs" in line


def test_config_and_cache_settings_must_agree(env, cache, tmp_path):
    line = one_error_line(invoke("train", *train_args(env, cache, tmp_path / "run", "train.method=npo",
                                                      "precompute.k=3", "precompute.seed=1")))
    assert "precompute.k (config 3, cache 2)" in line and "precompute.seed (config 1, cache 0)" in line
    assert "train.use_cache_settings=true" in line
    result = invoke("train", *train_args(env, cache, tmp_path / "run", "train.method=npo", "precompute.k=3",
                                         "train.use_cache_settings=true"))
    assert result.exit_code == 0, result.output
    notices = [line for line in result.output.splitlines() if line.startswith("[train] train.use_cache_settings")]
    assert notices == ["[train] train.use_cache_settings: training with the cache's settings "
                       "(precompute.k (config 3, cache 2))"]


def test_another_reference_pool_is_refused_naming_both(env, cache, tmp_path):
    root, _ = env
    line = one_error_line(invoke("train", *train_args(env, cache, tmp_path / "run", "train.method=npo",
                                                      "precompute.pool=pets")))
    assert f"precompute.pool (config {root / 'pools' / 'pets'}, cache {root / 'pools' / 'people'})" in line


# ---------------------------------------------------------------- runs that cannot be mislabeled


def test_a_second_run_into_the_same_directory_is_refused(env, cache, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", *train_args(env, cache, run, "train.method=ga")).exit_code == 0
    before = snapshot(run)
    line = one_error_line(invoke("train", *train_args(env, cache, run, "train.method=viker", "train.steps=3")))
    assert "holds another run's results (adapter, train_config.json)" in line and "--overwrite" in line
    assert snapshot(run) == before


def test_an_overwriting_run_that_is_killed_leaves_no_mislabeled_adapter(env, cache, tmp_path, monkeypatch):
    """The issue's case: GA into a directory, then ViKeR into the same one, killed halfway."""
    run = tmp_path / "run"
    assert invoke("train", *train_args(env, cache, run, "train.method=ga")).exit_code == 0
    real, steps = tr.micro_batch_loss, []

    def killed_at_step_3(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "micro_batch_loss", killed_at_step_3)
    assert killed(invoke("train", "--overwrite", *train_args(env, cache, run, "train.method=viker",
                                                             "train.steps=6")))
    assert not (run / "adapter").exists() and not (run / "train_config.json").exists()
    assert not (run / TMP_AREA).exists()
    line = one_error_line(invoke("evaluate", *train_args(env, cache, run), "--adapter", run / "adapter"))
    assert "adapter" in line


def test_a_nan_stop_records_the_steps_done(env, cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real, calls = tr.micro_batch_loss, []

    def nan_at_step_3(*args, **kwargs):
        loss, diags = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), diags

    monkeypatch.setattr(tr, "micro_batch_loss", nan_at_step_3)
    line = one_error_line(invoke("train", *train_args(env, cache, run, "train.method=ga", "train.steps=50")))
    assert "training stopped at step 3" in line
    config = json.loads((run / "train_config.json").read_text())
    assert config["steps"] == 2 and config["result"]["steps"] == 2 and config["planned_steps"] == 50
    assert config["config"]["train"]["steps"] == 50 and config["config"]["train"]["method"] == "ga", \
        "the adapter records the resolved configuration it was made with"
    assert config["adapter_sha256"] == adapter_files_digest(run / "adapter")
    from pipeline.cli import _training_info
    assert _training_info(str(run / "adapter"))["steps"] == 2


def test_evaluate_refuses_an_adapter_its_config_does_not_describe(env, cache, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", *train_args(env, cache, run, "train.method=ga")).exit_code == 0
    other = tmp_path / "other"
    assert invoke("train", *train_args(env, cache, other, "train.method=ga", "train.lr=5e-2")).exit_code == 0
    shutil.rmtree(run / "adapter")
    shutil.copytree(other / "adapter", run / "adapter")   # another run's adapter beside this run's config
    line = one_error_line(invoke("evaluate", *train_args(env, cache, run), "--adapter", run / "adapter"))
    assert "does not match the digest recorded in" in line


def test_checkpoints_are_published_with_their_own_description(env, cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real, steps = tr.micro_batch_loss, []

    def killed_at_step_4(*args, **kwargs):
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "micro_batch_loss", killed_at_step_4)
    assert killed(invoke("train", *train_args(env, cache, run, "train.method=ga", "train.steps=6",
                                              "train.save_every=2")))
    config = json.loads((run / "checkpoint" / "train_config.json").read_text())
    assert config["steps"] == 2 and config["checkpoint"] is True
    assert config["adapter_sha256"] == adapter_files_digest(run / "checkpoint" / "adapter")
    monkeypatch.setattr(tr, "micro_batch_loss", real)
    result = invoke("train", "--resume", *train_args(env, cache, run, "train.method=ga", "train.steps=6",
                                                     "train.save_every=2"))
    assert result.exit_code == 0, result.output
    assert json.loads((run / "train_config.json").read_text())["result"]["steps"] == 6


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_temporary_files(env, cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    import peft

    def full_disk(self, path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "adapter_model.safetensors").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "adapter_model.safetensors"))

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", full_disk)
    line = one_error_line(invoke("train", *train_args(env, cache, run, "train.method=ga")))
    assert "No space left on device" in line and "adapter_model.safetensors" in line
    assert sorted(p.name for p in run.iterdir()) == ["log.jsonl"]   # no adapter, no config, no .tmp


def test_overwrite_and_resume_together_are_refused(env, cache, tmp_path):
    line = one_error_line(invoke("train", "--overwrite", "--resume",
                                 *train_args(env, cache, tmp_path / "run", "train.method=ga")))
    assert "choose one" in line
