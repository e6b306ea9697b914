"""RMU (Representation Misdirection for Unlearning): scramble a layer's forget activations, keep its retain ones.

    (1/D) ||h_l(forget) - c*u||^2  +  alpha * (1/D) ||h_l(retain) - h_l^vanilla(retain)||^2

(Li et al., "The WMDP Benchmark: Measuring and Reducing Malicious Use With
Unlearning", arXiv 2403.03218.) h_l is the output of decoder layer l =
train.rmu_layer (0-based; -1, the default: the middle one, (layers - 1) // 2,
layer 7 of a 16-layer Llama-3.2-1B, OpenUnlearning's default module),
at the answer tokens' own positions, each term averaged over those tokens and
then over the micro-batch. u is a fixed unit vector along a uniform [0, 1)^D
draw seeded by train.seed (losses.steering_target), c = train.rmu_steering (2).
The vanilla model is the base with the adapter off (forward.frozen_hidden).

The same in every convention, OpenUnlearning's RMU (locuslab/open-unlearning,
configs/trainer/RMU.yaml: steering_coeff 2, alpha 1, gamma 1, retain_loss_type
EMBED_DIFF, module_regex model.layers.7; src/trainer/unlearn/rmu.py
RMU.compute_loss, RMU.compute_activation_loss: mse_loss(reduction="none") masked
by labels != -100, mean over D, sum over tokens / their count, mean over the
batch; RMU.get_control_vector: torch.rand(1, 1, D) normalised, times
steering_coeff): neither MLLMU-Bench nor ViKeR's paper has RMU. alpha =
train.retain_weight when > 0, else 1. What differs: OpenUnlearning's u is drawn
unseeded once per run, it trains every weight (here the LoRA adapter), and its
activation loss divides [b] sums by [b, 1] token counts, which broadcasts to
[b, b] when answers differ in length; ours is the per-example token mean its
comment describes (docs/METHODS.md). c is model-dependent (WMDP's Zephyr-7B
run: 6.5 at layer 7), so match it to the layer's activation norm (logged as
forget/hidden_norm).
"""
from __future__ import annotations

from .base import RETAIN, Defaults, Method, every_convention


class RMU(Method):
    name, label, position = "rmu", "RMU", 80
    conventions = every_convention(Defaults(retain_weight=1.0, retain=("hidden",)))

    def loss(self, net, model, mb, spec, inputs, dev):
        """One gradient forward capturing layer l (forward_hidden); the vanilla retain states made before it."""
        import torch

        from .forward import forward_hidden, frozen_hidden
        self.check_batch(mb, spec)
        vanilla = frozen_hidden(model, mb.retain, inputs, dev, spec.rmu_layer)[0] if self.needs_retain(spec) else None
        parts = {"forget": mb.forget}
        if mb.retain:
            parts[RETAIN] = mb.retain
        out, logits = forward_hidden(net, model, parts, inputs, dev, spec.rmu_layer)
        total, diags = self.combine(out, mb, spec, dev, vanilla=vanilla)
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):
            # DDP (find_unused_parameters off) expects a gradient for every parameter, the layers above l too:
            # a zero term reaches them without changing any gradient.
            total = total + 0.0 * logits.float().sum()
        return total, diags

    def forget_loss(self, out, mb, spec, refs, dev):
        from ..losses import rmu_forget_loss, steering_target
        hidden, _, mask = out["forget"]
        target = steering_target(hidden.shape[-1], spec.rmu_steering, spec.seed).to(hidden.device)
        return rmu_forget_loss(hidden, mask, target)


METHOD = RMU()
