"""The demo's vanilla and gold models, shipped prebuilt, with their provenance: where they are, and the copy.

Knowledge injection is most of a first demo's time on a CPU (two models, ~900
steps each), and a real user downloads a vanilla model before unlearning it,
so the tiny demo models ship with viker (pipeline/data/demo_models/). Each is
used only when it was made from exactly the settings the demo runs with (the
same stamp as a model trained here would carry) and every file hashes as
PROVENANCE.json records; otherwise the demo trains it, and says why.

    python -m pipeline.jobs.rebuild [--config configs/demo.yaml]

(pipeline/jobs/rebuild.py) trains both from nothing and writes them here.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "demo_models"
PROVENANCE = "PROVENANCE.json"
REBUILD = "python -m pipeline.jobs.rebuild"
# What a model folder needs to be loaded and attacked; the rest (gate.json, memos) is remade by the demo.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "processor_config.json", "chat_template.jinja", "vanilla.json")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stamp_difference(shipped: str, wanted: str) -> str:
    """'finetune.lr 0.001 -> 0.002, mini.n_fictitious 60 -> 40': the settings that differ between two stamps."""
    a, b = json.loads(shipped), json.loads(wanted)
    if len(a) != len(b):
        return "another kind of model"
    diffs = []
    for x, y in zip(a, b):
        if isinstance(x, dict) and isinstance(y, dict):
            diffs += [f"{k} {x.get(k)!r} -> {y.get(k)!r}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        elif x != y:
            diffs.append(f"{x!r} -> {y!r}")
    return ", ".join(diffs[:4]) + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")


def world_digest(texts: list[str]) -> str:
    """sha256 of every string of a benchmark the model reads or writes (demo.tokenizer_texts).

    The stamp names the settings a model was made from; this names what the
    generator made of them, so a changed generator is caught too.
    """
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def install(which: str, out: Path, stamp: str, world, log, shipped: Path | None = None) -> bool:
    """Copy the shipped `which` model ("vanilla" or "gold") to `out` when it was made from `stamp`'s settings
    on a benchmark whose world_digest is `world()` (read only when the settings match); False: train it.

    The copy is written beside `out` and renamed into place, so a killed copy
    never leaves a folder that reads as a model; the stamp is written last.
    """
    shipped = SHIPPED if shipped is None else shipped
    record_file = shipped / PROVENANCE
    if not record_file.is_file():
        return False
    provenance = json.loads(record_file.read_text())
    record = provenance["models"].get(which)
    if record is None:
        return False
    tag = "[gold]" if which == "gold" else "[finetune]"
    if record["stamp"] != stamp:
        log(f"{tag} the shipped {which} model was made from other settings ({stamp_difference(record['stamp'], stamp)}): "
            f"training it here")
        return False
    if record_world := provenance.get("world_sha256"):
        if record_world != world():
            log(f"{tag} the shipped {which} model was made for another miniature benchmark (its texts differ; "
                f"a changed generator?): training it here")
            return False
    src = shipped / which
    bad = [name for name, digest in record["files"].items()
           if not (src / name).is_file() or sha256(src / name) != digest]
    if bad:
        log(f"{tag} the shipped {which} model at {src} does not match {record_file} ({', '.join(bad)}): training it "
            f"here (restore it with git checkout, or rebuild it with `{REBUILD}`)")
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in record["files"]:
            shutil.copyfile(src / name, tmp / name)
        (tmp / "viker-stamp.json").write_text(stamp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    digest = record["files"]["model.safetensors"][:12]
    log(f"{tag} {which} model: the shipped checkpoint (model.safetensors sha256 {digest}..., built "
        f"{provenance['built']}; rebuild: `{REBUILD}`, or demo.prebuilt=false) -> {out}")
    return True
