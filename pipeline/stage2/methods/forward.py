"""The forwards every method shares: the one gradient forward, the frozen model, online references.

RMU reads a decoder layer's hidden states instead of logits: `forward_hidden`
and `frozen_hidden` capture that layer's output with a forward hook during
the same forwards.

The frozen model is never a second copy: it is the base with the adapter
disabled, under no_grad. With `online_reference` ViKeR computes R during
training (k frozen forwards per sample, drawn exactly like stage one draws
them); it exists to measure what the cache saves and to check that both paths
give the same loss.
"""
from __future__ import annotations

import contextlib

import torch

from pipeline.models.forward import TextBatch, answer_logits, language_model, make_text_batch
from pipeline.stage1.precompute import summarise
from pipeline.stage1.references import draw_reference_images
from pipeline.stage1.spans import answer_pieces, chain_spans, span_starts

from ..errors import TrainError
from ..inputs import Example, Inputs
from ..stream import Refs


class AnswerLogits(torch.nn.Module):
    """answer_logits as a module, so DDP sees (and synchronises) the gradient forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, answer_pos, pixel_values):
        # answer_logits reads only these three fields of the batch.
        batch = TextBatch(input_ids, attention_mask, answer_pos, answer_ids=None, answer_mask=None)
        return answer_logits(self.model, batch, pixel_values)


@contextlib.contextmanager
def frozen(model):
    """The vanilla model: adapter off, no grad, eval mode (no dropout draws, so no RNG is consumed)."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter(), torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def frozen_dtype(model) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if not p.requires_grad)


def forward_parts(net, model, parts: dict[str, list[Example]], inputs: Inputs, dev):
    """One gradient forward over every part (forget, idk, retain) concatenated.

    One call, not one per part: DDP synchronises one forward per backward, and
    one larger batch is faster. Returns name -> (logits, answer ids, mask),
    each sliced back to that part's own answer width.
    """
    examples = [ex for part in parts.values() for ex in part]
    batch = make_text_batch([ex.ids for ex in examples], [ex.start for ex in examples], inputs.pad_id).to(dev)
    pixels = inputs.bank[[ex.image for ex in examples]].to(dev, frozen_dtype(model))
    logits = net(batch.input_ids, batch.attention_mask, batch.answer_pos, pixels)
    return _split(parts, logits, batch)


def _split(parts: dict[str, list[Example]], values: torch.Tensor, batch: TextBatch) -> dict:
    """name -> (values, answer ids, mask) of each part's rows, sliced to that part's own answer width."""
    out, row = {}, 0
    for name, part in parts.items():
        width = max(len(ex.ids) - ex.start for ex in part)
        rows = slice(row, row + len(part))
        out[name] = (values[rows, :width], batch.answer_ids[rows, :width], batch.answer_mask[rows, :width])
        row += len(part)
    return out


def frozen_logits(model, examples: list[Example], inputs: Inputs, dev, images=None):
    """Vanilla-model answer logits; `images` overrides the examples' own image rows (pool pixels)."""
    batch = make_text_batch([ex.ids for ex in examples], [ex.start for ex in examples], inputs.pad_id).to(dev)
    pixels = images if images is not None else inputs.bank[[ex.image for ex in examples]]
    with frozen(model):
        return answer_logits(model, batch, pixels.to(dev, frozen_dtype(model))), batch


def online_references(model, examples: list[Example], inputs: Inputs, spec, dev) -> Refs:
    """R for a micro-batch during training: k frozen forwards per sample, averaged like stage one.

    `spec`: the run's base.LossSpec (its k, top_k and ref_seed).

    Top-K probabilities are rounded to float16 as the cache stores them, so the
    online and cached paths train on the same numbers.
    """
    k = spec.k
    repeated = [ex for ex in examples for _ in range(k)]
    picks = [j for ex in examples for j in draw_reference_images(ex.sample_id, len(inputs.pool), k, spec.ref_seed)]
    logits, batch = frozen_logits(model, repeated, inputs, dev, images=inputs.pool[picks])
    B, T = len(examples), logits.shape[1]
    avg = torch.softmax(logits.float(), dim=-1).view(B, k, T, -1).mean(1)
    mask = batch.answer_mask.view(B, k, T)[:, 0] > 0
    if spec.span == "chain":   # as stage one applies it (stage1/spans.py)
        tokenizer = inputs.processor.tokenizer
        for b, ex in enumerate(examples):
            at = mask[b].nonzero()[:, 0]
            answer = [int(i) for i in ex.ids[ex.start:]]
            avg[b, at] = chain_spans(avg[b, at], answer, span_starts(answer_pieces(tokenizer, ex.ids, ex.start)))
    idx, prob, tail, entropy = summarise(avg, spec.top_k)
    prob = prob.half().float()
    return Refs(torch.where(mask[..., None], idx, 0), torch.where(mask[..., None], prob, 0.0),
                torch.where(mask, tail, 1.0), torch.where(mask, entropy, 0.0))


def decoder_layer(model, layer: int) -> torch.nn.Module:
    """Decoder layer `layer` of the language model (-1: the middle one, (n - 1) // 2); TrainError when out of range."""
    layers = language_model(model).layers
    n = len(layers)
    index = (n - 1) // 2 if layer == -1 else layer
    if not 0 <= index < n:
        raise TrainError(f"train.rmu_layer {layer} is out of range: the model has {n} decoder layers "
                         f"(0..{n - 1}, or -1 for the middle one)")
    return layers[index]


@contextlib.contextmanager
def layer_output(model, layer: int):
    """A list that receives decoder layer `layer`'s output hidden states [B, L, D], one per forward run inside.

    The hook is removed on leaving, so activation checkpointing's recomputation
    in the backward adds nothing.
    """
    seen = []

    def keep(module, args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)

    handle = decoder_layer(model, layer).register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def _at_answer_tokens(hidden: torch.Tensor, batch: TextBatch) -> torch.Tensor:
    """[B, T, D]: the hidden states at the answer tokens' own positions (answer_pos + 1), as OpenUnlearning's RMU
    masks them (labels != -100); padded slots point at position 1 and carry mask 0."""
    index = (batch.answer_pos + 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index)


def forward_hidden(net, model, parts: dict[str, list[Example]], inputs: Inputs, dev, layer: int):
    """forward_parts for RMU: one gradient forward, name -> (layer `layer`'s hidden states at the answer tokens
    [n, T, D], answer ids, mask), plus the forward's logits (which the loss does not read)."""
    examples = [ex for part in parts.values() for ex in part]
    batch = make_text_batch([ex.ids for ex in examples], [ex.start for ex in examples], inputs.pad_id).to(dev)
    pixels = inputs.bank[[ex.image for ex in examples]].to(dev, frozen_dtype(model))
    with layer_output(model, layer) as seen:
        logits = net(batch.input_ids, batch.attention_mask, batch.answer_pos, pixels)
    return _split(parts, _at_answer_tokens(seen[0], batch), batch), logits


def frozen_hidden(model, examples: list[Example], inputs: Inputs, dev, layer: int):
    """The vanilla model's layer `layer` hidden states at the answer tokens [B, T, D], and the answer mask."""
    with layer_output(model, layer) as seen:
        _, batch = frozen_logits(model, examples, inputs, dev)
    return _at_answer_tokens(seen[0], batch), batch.answer_mask
