"""Do the demo's conclusions survive float noise? The demo four times: one and two threads, two seeds.

    .venv/bin/python benchmarks/demo_robustness.py [--full] [--work DIR] [--out FILE.md] [KEY=VALUE ...]
    .venv/bin/python benchmarks/demo_robustness.py --from-results   # the table again from the last run's results

Two sweeps over one miniature benchmark and one pair of vanilla/gold models
(knowledge injection always runs in one-thread processes, so the models are
the same for both): the sweep in one-thread worker processes (VIKER_THREADS=1,
demo.workers=2) and in this process with two threads (VIKER_THREADS=2,
demo.workers=1). Different thread counts sum floats in a different order; each
sweep trains the seeds 0 and 1 (demo.seeds=0,1). Each of the four runs gives
its findings at matched forgetting (pipeline/jobs/findings.py); a finding
*holds* when it says the same (higher / lower, by at least the margin) in all
four. The docs state only findings that hold.

Prints a table (finding, the four runs' signs and numbers, holds?) and writes
it as Markdown with the machine's measured single-thread matmul rate, so a
reader can scale the wall times.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import matmul_gflops  # noqa: E402  (REPO is on the path first)

RUNS = (("1 thread", {"VIKER_THREADS": "1"}, ["demo.workers=2"]),
        ("2 threads", {"VIKER_THREADS": "2"}, ["demo.workers=1"]))
SEEDS = (0, 1)


def run_demo(work: Path, config: Path, env_extra: dict, overrides: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **env_extra}
    t = time.time()
    cmd = [sys.executable, "-m", "pipeline.cli", "demo", "--config", str(config),
           "demo.seeds=" + ",".join(map(str, SEEDS)), *overrides]
    with open(work / "demo.log", "a") as log:
        subprocess.run(cmd, cwd=work, env={**env, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
    return time.time() - t


def main() -> None:
    from pipeline.config import load_config
    from pipeline.evaluation.results import read_jsonl
    from pipeline.jobs.findings import MARGIN, findings
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the full sweep (viker demo --full) instead of the quick one")
    ap.add_argument("--work", default="/tmp/viker-robustness", help="scratch folder (its cache/ is reused)")
    ap.add_argument("--out", default=None, help="default: docs/DEMO_ROBUSTNESS.md (--full: DEMO_ROBUSTNESS_FULL.md)")
    ap.add_argument("--from-results", action="store_true",
                    help="no demo: rebuild the table from the results a previous run left in --work")
    ap.add_argument("overrides", nargs="*", help="extra KEY=VALUE for every demo run")
    args = ap.parse_args()
    config = REPO / "configs" / ("demo_full.yaml" if args.full else "demo.yaml")
    args.out = args.out or str(REPO / "docs" / ("DEMO_ROBUSTNESS_FULL.md" if args.full else "DEMO_ROBUSTNESS.md"))
    results = Path(load_config(config, args.overrides).evaluate.results)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    timing = work / "timing.json"
    if args.from_results:
        rate, seconds = json.loads(timing.read_text()).values()
    else:
        rate, seconds = matmul_gflops(), {}
    print(f"[robustness] machine: one thread of a 512x512 float32 matmul: {rate:.1f} GFLOP/s")
    runs = {}
    for name, env, over in RUNS:
        saved = work / f"results-{name.replace(' ', '')}.jsonl"
        if not args.from_results:
            seconds[name] = run_demo(work, config, env, over + args.overrides)
            shutil.copy(results if results.is_absolute() else work / results, saved)
        rows = read_jsonl(saved)
        for seed in SEEDS:
            picked = [r for r in rows if r["method"] in ("Vanilla", "Gold") or r.get("seed", 0) == seed]
            runs[f"{name}, seed {seed}"] = {f.key: f for f in findings(picked)}
        print(f"[robustness] {name}: {seconds[name]:.0f} s")
    names = list(runs)
    keys = list(dict.fromkeys(k for found in runs.values() for k in found))
    lines, holding = [], 0
    for key in keys:
        got = [runs[n].get(key) for n in names]
        signs = [None if f is None else f.sign for f in got]
        holds = all(s is not None for s in signs) and len(set(signs)) == 1 and signs[0] != 0
        holding += holds
        first = next(f for f in got if f is not None)
        cells = " | ".join("n/a" if f is None else {1: "+", -1: "-", 0: "0"}[f.sign] for f in got)
        lines.append(f"| {first.text} | {cells} | {'**holds**' if holds else 'no'} |")
    head = [f"# Demo robustness{' (viker demo --full)' * args.full}: one and two threads, two seeds", "",
            "Command: `" + " ".join([".venv/bin/python benchmarks/demo_robustness.py"] + ["--full"] * args.full
                                    + args.overrides) + "`  ",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread of a "
            f"512x512 float32 matmul {rate:.1f} GFLOP/s; {date.today().isoformat()}.  ",
            "Wall time: " + ", ".join(f"{n} sweep {s:.0f} s" for n, s in seconds.items()) + " (the first includes "
            "generating the benchmark and copying or training the models; other jobs shared the cores, so they are not a "
            "benchmark).", "",
            "Each row is a finding of `pipeline/jobs/findings.py` (differences at matched forgetting of at least "
            f"{MARGIN:g} points); the text carries the first run's numbers. Columns: the four runs "
            f"({', '.join(names)}): + higher, - lower, 0 no difference shown, n/a not in that run. A finding **holds** "
            "when all four say the same, not 0 (\"never forgets down to\" counts as -). Same seed, another machine: other numbers; these are this "
            "machine's.", "",
            f"{holding} of {len(keys)} findings hold.", "",
            "| finding (first run's numbers) | " + " | ".join(names) + " | holds |",
            "|---|" + "---|" * (len(names) + 1)]
    timing.write_text(json.dumps({"rate": rate, "seconds": seconds}))
    Path(args.out).write_text("\n".join(head + lines) + "\n")
    (work / "findings.json").write_text(json.dumps({n: {k: [f.sign, f.text] for k, f in r.items()}
                                                    for n, r in runs.items()}, ensure_ascii=False, indent=1))
    print("\n".join(head[-3:] + lines))
    print(f"[robustness] written to {args.out}")


if __name__ == "__main__":
    main()
