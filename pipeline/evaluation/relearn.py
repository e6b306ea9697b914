"""The relearning attack (`viker attack relearn`): do a few fine-tuning steps bring the forgotten facts back?

Unlearning by gradient ascent is known to hide knowledge rather than remove
it: fine-tuning the unlearned model on a small part of the forget set (or on
related text) brings the rest back (Hu et al. 2024, "Jogging the memory of
unlearned LLMs through targeted relearning attacks"; Lynch et al. 2024, "Eight
methods to evaluate robust unlearning in LLMs"). The attack here:

  1. the forget set's training QA (every (person, question) item) are split,
     seeded by `relearn.seed`, into the attacker's share (`relearn.fraction`,
     10% by default, at least one item) and the rest; the split depends on the
     data and the seed only, so every method is attacked with the same items;
  2. the unlearned model (adapter merged) is fine-tuned on the attacker's
     share: the knowledge-injection loop (finetune.teach, with the recipe
     attack_recipe builds from the relearn section) for `relearn.steps` steps,
     no warm-up, plain training prompt, no image jitter, full fine-tuning by
     default (`relearn.lora` for a 7B);
  3. Forget ACC (fact accuracy: the greedy answer contains the fact,
     factcheck.fact_accuracy) is measured on the *other* items, before and
     after, and on the vanilla model.

recovery = acc_after / acc_vanilla on the held-out items. Part of it needs no
hidden knowledge at all: items of a person the attacker's share names may be
answerable from that share. The control is the gold model (trained as the
vanilla one but never on the forget people), attacked the same way: its
recovery is what the attacker's share alone teaches. Recovery above the gold
model's is knowledge the unlearning left in the weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from pipeline.config import FinetuneConfig, RelearnConfig
from pipeline.data.mllmu import DataError
from pipeline.data.records import Profile

from .factcheck import fact_accuracy


def split_forget(profiles: list[Profile], fraction: float, seed: int) -> tuple[list[Profile], list[Profile]]:
    """(attacker's profiles, held-out profiles): the same people, their training QA split by item (module doc)."""
    items = [(i, j) for i, p in enumerate(profiles) for j in range(len(p.qa))]
    if len(items) < 2:
        raise DataError(f"the relearning attack needs >= 2 forget QA items (one to train on, one to test); "
                        f"the forget set has {len(items)}")
    if not 0 < fraction < 1:
        raise ValueError(f"relearn.fraction must be in (0, 1), got {fraction}")
    n_train = min(len(items) - 1, max(1, round(fraction * len(items))))
    picked = {items[k] for k in np.random.default_rng(seed).permutation(len(items))[:n_train].tolist()}

    def part(keep) -> list[Profile]:
        out = []
        for i, p in enumerate(profiles):
            qa = [qa for j, qa in enumerate(p.qa) if keep((i, j) in picked)]
            if qa:
                out.append(dataclasses.replace(p, qa=qa))
        return out
    return part(lambda chosen: chosen), part(lambda chosen: not chosen)


def held_out_accuracy(model, processor, held_out: list[Profile], batch_size: int = 32) -> float:
    return float(fact_accuracy(model, processor, held_out, batch_size=batch_size, desc="relearn fact")["acc"])


def attack_recipe(settings: RelearnConfig) -> FinetuneConfig:
    """The attacker's fine-tuning recipe for finetune.teach, from the relearn section.

    Every field teach reads is set here, so the knowledge-injection defaults
    (warm-up, stop rule, augmentation) never leak into the attack: relearn.steps
    steps exactly (no convergence stop), no warm-up, the plain training prompt
    without image jitter.
    """
    r = settings
    return FinetuneConfig(steps=r.steps, epochs=100.0, batch_size=r.batch_size, lr=r.lr, warmup_steps=0,
                          weight_decay=0.0, max_grad_norm=1.0, seed=r.seed, augment=False, formats=False,
                          lora=r.lora, lora_r=r.lora_r, lora_alpha=r.lora_alpha, stop_known=0.0, check_every=50,
                          check_size=128)


def attack_model(model, processor, profiles: list[Profile], settings: RelearnConfig, *, eval_batch_size: int = 32,
                 log=lambda *_: None) -> dict:
    """The attack (settings: the relearn config section) on a loaded model, trained in place: call it last.

    Returns before/after accuracies.
    """
    from pipeline.stage2.finetune import teach
    r = settings
    fraction, steps, lr, seed, lora = r.fraction, r.steps, r.lr, r.seed, r.lora
    attacker, held_out = split_forget(profiles, fraction, seed)
    before = held_out_accuracy(model, processor, held_out, eval_batch_size)
    torch.manual_seed(seed)
    if not lora:   # a merged adapter comes back frozen (peft is_trainable=False): the attacker trains everything
        for param in model.parameters():
            param.requires_grad_(True)
    with torch.enable_grad():
        model, info = teach(model, processor, attacker, attack_recipe(r), desc="relearn", log=log)
    after = held_out_accuracy(model, processor, held_out, eval_batch_size)
    return {"fraction": fraction, "steps": steps, "lr": lr, "seed": seed, "lora": lora,
            "n_attack_qa": sum(len(p.qa) for p in attacker), "n_held_out_qa": sum(len(p.qa) for p in held_out),
            "acc_before": before, "acc_after": after, "final_loss": info["final_loss"]}


def reference_accuracy(model_dir, profiles: list[Profile], fraction: float, seed: int, key: str,
                       dtype: str = "auto", device: str = "auto", batch_size: int = 32) -> float:
    """The vanilla model's accuracy on the held-out items, computed once and kept beside the model.

    `key` names the data (root and split): one value per (data, fraction, seed).
    """
    from pipeline.models.modeling import load_for_eval
    from pipeline.cache.filememo import remembered

    def compute() -> float:
        model, processor = load_for_eval(model_dir, None, dtype, device)
        return held_out_accuracy(model, processor, split_forget(profiles, fraction, seed)[1], batch_size)
    return float(remembered(Path(model_dir) / "relearn-reference.json", f"{key}|{fraction}|{seed}", compute))


def with_recovery(result: dict, acc_vanilla: float) -> dict:
    """The attack's result with the vanilla accuracy and recovery = acc_after / acc_vanilla."""
    recovery = result["acc_after"] / acc_vanilla if acc_vanilla > 0 else float("nan")
    return {**result, "acc_vanilla": acc_vanilla, "recovery": recovery}


def format_attack(result: dict, label: str) -> str:
    recovery = result["recovery"]
    shown = "n/a (the vanilla model knows none)" if recovery is None or recovery != recovery else f"{100 * recovery:.1f}%"
    return (f"{label}: relearned on {result['n_attack_qa']:g} forget QA ({100 * result['fraction']:g}%), "
            f"{result['steps']:g} steps; Forget ACC on the other {result['n_held_out_qa']:g}: "
            f"{100 * result['acc_before']:.1f}% -> {100 * result['acc_after']:.1f}% "
            f"(vanilla {100 * result['acc_vanilla']:.1f}%, recovery {shown})")
