"""The relearning attack (`viker attack relearn`): do a few fine-tuning steps bring the forgotten facts back?

Unlearning by gradient ascent is known to hide knowledge rather than remove
it: fine-tuning the unlearned model on a small part of the forget set (or on
related text) brings the rest back (Hu et al. 2024, "Jogging the memory of
unlearned LLMs through targeted relearning attacks"; Lynch et al. 2024, "Eight
methods to evaluate robust unlearning in LLMs"). The attack here:

  1. the forget set's training QA are split two ways, each seeded by
     `relearn.seed` and depending on the data and the seed only, so every
     method is attacked with the same items:
     - item split: every (person, question) item, the attacker's share
       `relearn.fraction` (10% by default, at least one item), the rest held out;
     - people split (`relearn.people`): half the forget people with all their
       QA for the attacker, the other half's QA held out. No held-out item
       shares a person with the attacker's share, so the share itself answers
       nothing: the cleaner split (independent people);
  2. the unlearned model (adapter merged) is fine-tuned on the attacker's
     share: the knowledge-injection loop (finetune.teach, with the recipe
     attack_recipe builds from the relearn section), no warm-up, plain
     training prompt, no image jitter, full fine-tuning by default
     (`relearn.lora` for a 7B). One setting understates an attacker, who picks
     the one that works (Hu et al. 2024; Deeb and Roger 2024, "Do unlearning
     methods remove information from language model weights?", report the
     best of a small sweep): the item split is attacked with the default cell
     (`relearn.lr`, `relearn.steps`) and with every cell of the grid
     `relearn.grid_lrs` x `relearn.grid_steps`, each from the same weights;
     the people split with the default cell;
  3. Forget ACC (fact accuracy: the greedy answer contains the fact,
     factcheck.fact_accuracy) is measured on the held-out items, before and
     after, and on the vanilla model (reference_accuracy, once per data,
     split, fraction and seed).

recovery = acc_after / acc_vanilla on the held-out items (the default cell);
worst_recovery its maximum over the cells (worst_lr, worst_steps: the cell);
people_recovery the same on the people split. Part of the item split's
recovery needs no hidden knowledge at all: items of a person the attacker's
share names may be answerable from that share. The control is the gold model
(trained as the vanilla one but never on the forget people), attacked the same
way: its recovery is what the attacker's share alone teaches. Recovery above
the gold model's is knowledge the unlearning left in the weights.
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


def split_people(profiles: list[Profile], seed: int) -> tuple[list[Profile], list[Profile]]:
    """(attacker's people, held-out people): half the forget people (seeded), each with all their training QA.

    The people split (module doc): no held-out item shares a person with the
    attacker's share, so nothing the attacker is shown answers a test question.
    """
    people = [p for p in profiles if p.qa]
    if len(people) < 2:
        raise DataError(f"the relearning attack's people split needs >= 2 forget people with QA (one half to "
                        f"train on, one to test); the forget set has {len(people)} (relearn.people=false skips it)")
    picked = set(np.random.default_rng(seed).permutation(len(people))[:len(people) // 2].tolist())
    return ([p for i, p in enumerate(people) if i in picked], [p for i, p in enumerate(people) if i not in picked])


def splits(profiles: list[Profile], settings: RelearnConfig) -> dict[str, tuple[list[Profile], list[Profile]]]:
    """{split kind: (attacker's profiles, held-out profiles)}: item always; people when relearn.people and the
    forget set has two people or more (a forget set of one person has no people split: its numbers are null)."""
    out = {"item": split_forget(profiles, settings.fraction, settings.seed)}
    if settings.people and sum(1 for p in profiles if p.qa) >= 2:
        out["people"] = split_people(profiles, settings.seed)
    return out


def cells(settings: RelearnConfig) -> list[tuple[float, int]]:
    """The attacker's (lr, steps) cells: the default (relearn.lr, relearn.steps) first, then the grid
    relearn.grid_lrs x relearn.grid_steps (empty: none), each cell once."""
    out = [(float(settings.lr), int(settings.steps))]
    for lr in settings.grid_lrs:
        for steps in settings.grid_steps:
            if (float(lr), int(steps)) not in out:
                out.append((float(lr), int(steps)))
    return out


def attack_model(model, processor, profiles: list[Profile], settings: RelearnConfig, *, eval_batch_size: int = 32,
                 log=lambda *_: None) -> dict:
    """The attack (settings: the relearn config section) on a loaded model, trained in place: call it last.

    The item split is attacked with every cell (the default one and the grid),
    the people split with the default cell; each attack starts from the model's
    weights as they came (kept on the CPU meanwhile when there is more than one).
    Returns numbers only: the default cell's before/after (acc_before, acc_after),
    the worst cell's (worst_acc_after, worst_lr, worst_steps: the first of the
    highest acc_after, so the default cell on a tie) and the people split's
    (people_acc_before, people_acc_after). with_recovery divides by the vanilla model's.
    """
    from pipeline.stage2.finetune import teach
    r = settings
    parts, grid = splits(profiles, r), cells(r)
    runs = [("item", cell) for cell in grid] + [("people", grid[0])] * ("people" in parts)
    if not r.lora:   # a merged adapter comes back frozen (peft is_trainable=False): the attacker trains everything
        for param in model.parameters():
            param.requires_grad_(True)
    kept = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if len(runs) > 1 else None
    before = {kind: held_out_accuracy(model, processor, held, eval_batch_size) for kind, (_, held) in parts.items()}
    after: dict[tuple[str, tuple[float, int]], tuple[float, float]] = {}
    for i, (kind, (lr, steps)) in enumerate(runs):
        if i:
            model.load_state_dict(kept)
        attacker, held_out = parts[kind]
        torch.manual_seed(r.seed)
        recipe = dataclasses.replace(attack_recipe(r), lr=lr, steps=steps)
        with torch.enable_grad():
            model, info = teach(model, processor, attacker, recipe, desc="relearn", log=log)
        after[kind, (lr, steps)] = (held_out_accuracy(model, processor, held_out, eval_batch_size),
                                    info["final_loss"])
    item = [(after["item", cell][0], -k, cell) for k, cell in enumerate(grid)]
    worst_acc, _, (worst_lr, worst_steps) = max(item)
    attacker, held_out = parts["item"]
    result = {"fraction": r.fraction, "steps": r.steps, "lr": r.lr, "seed": r.seed, "lora": r.lora,
              "n_attack_qa": _n_qa(attacker), "n_held_out_qa": _n_qa(held_out),
              "acc_before": before["item"], "acc_after": after["item", grid[0]][0],
              "final_loss": after["item", grid[0]][1], "n_cells": len(grid)}
    if len(grid) > 1:    # a worst case of one cell would repeat the default cell under another name
        result.update(worst_acc_after=worst_acc, worst_lr=worst_lr, worst_steps=worst_steps)
    if r.people:   # the same keys with or without a people split (NaN: none, a forget set of one person)
        attacker, held_out = parts.get("people", ([], []))
        nan = float("nan")
        result.update(n_attack_people=len(attacker), n_held_out_people=len(held_out),
                      n_people_attack_qa=_n_qa(attacker), n_people_held_out_qa=_n_qa(held_out),
                      people_acc_before=before.get("people", nan),
                      people_acc_after=after.get(("people", grid[0]), (nan,))[0])
    return result


def _n_qa(profiles: list[Profile]) -> int:
    return sum(len(p.qa) for p in profiles)


def reference_accuracy(model_dir, profiles: list[Profile], settings: RelearnConfig, key: str,
                       dtype: str = "auto", device: str = "auto", batch_size: int = 32) -> dict[str, float]:
    """{split kind: the vanilla model's accuracy on its held-out items}, computed once and kept beside the model.

    `key` names the data (root and split); each split's value is remembered under
    key|kind|fraction|seed (the people split has no fraction: key|people|seed), so
    splits never collide and every cell of the grid shares it (the vanilla model
    is not attacked: its accuracy does not depend on the cell). The model is
    loaded only when a value is missing, and once.
    """
    from pipeline.models.modeling import load_for_eval
    from pipeline.cache.filememo import remembered
    loaded: list = []
    out = {}
    for kind, (_, held_out) in splits(profiles, settings).items():
        memo = f"{key}|item|{settings.fraction}|{settings.seed}" if kind == "item" else f"{key}|people|{settings.seed}"

        def compute(held_out=held_out) -> float:
            if not loaded:
                loaded.extend(load_for_eval(model_dir, None, dtype, device))
            return held_out_accuracy(loaded[0], loaded[1], held_out, batch_size)
        out[kind] = float(remembered(Path(model_dir) / "relearn-reference.json", memo, compute))
    return out


def with_recovery(result: dict, acc_vanilla: float | dict) -> dict:
    """The attack's result with the vanilla accuracies and each recovery = acc_after / acc_vanilla (NaN: none).

    `acc_vanilla`: reference_accuracy's {split kind: accuracy}, or one number (the item split's).
    recovery (the default cell) and worst_recovery (the worst cell) are over the item
    split's vanilla accuracy, people_recovery over the people split's.
    """
    vanilla = acc_vanilla if isinstance(acc_vanilla, dict) else {"item": acc_vanilla}

    def ratio(acc, kind):
        return acc / vanilla[kind] if vanilla.get(kind) else float("nan")
    out = {**result, "acc_vanilla": vanilla["item"], "recovery": ratio(result["acc_after"], "item")}
    if "worst_acc_after" in result:
        out["worst_recovery"] = ratio(result["worst_acc_after"], "item")
    if "people_acc_after" in result:
        out.update(people_acc_vanilla=vanilla.get("people", float("nan")),
                   people_recovery=ratio(result["people_acc_after"], "people"))
    return out


def _percent(value, none: str = "n/a (the vanilla model knows none)") -> str:
    return none if value is None or value != value else f"{100 * value:.1f}%"


def format_attack(result: dict, label: str) -> str:
    """The attack's line(s): the default cell, the worst cell of the grid, the people split (when they ran)."""
    line = (f"{label}: relearned on {result['n_attack_qa']:g} forget QA ({100 * result['fraction']:g}%), "
            f"{result['steps']:g} steps; Forget ACC on the other {result['n_held_out_qa']:g}: "
            f"{100 * result['acc_before']:.1f}% -> {100 * result['acc_after']:.1f}% "
            f"(vanilla {_percent(result['acc_vanilla'], 'n/a')}, recovery {_percent(result['recovery'])})")
    if result.get("n_cells", 1) > 1:
        line += (f"\n  worst of {result['n_cells']:g} (lr, steps) cells: lr {result['worst_lr']:g}, "
                 f"{result['worst_steps']:g} steps: {_percent(result['worst_acc_after'], 'n/a')} "
                 f"(recovery {_percent(result.get('worst_recovery'))})")
    if result.get("n_attack_people") == 0:
        line += "\n  held-out people: n/a (the forget set has one person)"
    elif "people_acc_after" in result:
        line += (f"\n  held-out people: relearned on all {result['n_people_attack_qa']:g} QA of "
                 f"{result['n_attack_people']:g} forget people; Forget ACC on the other "
                 f"{result['n_held_out_people']:g} people's {result['n_people_held_out_qa']:g}: "
                 f"{100 * result['people_acc_before']:.1f}% -> {100 * result['people_acc_after']:.1f}% "
                 f"(vanilla {_percent(result.get('people_acc_vanilla'), 'n/a')}, "
                 f"recovery {_percent(result.get('people_recovery'))})")
    return line
