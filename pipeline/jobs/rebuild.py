"""`python -m pipeline.jobs.rebuild`: the demo's shipped vanilla and gold models, rebuilt from nothing.

    python -m pipeline.jobs.rebuild [--config configs/demo.yaml] [--dest DIR] [KEY=VALUE ...]

Removes the demo's copies under cache/models, trains both models (knowledge
injection in one-thread processes, as the demo does), checks that the vanilla
model passes the demo's gate, and writes the shipped folders and
PROVENANCE.json (hashes, stamps, the benchmark's digest, versions, date) to
pipeline/data/demo_models/ (prebuilt.py). tests/test_prebuilt.py runs this
path on a small world.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .demo import (check_gate, ensure_benchmark, ensure_models, gold_config, gold_dir, tokenizer_texts, vanilla_gate,
                   vanilla_stamp)
from .prebuilt import MODEL_FILES, PROVENANCE, REBUILD, SHIPPED, sha256, world_digest


def export(cfg, dest: Path | None = None, log=print) -> dict:
    """Train the demo's vanilla and gold models from nothing, gate the vanilla one, write them to `dest`."""
    import platform
    from dataclasses import replace
    from datetime import date

    import torch
    import transformers

    dest = SHIPPED if dest is None else Path(dest)
    cfg = replace(cfg, demo=replace(cfg.demo, prebuilt=False))
    models = {"vanilla": (Path(cfg.finetune.output), vanilla_stamp(cfg)),
              "gold": (gold_dir(cfg), vanilla_stamp(gold_config(cfg)))}
    for folder, _ in models.values():
        shutil.rmtree(folder, ignore_errors=True)      # a rebuild, never a reuse
    ensure_benchmark(cfg, log)
    vanilla, _ = ensure_models(cfg, log)
    gate = vanilla_gate(cfg, vanilla, log)
    check_gate(gate, cfg.finetune.gate_min_acc, json.loads((vanilla / "vanilla.json").read_text()))
    record = {"rebuild": REBUILD, "built": f"{date.today().isoformat()}, torch {torch.__version__}, "
                                           f"transformers {transformers.__version__}, {platform.machine()}",
              "world_sha256": world_digest(tokenizer_texts(cfg.data.root)), "models": {}}
    dest.mkdir(parents=True, exist_ok=True)
    for which, (folder, stamp) in models.items():
        target = dest / which
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for name in MODEL_FILES:
            shutil.copyfile(folder / name, target / name)
        info = json.loads((folder / "vanilla.json").read_text())
        record["models"][which] = {"stamp": stamp, "steps": info["steps"], "stopped": info.get("stopped", ""),
                                   "files": {name: sha256(target / name) for name in MODEL_FILES}}
    record["models"]["vanilla"]["gate"] = {k: round(v["acc"], 4) for k, v in gate.items()}
    (dest / PROVENANCE).write_text(json.dumps(record, indent=1) + "\n")
    log(f"[prebuilt] vanilla and gold models written to {dest} with {PROVENANCE}")
    return record


def main(argv=None) -> None:
    import argparse
    from pipeline.config import load_config
    from pipeline.threads import apply_wait_policy
    ap = argparse.ArgumentParser(prog=REBUILD, description="Rebuild the demo's shipped vanilla and gold models "
                                 "(knowledge injection from nothing; minutes on a CPU).")
    ap.add_argument("--config", default="configs/demo.yaml", help="the demo configuration they are made for")
    ap.add_argument("--dest", default=str(SHIPPED), help="where the models and PROVENANCE.json go")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE, as for viker demo")
    args = ap.parse_args(argv)
    apply_wait_policy()
    cfg = load_config(args.config, args.overrides)
    from pipeline.models.modeling import prepare_libraries
    prepare_libraries()
    export(cfg, Path(args.dest))


if __name__ == "__main__":
    main()
