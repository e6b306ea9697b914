"""Reliability (issue 33): verify reads what training reads, a damaged cache is one line wherever it is read,
a killed trainer leaves no process behind, dropped items are never silent, n_items is what was scored.

Each test reproduces its case as the issue found it.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cache import refcache as rc
from pipeline.cli import main
from pipeline.data.loaders import read_profiles
from tests.test_hardening import (cache, env, flip_in_dataset, invoke, memo, one_error_line,  # noqa: F401 (fixtures)
                                  overrides, train_args)
from tests.test_refcache import make_samples, write_cache

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

REPO = Path(__file__).resolve().parent.parent


# ================================================================ helpers


def rewrite_sha256(cache_dir: Path, shard: Path) -> None:
    """Make the manifest and the completion record agree with a shard's bytes again, as a careless repair would."""
    digest = rc.hash_file(shard)
    manifest = json.loads((cache_dir / rc.MANIFEST).read_text())
    for entry in manifest["shards"]:
        if entry["name"] == shard.name:
            entry["sha256"] = digest
    (cache_dir / rc.MANIFEST).write_text(json.dumps(manifest))
    record_path = shard.with_suffix(".json")
    record = json.loads(record_path.read_text())
    record["sha256"] = digest
    record_path.write_text(json.dumps(record))


def damage(cache_dir: Path, dataset: str, shards=None) -> list[Path]:
    """One bit flipped inside `dataset` of each shard, sha256 rewritten to match: only Fletcher32 can tell."""
    paths = sorted(cache_dir.glob("refs-*.h5")) if shards is None else [cache_dir / s for s in shards]
    for path in paths:
        flip_in_dataset(path, dataset)
        rewrite_sha256(cache_dir, path)
    return paths


# ================================================================ 1. verify reads every dataset


@pytest.fixture
def synthetic(tmp_path):
    write_cache(tmp_path / "c", make_samples(12, logp_every=1), 2)
    return tmp_path / "c"


@pytest.mark.parametrize("dataset", ["ref_logp_own", "topk_prob"])   # uncompressed, and gzip-compressed
def test_verify_reads_every_dataset_and_names_the_damaged_one(synthetic, dataset):
    """The issue's case: one bit flipped in ref_logp_own, sha256 rewritten; verify said OK, train refused."""
    damage(synthetic, dataset, ["refs-00000-of-00002.h5"])
    result = CliRunner().invoke(main, ["cache", "verify", str(synthetic)])
    assert result.exit_code == 1
    problems = [line for line in result.output.splitlines() if line.startswith("refs-")]
    assert len(problems) == 1, result.output
    assert problems[0].startswith(f"refs-00000-of-00002.h5: dataset {dataset} cannot be read")
    assert "Fletcher32" in problems[0] and "recompute this shard" in problems[0]
    quick = CliRunner().invoke(main, ["cache", "verify", "--quick", str(synthetic)])
    assert quick.exit_code == 0, quick.output
    assert "quick: sha256 and structure only, datasets not read" in quick.output


def test_verify_checks_the_formats_value_ranges(synthetic):
    """Values written through HDF5 keep valid checksums: the format's own ranges still catch them."""
    assert rc.verify_cache(synthetic) == []
    shard = synthetic / "refs-00001-of-00002.h5"
    with h5py.File(shard, "r+") as f:
        f["topk_idx"][3, 0] = 40000          # beyond the 32000-entry vocabulary
        f["ref_logp_own"][1] = 2.5           # a log-likelihood above 0
    rewrite_sha256(synthetic, shard)
    problems = rc.verify_cache(synthetic)
    assert problems == [
        "refs-00001-of-00002.h5: dataset ref_logp_own: 1 value(s) not a log-likelihood (<= 0, or NaN), "
        "first at row 1 (2.5); recompute this shard",
        "refs-00001-of-00002.h5: dataset topk_idx: 1 value(s) outside [0, 32000), first at row 3 (40000); "
        "recompute this shard"]
    assert rc.verify_cache(synthetic, quick=True) == []


# ================================================================ 2. the refusal says what is wrong


@pytest.mark.parametrize("method", ["viker", "npo"])   # viker reads it in a DataLoader worker, npo at setup
def test_a_damaged_cache_is_one_line_naming_shard_dataset_and_remedy(env, cache, tmp_path, memo, method):
    bad = shutil.copytree(cache, tmp_path / "bad")
    damage(bad, "ref_logp_own")          # every shard: the first batch of any shuffle meets one
    line = one_error_line(invoke("train", *train_args(env, bad, tmp_path / "run", f"train.method={method}",
                                                      "train.data_workers=2")))
    assert "Caught" not in line and "file system error" not in line
    assert line.startswith("Error: shard refs-0000") and f"in {bad}: dataset ref_logp_own cannot be read" in line
    assert f"run viker cache verify {bad}, then recompute that shard" in line
    assert not (tmp_path / "run" / "adapter").exists()


# ================================================================ 3. no orphans


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of pid with its start time (/proc/<pid>/stat field 22: a reused pid differs).

    From each process's parent pid in /proc/*/stat, which every Linux kernel has
    (/proc/<pid>/task/*/children needs CONFIG_PROC_CHILDREN).
    """
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child in [c for c, p in parents.items() if p == parent and c not in found]:
            if alive(child):
                found[child] = start_time(child)
                todo.append(child)
    return found


def start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(pid: int, started: str | None = None) -> bool:
    """Running (not a zombie waiting to be reaped), and the same process when `started` is given."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and (started is None or start_time(pid) == started)


def kill_and_time(proc: subprocess.Popen, children: dict[int, str], limit: float = 5.0) -> float:
    """SIGKILL proc; seconds until none of `children` runs (fails after `limit`)."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    while time.monotonic() - t0 < limit:
        if not any(alive(pid, started) for pid, started in children.items()):
            return time.monotonic() - t0
        time.sleep(0.05)
    left = [pid for pid, started in children.items() if alive(pid, started)]
    for pid in left:                      # the test's own leftovers must not outlive it
        os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"{len(left)} of {len(children)} child process(es) still ran {limit:.0f} s after the "
                         f"SIGKILL: {left}")


def start_driver(tmp_path: Path, code: str, *args) -> tuple[subprocess.Popen, Path]:
    """A python process running `code` (which writes the marker when it is where the kill must land)."""
    script, marker = tmp_path / "driver.py", tmp_path / "marker"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(REPO), "VIKER_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(marker), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, marker


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended first: {proc.stderr.read().decode()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("the driver never reached the point of the kill")
        time.sleep(0.1)


# The kill lands inside save_checkpoint: the adapter and state.pt are written, train_config.json and the
# rename into place are not (torch.save is held open there until the test kills the process).
MID_CHECKPOINT = """
import sys, time
from pathlib import Path
import torch
import pipeline.stage2.checkpoint as ck
real_save, marker = torch.save, Path(sys.argv[1])

def save_then_hold(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    if Path(path).name == "state.pt":
        marker.write_text("mid-checkpoint")
        time.sleep(600)

ck.torch.save = save_then_hold
from pipeline.cli import main
main(sys.argv[2:])
"""

# Two pool workers (the demo's and the study's run_parallel), each in a job when the kill lands.
POOL = """
import sys, time
from pathlib import Path

def job(marker, i):
    Path(f"{marker}.{i}").write_text("running")
    time.sleep(600)

if __name__ == "__main__":
    from pipeline.jobs.workers import run_parallel
    marker = Path(sys.argv[1])
    import threading
    def watch():
        while not all(Path(f"{marker}.{i}").exists() for i in range(2)):
            time.sleep(0.05)
        marker.write_text("both running")
    threading.Thread(target=watch, daemon=True).start()
    run_parallel(2, job, [(str(marker), 0), (str(marker), 1)], print, "jobs")
"""

# Stage one, killed while it writes its second shard.
MID_PRECOMPUTE = """
import sys, time
from pathlib import Path
from pipeline.cache import refcache
real_write, marker, written = refcache.write_shard, Path(sys.argv[1]), []

def write_then_hold(*args, **kwargs):
    written.append(real_write(*args, **kwargs))
    if len(written) == 2:
        marker.write_text("mid-precompute")
        time.sleep(600)
    return written[-1]

refcache.write_shard = write_then_hold
from pipeline.cli import main
main(sys.argv[2:])
"""


@pytest.mark.slow     # ~8 s (a trainer process with its workers); the fast suite checks the guard itself below
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the guard is Linux's prctl")
def test_a_trainer_killed_mid_checkpoint_leaves_no_worker(env, cache, tmp_path):
    proc, marker = start_driver(tmp_path, MID_CHECKPOINT, "train",
                                *train_args(env, cache, tmp_path / "run", "train.method=viker", "train.steps=4",
                                            "train.save_every=1", "train.data_workers=2"))
    wait_for(marker, proc)
    children = descendants(proc.pid)
    assert len(children) >= 2, "the two DataLoader workers run while the checkpoint is written"
    seconds = kill_and_time(proc, children)
    print(f"DataLoader workers gone {seconds:.2f} s after the trainer's SIGKILL")


def _death_signal() -> int:
    """This process's parent-death signal, as prctl(PR_GET_PDEATHSIG) reads it (0: none)."""
    import ctypes
    value = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)        # 2: PR_GET_PDEATHSIG
    return value.value


class _SignalData:
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return i, _death_signal()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard is Linux's prctl")
def test_the_trainers_dataloader_workers_arm_the_guard():
    """The fast check of what the slow kill test shows: a trainer's DataLoader worker has SIGKILL armed as its
    parent-death signal (stage2/stream.Loader, threads.die_with_parent), and close() leaves no worker."""
    import multiprocessing
    import signal
    from pipeline.stage2.stream import Loader, Stream
    before = set(multiprocessing.active_children())
    stream = Stream(4, 0, 0, 1)
    loader = Loader(_SignalData(), lambda batch: {"rows": [i for i, _ in batch], "signal": batch[0][1]}, stream, 1,
                    workers=1)
    assert loader.next(stream.take(1))["signal"] == int(signal.SIGKILL)
    assert _death_signal() == 0, "the test process itself is not armed"
    loader.close()
    assert not set(multiprocessing.active_children()) - before


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the guard waits on a Linux pidfd")
def test_die_with_ends_a_process_when_another_one_ends():
    """A pool worker's guard (threads.die_with): its parent is the fork server, so it watches the command."""
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    code = f"import time; from pipeline.threads import die_with; assert die_with({watched.pid}); time.sleep(60)"
    watcher = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        time.sleep(0.5)
        assert watcher.poll() is None, "alive while the watched process runs"
        watched.kill()
        watched.wait()
        assert watcher.wait(timeout=5) == -signal.SIGKILL
    finally:
        for p in (watched, watcher):
            if p.poll() is None:
                p.kill()


@pytest.mark.slow     # ~5 s (a driver whose fork server imports the model libraries); fast check below
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the guard is Linux's prctl")
def test_a_killed_job_pool_leaves_no_worker(tmp_path):
    proc, marker = start_driver(tmp_path, POOL)
    wait_for(marker, proc)
    children = descendants(proc.pid)
    assert len(children) >= 2, "two pool workers, each in its job"
    seconds = kill_and_time(proc, children)
    print(f"pool workers gone {seconds:.2f} s after the parent's SIGKILL")


def _guards(_):
    import threading
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("die-with-"))


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the guard waits on a Linux pidfd")
def test_each_pool_worker_watches_the_command_that_started_the_pool():
    """The fast check of the slow kill test above: every pool worker runs its jobs with the guard of
    test_die_with_ends_a_process_when_another_one_ends armed on the process that called run_parallel."""
    import multiprocessing
    from pipeline.jobs.workers import run_parallel
    out = run_parallel(2, _guards, [(0,), (1,)], lambda *_: None, "t", context=multiprocessing.get_context("fork"))
    assert out == [[f"die-with-{os.getpid()}"]] * 2


@pytest.mark.slow     # ~6 s (a precompute process); stage one starts no worker of its own
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_precompute_leaves_no_process(env, tmp_path):
    proc, marker = start_driver(tmp_path, MID_PRECOMPUTE, "precompute", *overrides(env, tmp_path / "refs"))
    wait_for(marker, proc)
    children = descendants(proc.pid)
    assert children == {}, "stage one runs in one process"
    kill_and_time(proc, children)


# ================================================================ 4. dropped items are named, or refused


@pytest.fixture(scope="module")
def gappy(env, tmp_path_factory):
    """The benchmark with one forget QA whose answer is empty (the issue's 35 of 36; here 11 of 12)."""
    root, model = env
    copy = shutil.copytree(root, tmp_path_factory.mktemp("gappy") / "mini")
    path = sorted((copy / "forget_10").glob("*.parquet"))[0]
    table = pq.read_table(path)
    rows = table.to_pylist()
    meta = json.loads(rows[0]["metadata"])
    meta[2]["Answer"] = ""
    rows[0]["metadata"] = json.dumps(meta)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return copy, model, f"{rows[0]['ID']}/metadata[2]"


def test_readers_name_each_dropped_item_and_a_row_without_training_qa(gappy):
    from pipeline.data.records import Dropped, describe_drops
    root, _, item = gappy
    dropped = []
    profiles = read_profiles(root, "forget_10", dropped=dropped)
    assert sum(len(p.qa) for p in profiles) == 11
    assert dropped == [Dropped("forget_10", item, "empty Answer")]
    # An Additional_* entry is another kind of entry, not a bad QA; a row with no training QA at all is dropped.
    from pipeline.data.mllmu import _drops, _metadata
    empty = []
    assert _metadata('[{"Additional_question": "x"}]', "here", empty=empty) == [] and empty == []
    rows = []
    _drops("forget_10", "p9", [], [], rows)
    assert rows == [Dropped("forget_10", "p9", "no training QA")]
    assert describe_drops(rows * 5) == ("5 forget_10 training items dropped for their content: p9 (no training QA), "
                                        "p9 (no training QA), p9 (no training QA) and 2 more")


def test_precompute_and_train_name_the_dropped_item_and_record_it(gappy, tmp_path):
    root, model, item = gappy
    base = [f"data.root={root}", f"model.path={model}", "model.device=cpu", f"precompute.output={tmp_path / 'refs'}",
            "precompute.k=2", "precompute.top_k=8", "precompute.shard_size=8"]
    note = f"1 forget_10 training item dropped for its content: {item} (empty Answer)"
    result = invoke("precompute", *base)
    assert result.exit_code == 0, result.output
    assert [line for line in result.output.splitlines() if "dropped" in line] == [
        f"[precompute] {note} (--strict / data.strict=true refuses this)"]
    manifest = json.loads((tmp_path / "refs" / rc.MANIFEST).read_text())
    assert manifest["dropped"] == [{"split": "forget_10", "id": item, "reason": "empty Answer"}]
    assert manifest["totals"]["n_samples"] == 11 and "dropped" not in manifest["sources"]
    assert rc.verify_cache(tmp_path / "refs") == []

    run = tmp_path / "run"
    args = [*base, f"train.output={run}", "train.steps=1", "train.batch_size=2", "train.lora_r=2",
            "train.method=graddiff"]
    result = invoke("train", *args)
    assert result.exit_code == 0, result.output
    assert f"[train] {note} (--strict / data.strict=true refuses this)" in result.output.splitlines()
    recorded = json.loads((run / "train_config.json").read_text())
    assert recorded["dropped"] == manifest["dropped"]

    # --overwrite: train's refusal of a directory holding a run's results comes first otherwise.
    for command, more in (("precompute", base), ("train", ["--overwrite", *args])):
        line = one_error_line(invoke(command, "--strict", *more))
        assert line == f"Error: data.strict: {note}; fix the data, or run without --strict (data.strict=false)"
    assert json.loads((run / "train_config.json").read_text()) == recorded, "a refused run touches nothing"
    assert json.loads((tmp_path / "refs" / rc.MANIFEST).read_text()) == manifest


def test_a_manifest_without_a_dropped_record_still_reads(synthetic):
    """Caches written before the record existed: readable, and their drops unknown rather than none."""
    manifest = json.loads((synthetic / rc.MANIFEST).read_text())
    assert "dropped" not in manifest
    with rc.RefCacheReader(synthetic) as reader:
        assert len(reader) == 12 and reader.manifest.get("dropped") is None


# ================================================================ 5. n_items is what was scored


def test_n_items_counts_what_was_scored(gappy, tmp_path, monkeypatch):
    """The demo's settings: max_profiles 12 of retain's people, tasks gen and fact, likelihood on forget only."""
    import pipeline.evaluation.evaluate as ev
    from tests.tiny import evaluate_with
    root, model, item = gappy
    monkeypatch.setattr(ev, "fact_accuracy", lambda model, processor, profiles, **kw: {"acc": 0.5})
    monkeypatch.setattr(ev, "generate", lambda model, processor, images, prompts, **kw: ["x"] * len(prompts))
    monkeypatch.setattr(ev, "likelihood_metrics", lambda *a, **k: (dict.fromkeys(ev.LL_METRIC_KEYS), []))
    row = evaluate_with(ev.evaluate, model, root, "forget_10", results_path=tmp_path / "r.jsonl",
                        sets="forget,retain", max_profiles=3, tasks="gen,fact", likelihood_sets="forget", mia="off",
                        max_new_tokens=2, device="cpu")
    retain = read_profiles(root, "retain_90")
    assert len(retain) > 3
    first = retain[:3]
    assert row["n_items"]["retain"] == {"profiles": 3, "mc": 0, "gen": sum(len(p.generation) for p in first),
                                        "cloze": 0, "mc_ll": 0, "cloze_ll": 0, "fact": sum(len(p.qa) for p in first)}
    assert row["n_items"]["forget"]["fact"] == 11, "the forget QA asked: the dropped one is not"
    assert row["dropped"] == [{"split": "forget_10", "id": item, "reason": "empty Answer"}]
