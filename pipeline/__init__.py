"""viker: machine unlearning for multimodal LLMs (stage one, the cache, stage two, evaluation)."""
import os as _os


def openmp_wait_policy(load: float, cores: int) -> str | None:
    """PASSIVE when the cores are already busy, else None (libgomp's default: spin briefly, then sleep).

    Measured on the 2-core machine, one fine-tuning step of the tiny model, 2 threads:
    quiet (load ~1.8): default/ACTIVE 0.104 s, PASSIVE 0.186 s (futex wake-ups on every small op);
    busy (load ~3.5):  default 0.82 s, PASSIVE 0.21 s (spinning threads starve each other and
    the other jobs). One thread: 0.197 s quiet, 0.27 s busy.
    """
    return "PASSIVE" if load >= cores else None


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's CPU set)."""
    return len(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") else (_os.cpu_count() or 1)


def _set_wait_policy() -> None:
    # Read by OpenMP when torch loads it, so it must be decided before torch is imported;
    # an explicit OMP_WAIT_POLICY in the environment always wins.
    if "OMP_WAIT_POLICY" in _os.environ or not hasattr(_os, "getloadavg"):
        return
    policy = openmp_wait_policy(_os.getloadavg()[0], usable_cores())
    if policy:
        _os.environ["OMP_WAIT_POLICY"] = policy


_set_wait_policy()
