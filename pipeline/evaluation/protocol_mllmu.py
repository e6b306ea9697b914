"""MLLMU-Bench's official evaluation protocol (evaluate.protocol: official), as its authors' eval.py runs it.

Every rule here is read from franciscoliu/MLLMU-Bench `eval.py` at commit 0e3098e
(function and line named next to each); docs/REAL_BENCHMARKS.md lists them against
viker's own protocol.

    multiple choice   evaluate_classification: few-shot = ALL questions of ONE random profile
                      (random.sample(id_list, 1), its rows read from Full_Set), Image_Textual
                      shots with that profile's image, Pure_Text shots and items text-only
                      (tokenizer, no image); shots only for forget / retain / test (none for
                      the real set); the shot profile's own questions are not scored; 50 new
                      tokens (:372, :428); the answer letter is the first character of the
                      reply, upper-cased, and counts only if it is an option letter (:375-376).
    cloze             evaluate_fill_in_the_blank: `__` -> `[Blank]` plus the authors'
                      instruction; shots = every Mask_Task item of TWO random profiles (llava),
                      Image_Textual with images, Pure_Text without, in the few-shot file's row
                      order (:513-515); correct when the ground truth is a case-insensitive
                      substring of the reply cut at a second "ASSISTANT:" (:626-631).
    generation        evaluate_generation: no shots; Image_Textual with the image, Pure_Text
                      text-only with its own wording; the reply cut as cloze's (:758-763); ROUGE
                      F1 (stemmer) and NLTK BLEU, smoothing method1 (compute_bleu, :57-78).
    Test_Set          random.choice(row["images"]) per row and task; here seeded, or every
                      image (test_images="all").

Image_Textual and Pure_Text results are reported apart (`*_image`, `*_text`); the
pooled keys stay empty (None) because the paper never averages the two. Random
draws use `random.Random(seed)` (the authors' code is unseeded). eval.py runs all
three tasks; `tasks` leaves some out (each task draws its own shots and pictures
from its own generator, so the others are asked exactly as in a full run).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from pipeline.data.mllmu import DataError
from pipeline.data.records import Profile
from pipeline.models.encoding import encode_prompt, load_image, pad_left, pixel_values
from pipeline.models.families import generation_inputs

from . import metrics


# v2: shots in the few-shot file's row order, replies cut at a second "ASSISTANT:", 50 new tokens for MC
# (eval.py's); v1 rows score differently and must not be pooled with v2 rows.
PROTOCOL_ID = "mllmu-official-v2"
MC_SHOT_PROFILES = 1        # eval.py evaluate_classification: random.sample(id_list, 1)
CLOZE_SHOT_PROFILES = 2     # eval.py evaluate_fill_in_the_blank: random.sample(id_list, 2) for llava
# eval.py: `mode in ["forget", "retain_shared", "test"]` for MC; cloze adds retain_celebrity.
MC_SHOT_SETS = ("forget", "retain", "test")
CLOZE_SHOT_SETS = ("forget", "retain", "test", "real")
MC_INSTRUCTION = "Just give ONE letter representing the answer directly."
CLOZE_INSTRUCTION = "\nPlease **ONLY** provide the correct answer that should replace the [Blank]."
GEN_IMAGE_SUFFIX = "Answer the question based on your trained knowledge in one sentence accurately in ENGLISH."
GEN_TEXT_SUFFIX = "Answer the question based on your trained knowledge in one sentence in ENGLISH."
# eval.py evaluate_classification: max_new_tokens=50 for llava, Image_Textual (:372) and Pure_Text (:428)
# alike. Only the first character is read, but it is read after .strip(), so a reply that opens with
# blank lines finds its letter only as far as the budget reaches: the budget is the authors'.
MC_NEW_TOKENS = 50
TASKS = ("mc", "cloze", "gen")      # eval.py's three tasks (evaluate.tasks; fact is viker's own)
TURN = "ASSISTANT:"
# What the official rows' BLEU is (metrics.bleu_official), checked against eval.py compute_bleu (:57-78):
# the same call on the same tokens. NLTK comes with rouge-score (a dependency), not declared by viker.
BLEU_NOTE = (
    "BLEU (protocol official) is MLLMU-Bench's: NLTK sentence_bleu, BLEU-4 with uniform weights, "
    "whitespace tokens, SmoothingFunction().method1 (eval.py compute_bleu; metrics.bleu_official), "
    "on the reply cut at a second 'ASSISTANT:': the authors' value. They pin nltk 3.9.1, whose "
    "bleu_score.py computes as 3.10's. viker's own sacrebleu BLEU (protocol viker) is not used in these rows."
)
TYPES = {"image": "Image_Textual", "text": "Pure_Text"}
OFFICIAL_METRIC_KEYS = tuple(f"{m}_{t}" for m in ("mc_acc", "cloze_acc", "rouge1", "rouge2", "rougeL", "bleu")
                             for t in ("image", "text"))


@dataclass
class Item:
    """One prompt the official protocol asks: its images are in the order of its <image> tokens."""
    task: str                      # mc | cloze | gen
    kind: str                      # image | text
    profile: str
    question: str
    reference: str                 # the correct letter (mc) or the ground truth
    prompt: str
    images: list = field(default_factory=list)     # image bytes, one per <image> in `prompt`
    options: dict = field(default_factory=dict)


# ------------------------------------------------------------------ prompts (eval.py, verbatim shapes)

def _options_text(options: dict[str, str]) -> str:
    # formulate_prompt_with_options: "\n".join(f"{key}: {value}") in the Options' own order.
    return "\n".join(f"{k}: {v}" for k, v in options.items())


def mc_prompt(question: str, options: dict[str, str], kind: str, shots=()) -> str:
    """evaluate_classification's prompt; `shots` are (question, options, letter) of the shot profile."""
    head = "USER: <image>\n" if kind == "image" else "USER:\n"
    body = ""
    for q, opts, letter in shots:
        # The shots always list A..D (eval.py indexes few_shot_options['A'] .. ['D']).
        body += head + f"Question: {q}\n" + "".join(f"{k}: {opts.get(k, '')}\n" for k in "ABCD")
        body += f"Correct Answer: {letter}\n"
    return f"{body}{head}{question}\n{_options_text(options)}\n{MC_INSTRUCTION}\nASSISTANT:"


def cloze_question(question: str) -> str:
    return question.replace("__", "[Blank]") + CLOZE_INSTRUCTION


def cloze_prompt(question: str, kind: str, shots=()) -> str:
    """evaluate_fill_in_the_blank's prompt; `shots` are (question, ground truth) of the same kind."""
    body = ""
    for q, answer in shots:
        # The shot header has no space before <image> (eval.py), unlike the item's own header.
        body += "USER:<image>\n" if kind == "image" else "USER:\n"
        body += f"{cloze_question(q)}\nCorrect Answer: {answer}\n"
    head = "USER: <image>\n" if kind == "image" else "USER:\n"
    return f"{body}{head}{cloze_question(question)}\nASSISTANT:"


def generation_prompt(question: str, kind: str) -> str:
    """evaluate_generation's prompt (note the trailing space after ASSISTANT: on image items)."""
    if kind == "image":
        return f"USER: <image>\n{question}\n{GEN_IMAGE_SUFFIX}\nASSISTANT: "
    return f"USER: {question}\n{GEN_TEXT_SUFFIX}\nASSISTANT:"


def official_reply(reply: str) -> str:
    """The part of a generated reply that eval.py scores: up to a second turn, stripped.

    eval.py decodes the prompt and the reply together (`processor.decode(outputs[0][2:])`)
    and keeps `generated_text.split("ASSISTANT:")[1].strip()`: MC :375 and :431, cloze
    :626-627, generation :758-759. Every prompt built here holds "ASSISTANT:" once, at its
    end (the shots end with "Correct Answer: ..", not a turn), so [1] is the reply up to
    its own first "ASSISTANT:". Their `elif "Answer:"` branches (cloze :628, generation
    :760) never run for LLaVA: the decoded prompt always contains "ASSISTANT:".
    """
    return reply.split(TURN)[0].strip()


def parse_first_letter(answer: str, options) -> str | None:
    """eval.py :375-376: the reply's first character, upper-cased, if it is an option letter; else None."""
    letter = official_reply(answer)[:1].upper()
    return letter if letter and letter in options else None


def cloze_correct(answer: str, ground_truth: str) -> bool:
    return ground_truth.lower() in answer.lower()


# ------------------------------------------------------------------ few-shot and images

def shot_profiles(ids: list[str], source: dict[str, Profile], n: int, rng: random.Random) -> list[Profile]:
    """random.sample(ids, n), in the few-shot split's row order; ids not found there give no shots.

    eval.py draws the ids (:265, :503) but builds the shots by filtering the few-shot file,
    `few_shot_df[few_shot_df['ID'].isin(selected_ids)].iterrows()` (:275-277, :513-515): the
    shots follow the file's rows, not the draw. `source` is {id: profile} in that row order
    (evaluate.official_shot_source).
    """
    chosen = set(rng.sample(ids, min(n, len(ids))))
    return [p for pid, p in source.items() if pid in chosen]


def item_images(p: Profile, use_other_images: bool, test_images: str, rng: random.Random) -> list[bytes]:
    """The picture(s) an item of `p` is asked with: its own, or (Test_Set) one drawn at random / all."""
    if not use_other_images:
        return [p.image]
    if not p.images:
        raise DataError(f"profile {p.id} has no other images (`images`), needed for the test set")
    return list(p.images) if test_images == "all" else [rng.choice(p.images)]


def build_items(profiles: list[Profile], set_name: str, source: dict[str, Profile], *, use_other_images: bool,
                seed: int = 0, test_images: str = "random", tasks=TASKS) -> list[Item]:
    """Every official prompt of one set, in the authors' order (cloze, multiple choice, generation per set).

    `tasks` (of TASKS; others are ignored) leaves tasks out: each task draws from its own
    generator (_rng), so the ones kept get the same shots and pictures as in a full run.
    """
    if test_images not in ("random", "all"):
        raise DataError(f"evaluate.test_images is random or all, not {test_images!r}")
    ids = [p.id for p in profiles]
    items = []
    if "cloze" in tasks:
        items += _cloze_items(profiles, set_name, source, ids, use_other_images, seed, test_images)
    if "mc" in tasks:
        items += _mc_items(profiles, set_name, source, ids, use_other_images, seed, test_images)
    if "gen" in tasks:
        items += _gen_items(profiles, use_other_images, seed, test_images)
    return items


def _rng(seed: int, set_name: str, task: str) -> random.Random:
    return random.Random(f"{seed}:{set_name}:{task}")


def _mc_items(profiles, set_name, source, ids, use_other, seed, test_images) -> list[Item]:
    rng = _rng(seed, set_name, "mc")
    shots = shot_profiles(ids, source, MC_SHOT_PROFILES, rng)
    shot_ids = {s.id for s in shots}
    with_shots = set_name in MC_SHOT_SETS
    by_kind = {kind: [(c, s.image) for s in shots for c in s.choices if c.kind == kind] for kind in TYPES}
    items = []
    for p in profiles:
        images = item_images(p, use_other, test_images, rng)
        if p.id in shot_ids:        # its questions are the shots: not scored (eval.py few_shot_question_indices)
            continue
        for kind in ("image", "text"):
            used = by_kind[kind] if with_shots else []
            shot_text = [(c.question, c.options, c.correct) for c, _ in used]
            for c in (c for c in p.choices if c.kind == kind):
                for img in _per_picture(images, kind):
                    extra = [im for _, im in used] + [img] if kind == "image" else []
                    items.append(Item("mc", kind, p.id, c.question, c.correct,
                                      mc_prompt(c.question, c.options, kind, shot_text), extra, dict(c.options)))
    return items


def _cloze_items(profiles, set_name, source, ids, use_other, seed, test_images) -> list[Item]:
    rng = _rng(seed, set_name, "cloze")
    shots = shot_profiles(ids, source, CLOZE_SHOT_PROFILES, rng)
    shot_ids = {s.id for s in shots}
    with_shots = set_name in CLOZE_SHOT_SETS
    by_kind = {kind: [(g, s.image) for s in shots for g in s.cloze if _kind(g.kind) == kind] for kind in TYPES}
    items = []
    for p in profiles:
        images = item_images(p, use_other, test_images, rng)
        if p.id in shot_ids:
            continue
        for g in p.cloze:
            kind = _kind(g.kind)
            used = by_kind[kind] if with_shots else []
            prompt = cloze_prompt(g.question, kind, [(s.question, s.ground_truth) for s, _ in used])
            for img in _per_picture(images, kind):
                extra = [im for _, im in used] + [img] if kind == "image" else []
                items.append(Item("cloze", kind, p.id, g.question, g.ground_truth, prompt, extra))
    return items


def _gen_items(profiles, use_other, seed, test_images) -> list[Item]:
    rng = _rng(seed, "", "gen")
    items = []
    for p in profiles:
        images = item_images(p, use_other, test_images, rng)
        for g in p.generation:
            kind = _kind(g.kind)
            for img in _per_picture(images, kind):
                items.append(Item("gen", kind, p.id, g.question, g.ground_truth, generation_prompt(g.question, kind),
                                  [img] if kind == "image" else []))
    return items


def _per_picture(images: list[bytes], kind: str) -> list[bytes]:
    # A text-only item is asked once whatever the pictures (test_images=all asks image items once per picture).
    return images if kind == "image" else images[:1]


def _kind(item_type: str) -> str:
    """Mask_Task / Generation_Task `Type`: Pure_Text is text-only; anything else is asked with the image."""
    return "text" if item_type.strip().lower().replace("-", "_") == "pure_text" else "image"


# ------------------------------------------------------------------ running and scoring

@torch.no_grad()
def generate_items(model, processor, items: list[Item], max_new_tokens: int, batch_size: int = 16,
                   desc: str | None = None) -> list[str]:
    """Greedy replies for items with any number of images (none: text-only, as the authors' tokenizer path).

    The pixel values of a batch are its items' images in prompt order: LLaVA fills
    the <image> placeholders of the batch in that order.
    """
    tok = processor.tokenizer
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out: list[str] = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=True if desc is None else None,
                      leave=False):
        chunk = items[start: start + batch_size]
        ids, mask = pad_left([encode_prompt(processor, it.prompt) for it in chunk], tok.pad_token_id)
        pictures = [load_image(b, f"profile {it.profile}") for it in chunk for b in it.images]
        ids = ids.to(device)
        kwargs = generation_inputs(model, ids, pixel_values(processor, pictures).to(device, dtype) if pictures else None)
        gen = model.generate(input_ids=ids, attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, **kwargs)
        out.extend(t.strip() for t in tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True))
    return out


def score_items(items: list[Item], answers: list[str]) -> list[dict]:
    """Per-item scores by the authors' rules, on the reply as eval.py keeps it (official_reply).

    A row's `answer` is that scored text; `reply`, the whole generated reply, is added
    when the cut changed it.
    """
    rows = []
    for it, reply in zip(items, answers):
        answer = official_reply(reply)
        if it.task == "mc":
            letter = parse_first_letter(reply, it.options)
            scores = {"parsed": letter, "correct": letter == it.reference}
        elif it.task == "cloze":
            scores = {"correct": cloze_correct(answer, it.reference)}
        else:
            scores = {**metrics.rouge_scores(answer, it.reference), "bleu": metrics.bleu_official(answer, it.reference)}
        row = {"profile": it.profile, "kind": it.task, "type": it.kind, "question": it.question,
               "reference": it.reference, "answer": answer, "scores": scores, "n_images": len(it.images)}
        if answer != reply:
            row["reply"] = reply
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    """{mc_acc_image, mc_acc_text, cloze_acc_*, rouge*_*, bleu_*}: means per task and type (None when empty)."""
    out = {}
    for kind in TYPES:
        for task, key, score in (("mc", "mc_acc", "correct"), ("cloze", "cloze_acc", "correct"),
                                 ("gen", "rouge1", "rouge1"), ("gen", "rouge2", "rouge2"),
                                 ("gen", "rougeL", "rougeL"), ("gen", "bleu", "bleu")):
            values = [float(r["scores"][score]) for r in rows if r["kind"] == task and r["type"] == kind]
            out[f"{key}_{kind}"] = sum(values) / len(values) if values else None
    return out


def item_counts(profiles: list[Profile], rows: list[dict]) -> dict[str, int]:
    """n_items of an official row: the set's profiles (after max_profiles) and, per task, the items scored.

    Scored items are the per-sample rows: the shot profiles' questions are not among them,
    and with test_images=all an image item counts once per picture asked.
    """
    return {"profiles": len(profiles), **{task: sum(r["kind"] == task for r in rows) for task in ("mc", "gen", "cloze")}}


def evaluate_official(model, processor, profiles: list[Profile], set_name: str, source: dict[str, Profile], *,
                      use_other_images: bool, seed: int = 0, test_images: str = "random", max_new_tokens: int = 50,
                      batch_size: int = 16, tasks=TASKS) -> tuple[dict, list[dict]]:
    """(metrics, per-sample rows) of one set by the official protocol; tasks not in `tasks` stay None."""
    if not profiles:
        raise DataError(f"set '{set_name}' has no profiles")
    items = build_items(profiles, set_name, source, use_other_images=use_other_images, seed=seed,
                        test_images=test_images, tasks=tasks)
    rows = []
    for task, tokens in (("cloze", max_new_tokens), ("mc", MC_NEW_TOKENS), ("gen", max_new_tokens)):
        chosen = [it for it in items if it.task == task]
        answers = generate_items(model, processor, chosen, tokens, batch_size, desc=f"{set_name} {task} (official)")
        rows += score_items(chosen, answers)
    for r in rows:
        r["set"] = set_name
    return summarise(rows), rows
