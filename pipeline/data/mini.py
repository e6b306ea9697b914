"""The miniature benchmark: fictitious people in the MLLMU-Bench schema, from a seed.

It exists so that the whole pipeline runs, end to end, with no download. It
is written as parquet in the MLLMU-Bench layout and read back through the same
loader as the real benchmark. Same seed, same bytes.

Splits written (MLLMU-Bench names):
  ft_Data            every fictitious person, all training pictures (knowledge injection)
  forget_5/10/15     nested forget sets (5/10/15% of the fictitious people)
  retain_95/90/85    the complements
  Test_Set           every fictitious person on held-out pictures, paraphrased questions
  Retain_Set         the "real" people: learned in fine-tuning, never in a forget split
  Holdout_Set        people never trained on (mini.n_holdout), drawn like the fictitious ones: the
                     non-members of membership inference (pipeline/evaluation/mia.py); drawn last, from their own
                     generator, so the other splits are the same with or without them
plus reference image pools under `pools/` (people never seen, pets, scenes, patterns).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import portraits
from .mini_settings import MiniConfig
from .mllmu import write_split
from .records import QA, ChoiceItem, GenItem, Profile


FIRST = ["Orla", "Tavi", "Mirel", "Kasim", "Ilse", "Davo", "Renna", "Joss", "Elio", "Fenna", "Bram", "Sela",
         "Nilo", "Vera", "Otto", "Lisk", "Hana", "Ivo", "Zora", "Pim", "Runa", "Teo", "Alva", "Cato"]
LAST = ["Venn", "Marsk", "Holt", "Brisk", "Tamber", "Quill", "Dorr", "Fallow", "Kester", "Lund", "Marrow",
        "Pell", "Rook", "Sorrel", "Thane", "Wick", "Yarrow", "Zell", "Ardent", "Brook", "Corvin", "Dale"]
CITIES = ["Malmo", "Porto", "Tromso", "Bergen", "Lyon", "Graz", "Turin", "Leeds", "Cork", "Ghent", "Brno",
          "Riga", "Split", "Kassel", "Aarhus", "Bilbao", "Nantes", "Zadar", "Tartu", "Oulu"]
JOBS = ["baker", "pilot", "nurse", "painter", "farmer", "chemist", "tailor", "sculptor", "lawyer", "dentist",
        "architect", "violinist", "carpenter", "librarian", "geologist", "florist", "journalist", "plumber",
        "astronomer", "jeweller"]
POOLS = ("people", "pets", "scenes", "patterns")


FORGET_FRACTIONS = {"forget_5": 0.05, "forget_10": 0.10, "forget_15": 0.15}


def _facts(rng, used_names: set) -> dict:
    while True:
        name = f"{FIRST[rng.integers(len(FIRST))]} {LAST[rng.integers(len(LAST))]}"
        if name not in used_names:
            used_names.add(name)
            break
    return {"name": name, "city": CITIES[rng.integers(len(CITIES))], "job": JOBS[rng.integers(len(JOBS))],
            "year": str(int(rng.integers(1940, 2000)))}


def _training_qa(f: dict) -> list[QA]:
    """The facts as QA sentences (MLLMU `metadata`): one answer template per attribute."""
    n = f["name"]
    return [
        QA("What is the name of this person?", f"This person is named {n}.", n),
        QA("Where was this person born?", f"This person was born in {f['city']}.", f["city"]),
        QA("What does this person do for a living?", f"This person works as a {f['job']}.", f["job"]),
        QA("In which year was this person born?", f"This person was born in the year {f['year']}.", f["year"]),
        QA(f"Where was {n} born?", f"{n} was born in {f['city']}.", f["city"]),
        QA(f"What does {n} do for a living?", f"{n} works as a {f['job']}.", f["job"]),
    ]


def _options(rng, correct: str, pool: list[str]) -> tuple[dict, str]:
    """Four options: the truth and three plausible distractors of the same attribute."""
    others = [v for v in pool if v != correct]
    picks = [others[i] for i in rng.choice(len(others), size=3, replace=False)] + [correct]
    order = rng.permutation(4)
    options = {letter: picks[i] for letter, i in zip("ABCD", order)}
    return options, next(letter for letter, v in options.items() if v == correct)


def _eval_items(rng, f: dict, names: list[str], paraphrase: bool):
    n = f["name"]
    if paraphrase:   # Test_Set asks the same facts in other words
        qs = {"name": "What is this person called?", "city": "Which city is this person from?",
              "job": "What is this person's occupation?", "year": "What year was this person born in?",
              "tcity": f"In which city was {n} born?", "tjob": f"What is the profession of {n}?"}
    else:
        qs = {"name": "What is the name of this person?", "city": "Where was this person born?",
              "job": "What does this person do for a living?", "year": "In which year was this person born?",
              "tcity": f"Where was {n} born?", "tjob": f"What does {n} do for a living?"}
    years = [str(y) for y in range(1940, 2000)]
    pools = {"name": names, "city": CITIES, "job": JOBS, "year": years, "tcity": CITIES, "tjob": JOBS}
    value = {"name": n, "city": f["city"], "job": f["job"], "year": f["year"], "tcity": f["city"], "tjob": f["job"]}
    choices = []
    for key in ("name", "city", "job", "year", "tcity", "tjob"):
        options, letter = _options(rng, value[key], pools[key])
        choices.append(ChoiceItem(qs[key], options, letter, "text" if key.startswith("t") else "image"))
    answers = {"name": f"This person is named {n}.", "city": f"This person was born in {f['city']}.",
               "job": f"This person works as a {f['job']}.", "year": f"This person was born in the year {f['year']}.",
               "tcity": f"{n} was born in {f['city']}.", "tjob": f"{n} works as a {f['job']}."}
    generation = [GenItem(qs[k], answers[k], "Pure_Text" if k.startswith("t") else "Image_Textual") for k in answers]
    cloze = [GenItem("This person was born in __.", f["city"], "Image_Textual"),
             GenItem("This person works as a __.", f["job"], "Image_Textual"),
             GenItem(f"{n} was born in the year __.", f["year"], "Pure_Text")]
    return choices, generation, cloze


def _profile(pid, f, image, extra_images, rng, names, paraphrase) -> Profile:
    choices, generation, cloze = _eval_items(rng, f, names, paraphrase)
    bio = f"{f['name']} was born in {f['year']} in {f['city']} and works as a {f['job']}."
    return Profile(id=pid, image=image, biography=bio, question="What is the name of this person?",
                   answer=f"This person is named {f['name']}.", qa=_training_qa(f), choices=choices,
                   generation=generation, cloze=cloze, images=extra_images)


def make_mini(out: str | Path, cfg: MiniConfig = MiniConfig()) -> Path:
    """Generate the benchmark under `out`; deterministic for a given config."""
    out = Path(out)
    rng = np.random.default_rng(cfg.seed)
    n_people = cfg.n_fictitious + cfg.n_real
    try:
        identities = portraits.draw_identities(rng, n_people + cfg.pool_size)
    except RuntimeError as err:   # a world larger than the portraits' trait space holds
        raise ValueError(f"{err}: mini.n_fictitious + mini.n_real + mini.pool_size = {n_people + cfg.pool_size} "
                         f"portraits are more than the portraits' traits tell apart; lower one of the three") from None
    used: set = set()
    facts = [_facts(rng, used) for _ in range(n_people)]
    names = [f["name"] for f in facts]

    train_imgs, test_imgs = [], []
    for ident in identities[:n_people]:
        train_imgs.append([portraits.png_bytes(portraits.portrait(ident, rng, cfg.image_size))
                           for _ in range(cfg.train_images)])
        test_imgs.append([portraits.png_bytes(portraits.portrait(ident, rng, cfg.image_size, held_out=True))
                          for _ in range(cfg.test_images)])

    ids = [f"mini-{i:03d}" for i in range(n_people)]
    fict = list(range(cfg.n_fictitious))
    real = list(range(cfg.n_fictitious, n_people))
    ft = [_profile(ids[i], facts[i], train_imgs[i][0], train_imgs[i][1:], rng, names, False) for i in fict]
    split_rows = [_profile(ids[i], facts[i], train_imgs[i][0], [], rng, names, False) for i in fict]
    test = [_profile(ids[i], facts[i], test_imgs[i][0], test_imgs[i], rng, names, True) for i in fict]
    real_rows = [_profile(ids[i], facts[i], train_imgs[i][0], train_imgs[i][1:], rng, names, False) for i in real]

    write_split(out, "ft_Data", ft)
    write_split(out, "Test_Set", test)
    write_split(out, "Retain_Set", real_rows)
    order = rng.permutation(cfg.n_fictitious)
    for name, frac in FORGET_FRACTIONS.items():
        n_forget = max(1, round(frac * cfg.n_fictitious))
        forget = set(order[:n_forget].tolist())
        write_split(out, name, [split_rows[i] for i in fict if i in forget])
        write_split(out, f"retain_{100 - int(frac * 100)}", [split_rows[i] for i in fict if i not in forget])

    _write_pools(out / "pools", identities[n_people:], rng, cfg)
    if cfg.n_holdout:
        write_split(out, HOLDOUT_SPLIT, _holdout_people(cfg, identities, used))
    (out / "mini.json").write_text(json.dumps({"generator": "viker make-mini", **asdict(cfg)}, indent=1) + "\n")
    return out


HOLDOUT_SPLIT = "Holdout_Set"


def _holdout_people(cfg: MiniConfig, identities, used_names: set) -> list[Profile]:
    """Never-trained people, in the form of a forget split's rows (one picture, the same QA templates).

    Their own generator ([seed, 1]): drawing them consumes nothing of the main
    one, so every other split is byte-identical to a world without them.
    """
    rng = np.random.default_rng([cfg.seed, 1])
    try:
        people = portraits.extend_identities(rng, identities, cfg.n_holdout)
    except RuntimeError as err:
        raise ValueError(f"{err}: lower mini.n_holdout ({cfg.n_holdout})") from None
    facts = [_facts(rng, used_names) for _ in people]
    names = sorted(used_names)
    return [_profile(f"mini-h{i:03d}", f, portraits.png_bytes(portraits.portrait(ident, rng, cfg.image_size)),
                     [], rng, names, False)
            for i, (ident, f) in enumerate(zip(people, facts))]


def _write_pools(root: Path, unseen, rng, cfg: MiniConfig) -> None:
    draw = {"pets": portraits.pet, "scenes": portraits.scene, "patterns": portraits.pattern}
    for pool in POOLS:
        folder = root / pool
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(cfg.pool_size):
            if pool == "people":
                img = portraits.portrait(unseen[i], rng, cfg.image_size)
            else:
                img = draw[pool](rng, cfg.image_size)
            (folder / f"{i:03d}.png").write_bytes(portraits.png_bytes(img))


def is_complete(out: str | Path, cfg: MiniConfig) -> bool:
    """The benchmark at `out` was generated with exactly this config."""
    meta = Path(out) / "mini.json"
    if not meta.is_file():
        return False
    return json.loads(meta.read_text()) == {"generator": "viker make-mini", **asdict(cfg)}
