"""The `viker` command line. Each command parses options and calls one function.

Every command takes `--config FILE` plus `KEY=VALUE` overrides, e.g.
`viker train --config configs/demo.yaml train.lr=1e-4`. Expected failures
(bad config, bad input, a cache for another model) print one line and exit 1.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from .config import ConfigError, load_config


DEMO_CONFIG = "configs/demo.yaml"
DEMO_FULL_CONFIG = "configs/demo_full.yaml"


def _known_errors() -> tuple:
    from pipeline.data.mllmu import DataError
    from pipeline.jobs.demo import GateError
    from pipeline.models.encoding import InputError
    from pipeline.models.modeling import ModelError
    from pipeline.cache.refcache import CacheError
    # ValueError too: bad settings (k larger than the pool, an unknown method) are user errors.
    from pipeline.stage2.errors import TrainingDiverged
    return (ConfigError, DataError, InputError, ModelError, CacheError, GateError, FileNotFoundError, ValueError,
            TrainingDiverged)


def os_error_line(exc: OSError) -> str:
    """'cannot write cache/refs/x/refs-00000-of-00002.h5.tmp: No space left on device': the path and the cause."""
    cause = " ".join(str(exc.strerror or exc).split()) or type(exc).__name__
    if exc.filename is None:
        return f"file system error: {cause}"
    target = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"cannot use {target}: {cause}"


def one_line_errors(fn):
    """Turn expected failures into a one-line message instead of a traceback.

    OSError (a read-only directory, a full disk, a missing file) is expected too:
    the line names the path and the cause. Commands remove their own temporary
    files before the error reaches here.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:       # first, and alone: refusing a setting imports nothing heavy
            raise click.ClickException(str(exc).splitlines()[0]) from None
        except click.ClickException:
            raise
        except Exception as exc:         # not SystemExit: a command's own exit code must not import the error types
            if isinstance(exc, _known_errors()):
                raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
            if isinstance(exc, OSError):
                raise click.ClickException(os_error_line(exc)) from None
            raise
    return wrapper


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             default=None, help="Experiment YAML (see configs/). Default: configs/demo.yaml if present.")
overrides_arg = click.argument("overrides", nargs=-1)


def _load(config_path, overrides, check_family: bool = True, models: bool = True, announce: bool = True):
    """The given config; without one, configs/demo.yaml when run from the repository (the demo's settings).

    `check_family`: a model.family other than auto must be the family of the
    model at model.path (only the demo builds a model of the family it names).
    `announce`: the first line of the command's output names the file loaded
    and the overrides, so a log says which settings made it.
    """
    from pathlib import Path
    if config_path is None and Path(DEMO_CONFIG).is_file():
        config_path = DEMO_CONFIG
    cfg = load_config(config_path, overrides)
    if check_family and cfg.model.family != "auto" and Path(cfg.model.path, "config.json").is_file():
        from pipeline.models.families import FamilyError, family_of_dir
        try:
            found = family_of_dir(cfg.model.path).name
        except FamilyError as err:
            raise ConfigError(str(err)) from None
        if found != cfg.model.family:
            raise ConfigError(f"model.family is {cfg.model.family} but the model at {cfg.model.path} is {found} "
                              f"(leave model.family=auto outside the demo)")
    if announce:
        shown = " ".join(overrides)
        click.echo(f"[config] {config_path or 'no file: the defaults'}{' + ' + shown if shown else ''}")
    if models:
        _model_libraries()
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="viker", prog_name="viker")
def main():
    """viker: ViKeR unlearning for multimodal LLMs (LLaVA-1.5/NeXT, Qwen2.5-VL, Idefics3, Gemma 3), as a cached two-stage pipeline.

    \b
    viker demo [--full]             everything, on the built-in miniature benchmark
    viker data make-mini            generate the miniature benchmark (MLLMU-Bench layout)
    viker data check ROOT           what viker reads (and skips) in a downloaded benchmark
    viker finetune                  knowledge injection: base model -> vanilla model
    viker precompute                stage one: reference distributions -> HDF5 shards
    viker train                     stage two: LoRA unlearning (ViKeR or a baseline) -> adapter
    viker evaluate [--adapter DIR]  forget/test/retain/real metrics -> a results row
    viker report                    comparison table + trade-off plot from the results
    viker study [--quick]           all methods over draws x splits x seeds -> docs/STUDY.md
    viker cache inspect|verify|merge DIR      (verify --model M --pool P: a copied cache)
    viker cache show DIR SAMPLE_ID  one sample's tokens, reference entropy and alternatives
    viker attack relearn            relearning attack: does fine-tuning on part of the forget set bring it back?
    viker attack quantize           quantization attack: do fp16/bf16/int8/int4/nf4 weights bring it back?
    viker attack logit-lens         logit-lens attack: can the LM head read the answer off a middle layer?
    viker attack probe              probing attack: other portraits, altered pictures, reworded questions?
    viker config show               the resolved configuration (file + KEY=VALUE overrides) as YAML
    """
    from pipeline.threads import apply_wait_policy
    apply_wait_policy()                    # before torch loads OpenMP


def _warm_pool(workers: int) -> None:
    """Start the job pool's fork server before this process imports the model libraries: both import at once."""
    if workers > 1:
        from pipeline.jobs.workers import warm_up
        warm_up()


def _model_libraries() -> None:
    """Threads and library logging for commands that run a model; after their config was checked."""
    from pipeline.models.modeling import prepare_libraries
    prepare_libraries()


@main.command()
@config_option
@click.option("--full", is_flag=True, help=f"The full sweep ({DEMO_FULL_CONFIG}): every method, ViKeR at two "
              "lambdas, the relearning attacker's worst-case grid; same models, its own run folder.")
@overrides_arg
@one_line_errors
def demo(config_path, full, overrides):
    """Run the pipeline on the miniature benchmark (no download; CPU is enough).

    Generates the benchmark, takes the tiny vanilla and gold LLaVA-1.5 models shipped with viker
    (or trains them when the settings differ, or with demo.prebuilt=false; model.family=llava_next,
    qwen2_5_vl, idefics3 or gemma3 builds and trains a model of that family), checks that the
    vanilla model knows the benchmark (the sweep's first job; a failed check stops the sweep),
    unlearns with ViKeR and two baselines at two budgets,
    attacks each (membership inference, relearning) and writes the report. Outputs land under
    cache/ (a family other than LLaVA in folders suffixed with its name) and are reused when
    their inputs did not change.
    """
    if full and config_path is not None:
        raise click.UsageError(f"--full is --config {DEMO_FULL_CONFIG}: give one or the other")
    cfg = _load(DEMO_FULL_CONFIG if full else config_path, overrides, check_family=False,
                models=False)  # refuse bad settings first
    _warm_pool(cfg.demo.workers)
    if cfg.demo.workers <= 1:      # else the jobs run in the pool and this process loads no model library
        _model_libraries()
    from pipeline.jobs.demo import run_demo
    run_demo(cfg)


@main.command()
@config_option
@click.option("--quick", is_flag=True, help="CI-sized grid (tiny model, 3 draws, 2 methods, 2 budgets) "
              "under cache/study-quick: checks the machinery end to end in minutes, proves nothing about methods.")
@click.option("--report-only", is_flag=True, help="Write the report from the runs finished so far "
              "(of a study still running or stopped); trains nothing.")
@overrides_arg
@one_line_errors
def study(config_path, quick, report_only, overrides):
    """Every method over benchmark draws x forget splits x seeds; tables and plots -> docs/STUDY.md.

    Hyper-parameters are chosen on a separate validation draw by one rule for
    all methods, then frozen; methods are compared at matched forgetting, with
    95% t intervals over benchmark draws and paired differences between
    methods. Finished runs are reused, so a killed study
    resumes. Settings: the `study` section (configs/study.yaml).
    """
    import shlex
    from pipeline.study.quick import QUICK
    cfg = _load(config_path or "configs/study.yaml", (QUICK if quick else ()) + tuple(overrides), check_family=False,
                models=False)
    if not report_only:
        _warm_pool(cfg.study.workers)
    _model_libraries()
    from pipeline.study.grid import report_only as write_only, run_study
    command = ("viker study " + " ".join(shlex.quote(a) for a in sys.argv[2:])).strip()
    if report_only:
        write_only(cfg, command=command, log=click.echo)
    else:
        run_study(cfg, command=command, log=click.echo)


@main.group()
def data():
    """Benchmark data."""


@data.command("check")
@click.argument("root", type=click.Path())
@click.option("--benchmark", type=click.Choice(["mllmu", "clear", "train_split"]), default=None,
              help="The layout to check against (default: guessed from the folder names).")
def check_data_cmd(root, benchmark):
    """Check a downloaded benchmark directory before running anything on it.

    Prints each split found, its rows and columns, which columns viker uses for
    what, what it skips while reading and why, and which required pieces are
    missing; exits 1 when one is missing or a split does not read.
    Run it first on MLLMU-Bench, its baseline_train_split, or CLEAR.
    """
    from pipeline.data.check import check_root
    lines, ok = check_root(root, benchmark or "")
    click.echo("\n".join(lines))
    if not ok:
        sys.exit(1)


@data.command("make-mini")
@config_option
@click.option("--out", default=None, help="Output directory (default: data.root).")
@overrides_arg
@one_line_errors
def make_mini_cmd(config_path, out, overrides):
    """Generate the miniature benchmark: parquet splits + reference image pools."""
    from pipeline.data.mini import make_mini
    cfg = _load(config_path, overrides, models=False)
    path = make_mini(out or cfg.data.root, cfg.mini)
    click.echo(f"miniature benchmark written to {path}")


@main.command()
@config_option
@overrides_arg
@one_line_errors
def finetune(config_path, overrides):
    """Knowledge injection: fine-tune finetune.base on ft_Data + the real set, save finetune.output.

    Afterwards the vanilla model's attribute accuracy is measured and saved.
    """
    cfg = _load(config_path, overrides)
    from pipeline.jobs.demo import vanilla_gate
    from pipeline.jobs.runs import run_finetune
    info = run_finetune(cfg)
    click.echo(f"vanilla model saved to {cfg.finetune.output} ({info['train_seconds']}s)")
    vanilla_gate(cfg, cfg.finetune.output, log=click.echo)


@main.command()
@config_option
@click.option("--no-prefix-cache", is_flag=True, help="Naive path: a full forward per (sample, image) pair.")
@click.option("--shard-index", type=int, default=None, help="This job's index, for independent batch jobs.")
@click.option("--num-shards", type=int, default=None, help="How many independent jobs share the work.")
@click.option("--overwrite", is_flag=True,
              help="Remove shards of another run (other shard_size or fingerprint) from precompute.output first.")
@click.option("--allow-benchmark-images", is_flag=True,
              help="Accept pool images equal to forget/retain/test/real images (the paper's ablation that uses "
                   "benchmark images as references); by default such a pool is refused.")
@click.option("--strict", is_flag=True, help="Refuse any forget item the reader drops for its content (an empty "
              "answer, a row without training QA) instead of naming it in the log (data.strict=true).")
@overrides_arg
@one_line_errors
def precompute(config_path, no_prefix_cache, shard_index, num_shards, overwrite, allow_benchmark_images, strict,
               overrides):
    """Stage one: the frozen model's averaged distributions over k reference images -> HDF5 shards.

    \b
    Resumable: rerun the same command after a crash; finished shards are kept.
    Several GPUs:  torchrun --nproc_per_node 4 -m pipeline.cli precompute --config X
                   (or accelerate launch -m pipeline.cli precompute ...)
    Several jobs:  viker precompute --shard-index 0 --num-shards 8 ...; then viker cache merge DIR
    The output directory holds one cache: shards of another run there are refused (--overwrite removes them).
    """
    from pipeline.jobs.runs import run_precompute
    from pipeline.models.distributed import distributed_state
    cfg = _load(config_path, overrides)
    p = cfg.precompute
    if allow_benchmark_images:
        p.allow_benchmark_images = True
    if strict:
        cfg.data.strict = True
    group = distributed_state(cfg.model.device)   # torchrun / accelerate launch: joins the process group
    rank, world, device = group.rank, group.world, str(group.device)
    if (shard_index is None) != (num_shards is None):
        raise click.UsageError("--shard-index and --num-shards go together")
    if shard_index is not None:
        if world > 1:
            raise click.UsageError("use either torchrun/accelerate or --shard-index, not both")
        if num_shards < 1:
            raise click.UsageError(f"--num-shards must be >= 1 (the number of jobs), got {num_shards}")
        if not 0 <= shard_index < num_shards:
            raise click.UsageError(f"--shard-index must be >= 0 and < --num-shards ({num_shards}), got {shard_index}")
        rank, world = shard_index, num_shards
    manifest = run_precompute(cfg, cfg.model.path, prefix_cache=False if no_prefix_cache else None,
                              device=device, rank=rank, world=world, overwrite=overwrite, log=click.echo)
    if manifest is not None:
        click.echo(f"reference cache ready: {p.output} ({manifest['totals']['n_samples']} samples, "
                   f"{manifest['totals']['n_tokens']} answer tokens, {manifest['totals']['bytes']} bytes)")


@main.command()
@config_option
@click.option("--resume", is_flag=True, help="Continue from train.output/checkpoint (same settings required).")
@click.option("--overwrite", is_flag=True,
              help="Remove another run's adapter/train_config.json/checkpoint from train.output before starting.")
@click.option("--strict", is_flag=True, help="Refuse any forget or retain item the reader drops for its content "
              "(an empty answer, a row without training QA) instead of naming it in the log (data.strict=true).")
@overrides_arg
@one_line_errors
def train(config_path, resume, overwrite, strict, overrides):
    """Stage two: LoRA unlearning of the forget split, streaming the reference cache.

    \b
    Methods (train.method): ga, graddiff, kl_min, npo, idkpo, viker, simnpo, rmu, mmunlearner.
    Ablations: w/o Reg = train.method=ga; w/o GA = train.use_ga=false;
               w/o Vis = a cache made with precompute.reference=own.
    Several GPUs: torchrun --nproc_per_node N -m pipeline.cli train --config X
    A train.output holding another run's results is refused unless --overwrite or --resume;
    a cache made with other precompute.k/top_k/seed/pool/reference is refused unless
    train.use_cache_settings=true.
    """
    cfg = _load(config_path, overrides)
    if strict:
        cfg.data.strict = True
    from pipeline.jobs.runs import run_train
    result = run_train(cfg, cfg.model.path, resume=resume, overwrite=overwrite, log=click.echo)
    click.echo(f"{result['method']}: {result['steps']} steps in {result['seconds']:.1f}s "
               f"(final loss {result['final_loss']:.4f}); adapter saved to {result['adapter']}")


@main.command()
@config_option
@click.option("--adapter", default=None, help="A LoRA adapter directory (e.g. <train.output>/adapter).")
@click.option("--method", default=None, help="Label of the row (default: from the adapter's training run, or Vanilla).")
@click.option("--budget", type=float, default=None, help="The swept quantity (e.g. steps) for the trade-off plot.")
@click.option("--gold", default=None,
              help="A gold model directory (trained without the forget people: viker finetune "
                   "finetune.exclude_split=<forget split>). CLEAR: Forget Quality (KS test of the forget truth "
                   "ratios); otherwise PrivLeak of membership inference. evaluate.gold in the config.")
@overrides_arg
@one_line_errors
def evaluate(config_path, adapter, method, budget, gold, overrides):
    """Evaluate model.path (+ --adapter) on forget, test, retain and real sets; append a results row.

    Multiple-choice accuracy, ROUGE-1/2/L, BLEU, cloze and fact accuracy, and
    coherence. evaluate.protocol official scores as each benchmark's authors do
    (MLLMU-Bench eval.py; CLEAR mm/eval.py + calculate_metrics.py, with Forget
    Quality when --gold is given); viker is our own protocol (the demo's).
    MC and cloze accuracy by option likelihood too (evaluate.likelihood_sets).
    Membership inference (LOSS, zlib, min-k%, min-k%++ AUC; PrivLeak with
    --gold) where never-trained people exist (evaluate.mia, evaluate.mia_split).
    Rows go to evaluate.results and record the protocol.
    """
    cfg = _load(config_path, overrides)
    from pipeline.evaluation.clear_eval import format_clear_row
    from pipeline.evaluation.evaluate import format_row
    from pipeline.jobs.runs import run_evaluate
    run = {}
    if adapter:
        info = _training_info(adapter)
        run = dict(setting=info.get("setting", {}), cache_fingerprint=info.get("cache_fingerprint", ""),
                   seed=info.get("seed", 0), budget=budget if budget is not None else info.get("steps", 0))
        method = method or info.get("method", "adapter")
    elif budget is not None:
        run["budget"] = budget
    row = run_evaluate(cfg, adapter=adapter, method=method or "Vanilla", gold=gold, **run)
    click.echo(format_clear_row(row) if cfg.data.benchmark == "clear" else format_row(row))
    click.echo(f"row appended to {cfg.evaluate.results}")


@main.group()
def attack():
    """Attacks on an unlearned model: can the forgotten facts be got back?"""


@attack.command("relearn")
@config_option
@click.option("--adapter", default=None, help="The unlearned LoRA adapter (e.g. <train.output>/adapter); none: "
                                             "model.path itself is attacked (the gold model as a control).")
@click.option("--reference", default=None,
              help="The vanilla model whose accuracy recovery is relative to (default: model.path).")
@overrides_arg
@one_line_errors
def relearn_cmd(config_path, adapter, reference, overrides):
    """Relearning attack: fine-tune on relearn.fraction of the forget QA, test Forget ACC on the rest.

    \b
    Prints the accuracy on the held-out forget QA before and after the attack,
    the vanilla model's, and recovery = after / vanilla; the worst cell of the
    relearn.grid_lrs x relearn.grid_steps grid (worst_recovery), and the
    held-out-people split (people_recovery). Attack the gold model
    (model.path=<gold model>, no --adapter, --reference <vanilla>) for the
    control: what the attacker's share alone teaches. A model that is not an
    adapter over the vanilla model needs --reference. relearn.results appends
    the row as JSON. pipeline/evaluation/relearn.py says how the forget set is split.
    """
    _need_reference(adapter, reference)
    cfg = _load(config_path, overrides)
    from pipeline.evaluation.relearn import format_attack
    from pipeline.jobs.runs import config_record, run_relearn_attack
    d = cfg.data
    label = _attacked_label(cfg, adapter)
    result = run_relearn_attack(cfg, adapter, reference or cfg.model.path)
    click.echo(format_attack(result, label))
    if cfg.relearn.results:
        row = {"method": label, "model": cfg.model.path, "adapter": adapter, "reference": reference or cfg.model.path,
               "forget_split": d.forget_split, "data_root": d.root, "relearn": result, "config": config_record(cfg)}
        _append_row(cfg.relearn.results, row)


@attack.command("quantize")
@config_option
@click.option("--adapter", default=None, help="The unlearned LoRA adapter (e.g. <train.output>/adapter), merged "
                                             "before rounding; none: model.path itself is attacked.")
@click.option("--reference", default=None,
              help="The vanilla model, quantized the same way, that recovery is relative to (default: model.path).")
@click.option("--gold", default=None, help="A gold model (trained without the forget people), quantized the same "
                                          "way: the control (default: evaluate.gold; empty: none).")
@overrides_arg
@one_line_errors
def quantize_cmd(config_path, adapter, reference, gold, overrides):
    """Quantization attack: round the merged weights (quantize.schemes), measure Forget ACC again.

    \b
    Prints, per scheme (none: unquantized), the fact accuracy on the forget set
    and its change from the unquantized model, the vanilla model's under the
    same scheme, recovery = Forget ACC / vanilla's, the gold model's (with
    --gold) and the utility sets' (quantize.sets). int8/int4 are round-to-nearest
    with quantize.group_size weights per scale, nf4 QLoRA's NormalFloat with
    quantize.nf4_block; the rounding is emulated in torch on any device
    (pipeline/evaluation/quantize.py, docs/ATTACKS.md). quantize.results
    appends the row as JSON.
    """
    _need_reference(adapter, reference)
    _model_attack(_load(config_path, overrides), "quantize", adapter, reference, gold)


@attack.command("logit-lens")
@config_option
@click.option("--adapter", default=None, help="The unlearned LoRA adapter (e.g. <train.output>/adapter), merged "
                                             "before reading; none: model.path itself is attacked.")
@click.option("--reference", default=None,
              help="The vanilla model, read through the same lens, that recovery is relative to (default: model.path).")
@click.option("--gold", default=None, help="A gold model (trained without the forget people), read the same way: "
                                          "the control (default: evaluate.gold; empty: none).")
@overrides_arg
@one_line_errors
def logit_lens_cmd(config_path, adapter, reference, gold, overrides):
    """Logit-lens attack: read every decoder layer's hidden state through the final norm and LM head.

    \b
    On every forget QA, teacher-forced on the true answer, prints per decoder
    layer (0-based; the last is the model's own output) the share of answer
    positions whose true token is the lens's top-1 (top-k: logit_lens.top_k)
    on the fact tokens, for the unlearned, vanilla and gold (--gold) models,
    the mean true-token probability on the fact tokens, and the top-1 share on
    all answer tokens. Then the best layer before the final one (an attacker's
    pick after seeing the curve: optimistic) with recovery = its rate / the
    vanilla model's at that layer, the gold model's best layer, the final
    layer, and the best layer of all. logit_lens.tokens picks the class the
    score is read on (pipeline/evaluation/logit_lens.py, docs/ATTACKS.md).
    logit_lens.results appends the row as JSON.
    """
    _need_reference(adapter, reference)
    _model_attack(_load(config_path, overrides), "logit_lens", adapter, reference, gold)


@attack.command("probe")
@config_option
@click.option("--adapter", default=None, help="The unlearned LoRA adapter (e.g. <train.output>/adapter); none: "
                                             "model.path itself is attacked.")
@click.option("--reference", default=None,
              help="The vanilla model, asked the same probes, that recovery is relative to (default: model.path).")
@click.option("--gold", default=None, help="A gold model (trained without the forget people), asked the same "
                                          "probes: the control (default: evaluate.gold; empty: none).")
@overrides_arg
@one_line_errors
def probe_cmd(config_path, adapter, reference, gold, overrides):
    """Probing attack: the forget people's questions on other or altered pictures and in other words.

    \b
    Prints, per probe of probe.probes (none: the forget set as evaluation asks
    it), the number of questions, the fact accuracy and its change from none,
    the vanilla model's under the same probe, recovery = accuracy / vanilla's,
    and the gold model's (with --gold). held_out: the Test split's other
    portraits; crop, noise, flip: the forget picture altered (probe.crop,
    probe.noise_sigma, probe.seed; deterministic); paraphrase: the Test split's
    reworded questions. The last line is the declared summary, the mean
    recovery over the probes (not the best one). probe.results appends the row
    as JSON (pipeline/evaluation/probe.py, docs/ATTACKS.md).
    """
    _need_reference(adapter, reference)
    _model_attack(_load(config_path, overrides), "probe", adapter, reference, gold)


def _model_attack(cfg, section: str, adapter, reference, gold) -> None:
    """`viker attack <section>` (jobs.runs.run_model_attack): print its table, append its row to
    <section>.results when set."""
    import importlib
    from pipeline.evaluation.quantize import finite
    from pipeline.jobs.runs import config_record, run_model_attack
    d = cfg.data
    label = _attacked_label(cfg, adapter)
    result = finite(run_model_attack(cfg, section, adapter, reference or cfg.model.path, gold))
    click.echo(importlib.import_module(f"pipeline.evaluation.{section}").format_attack(result, label))
    results = getattr(cfg, section).results
    if results:
        row = {"method": label, "model": cfg.model.path, "adapter": adapter, "reference": reference or cfg.model.path,
               "gold": cfg.evaluate.gold if gold is None else gold, "forget_split": d.forget_split,
               "data_root": d.root, section: result, "config": config_record(cfg)}
        _append_row(results, row)


def _need_reference(adapter, reference) -> None:
    """An attack's recovery is relative to the vanilla model: an adapter's base, or --reference."""
    if not adapter and not reference:
        raise click.UsageError("recovery needs a reference: the vanilla model, --reference DIR, when the attacked "
                               "model is not an --adapter over it (model.path itself would be its own reference)")


def _attacked_label(cfg, adapter) -> str:
    """The attacked model's name in an attack's output: the adapter's training method, else model.path's folder."""
    return _training_info(adapter).get("method", "adapter") if adapter else Path(cfg.model.path).name


def _append_row(path: str, row: dict) -> None:
    """An attack's row, appended as one JSON line (the attack's `results` key)."""
    import json
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    click.echo(f"row appended to {path}")


def _training_info(adapter: str) -> dict:
    """What the training run recorded beside its adapter (method, steps, lr, lambda, cache)."""
    import json
    from pathlib import Path
    from pipeline.models.modeling import ModelError
    from pipeline.stage2.checkpoint import adapter_files_digest
    path = Path(adapter).parent / "train_config.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except ValueError:
        raise ModelError(f"{path} is not valid JSON: cannot tell which run made adapter {adapter}") from None
    recorded = info.get("adapter_sha256")
    if "result" not in info:
        raise ModelError(f"{path} describes a run that did not finish: adapter {adapter} is not its result")
    if recorded is not None and Path(adapter).is_dir() and adapter_files_digest(Path(adapter)) != recorded:
        raise ModelError(f"adapter {adapter} does not match the digest recorded in {path}: it is not the "
                         f"adapter that run produced")
    from pipeline.stage2.labels import method_label
    t = info.get("train", {})
    return {"method": method_label(info), "steps": info.get("result", {}).get("steps", info.get("steps")),
            "seed": t.get("seed", 0), "cache_fingerprint": info.get("cache_fingerprint", ""),
            "setting": {k: t[k] for k in ("lr", "lam", "regulariser", "beta", "retain_weight", "retain_term", "steps") if k in t}}


@main.command()
@config_option
@click.option("--results", default=None, help="Results file (default: evaluate.results).")
@click.option("--out", default=None, help="Output directory (default: beside the results).")
@overrides_arg
@one_line_errors
def report(config_path, results, out, overrides):
    """Comparison table (Markdown + CSV) and trade-off plot from a results file."""
    from pathlib import Path
    from pipeline.jobs.report import write_report
    cfg = _load(config_path, overrides, models=False)
    results = results or cfg.evaluate.results
    paths = write_report(results, out or str(Path(results).parent / "report"), acc_metric=cfg.evaluate.table_acc)
    click.echo(Path(paths["markdown"]).read_text())
    for name, path in paths.items():
        click.echo(f"{name}: {path}")


@main.group("config")
def config_group():
    """The configuration: every key, its default and range are in docs/CONFIG.md."""


@config_group.command("show")
@config_option
@overrides_arg
@one_line_errors
def config_show(config_path, overrides):
    """Print the resolved configuration (defaults, then --config, then KEY=VALUE overrides) as YAML.

    Everything is checked as every command checks it: an unknown key, a bad
    choice or a value out of range is refused with one line.
    """
    from pipeline.config import config_yaml
    cfg = _load(config_path, overrides, check_family=False, models=False, announce=False)
    click.echo(f"# resolved from {config_path or (DEMO_CONFIG if Path(DEMO_CONFIG).is_file() else 'the defaults')}"
               + (" with " + " ".join(overrides) if overrides else ""))
    click.echo(config_yaml(cfg), nl=False)


@main.group()
def cache():
    """Inspect, verify and merge reference caches."""


@cache.command()
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="This machine's model directory: its config, weights (full sha256) and tokenizer must "
                   "equal what the cache was made from.")
@click.option("--pool", "pool_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="This machine's reference pool directory: every image's name and sha256 must equal the cache's.")
@click.option("--quick", is_flag=True, help="Only each shard's sha256 and structure, no dataset read: "
              "a damaged chunk whose sha256 was rewritten with it goes unseen (for large caches).")
@one_line_errors
def verify(cache_dir, model_dir, pool_dir, quick):
    """Read every dataset of every shard (each chunk's Fletcher32 checksum, the format's value ranges) and
    check sha256 and structure; exit code 1 on any problem.

    --quick checks sha256 and structure only. With --model / --pool, also check a copied cache
    against this machine's model and pool (paths may differ between machines; contents may not).
    """
    from pipeline.cache.refcache import verify_cache
    problems = verify_cache(cache_dir, quick=quick)
    if model_dir or pool_dir:
        problems += _machine_problems(cache_dir, model_dir, pool_dir)
    errors = [p for p in problems if not p.startswith("warning:")]
    for p in problems:
        click.echo(p)
    checked = ("quick: sha256 and structure only, datasets not read; run without --quick to read them"
               if quick else "every dataset read")
    if errors:
        click.echo(f"{cache_dir}: {len(errors)} problem(s) ({checked})", err=True)
        sys.exit(1)
    click.echo(f"{cache_dir}: OK ({checked})")


@cache.command()
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_dir", default=None, help="Model directory whose tokenizer decodes the key tokens.")
@click.option("--top", default=10, show_default=True, help="How many highest-entropy tokens to list.")
@one_line_errors
def inspect(cache_dir, model_dir, top):
    """Settings, sizes, top-K mass kept, and the entropy histogram with the key tokens decoded."""
    from pipeline.cache.view import format_inspect, inspect_cache
    decode = None
    if model_dir:
        from pipeline.models.modeling import load_processor
        tok = load_processor(model_dir).tokenizer
        decode = lambda i: tok.decode([int(i)])  # noqa: E731
    click.echo(format_inspect(inspect_cache(cache_dir, decode=decode, top_n=top)))


def _machine_problems(cache_dir, model_dir, pool_dir) -> list[str]:
    from pipeline.cache.fingerprint import machine_problems
    from pipeline.cache.refcache import RefCacheReader
    with RefCacheReader(cache_dir) as reader:
        sources = reader.sources
    return machine_problems(sources, model_dir, pool_dir)


@cache.command()
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("sample_id")
@click.option("--model", "model_dir", default=None,
              help="Model directory whose tokenizer decodes tokens (default: the model path the cache records, "
                   "if it exists here).")
@click.option("--top", default=5, show_default=True, help="Reference alternatives shown per token.")
@one_line_errors
def show(cache_dir, sample_id, model_dir, top):
    """One sample's key-token view: each answer token with its reference entropy, top alternatives and
    tail mass, and the reference images averaged over."""
    from pipeline.cache.view import format_show, show_sample
    from pipeline.cache.refcache import RefCacheReader
    if model_dir is None:
        with RefCacheReader(cache_dir) as reader:
            recorded = (reader.sources.get("model") or {}).get("path")
        model_dir = recorded if recorded and Path(recorded).is_dir() else None
    decode = None
    if model_dir:
        from pipeline.models.modeling import load_processor
        tok = load_processor(model_dir).tokenizer
        decode = lambda i: tok.decode([int(i)])  # noqa: E731
    try:
        view = show_sample(cache_dir, sample_id, decode=decode, top=top)
    except KeyError as err:
        raise click.ClickException(str(err.args[0])) from None
    click.echo(format_show(view))


@cache.command()
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@one_line_errors
def merge(cache_dir):
    """Write manifest.json once every shard (from any rank or machine) is finished."""
    from pipeline.cache.refcache import merge as run
    manifest = run(cache_dir)
    click.echo(f"{cache_dir}: merged {len(manifest['shards'])} shards, {manifest['totals']['n_samples']} samples")


if __name__ == "__main__":
    main()
