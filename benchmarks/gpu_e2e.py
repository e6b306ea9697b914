"""End-to-end check of the CLI on a random-weight model of a real shape (nothing downloaded).

    python benchmarks/gpu_e2e.py --shape llava7b --out /tmp/gpu-check   # LLaVA-1.5-7B shape, CUDA, bf16
    python benchmarks/gpu_e2e.py --shape qwen7b --out /tmp/gpu-qwen     # Qwen2.5-VL-7B shape, CUDA, bf16
    python benchmarks/gpu_e2e.py --shape mid --out /tmp/e2e             # small LLaVA, CPU (the slow test suite)
    python benchmarks/gpu_e2e.py --shape qwen-mid --out /tmp/e2e-qwen   # small Qwen2.5-VL, CPU

Builds a miniature benchmark (a few people, portraits rendered at the CLIP processor's
size: 336 px for llava7b) and a model directory saved with a 336 px CLIP processor, then
runs the CLI as a user would: precompute with and without the prefix cache (the drift
between the two is reported), train ViKeR for 4 steps (bf16 autocast on CUDA),
evaluate on 4 profiles, report. Writes <out>/e2e.json; exit status 1 if a step failed.
Runs with `PYTHONPATH=. python -m pipeline.cli` so an installed package is not needed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import MiniConfig  # noqa: E402
from pipeline.data.mini import make_mini  # noqa: E402
from pipeline.jobs.demo import tokenizer_texts  # noqa: E402
from pipeline.models.modeling import (CHAT_TEMPLATE, IMAGE_TOKEN, QWEN_TEMPLATE, QWEN_TOKENS, train_tokenizer)  # noqa: E402

# vision (hidden, layers, heads, mlp, image, patch), text (hidden, layers, heads, mlp, vocab[, kv heads])
SHAPES = {
    "mid": dict(family="llava", v=(64, 2, 4, 128, 336, 14), t=(128, 2, 4, 256, 1000), feature_layer=-1),
    "llava7b": dict(family="llava", v=(1024, 24, 16, 4096, 336, 14), t=(4096, 32, 32, 11008, 32064),
                    feature_layer=-2),
    # Qwen2.5-VL-7B-Instruct's config.json: images at 448 px (families.image_side) = 256 merged tokens each
    "qwen-mid": dict(family="qwen2_5_vl", v=(64, 2, 4, 128, 448, 14), t=(128, 2, 4, 256, 1000, 4)),
    "qwen7b": dict(family="qwen2_5_vl", v=(1280, 32, 16, 3420, 448, 14), t=(3584, 28, 28, 18944, 152064, 4)),
}


def build_qwen(out: Path, texts: list[str], shape: str, device: torch.device) -> Path:
    """A random-weight Qwen2.5-VL of the given shape, saved with Qwen's image processor (448 px pictures)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from pipeline.models.families import qwen_image_processor_class
    from pipeline.models.modeling import qwen_config
    vh, vl, vheads, vmlp, size, patch = SHAPES[shape]["v"]
    th, tl, theads, tmlp, vocab, kv = SHAPES[shape]["t"]
    tokenizer = train_tokenizer(texts + ["user\n", "assistant\n"], 700, QWEN_TOKENS)
    processor = qwen_image_processor_class()(image_processor=Qwen2VLImageProcessorPil(patch_size=patch),
                                             tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    config = qwen_config(tokenizer, dict(vocab_size=max(vocab, len(tokenizer)), hidden_size=th, intermediate_size=tmlp,
                                         num_hidden_layers=tl, num_attention_heads=theads, num_key_value_heads=kv,
                                         max_position_embeddings=32768, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id),
                         dict(depth=vl, hidden_size=vh, intermediate_size=vmlp, num_heads=vheads, patch_size=patch,
                              window_size=112, fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < vl] or [vl - 1]),
                         rope_theta=1e6)
    return init_and_save(Qwen2_5_VLForConditionalGeneration, config, processor, tokenizer, out, device)


def build_model(out: Path, texts: list[str], shape: str, device: torch.device) -> Path:
    """A random-weight LLaVA of the given shape, saved with a CLIP processor at the shape's image size."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    from transformers.models.clip import CLIPImageProcessorPil
    vh, vl, vheads, vmlp, size, patch = SHAPES[shape]["v"]
    th, tl, theads, tmlp, vocab = SHAPES[shape]["t"]
    tokenizer = train_tokenizer(texts, 700)
    image_proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_proc, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=vh, intermediate_size=vmlp, num_hidden_layers=vl,
                              num_attention_heads=vheads, image_size=size, patch_size=patch, projection_dim=vh)
    # The 7B vocabulary is kept (lm_head is the biggest top-K/entropy cost); the tokenizer uses its first ids.
    text = LlamaConfig(vocab_size=max(vocab, len(tokenizer)), hidden_size=th, intermediate_size=tmlp,
                       num_hidden_layers=tl, num_attention_heads=theads, num_key_value_heads=theads,
                       max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=(size // patch) ** 2, vision_feature_layer=SHAPES[shape]["feature_layer"],
                         vision_feature_select_strategy="default")
    return init_and_save(LlavaForConditionalGeneration, config, processor, tokenizer, out, device)


def init_and_save(model_class, config, processor, tokenizer, out: Path, device: torch.device) -> Path:
    """Random weights (seed 0), bf16 on CUDA, saved with the processor."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):          # initialise on the GPU: a 7B init on CPU takes minutes
        model = model_class(config).to(dtype)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    return out


def cli(args: list[str], log: Path) -> dict:
    """One `viker` command; its output goes to a log file, its time and status to the summary."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    t = time.time()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT).returncode
    return {"ok": rc == 0, "rc": rc, "seconds": round(time.time() - t, 1), "log": str(log)}


def drift(cache_a: Path, cache_b: Path) -> dict:
    """How far the prefix-reuse cache is from the naive one (same model, same dtype)."""
    from pipeline.cache.refcache import RefCacheReader
    ent, top1, n = [], 0, 0
    with RefCacheReader(cache_a) as a, RefCacheReader(cache_b) as b:
        for sid in a.sample_ids:
            x, y = a.get(sid), b.get(sid)
            ent.append(np.abs(x.entropy - y.entropy))
            top1 += int((x.topk_idx[:, 0] == y.topk_idx[:, 0]).sum())
            n += x.num_tokens
    ent = np.concatenate(ent)
    return {"entropy_max_abs_diff": float(ent.max()), "entropy_mean_abs_diff": float(ent.mean()),
            "top1_agreement": top1 / max(n, 1), "tokens": n}


def run(shape: str, out: Path) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if shape in ("llava7b", "qwen7b") and device.type != "cuda":
        raise SystemExit(f"the {shape} shape needs a CUDA GPU")
    out.mkdir(parents=True, exist_ok=True)
    size = SHAPES[shape]["v"][4]
    steps: dict = {}
    t = time.time()
    root = make_mini(out / "mini", MiniConfig(n_fictitious=20, n_real=2, train_images=1, test_images=1,
                                              pool_size=8, image_size=size))
    build = build_qwen if SHAPES[shape]["family"] == "qwen2_5_vl" else build_model
    model = build(out / "model", tokenizer_texts(str(root)), shape, device)
    steps["build"] = {"ok": True, "seconds": round(time.time() - t, 1)}
    common = ["--config", str(ROOT / "configs" / "demo.yaml"), f"data.root={root}", f"model.path={model}",
              f"model.device={device.type}", "precompute.k=3", "precompute.top_k=32", "precompute.batch_size=16",
              f"train.output={out / 'run'}", f"evaluate.results={out / 'results.jsonl'}",
              "evaluate.max_profiles=4", "evaluate.max_new_tokens=8", "evaluate.batch_size=8"]
    prefix, naive = out / "refs-prefix", out / "refs-naive"
    steps["precompute_prefix"] = cli(["precompute", *common, f"precompute.output={prefix}"], out / "precompute-prefix.log")
    steps["precompute_naive"] = cli(["precompute", "--no-prefix-cache", *common, f"precompute.output={naive}"],
                                    out / "precompute-naive.log")
    result: dict = {"shape": shape, "family": SHAPES[shape]["family"], "device": str(device),
                    "torch": torch.__version__, "steps": steps}
    if steps["precompute_prefix"]["ok"] and steps["precompute_naive"]["ok"]:
        result["prefix_vs_naive_drift"] = drift(prefix, naive)
    steps["train"] = cli(["train", *common, f"precompute.output={prefix}", "train.method=viker", "train.steps=4",
                          "train.batch_size=2"], out / "train.log")
    steps["evaluate"] = cli(["evaluate", *common, "--adapter", str(out / "run" / "adapter")], out / "evaluate.log")
    steps["report"] = cli(["report", *common, "--out", str(out / "report")], out / "report.log")
    import transformers
    result["transformers"] = transformers.__version__
    result["ok"] = all(s["ok"] for s in steps.values())
    (out / "e2e.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    ap.add_argument("--out", required=True, help="Working directory; e2e.json and the step logs go here.")
    args = ap.parse_args()
    result = run(args.shape, Path(args.out))
    for name, step in result["steps"].items():
        print(f"[e2e] {name:18s} {'ok' if step['ok'] else 'FAILED'} {step['seconds']:7.1f}s")
    if "prefix_vs_naive_drift" in result:
        print(f"[e2e] prefix vs naive: {result['prefix_vs_naive_drift']}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
