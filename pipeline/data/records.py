"""One internal record type for a benchmark profile (a person) and its items.

Loaders turn MLLMU-Bench rows (and later CLEAR rows) into `Profile`s; every
stage downstream sees only these.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class QA:
    question: str
    answer: str
    fact: str = ""     # the attribute value the answer must contain (miniature benchmark's metadata)


@dataclass
class ChoiceItem:
    question: str
    options: dict[str, str]        # {"A": ..., "B": ..., "C": ..., "D": ...}
    correct: str                   # the letter
    kind: str                      # "image" (Image_Textual) | "text" (Pure_Text)


@dataclass
class GenItem:
    question: str
    ground_truth: str
    kind: str                      # "Image_Textual" | "Pure_Text"


@dataclass
class Profile:
    id: str
    image: bytes                   # PNG/JPEG bytes of the profile image
    biography: str = ""
    question: str = ""
    answer: str = ""
    qa: list[QA] = field(default_factory=list)               # training QA (MLLMU `metadata`)
    choices: list[ChoiceItem] = field(default_factory=list)
    generation: list[GenItem] = field(default_factory=list)
    cloze: list[GenItem] = field(default_factory=list)       # MLLMU `Mask_Task`; `__` marks the blank
    directory: str = ""
    images: list[bytes] = field(default_factory=list)        # Test_Set: other images of the person

    @property
    def all_images(self) -> list[bytes]:
        return [self.image] + list(self.images)


@dataclass
class Sample:
    """One (image, question, answer) triple: the unit of unlearning and of stage one."""
    sample_id: str
    profile_id: str
    image: bytes
    question: str
    answer: str
    fact: str = ""


@dataclass(frozen=True)
class Dropped:
    """A training item a reader left out for its content: a QA with an empty question or answer, a row with no QA.

    `id` names the item in the split's files: `<profile id>/metadata[<j>]` for the
    j-th metadata entry, or the profile id for a whole row. Not a sample id:
    forget sample ids number only the QA that were kept.
    """
    split: str
    id: str
    reason: str

    def as_dict(self) -> dict:
        return {"split": self.split, "id": self.id, "reason": self.reason}


DROPS_SHOWN = 3   # ids a drop line names


def describe_drops(dropped: list) -> str:
    """'1 forget_5 training item dropped for its content: mini-f000/metadata[2] (empty Answer)' (one line).

    `dropped`: Dropped records or their as_dict() form (as a cache manifest records them).
    """
    items = [d if isinstance(d, Dropped) else Dropped(**d) for d in dropped]
    splits = ", ".join(dict.fromkeys(d.split for d in items))
    shown = ", ".join(f"{d.id} ({d.reason})" for d in items[:DROPS_SHOWN])
    more = f" and {len(items) - DROPS_SHOWN} more" if len(items) > DROPS_SHOWN else ""
    return (f"{len(items)} {splits} training item{'' if len(items) == 1 else 's'} dropped for "
            f"{'its' if len(items) == 1 else 'their'} content: {shown}{more}")


def forget_samples(profiles: list[Profile]) -> list[Sample]:
    """The unlearning targets: each profile's training QA on its own image.

    Ids are stable across runs (profile id + position) so stage one's cache and
    stage two's batches can be joined by id.
    """
    samples = []
    for p in profiles:
        for j, qa in enumerate(p.qa):
            samples.append(Sample(f"{p.id}/{j}", p.id, p.image, qa.question, qa.answer, qa.fact))
    return samples
