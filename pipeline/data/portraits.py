"""Procedural pictures for the miniature benchmark: portraits and reference pools.

A portrait's *identity* is what stays fixed across all pictures of a person
(skin tone, hair colour and style, eye colour, face width, shirt colour); its
*view* is what changes between pictures (background, head position, mouth,
accessories, lighting). Training portraits and held-out test portraits are
drawn from disjoint view settings, so test accuracy measures recognising a
person in a new picture rather than tolerance to pixel jitter.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SKIN = [(255, 226, 200), (230, 180, 120), (190, 125, 60), (135, 80, 35), (85, 50, 30)]
HAIR = [(20, 20, 20), (110, 60, 20), (230, 200, 90), (200, 70, 30), (160, 160, 160), (60, 90, 200), (240, 240, 240)]
HAIR_STYLES = ["short", "long", "spiky", "bun"]
EYES = [(40, 90, 200), (30, 140, 60), (90, 50, 20), (10, 10, 10)]
SHIRTS = [(200, 30, 30), (30, 160, 60), (30, 60, 200), (230, 200, 30), (150, 40, 170), (20, 170, 170),
          (240, 130, 20), (60, 60, 60)]
WIDTHS = [0.30, 0.38]
# A seventh trait, only for worlds the six above cannot hold (see draw_identities): a band across the shirt.
BANDS = [None, (245, 245, 245), (20, 20, 20)]

TRAIN_BACKGROUNDS = [(235, 235, 235), (200, 220, 240), (240, 225, 200)]
TEST_BACKGROUNDS = [(210, 240, 210), (245, 210, 225), (180, 180, 200)]


@dataclass(frozen=True)
class Identity:
    skin: int
    hair: int
    style: int
    eyes: int
    shirt: int
    width: int
    band: int = 0       # 0: none; only worlds too large for the six traits above draw others

    def as_tuple(self) -> tuple:
        return (self.skin, self.hair, self.style, self.eyes, self.shirt, self.width, self.band)


def _draw(rng: np.random.Generator, n: int, min_diff: int, sizes: list[int]) -> list[Identity] | None:
    chosen: list[Identity] = []
    attempts = 0
    while len(chosen) < n:
        attempts += 1
        if attempts > 200_000:
            return None
        cand = Identity(*(int(rng.integers(s)) for s in sizes))
        if all(sum(a != b for a, b in zip(cand.as_tuple(), c.as_tuple())) >= min_diff for c in chosen):
            chosen.append(cand)
    return chosen


def draw_identities(rng: np.random.Generator, n: int, min_diff: int = 3) -> list[Identity]:
    """n identities, each differing from all others in at least `min_diff` traits.

    The six traits hold about 130 identities. A larger world (people + pool)
    is drawn again with the shirt band as a seventh trait, after the six-trait
    draw gave up: every world that could be drawn before is drawn exactly as
    before, so its data, caches and measured numbers stay valid.
    """
    six = [len(SKIN), len(HAIR), len(HAIR_STYLES), len(EYES), len(SHIRTS), len(WIDTHS)]
    chosen = _draw(rng, n, min_diff, six) or _draw(rng, n, min_diff, six + [len(BANDS)])
    if chosen is None:
        raise RuntimeError(f"cannot draw {n} identities differing in {min_diff} traits")
    return chosen


def extend_identities(rng: np.random.Generator, chosen: list[Identity], n: int, min_diff: int = 3) -> list[Identity]:
    """n more identities, each `min_diff` traits away from `chosen` and from one another.

    The world already drawn is untouched (the miniature benchmark's held-out
    people are drawn this way, from their own generator, so adding them
    changes no other person). Six traits while they hold, the band after.
    """
    six = [len(SKIN), len(HAIR), len(HAIR_STYLES), len(EYES), len(SHIRTS), len(WIDTHS)]
    sizes_list = ([six] if all(c.band == 0 for c in chosen) else []) + [six + [len(BANDS)]]
    for sizes in sizes_list:
        more: list[Identity] = []
        for _ in range(200_000):
            if len(more) == n:
                return more
            cand = Identity(*(int(rng.integers(s)) for s in sizes))
            if all(sum(a != b for a, b in zip(cand.as_tuple(), c.as_tuple())) >= min_diff for c in chosen + more):
                more.append(cand)
        if len(more) == n:
            return more
    raise RuntimeError(f"cannot draw {n} more identities differing in {min_diff} traits from {len(chosen)} others")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _scale(box, s):
    return [v * s for v in box]


def portrait(ident: Identity, rng: np.random.Generator, size: int = 64, held_out: bool = False) -> Image.Image:
    """Draw one picture of a person; `held_out` uses the view settings reserved for Test_Set."""
    s = size / 64.0
    bgs = TEST_BACKGROUNDS if held_out else TRAIN_BACKGROUNDS
    bg = bgs[int(rng.integers(len(bgs)))]
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    if held_out and rng.random() < 0.5:           # a background stripe never seen in training
        y = int(rng.integers(4, 20))
        d.rectangle(_scale([0, y, 64, y + 4], s), fill=tuple(int(c * 0.8) for c in bg))
    dx = float(rng.uniform(-5, 5)) if held_out else float(rng.uniform(-3, 3))
    dy = float(rng.uniform(-3, 3)) if held_out else float(rng.uniform(-2, 2))
    cx, cy = 32 + dx, 28 + dy
    half_w = 64 * WIDTHS[ident.width] / 2
    half_h = 15
    # shirt
    d.polygon([tuple(_scale(p, s)) for p in [(cx - 20, 64), (cx - 14, cy + 16), (cx + 14, cy + 16), (cx + 20, 64)]],
              fill=SHIRTS[ident.shirt])
    if BANDS[ident.band] is not None:     # no random draw here: six-trait identities render as before
        d.rectangle(_scale([cx - 19, cy + 24, cx + 19, cy + 30], s), fill=BANDS[ident.band])
    hair = HAIR[ident.hair]
    style = HAIR_STYLES[ident.style]
    if style == "long":
        d.rectangle(_scale([cx - half_w - 3, cy - half_h, cx + half_w + 3, cy + 18], s), fill=hair)
    if style == "bun":
        d.ellipse(_scale([cx - 6, cy - half_h - 11, cx + 6, cy - half_h + 1], s), fill=hair)
    # face
    d.ellipse(_scale([cx - half_w, cy - half_h, cx + half_w, cy + half_h], s), fill=SKIN[ident.skin])
    # hair on top
    if style in ("short", "long", "bun"):
        d.chord(_scale([cx - half_w - 1, cy - half_h - 3, cx + half_w + 1, cy + 2], s), 180, 360, fill=hair)
    elif style == "spiky":
        for k in range(5):
            x0 = cx - half_w + k * (2 * half_w / 5)
            d.polygon([tuple(_scale(p, s)) for p in [(x0, cy - 8), (x0 + half_w / 5, cy - half_h - 7),
                                                     (x0 + 2 * half_w / 5, cy - 8)]], fill=hair)
    # eyes
    for ex in (cx - half_w * 0.45, cx + half_w * 0.45):
        d.ellipse(_scale([ex - 2.5, cy - 1.5, ex + 2.5, cy + 3], s), fill=(255, 255, 255))
        d.ellipse(_scale([ex - 1.5, cy - 0.5, ex + 1.5, cy + 2.5], s), fill=EYES[ident.eyes])
    # mouth: expression varies between pictures
    mouth = int(rng.integers(3))
    if mouth == 0:
        d.arc(_scale([cx - 5, cy + 4, cx + 5, cy + 10], s), 20, 160, fill=(120, 30, 30), width=max(1, int(s)))
    elif mouth == 1:
        d.line(_scale([cx - 4, cy + 8, cx + 4, cy + 8], s), fill=(120, 30, 30), width=max(1, int(s)))
    else:
        d.ellipse(_scale([cx - 2.5, cy + 6, cx + 2.5, cy + 10], s), fill=(120, 30, 30))
    # accessories: glasses or a hat, more often on held-out pictures
    if rng.random() < (0.5 if held_out else 0.25):
        for ex in (cx - half_w * 0.45, cx + half_w * 0.45):
            d.rectangle(_scale([ex - 4, cy - 3, ex + 4, cy + 4], s), outline=(20, 20, 20), width=max(1, int(s)))
    if held_out and rng.random() < 0.3:
        d.rectangle(_scale([cx - half_w - 2, cy - half_h - 6, cx + half_w + 2, cy - half_h + 1], s),
                    fill=(70, 40, 20))
    # lighting
    gain = float(rng.uniform(0.92, 1.06))
    arr = np.clip(np.asarray(img, dtype=np.float32) * gain, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def pet(rng: np.random.Generator, size: int = 64) -> Image.Image:
    s = size / 64.0
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(150, 256, 3)))
    d = ImageDraw.Draw(img)
    fur = tuple(int(v) for v in rng.integers(30, 230, 3))
    d.ellipse(_scale([14, 30, 50, 58], s), fill=fur)                       # body
    d.ellipse(_scale([20, 12, 44, 36], s), fill=fur)                       # head
    for ex in (24, 40):                                                    # ears
        d.polygon([tuple(_scale(p, s)) for p in [(ex - 5, 18), (ex, 4 + rng.integers(0, 6)), (ex + 5, 18)]], fill=fur)
    for ex in (27, 37):
        d.ellipse(_scale([ex - 2, 21, ex + 2, 25], s), fill=(0, 0, 0))
    d.ellipse(_scale([30, 27, 34, 30], s), fill=(60, 20, 20))
    return img


def scene(rng: np.random.Generator, size: int = 64) -> Image.Image:
    s = size / 64.0
    horizon = int(rng.integers(30, 46))
    img = Image.new("RGB", (size, size), tuple(int(v) for v in (rng.integers(90, 170), rng.integers(150, 220), 255)))
    d = ImageDraw.Draw(img)
    d.rectangle(_scale([0, horizon, 64, 64], s), fill=tuple(int(v) for v in (rng.integers(40, 120), rng.integers(110, 190), rng.integers(30, 90))))
    sx = int(rng.integers(6, 58))
    d.ellipse(_scale([sx - 5, 4, sx + 5, 14], s), fill=(255, 220, 60))
    for _ in range(int(rng.integers(1, 4))):                               # houses or trees
        x = int(rng.integers(4, 52))
        if rng.random() < 0.5:
            d.rectangle(_scale([x, horizon - 10, x + 10, horizon + 2], s), fill=(170, 60, 40))
            d.polygon([tuple(_scale(p, s)) for p in [(x - 2, horizon - 10), (x + 5, horizon - 17), (x + 12, horizon - 10)]], fill=(90, 30, 20))
        else:
            d.rectangle(_scale([x + 4, horizon - 6, x + 6, horizon + 2], s), fill=(90, 60, 30))
            d.ellipse(_scale([x, horizon - 16, x + 10, horizon - 4], s), fill=(30, 120, 40))
    return img


def pattern(rng: np.random.Generator, size: int = 64) -> Image.Image:
    c1 = tuple(int(v) for v in rng.integers(0, 256, 3))
    c2 = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (size, size), c1)
    d = ImageDraw.Draw(img)
    kind = int(rng.integers(3))
    step = int(rng.integers(4, 12))
    for i in range(0, size, step):
        if kind == 0:
            d.rectangle([i, 0, i + step // 2, size], fill=c2)               # stripes
        elif kind == 1:
            for j in range(0, size, step):
                if (i // step + j // step) % 2:
                    d.rectangle([i, j, i + step - 1, j + step - 1], fill=c2)  # checks
        else:
            for j in range(0, size, step):
                d.ellipse([i, j, i + step // 2, j + step // 2], fill=c2)     # dots
    return img
