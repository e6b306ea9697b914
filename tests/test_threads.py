"""The OpenMP wait policy: decided from what the cores do now, never from the lagging load average."""
import os
import subprocess
import sys

import pipeline.threads as threads
from pipeline.threads import busy_cores, busy_elsewhere, cpu_times, openmp_wait_policy

STAT = """cpu  300 0 100 600 0 0 0 0 0 0
cpu0 100 0 50 300 0 0 0 0 0 0
cpu1 200 5 50 290 10 1 2 3 0 0
intr 826111 0 0
"""


def test_cpu_times_sums_the_wanted_cpus_by_hand():
    assert cpu_times(STAT, [0]) == (150, 450)
    # cpu1: busy = 200 + 5 + 50 + 1 + 2 + 3 = 261; free = idle 290 + iowait 10
    assert cpu_times(STAT, [1]) == (261, 561)
    assert cpu_times(STAT, [0, 1]) == (411, 1011)
    assert cpu_times(STAT, [7]) == (0, 0)          # a CPU outside the affinity mask is not read


def test_busy_cores_from_two_readings():
    assert busy_cores((100, 1000), (150, 1100), 2) == 1.0    # 50 of 100 jiffies busy on 2 cores
    assert busy_cores((100, 1000), (100, 1100), 2) == 0.0
    assert busy_cores((100, 1000), (100, 1000), 2) == 0.0    # no time passed: nothing measured


def test_policy_thresholds():
    assert openmp_wait_policy(0.0) == {"GOMP_SPINCOUNT": threads.SHORT_SPIN}
    assert openmp_wait_policy(0.49) == {"GOMP_SPINCOUNT": threads.SHORT_SPIN}
    assert openmp_wait_policy(0.5) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_wait_policy(2.0) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_wait_policy(None) == {"GOMP_SPINCOUNT": threads.SHORT_SPIN}   # not Linux: the fast default


def test_busy_elsewhere_reads_the_window_not_the_load_average(tmp_path, monkeypatch):
    """The newcomer's case: pip just kept both cores busy, the 1-minute average says 3, the cores are idle."""
    cpus = sorted(os.sched_getaffinity(0))
    stat = tmp_path / "stat"

    def write(busy, idle):
        stat.write_text("".join(f"cpu{c} {busy} 0 0 {idle} 0 0 0 0 0 0\n" for c in cpus))

    write(1000, 1000)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    monkeypatch.setattr(threads._time, "sleep", lambda s: write(1000, 1010))   # 10 idle jiffies per CPU
    assert busy_elsewhere(stat_path=str(stat)) == 0.0
    write(1000, 1000)
    monkeypatch.setattr(threads._time, "sleep", lambda s: write(1010, 1000))   # 10 busy jiffies per CPU
    assert busy_elsewhere(stat_path=str(stat)) == len(cpus)
    assert busy_elsewhere(stat_path=str(tmp_path / "missing")) is None


def _policy_in_child(extra_env: dict) -> str:
    code = "import os, pipeline.threads as t; t.apply_wait_policy(); print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(extra_env)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_environment_wins():
    assert _policy_in_child({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE None"
    assert _policy_in_child({"GOMP_SPINCOUNT": "5"}) == "None 5"


def test_a_busy_core_beside_it_makes_threads_sleep():
    """A CPU-bound loop on one core (>= 1.0 busy core against the 0.5 threshold): PASSIVE."""
    hog = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"])
    try:
        import time
        time.sleep(0.3)                       # let it reach its loop
        assert _policy_in_child({}) == "PASSIVE None"
    finally:
        hog.kill()
        hog.wait()


def test_thread_note_says_what_was_decided(monkeypatch):
    monkeypatch.setattr(threads, "_DECIDED_FROM", "other processes kept 1.7 of 2 cores busy at start-up")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert threads.thread_note() == ("OpenMP threads sleep when idle (PASSIVE): "
                                      "other processes kept 1.7 of 2 cores busy at start-up")
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")        # libgomp lets the spin count win
    monkeypatch.setattr(threads, "_DECIDED_FROM", "")
    assert threads.thread_note() == "OpenMP threads spin 10000 times, then sleep: set in the environment"


def test_importing_the_package_does_no_work():
    """`import pipeline` (and the config) leaves os.environ as it was and does not sleep."""
    code = ("import os, time; before = dict(os.environ); t = time.perf_counter(); "
            "import pipeline, pipeline.config, pipeline.cli; took = time.perf_counter() - t; "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items()); "
            "import pipeline.threads; print(round(took, 3))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_import_does_not_sleep(monkeypatch):
    import importlib
    import time
    slept = []
    monkeypatch.setattr(time, "sleep", lambda s: slept.append(s))
    import pipeline
    importlib.reload(pipeline)
    importlib.reload(threads)
    assert slept == []
