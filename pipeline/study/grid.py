"""`viker study`: every method over benchmark draws, forget splits and training seeds.

One demo run is one benchmark draw, one forget split and one seed; the two
draws in the README disagree. The study repeats the unlearning sweep over
the grid of `study.*` keys and compares methods at *matched forgetting*
(study/report.py): each method's numbers with a 95% t interval over draws
(the seeds of a draw share its benchmark, vanilla and gold models and cache,
so the draws are the independent units), and the methods compared by paired
per-unit differences with the same interval.

Phases, each parallel over `study.workers` processes pinned to one torch
thread (VIKER_THREADS=1: several torch processes each using every core ran
7x slower on 2 cores):
  1. per draw (the validation draw and the test draws): benchmark, tiny base,
     vanilla model (demo.ensure_*; reused by their stamps);
  2. per (draw, split, reference settings): the stage-one cache (resumes itself);
  3. selection: on the validation draw only, every method runs its budget sweep
     for each candidate (lr, and lambda for ViKeR); the rule below picks one
     candidate per method; the choice is written to selection.json and frozen;
  4. the test grid with the frozen hyper-parameters, then the comparisons
     (ablations, reference sources, k, lambda, regulariser, per-token lambda)
     on `study.ablation_split` with the first seed;
  5. docs/STUDY.md with tables and plots.

Selection rule (the same for every method): the candidate with the largest
area under its retain-utility vs forgetting curve (report.curve_auc, on
the validation draw, split `study.val_split`, first seed); ties go to the
candidate listed first. The test draws never take part in the choice, and
the demo's draw (mini.seed 0) is not allowed among them.

Runs are keyed by their full settings (a hash of them names the run's
folder); a finished run has `done.json`, written last and atomically, and is
reused; anything else is redone, so a killed study resumes where it stopped.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from pipeline.config import Config, ConfigError
from pipeline.jobs.workers import run_parallel
from pipeline.stage2.labels import METHOD_LABELS, is_viker, reference_overrides, train_method

from .quick import QUICK  # noqa: F401  (the --quick grid, read by tests as grid.QUICK)
from .report import SELECTION_RULE, select, write_study_report





# ---------------------------------------------------------------- settings

def draw_config(cfg: Config, draw: int) -> Config:
    """The config of one benchmark draw: its own data, base and vanilla model under study.output."""
    c = copy.deepcopy(cfg)
    root = Path(cfg.study.output) / f"draw-{draw}"
    c.mini.seed = draw
    c.data.root = str(root / "mini")
    c.finetune.base = str(root / "tiny-base")
    c.finetune.output = c.model.path = str(root / "vanilla")
    return c


def run_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def reference_settings(cfg: Config, ref: str = "people", k: int | None = None, method: str = "viker") -> dict:
    """What the stage-one cache of a ViKeR variant depends on (`method`: a sweep key, e.g. viker+span)."""
    if ref == "own":
        return {"pool": "", "reference": "own", "k": 1}
    settings = {"pool": ref, "reference": "pool", "k": cfg.precompute.k if k is None else k}
    extra = reference_overrides(method)
    if extra.get("names", "none") != "none":
        extra["name_pool"] = cfg.precompute.name_pool
    return settings | extra       # only set keys: the default variants keep their earlier run keys


# Groups whose runs are attacked (relearning) beside the membership inference every run gets: the
# main tables and their vanilla and gold points. Comparisons and selection are not (cost, module doc).
ATTACKED = ("main", "vanilla", "gold")


def make_run(cfg: Config, draw: int, split: str, seed: int, method: str, budget: int, lr: float, lam: float,
             variant: str, group: str, ref: dict | None = None, **train) -> dict:
    """The full settings of one run: everything that changes its numbers (the run's key) plus its labels."""
    ref = ref or reference_settings(cfg, method=method)
    settings = {"draw": draw, "split": split, "seed": seed, "method": method, "budget": budget,
                "lr": lr, "lam": lam, "ref": ref, "train": train,
                "mini": _changed(cfg.mini, seed=draw), "tiny": _changed(cfg.tiny), "finetune": _changed(cfg.finetune),
                # evaluate.attacks is not part of the key: an attack added later runs on the finished runs
                # (execute_run), without training them again.
                "top_k": cfg.precompute.top_k, "evaluate": _changed(cfg.evaluate, results=None, attacks=None),
                "train_base": _changed(cfg.train, output=None),
                # What the attacks measure is part of the run: membership inference against the gold model
                # always, the relearning attack (with its settings) on the attacked groups.
                "attacks": {"gold": True, "relearn": _changed(cfg.relearn, results=None) if group in ATTACKED
                            else None}}
    return {"key": run_key(settings), "variant": variant, "group": group, "settings": settings}


def _changed(section, **fixed) -> dict:
    """The section's values that differ from the defaults, with `fixed` applied (None drops a key).

    Only changed values enter a run's key: a config key added later at its
    default leaves every finished run valid (changing a *default* therefore
    needs a new study.output).
    """
    values = asdict(section) | fixed
    defaults = asdict(type(section)())
    return {k: v for k, v in values.items() if v is not None and (k in fixed or v != defaults.get(k))}


def _frozen(selection: dict, method: str) -> tuple[float, float]:
    pick = selection[method]
    return float(pick["lr"]), float(pick["lam"])


def selection_runs(cfg: Config) -> list[dict]:
    s = cfg.study
    seed = s.seeds[0]
    runs = []
    for method in s.methods:
        lams = list(s.lams) if is_viker(method) else [cfg.train.lam]
        for lr in s.lrs:
            for lam in lams:
                for budget in s.budgets:
                    runs.append(make_run(cfg, s.val_draw, s.val_split, seed, method, budget, lr, lam,
                                         f"{METHOD_LABELS.get(method, method)} lr={lr:g}" +
                                         (f" λ={lam:g}" if is_viker(method) else ""), "selection"))
    return runs


def test_runs(cfg: Config, selection: dict) -> list[dict]:
    """The main grid with frozen hyper-parameters, then the comparisons on the ablation split."""
    s = cfg.study
    draws, seeds = list(s.draws), list(s.seeds)
    budgets = list(s.budgets)
    runs = []
    for draw in draws:
        for split in s.splits:
            for seed in seeds:
                for method in s.methods:
                    lr, lam = _frozen(selection, method)
                    for budget in budgets:
                        runs.append(make_run(cfg, draw, split, seed, method, budget, lr, lam,
                                             METHOD_LABELS.get(method, method), "main"))
    if not s.ablations or "viker" not in selection:
        return runs
    lr, lam = _frozen(selection, "viker")
    variants = [("ViKeR w/o GA", "ablation", {}, {"use_ga": False}),
                ("ViKeR w/o Vis", "ablation", reference_settings(cfg, "own"), {})]
    variants += [(f"ViKeR ref={r}", "reference", reference_settings(cfg, r), {}) for r in s.refs]
    variants += [(f"ViKeR k={k}", "k", reference_settings(cfg, k=int(k)), {}) for k in s.ks]
    variants += [(f"ViKeR λ={x}", "lambda", {}, {"lam": float(x)}) for x in s.lam_sweep]
    variants += [(f"ViKeR D={d.upper()}", "regulariser", {}, {"regulariser": d}) for d in s.regularisers]
    variants += [("ViKeR per-token λ", "token_lambda", {}, {"token_lambda": True})]
    seed = seeds[0]
    for draw in draws:
        for variant, group, ref, train in variants:
            train = dict(train)
            this_lam = train.pop("lam", lam)
            for budget in budgets:
                runs.append(make_run(cfg, draw, s.ablation_split, seed, "viker", budget, lr, this_lam, variant, group,
                                     ref or None, **train))
    return runs


def vanilla_runs(cfg: Config, draws: list[int], splits: list[str]) -> list[dict]:
    return [make_run(cfg, d, sp, 0, "vanilla", 0, 0.0, 0.0, "Vanilla", "vanilla") for d in draws for sp in splits]


def gold_runs(cfg: Config, draws: list[int], splits: list[str]) -> list[dict]:
    """The gold model of each (draw, split) evaluated and attacked: the target and the control."""
    return [make_run(cfg, d, sp, 0, "gold", 0, 0.0, 0.0, "Gold", "gold") for d in draws for sp in splits]


# ---------------------------------------------------------------- workers

def prepare_draw(cfg: Config, draw: int) -> str:
    """Benchmark, base and vanilla model of one draw (each reused when its stamp matches)."""
    from pipeline.jobs.demo import ensure_base_model, ensure_benchmark, ensure_vanilla
    c = draw_config(cfg, draw)
    quiet = lambda *_: None
    ensure_benchmark(c, quiet)
    ensure_base_model(c, quiet)
    ensure_vanilla(c, quiet)
    _write_image_pools(c)
    return c.finetune.output


def split_config(cfg: Config, draw: int, split: str) -> Config:
    """One draw's config with `split` as its forget split (whose gold model leaves that split's people out)."""
    c = draw_config(cfg, draw)
    c.data.forget_split = split
    return c


def prepare_gold(cfg: Config, draw: int, split: str) -> str:
    """The gold model of one (draw, split): the vanilla recipe without the split's people (reused by its stamp)."""
    from pipeline.jobs.demo import ensure_gold
    return str(ensure_gold(split_config(cfg, draw, split), lambda *_: None))


def _write_image_pools(c: Config) -> None:
    """The benchmark's own retain-set and forget-set images as reference pools (reference-source comparison)."""
    from pipeline.data.loaders import default_splits, read_profiles
    split = c.study.ablation_split
    for name, which in (("retain_set", default_splits(c.data.benchmark, split)["retain"]), ("forget_set", split)):
        folder = Path(c.data.root) / "pools" / name
        if (folder / "done").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for p in read_profiles(c.data.root, which, c.data.benchmark):
            (folder / f"{p.id}.png").write_bytes(p.image)
        (folder / "done").write_text("")


def cache_dir(cfg: Config, draw: int, split: str, ref: dict) -> str:
    name = f"{split}-{ref['reference']}-{ref['pool'] or 'own'}-k{ref['k']}"
    if ref.get("span", "none") != "none":
        name += f"-span-{ref['span']}"
    if ref.get("names", "none") != "none":
        name += f"-names-{ref['names']}-{Path(ref['name_pool']).name}"
    return str(Path(cfg.study.output) / f"draw-{draw}" / "refs" / name)


def _cache_config(cfg: Config, draw: int, split: str, ref: dict) -> Config:
    c = draw_config(cfg, draw)
    c.data.forget_split = split
    pool = ref["pool"] or c.precompute.pool
    own_images = pool in ("retain_set", "forget_set")
    if own_images:
        pool = str(Path(c.data.root) / "pools" / pool)
    # The benchmark's own images as references is the paper's ablation, the one case the leak check allows.
    c.precompute = replace(c.precompute, output=cache_dir(cfg, draw, split, ref), pool=pool,
                           reference=ref["reference"], k=ref["k"], allow_benchmark_images=own_images,
                           span=ref.get("span", "none"), names=ref.get("names", "none"),
                           name_pool=ref.get("name_pool", c.precompute.name_pool))
    return c


def prepare_cache(cfg: Config, draw: int, split: str, ref: dict) -> str:
    from pipeline.jobs.runs import run_precompute
    c = _cache_config(cfg, draw, split, ref)
    # The study owns its cache directories: shards of another fingerprint (older settings) are replaced.
    run_precompute(c, c.finetune.output, overwrite=True, log=lambda *_: None)
    return c.precompute.output


def execute_run(cfg: Config, run: dict) -> dict:
    """Train and evaluate one run unless it is finished; returns its done record."""
    from pipeline.jobs.demo import gold_dir
    from pipeline.jobs.runs import run_evaluate, run_train
    folder = Path(cfg.study.output) / "runs" / run["key"]
    done = folder / "done.json"
    if done.is_file():
        return add_attacks(cfg, json.loads(done.read_text()), done)
    t0 = time.time()
    st = run["settings"]
    c = _cache_config(cfg, st["draw"], st["split"], st["ref"])
    folder.mkdir(parents=True, exist_ok=True)
    results = folder / "results.jsonl"
    results.unlink(missing_ok=True)           # a half-finished earlier attempt
    gold = str(gold_dir(split_config(cfg, st["draw"], st["split"])))
    vanilla = c.finetune.output
    common = dict(results_path=results, samples_path=folder / "samples.jsonl", gold=gold)
    if (st.get("attacks") or {}).get("relearn") is not None:
        common.update(relearn=True, relearn_reference=vanilla)
    if st["method"] == "vanilla":
        row = run_evaluate(c, model_dir=vanilla, method="Vanilla", **common)
    elif st["method"] == "gold":      # its membership AUC against chance (0.5), not against itself
        row = run_evaluate(c, model_dir=gold, method="Gold", **{**common, "gold": ""})
    else:
        method, extra = train_method(st["method"])
        tcfg = replace(c.train, method=method, steps=st["budget"], lr=st["lr"], lam=st["lam"],
                       seed=st["seed"], output=str(folder / "train"), **extra, **st["train"])
        out = run_train(c, vanilla, tcfg, overwrite=True, log=lambda *_: None)   # a killed attempt is replaced
        row = run_evaluate(c, model_dir=vanilla, adapter=out["adapter"], method=run["variant"],
                           setting={"lr": st["lr"], "lam": st["lam"], **st["train"]}, budget=st["budget"],
                           seed=st["seed"], train=tcfg, **common)
    record = {**run, "row": row, "seconds": round(time.time() - t0, 2)}
    _publish(record, done)
    return record


def _publish(record: dict, done: Path) -> None:
    tmp = done.with_name("done.json.tmp")
    tmp.write_text(json.dumps(record, ensure_ascii=False))
    tmp.replace(done)                          # last, atomically: only finished runs are reused


def add_attacks(cfg: Config, record: dict, done: Path) -> dict:
    """A finished attacked run (ATTACKED groups) given the attacks of evaluate.attacks its row lacks.

    The attacks read the run's saved adapter (or the gold model), against the draw's vanilla model, with the
    gold model as the control, as execute_run would have; the record is published again, atomically.
    """
    from pipeline.jobs.demo import gold_dir
    from pipeline.jobs.runs import attack_metrics
    st = record["settings"]
    metrics = record["row"].get("metrics", {})
    missing = [a for a in cfg.evaluate.attacks if a not in metrics]
    if not missing or st.get("attacks", {}).get("relearn") is None or st["method"] == "vanilla":
        return record
    c = _cache_config(cfg, st["draw"], st["split"], st["ref"])
    c.evaluate = replace(c.evaluate, attacks=missing)
    gold = str(gold_dir(split_config(cfg, st["draw"], st["split"])))
    if st["method"] == "gold":
        c.model = replace(c.model, path=gold)
        found = attack_metrics(c, None, c.finetune.output, "")
    else:
        c.model = replace(c.model, path=c.finetune.output)
        adapter = done.parent / "train" / "adapter"
        if not adapter.is_dir():
            raise ConfigError(f"study run {done.parent.name}: its adapter is gone ({adapter}); remove done.json "
                              f"to train it again")
        found = attack_metrics(c, str(adapter), c.finetune.output, gold)
    record["row"]["metrics"] = {**metrics, **found}
    _publish(record, done)
    return record


def _parallel(workers: int, fn, jobs: list[tuple], log, what: str) -> list:
    return run_parallel(workers, fn, jobs, log, f"[study] {what}")


def _runs_needing(cfg, runs):
    """The runs not finished, and the finished attacked runs that lack an attack of evaluate.attacks."""
    todo = []
    for r in runs:
        done = Path(cfg.study.output) / "runs" / r["key"] / "done.json"
        if not done.is_file():
            todo.append(r)
        elif cfg.evaluate.attacks and r["group"] in ATTACKED and r["settings"]["method"] != "vanilla":
            metrics = json.loads(done.read_text())["row"].get("metrics", {})
            if any(a not in metrics for a in cfg.evaluate.attacks):
                todo.append(r)
    return todo


def _caches(cfg: Config, runs: list[dict]) -> list[tuple]:
    seen = {}
    for r in runs:
        st = r["settings"]
        if is_viker(st["method"]):
            seen[(st["draw"], st["split"], json.dumps(st["ref"], sort_keys=True))] = st["ref"]
    return [(cfg, d, sp, ref) for (d, sp, _), ref in seen.items()]


def _execute(cfg: Config, runs: list[dict], log, what: str) -> list[dict]:
    todo = _runs_needing(cfg, runs)
    # The first training seed's runs go first (the main table and every comparison, which use that
    # seed only): a study stopped early still has every table, `--report-only` says which runs are missing.
    first_seed = cfg.study.seeds[0]
    todo.sort(key=lambda r: r["settings"]["seed"] != first_seed)      # stable: the grid's order otherwise
    log(f"[study] {what}: {len(runs)} runs, {len(runs) - len(todo)} reused")
    _parallel(cfg.study.workers, prepare_cache, _caches(cfg, todo), log, f"{what} caches")
    _parallel(cfg.study.workers, execute_run, [(cfg, r) for r in todo], log, what)
    return [json.loads((Path(cfg.study.output) / "runs" / r["key"] / "done.json").read_text()) for r in runs]


def run_study(cfg: Config, command: str = "viker study", log=print) -> dict:
    """All phases (module doc); returns the paths written and the wall time."""
    t0 = time.time()
    s = cfg.study
    out = Path(s.output)
    out.mkdir(parents=True, exist_ok=True)
    draws = list(s.draws)
    _parallel(s.workers, prepare_draw, [(cfg, d) for d in [s.val_draw] + draws], log, "vanilla models")
    splits = sorted(set(s.splits) | ({s.ablation_split} if s.ablations else set()))
    _parallel(s.workers, prepare_gold, [(cfg, s.val_draw, s.val_split)] + [(cfg, d, sp) for d in draws for sp in splits],
              log, "gold models (without the forget people)")

    val_seed = s.seeds[0]
    val_runs = vanilla_runs(cfg, [s.val_draw], [s.val_split]) + selection_runs(cfg)
    val_records = _execute(cfg, val_runs, log, "selection")
    selection = select(val_records, s.forget_metric, s.utility_metric)
    (out / "selection.json").write_text(json.dumps({"rule": SELECTION_RULE, "draw": s.val_draw,
                                                    "split": s.val_split, "seed": val_seed,
                                                    "chosen": selection}, indent=1) + "\n")
    log(f"[study] hyper-parameters frozen: {json.dumps(selection)}")

    runs = vanilla_runs(cfg, draws, splits) + gold_runs(cfg, draws, splits) + test_runs(cfg, selection)
    records = _execute(cfg, runs, log, "test grid")
    wall = time.time() - t0
    paths = write_study_report(cfg, records, val_records, selection, command=command, wall_seconds=wall)
    log(f"[study] done in {wall:.1f}s; report {paths['markdown']}")
    return {"wall_seconds": wall, "runs": len(runs) + len(val_runs), **{k: str(v) for k, v in paths.items()}}


def report_only(cfg: Config, command: str, log=print) -> dict:
    """STUDY.md from the runs finished so far (a study still running, or stopped): nothing is trained.

    The report states how many of the planned runs it holds; hyper-parameters
    come from the selection.json the study froze (none: no report).
    """
    s = cfg.study
    frozen = Path(s.output) / "selection.json"
    if not frozen.is_file():
        raise ConfigError(f"{frozen} does not exist: the study has not finished its selection phase yet")
    selection = json.loads(frozen.read_text())["chosen"]
    draws = list(s.draws)
    splits = sorted(set(s.splits) | ({s.ablation_split} if s.ablations else set()))
    planned_val = vanilla_runs(cfg, [s.val_draw], [s.val_split]) + selection_runs(cfg)
    planned = vanilla_runs(cfg, draws, splits) + gold_runs(cfg, draws, splits) + test_runs(cfg, selection)
    read = lambda runs: [json.loads(p.read_text()) for p in
                         (Path(s.output) / "runs" / r["key"] / "done.json" for r in runs) if p.is_file()]
    val_records, records = read(planned_val), read(planned)
    seconds = sum(r.get("seconds", 0) for r in val_records + records)
    note = (f"{len(records) + len(val_records)} of {len(planned) + len(planned_val)} planned runs finished "
            f"(report written by --report-only; summed run time {seconds / 60:.1f} min of worker time)")
    log(f"[study] {note}")
    paths = write_study_report(cfg, records, val_records, selection, command=command, wall_seconds=float("nan"),
                               note=note)
    return {"runs": len(records) + len(val_records), "planned": len(planned) + len(planned_val),
            **{k: str(v) for k, v in paths.items()}}
