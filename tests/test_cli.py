"""The `viker` command line: one-line errors, precompute jobs, cache verify/inspect/merge."""
import hashlib
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.jobs.demo import tokenizer_texts
from pipeline.models.modeling import build_tiny_llava
from tests.tiny import make_world, tiny_config

TINY = tiny_config()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_world(tmp_path_factory, TINY, n_fictitious=20, pool_size=5)


def overrides(env, out):
    root, model = env
    return [f"data.root={root}", f"model.path={model}", f"precompute.output={out}", "precompute.k=2",
            "precompute.top_k=8", "precompute.shard_size=2", "model.device=cpu"]


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("refs-*.h5"))}


@pytest.fixture(scope="module")
def cache(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("refs") / "c"
    result = invoke("precompute", *overrides(env, out))
    assert result.exit_code == 0, result.output
    assert "reference cache ready" in result.output
    return out


def test_help_explains_commands():
    result = invoke("--help")
    for cmd in ("demo", "precompute", "finetune", "cache", "data"):
        assert cmd in result.output


def test_bad_override_is_one_line(env, tmp_path):
    result = CliRunner().invoke(main, ["precompute", "precompute.kk=3"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: unknown config key 'precompute.kk' (known in precompute: output, pool, " \
        "reference, k, top_k, seed, shard_size, batch_size, prefix_cache, scores, prefix_cache_images, idk_answer, dtype, allow_benchmark_images, span, names, name_pool)"


def test_missing_model_is_one_line(env, tmp_path):
    args = overrides(env, tmp_path / "x") + [f"model.path={tmp_path / 'nope'}"]
    result = CliRunner().invoke(main, ["precompute", *args])
    config_line, error = result.output.strip().splitlines()     # the settings it ran with, then one line of error
    assert result.exit_code == 1 and config_line.startswith("[config] ") and error.startswith("Error: ")
    assert "does not exist" in error


def test_verify_ok_then_corruption_exits_1(cache, tmp_path):
    assert invoke("cache", "verify", str(cache)).exit_code == 0
    import shutil
    bad = shutil.copytree(cache, tmp_path / "bad")
    shard = sorted(bad.glob("refs-*.h5"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = invoke("cache", "verify", str(bad))
    assert result.exit_code == 1 and "sha256" in result.output


def test_inspect_decodes_key_tokens(env, cache):
    _, model = env
    result = invoke("cache", "inspect", str(cache), "--model", str(model), "--top", "3")
    assert result.exit_code == 0
    assert "bytes per answer token" in result.output and "key tokens" in result.output


def test_shard_index_jobs_then_merge_equal_one_job(env, cache, tmp_path):
    out = tmp_path / "jobs"
    for i in (1, 0, 2):
        result = invoke("precompute", "--shard-index", str(i), "--num-shards", "3", *overrides(env, out))
        assert result.exit_code == 0, result.output
    assert (out / "manifest.json").exists(), "the last job to finish writes the manifest"
    assert digests(out) == digests(cache)
    (out / "manifest.json").unlink()
    assert "merged" in invoke("cache", "merge", str(out)).output
    assert invoke("cache", "verify", str(out)).exit_code == 0


def test_shard_index_needs_num_shards(env, tmp_path):
    result = CliRunner().invoke(main, ["precompute", "--shard-index", "0", *overrides(env, tmp_path / "y")])
    assert result.exit_code == 2 and "go together" in result.output


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(env, cache, tmp_path):
    # Both runs pin one thread: a float32 matmul split over 2 threads sums in another order than over 1,
    # so the in-process `cache` (every core) may differ in the last bit from a 1-thread rank.
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single, out = tmp_path / "one", tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "precompute", *overrides(env, single)],
                          capture_output=True, text=True, timeout=600, env=one_thread)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "pipeline.cli", "precompute", *overrides(env, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=one_thread)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert digests(out) == digests(single)
    assert digests(single).keys() == digests(cache).keys()


def test_train_evaluate_report_through_the_cli(env, cache, tmp_path):
    import json
    run_dir, results = tmp_path / "run", tmp_path / "results.jsonl"
    common = overrides(env, cache) + [f"train.output={run_dir}", f"evaluate.results={results}",
                                      "evaluate.max_new_tokens=4", "evaluate.max_profiles=2", "evaluate.few_shot=0"]
    result = invoke("train", *common, "train.method=viker", "train.steps=2", "train.lr=1e-3", "train.lora_r=2")
    assert result.exit_code == 0, result.output
    assert "viker: 2 steps" in result.output and (run_dir / "adapter" / "adapter_config.json").exists()
    assert invoke("evaluate", *common).exit_code == 0
    result = invoke("evaluate", *common, "--adapter", str(run_dir / "adapter"))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["Vanilla", "ViKeR"]
    assert rows[1]["budget"] == 2 and rows[1]["setting"]["lam"] == 0.5 and rows[1]["cache_fingerprint"]
    result = invoke("report", *common, "--out", str(tmp_path / "rep"))
    assert result.exit_code == 0 and "| ViKeR |" in result.output
    assert (tmp_path / "rep" / "tradeoff.png").stat().st_size > 1000
    # The relearning attack on that adapter, its row appended as JSON.
    attack = tmp_path / "relearn.jsonl"
    result = invoke("attack", "relearn", *common, "--adapter", str(run_dir / "adapter"), "relearn.steps=2",
                    f"relearn.results={attack}")
    assert result.exit_code == 0, result.output
    row = json.loads(attack.read_text())
    assert row["method"] == "ViKeR" and row["relearn"]["steps"] == 2
    assert f"ViKeR: relearned on {row['relearn']['n_attack_qa']:g} forget QA (10%), 2 steps" in result.output
    assert "relearn.fraction of the forget QA" in " ".join(invoke("attack", "relearn", "--help").output.split())


def test_train_refuses_a_cache_for_another_model(env, cache, tmp_path):
    root, _ = env
    other = build_tiny_llava(tmp_path / "other", tokenizer_texts(root), TINY, seed=3)
    result = CliRunner().invoke(main, ["train", *overrides(env, cache), f"model.path={other}",
                                       f"train.output={tmp_path / 'r'}", "train.steps=1"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: reference cache {cache} was made for a different setup: model weights differ")


def test_version_and_commands_that_need_no_model_stay_light(tmp_path):
    """`viker --version` answers; cache verify and data check import no model library."""
    import subprocess
    import sys
    from importlib.metadata import version
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"viker, version {version('viker')}"
    code = ("import sys\nfrom pipeline.cli import main\nfor args in (['cache', 'verify', sys.argv[1]], "
            "['data', 'check', sys.argv[1]]):\n    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "print('HEAVY' if {'torch', 'transformers'} & set(sys.modules) else 'LIGHT')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "LIGHT", out.stdout + out.stderr


def test_the_first_line_names_the_config_and_full_is_a_config(tmp_path):
    out = tmp_path / "mini"
    result = invoke("data", "make-mini", "--out", str(out), "mini.n_fictitious=4", "mini.n_real=1",
                    "mini.n_holdout=1", "mini.pool_size=2")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == ("[config] configs/demo.yaml + mini.n_fictitious=4 mini.n_real=1 "
                                             "mini.n_holdout=1 mini.pool_size=2")
    both = CliRunner().invoke(main, ["demo", "--full", "--config", "configs/demo.yaml"])
    assert both.exit_code == 2 and "--full is --config configs/demo_full.yaml" in both.output
    assert "demo [--full]" in invoke("--help").output and "attack relearn" in invoke("--help").output
