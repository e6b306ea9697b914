"""Independent runs over worker processes pinned to one torch thread each (demo sweep, study grid).

Why processes of one thread: the tiny model's ops are too small for two
threads to share well. Measured on the 2-core machine (load ~1 from other
jobs): one process with 2 threads trained + evaluated a 32-step ViKeR run in
3.94 s, two concurrent one-thread processes took 5.5 s each, i.e. 2.75 s per
run (1.43x the throughput). And several torch processes each using every
core oversubscribe: knowledge injection ran 7x slower that way.

Why a fork server: a spawned worker imports torch, transformers, peft and the
rest of a run's libraries itself before its first job (7.8 s of CPU measured
on the 2-core machine, 2026-12-05: 5.5 s importing, 2.3 s more in the first
run), and the demo's two workers did so at once, a quarter of its sweep. The
fork server imports them once, from the moment `warm_up()` starts it (the CLI
does so before it imports anything heavy itself, so the second core does that
work while the first does the command's own), and each worker is a fork of
it. Forking it is safe where forking the command itself is not: the server
never ran a torch op, so no OpenMP thread pool exists to be copied half-way.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

# What a job of the demo or the study imports: loaded by the fork server, so no worker pays for them
# (pandas is the report's, in the command's own process: no job imports it).
# Those that import no torch: a fresh environment's helper writes their bytecode (compile_beside).
DATA_LIBRARIES = ("numpy", "pyarrow.parquet", "h5py", "PIL.Image", "rouge_score.rouge_scorer", "sacrebleu")
PRELOAD = ("torch", "transformers", "peft", *DATA_LIBRARIES, "transformers.models.llava.modeling_llava",
           "transformers.models.clip", "pipeline.jobs.demo", "pipeline.jobs.runs", "pipeline.stage2.train",
           "pipeline.stage1.precompute", "pipeline.evaluation.evaluate", "pipeline.evaluation.relearn",
           "pipeline.evaluation.logit_lens", "pipeline.study.grid")
# The workers' environment, set in the server's before its imports (a library may read it when imported).
WORKER_ENV = {"TQDM_DISABLE": "1", "VIKER_THREADS": "1", "OMP_NUM_THREADS": "1"}


def pool_context():
    """The multiprocessing context of the job pools: the fork server, started (with its preloads) if not yet."""
    import multiprocessing
    from multiprocessing import forkserver
    from pipeline.threads import apply_wait_policy
    ctx = multiprocessing.get_context("forkserver")
    apply_wait_policy()              # OpenMP reads it when the server imports torch: decide it first
    forkserver.set_forkserver_preload(list(PRELOAD))
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    try:
        forkserver.ensure_running()  # returns at once: the server imports while this process goes on
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ctx


def warm_up() -> None:
    """Start the job pools' fork server now, so its imports overlap with this process's own work."""
    global _HELPER
    pool_context()
    _HELPER = compile_beside()


_HELPER = None      # compile_beside's process, when warm_up started one


def import_beside(modules: tuple[str, ...]):
    """Import `modules` in a thread of this process once compile_beside's helper has ended; the thread.

    For what this process needs only after the jobs (the report's pandas and matplotlib): imported at
    the end, they stood between the last job and the report, one core idle. The fork server imports
    for seconds after the helper ends (2-core Intel Xeon, fresh venv: 2.0 s of 8.5 s alone), and this
    process only waits for it meanwhile. A failed import is left to the caller's own import to raise.
    """
    import importlib
    import threading

    def run():
        if _HELPER is not None:
            _HELPER.wait()
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:
                return
    thread = threading.Thread(target=run, name="import-beside", daemon=True)
    thread.start()
    return thread


# The data libraries, sympy (torch's compiler stack imports it through transformers) and the report's pandas.
BESIDE = ("sympy", *DATA_LIBRARIES, "pandas")
# Before those, the folders of the modules the server reaches after torch itself (transformers' core and the
# demo's model classes, peft, torch's compiler stack), compiled without being imported: the server, busy
# with torch meanwhile, then finds them written. (package, folders: "" its own files, "*" all of it)
AHEAD = (("transformers", ("", "utils", "generation", "integrations", "quantizers", "loss", "distributed",
                           "models/auto", "models/llava", "models/clip", "models/llama")),
         ("peft", ("*",)), ("torch", ("_dynamo",)))


def compile_beside():
    """In an environment whose libraries were never imported, run write_bytecode in a helper; its Popen or None.

    The first import in a new venv also writes the bytecode of ~3000 modules: the fork server's imports
    took 13.6 s instead of 5.3 s (2-core Intel Xeon, 2026-12-06), on one core, while this process waited
    with the other one idle. The helper (write_bytecode) writes AHEAD's and BESIDE's bytecode there
    meanwhile, then exits; the server finds it written. Once written (or where Python writes none),
    nothing is started.
    """
    import importlib.util
    import subprocess
    import sys
    import threading
    if sys.dont_write_bytecode:
        return None
    try:
        specs = [importlib.util.find_spec(name) for name in ("sympy", "pandas")]
    except (ImportError, ValueError):
        return None
    if not any(s is not None and s.cached and not os.path.exists(s.cached) for s in specs):
        return None
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.jobs.workers"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    threading.Thread(target=proc.wait, name="compile-beside", daemon=True).start()    # reaped when it ends
    return proc


def write_bytecode() -> None:
    """The helper of compile_beside: AHEAD's folders compiled, then BESIDE imported (what is missing is skipped)."""
    import compileall
    import importlib
    import importlib.util
    for package, folders in AHEAD:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = spec.submodule_search_locations[0]
        for folder in folders:
            path = os.path.join(root, folder) if folder not in ("", "*") else root
            if os.path.isdir(path):
                compileall.compile_dir(path, maxlevels=0 if folder == "" else 10, quiet=2)
    for name in BESIDE:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def init_worker(main_pid: int | None = None) -> None:
    """One torch thread, no progress bars (their lines would interleave across workers).

    The DataLoader workers of each training run inside a worker fork, as any
    Linux process does: cheap. Started any other way (spawn), each would be a
    fresh interpreter importing torch, twice per run; in the study that made a
    run cost 15 s instead of 5.6 s.

    `main_pid` (a pool's worker): die with the process that started the pool
    (threads.die_with). A pool worker of a killed demo or study otherwise
    finishes its run (minutes), then waits for the next job forever: it holds
    the job queue's write end itself, so no end-of-file comes (measured: both
    workers still waiting 20 s after their 3 s jobs ended; armed, gone 0.1 s
    after the kill, and the resource tracker and the fork server with them).
    Its parent is the fork server, not that process, hence no parent-death
    signal here; the worker kills the server too.
    """
    if main_pid is not None:
        from pipeline.threads import die_with
        die_with(main_pid, also=(os.getppid(),))     # the fork server goes with them
    import multiprocessing
    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(WORKER_ENV)
    from pipeline.models.modeling import prepare_libraries
    prepare_libraries()
    # What the server imported (~400 000 objects) is never garbage: out of the collector's sight, each full
    # collection skips it. A demo job spent 0.2-0.5 s of its ~4 s in collections, 0.03-0.05 s after this.
    import gc
    gc.freeze()


def run_parallel(workers: int, fn, jobs: list[tuple], log, what: str, each=None, pin_single: bool = True,
                 cost=None, needs=None, context=None) -> list:
    """fn(*job) for every job over `workers` processes; results in job order.

    `each(index, result)` is called as each job finishes (completion order), e.g.
    to log a line per run; if it raises, the jobs not yet started are cancelled. With one worker the jobs run
    here, in order; they are pinned to one thread only when `pin_single` (the study wants the same
    numerics as its parallel runs; the demo keeps every core). `cost`, a rough
    estimate per job (a list parallel to `jobs`), hands the dearest jobs out
    first: a long job started last would leave the other workers idle while it
    ends (longest-processing-time-first keeps the wall time near total / workers).
    `needs` (a list parallel to `jobs`: None or the index of another job) holds a
    job back until that job has ended, e.g. the runs that read a cache another job
    writes; the others go on meanwhile. `context`: the pool's multiprocessing context,
    by default the fork server (pool_context); a caller whose process never started a
    torch thread pool may fork itself instead (the tests of the scheduling do).
    """
    if not jobs:
        return []
    needs = list(needs) if needs is not None else [None] * len(jobs)
    if len(needs) != len(jobs):
        raise ValueError(f"needs has {len(needs)} entries for {len(jobs)} jobs")
    t = time.time()
    out = [None] * len(jobs)
    pending, done = submission_order(cost, len(jobs)), set()

    def ready():
        return next((i for i in pending if needs[i] is None or needs[i] in done), None)

    def finished(n: int, i: int, result) -> None:
        out[i] = result
        done.add(i)
        if each is not None:
            each(i, result)
        elif n % max(1, len(jobs) // 10) == 0 or n == len(jobs):
            log(f"{what}: {n}/{len(jobs)} ({time.time() - t:.0f}s)")

    if workers == 1:
        if pin_single:
            init_worker()
        while (i := ready()) is not None:
            pending.remove(i)
            finished(len(done) + 1, i, fn(*jobs[i]))
    else:
        # The fork server, not a fork of this process: a forked torch with its thread pool already
        # started can deadlock.
        with ProcessPoolExecutor(workers, mp_context=context or pool_context(), initializer=init_worker,
                                 initargs=(os.getpid(),)) as pool:
            running = {}
            try:
                while True:
                    # One job queued beyond the busy workers: a worker that ends takes the next at once,
                    # without waiting for this process to wake up and choose it.
                    while len(running) < workers + 1 and (i := ready()) is not None:
                        pending.remove(i)
                        running[pool.submit(fn, *jobs[i])] = i
                    if not running:
                        break
                    ended, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in ended:
                        i = running.pop(fut)
                        finished(len(done) + 1, i, fut.result())
            except BaseException:
                # A failed job, a refused result (each() raised) or Ctrl-C: the jobs not started are dropped
                # instead of run to the end before the error is seen; the running ones end with their job.
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    if pending:
        raise ValueError(f"jobs {sorted(pending)} need jobs that never ran (needs: a cycle or a bad index)")
    log(f"{what}: {len(jobs)} done in {time.time() - t:.1f}s")
    return out


def submission_order(cost, n: int) -> list[int]:
    """Job indices, dearest first (ties and no estimate: the given order)."""
    if cost is None:
        return list(range(n))
    if len(cost) != n:
        raise ValueError(f"cost has {len(cost)} estimates for {n} jobs")
    return sorted(range(n), key=lambda i: -cost[i])


if __name__ == "__main__":
    write_bytecode()
