"""Turning (image, prompt, answer) into model inputs, shared by every stage.

Text is tokenised once per example through the processor so that the image
placeholder expands exactly as the model expects; the answer span is found by
tokenising the prompt alone and checking it is a prefix of the full ids (a
tokenizer that merges across the boundary is refused, not silently misaligned).
"""
from __future__ import annotations

import io
import weakref

import torch
from PIL import Image, UnidentifiedImageError

from . import families


class InputError(ValueError):
    """Bad input for one example; the message is one line and names it."""


def load_image(data: bytes, where: str = "image") -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{where}: not a readable image ({type(exc).__name__})") from None


def pixel_values(processor, images: list[Image.Image]) -> torch.Tensor:
    """Normalised [N, C, H, W] pixels, one row per image, for any supported family (families.py)."""
    return families.pixel_values(processor, images)


def image_token_count(processor) -> int:
    """How many image tokens one image expands to, asked of the processor itself (families.image_expansion)."""
    return families.image_token_count(processor)


def _expand_ids(processor, text: str) -> list[int]:
    """Token ids of `text` (prompts.py's form) as its model reads it: re-rendered for the model's family,
    the image placeholder expanded as the processor would, special tokens (BOS) included."""
    memo = _memo_of(processor)
    if memo is not None and text in memo:
        return list(memo[text])
    rendered = families.render(processor, text)
    expanded = rendered.replace(processor.image_token, families.image_expansion(processor))
    ids = processor.tokenizer(expanded, add_special_tokens=True)["input_ids"]
    if memo is not None and len(memo) < _MEMO_TEXTS:
        memo[text] = tuple(ids)
    return ids


# Ids already made, per processor object (it dies with it): an evaluation encodes the same ~1000 prompts as
# the one before it in the process (the demo's and the study's workers run several), 0.1-0.2 s each time
# (2-core Intel Xeon, 2026-12-06). Nothing in viker changes a processor after loading it.
_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MEMO_TEXTS = 100_000


def _memo_of(processor) -> dict | None:
    try:
        return _IDS.setdefault(processor, {})
    except TypeError:          # an object that cannot be weakly referenced or hashed: encode every time
        return None


def encode_pair(processor, prompt: str, answer: str, where: str = "example", max_length: int | None = None):
    """(input_ids, answer_start): ids of prompt+answer and where the answer's tokens begin."""
    if not answer or not answer.strip():
        raise InputError(f"{where}: empty answer")
    prompt_ids = _expand_ids(processor, prompt)
    full_ids = _expand_ids(processor, prompt + answer)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise InputError(f"{where}: the tokenizer merges prompt and answer tokens; cannot align the answer")
    if len(full_ids) == len(prompt_ids):
        raise InputError(f"{where}: the answer produced no tokens")
    if max_length is not None and len(full_ids) + 1 > max_length:
        raise InputError(f"{where}: sequence of {len(full_ids) + 1} tokens exceeds the model's limit of {max_length}")
    return full_ids, len(prompt_ids)


def encode_prompt(processor, prompt: str) -> list[int]:
    return _expand_ids(processor, prompt)


def max_positions(model) -> int | None:
    cfg = getattr(model.config, "text_config", model.config)
    return getattr(cfg, "max_position_embeddings", None)


def pad_right(seqs: list[list[int]], pad_id: int, label_starts: list[int] | None = None):
    """Right-padded (input_ids, attention_mask, labels); labels are -100 outside the answers."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        start = label_starts[i] if label_starts is not None else 0
        labels[i, start: len(s)] = torch.tensor(s[start:])
    return ids, mask, labels


def pad_left(seqs: list[list[int]], pad_id: int):
    """Left-padded (input_ids, attention_mask) for batched generation."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask
