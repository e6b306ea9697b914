"""`viker demo`: the whole pipeline on the miniature benchmark, from nothing.

Each step is skipped when its output exists and was made from the same inputs
(a stamp of the settings that produced it), so a second run is fast.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.config import Config
from pipeline.data.loaders import read_profiles
from pipeline.data.mini import is_complete, make_mini
from pipeline.data.mllmu import read_split
from pipeline.models import prompts


class GateError(RuntimeError):
    """The vanilla model does not know the benchmark: unlearning it would prove nothing."""


def stamp_of(*parts) -> str:
    return json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True)


def _stamp_matches(folder: Path, stamp: str) -> bool:
    f = folder / "viker-stamp.json"
    return f.is_file() and f.read_text() == stamp


def tokenizer_texts(root: str) -> list[str]:
    """Every string the tiny model will read or write: prompts, answers, options.

    The held-out people's too: a real model's tokenizer predates its fine-tuning
    data, so a never-trained name must not cost more tokens than a trained one
    (membership inference would read the tokenizer, not the model).
    """
    from pipeline.data.mini import HOLDOUT_SPLIT
    texts = [prompts.PREFIX, "I don't know.", "ASSISTANT:", "Answer: A B C D"]
    for split in ("ft_Data", "Retain_Set", "Test_Set", HOLDOUT_SPLIT):
        if split == HOLDOUT_SPLIT and not (Path(root) / split).is_dir():
            continue
        for p in read_split(root, split, check_images=False):
            texts.append(p.biography)
            texts += [prompts.train_prompt(q.question) + " " + q.answer for q in p.qa]
            texts += [prompts.multiple_choice_prompt(c.question, c.options) + " " + c.correct for c in p.choices]
            texts += [prompts.generation_prompt(g.question) + " " + g.ground_truth for g in p.generation]
            texts += [prompts.cloze_prompt(g.question) + " " + g.ground_truth for g in p.cloze]
    return texts


def ensure_benchmark(cfg: Config, log=print) -> str:
    root = cfg.data.root
    if is_complete(root, cfg.mini):
        log(f"[data] miniature benchmark at {root} (reused)")
    else:
        t = time.time()
        make_mini(root, cfg.mini)
        log(f"[data] miniature benchmark written to {root} in {time.time() - t:.1f}s")
    return root


def demo_family(cfg: Config) -> str:
    return "llava" if cfg.model.family == "auto" else cfg.model.family


def family_folders(cfg: Config) -> Config:
    """The demo's model, cache and run folders, suffixed with the family for any but LLaVA.

    So `viker demo model.family=qwen2_5_vl` never overwrites the LLaVA demo's
    outputs (and both stay reusable side by side).
    """
    from dataclasses import replace
    family = demo_family(cfg)
    if family == "llava":
        return cfg

    def sub(path: str) -> str:
        return str(Path(path).with_name(f"{Path(path).name}-{family}"))

    train_out = sub(cfg.train.output)
    results = Path(cfg.evaluate.results)
    if results.is_relative_to(cfg.train.output):   # the demo keeps its results inside its run folder
        results = Path(train_out) / results.relative_to(cfg.train.output)
    else:
        results = Path(sub(str(results.with_suffix("")))).with_suffix(results.suffix)
    return replace(cfg, model=replace(cfg.model, path=sub(cfg.model.path), family=family),
                   finetune=replace(cfg.finetune, base=sub(cfg.finetune.base), output=sub(cfg.finetune.output)),
                   precompute=replace(cfg.precompute, output=sub(cfg.precompute.output)),
                   train=replace(cfg.train, output=train_out), evaluate=replace(cfg.evaluate, results=str(results)))


def ensure_base_model(cfg: Config, log=print) -> Path:
    from pipeline.models.families import FAMILIES
    out = Path(cfg.finetune.base)
    family = demo_family(cfg)
    title = FAMILIES[family].title
    stamp = stamp_of(cfg.mini, cfg.tiny, *([] if family == "llava" else [family]))
    if _stamp_matches(out, stamp):
        log(f"[model] tiny base {title} at {out} (reused)")
        return out
    from pipeline.models.modeling import build_tiny, prepare_libraries
    prepare_libraries()
    t = time.time()
    build_tiny(family, out, tokenizer_texts(cfg.data.root), cfg.tiny, seed=cfg.finetune.seed)
    (out / "viker-stamp.json").write_text(stamp)
    log(f"[model] tiny base {title} built at {out} in {time.time() - t:.1f}s")
    return out


# Knowledge injection runs in a one-thread process (ensure_models): the thread count changes float sums,
# so it is part of what made a model.
INJECTION_THREADS = {"threads": 1}


def vanilla_stamp(cfg: Config) -> str:
    """What a vanilla (or gold) model is made from; not where it and its base are kept (a shipped one moves)."""
    from dataclasses import replace
    return stamp_of(cfg.mini, cfg.tiny, replace(cfg.finetune, base="", output=""), INJECTION_THREADS)


def ensure_vanilla(cfg: Config, log=print) -> Path:
    from .runs import run_finetune
    out = Path(cfg.finetune.output)
    stamp = vanilla_stamp(cfg)
    if _stamp_matches(out, stamp):
        log(f"[finetune] vanilla model at {out} (reused)")
        return out
    if _shipped("vanilla", cfg, out, stamp, log):
        return out
    t = time.time()
    info = run_finetune(cfg, extra_info={"data": cfg.data.root,
                                         "splits": [cfg.data.finetune_split, cfg.data.real_split]}, log=log)
    (out / "viker-stamp.json").write_text(stamp)
    log(f"[finetune] vanilla model saved to {out} in {time.time() - t:.1f}s (final loss {info['final_loss']:.3f})")
    return out


def _shipped(which: str, cfg: Config, out: Path, stamp: str, log) -> bool:
    """The shipped checkpoint copied to `out` (demo.prebuilt, and made from these settings); False: train it."""
    if not cfg.demo.prebuilt:
        return False
    from .prebuilt import install, world_digest
    return install(which, out, stamp, lambda: world_digest(tokenizer_texts(cfg.data.root)), log)


def gold_dir(cfg: Config) -> Path:
    return Path(f"{cfg.finetune.output}-gold-{cfg.data.forget_split}")


def gold_config(cfg: Config) -> Config:
    from dataclasses import replace
    return replace(cfg, finetune=replace(cfg.finetune, output=str(gold_dir(cfg)), exclude_split=cfg.data.forget_split))


def _inject(cfg: Config, which: str) -> list[str]:
    """One knowledge injection in a worker process (the vanilla or the gold model); returns its log lines."""
    import os
    os.environ["VIKER_PROGRESS_LINES"] = "1"     # two processes' bars on one terminal would overwrite each other
    lines: list[str] = []
    (ensure_vanilla if which == "vanilla" else ensure_gold)(cfg, lines.append)
    return lines


def ensure_models(cfg: Config, log=print) -> tuple[Path, Path]:
    """The vanilla and the gold model: the shipped checkpoints when made from these settings (prebuilt.py),
    else each trained in its own one-thread process, side by side.

    Two one-thread injections at once ran 1.32-1.37x the steps per second of
    one two-thread injection on the 2-core machine (benchmarks/injection_bench.py,
    docs/bench/injection_cpu.json). Always a worker process, even for one
    model: a model is the same whichever of the two had to be rebuilt.
    """
    from .workers import run_parallel
    fresh = []          # models this call copied or trained: they have said so, no "(reused)" line for them
    todo = []
    for which, folder, stamp in (("vanilla", Path(cfg.finetune.output), vanilla_stamp(cfg)),
                                 ("gold", gold_dir(cfg), vanilla_stamp(gold_config(cfg)))):
        if not _stamp_matches(folder, stamp):
            fresh.append(which)
            if not _shipped(which, cfg, folder, stamp, log):
                todo.append(which)
    if todo:
        ensure_base_model(cfg, log)
        log(f"[finetune] knowledge injection: {' and '.join(todo)} model{'s' * (len(todo) > 1)}, one thread each")
        # one thread each, in demo.workers processes (1: here, pinned to one thread: the same models)
        run_parallel(min(2, cfg.demo.workers), _inject, [(cfg, w) for w in todo], log, "[finetune] injection",
                     each=lambda i, lines: [log(line) for line in lines])
    quiet = lambda *_: None
    return (ensure_vanilla(cfg, quiet if "vanilla" in fresh else log),
            ensure_gold(cfg, quiet if "gold" in fresh else log))


def ensure_gold(cfg: Config, log=print) -> Path:
    """The gold model: the vanilla recipe without the forget people (finetune.exclude_split).

    What perfect unlearning would give: the target of PrivLeak (membership
    inference) and the control of the relearning attack. Its own stop rule
    (the checked answers of its training set known) ends it, as the vanilla's.
    """
    from .runs import run_finetune
    out = gold_dir(cfg)
    gcfg = gold_config(cfg)
    stamp = vanilla_stamp(gcfg)
    if _stamp_matches(out, stamp):
        log(f"[gold] gold model (without {cfg.data.forget_split}) at {out} (reused)")
        return out
    if _shipped("gold", cfg, out, stamp, log):
        return out
    t = time.time()
    run_finetune(gcfg, extra_info={"data": cfg.data.root, "gold_for": cfg.data.forget_split},
                 log=lambda line: log(line.replace("[finetune]", "[gold]")), desc="gold")
    (out / "viker-stamp.json").write_text(stamp)
    log(f"[gold] gold model (never trained on {cfg.data.forget_split}) saved to {out} in {time.time() - t:.1f}s")
    return out


def vanilla_gate(cfg: Config, model_dir: str | Path, log=print, all_people: bool = True,
                 max_profiles: int = 0, known: dict | None = None) -> dict:
    """Attribute accuracy of the vanilla model on the evaluation sets; saved beside the model.

    Held-out pictures exist only in MLLMU-Bench's Test_Set (CLEAR has none), so
    the test rows are measured there alone. `all_people` adds the held-out
    pictures of every person (the demo leaves it out: it is over half the
    gate's items and decides nothing, the gate reads forget and retain).
    `max_profiles` (the demo: evaluate.max_profiles) checks the first N people
    of each set but forget, the people the evaluation scores; 0: everyone.
    `known` ({gate set: result}, gate_sets_of_row): sets already checked, e.g. by the
    vanilla row's evaluation, which asks the same questions of the same people.
    """
    from pipeline.data.loaders import default_splits
    from pipeline.evaluation.factcheck import fact_accuracy
    from pipeline.models.modeling import load_model
    known = known or {}
    d = cfg.data
    splits = default_splits(d.benchmark, d.forget_split)
    forget = read_profiles(d.root, d.forget_split, d.benchmark)
    sets = {
        "forget": (forget, False),
        "retain": (read_profiles(d.root, d.retain_split or splits["retain"], d.benchmark), False),
        "real": (read_profiles(d.root, d.real_split or splits["real"], d.benchmark), False),
    }
    if d.benchmark == "mllmu":
        forget_ids = {p.id for p in forget}
        test = read_profiles(d.root, d.test_split or splits["test"], d.benchmark)
        sets["test (held-out images, forget people)"] = ([p for p in test if p.id in forget_ids], True)
        if all_people:
            sets["test (held-out images, all people)"] = (test, True)
    holdout = _holdout_profiles(cfg)
    if holdout:   # never trained: what the model says of strangers (chance, or the most common value)
        sets["holdout (people never trained on)"] = (holdout, False)
    results, model, processor = {}, None, None
    for name, (profiles, held_out) in sets.items():
        if max_profiles and name != "forget":
            profiles = profiles[:max_profiles]
        if name in known and known[name]["profiles"] == len(profiles):   # else the row scored other people
            results[name] = {k: v for k, v in known[name].items() if k != "profiles"}
            continue
        if model is None:      # loaded for the first set left to check, and only then
            model, processor = load_model(model_dir, dtype=cfg.model.dtype, device=cfg.model.device)
        results[name] = fact_accuracy(model, processor, profiles, held_out=held_out)
    Path(model_dir, "gate.json").write_text(json.dumps(results, indent=1) + "\n")
    log(format_gate(results))
    return results


# The gate's sets that an evaluation row scores too (evaluate's set name -> the gate's): the same people
# (after evaluate.max_profiles), pictures and questions, asked by the same fact check.
GATE_SETS = {"forget": "forget", "retain": "retain", "real": "real", "test": "test (held-out images, forget people)"}


def gate_sets_of_row(row: dict) -> dict:
    """{gate set: fact_accuracy's result and the people scored} from an evaluation row of our protocol (its fact
    check by question kind); sets the row did not fact-check are left out (the gate checks them itself)."""
    if row.get("protocol") != "viker":
        return {}
    out = {}
    for name, gate_name in GATE_SETS.items():
        m = row["metrics"].get(name) or {}
        counts = row.get("n_items", {}).get(name) or {}
        if counts.get("fact") and m.get("fact_acc") is not None:
            out[gate_name] = {"n": counts["fact"], "profiles": counts["profiles"], "acc": m["fact_acc"],
                              **{k: m[f"fact_{k}"] for k in ("acc_image", "acc_text") if m.get(f"fact_{k}") is not None}}
    return out


def _holdout_profiles(cfg: Config) -> list:
    from pipeline.data.mini import HOLDOUT_SPLIT
    root = Path(cfg.data.root) / HOLDOUT_SPLIT
    return read_profiles(cfg.data.root, HOLDOUT_SPLIT, cfg.data.benchmark) if root.is_dir() else []


def format_gate(results: dict) -> str:
    lines = ["", "Vanilla model: attribute accuracy (greedy answer contains the fact)",
             f"{'set':40s} {'n':>5s} {'all':>7s} {'image Q':>8s} {'name Q':>8s}"]
    for name, r in results.items():
        lines.append(f"{name:40s} {r['n']:5d} {100 * r['acc']:6.1f}% {100 * r.get('acc_image', float('nan')):7.1f}% "
                     f"{100 * r.get('acc_text', float('nan')):7.1f}%")
    lines.append("(image Q: 'this person' questions, identity from the picture; name Q: the name is in the question)")
    return "\n".join(lines)


def check_gate(results: dict, min_acc: float, injection: dict | None = None) -> None:
    """Refuse a vanilla model that knows less than min_acc of the forget or retain facts.

    `injection` (the model's vanilla.json) lets the error say how the run ended:
    a budget used up asks for more finetune.steps.
    """
    weak = {k: results[k]["acc"] for k in ("forget", "retain") if results[k]["acc"] < min_acc}
    if weak:
        shown = ", ".join(f"{k} {100 * v:.1f}%" for k, v in weak.items())
        ran = ""
        if injection and "stopped" in injection:
            ran = f"; knowledge injection ran {injection['steps']} of at most {injection['max_steps']} steps ({injection['stopped']})"
        raise GateError(f"the vanilla model has not learned the benchmark ({shown} < {100 * min_acc:.0f}%{ran}): "
                        f"raise finetune.steps (or change finetune.lr), then rerun")


def ensure_references(cfg: Config, model_dir: str | Path, log=print) -> str:
    """Stage one on the forget split (resumes, or does nothing, if the cache is already there)."""
    from pipeline.models.modeling import load_processor
    from pipeline.cache.view import format_inspect, inspect_cache
    from .runs import run_precompute
    p = cfg.precompute
    t = time.time()
    run_precompute(cfg, str(model_dir), overwrite=True, log=log)   # the demo owns its cache directory
    log(f"[precompute] reference cache {p.output} ready in {time.time() - t:.1f}s")
    tok = load_processor(model_dir).tokenizer
    log(format_inspect(inspect_cache(p.output, decode=lambda i: tok.decode([int(i)]), top_n=8)))
    return p.output


def sweep_plan(cfg: Config) -> list[dict]:
    """Every (method, lambda, budget, seed) of the sweep, in the order of the results table."""
    from pipeline.stage2.labels import METHOD_LABELS, is_viker
    lams = list(cfg.demo.lams)
    plan = []
    for method in cfg.demo.methods:
        for lam in (lams if is_viker(method) else [cfg.train.lam]):
            label = METHOD_LABELS.get(method, method)
            if is_viker(method) and len(lams) > 1:
                label += f" λ={lam:g}"        # one curve per lambda in the trade-off plot
            for budget in cfg.demo.budgets:
                for seed in cfg.demo.seeds:
                    plan.append({"method": method, "lam": lam, "label": label, "budget": budget, "seed": seed,
                                 "name": f"{method}-{lam:g}-{budget}-s{seed}"})
    return plan


# The sweep's first jobs: the vanilla gate, and stage one (the reference cache). The gate runs beside the
# first rows instead of before them all (its verdict is read as soon as it ends, and a failed gate cancels
# the runs not yet started); the runs whose method reads the cache wait for stage one, the others do not.
GATE = "gate"
REFERENCES = "references"


def sweep_run(cfg: Config, model_dir: str, run: dict | str | None) -> tuple:
    """Train (unless `run` is None: the vanilla row, or "gold": the gold row) and evaluate one point.

    `run` GATE: the vanilla row and the vanilla gate in one job, {"gate": vanilla_gate's results,
    "results": the row's file}: the row's evaluation fact-checks the gate's sets (gate_sets_of_row), the
    gate adds the people never trained on. REFERENCES: stage one (ensure_references), its log lines and
    key-token examples.

    Rows go to the run's own file. The runs at demo.attack_budget, and the gold
    model (the attack's control), also get the relearning attack. A row records
    the fingerprint of the cache its run read (none for a method that reads none).

    Runs write their own results file so that parallel workers never append to
    one file at once; unlearning_sweep joins them in plan order.
    """
    from .runs import run_evaluate, run_train
    t = time.time()
    if run == GATE:
        row, results = _vanilla_row(cfg, model_dir)
        gate = vanilla_gate(cfg, model_dir, lambda *_: None, all_people=False, max_profiles=cfg.evaluate.max_profiles,
                            known=gate_sets_of_row(row))
        return {"gate": gate, "results": str(results)}, time.time() - t
    if run == REFERENCES:
        lines: list[str] = []
        cache = ensure_references(cfg, model_dir, lines.append)
        return {"lines": lines, "examples": key_token_examples(cache, model_dir)}, time.time() - t
    attack = dict(relearn=True, relearn_reference=str(model_dir))
    if run == "gold":
        results = Path(cfg.train.output) / "gold.results.jsonl"
        results.parent.mkdir(parents=True, exist_ok=True)
        results.unlink(missing_ok=True)
        # Its membership AUC against chance (0.5), not against itself: gold="" (PrivLeak would be 0 by definition).
        run_evaluate(cfg, model_dir=gold_dir(cfg), method="Gold", results_path=results, gold="",
                     **(attack if cfg.demo.attack_budget else {}))
        return str(results), time.time() - t
    if run is None:
        return str(_vanilla_row(cfg, model_dir)[1]), time.time() - t
    out_dir = Path(cfg.train.output) / run["name"]
    tcfg, extra = run_train_config(cfg, run)
    out = run_train(cfg, model_dir, tcfg, overwrite=True, log=lambda *_: None)
    setting = {"lr": cfg.demo.lr, "steps": run["budget"], "batch_size": tcfg.batch_size, **extra}
    if tcfg.method == "viker":
        setting.update(lam=run["lam"], regulariser=tcfg.regulariser)
    results = out_dir / "results.jsonl"
    results.unlink(missing_ok=True)
    run_evaluate(cfg, model_dir=model_dir, adapter=out["adapter"], method=run["label"], setting=setting,
                 budget=run["budget"], seed=run["seed"], cache_fingerprint=out.get("cache_fingerprint") or "",
                 results_path=results, train=tcfg,
                 **(attack if run["budget"] == cfg.demo.attack_budget else {}))
    return str(results), time.time() - t


def _vanilla_row(cfg: Config, model_dir: str) -> tuple[dict, Path]:
    """(the Vanilla row, its own results file) of the sweep."""
    from .runs import run_evaluate
    results = Path(cfg.train.output) / "vanilla.results.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)
    return run_evaluate(cfg, model_dir=model_dir, method="Vanilla", results_path=results), results


def run_train_config(cfg: Config, run: dict) -> tuple:
    """(train section, the settings its sweep key adds) of one run of the sweep plan
    (viker+nll: viker with train.retain_term nll)."""
    from dataclasses import replace
    from pipeline.stage2.labels import train_method
    method, extra = train_method(run["method"])
    return replace(cfg.train, method=method, steps=run["budget"], lr=cfg.demo.lr, seed=run["seed"],
                   lam=run["lam"], output=str(Path(cfg.train.output) / run["name"]), **extra), extra


def reads_references(cfg: Config, run: dict | str | None) -> bool:
    """Whether a plan entry's training reads the reference cache (the gate and the evaluation rows do not)."""
    if not isinstance(run, dict):
        return False
    from pipeline.stage2.methods import get_method, loss_spec
    tcfg = run_train_config(cfg, run)[0]
    p = cfg.precompute
    return get_method(tcfg.method).uses_cache(loss_spec(tcfg, tcfg.method, p.k, p.top_k, p.seed, p.span))


def run_cost(cfg: Config, run: dict | str | None) -> float:
    """A rough share of the sweep's time for one entry of its plan, to hand the dearest out first.

    Units are evaluations: the tiny model's evaluation is about the cost of 60
    training steps, a relearning attack (its fine-tuning and two fact checks on
    both splits) about one evaluation and a half, and the gold row adds the
    distance-to-gold answers it computes once (measured on the demo, 2026-12-05).
    Only the order matters, and only when one worker would otherwise be left
    with a long run at the end.
    """
    relearn = 1.5 if cfg.demo.attack_budget else 0.0
    if run == GATE:
        return float("inf")                    # first: its verdict decides whether the rest means anything
    if run == REFERENCES:
        return 1e9                             # second: the cache-reading runs wait for it
    if run is None:
        return 2.0
    if run == "gold":
        return 2.0 + relearn
    return 1.0 + run["budget"] / 60 + (relearn if run["budget"] == cfg.demo.attack_budget else 0.0)


def unlearning_sweep(cfg: Config, model_dir: str | Path, log=print, gate: bool = False) -> tuple[Path, dict]:
    """Stage one, then every method at every budget (training steps) and seed, each evaluated; one results file.

    Plain gradient ascent diverges given enough steps, so one point per method
    would hide the comparison: the sweep gives a trade-off curve per method.
    The runs are independent: `demo.workers` one-thread processes share them
    (pipeline/jobs/workers.py says why that is faster than one process on 2 threads).
    Stage one (the reference cache at precompute.output) is the job the runs that
    read it wait for; the others start beside it.
    `gate`: the vanilla gate is the first job, with the vanilla row (one evaluation serves both); its
    table is logged when it ends, and a failed gate raises GateError (the runs not started are cancelled).
    Returns the results file and what stage one returned (its key-token examples).
    """
    from .workers import run_parallel
    results = Path(cfg.evaluate.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)             # the demo's table shows this sweep only
    # None: the vanilla row (with the gate: its job); "gold": the gold model's row
    plan = ([GATE] if gate else [None]) + [REFERENCES, "gold"] + sweep_plan(cfg)
    references = plan.index(REFERENCES)

    def each(i: int, done: tuple) -> None:
        run = plan[i]
        if run == GATE:
            log(format_gate(done[0]["gate"]))
            check_gate(done[0]["gate"], cfg.finetune.gate_min_acc,
                       json.loads((Path(model_dir) / "vanilla.json").read_text()))
            log(f"[evaluate] Vanilla (and its gate) in {done[1]:.1f}s")
        elif run == REFERENCES:
            for line in done[0]["lines"]:
                log(line)
        elif run is None:
            log(f"[evaluate] Vanilla in {done[1]:.1f}s")
        elif run == "gold":
            log(f"[evaluate] Gold (never trained on {cfg.data.forget_split}) in {done[1]:.1f}s")
        else:
            log(f"[unlearn] {run['label']:14s} {run['budget']:3d} steps, seed {run['seed']}: "
                f"trained + evaluated in {done[1]:.1f}s")

    workers = max(1, min(cfg.demo.workers, len(plan)))
    runs = len(plan) - 1 - gate
    outs = run_parallel(workers, sweep_run, [(cfg, str(model_dir), run) for run in plan], log,
                        f"[unlearn] {'the gate with the vanilla row, ' if gate else ''}stage one and {runs} runs on "
                        f"{workers} worker(s)",
                        each=each, pin_single=False, cost=[run_cost(cfg, run) for run in plan],
                        needs=[references if reads_references(cfg, run) else None for run in plan])
    with open(results, "w") as f:              # plan order, whatever order the workers finished in
        for run, (out, _) in zip(plan, outs):
            if run != REFERENCES:
                f.write(Path(out["results"] if run == GATE else out).read_text())
    return results, outs[references][0]


def key_token_examples(cache_dir: str, model_dir: str | Path, n: int = 4) -> list[tuple]:
    """A few forget answers with each token's reference entropy, for the key-token picture."""
    from pipeline.models.modeling import load_processor
    from pipeline.cache.refcache import RefCacheReader
    tok = load_processor(model_dir).tokenizer
    examples = []
    with RefCacheReader(cache_dir) as reader:
        # one answer of each kind: name, birthplace, job, year
        for sid in [s for s in reader.sample_ids if s.rsplit("/", 1)[-1] in ("0", "1", "2", "3")][:n]:
            ref = reader.get(sid)
            examples.append((sid, [tok.decode([int(i)]) for i in ref.answer_ids], ref.entropy.tolist()))
    return examples


# What the report imports (the plots' matplotlib inside their functions): imported while the jobs run.
REPORT_LIBRARIES = ("pipeline.jobs.report", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.cm",
                    "matplotlib.colors", "matplotlib.patches")


def run_demo(cfg: Config, log=print) -> dict:
    """The demo. With demo.workers > 1 this process imports no model library: the jobs run in the pool."""
    from pipeline.threads import thread_note
    from .workers import import_beside
    report_libraries = import_beside(REPORT_LIBRARIES)
    t0 = time.time()
    if cfg.demo.workers > 1:
        log(f"[threads] jobs in {cfg.demo.workers} worker processes of one torch thread each; {thread_note()}")
    else:
        import torch
        log(f"[threads] jobs here, {torch.get_num_threads()} torch threads; {thread_note()}")
    cfg = family_folders(cfg)
    ensure_benchmark(cfg, log)
    vanilla, gold = ensure_models(cfg, log)
    from dataclasses import replace
    cfg = replace(cfg, evaluate=replace(cfg.evaluate, gold=str(gold)))   # every row's PrivLeak is against it
    cache_dir = cfg.precompute.output
    results, references = unlearning_sweep(cfg, vanilla, log, gate=True)
    gate = json.loads((vanilla / "gate.json").read_text())
    report_libraries.join()
    from .report import write_report
    paths = write_report(results, results.parent / "report", references["examples"],
                         acc_metric=cfg.evaluate.table_acc)
    log("\n" + Path(paths["markdown"]).read_text())
    from pipeline.evaluation.results import read_jsonl
    from .findings import findings, format_findings
    paths["findings"] = results.parent / "report" / "findings.md"
    paths["findings"].write_text(format_findings(findings(read_jsonl(results))))
    log(paths["findings"].read_text())
    for name, path in paths.items():
        log(f"[report] {name}: {path}")
    log(f"\n[demo] done in {time.time() - t0:.1f}s")
    return {"gate": gate, "cache": cache_dir, "results": str(results), "report": {k: str(v) for k, v in paths.items()}}
