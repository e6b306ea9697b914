"""Teacher-forced forward passes that produce logits only at answer positions.

Full-vocabulary logits for the 600-odd prompt positions of a LLaVA-7B sample
would cost more memory than the rest of the step; only the answer positions
are needed, so the hidden states are gathered *before* the LM head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import families
from .encoding import pad_right


@dataclass
class TextBatch:
    input_ids: torch.Tensor        # [B, L] right-padded
    attention_mask: torch.Tensor   # [B, L]
    answer_pos: torch.Tensor       # [B, T] index of the position whose logits predict answer token t
    answer_ids: torch.Tensor       # [B, T] answer token ids (pad 0)
    answer_mask: torch.Tensor      # [B, T] 1 on real answer tokens

    def to(self, device):
        return TextBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.answer_pos,
                                                  self.answer_ids, self.answer_mask)))


def make_text_batch(seqs: list[list[int]], answer_starts: list[int], pad_id: int) -> TextBatch:
    ids, mask, _ = pad_right(seqs, pad_id)
    width = max(len(s) - a for s, a in zip(seqs, answer_starts))
    pos = torch.zeros((len(seqs), width), dtype=torch.long)
    ans = torch.zeros((len(seqs), width), dtype=torch.long)
    amask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, (s, a) in enumerate(zip(seqs, answer_starts)):
        n = len(s) - a
        pos[i, :n] = torch.arange(a - 1, len(s) - 1)    # logits at p predict token p+1
        ans[i, :n] = torch.tensor(s[a:])
        amask[i, :n] = 1
    return TextBatch(ids, mask, pos, ans, amask)


def unwrap(model):
    """The HF model (LlavaForConditionalGeneration, Qwen2_5_VL..., Idefics3...) inside a peft wrapper."""
    inner = model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


# Small accessors so the prefix path reaches the parts it needs in one place
# (other model families name them differently).

def multimodal_model(model):
    """The module that embeds images and text and runs the language model (no LM head)."""
    return unwrap(model).model


def language_model(model):
    """The decoder alone: takes input ids plus a key/value cache, returns hidden states."""
    return getattr(multimodal_model(model), families.family_of_model(model).decoder)


def output_head(model):
    return unwrap(model).lm_head


def forward_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor) -> dict:
    """Keyword arguments of a teacher-forced multimodal forward, one image per row, for any family.

    Qwen's 3-D positions are passed explicitly (families.rope_positions), so every
    path, the prefix path included, places tokens by one rule whatever the
    transformers version.
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask,
              **families.vision_inputs(model, pixel_values), **families.image_types(model, input_ids)}
    positions = families.rope_positions(model, input_ids)
    if positions is not None:
        kwargs["position_ids"] = positions
    return kwargs


def answer_logits(model, batch: TextBatch, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits at the answer positions of a right-padded batch."""
    inner = unwrap(model)
    out = inner.model(**forward_inputs(model, batch.input_ids, batch.attention_mask, pixel_values), use_cache=False)
    hidden = out.last_hidden_state
    index = batch.answer_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return inner.lm_head(torch.gather(hidden, 1, index))
