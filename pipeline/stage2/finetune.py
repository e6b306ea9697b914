"""Knowledge injection (`viker finetune`): teach a base model the benchmark -> the *vanilla* model.

MLLMU-Bench fine-tunes LLaVA on its `ft_Data` before any unlearning; we do the
same with the training prompt (docs/DATA.md, Prompts). For the tiny model: full
fine-tuning on CPU, with a fresh image jitter every step so the model learns
people rather than pixels. For a real LLaVA: bf16 on a GPU, optionally LoRA
(merged into the saved weights, so the vanilla model is a plain checkpoint).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import FinetuneConfig
from pipeline.data.records import Profile
from pipeline.models.distributed import autocast as precision_autocast
from pipeline.models.encoding import encode_pair, load_image, max_positions, pad_right, pixel_values
from pipeline.models.forward import answer_logits, forward_inputs, make_text_batch
from pipeline.models.modeling import load_model, wrap_lora
from pipeline.models.prompts import generation_prompt, train_text
from pipeline.progress import progress as tqdm  # plain log lines off a terminal
from pipeline.schema import check_section


@dataclass
class Example:
    images: list[int]      # indices into the image bank: any of the person's training pictures
    ids: list[int]
    answer_start: int
    alt: tuple[list[int], int] | None = None   # the same QA in the generation prompt (formats=True)


def build_examples(processor, profiles: list[Profile], max_length: int | None, formats: bool = False):
    """Every training QA of every profile, paired with all of that profile's training pictures.

    With `formats`, each QA is also rendered in MLLMU-Bench's generation prompt
    (same answer, the instruction suffix added) and one of the two is drawn
    each time: a tiny model has no instruction tuning, so without this the
    suffix alone derails answers about facts it knows. It adds no facts and
    no examples. A real LLaVA does not need it.
    """
    eos = processor.tokenizer.eos_token_id
    bank, examples = [], []
    for p in profiles:
        first = len(bank)
        for k, b in enumerate(p.all_images):
            bank.append(load_image(b, f"profile {p.id} image {k}"))
        image_idx = list(range(first, len(bank)))
        for j, qa in enumerate(p.qa):
            where = f"profile {p.id} QA {j}"
            prompt, answer = train_text(qa.question, qa.answer)
            ids, start = encode_pair(processor, prompt, answer, where, max_length)
            alt = None
            if formats:
                alt_ids, alt_start = encode_pair(processor, generation_prompt(qa.question), answer, where, max_length)
                alt = (alt_ids + [eos], alt_start)
            examples.append(Example(image_idx, ids + [eos], start, alt))
    return bank, examples


def render(batch: list[Example], gen: torch.Generator) -> list[tuple[list[int], int]]:
    """(ids, answer_start) of each example, in one prompt form drawn for the whole batch.

    One form per batch, not per example: the generation prompt is ~15 tokens
    longer, and a batch mixing both forms pads every short row to the long one.
    """
    alt = batch[0].alt is not None and torch.rand(1, generator=gen).item() < 0.5
    return [ex.alt if alt else (ex.ids, ex.answer_start) for ex in batch]


def jitter(pixels: torch.Tensor, gen: torch.Generator, shift: int = 2, flip: bool = False) -> torch.Tensor:
    """Random shift (optionally flip) and brightness/contrast change, on normalised pixels.

    No flip by default: in a probe (60 people, 1500 steps) the unflipped run
    memorised every training picture while the flipped one lagged.
    """
    n, _, h, w = pixels.shape
    padded = F.pad(pixels, (shift, shift, shift, shift), mode="replicate")
    out = torch.empty_like(pixels)
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen)
    flips = (torch.rand(n, generator=gen) < 0.5) & flip
    for i in range(n):
        dy, dx = offsets[i].tolist()
        crop = padded[i, :, dy: dy + h, dx: dx + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    # Mild: skin and hair colours are identity traits, a strong colour jitter would erase them.
    gain = 1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    bias = 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    return out * gain + bias


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor: linear warm-up, then a cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def check_batches(processor, bank_pixels: torch.Tensor, examples: list[Example], size: int, seed: int,
                  batch_size: int = 64) -> list[tuple]:
    """A fixed subsample of the training QA as the vanilla gate asks them: training prompt, first picture, no jitter."""
    gen = torch.Generator().manual_seed(seed + 1)
    pick = sorted(torch.randperm(len(examples), generator=gen)[:size].tolist()) if size else range(len(examples))
    chosen = [examples[i] for i in pick]
    out = []
    for i in range(0, len(chosen), batch_size):
        part = chosen[i:i + batch_size]
        # The last id is EOS: greedy generation is cut at max_new_tokens anyway, the fact is in the answer.
        batch = make_text_batch([ex.ids[:-1] for ex in part], [ex.answer_start for ex in part],
                                processor.tokenizer.pad_token_id)
        out.append((batch, bank_pixels[[ex.images[0] for ex in part]]))
    return out


@torch.no_grad()
def fraction_known(model, batches: list[tuple]) -> float:
    """Teacher-forced: the share of answers whose every token is the model's argmax given the true prefix.

    Such an answer is exactly what greedy decoding writes, so this is a lower
    bound of the gate's "greedy answer contains the fact" at the cost of one
    forward pass (no generation loop).
    """
    was_training = model.training
    model.eval()
    dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    known = total = 0
    for batch, pixels in batches:
        batch = batch.to(dev)
        pred = answer_logits(model, batch, pixels.to(dev, dtype)).argmax(-1)
        ok = (pred == batch.answer_ids) | (batch.answer_mask == 0)
        known += int(ok.all(dim=1).sum())
        total += len(ok)
    model.train(was_training)
    return known / max(1, total)


def finetune(settings: FinetuneConfig, profiles: list[Profile], *, dtype: str = "auto", device: str = "auto",
             extra_info: dict | None = None, log=print, desc: str = "finetune") -> dict:
    """Fine-tune `settings.base` on the profiles' training QA and save the result to `settings.output`.

    `settings` is the finetune config section, passed whole: the model paths and
    the recipe `teach` follows (budget, schedule, stop rule). `dtype` and
    `device` are the model section's; `extra_info` is added to the saved
    vanilla.json. The profiles are chosen by the caller: jobs.runs.run_finetune
    applies finetune.exclude_split (finetune.gate_min_acc is the demo's gate,
    after this). A hand-built section is range-checked like a loaded one.
    """
    check_section("finetune", settings)
    torch.manual_seed(settings.seed)
    model, processor = load_model(settings.base, dtype=dtype, device=device)
    model, info = teach(model, processor, profiles, settings, desc=desc, log=log)
    info = {"base": str(settings.base), **info, **(extra_info or {})}
    save_model(model, processor, settings.output, info)
    return info


def teach(model, processor, profiles: list[Profile], recipe: FinetuneConfig, *, desc: str = "finetune",
          log=print) -> tuple[object, dict]:
    """The fine-tuning loop on a loaded model: knowledge injection, the gold model, the relearning attack.

    `recipe` is a finetune config section (the relearning attack builds its own,
    evaluation.relearn.attack_recipe); its base, output, gate_min_acc and
    exclude_split are not read here. The budget is `recipe.steps`, or with
    steps 0 `recipe.epochs` passes over the training QA; the learning rate
    follows a linear warm-up and a cosine over it. With `recipe.stop_known` > 0,
    every `check_every` steps a fixed subsample of `check_size` training
    questions is asked (fraction_known), and the run ends as soon as that share
    reaches `stop_known`.

    Returns (the trained model in eval mode, LoRA merged; the run's info).
    """
    steps, epochs, batch_size, lr, seed = recipe.steps, recipe.epochs, recipe.batch_size, recipe.lr, recipe.seed
    warmup_steps, weight_decay, max_grad_norm = recipe.warmup_steps, recipe.weight_decay, recipe.max_grad_norm
    augment, formats, lora, lora_r, lora_alpha = (recipe.augment, recipe.formats, recipe.lora, recipe.lora_r,
                                                  recipe.lora_alpha)
    stop_known, check_every, check_size = recipe.stop_known, recipe.check_every, recipe.check_size
    dev = next(model.parameters()).device
    bank, examples = build_examples(processor, profiles, max_positions(model), formats)
    bank_pixels = pixel_values(processor, bank)
    steps = steps or math.ceil(epochs * len(examples) / batch_size)
    checks = check_batches(processor, bank_pixels, examples, check_size, seed) if stop_known > 0 else []
    if lora:
        model = wrap_lora(model, r=lora_r, alpha=lora_alpha, dropout=0.0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    gen = torch.Generator().manual_seed(seed)
    pad_id = processor.tokenizer.pad_token_id
    autocast = precision_autocast(dev)   # bf16 on CUDA unless accelerate launch --mixed_precision says otherwise

    steps_run, why = steps, f"budget of {steps} steps used up"
    order: list[int] = []
    t0, losses, known = time.time(), [], []
    bar = tqdm(range(steps), desc=desc, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * warmup_cosine(step, warmup_steps, steps)
        while len(order) < batch_size:   # epochs of shuffled examples, so every fact is seen evenly
            order += torch.randperm(len(examples), generator=gen).tolist()
        batch = [examples[i] for i in order[:batch_size]]
        order = order[batch_size:]
        picks = [ex.images[int(torch.randint(len(ex.images), (1,), generator=gen))] for ex in batch]
        pixels = bank_pixels[picks]
        if augment:
            pixels = jitter(pixels, gen)
        rendered = render(batch, gen)
        ids, mask, labels = pad_right([r[0] for r in rendered], pad_id, [r[1] for r in rendered])
        with autocast:
            out = model(**forward_inputs(model, ids.to(dev), mask.to(dev),
                                         pixels.to(dev, next(model.parameters()).dtype)), labels=labels.to(dev))
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"fine-tuning loss became {out.loss.item()} at step {step}; lower finetune.lr")
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        done = step + 1
        if checks and done % check_every == 0 and done < steps:
            with autocast:
                known.append((done, fraction_known(model, checks)))
            if known[-1][1] >= stop_known:
                steps_run = done
                why = (f"{100 * known[-1][1]:.1f}% of {sum(len(b[0].input_ids) for b in checks)} checked "
                       f"answers known (target {100 * stop_known:.0f}%)")
                break
    elapsed = time.time() - t0
    log(f"[{desc}] stopped after {steps_run} of at most {steps} steps: {why}")

    if checks and (not known or known[-1][0] != steps_run):   # the budget ran out: one last look
        with autocast:
            known.append((steps_run, fraction_known(model, checks)))
    if lora:
        model = model.merge_and_unload()
    model.eval()
    info = {"steps": steps_run, "max_steps": steps, "stopped": why, "batch_size": batch_size,
            "lr": lr, "seed": seed, "augment": augment, "formats": formats, "lora": lora,
            "n_examples": len(examples), "n_profiles": len(profiles), "known_checks": known,
            "final_known": known[-1][1] if known else None, "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "train_seconds": round(elapsed, 1)}
    return model, info


def save_model(model, processor, output: str | Path, info: dict) -> Path:
    """Save to a temporary folder and rename, so a killed run never leaves a half-saved model."""
    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "vanilla.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
    return output
