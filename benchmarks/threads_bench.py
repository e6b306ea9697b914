"""Knowledge-injection step time under each thread / OpenMP wait setting, on a quiet and a busy machine.

    python benchmarks/threads_bench.py                 # ~5 min on 2 cores; writes docs/bench/threads_cpu.json
    python benchmarks/threads_bench.py --steps 30 --cases quiet

Why: `make demo` runs right after its own install, and the project once chose
OpenMP's wait policy from the 1-minute load average at import, which still
reads "busy" for a minute after pip stops (issue #20). This bench times what
the demo's longest part does (the demo's fine-tuning recipe, `runs.run_finetune`)
in a fresh process per setting, so each process gets its own OpenMP start-up:

- settings: libgomp's default spin (GOMP_SPINCOUNT 300000), PASSIVE (sleep at
  once), a short spin, one thread, and "as shipped" (no variable set: what
  `pipeline/__init__.py` decides);
- load cases: quiet; two CPU-bound Python loops beside it; two one-thread torch
  loops beside it (what another pair of sweep workers looks like); and "lagging":
  an idle machine whose 1-minute load average still reads >= the core count,
  right after a busy minute (the newcomer's case after pip).

The settings of one case run back to back, so drift hits them alike; the
median of --repeats runs is reported, with the ratio to the fastest.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "as shipped": {},
    "libgomp default spin": {"GOMP_SPINCOUNT": "300000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 10k": {"GOMP_SPINCOUNT": "10000"},
    "spin 3k": {"GOMP_SPINCOUNT": "3000"},
    "spin 1k": {"GOMP_SPINCOUNT": "1000"},
    "one thread": {"VIKER_THREADS": "1"},
}
HOG_PY = "import time\nend = time.time() + {secs}\nwhile time.time() < end: pass\n"
HOG_TORCH = ("import time, torch\ntorch.set_num_threads(1)\na = torch.randn(96, 96)\nend = time.time() + {secs}\n"
             "while time.time() < end:\n    a = torch.tanh(a @ a * 0.01)\n")
# case -> (what runs beside the timing, how many of it)
CASES = {"quiet": (None, 0), "1 python loop": (HOG_PY, 1), "2 python loops": (HOG_PY, 2),
         "2 torch loops": (HOG_TORCH, 2), "lagging": ("lag", 0)}
CONTROLLED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "VIKER_THREADS", "OMP_NUM_THREADS")


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def child(workdir: str, steps: int) -> None:
    """One timing in this fresh process: the demo's fine-tuning recipe for `steps` steps."""
    from pipeline.config import load_config
    from pipeline.models.modeling import set_threads
    from pipeline.jobs.runs import run_finetune
    import torch
    cfg = load_config(ROOT / "configs/demo.yaml", [f"data.root={workdir}/mini", f"finetune.base={workdir}/base",
                                                 f"finetune.output={workdir}/out", f"finetune.steps={steps}"])
    set_threads()
    info = run_finetune(cfg)
    print(json.dumps({"s_per_step": info["train_seconds"] / steps, "threads": torch.get_num_threads(),
                      "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                      "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT")}))


def prepare(workdir: str) -> None:
    from pipeline.jobs import demo
    from pipeline.config import load_config
    cfg = load_config(ROOT / "configs/demo.yaml", [f"data.root={workdir}/mini", f"finetune.base={workdir}/base"])
    demo.ensure_benchmark(cfg, log=lambda *_: None)
    demo.ensure_base_model(cfg, log=lambda *_: None)


def time_setting(workdir: str, steps: int, env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    env.update(env_extra, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    load = os.getloadavg()[0]
    out = subprocess.run([sys.executable, __file__, "--child", workdir, "--steps", str(steps)], env=env,
                         capture_output=True, text=True, check=True, cwd=ROOT)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["load_at_start"] = round(load, 2)
    return row


def start_hogs(code: str, n: int, secs: float) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-c", code.format(secs=secs)], env=env) for _ in range(n)]


def stop(hogs: list[subprocess.Popen]) -> None:
    for h in hogs:
        h.kill()
        h.wait()


def raise_load_average(cores: int) -> None:
    """Keep cores+1 loops busy until the 1-minute load average reads >= cores, then stop them."""
    hogs = start_hogs(HOG_PY, cores + 1, 300)
    t = time.time()
    while os.getloadavg()[0] < cores + 0.3 and time.time() - t < 240:
        time.sleep(2)
    stop(hogs)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", default=str(ROOT / "docs/bench/threads_cpu.json"))
    ap.add_argument("--child", metavar="WORKDIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.steps)
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = [s.strip() for s in args.settings.split(",")]
    result = {"machine": machine(), "steps": args.steps, "repeats": args.repeats, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="viker-threads-") as workdir:
        prepare(workdir)
        for case in [c.strip() for c in args.cases.split(",")]:
            # Only "as shipped" looks at the machine (the old rule: the load average); every other setting
            # is fixed by its variables, so in the lagging case it would time the quiet case again.
            hog, n_hogs = CASES[case]
            names = ["as shipped"] if hog == "lag" else settings
            rows = {s: [] for s in names}
            for _ in range(args.repeats):
                for s in names:
                    hogs = []
                    if hog == "lag":
                        raise_load_average(cores)       # anew for each setting: the average decays
                    elif hog:
                        hogs = start_hogs(hog, n_hogs, 600)
                        time.sleep(1)
                    try:
                        rows[s].append(time_setting(workdir, args.steps, SETTINGS[s]))
                    finally:
                        stop(hogs)
            med = {s: statistics.median(r["s_per_step"] for r in rows[s]) for s in names}
            best = min(med.values())
            if hog == "lag" and "quiet" in result["cases"]:   # the same idle machine, without the lag
                best = min(r["s_per_step"] for r in result["cases"]["quiet"].values())
            result["cases"][case] = {s: {"s_per_step": round(med[s], 4), "vs_best": round(med[s] / best, 2),
                                         "runs": rows[s]} for s in names}
            print(f"\n[{case}]  ({machine()}, {args.steps} steps, median of {args.repeats})")
            for s in names:
                last = rows[s][-1]
                print(f"  {s:22s} {med[s]:.4f} s/step  {med[s] / best:4.2f}x best   "
                      f"(load at start {last['load_at_start']}, threads {last['threads']}, "
                      f"OMP_WAIT_POLICY={last['OMP_WAIT_POLICY']}, GOMP_SPINCOUNT={last['GOMP_SPINCOUNT']})",
                      flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten to {args.out}")
    return result


if __name__ == "__main__":
    main()
