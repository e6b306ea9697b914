"""benchmarks/gpu_check.sh's CPU-feasible part (the end-to-end CLI run at --shape mid)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_mid_shape_runs_the_cli_end_to_end(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path), "--shape", "mid"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[gpu_check] PASS" in proc.stdout
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert steps["e2e"].startswith("pass") and steps["e2e_qwen"].startswith("pass")
    for folder, family in (("e2e", "llava"), ("e2e-qwen", "qwen2_5_vl")):   # the second family (#15) too
        e2e = json.loads((tmp_path / folder / "e2e.json").read_text())
        assert e2e["family"] == family
        assert set(e2e["steps"]) == {"build", "precompute_prefix", "precompute_naive", "train", "evaluate", "report"}
        # float32 on CPU: reusing the image prefix must give the naive forward's distributions.
        assert e2e["prefix_vs_naive_drift"]["top1_agreement"] == 1.0
        assert e2e["prefix_vs_naive_drift"]["entropy_max_abs_diff"] < 1e-4
        rows = [json.loads(line) for line in (tmp_path / folder / "results.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and rows[0]["method"] == "ViKeR"
        assert (tmp_path / folder / "report" / "table.md").is_file()
    for path in (tmp_path / "e2e").rglob("*"):
        assert path.name.isascii() and " " not in path.name, path
