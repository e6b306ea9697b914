"""What a reference cache was made from, as a fingerprint both stages can compute.

Stage one stamps it on every shard; stage two recomputes it from the model and
data it was given and refuses a cache whose parts differ (refcache names them).
Nothing here runs a model. Weight files are hashed in full (sha256, ~1.3 GB/s
on our CPUs: ~10 s for a 13 GB checkpoint) and remembered by (path, size,
mtime, inode) in pipeline.cache.filememo, so only the first run after a change pays.
"""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

from pipeline.models import prompts

from .filememo import memo_file_hash
from .refcache import (CacheError, hash_bytes, hash_file, hash_files, hash_json, make_fingerprint, make_sources,
                       pool_entries, source_problems)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "processor_config.json", "preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def pool_files(pool_dir: str | Path) -> list[Path]:
    folder = Path(pool_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference pool {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"reference pool {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def template_hash(model_dir: str | Path | None = None) -> str:
    """The prompt code itself: editing a template invalidates caches made with the old one.

    For a family other than LLaVA (whose prompts are prompts.py's text as written)
    the prompt as that model reads it is part of it too: its chat-template
    rendering, the image expansion and the square side images are resized to
    (family_prompt_record). LLaVA's hash is the code's alone, as before families.
    """
    code = hash_bytes(inspect.getsource(prompts).encode())
    how = family_prompt_record(model_dir) if model_dir is not None else None
    return code if how is None else hash_json([code, how])


def family_prompt_record(model_dir: str | Path) -> dict | None:
    """How the model in model_dir is prompted: family, the training prompt as rendered, image expansion, side.

    None for LLaVA, whose prompt is prompts.py's text as written (read from
    config.json alone, without loading its processor).
    """
    from pipeline.models import families
    from pipeline.models.modeling import load_processor
    if families.family_of_dir(model_dir).name == "llava":
        return None
    processor = load_processor(model_dir)
    return {"family": families.family_of_processor(processor).name,
            "prompt": families.render(processor, prompts.train_prompt("{question}")),
            "image_expansion": families.image_expansion(processor),
            "image_side": families.image_side(processor)}


def weights_identity(model_dir: str | Path) -> str:
    """Full-content identity of the weight files (*.safetensors, *.bin) directly in model_dir.

    sha256 over each file's name, size and full-content sha256. Any changed
    byte of any weight changes it (a checkpoint fine-tuned on a few layers
    included); the per-file hashes are memoised, so an unchanged model costs
    a few stat() calls.
    """
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir()
                   if p.is_file() and p.suffix in (".safetensors", ".bin"))
    if not files:
        raise CacheError(f"no *.safetensors or *.bin weight files in {model_dir}")
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}\0{path.stat().st_size}\0{memo_file_hash(path)}\0".encode())
    return h.hexdigest()


def model_parts(model_dir: str | Path) -> dict[str, str]:
    model_dir = Path(model_dir)
    tok = [model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    return {"model_config": hash_file(model_dir / "config.json"),
            "model_weights": weights_identity(model_dir),
            "tokenizer": hash_files(tok, root=model_dir)}


def samples_hash(samples) -> str:
    """The forget samples' ids, texts and image bytes: a cache is for one forget set."""
    return hash_json([[s.sample_id, s.question, s.answer, hash_bytes(s.image)] for s in samples])


def cache_fingerprint(model_dir, samples, *, pool_dir: str | None, reference: str, k: int, top_k: int,
                      seed: int, dtype: str, idk_answer: str, scores: str | None = None, span: str = "none",
                      names: str | None = None) -> dict:
    parts = {**model_parts(model_dir),
             "prompt_template": template_hash(model_dir),
             "reference_pool": hash_files(pool_files(pool_dir)) if reference == "pool" else "own-image",
             "forget_samples": samples_hash(samples),
             "reference": reference, "k": str(k), "K": str(top_k), "seed": str(seed), "dtype": dtype,
             "idk_answer": idk_answer}
    if scores is not None:
        # Only a subset is recorded, so caches scoring everything keep their earlier fingerprint;
        # shards that lack a field are then never resumed into a cache that promises it.
        parts["scores"] = scores
    if span != "none":
        # Recorded only when set, so the caches made before span-aware references keep their fingerprint.
        parts["span"] = span
    if names is not None:
        parts["names"] = names    # textual counterfactuals: the digest of the stranger pool they drew from
    return make_fingerprint(parts)


def training_fingerprint(model_dir, samples, cached: dict, pool_dir: str | None = None) -> dict:
    """The fingerprint stage two expects from a cache.

    Parts stage two can check are recomputed from its own model, prompts and
    forget set (and the pool, where its folder is at hand); the cache's own
    settings (k, K, seed, dtype, ...) are taken as recorded.
    """
    parts = dict(cached.get("parts", {}))
    parts.update(model_parts(model_dir))
    parts["prompt_template"] = template_hash(model_dir)
    parts["forget_samples"] = samples_hash(samples)
    if parts.get("reference") == "pool" and pool_dir and Path(pool_dir).is_dir():
        parts["reference_pool"] = hash_files(pool_files(pool_dir))
    return make_fingerprint(parts)


def template_record(model_dir: str | Path | None = None) -> dict:
    """The training prompt as text, with how stage one tokenises it (for readers without our code)."""
    record = {"id": prompts.TEMPLATE_ID, "prompt": prompts.train_prompt("{question}"), "answer": " {answer}",
              "image_token": prompts.IMAGE_TOKEN,
              "tokenisation": "the processor's tokenizer on prompt+answer with add_special_tokens=True and the "
                              "image token repeated as many times as one image has patches; the answer tokens "
                              "(answer_ids) follow the prompt's own tokens unchanged"}
    how = family_prompt_record(model_dir) if model_dir is not None else None
    if how is not None:
        record.update(how)
        record["tokenisation"] = ("prompt+answer rendered through the processor's chat template (`prompt`, the "
                                  "answer appended after it), the image token replaced by `image_expansion`, "
                                  "then the tokenizer with add_special_tokens=True; images resized to "
                                  "image_side x image_side first where image_side is set")
    return record


def cache_sources(model_dir, pool_dir) -> dict:
    """The manifest's `sources`: model and pool paths as given and as content hashes, template text, units."""
    pool = pool_entries(pool_files(pool_dir)) if pool_dir else None
    return make_sources(model_dir, model_parts(model_dir), pool_dir, pool, template_record(model_dir))


def machine_problems(sources: dict, model_dir=None, pool_dir=None) -> list[str]:
    """Where this machine's model and pool differ from what a (copied) cache was made from."""
    parts = model_parts(model_dir) if model_dir else None
    pool = pool_entries(pool_files(pool_dir)) if pool_dir else None
    return source_problems(sources, parts, pool)
