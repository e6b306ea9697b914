"""The one place where a loaded `Config` becomes each stage's call.

`viker finetune|precompute|train|evaluate|attack`, `viker demo` and `viker
study` all start stages through these functions, so the mapping from config
keys to a stage is written once (tests/test_settings_reach.py sets every key
to a sentinel and checks that it arrives on every path).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.config import Config, ConfigError, TrainConfig, config_dict


def pool_dir(pool: str, data_root: str) -> str:
    """A named pool of the benchmark (people, pets, scenes, patterns) or a directory of images."""
    from pipeline.data.mini import POOLS
    return str(Path(data_root) / "pools" / pool) if pool in POOLS else pool


def run_finetune(cfg: Config, extra_info: dict | None = None, log=print, desc: str = "finetune") -> dict:
    """Knowledge injection on the fine-tuning split (plus the real set when data.finetune_real) -> cfg.finetune.output.

    MLLMU-Bench's vanilla model learned ft_Data only (finetune.py --data_dir
    ft_Data): its real set must be knowledge the base model already has.
    With finetune.exclude_split the people of that split are left out: the
    gold model, trained as the vanilla one but never on the forget people.
    """
    from pipeline.data.loaders import default_splits, read_profiles
    from pipeline.stage2.finetune import finetune
    f, d = cfg.finetune, cfg.data
    profiles = read_profiles(d.root, d.finetune_split, d.benchmark)
    if d.finetune_real:
        profiles += read_profiles(d.root, d.real_split or default_splits(d.benchmark, d.forget_split)["real"],
                                  d.benchmark)
    if f.exclude_split:
        left_out = {p.id for p in read_profiles(d.root, f.exclude_split, d.benchmark)}
        profiles = [p for p in profiles if p.id not in left_out]
        extra_info = {**(extra_info or {}), "excluded_split": f.exclude_split, "excluded_people": len(left_out)}
    return finetune(f, profiles, dtype=cfg.model.dtype, device=cfg.model.device, extra_info=extra_info, log=log,
                    desc=desc)


def benchmark_images(data_root: str, benchmark: str, splits: dict[str, str], log=print) -> dict:
    """Set name -> [(where, image bytes)] of every image of the given splits, for precompute's leak check.

    A split that is not on disk is skipped with a line in the log (a forget-only
    dataset is still usable), never silently.
    """
    from pipeline.data.loaders import read_profiles
    from pipeline.data.mllmu import DataError
    out = {}
    for name, split in splits.items():
        if not split:
            continue
        try:
            profiles = read_profiles(data_root, split, benchmark, check_images=False)
        except (DataError, FileNotFoundError) as err:
            log(f"[precompute] leak check: {name} split {split!r} not readable, skipped ({err})")
            continue
        out[name] = [(f"{split}/{p.id}" + (f"#{i}" if i else ""), data)
                     for p in profiles for i, data in enumerate(p.all_images)]
    return out


def benchmark_splits(cfg: Config) -> dict[str, str]:
    """The forget, retain, test and real splits of cfg.data (defaults filled in as evaluate fills them)."""
    from pipeline.data.loaders import default_splits
    d = cfg.data
    try:
        defaults = default_splits(d.benchmark, d.forget_split)
    except ValueError:   # a custom forget split name: only what the config names explicitly
        defaults = {}
    return {"forget": d.forget_split, "retain": d.retain_split or defaults.get("retain", ""),
            "test": d.test_split or defaults.get("test", ""), "real": d.real_split or defaults.get("real", "")}


def run_precompute(cfg: Config, model_dir: str, *, prefix_cache: bool | None = None, device: str | None = None,
                   rank: int = 0, world: int = 1, overwrite: bool = False, log=print) -> dict | None:
    """Stage one on the forget split of cfg.data with the cfg.precompute section, passed whole.

    `prefix_cache` (None: precompute.prefix_cache) is the CLI's --no-prefix-cache;
    `device` (None: model.device) the device torchrun / accelerate assigned this rank.
    Forget items the reader drops for their content are named in the log and the
    manifest, or refused under data.strict.
    """
    from pipeline.data.loaders import read_profiles
    from pipeline.data.records import forget_samples
    from pipeline.stage1.precompute import precompute
    p, d = cfg.precompute, cfg.data
    dropped: list = []
    samples = forget_samples(read_profiles(d.root, d.forget_split, d.benchmark, train_root=d.train_root,
                                           dropped=dropped))
    return precompute(str(model_dir), samples, p, pool_dir=pool_dir(p.pool, d.root), dropped=dropped,
                      strict=d.strict,
                      device=device or cfg.model.device, rank=rank, world=world, overwrite=overwrite, log=log,
                      benchmark_sets=(None if p.allow_benchmark_images or p.reference != "pool"
                                      else benchmark_images(d.root, d.benchmark, benchmark_splits(cfg), log)),
                      prefix_cache=prefix_cache, strangers=stranger_names(cfg) if p.names == "swap" else None)


def stranger_names(cfg: Config) -> list[str] | None:
    """precompute.name_pool as names: None (builtin), the named people of a split of data.root, or a file's lines."""
    from pipeline.data.loaders import read_profiles
    from pipeline.data.records import forget_samples
    from pipeline.stage1.counterfactual import person_names
    pool, d = cfg.precompute.name_pool, cfg.data
    if pool == "builtin":
        return None
    if (Path(d.root) / pool).is_dir():
        names = list(person_names(forget_samples(read_profiles(d.root, pool, d.benchmark))).values())
        if not names:
            raise ValueError(f"precompute.name_pool {pool}: no person of {Path(d.root) / pool} has a name QA")
        return names
    if Path(pool).is_file():
        return [line.strip() for line in Path(pool).read_text().splitlines() if line.strip()]
    raise ValueError(f"precompute.name_pool {pool!r} is neither builtin, a split folder of {d.root}, nor a file")


def run_train(cfg: Config, model_dir: str, train_cfg: TrainConfig | None = None, resume: bool = False,
              overwrite: bool = False, log=print) -> dict:
    """Stage two with cfg.train (or a variant of it), reading the cache at cfg.precompute.output.

    The cache must have been made with cfg.precompute's k, top_k, seed, reference and pool
    (train.use_cache_settings=true takes the cache's instead).
    """
    from pipeline.stage2.train import train
    d, p = cfg.data, cfg.precompute
    expected = {"k": p.k, "K": p.top_k, "seed": p.seed, "reference": p.reference, "span": p.span, "names": p.names}
    return train(str(model_dir), d.root, d.forget_split, d.retain_split, p.output, train_cfg or cfg.train,
                 pool_dir=pool_dir(p.pool, d.root), idk_answer=p.idk_answer, dtype=cfg.model.dtype,
                 device=cfg.model.device, resume=resume, ref_k=p.k, ref_top_k=p.top_k, ref_seed=p.seed, ref_span=p.span,
                 benchmark=d.benchmark, overwrite=overwrite, expect_cache=expected, log=log,
                 train_root=d.train_root, strict=d.strict, config=config_record(cfg, train_cfg))


def config_record(cfg: Config, train: TrainConfig | None = None) -> dict:
    """The resolved configuration a row or an adapter records (with the run's own train section, if any)."""
    return config_dict(cfg if train is None else replace(cfg, train=train))


def run_evaluate(cfg: Config, *, model_dir=None, adapter=None, method: str = "Vanilla", setting: dict | None = None,
                 budget: float = 0, seed: int = 0, cache_fingerprint: str = "", results_path=None, samples_path=None,
                 gold: str | None = None, relearn: bool = False, relearn_reference: str = "",
                 train: TrainConfig | None = None) -> dict:
    """`viker evaluate` and every evaluation of the demo and the study: cfg's model, data and evaluate sections.

    `model_dir` replaces model.path, `gold` evaluate.gold (the gold model itself is
    scored against chance: gold=""), `results_path` evaluate.results; `relearn`
    adds the relearning attack with the relearn section against
    `relearn_reference`. `train` is the run's train section, recorded in the row
    with the rest of the resolved configuration. The attacks of evaluate.attacks
    run beside the relearning attack (same reference, gold model as the control).
    """
    model = cfg.model if model_dir is None else replace(cfg.model, path=str(model_dir))
    settings = cfg.evaluate if gold is None else replace(cfg.evaluate, gold=gold)
    run = dict(adapter=adapter, method=method, setting=setting, budget=budget, seed=seed,
               cache_fingerprint=cache_fingerprint, results_path=results_path, samples_path=samples_path,
               config=config_record(cfg, train))
    if cfg.data.benchmark == "clear":
        if relearn:
            raise ConfigError("the relearning attack runs on MLLMU-layout benchmarks (data.benchmark=mllmu), not clear")
        from pipeline.evaluation.clear_eval import evaluate_clear
        return evaluate_clear(model, cfg.data, settings, **run)
    from pipeline.evaluation.evaluate import evaluate
    attacks = None
    if relearn and cfg.evaluate.attacks:
        attacks = attack_metrics(replace(cfg, model=model), adapter, str(relearn_reference or model.path),
                                 settings.gold)
    return evaluate(model, cfg.data, settings, relearn=cfg.relearn if relearn else None,
                    relearn_reference=str(relearn_reference), attacks=attacks, **run)


def attack_metrics(cfg: Config, adapter, reference: str, gold: str) -> dict:
    """The row's summary of each attack of evaluate.attacks on model.path (+ adapter): flat numbers, NaN as None.

    logit_lens: the lens summary (recovery at the best layer before the final one, ...); probe: the mean over
    probes and each probe's recovery (recovery_<probe>); quantize: int4 on the forget set, the scheme the
    tables read (recovery_int4, change_int4, gold_recovery_int4, and the unquantized *_none), at a sixth of
    the cost of every scheme on every set; `viker attack quantize` runs them all.
    """
    from pipeline.evaluation.quantize import finite
    out = {}
    for name in cfg.evaluate.attacks:
        if name == "logit_lens":
            out[name] = dict(run_logit_lens_attack(cfg, adapter, reference, gold)["summary"])
        elif name == "probe":
            result = run_probe_attack(cfg, adapter, reference, gold)
            summary = {k: v for k, v in result["summary"].items() if not isinstance(v, list)}
            summary.update({f"recovery_{p}": r["recovery"] for p, r in result["by_probe"].items()})
            out[name] = summary
        else:
            row_cfg = replace(cfg, quantize=replace(cfg.quantize, schemes=["int4"], sets=["forget"]))
            result = run_quantize_attack(row_cfg, adapter, reference, gold)
            out[name] = {f"{k}_{scheme}": v for scheme, r in result["by_scheme"].items()
                         for k, v in r.items() if k in ("recovery", "change", "gold_recovery")}
    return finite(out)


def run_relearn_attack(cfg: Config, adapter=None, reference: str = "") -> dict:
    """`viker attack relearn`: the relearn section's attack on model.path (+ adapter) against `reference`."""
    from pipeline.data.loaders import read_profiles
    from pipeline.evaluation.evaluate import memo_key, relearn_metrics
    from pipeline.models.modeling import load_for_eval
    d, m = cfg.data, cfg.model
    members = read_profiles(d.root, d.forget_split, d.benchmark)
    model, processor = load_for_eval(m.path, adapter, m.dtype, m.device)
    return relearn_metrics(model, processor, members, cfg.relearn, reference or m.path,
                           memo_key(d.root, d.forget_split), m.dtype, m.device, cfg.evaluate.batch_size)


# The attacks that read one model through their own config section: section -> the attack's name in errors.
MODEL_ATTACKS = {"quantize": "quantization", "logit_lens": "logit-lens", "probe": "probing"}


def run_model_attack(cfg: Config, section: str, adapter=None, reference: str = "", gold: str | None = None) -> dict:
    """`viker attack quantize|logit-lens|probe`: pipeline.evaluation.<section>.attack with cfg.<section>, on
    model.path (+ adapter) against `reference` (default: model.path).

    `gold` (None: evaluate.gold; empty: no control) goes through the same attack.
    """
    import importlib
    if cfg.data.benchmark == "clear":
        raise ConfigError(f"the {MODEL_ATTACKS[section]} attack runs on MLLMU-layout benchmarks "
                          f"(data.benchmark=mllmu), not clear")
    attack = importlib.import_module(f"pipeline.evaluation.{section}").attack
    m = cfg.model
    return attack(m, cfg.data, getattr(cfg, section), adapter=adapter, reference=reference or m.path,
                  gold=cfg.evaluate.gold if gold is None else gold, batch_size=cfg.evaluate.batch_size)


def run_quantize_attack(cfg: Config, adapter=None, reference: str = "", gold: str | None = None) -> dict:
    """`viker attack quantize`: the weights rounded as a deployment would (evaluation/quantize.py)."""
    return run_model_attack(cfg, "quantize", adapter, reference, gold)


def run_logit_lens_attack(cfg: Config, adapter=None, reference: str = "", gold: str | None = None) -> dict:
    """`viker attack logit-lens`: every layer read through the final norm and LM head (evaluation/logit_lens.py)."""
    return run_model_attack(cfg, "logit_lens", adapter, reference, gold)


def run_probe_attack(cfg: Config, adapter=None, reference: str = "", gold: str | None = None) -> dict:
    """`viker attack probe`: other and altered pictures, other words (evaluation/probe.py)."""
    return run_model_attack(cfg, "probe", adapter, reference, gold)
