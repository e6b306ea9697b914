"""Knowledge injection: one two-thread run alone vs two one-thread runs side by side.

The demo trains two models (the vanilla and the gold model) from the same
recipe; on 2 cores it can run them one after the other on two threads, or
together, one thread each. This prints the steps per second of both ways and
their ratio, with the machine it ran on.

    .venv/bin/python benchmarks/injection_bench.py [--steps 150]
    .venv/bin/python benchmarks/injection_bench.py --steps 30 --side-by-side   # the workload yardstick

Run it on a quiet machine: it measures CPU throughput. `--side-by-side` measures the two one-thread
runs alone: the yardstick benchmarks/newcomer.sh prints beside a slow-day time (issue 30's slow day
trained 1.8-2.1 steps/s per process this way), since under a shared load a matmul rate and this
workload's speed do not move together.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile


def _inject(threads: int, steps: int, out: str) -> float:
    os.environ["VIKER_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)
    from dataclasses import replace
    from pipeline.config import load_config
    from pipeline.jobs.demo import ensure_base_model, ensure_benchmark
    from pipeline.jobs.runs import run_finetune
    cfg = load_config("configs/demo.yaml", [f"data.root={out}/mini", f"finetune.base={out}/base"])
    cfg = replace(cfg, finetune=replace(cfg.finetune, steps=steps, stop_known=0, output=f"{out}/model-{os.getpid()}"))
    quiet = lambda *_: None
    ensure_benchmark(cfg, quiet)
    ensure_base_model(cfg, quiet)
    return float(run_finetune(cfg, log=quiet)["train_seconds"])


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--side-by-side", action="store_true",
                    help="only the two one-thread runs side by side (one line: steps/s per process)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    with tempfile.TemporaryDirectory() as out:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:   # builds the benchmark and base model once, and warms the disk cache
            pool.apply(_inject, (2, 5, out))
        if args.side_by_side:
            with ctx.Pool(2) as pool:
                both = pool.starmap(_inject, [(1, args.steps, out), (1, args.steps, out)])
            print(f"knowledge injection, two one-thread runs side by side: {args.steps / max(both):.2f} steps/s each")
            return
        with ctx.Pool(1) as pool:
            alone = pool.apply(_inject, (2, args.steps, out))
        with ctx.Pool(2) as pool:
            both = pool.starmap(_inject, [(1, args.steps, out), (1, args.steps, out)])
    one_two_thread = args.steps / alone
    side_by_side = 2 * args.steps / max(both)
    print(json.dumps({"machine": f"{cpu_name()}, {os.cpu_count()} cores",
                      "steps": args.steps, "two_threads_alone_s": alone, "one_thread_side_by_side_s": both,
                      "steps_per_s_alone": round(one_two_thread, 2), "steps_per_s_side_by_side": round(side_by_side, 2),
                      "ratio": round(side_by_side / one_two_thread, 3)}, indent=1))


if __name__ == "__main__":
    main()
