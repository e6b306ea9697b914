"""Stage one as `viker precompute` runs it: naive path vs prefix reuse on the same inputs, in one run.

    python benchmarks/precompute_bench.py --shape tiny      # the demo's model shape, CPU
    python benchmarks/precompute_bench.py --shape mid       # 576 image tokens like LLaVA-1.5, small text model, CPU
    python benchmarks/precompute_bench.py --shape llava7b   # LLaVA-1.5-7B shape, random bf16 weights, GPU

Times the whole `compute_shard` (reference pairs + own-image scores + idk
scores, exactly what the command runs per shard) for both paths, then each
part alone. Samples are laid out like MLLMU-Bench: several questions about
each person's one image (`--questions-per-image`), k pool images each.
Random weights and synthetic token ids: the cost of a forward does not depend
on what the weights know, and nothing has to be downloaded. Also prints how
far the paths' outputs differ, the naive path's model FLOP utilisation against
a matmul measured on the same device, the machine's load, and the cache's
bytes per answer token.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cache import view as cacheview, refcache  # noqa: E402
from pipeline.data.records import Sample  # noqa: E402
from pipeline.stage1.precompute import (Encoded, PrefixCache, compute_shard, draw_reference_images, score_shard)  # noqa: E402

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


def synthetic(n_samples: int, per_image: int, n_img: int, q: int, a: int, vocab: int, seed: int = 0):
    """Encoded samples, `per_image` questions per person image, each with an idk answer of 5 tokens."""
    rng = np.random.default_rng(seed)
    idk = rng.integers(10, vocab, size=5).tolist()
    out = []
    for i in range(n_samples):
        person = i // per_image
        qa = rng.integers(10, vocab, size=q + a - int(rng.integers(0, 6))).tolist()   # ragged like real answers
        ids = [1] + [IMAGE_TOKEN] * n_img + qa
        start = len(ids) - a + 2
        sample = Sample(f"s{i}", f"p{person}", f"image of person {person}".encode(), "", "")
        out.append(Encoded(sample, ids, start, ids[:start] + idk, start))
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


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f} (1/5 min) on {os.cpu_count()} cores"


def clock(fn, device) -> tuple[float, object]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--samples", type=int, default=64, help="forget samples")
    ap.add_argument("--shard-size", type=int, default=64, help="samples per shard (the command's default)")
    ap.add_argument("--questions-per-image", type=int, default=5,
                    help="questions asked about each person's image (MLLMU-Bench asks several)")
    ap.add_argument("--pool", type=int, default=24)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--prefix-cache-images", type=int, default=0, help="0: the command's default")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs of each path, interleaved; the fastest counts (a shared machine only adds time)")
    ap.add_argument("--no-parts", action="store_true", help="skip timing references/own/idk alone")
    ap.add_argument("--json", default=None, help="Also write the results here.")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.shape == "llava7b" and device.type != "cuda":
        sys.exit("the llava7b shape needs a CUDA GPU")
    model, n_img, image = build(args.shape, device, dtype)
    s = SHAPES[args.shape]
    encoded = synthetic(args.samples, args.questions_per_image, n_img, s["q"], s["a"], s["t"][4])
    gen = torch.Generator().manual_seed(1)
    pool = torch.randn(args.pool, 3, image, image, generator=gen).to(device, dtype)
    people = torch.randn(len({e.sample.profile_id for e in encoded}), 3, image, image, generator=gen).to(device, dtype)
    own = torch.stack([people[i // args.questions_per_image] for i in range(args.samples)])
    processor = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0))
    n_people = len(people)
    rows = {"references": args.samples * args.k, "own": args.samples, "idk": args.samples}
    load_before = load()

    def new_prefix():
        return PrefixCache(model, encoded[0].ids[: 1 + n_img], pool, args.prefix_cache_images)

    def shard(use_prefix, enc=encoded):
        # One fresh PrefixCache per run, kept across its shards as `viker precompute` keeps it:
        # every image prefix the run needs is part of the cost.
        prefix = new_prefix() if use_prefix else None
        out = []
        for b in range(0, len(enc), args.shard_size):
            out += compute_shard(model, processor, enc[b: b + args.shard_size], pool_pixels=pool, reference="pool",
                                 k=args.k, top_k=args.top_k, seed=0, batch_size=args.batch_size, prefix=prefix,
                                 own_pixels=own[b: b + args.shard_size])
        return out

    shard(True, encoded[:8])                                  # warm-up (allocator, kernels)
    shard(False, encoded[:8])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_naive, t_prefix = [], []
    for _ in range(args.repeats):                             # interleaved: both paths see the same load
        t, out_naive = clock(lambda: shard(False), device)
        t_naive.append(t)
        peak_naive = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t, out_prefix = clock(lambda: shard(True), device)
        t_prefix.append(t)
    t_n, t_p = min(t_naive), min(t_prefix)

    parts = {}
    draws = [draw_reference_images(e.sample.sample_id, args.pool, args.k, 0) for e in encoded]
    if not args.no_parts:
        for name, scores in (("references", ("reference",)), ("own", ("own",)), ("idk", ("idk",))):
            times = {False: [], True: []}
            for _ in range(args.repeats):
                for use_prefix in (False, True):
                    t, _ = clock(lambda: score_shard(
                        model, 0, encoded, draws, pool_pixels=pool, own_pixels=own, batch_size=args.batch_size,
                        prefix=new_prefix() if use_prefix else None, scores=scores), device)
                    times[use_prefix].append(t)
            parts[name] = {"rows": rows[name], "naive_s": round(min(times[False]), 4),
                           "prefix_s": round(min(times[True]), 4),
                           "speedup": round(min(times[False]) / min(times[True]), 2)}

    prob_diff = max(float(np.abs(a.topk_prob - b.topk_prob).max()) for a, b in zip(out_naive, out_prefix))
    own_diff = max(abs(a.ref_logp_own - b.ref_logp_own) / max(1.0, abs(a.ref_logp_own))
                   for a, b in zip(out_naive, out_prefix))
    idk_diff = max(abs(a.ref_logp_idk - b.ref_logp_idk) / max(1.0, abs(a.ref_logp_idk))
                   for a, b in zip(out_naive, out_prefix))
    top1 = float(np.mean([float((a.topk_idx[:, 0] == b.topk_idx[:, 0]).mean()) for a, b in zip(out_naive, out_prefix)]))
    seq_len = int(np.mean([len(e.ids) for e in encoded]))
    n_rows = sum(rows.values())
    flops = n_rows * flops_per_pair(model, seq_len, n_img)
    rate = matmul_rate(device, dtype)
    probe = new_prefix()
    probe.get(0)

    with tempfile.TemporaryDirectory() as tmp:
        fp = refcache.make_fingerprint({"bench": args.shape})
        refcache.write_shard(tmp, 0, 1, out_prefix, vocab_size=s["t"][4], fingerprint=fp, settings={"K": args.top_k})
        refcache.finalize(tmp, 1, fp, {"K": args.top_k})
        stats = cacheview.inspect_cache(tmp)

    result = {
        "shape": args.shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "dtype": str(dtype), "threads": torch.get_num_threads(),
        "load_before": load_before, "load_after": load(),
        "samples": args.samples, "shard_size": args.shard_size, "questions_per_image": args.questions_per_image, "people_images": n_people,
        "pool": args.pool, "k": args.k, "batch_size": args.batch_size, "prefix_cache_images": probe.capacity,
        "rows": n_rows, "image_tokens": n_img, "mean_seq_len": seq_len,
        "naive_s": [round(t, 4) for t in t_naive], "prefix_s": [round(t, 4) for t in t_prefix],
        "speedup": round(t_n / t_p, 2), "parts": parts,
        "naive_samples_per_s": round(args.samples / t_n, 2), "prefix_samples_per_s": round(args.samples / t_p, 2),
        "naive_pairs_per_s": round(rows["references"] / t_n, 1), "prefix_pairs_per_s": round(rows["references"] / t_p, 1),
        "max_prob_diff": prob_diff, "max_rel_logp_own_diff": own_diff, "max_rel_logp_idk_diff": idk_diff,
        "top1_agreement": round(top1, 4),
        "naive_tflops": round(flops / t_n / 1e12, 3), "matmul_tflops": round(rate / 1e12, 3),
        "naive_mfu": round(flops / t_n / rate, 3),
        "prefix_bytes_per_image": probe.peak_bytes,
        "bytes_per_token_uncompressed": stats["bytes_per_token_uncompressed"],
        "bytes_per_token_on_disk": round(stats["bytes_per_token"], 1), "top_k_mass_mean": round(stats["topk_mass"]["mean"], 4),
        "peak_gib_naive": round(peak_naive, 1) if peak_naive is not None else None,
        "peak_gib_prefix": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if device.type == "cuda" else None,
    }
    print(f"{args.shape} on {result['device']} ({result['dtype']}), load {load_before} -> {result['load_after']}:\n"
          f"  end to end (compute_shard: references + own + idk, {args.samples} samples in shards of {args.shard_size}, "
          f"{args.questions_per_image} per image, k={args.k}): naive {t_n:.3f}s, prefix {t_p:.3f}s "
          f"-> prefix reuse is {t_n / t_p:.2f}x faster")
    for name, part in parts.items():
        print(f"  {name:10s} ({part['rows']:4d} rows): naive {part['naive_s']:.3f}s, prefix {part['prefix_s']:.3f}s "
              f"-> {part['speedup']:.2f}x")
    print(f"  max |dp| {prob_diff:.2e}, max rel. diff of logp own {own_diff:.1e}, idk {idk_diff:.1e}; "
          f"{result['naive_samples_per_s']} vs {result['prefix_samples_per_s']} samples/s; "
          f"naive MFU {result['naive_mfu']:.0%} of a {result['matmul_tflops']} TFLOP/s matmul; "
          f"{result['bytes_per_token_uncompressed']} B/token uncompressed (limit {4 * args.top_k + 16})")
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
