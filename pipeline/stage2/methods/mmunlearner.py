"""MMUnlearner: GradDiff's loss, its gradients restricted to the weights a saliency score selects.

    score  F_s[i] = mean over micro-batches b of set s of  sum_j (dL_b / dW_ij)^2      (L_b: b's mean answer NLL)
    mask   row i of W trains  iff  (F_forget[i] + 1e-15) / (F_retain[i] + 1e-15) >= tau      tau = train.mmu_threshold
    loss   GA(forget) + alpha * NLL(retain), alpha 1, every LoRA gradient zeroed outside the selected rows

(Huo et al., "MMUnlearner: Reformulating Multimodal Machine Unlearning in the
Era of Multimodal Large Language Models", arXiv 2502.11051, ACL Findings 2025.)
W is each weight LoRA wraps (the language model's attention and MLP
projections), scored on the vanilla model (the adapter off) before the first
step: every forget sample and every retain sample (train.mmu_mask_samples > 0:
that many of each, evenly spaced through the split), in micro-batches of
train.batch_size.

What the authors' code (github.com/Z1zs/MMUnlearner, commit fa77c66) does:
data_process/MLLMU_gen_mask.py scores the vanilla model with
data_process/SFRon.py `Mask_Our.prepare_weight_saliency_mask`: per weight
element, the mean over forget batches of the squared gradient of
-outputs.loss, likewise over a "preserve" set, and the mask
(forget + 1e-15) / (preserve + 1e-15) >= threshold, threshold 1. It makes a
vision mask (parameters named vision_tower, multi_modal_projector; preserve:
the retain set) and a language mask (language_model; preserve: the retain set
and MLLMU-Bench's pure-text questions about every person, forget people
included: MLLMU_process.py `MLLMU_text_Dataset` over Full_Set); the README
trains with the language mask. baselines/MLLMU_manifold.py `main` keeps the
mask of the linear layers (names holding proj, fc, linear, mlp or qkv) and
alternates, over one epoch (lr 1e-5, batch 4, AdamW), a forget step
(-forget_alpha * outputs.loss, forget_alpha 1; backward; clip at 1; grad *=
mask; step) every len(retain) // len(forget) iterations with an unmasked
retain step (outputs.loss) every iteration.

Where viker differs, and why (docs/METHODS.md):
- the language side only: viker's LoRA never wraps the vision side
  (modeling.wrap_lora), so there is no vision mask to choose; the authors'
  README trains the language one;
- the retain split is the preserve set: the pure-text questions of their
  language preserve set are MLLMU-Bench's evaluation items, and viker's
  forwards always carry an image;
- rows, not elements: viker trains a LoRA adapter, W + s * B A, not W. A
  row-restricted update is exact with LoRA: B starts at 0, so zeroing the
  gradient of B's rows outside the mask keeps those rows of B A at exactly 0
  (the effective weight rows equal the vanilla ones bit for bit, and the
  adapter stays an ordinary one for evaluation, merging and the attacks). An
  element mask cannot be applied through the gradients of A or B (B A mixes
  them), and scoring A and B's own gradients is degenerate: A's gradient is 0
  while B is 0, so every entry of A scores (0 + eps) / (0 + eps) = 1 >= 1. A
  row's score is its elements' Fisher summed (the row taken as one group);
- one step on the summed loss, all of its gradient masked (the retain term
  included), before clipping: every viker method takes one step on one loss,
  and the unselected rows stay the vanilla model's; the authors alternate a
  masked forget step and an unmasked retain step, masking after clipping;
- the Fisher of viker's loss (answer tokens' mean NLL per example, then the
  batch mean) at train.batch_size, scored when the run starts, not by a
  separate script. Under several processes rank r scores micro-batches
  r::world and the sums are all-reduced, so every rank holds the same mask.
"""
from __future__ import annotations

import dataclasses

from ..errors import TrainError
from .base import Defaults, every_convention
from .graddiff import GradDiff

# The authors' floor (SFRon.py): a row no gradient reaches scores (0 + EPS) / (0 + EPS) = 1.
EPS = 1e-15


class MMUnlearner(GradDiff):    # GradDiff's loss; what differs is the mask on its gradients
    name, label, position = "mmunlearner", "MMUnlearner", 90
    conventions = every_convention(Defaults(retain_weight=1.0, retain=("nll",)))

    def gradient_edit(self, model, inputs, spec, batch_size, dev, rank=0, world=1, log=None):
        """The saliency mask, scored once on the vanilla model: a RowMask for the loop to apply every step."""
        if not inputs.retain:
            raise TrainError("method mmunlearner scores its mask against retain samples: the retain split holds none")
        layers = lora_layers(model)
        forget = evenly_spaced(len(inputs.forget), spec.mmu_mask_samples)
        retain = evenly_spaced(len(inputs.retain), spec.mmu_mask_samples)
        f_fisher = row_fisher_of(model, layers, inputs, inputs.forget, forget, batch_size, dev, rank, world)
        r_fisher = row_fisher_of(model, layers, inputs, inputs.retain, retain, batch_size, dev, rank, world)
        rows = {name: saliency_mask(f_fisher[name], r_fisher[name], spec.mmu_threshold) for name in layers}
        mask = RowMask.of(layers, rows, {"threshold": spec.mmu_threshold, "forget_samples": len(forget),
                                         "retain_samples": len(retain)})
        if log is not None:
            log(mask.describe())
        return mask


METHOD = MMUnlearner()


# ------------------------------------------------------------------ which layers, which samples


def lora_layers(model) -> dict:
    """name -> peft LoRA layer, for every weight the adapter wraps; TrainError for one that is not a plain Linear."""
    import torch
    from peft.tuners.lora import LoraLayer
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        raise TrainError("method mmunlearner masks LoRA layers, and the model has none")
    for name, m in layers.items():
        if not isinstance(m.get_base_layer(), torch.nn.Linear):
            raise TrainError(f"method mmunlearner masks rows of Linear layers; LoRA layer {name} wraps a "
                             f"{type(m.get_base_layer()).__name__}")
    return layers


def evenly_spaced(n: int, count: int) -> list[int]:
    """`count` indices of range(n) evenly spaced from 0 (all of them when count is 0 or >= n)."""
    if count <= 0 or count >= n:
        return list(range(n))
    return [i * n // count for i in range(count)]


# ------------------------------------------------------------------ the score


def row_fisher_of(model, layers: dict, inputs, table, indices: list[int], batch_size: int, dev, rank: int = 0,
                  world: int = 1) -> dict:
    """name -> F[i], [out] float32: the mean over micro-batches of each row's summed squared weight gradient.

    The micro-batches are `table[indices]` in chunks of `batch_size` (rank r takes chunks r::world; the sums
    are all-reduced); the loss of one is its mean answer NLL (losses.nll_loss) on the vanilla model: adapter off,
    eval mode, so no dropout draw moves the run's random state. The weight gradient is never materialised as
    a parameter's .grad: each layer's input and output gradient are caught by hooks (row_fisher).
    """
    import torch
    import torch.distributed as dist

    from pipeline.models.distributed import autocast

    from ..losses import nll_loss
    from .forward import AnswerLogits, forward_parts

    sums = {name: torch.zeros(m.get_base_layer().out_features, device=m.get_base_layer().weight.device)
            for name, m in layers.items()}

    def catch(name):
        def hook(module, args, output):
            x = args[0].detach()

            def add(grad_out):   # returns None: the gradient flows on unchanged
                sums[name].add_(row_fisher(grad_out, x))

            if not output.requires_grad:     # a first layer: nothing before it carries a gradient
                output.requires_grad_()
            output.register_hook(add)
        return hook

    chunks = [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]
    handles = [m.get_base_layer().register_forward_hook(catch(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            for chunk in chunks[rank::world]:
                examples, batch_inputs = _micro_batch(inputs, table, chunk)
                with autocast(dev):
                    logits, labels, mask = forward_parts(AnswerLogits(model), model, {"s": examples}, batch_inputs,
                                                         dev)["s"]
                    loss = nll_loss(logits, labels, mask)[0].mean()
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    flat = torch.cat(list(sums.values()))
    if world > 1:
        dist.all_reduce(flat)
    flat /= max(1, len(chunks))
    return dict(zip(sums, flat.split([len(s) for s in sums.values()])))


def _micro_batch(inputs, table, chunk: list[int]):
    """(the examples, renumbered to their row of the batch's pixels; a copy of `inputs` holding those pixels)."""
    from pipeline.models.encoding import load_image, pixel_values
    examples = [table[i] for i in chunk]
    images = [load_image(inputs.images[ex.image], f"sample {ex.sample_id}") for ex in examples]
    renumbered = [dataclasses.replace(ex, image=j) for j, ex in enumerate(examples)]
    return renumbered, dataclasses.replace(inputs, bank=pixel_values(inputs.processor, images), loaders=None)


def row_fisher(grad_out, x):
    """sum_j (dL/dW_ij)^2 for a Linear y = x W^T: its weight gradient, squared and summed over each row, [out].

    `grad_out` [..., out] is dL/dy, `x` [..., in] the layer's input; dL/dW = sum over positions of
    grad_out^T x. float32 whatever the inputs' dtype.
    """
    g = grad_out.reshape(-1, grad_out.shape[-1]).float()
    return (g.T @ x.reshape(-1, x.shape[-1]).float()).pow(2).sum(-1)


def saliency_mask(forget, retain, threshold: float):
    """(forget + EPS) / (retain + EPS) >= threshold, bool: what the forget set's gradients reach more than the
    retain set's.

    `forget`, `retain`: Fisher scores of the same shape (SFRon.py's weight_saliency, here per row).
    """
    if not threshold > 0:
        raise ValueError(f"the saliency threshold must be > 0, got {threshold}")
    return (forget.float() + EPS) / (retain.float() + EPS) >= threshold


# ------------------------------------------------------------------ the mask on every step


@dataclasses.dataclass
class RowMask:
    """Each LoRA layer's B factor with its selected rows: every step, B's gradient is zeroed outside them.

    B [out, r] starts at 0 (peft's init), so a row never stepped stays 0 and that row of the update s * B A
    with it: the effective weight rows outside the mask are the vanilla model's, exactly. AdamW leaves a
    parameter whose gradient is always 0 where it is when the parameter is 0 (no moment, decay of 0 is 0).
    """
    factors: list     # (B weight, bool rows [out]) per LoRA layer and active adapter
    summary: dict     # what was selected, recorded in train_config.json

    @classmethod
    def of(cls, layers: dict, rows: dict, settings: dict) -> "RowMask":
        factors, by_kind = [], {}
        for name, m in layers.items():
            keep = rows[name]
            for adapter in m.active_adapters:
                weight = m.lora_B[adapter].weight
                if weight.shape[0] != keep.shape[0]:
                    raise TrainError(f"LoRA layer {name}: B has {weight.shape[0]} rows, its weight {keep.shape[0]}")
                factors.append((weight, keep.to(weight.device)))
            kind = by_kind.setdefault(name.rsplit(".", 1)[-1], [0, 0, 0, 0])
            width = m.get_base_layer().in_features
            kind[0] += int(keep.sum())
            kind[1] += keep.numel()
            kind[2] += int(keep.sum()) * width
            kind[3] += keep.numel() * width
        total = [sum(k[i] for k in by_kind.values()) for i in range(4)]
        summary = {**settings, "rows": total[0], "of_rows": total[1], "weights": total[2], "of_weights": total[3],
                   "layers": sum(int(rows[n].any()) for n in layers), "of_layers": len(layers),
                   "rows_by_projection": {k: v[:2] for k, v in sorted(by_kind.items())}}
        return cls(factors, summary)

    def __call__(self) -> None:
        for weight, keep in self.factors:
            if weight.grad is not None:
                weight.grad.masked_fill_(~keep.unsqueeze(-1), 0.0)

    def describe(self) -> str:
        s = self.summary
        kinds = ", ".join(f"{k} {a}/{b}" for k, (a, b) in s["rows_by_projection"].items())
        return (f"[train] MMUnlearner mask (threshold {s['threshold']:g}; {s['forget_samples']} forget, "
                f"{s['retain_samples']} retain samples scored): language model: {s['rows']} of {s['of_rows']} "
                f"weight rows ({100 * s['rows'] / max(1, s['of_rows']):.1f}%, {s['weights']} of {s['of_weights']} "
                f"weights) trainable in {s['layers']} of {s['of_layers']} LoRA layers ({kinds}); vision tower and "
                f"projector: no adapter, frozen")
