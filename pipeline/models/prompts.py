"""Every prompt template, in one place (MLLMU-Bench's `eval.py` / `data_preprocess.py`).

The image always comes first. Stage one relies on that: the `USER: <image>`
prefix is identical for every question asked about one image, so its key/value
cache is computed once per reference image and reused (docs/DATA.md, Prompts).
"""
from __future__ import annotations

IMAGE_TOKEN = "<image>"
PREFIX = f"USER: {IMAGE_TOKEN}\n"

# Version of these templates: part of the stage-one cache fingerprint.
TEMPLATE_ID = "mllmu-v1"


def train_prompt(question: str) -> str:
    """Prompt part of a training example; the answer follows after one space."""
    return f"{PREFIX}{question}\nASSISTANT:"


def train_text(question: str, answer: str) -> tuple[str, str]:
    """(prompt, answer-with-leading-space): tokenise together, supervise the answer only."""
    return train_prompt(question), " " + answer.strip()


def multiple_choice_prompt(question: str, options: dict[str, str], shots: list[tuple[str, dict, str]] = ()) -> str:
    """MLLMU-Bench's multiple-choice prompt, optionally preceded by worked examples.

    Shots are text-only examples placed after the image so the image stays first.
    """
    def block(q, opts):
        lines = [q] + [f"{letter}: {opts[letter]}" for letter in sorted(opts)]
        lines.append("Just give ONE letter representing the answer directly.")
        return "\n".join(lines)

    body = ""
    for q, opts, letter in shots:
        body += block(q, opts) + f"\nAnswer: {letter}\n"
    return f"{PREFIX}{body}{block(question, options)}\nASSISTANT:"


def generation_prompt(question: str) -> str:
    return (f"{PREFIX}{question}\nAnswer the question based on your trained knowledge "
            f"in one sentence accurately in ENGLISH.\nASSISTANT:")


def cloze_prompt(question: str) -> str:
    return (f"{PREFIX}Fill in the blank: {question}\nAnswer with the missing words "
            f"only.\nASSISTANT:")


def fact_prompt(question: str) -> str:
    """The plain question prompt used to check that a fact is known (the training form)."""
    return train_prompt(question)
