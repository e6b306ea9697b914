"""The machine's speed, printed beside every timing we publish: one thread of an n x n float32 matmul.

    .venv/bin/python benchmarks/machine.py        # e.g. "one thread of a 512x512 float32 matmul: 18.0 GFLOP/s"

Timings on these machines vary about 3x from day to day; a reader scales a wall time by this rate.
The rate is averaged over about a second, not a handful of products: on a shared machine a burst
of 20 products (0.1 s) could land in one lucky time slice and read 3x too fast.
"""
from __future__ import annotations

import subprocess
import sys

CODE = ("import time, torch; torch.set_num_threads(1); a = torch.randn({n}, {n}); b = torch.randn({n}, {n}); "
        "a @ b; t = time.perf_counter(); r = 0\n"
        "while r < {r} or time.perf_counter() - t < {seconds}:\n    a @ b; r += 1\n"
        "print(2 * {n} ** 3 * r / (time.perf_counter() - t) / 1e9)")


def matmul_gflops(n: int = 512, repeat: int = 20, seconds: float = 1.0, python: str = sys.executable) -> float:
    """GFLOP/s of one thread over at least `repeat` products and `seconds`, in a fresh process (this one's
    thread settings do not leak in)."""
    out = subprocess.run([python, "-c", CODE.format(n=n, r=repeat, seconds=seconds)], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip())


if __name__ == "__main__":
    print(f"one thread of a 512x512 float32 matmul: {matmul_gflops():.1f} GFLOP/s")
