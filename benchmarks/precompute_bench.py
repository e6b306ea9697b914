"""Stage one: naive path vs prefix reuse on the same inputs, in one run.

    python benchmarks/precompute_bench.py --shape tiny      # the demo's model shape, CPU
    python benchmarks/precompute_bench.py --shape mid       # 576 image tokens like LLaVA-1.5, small text model, CPU
    python benchmarks/precompute_bench.py --shape llava7b   # LLaVA-1.5-7B shape, random bf16 weights, GPU

Random weights and synthetic token ids: the cost of a forward does not depend
on what the weights know, and nothing has to be downloaded. Prints the time
of both paths, their ratio, how far their outputs differ, the naive path's
model FLOP utilisation against a matmul measured on the same device, and the
cache's bytes per answer token (uncompressed and on disk) and mean top-K mass.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import refcache  # noqa: E402
from pipeline.data.records import Sample  # noqa: E402
from pipeline.precompute import (Encoded, PrefixCache, draw_reference_images, pool_reference_sums,  # noqa: E402
                                 to_ref_sample)

SHAPES = {
    # vision: hidden, layers, heads, image, patch; text: hidden, layers, heads, intermediate, vocab
    "tiny": dict(v=(64, 2, 4, 32, 8), t=(128, 3, 4, 256, 700), q=16, a=8, feature_layer=-1),
    "mid": dict(v=(64, 1, 4, 96, 4), t=(256, 4, 4, 688, 4000), q=40, a=24, feature_layer=-1),
    "llava7b": dict(v=(1024, 24, 16, 336, 14), t=(4096, 32, 32, 11008, 32064), q=40, a=24, feature_layer=-2),
}
IMAGE_TOKEN = 3


def build(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    s = SHAPES[shape]
    vh, vl, vheads, image, patch = s["v"]
    th, tl, theads, inter, vocab = s["t"]
    vision = CLIPVisionConfig(hidden_size=vh, intermediate_size=4 * vh, num_hidden_layers=vl,
                              num_attention_heads=vheads, image_size=image, patch_size=patch)
    text = LlamaConfig(vocab_size=vocab, hidden_size=th, intermediate_size=inter, num_hidden_layers=tl,
                       num_attention_heads=theads, num_key_value_heads=theads, max_position_embeddings=4096)
    n_img = (image // patch) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         image_seq_length=n_img, vision_feature_layer=s["feature_layer"],
                         vision_feature_select_strategy="default")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    return model, n_img, image


def synthetic(n_samples: int, n_img: int, q: int, a: int, vocab: int, seed: int = 0) -> list[Encoded]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_samples):
        qa = rng.integers(10, vocab, size=q + a - int(rng.integers(0, 6))).tolist()   # ragged like real answers
        ids = [1] + [IMAGE_TOKEN] * n_img + qa
        out.append(Encoded(Sample(f"s{i}", f"p{i}", b"", "", ""), ids, len(ids) - a + 2, None, None))
    return out


def flops_per_pair(model, n_tokens: int, n_patches: int) -> float:
    """Kaplan et al.: 2N + 2 n_layer n_ctx d_model per token for the language model; 2N per patch for the tower."""
    lm = model.model.language_model
    n_lm = sum(p.numel() for n, p in lm.named_parameters() if "embed" not in n)
    cfg = model.config.text_config
    n_vis = sum(p.numel() for p in model.model.vision_tower.parameters())
    lm_flops = n_tokens * (2 * n_lm + 2 * cfg.num_hidden_layers * n_tokens * cfg.hidden_size)
    return lm_flops + 2 * n_vis * (n_patches + 1) + 2 * model.lm_head.weight.numel() * 32


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(5 if device.type == "cuda" else 3):
        sync(device)
        t = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 2):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t) / (10 if device.type == "cuda" else 2))
    return 2 * n ** 3 / min(times)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device) -> tuple[float, object]:
    fn()                                     # warm-up (allocator, kernels, prefix caches stay cold below)
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--pool", type=int, default=24)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="Also write the results here.")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.shape == "llava7b" and device.type != "cuda":
        sys.exit("the llava7b shape needs a CUDA GPU")
    model, n_img, image = build(args.shape, device, dtype)
    s = SHAPES[args.shape]
    encoded = synthetic(args.samples, n_img, s["q"], s["a"], s["t"][4])
    pool = torch.randn(args.pool, 3, image, image, device=device, dtype=dtype)
    draws = [draw_reference_images(e.sample.sample_id, args.pool, args.k, 0) for e in encoded]
    pairs = args.samples * args.k

    def naive():
        return pool_reference_sums(model, 0, encoded, draws, pool, args.batch_size, None)

    def prefix():
        # A fresh PrefixCache each repeat: the per-image prefix passes are part of the cost.
        cache = PrefixCache(model, encoded[0].ids[: 1 + n_img], pool)
        return pool_reference_sums(model, 0, encoded, draws, pool, args.batch_size, cache)

    warm = PrefixCache(model, encoded[0].ids[: 1 + n_img], pool)

    def prefix_passes():
        warm.layers.clear()
        for i in range(args.pool):
            warm.get(i)

    def prefix_text_only():
        return pool_reference_sums(model, 0, encoded, draws, pool, args.batch_size, warm)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_naive, out_naive = timed(naive, args.repeats, device)
    t_prefix, out_prefix = timed(prefix, args.repeats, device)
    t_passes, _ = timed(prefix_passes, args.repeats, device)
    t_text, _ = timed(prefix_text_only, args.repeats, device)
    diff = max(float((out_naive[r] - out_prefix[r]).abs().max()) for r in out_naive) / args.k
    top1 = float(np.mean([float((out_naive[r].argmax(-1) == out_prefix[r].argmax(-1)).float().mean())
                          for r in out_naive]))
    seq_len = int(np.mean([len(e.ids) for e in encoded]))
    flops = pairs * flops_per_pair(model, seq_len, n_img)
    rate = matmul_rate(device, dtype)

    with tempfile.TemporaryDirectory() as tmp:
        refs = [to_ref_sample(e, out_prefix[r] / args.k, args.top_k) for r, e in enumerate(encoded)]
        fp = refcache.make_fingerprint({"bench": args.shape})
        refcache.write_shard(tmp, 0, 1, refs, vocab_size=s["t"][4], fingerprint=fp, settings={"K": args.top_k})
        refcache.finalize(tmp, 1, fp, {"K": args.top_k})
        stats = refcache.inspect_cache(tmp)

    result = {
        "shape": args.shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "dtype": str(dtype), "threads": torch.get_num_threads(),
        "samples": args.samples, "k": args.k, "pairs": pairs, "image_tokens": n_img, "mean_seq_len": seq_len,
        "naive_s": round(t_naive, 4), "prefix_s": round(t_prefix, 4), "speedup": round(t_naive / t_prefix, 2),
        # The pool's prefix passes are paid once per run, whatever the number of samples:
        # the text-only part is what every further (sample, image) pair costs.
        "prefix_passes_s": round(t_passes, 4), "prefix_text_s": round(t_text, 4),
        "speedup_per_pair": round(t_naive / t_text, 2),
        "naive_pairs_per_s": round(pairs / t_naive, 1), "prefix_pairs_per_s": round(pairs / t_prefix, 1),
        "max_prob_diff": diff, "top1_agreement": round(top1, 4),
        "naive_tflops": round(flops / t_naive / 1e12, 3), "matmul_tflops": round(rate / 1e12, 3),
        "naive_mfu": round(flops / t_naive / rate, 3),
        "bytes_per_token_uncompressed": stats["bytes_per_token_uncompressed"],
        "bytes_per_token_on_disk": round(stats["bytes_per_token"], 1), "top_k_mass_mean": round(stats["topk_mass"]["mean"], 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if device.type == "cuda" else None,
    }
    print(json.dumps(result, indent=1))
    print(f"\n{args.shape} on {result['device']} ({result['dtype']}): naive {t_naive:.3f}s, prefix {t_prefix:.3f}s "
          f"-> prefix reuse is {t_naive / t_prefix:.2f}x faster end to end "
          f"({t_naive / t_text:.2f}x per pair once the {args.pool} prefix passes, {t_passes:.3f}s, are paid); "
          f"max |dp| {diff:.2e}; "
          f"naive MFU {result['naive_mfu']:.0%} of a {result['matmul_tflops']} TFLOP/s matmul; "
          f"{result['bytes_per_token_uncompressed']} B/token uncompressed (limit {4 * args.top_k + 16}), "
          f"{result['bytes_per_token_on_disk']} B/token on disk")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
