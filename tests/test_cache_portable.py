"""A reference cache is auditable without viker: recompute cached samples with h5py + transformers only.

The recomputation below (``recompute``) imports h5py, numpy, torch, PIL and
transformers, never ``pipeline``: everything it needs (which pool images each
sample used, the pool's file names and sha256s, the prompt template text, the
units, the model) comes from the manifest and the shards. The test runs it in
a fresh interpreter and checks that ``pipeline`` was never imported there.
Run by hand: python tests/test_cache_portable.py CACHE_DIR POOL_DIR [MODEL_DIR]
"""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest


def recompute(cache_dir, pool_dir, model_dir=None, n=3) -> list[dict]:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cache_dir, pool_dir = Path(cache_dir), Path(pool_dir)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    src, settings = manifest["sources"], manifest["settings"]
    model_dir = model_dir or src["model"]["path"]
    dtype = getattr(torch, settings["dtype"])
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    files = src["pool"]["files"]                       # [[name, sha256], ...]; pool_indices index this list
    for name, digest in files:
        assert hashlib.sha256((pool_dir / name).read_bytes()).hexdigest() == digest, name
    template = src["prompt_template"]["prompt"]
    results = []
    with h5py.File(cache_dir / manifest["shards"][0]["name"], "r") as f:
        offsets = f["offsets"][()]
        for row in range(min(n, f["sample_id"].shape[0])):
            a, b = offsets[row], offsets[row + 1]
            answer = f["answer_ids"][a:b].astype(np.int64)
            prompt = template.format(question=f["question"].asstr()[row])
            probs = []
            for i in f["pool_indices"][row]:
                image = Image.open(pool_dir / files[i][0]).convert("RGB")
                enc = processor(images=[image], text=prompt, return_tensors="pt")
                prompt_ids = enc["input_ids"][0]
                ids = torch.cat([prompt_ids, torch.from_numpy(answer)]).unsqueeze(0)
                with torch.no_grad():
                    logits = model(input_ids=ids, pixel_values=enc["pixel_values"].to(dtype)).logits[0]
                start = len(prompt_ids)                # logits at p predict token p + 1
                probs.append(torch.softmax(logits[start - 1: start - 1 + len(answer)].float(), dim=-1))
            avg = torch.stack(probs).mean(0).numpy()
            idx = f["topk_idx"][a:b].astype(np.int64)
            entropy = -(avg * np.log(np.where(avg > 0, avg, 1.0))).sum(-1)
            results.append({"sample_id": f["sample_id"].asstr()[row],
                            "stored_prob": f["topk_prob"][a:b].astype(np.float32).tolist(),
                            "recomputed_prob": np.take_along_axis(avg, idx, -1).tolist(),
                            "stored_entropy": f["entropy"][a:b].tolist(), "recomputed_entropy": entropy.tolist(),
                            "stored_tail": f["tail_mass"][a:b].tolist(),
                            "recomputed_tail": (1.0 - np.sort(avg, -1)[:, ::-1][:, :idx.shape[1]].sum(-1)).tolist()})
    return results


def _cache(tmp_path_factory):
    """(cache dir, pool dir, the samples cached): 4 forget samples of a tiny world, k = 3."""
    import torch

    from pipeline.config import PrecomputeConfig
    from pipeline.stage1 import precompute as pc
    from pipeline.data.mllmu import read_split
    from pipeline.data.records import forget_samples
    from tests.tiny import make_world, tiny_config
    torch.set_num_threads(1)
    root, model_dir = make_world(tmp_path_factory, tiny_config(), n_fictitious=20, pool_size=6)
    samples = forget_samples(read_split(root, "forget_10"))[:4]
    cache = tmp_path_factory.mktemp("refs")
    settings = PrecomputeConfig(output=str(cache), k=3, top_k=8, seed=0, shard_size=4, batch_size=4, dtype="float32")
    pc.precompute(str(model_dir), samples, settings, pool_dir=str(root / "pools" / "people"), device="cpu",
                  log=lambda *_: None)
    return cache, root / "pools" / "people", samples


def _assert_recomputed(results, samples):
    assert [r["sample_id"] for r in results] == [s.sample_id for s in samples[:3]]
    for r in results:
        stored, again = np.array(r["stored_prob"], np.float32), np.array(r["recomputed_prob"], np.float32)
        # float16 storage: equal after rounding the recomputation the same way (one float16 step of slack)
        step = np.spacing(np.abs(stored).astype(np.float16)).astype(np.float32)
        assert np.all(np.abs(again.astype(np.float16).astype(np.float32) - stored) <= step), r["sample_id"]
        np.testing.assert_allclose(r["recomputed_entropy"], r["stored_entropy"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r["recomputed_tail"], r["stored_tail"], atol=1e-5)
        assert np.mean(r["stored_entropy"]) > 0.01          # real distributions, not one-hot placeholders


def test_recompute_imports_nothing_of_viker_and_agrees_with_the_cache(tmp_path_factory):
    """The recomputation in this process (its imports read from its source, not from a fresh interpreter:
    the slow test below runs it where `pipeline` was never imported)."""
    import ast
    import inspect
    module = ast.parse(inspect.getsource(sys.modules[__name__]))
    imports = [*module.body, *ast.walk(ast.parse(inspect.getsource(recompute)))]   # what `recompute` runs
    modules = {alias.name for node in imports if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in imports if isinstance(node, ast.ImportFrom)}
    assert "transformers" in modules and not any(m.split(".")[0] in ("pipeline", "tests") for m in modules), modules
    cache, pool, samples = _cache(tmp_path_factory)
    _assert_recomputed(recompute(cache, pool), samples)


@pytest.mark.slow
def test_three_samples_recomputed_from_the_cache_alone(tmp_path_factory):
    cache, pool, samples = _cache(tmp_path_factory)
    script = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              f"from test_cache_portable import recompute; "
              f"r = recompute({str(cache)!r}, {str(pool)!r}); "
              f"assert not any(m == 'pipeline' or m.startswith('pipeline.') for m in sys.modules), 'imported'; "
              f"print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path_factory.mktemp("elsewhere"))
    assert out.returncode == 0, out.stderr[-2000:]
    _assert_recomputed(json.loads(out.stdout.strip().splitlines()[-1]), samples)


if __name__ == "__main__":
    print(json.dumps(recompute(*sys.argv[1:4]), indent=1))
