"""Independent runs over worker processes pinned to one torch thread each (demo sweep, study grid).

Why processes of one thread: the tiny model's ops are too small for two
threads to share well. Measured on the 2-core machine (load ~1 from other
jobs): one process with 2 threads trained + evaluated a 32-step ViKeR run in
3.94 s, two concurrent one-thread processes took 5.5 s each, i.e. 2.75 s per
run (1.43x the throughput). And several torch processes each using every
core oversubscribe: knowledge injection ran 7x slower that way.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed


def init_worker(parent_pid: int | None = None) -> None:
    """One torch thread, no progress bars (their lines would interleave across workers).

    A spawned worker inherits the start method "spawn" as its default, so the
    DataLoader workers of each training run inside it were spawned too: a fresh
    interpreter importing torch, twice per run. In the study that made a run
    cost 15 s instead of 5.6 s. Forking them, as any Linux process does, is cheap.

    `parent_pid` (a pool's worker): die with that parent, by PR_SET_PDEATHSIG
    (threads.die_with_parent). A pool worker of a killed demo or study otherwise
    finishes its run (minutes), then waits for the next job forever: it holds
    the job queue's write end itself, so no end-of-file comes (measured: both
    workers still waiting 20 s after their 3 s jobs ended; armed, gone 0.1 s
    after the kill, and the resource tracker with them).
    """
    if parent_pid is not None:
        from pipeline.threads import die_with_parent
        die_with_parent(parent_pid)
    import multiprocessing
    multiprocessing.set_start_method("fork", force=True)
    os.environ["TQDM_DISABLE"] = "1"      # before tqdm is imported: it reads its env defaults then
    os.environ["VIKER_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    from pipeline.models.modeling import prepare_libraries
    prepare_libraries()


def run_parallel(workers: int, fn, jobs: list[tuple], log, what: str, each=None, pin_single: bool = True,
                 cost=None) -> list:
    """fn(*job) for every job over `workers` processes; results in job order.

    `each(index, result)` is called as each job finishes (completion order), e.g.
    to log a line per run. With one worker the jobs run here, in order; they
    are pinned to one thread only when `pin_single` (the study wants the same
    numerics as its parallel runs; the demo keeps every core). `cost`, a rough
    estimate per job (a list parallel to `jobs`), hands the dearest jobs out
    first: a long job started last would leave the other workers idle while it
    ends (longest-processing-time-first keeps the wall time near total / workers).
    """
    if not jobs:
        return []
    t = time.time()
    out = [None] * len(jobs)
    if workers == 1:
        if pin_single:
            init_worker()
        for i, job in enumerate(jobs):
            out[i] = fn(*job)
            if each is not None:
                each(i, out[i])
    else:
        import multiprocessing
        from pipeline.threads import apply_wait_policy
        apply_wait_policy()          # the workers inherit the decision through their environment
        # spawn, not fork: a forked torch with its thread pool already started can deadlock.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=init_worker, initargs=(os.getpid(),)) as pool:
            order = submission_order(cost, len(jobs))
            futures = {pool.submit(fn, *jobs[i]): i for i in order}
            for n, fut in enumerate(as_completed(futures), start=1):
                i = futures[fut]
                out[i] = fut.result()
                if each is not None:
                    each(i, out[i])
                elif n % max(1, len(jobs) // 10) == 0 or n == len(jobs):
                    log(f"{what}: {n}/{len(jobs)} ({time.time() - t:.0f}s)")
    log(f"{what}: {len(jobs)} done in {time.time() - t:.1f}s")
    return out


def submission_order(cost, n: int) -> list[int]:
    """Job indices, dearest first (ties and no estimate: the given order)."""
    if cost is None:
        return list(range(n))
    if len(cost) != n:
        raise ValueError(f"cost has {len(cost)} estimates for {n} jobs")
    return sorted(range(n), key=lambda i: -cost[i])
