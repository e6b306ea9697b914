"""One entry point for benchmark data: `data.benchmark` picks the reader, everything after sees `Profile`s.

    mllmu   MLLMU-Bench (HF `MLLMMU/MLLMU-Bench`) and the miniature benchmark, which shares its layout
    clear   CLEAR (HF `therem/CLEAR`)

`default_splits` gives the splits a benchmark pairs with a forget split, so a
config only has to name the forget split.
"""
from __future__ import annotations

import re
from pathlib import Path

from .clear import read_clear
from .mllmu import DataError, read_split, read_train_split
from .records import Dropped, Profile, describe_drops


BENCHMARKS = ("mllmu", "clear")


def check_benchmark(benchmark: str) -> str:
    name = str(benchmark).strip().lower()
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}; data.benchmark is one of: {', '.join(BENCHMARKS)}")
    return name


def read_profiles(root: str | Path, split: str, benchmark: str = "mllmu", check_images: bool = True, *,
                  train_root: str | Path = "", notes: list | None = None,
                  dropped: list | None = None) -> list[Profile]:
    """The profiles of one split (MLLMU-Bench) or config (CLEAR) under `root`.

    `split` may name several, comma-separated ("forget10,retain90"): their
    profiles are concatenated in that order, and must not share an id.
    `train_root` (MLLMU-Bench): read the split's training QA from that directory
    in the baseline_train_split layout instead (training stages only).
    `notes` collects one line per skipped entry; `dropped` a records.Dropped per
    training item left out for its content (an empty answer, a row without training
    QA; CLEAR refuses an empty caption instead, and skips text-only TOFU rows by design).
    """
    benchmark = check_benchmark(benchmark)
    names = [s.strip() for s in str(split).split(",") if s.strip()]
    if not names:
        raise DataError("no split named: data split settings must not be empty")
    profiles: list[Profile] = []
    for name in names:
        if benchmark == "clear":
            profiles += read_clear(root, name, check_images, notes)
        elif train_root:
            profiles += read_train_split(train_root, name, check_images, notes, dropped)
        else:
            profiles += read_split(root, name, check_images, notes, dropped)
    if len(names) > 1:
        seen: set[str] = set()
        for p in profiles:
            if p.id in seen:
                raise DataError(f"splits {split!r} share profile {p.id!r}: name each split once")
            seen.add(p.id)
    return profiles


def report_drops(dropped: list[Dropped], strict: bool, log, stage: str) -> list[dict]:
    """One log line naming what the reader dropped, or under data.strict a one-line refusal; the drops as dicts.

    Strict mode is for teams that must show every deletion request was processed:
    an item left out silently would be a request that was not.
    """
    if dropped:
        line = describe_drops(dropped)
        if strict:
            raise DataError(f"data.strict: {line}; fix the data, or run without --strict (data.strict=false)")
        if log is not None:
            log(f"[{stage}] {line} (--strict / data.strict=true refuses this)")
    return [d.as_dict() for d in dropped]


def default_splits(benchmark: str, forget_split: str) -> dict[str, str]:
    """{"retain", "test", "real"} split names paired with `forget_split`.

    MLLMU-Bench: forget_N -> retain_(100-N), Test_Set, Retain_Set.
    CLEAR:       forgetNN -> retain(100-NN), forgetNN_perturbed (its paraphrased /
                 perturbed captions: CLEAR has no other-images test set), real_faces.
    """
    if check_benchmark(benchmark) == "clear":
        match = re.fullmatch(r"forget(\d{2})", forget_split)
        if not match:
            raise DataError(f"CLEAR forget split {forget_split!r} is not forget01/forget05/forget10; "
                            f"set data.retain_split explicitly")
        return {"retain": f"retain{100 - int(match.group(1)):02d}", "test": f"{forget_split}_perturbed",
                "real": "real_faces"}
    match = re.fullmatch(r"forget_(\d+)", forget_split)
    if not match:
        raise DataError(f"MLLMU-Bench forget split {forget_split!r} is not forget_5/10/15; set data.retain_split")
    return {"retain": f"retain_{100 - int(match.group(1))}", "test": "Test_Set", "real": "Retain_Set"}
