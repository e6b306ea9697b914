"""Does the model know the facts? Greedy answers to the training questions, checked for the fact.

This is the vanilla gate (unlearning a model that never knew the facts proves
nothing) and the `fact_acc` metric of evaluation. A fact counts as known when
the greedy answer contains it (case-insensitive); benchmarks without a `Fact`
field fall back to the whole reference answer.
"""
from __future__ import annotations

from pipeline.data.records import Profile
from pipeline.models.encoding import load_image
from pipeline.models.generation import generate
from pipeline.models.prompts import fact_prompt


def fact_items(profiles: list[Profile], held_out: bool = False):
    """(image, question, fact, kind) for every training QA; held_out uses each person's other images."""
    items = []
    for p in profiles:
        pictures = p.images if held_out else [p.image]
        for b in pictures:
            image = load_image(b, f"profile {p.id}")
            for qa in p.qa:
                items.append((image, qa.question, qa.fact or qa.answer, question_kind(qa.question)))
    return items


def question_kind(question: str) -> str:
    """image: the question needs the picture ("this person"); text: it names the person."""
    return "image" if "this person" in question.lower() else "text"


def fact_count(profiles: list[Profile], held_out: bool = False) -> int:
    """How many items fact_accuracy asks: fact_items' count, without decoding a picture."""
    return sum(len(p.images if held_out else [p.image]) * len(p.qa) for p in profiles)


# Enough for a name, a place, a year or a job, with a few words around it.
FACT_NEW_TOKENS = 16


def fact_accuracy(model, processor, profiles: list[Profile], held_out: bool = False,
                  batch_size: int = 64, max_new_tokens: int = FACT_NEW_TOKENS, desc: str | None = None) -> dict:
    return items_accuracy(model, processor, fact_items(profiles, held_out), batch_size, max_new_tokens, desc)


def items_accuracy(model, processor, items: list[tuple], batch_size: int = 64,
                   max_new_tokens: int = FACT_NEW_TOKENS, desc: str | None = None) -> dict:
    """fact_accuracy of (image, question, fact, kind) items (fact_items' form; an attack may build its own)."""
    if not items:
        return {"n": 0, "acc": float("nan")}
    answers = generate(model, processor, [i[0] for i in items], [fact_prompt(i[1]) for i in items],
                       max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
    return score_facts(items, answers)


def score_facts(items: list[tuple], answers: list[str]) -> dict:
    """fact_accuracy's result for fact_items' items and their greedy answers (to fact_prompt, in item order)."""
    if not items:
        return {"n": 0, "acc": float("nan")}
    hits = [fact.lower() in ans.lower() for (_, _, fact, _), ans in zip(items, answers)]
    by_kind = {}
    for kind in ("image", "text"):
        sel = [h for h, it in zip(hits, items) if it[3] == kind]
        if sel:
            by_kind[f"acc_{kind}"] = sum(sel) / len(sel)
    return {"n": len(hits), "acc": sum(hits) / len(hits), **by_kind,
            "examples": [{"question": it[1], "fact": it[2], "answer": a} for it, a in list(zip(items, answers))[:3]]}
