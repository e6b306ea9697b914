"""Batched greedy generation with left padding (evaluation and the vanilla gate)."""
from __future__ import annotations

import torch

from pipeline.progress import progress as tqdm  # plain log lines off a terminal

from .encoding import encode_prompt, pad_left, pixel_values
from .families import generation_inputs


@torch.no_grad()
def generate(model, processor, images, prompts: list[str], max_new_tokens: int | list[int] = 50,
             batch_size: int = 32, desc: str | None = None) -> list[str]:
    """Greedy answers for (image, prompt) pairs, in input order.

    `max_new_tokens` is one limit or one per item: items of several tasks share
    a batch (one decoding pass instead of one per task), each answer cut to its
    own limit. Greedy decoding is causal, so an answer cut to n tokens is the
    answer a run limited to n tokens gives.
    """
    limits = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens))
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} token limits for {len(prompts)} prompts")
    tok = processor.tokenizer
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    answers: list[str] = []
    starts = range(0, len(prompts), batch_size)
    # disable=None: bars only on a terminal; in a batch-job log these short nested bars are noise.
    for start in tqdm(starts, desc=desc, disable=True if desc is None else None, leave=False):
        chunk = prompts[start: start + batch_size]
        cut = limits[start: start + batch_size]
        ids, mask = pad_left([encode_prompt(processor, p) for p in chunk], tok.pad_token_id)
        pixels = pixel_values(processor, images[start: start + batch_size]).to(device, dtype)
        ids = ids.to(device)
        out = model.generate(input_ids=ids, attention_mask=mask.to(device), **generation_inputs(model, ids, pixels),
                             max_new_tokens=max(cut), do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[:, ids.shape[1]:]
        answers.extend(tok.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(new, cut))
    return answers
