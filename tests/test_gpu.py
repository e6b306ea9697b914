"""GPU checks (opt in: `pytest -m gpu` on a CUDA machine). CI has no GPU; these are skipped there.

They check what only a GPU run can: the prefix path against the naive path in
bf16 (reporting the drift, since bf16 cannot agree to float32 tolerance), and
a short training run on CUDA with autocast.
"""
import pytest
import torch

from pipeline.stage1 import precompute as pc
from pipeline.config import TrainConfig
from pipeline.data.mllmu import read_split
from pipeline.data.records import forget_samples
from pipeline.models.encoding import load_image, pixel_values
from pipeline.cache.fingerprint import pool_files
from pipeline.models.modeling import load_model
from tests.tiny import make_world, tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory, tiny_config(text_layers=2), n_fictitious=20, pool_size=6)


def test_prefix_path_matches_naive_in_bf16_on_gpu(world):
    root, model_dir = world
    model, processor = load_model(model_dir, dtype="bfloat16", device="cuda")
    samples = forget_samples(read_split(root, "forget_10"))
    enc = pc.encode_samples(processor, samples, "", None)
    pool = pixel_values(processor, [load_image(p.read_bytes()) for p in pool_files(root / "pools" / "people")])
    pool = pool.to("cuda", torch.bfloat16)
    draws = [pc.draw_reference_images(e.sample.sample_id, len(pool), 3, 0) for e in enc]
    pad = processor.tokenizer.pad_token_id
    naive = pc.pool_reference_sums(model, pad, enc, draws, pool, 8, None)
    P = pc.image_prefix_length(enc[0].ids, model.config.image_token_index)
    prefix = pc.pool_reference_sums(model, pad, enc, draws, pool, 8, pc.PrefixCache(model, enc[0].ids[:P], pool))
    worst = max(float((naive[r] - prefix[r]).abs().max()) for r in naive) / 3
    print(f"bf16 max probability drift prefix vs naive: {worst:.2e}")
    assert worst < 2e-2


def test_training_runs_on_gpu_with_autocast(world, tmp_path):
    from pipeline.stage2.train import train
    root, model_dir = world
    cfg = TrainConfig(method="ga", steps=2, batch_size=2, lr=1e-3, output=str(tmp_path / "run"), lora_r=2)
    out = train(str(model_dir), str(root), "forget_10", "", None, cfg, device="cuda")
    assert out["steps"] == 2
