"""The probing attack (`viker attack probe`): ask the forget people's questions in ways the evaluation did not.

Forget ACC asks each forget question once, on the picture the unlearning
trained on, in the words it trained on. Unlearning that only learned to stay
silent on those exact inputs passes that test and still answers the same
question asked a little differently. Patil et al. ("Can sensitive information
be deleted from LLMs?", arXiv 2309.17410) recover deleted facts by rephrasing
the question; UnLOK-VQA (arXiv 2505.01456) carries such black-box attacks
to multimodal models, rephrasing the text, the picture or both, and finds the
multimodal ones stronger than text-only or image-only ones; MLLMU-Bench's
Test set (arXiv 2410.22108) holds the forget people on other pictures with
paraphrased questions for the same reason.

The probes (probe.probes), each a set of (picture, question, fact) items over
the forget people, scored by fact accuracy (factcheck: the greedy answer
contains the fact):

  - held_out: every training question of a forget person on each of the
    person's held-out portraits (the Test split's pictures of that person);
  - crop: the forget picture center-cropped to probe.crop of each side (0.8:
    80%), then resized back to its size (bicubic);
  - noise: the forget picture plus Gaussian noise of standard deviation
    probe.noise_sigma on the [0, 1] pixel scale, clipped and rounded back to 8
    bits; the noise is drawn from seed [probe.seed, crc32 of the picture's
    pixels]: the same picture gets the same noise for every model and every
    run;
  - flip: the forget picture mirrored left to right;
  - paraphrase: the Test split's paraphrased questions of the forget people
    (its Generation_Task), on the forget picture. A paraphrase's fact is the
    one of the person's training facts that its ground truth contains and its
    question does not (the question may name the person; the fact asked for is
    the one it does not give away); an item where not exactly one fact
    qualifies is left out and counted (n_skipped).
  - none (always measured, not a probe): the forget set as evaluation asks it.

Every probe changes one thing (the picture, or the words) and keeps the rest
as the training QA had it. All are deterministic.

recovery(probe) = acc(unlearned, probe) / acc(vanilla, probe): the vanilla
model asked the same way is the reference, so what a probe costs every model
(a crop that hides the face) is not counted as forgetting; change = acc(
unlearned, probe) - acc(unlearned, none). The gold model (trained without the
forget people) asked the same way is the control (gold_recovery). The
attack's summary is declared before any number is seen: the MEAN over the
probes asked of their recoveries (probes where recovery is undefined, a
vanilla model knowing none of its items or no items at all, are left out and
named), not the maximum. The best probe is an attacker's pick after seeing
the numbers, biased upward; the per-probe rows are reported for who wants it.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.config import DataConfig, ModelConfig, ProbeConfig
from pipeline.data.records import Profile
from pipeline.models.encoding import load_image

from .factcheck import items_accuracy, question_kind

PROBES = ("held_out", "crop", "noise", "flip", "paraphrase")
UNPROBED = "none"
NEEDS_TEST = ("held_out", "paraphrase")


# ------------------------------------------------------------------ pictures

def center_crop(image: Image.Image, keep: float) -> Image.Image:
    """The central `keep` of each side (at least one pixel), resized back to the picture's size (bicubic)."""
    if not 0 < keep <= 1:
        raise ValueError(f"probe.crop keeps a share of each side in (0, 1], got {keep}")
    w, h = image.size
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)


def gaussian_noise(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    """The picture plus N(0, sigma) per channel value on the [0, 1] scale, clipped, rounded to 8 bits.

    Seeded by [seed, crc32 of the pixels]: one picture always gets the same noise, two pictures different noise.
    """
    if not sigma > 0:
        raise ValueError(f"probe.noise_sigma must be > 0, got {sigma}")
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    rng = np.random.default_rng([int(seed), zlib.crc32(pixels.tobytes())])
    noisy = np.clip(pixels + rng.normal(0.0, sigma, pixels.shape), 0.0, 1.0)
    return Image.fromarray(np.round(noisy * 255.0).astype(np.uint8))


def perturb(image: Image.Image, probe: str, settings: ProbeConfig) -> Image.Image:
    """The forget picture as probe `probe` shows it (crop, noise, flip; none, paraphrase: unchanged)."""
    if probe == "crop":
        return center_crop(image, settings.crop)
    if probe == "noise":
        return gaussian_noise(image, settings.noise_sigma, settings.seed)
    if probe == "flip":
        return ImageOps.mirror(image)
    if probe in (UNPROBED, "paraphrase"):
        return image
    raise ValueError(f"probe {probe!r} does not change the picture (known: {', '.join(PROBES)})")


# ------------------------------------------------------------------ questions

def paraphrase_fact(question: str, ground_truth: str, facts: list[str]) -> str | None:
    """The fact a paraphrased question asks for: the one of `facts` in its ground truth and not in the question.

    None when not exactly one (distinct, case-insensitive) fact qualifies.
    """
    q, truth = question.lower(), ground_truth.lower()
    found = {f.strip().lower(): f.strip() for f in facts if f.strip() and f.strip().lower() in truth
             and f.strip().lower() not in q}
    return next(iter(found.values())) if len(found) == 1 else None


# ------------------------------------------------------------------ the items

def probe_items(probe: str, forget: list[Profile], test: list[Profile], settings: ProbeConfig) -> tuple[list, int]:
    """(items, skipped): probe `probe`'s (image, question, fact, kind) items over the forget people.

    `test`: the Test split's profiles (held_out, paraphrase); a forget person without one gives those probes
    nothing and counts one skipped item per question it would have asked; skipped also counts paraphrases
    whose fact is ambiguous (paraphrase_fact).
    """
    by_id = {p.id: p for p in test}
    items, skipped = [], 0
    for p in forget:
        if probe == "held_out":
            other = by_id.get(p.id)
            if other is None:
                skipped += len(p.qa)
                continue
            for j, data in enumerate(other.images or [other.image]):
                image = load_image(data, f"profile {p.id} held-out image {j}")
                items += [(image, qa.question, qa.fact or qa.answer, question_kind(qa.question)) for qa in p.qa]
        elif probe == "paraphrase":
            other = by_id.get(p.id)
            if other is None:
                skipped += len(p.qa)
                continue
            image = load_image(p.image, f"profile {p.id} image")
            facts = [qa.fact or qa.answer for qa in p.qa]
            for g in other.generation:
                fact = paraphrase_fact(g.question, g.ground_truth, facts)
                if fact is None:
                    skipped += 1
                else:
                    items.append((image, g.question, fact, question_kind(g.question)))
        else:
            image = perturb(load_image(p.image, f"profile {p.id} image"), probe, settings)
            items += [(image, qa.question, qa.fact or qa.answer, question_kind(qa.question)) for qa in p.qa]
    return items, skipped


def probes_of(settings: ProbeConfig) -> list[str]:
    """none first, then probe.probes in order, each once."""
    unknown = [p for p in settings.probes if p not in PROBES]
    if unknown:
        raise ValueError(f"unknown probe {unknown[0]!r} (known: {', '.join(PROBES)})")
    return list(dict.fromkeys([UNPROBED, *settings.probes]))


def probe_tag(probe: str, settings: ProbeConfig, test_split: str) -> str:
    """What a probe's numbers depend on beyond the forget set (the reference memo key's part)."""
    if probe == "crop":
        return f"crop{settings.crop}"
    if probe == "noise":
        return f"noise{settings.noise_sigma}|seed{settings.seed}"
    if probe in NEEDS_TEST:
        return f"{probe}|{test_split}"
    return probe


# ------------------------------------------------------------------ accuracies

def accuracies(model, processor, items: dict[str, list], batch_size: int = 32) -> dict[str, float]:
    """{probe: fact accuracy} of a loaded model (NaN for a probe without items)."""
    return {probe: float(items_accuracy(model, processor, these, batch_size=batch_size, desc=f"probe {probe}")["acc"])
            for probe, these in items.items()}


def reference_accuracies(model_dir, items: dict[str, list], tags: dict[str, str], data_key: str,
                         dtype: str = "auto", device: str = "auto", batch_size: int = 32) -> dict[str, float]:
    """accuracies() of a reference model (vanilla or gold), each kept beside it in probe-reference.json under
    data|probe's settings|weights' dtype; the model is loaded only when one is missing, and once."""
    from pipeline.cache.filememo import remembered
    from pipeline.models.modeling import load_for_eval, resolve_device, resolve_dtype
    weights = str(resolve_dtype(dtype, resolve_device(device))).replace("torch.", "")
    loaded: list = []
    out = {}
    for probe, these in items.items():
        if not these:
            out[probe] = math.nan
            continue

        def compute(these=these, probe=probe) -> float:
            if not loaded:
                loaded.extend(load_for_eval(model_dir, None, dtype, device))
            return float(items_accuracy(loaded[0], loaded[1], these, batch_size=batch_size,
                                        desc=f"probe reference {probe}")["acc"])
        out[probe] = float(remembered(Path(model_dir) / "probe-reference.json",
                                      f"{data_key}|{tags[probe]}|{weights}", compute))
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and not math.isnan(a) else math.nan


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def with_recovery(attacked: dict, vanilla: dict, gold: dict | None = None) -> tuple[dict, dict]:
    """(rows, summary). rows: {probe: acc, vanilla_acc, recovery = acc / vanilla_acc, change = acc - acc(none),
    gold_acc, gold_recovery}; summary: the means over the probes (none left out) whose recovery is defined."""
    rows = {}
    for probe, acc in attacked.items():
        row = {"acc": acc, "vanilla_acc": vanilla[probe], "recovery": _ratio(acc, vanilla[probe]),
               "change": acc - attacked[UNPROBED]}
        if gold is not None:
            row.update(gold_acc=gold[probe], gold_recovery=_ratio(gold[probe], vanilla[probe]))
        rows[probe] = row
    probed = [p for p in rows if p != UNPROBED]
    counted = [p for p in probed if not math.isnan(rows[p]["recovery"])]
    summary = {"mean_recovery": _mean([rows[p]["recovery"] for p in counted]),
               "mean_acc": _mean([rows[p]["acc"] for p in counted]),
               "mean_vanilla_acc": _mean([rows[p]["vanilla_acc"] for p in counted]),
               "probes_in_mean": counted, "probes_left_out": [p for p in probed if p not in counted]}
    if gold is not None:
        summary["mean_gold_recovery"] = _mean([rows[p]["gold_recovery"] for p in counted])
    return rows, summary


# ------------------------------------------------------------------ the attack

def attack(model: ModelConfig, data: DataConfig, settings: ProbeConfig, *, adapter=None, reference: str = "",
           gold: str = "", batch_size: int = 32) -> dict:
    """The attack (module doc) on model.path (+ `adapter`, merged) against `reference` (default: model.path).

    `gold` (empty: none) adds the control. Returns plain data: the settings, the item counts, per probe the
    accuracies and recoveries, and the summary. Bad data fails before any model loads.
    """
    import gc
    from pipeline.models.modeling import load_for_eval
    from .quantize import fact_sets
    probes = probes_of(settings)
    sets = fact_sets(data, ["forget", "test"] if any(p in NEEDS_TEST for p in probes) else ["forget"])
    forget = sets["forget"][0]
    test, test_split = (sets["test"][0], sets["test"][2]) if "test" in sets else ([], "")
    built = {p: probe_items(p, forget, test, settings) for p in probes}
    items = {p: these for p, (these, _) in built.items()}
    loaded, processor = load_for_eval(model.path, adapter, model.dtype, model.device)
    attacked = accuracies(loaded, processor, items, batch_size)
    del loaded
    gc.collect()
    key = f"{Path(data.root).resolve()}|{data.forget_split}|{data.benchmark}"
    tags = {p: probe_tag(p, settings, test_split) for p in probes}
    vanilla = reference_accuracies(reference or model.path, items, tags, key, model.dtype, model.device, batch_size)
    control = (reference_accuracies(gold, items, tags, key, model.dtype, model.device, batch_size) if gold else None)
    rows, summary = with_recovery(attacked, vanilla, control)
    for p, (these, skipped) in built.items():
        rows[p].update(n=len(these), n_skipped=skipped)
    return {"probes": probes, "crop": settings.crop, "noise_sigma": settings.noise_sigma, "seed": settings.seed,
            "test_split": test_split, "by_probe": rows, "summary": summary}


def _percent(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


def format_attack(result: dict, label: str) -> str:
    """The attack's table: one line per probe, the unprobed forget set first, then the declared mean."""
    rows, s = result["by_probe"], result["summary"]
    has_gold = any("gold_acc" in r for r in rows.values())
    head = (f"{label}: probing attack, fact accuracy on the forget people asked other ways (crop "
            f"{result['crop']:g}, noise sigma {result['noise_sigma']:g} seed {result['seed']}; recovery = accuracy "
            f"/ the vanilla model's under the same probe)")
    columns = ["probe", "n", "forget", "change", "vanilla", "recovery"] + (["gold", "gold rec."] if has_gold else [])
    table = [columns]
    for probe, r in rows.items():
        change = r["change"]
        line = [probe, f"{r['n']}" + (f" (+{r['n_skipped']} skipped)" if r["n_skipped"] else ""), _percent(r["acc"]),
                "-" if probe == UNPROBED else ("n/a" if change is None or change != change else
                                               f"{100 * change:+.1f} pts"),
                _percent(r["vanilla_acc"]), _percent(r["recovery"])]
        if has_gold:
            line += [_percent(r.get("gold_acc")), _percent(r.get("gold_recovery"))]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = [head] + ["  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w)
                                       in enumerate(zip(row, widths))).rstrip() for row in table]
    gold_text = f", gold {_percent(s['mean_gold_recovery'])}" if has_gold else ""
    left_out = f"; left out (recovery undefined): {', '.join(s['probes_left_out'])}" if s["probes_left_out"] else ""
    lines.append(f"  mean recovery over {len(s['probes_in_mean'])} probes (declared summary, not the best probe): "
                 f"{_percent(s['mean_recovery'])}{gold_text}{left_out}")
    return "\n".join(lines)
