"""`viker demo`: the sweep's plan and its parallel workers keep the table's order and lose no row."""
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from pipeline.jobs import demo
from pipeline.study import grid as study
from pipeline.config import load_config
from pipeline.jobs.workers import run_parallel


def test_sweep_plan_order_and_labels():
    cfg = load_config("configs/demo.yaml", ["demo.methods=ga,viker", "demo.budgets=8,16", "demo.lams=0.05,0.5",
                                            "demo.seeds=0,1"])
    plan = demo.sweep_plan(cfg)
    assert [(r["label"], r["budget"], r["seed"]) for r in plan[:4]] == [("GA", 8, 0), ("GA", 8, 1), ("GA", 16, 0),
                                                                        ("GA", 16, 1)]
    assert [r["label"] for r in plan[4:]] == ["ViKeR λ=0.05"] * 4 + ["ViKeR λ=0.5"] * 4
    assert len({r["name"] for r in plan}) == len(plan) == 12     # one folder per run
    retain_aware = demo.sweep_plan(load_config("configs/demo.yaml", ["demo.methods=viker+nll", "demo.budgets=8",
                                                                     "demo.lams=0.5"]))
    assert [(r["method"], r["label"]) for r in retain_aware] == [("viker+nll", "ViKeR+NLL")]


def test_run_parallel_in_process_keeps_job_order_and_reports_each():
    seen = []
    out = run_parallel(1, divmod, [(7, 2), (9, 4), (1, 1)], lambda *_: None, "t",
                       each=lambda i, r: seen.append((i, r)), pin_single=False)
    assert out == [(3, 1), (2, 1), (1, 0)] and seen == [(0, (3, 1)), (1, (2, 1)), (2, (1, 0))]


def test_dearest_runs_are_handed_out_first_and_results_keep_plan_order():
    from pipeline.jobs.workers import submission_order
    cfg = load_config("configs/demo.yaml", ["demo.methods=ga,viker", "demo.budgets=16,32", "demo.attack_budget=32"])
    plan = [None, "gold"] + demo.sweep_plan(cfg)
    cost = [demo.run_cost(cfg, run) for run in plan]
    order = [plan[i] for i in submission_order(cost, len(plan))]
    # the gold row (evaluation + relearning + its answers) first, then the attacked 32-step runs, the 16-step last
    assert order[0] == "gold"
    assert demo.run_cost(cfg, demo.GATE) > max(cost), "the gate's verdict comes first"
    assert [r["budget"] for r in order[1:3]] == [32, 32] and [r["budget"] for r in order[-2:]] == [16, 16]
    assert submission_order(None, 3) == [0, 1, 2] and submission_order([1, 1, 2], 3) == [2, 0, 1]
    with pytest.raises(ValueError, match="2 estimates for 3 jobs"):
        submission_order([1, 2], 3)


@pytest.mark.slow
def test_demo_end_to_end_with_two_workers(tmp_path):
    """The whole demo at CI size (~1 min on 2 cores): every planned row, in plan order, once."""
    over = [o for o in study.QUICK if not o.startswith("study.")] + [
        f"data.root={tmp_path}/mini", f"finetune.base={tmp_path}/base", f"finetune.output={tmp_path}/vanilla",
        f"model.path={tmp_path}/vanilla", f"precompute.output={tmp_path}/refs", f"train.output={tmp_path}/runs",
        f"evaluate.results={tmp_path}/runs/results.jsonl", "demo.methods=ga,viker", "demo.budgets=2,4",
        "demo.lams=0.5", "demo.workers=2", "demo.attack_budget=4", "mini.n_holdout=3",
        "evaluate.attacks="]   # the QUICK model has one decoder layer: no layer before the output to lens
    cfg = load_config("configs/demo.yaml", over)
    logs = []
    out = demo.run_demo(cfg, log=logs.append)
    rows = [json.loads(line) for line in open(out["results"])]
    assert [(r["method"], r["budget"]) for r in rows] == [("Vanilla", 0), ("Gold", 0), ("GA", 2), ("GA", 4),
                                                          ("ViKeR", 2), ("ViKeR", 4)]
    assert all("forget" in r["metrics"] and "retain" in r["metrics"] for r in rows)
    # Membership inference on every row (PrivLeak against the gold model, which itself is read against
    # chance); the relearning attack on the gold row and at demo.attack_budget only.
    assert all("mia" in r["metrics"] for r in rows) and "privleak_min_k" not in rows[1]["metrics"]["mia"]
    assert all("privleak_min_k" in r["metrics"]["mia"] and "privleak_ou_min_k" in r["metrics"]["mia"]
               for r in rows[2:])
    assert [("relearn" in r["metrics"]) for r in rows] == [False, True, False, True, False, True]
    assert sum(line.startswith("[unlearn] GA") for line in logs) == 2
    assert any("the gate with the vanilla row, stage one and 5 runs on 2 worker(s): 7 done" in line for line in logs)
    assert any("Vanilla model: attribute accuracy" in line for line in logs), "the gate's table"
    # One evaluation serves the gate and the Vanilla row: they cannot disagree.
    for name, gate_name in demo.GATE_SETS.items():
        assert out["gate"][gate_name]["n"] == rows[0]["n_items"][name]["fact"] > 0, name
        assert out["gate"][gate_name]["acc"] == rows[0]["metrics"][name]["fact_acc"], name
    assert any(line.startswith("[gold] gold model (never trained on forget_10)") for line in logs)
    table = open(out["report"]["markdown"]).read()
    header = next(line for line in table.splitlines() if line.startswith("| Method |"))
    # "Relearn - gold" needs a gold recovery: at this size the vanilla model may know none of the held-out
    # items (recovery undefined), and the column is then left out (tests/test_report.py covers it).
    for column in ("MIA AUC (min-k)", "PrivLeak viker (min-k)", "PrivLeak OU (min-k)", "Relearn"):
        assert f"| {column} |" in header, header


def _start_method(_):
    import multiprocessing
    return multiprocessing.get_start_method()


# The scheduling tests fork this test process for their workers (tests/conftest.py: one torch thread, so no
# thread pool to copy): the fork server would import the model libraries first, ~5 s per test process. The
# server itself is tested below, once, behind the slow marker.
FORK = multiprocessing.get_context("fork")


def test_pool_workers_fork_their_own_children():
    """DataLoader workers inside a pool worker must fork, not spawn (a spawn re-imports torch per run); the
    dearest job is handed out first and the results still come back in job order."""
    assert run_parallel(2, _start_method, [(0,), (1,)], lambda *_: None, "t", cost=[1, 2],
                        context=FORK) == ["fork", "fork"]


def _frozen(_):
    import gc
    return gc.get_freeze_count() > 0


def test_pool_workers_keep_what_they_were_forked_with_out_of_the_collectors_sight():
    """init_worker freezes what the worker inherited (gc.freeze): a full collection then skips the imported
    libraries' ~400 000 objects instead of walking them in every run."""
    assert run_parallel(2, _frozen, [(0,), (1,)], lambda *_: None, "t", context=FORK) == [True, True]


def test_the_report_libraries_are_imported_beside_once_the_bytecode_helper_has_ended(monkeypatch):
    """import_beside waits for compile_beside's helper (the fork server then imports alone, a core idle),
    imports the modules in order, and stops quietly at one that is missing (the report's own import says so)."""
    import importlib
    from pipeline.jobs import workers
    seen = []

    class Helper:
        def wait(self):
            seen.append("helper ended")

    def fake_import(name):
        seen.append(name)
        if name == "missing":
            raise ImportError(name)
    monkeypatch.setattr(workers, "_HELPER", Helper())
    monkeypatch.setattr(importlib, "import_module", fake_import)
    workers.import_beside(("first", "missing", "never")).join(5)
    assert seen == ["helper ended", "first", "missing"]
    assert set(demo.REPORT_LIBRARIES) >= {"pipeline.jobs.report", "matplotlib.figure"}


def _mark(folder, i):
    time.sleep(0.3 if i else 0.0)
    (Path(folder) / str(i)).write_text("ran")
    return i


def test_a_refused_result_cancels_the_jobs_not_yet_started(tmp_path):
    """The demo's gate is the pool's first job: when each() refuses its result, the queued runs are dropped,
    not run to the end before the error shows."""
    def each(i, _):
        if i == 0:
            raise demo.GateError("refused")
    jobs = [(str(tmp_path), i) for i in range(12)]
    with pytest.raises(demo.GateError, match="refused"):
        run_parallel(2, _mark, jobs, lambda *_: None, "t", each=each, cost=[float("inf")] + [1.0] * 11, context=FORK)
    ran = sorted(int(p.name) for p in tmp_path.iterdir())
    assert 0 in ran and len(ran) <= 5, ran


def _after(folder, i, waits_for):
    if waits_for is None:
        time.sleep(0.4)                  # the job the others wait for ends last, were it not waited for
    else:
        assert (Path(folder) / str(waits_for)).is_file(), f"job {i} started before job {waits_for} ended"
    (Path(folder) / str(i)).write_text("ran")
    return i


@pytest.mark.parametrize("workers", [1, 2])
def test_a_job_that_needs_another_starts_after_it_and_the_rest_go_on(tmp_path, workers):
    """The demo's runs that read the reference cache wait for the job that writes it; the others do not."""
    needs = [None, 0, 0, None, None]
    jobs = [(str(tmp_path), i, w) for i, w in enumerate(needs)]
    # the waiting jobs are the dearest: without `needs` they would be handed out first
    assert run_parallel(workers, _after, jobs, lambda *_: None, "t", cost=[1, 9, 9, 1, 1], needs=needs,
                        context=FORK) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"jobs \[0, 1\] need jobs that never ran"):
        run_parallel(workers, _after, jobs[:2], lambda *_: None, "t", needs=[1, 0], context=FORK)


def _preloaded(_):
    import sys
    return all(m in sys.modules for m in ("torch", "transformers", "peft", "pipeline.stage2.train"))


@pytest.mark.slow       # ~5 s: the fork server imports the model libraries
def test_pool_workers_start_with_the_libraries_already_imported():
    """Pool workers are forks of a server that imported the run's libraries once (jobs/workers.PRELOAD):
    no worker pays ~7 s of imports before its first job."""
    assert run_parallel(2, _preloaded, [(0,), (1,)], lambda *_: None, "t") == [True, True]


def test_the_pool_asks_its_fork_server_to_preload_the_runs_libraries(monkeypatch):
    """The fast check of the test above: the server is asked for PRELOAD, with the workers' environment
    in place while it starts (it reads it when it imports), and this process's environment is left as it was."""
    from multiprocessing import forkserver
    from pipeline.jobs import workers
    asked = {}
    monkeypatch.setattr(forkserver, "set_forkserver_preload", lambda names: asked.update(preload=list(names)))
    monkeypatch.setattr(forkserver, "ensure_running",
                        lambda: asked.update(env={k: os.environ.get(k) for k in workers.WORKER_ENV}))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert workers.pool_context().get_start_method() == "forkserver"
    assert {"torch", "transformers", "peft", "pipeline.stage2.train"} <= set(asked["preload"])
    assert asked["env"] == workers.WORKER_ENV and "OMP_NUM_THREADS" not in os.environ


def test_the_demo_process_itself_loads_no_model_library():
    """With workers, every model job runs in the pool: the command's own process plans the sweep, waits and
    writes the report without importing torch or transformers (their imports are the fork server's alone)."""
    import subprocess
    import sys
    code = ("import sys\nfrom pipeline.config import load_config\nfrom pipeline.jobs import demo, findings, report\n"
            "from pipeline.jobs.workers import import_beside\nimport_beside(demo.REPORT_LIBRARIES).join()\n"
            "from pipeline.evaluation import results\ncfg = load_config('configs/demo.yaml')\n"
            "plan = demo.sweep_plan(cfg)\n"
            "print([r['method'] for r in plan if demo.reads_references(cfg, r)], "
            "[demo.reads_references(cfg, r) for r in (demo.GATE, demo.REFERENCES, None, 'gold')])\n"
            "print('HEAVY' if {'torch', 'transformers'} & set(sys.modules) else 'LIGHT')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "LIGHT", out.stdout + out.stderr
    # GA reads no cache and starts beside stage one; NPO reads the own-answer scores, ViKeR the references
    assert lines[0] == "['npo', 'npo', 'viker', 'viker'] [False, False, False, False]"


def test_the_gate_takes_the_rows_fact_checks_of_the_same_people_and_checks_the_rest(tmp_path, monkeypatch):
    cfg = load_config("configs/demo.yaml", [f"data.root={tmp_path}/mini"])
    demo.ensure_benchmark(cfg, lambda *_: None)
    loads, checked = [], []
    monkeypatch.setattr("pipeline.models.modeling.load_model", lambda *a, **k: loads.append(a) or ("m", "p"))
    monkeypatch.setattr("pipeline.evaluation.factcheck.fact_accuracy",
                        lambda model, processor, profiles, held_out=False: checked.append(len(profiles)) or
                        {"n": len(profiles), "acc": 0.25})
    from pipeline.data.loaders import read_profiles
    forget = len(read_profiles(cfg.data.root, cfg.data.forget_split, "mllmu"))
    row = {"protocol": "viker",
           "metrics": {"forget": {"fact_acc": 0.9, "fact_acc_image": 0.8, "fact_acc_text": 1.0},
                       "retain": {"fact_acc": 0.7, "fact_acc_image": 0.6, "fact_acc_text": 0.8},
                       "real": {"fact_acc": None}},
           "n_items": {"forget": {"profiles": forget, "fact": 6 * forget}, "retain": {"profiles": 5, "fact": 30},
                       "real": {"profiles": 12, "fact": 0}}}
    known = demo.gate_sets_of_row(row)
    assert set(known) == {"forget", "retain"}, "a set the row did not fact-check is not taken"
    gate = demo.vanilla_gate(cfg, tmp_path, lambda *_: None, all_people=False, max_profiles=12, known=known)
    assert gate["forget"] == {"n": 6 * forget, "acc": 0.9, "acc_image": 0.8, "acc_text": 1.0}
    # retain: the row scored 5 people, the gate asks about 12; real, test and the strangers: not in the row.
    assert gate["retain"]["acc"] == gate["real"]["acc"] == 0.25 and checked == [12, 12, 6, 12]
    assert len(loads) == 1, "the model is loaded once, for the sets left"
    loads.clear()
    people = dict(zip(list(gate)[1:], checked))       # every set but forget, as the gate asked them
    every = {"forget": known["forget"]} | {k: {**gate[k], "profiles": n} for k, n in people.items()}
    assert demo.vanilla_gate(cfg, tmp_path, lambda *_: None, all_people=False, max_profiles=12, known=every) == gate
    assert not loads, "nothing left to check: no model loaded"
    assert demo.gate_sets_of_row({**row, "protocol": "official"}) == {}, "another protocol asks other questions"


def test_a_fresh_environment_writes_the_data_libraries_bytecode_beside_the_fork_server(monkeypatch, tmp_path):
    """compile_beside (started with the fork server) imports the torch-free libraries in a helper while the
    server imports torch, only while their bytecode is missing and Python writes bytecode at all."""
    import importlib.util
    import subprocess
    import sys
    from types import SimpleNamespace
    from pipeline.jobs import workers
    started = []

    class Helper:
        def __init__(self, args, **_):
            started.append(args)

        def wait(self):
            return 0
    monkeypatch.setattr(subprocess, "Popen", Helper)
    written = tmp_path / "written.pyc"
    written.write_bytes(b"")
    cached = {"sympy": str(written), "pandas": str(written)}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(cached=cached[name]))
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert workers.compile_beside() is None and not started, "everything compiled already: no helper"
    cached["pandas"] = str(tmp_path / "missing.pyc")
    assert workers.compile_beside() is not None
    assert started == [[sys.executable, "-m", "pipeline.jobs.workers"]]
    assert set(workers.BESIDE) - {"sympy", "pandas"} <= set(workers.PRELOAD) and "torch" not in workers.BESIDE
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert workers.compile_beside() is None and len(started) == 1, "no bytecode would be written"


def test_the_helper_compiles_the_named_folders_and_imports_the_rest(monkeypatch, tmp_path):
    """write_bytecode: AHEAD's folders compiled without being imported ("" the package's own files only),
    every other folder left alone, then BESIDE imported; a library that is missing is skipped."""
    import sys
    from pipeline.jobs import workers
    pkg = tmp_path / "aheadpkg"
    for folder in ("", "wanted", "other"):
        (pkg / folder).mkdir(parents=True, exist_ok=True)
        (pkg / folder / "__init__.py").write_text("")
        (pkg / folder / "mod.py").write_text("VALUE = 1\n")
    (tmp_path / "besidemod.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(workers, "AHEAD", (("aheadpkg", ("", "wanted")), ("not_installed_anywhere", ("*",))))
    monkeypatch.setattr(workers, "BESIDE", ("besidemod", "not_installed_either"))
    workers.write_bytecode()
    compiled = lambda folder: sorted(p.name.split(".")[0] for p in (pkg / folder / "__pycache__").glob("*.pyc"))
    assert compiled("") == ["__init__", "mod"] and compiled("wanted") == ["__init__", "mod"]
    assert not (pkg / "other" / "__pycache__").exists()
    assert "aheadpkg.mod" not in sys.modules and "besidemod" in sys.modules
    sys.modules.pop("besidemod", None)
