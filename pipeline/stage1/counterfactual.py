"""Textual counterfactuals (precompute.names swap): the reference is asked about a stranger, not the person.

ViKeR's reference swaps the picture: with an irrelevant image the frozen model
no longer knows who is meant, so its answer distribution says what it would
answer about anyone. A question that names the person ("Where was Pim Kester
born?") defeats this: the model answers from the name, whatever the picture,
and the reference keeps the forgotten fact. So where the question or the
answer names the forget person, each of the k reference pairs also replaces
the name with a stranger's: image j is paired with stranger j, both drawn per
sample with the seed of the image draw. The answer positions after the last
replaced token are the same tokens in both texts (" was born in Kassel."), and
there R is the average of the counterfactual pairs' distributions; the
positions up to and including the name keep the image-swapped R (the name in
the answer is copied from the question: not what is being forgotten, and a
stranger's name there would teach the model to misname people).

A person's name is the fact of their training QA that asks for it (a question
with the word "name" whose fact is the name, as MLLMU-Bench's and the
miniature benchmark's "What is the name of this person?"); a person without
one keeps the image-only reference, and stage one logs how many samples
were swapped. Every occurrence of the full name is replaced; a first name
alone is not.

Strangers come from `precompute.name_pool`: the built-in pool below
(invented names, none of them a benchmark's), the people of a split the model
never trained on (the miniature benchmark's Holdout_Set: strangers the model
has the same tokens for), or a text file with one name per line. A pool name
equal to a forget person's name is left out.
"""
from __future__ import annotations

import re
import zlib

import numpy as np

# Invented full names, spread over languages; none occurs in MLLMU-Bench, CLEAR or the miniature benchmark.
BUILTIN = ("Maren Oszto", "Teodor Halvik", "Ines Barkowa", "Jonah Quaresma", "Liesl Andrades", "Kofi Elmsworth",
           "Saoirse Vantini", "Dmitri Okonkwo", "Amara Lindqvist", "Tobiah Kerensky", "Yusra Delacorte",
           "Emeric Tanaka", "Noor Vasquella", "Casimir Odhiambo", "Freya Castellane", "Rasmus Ekwueme",
           "Leilani Szabo", "Benedek Moreau", "Ottilie Nakamura", "Caspian Adeyemi", "Marisol Heikkinen",
           "Anselm Okafor", "Brielle Janowski", "Idris Vellacott", "Henrike Salazar", "Tamsin Kowalczyk",
           "Olek Fairweather", "Zainab Ostrowski", "Ewald Nkemelu", "Perpetua Lindholm", "Matthias Quenby",
           "Sunniva Obradovic")

NAME_QUESTION = re.compile(r"\bname\b", re.IGNORECASE)


def person_names(samples) -> dict[str, str]:
    """profile id -> the person's name, from a training QA that asks for it (its fact)."""
    names: dict[str, str] = {}
    for s in samples:
        fact = (getattr(s, "fact", "") or "").strip()
        if fact and NAME_QUESTION.search(s.question) and s.profile_id not in names:
            names[s.profile_id] = fact
    return names


def stranger_pool(candidates, forget_names) -> list[str]:
    """The pool: distinct candidates, in order, without any forget person's name."""
    taken = {n.casefold() for n in forget_names}
    pool = [n for n in dict.fromkeys(c.strip() for c in candidates) if n and n.casefold() not in taken]
    return pool


def draw_strangers(sample_id: str, k: int, pool: list[str], seed: int) -> list[str]:
    """k strangers for one sample, one per reference image (distinct while the pool allows)."""
    if not pool:
        raise ValueError("the stranger name pool is empty")
    rng = np.random.default_rng([seed, zlib.crc32(sample_id.encode()), 1])
    picks = rng.choice(len(pool), size=k, replace=k > len(pool))
    return [pool[i] for i in picks]


def names_the_person(question: str, answer: str, name: str) -> bool:
    return bool(name) and (name in question or name in answer)


def swap_name(text: str, name: str, stranger: str) -> str:
    return text.replace(name, stranger)


def common_suffix(a, b) -> int:
    """How many trailing tokens two answers share."""
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n
