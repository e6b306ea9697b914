"""OpenMP's wait policy for the CPU threads, decided from what the cores are doing now; workers dying with their parent.

Nothing here runs at import: `apply_wait_policy()` is called by the `viker`
command (pipeline/cli.py) and by the worker spawner (pipeline/jobs/workers.py);
`die_with_parent()` and `die_with()` by the workers themselves (stage2/stream.py, jobs/workers.py).
"""
import os as _os
import time as _time

# OpenMP threads that finish a parallel region spin this many times waiting for the next one, then sleep.
# libgomp's default is 300000. Measured on the 2-core machine (benchmarks/threads_bench.py, demo
# fine-tuning step, 2 threads): quiet 0.067 s at 10k (0.068 at 300k); but with two CPU-bound jobs
# beside it 0.16-0.27 s at 10k against 0.66-1.19 s at 300k. So a decision that goes stale (load
# arriving after start-up) costs ~1.5x, not ~5x.
SHORT_SPIN = "10000"
# Other processes keeping at least this many of our cores busy make spinning the wrong bet: with one
# CPU-bound loop beside it, a step took 0.23 s spinning (10k) against 0.13 s PASSIVE.
BUSY_CORES = 0.5


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask, e.g. a container's CPU set)."""
    if hasattr(_os, "sched_getaffinity"):
        return sorted(_os.sched_getaffinity(0))
    return list(range(_os.cpu_count() or 1))


def usable_cores() -> int:
    return len(usable_cpus())


def cpu_times(stat_text: str, cpus) -> tuple[int, int]:
    """(busy, total) jiffies of the given CPUs summed from /proc/stat's `cpuN` lines.

    idle and iowait count as free; user, nice, system, irq, softirq and steal as
    busy (guest time is already inside user).
    """
    busy = total = 0
    wanted = {f"cpu{c}" for c in cpus}
    for line in stat_text.splitlines():
        name, *fields = line.split()
        if name in wanted:
            v = [int(x) for x in fields[:8]] + [0] * (8 - len(fields[:8]))
            free = v[3] + v[4]
            total += sum(v)
            busy += sum(v) - free
    return busy, total


def busy_cores(before: tuple[int, int], after: tuple[int, int], cores: int) -> float:
    """How many of `cores` were busy between two cpu_times readings (0 when no time passed)."""
    d_busy, d_total = after[0] - before[0], after[1] - before[1]
    return cores * d_busy / d_total if d_total > 0 else 0.0


def busy_elsewhere(window: float = 0.1, stat_path: str = "/proc/stat") -> float | None:
    """Cores that other processes keep busy *now*: /proc/stat over `window` s while this one sleeps.

    Not the load average: its 1-minute mean still reads "busy" for a minute after
    a job ends, e.g. right after `make` has run pip on both cores (issue #20).
    None where /proc/stat cannot be read (not Linux).
    """
    cpus = usable_cpus()
    try:
        with open(stat_path) as f:
            before = cpu_times(f.read(), cpus)
        _time.sleep(window)
        with open(stat_path) as f:
            after = cpu_times(f.read(), cpus)
    except OSError:
        return None
    return busy_cores(before, after, len(cpus))


def openmp_wait_policy(busy: float | None) -> dict[str, str]:
    """The OpenMP variables to set, given the cores other processes keep busy (None: unknown).

    Busy: threads sleep at once (PASSIVE), since a spinning thread burns the
    slice its descheduled partner needs. Otherwise: a short spin, fast when
    quiet and bounded when load arrives later. The thread count is never
    changed here: it changes float sums, and a run must give the same numbers
    on one machine whatever else is running.
    """
    if busy is not None and busy >= BUSY_CORES:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {"GOMP_SPINCOUNT": SHORT_SPIN}


def thread_note() -> str:
    """One line for the logs: what this process decided and from what."""
    policy = _os.environ.get("OMP_WAIT_POLICY", "")
    spin = _os.environ.get("GOMP_SPINCOUNT", "")
    if spin:                                   # libgomp: an explicit spin count wins over the policy
        how = f"spin {spin} times, then sleep"
    elif policy.upper() == "PASSIVE":
        how = "sleep when idle (PASSIVE)"
    else:
        how = policy or "libgomp default"
    return f"OpenMP threads {how}: {_DECIDED_FROM or 'set in the environment'}"


_DECIDED_FROM = ""


def apply_wait_policy() -> None:
    """Decide the OpenMP wait policy for this process and the processes it starts (sets os.environ).

    Called by the entry points that start heavy work (the `viker` command
    before any command runs, the worker spawner), never at import: OpenMP reads
    the variables when torch loads it, so it must run before torch is imported
    to affect this process; workers inherit the decision. Either variable
    already in the environment wins.
    """
    global _DECIDED_FROM
    if "OMP_WAIT_POLICY" in _os.environ or "GOMP_SPINCOUNT" in _os.environ:
        return
    busy = busy_elsewhere()
    _os.environ.update(openmp_wait_policy(busy))
    _DECIDED_FROM = ("other processes' load unknown" if busy is None else
                     f"other processes kept {busy:.1f} of {usable_cores()} cores busy at start-up")



# prctl(2) option: the signal a process receives when the thread that created it exits.
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, *_) -> bool:
    """Have this worker process killed (SIGKILL) when its parent dies, even by SIGKILL; True where armed.

    A worker initializer (DataLoader worker_init_fn, which also passes the worker
    id; the job pool's initializer). Linux only (prctl PR_SET_PDEATHSIG, via
    ctypes); elsewhere nothing is armed. The signal fires when the parent
    *thread* that started the worker exits: the DataLoader and the pool start
    theirs from the thread that goes on using them. A parent that died before
    the signal was armed is caught by comparing the parent pid (the orphan was
    re-parented), and this process ends at once.
    """
    import sys
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal
    try:
        armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):   # no prctl symbol (an unusual libc): the DataLoader's watchdog remains
        return False
    if _os.getppid() != parent_pid:
        _os.kill(_os.getpid(), signal.SIGKILL)
    return armed


def die_with(pid: int, also: tuple[int, ...] = ()) -> bool:
    """Have this process killed (SIGKILL) when process `pid`, not necessarily its parent, ends; True where armed.

    `also`: processes killed first (a pool worker takes its fork server along, which would otherwise exit
    by itself only after shutting down an interpreter holding torch: over 5 s on a loaded machine).

    For a job pool's worker, whose parent is the fork server: the server
    outlives the command that started it as long as any of its children holds
    its keep-alive pipe, the workers included, so a parent-death signal would
    never fire. A daemon thread waits on a pidfd of `pid` (Linux >= 5.3; no
    polling, no cost while it waits). Where none can be opened nothing is armed.
    A `pid` already gone ends this process at once.
    """
    import signal
    import threading
    if not hasattr(_os, "pidfd_open"):
        return False
    try:
        fd = _os.pidfd_open(pid)
    except ProcessLookupError:
        _os.kill(_os.getpid(), signal.SIGKILL)
        return False
    except OSError:                 # an old kernel or a sandbox without pidfds
        return False

    def wait() -> None:
        import select
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        while not poll.poll():
            pass
        for other in also:
            try:
                _os.kill(other, signal.SIGKILL)
            except OSError:
                pass
        _os.kill(_os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, name=f"die-with-{pid}", daemon=True).start()
    return True
