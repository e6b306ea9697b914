"""Experiment configuration: dataclasses, YAML loading, KEY=VALUE overrides.

One YAML per experiment lives in `configs/`. Every section is a flat dataclass
of plain values so that commands can hand plain arguments to the code below
them ("configs are flattened at the edge"). Unknown keys and values of the
wrong type fail with a one-line `ConfigError` that names the key: a typo in a
sweep must never silently fall back to a default.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The miniature benchmark's section is defined by the data layer (data owns its knobs; a module
# without imports, so loading a config stays cheap); the config composes it like every other section.
from pipeline.data.mini_settings import MiniConfig


class ConfigError(ValueError):
    """A config problem; its message is one line and names the key."""


@dataclass
class DataConfig:
    benchmark: str = "mllmu"      # mllmu (also the miniature benchmark) | clear
    root: str = "cache/mini"      # a directory laid out as the benchmark's dataset repository
    forget_split: str = "forget_10"
    retain_split: str = ""        # empty: the complement MLLMU-Bench pairs with forget_split
    test_split: str = "Test_Set"
    real_split: str = "Retain_Set"
    finetune_split: str = "ft_Data"  # comma-separated lists are accepted (CLEAR: forget10,retain90)
    # Where the *training* QA of forget/retain come from: a directory in MLLMU-Bench's
    # `baseline_train_split` layout (<train_root>/forget_10/*.parquet: image + metadata), the
    # data the authors' baselines learn from. Empty: each split's own metadata, else its
    # question/answer columns (pipeline/data/mllmu.py).
    train_root: str = ""
    # Also learn the real set during knowledge injection (viker finetune). MLLMU-Bench's vanilla
    # model learned ft_Data only (its real set is knowledge the base model already has): false
    # for the real benchmark; the miniature benchmark's tiny model knows nobody, so true there.
    finetune_real: bool = False


@dataclass
class ModelConfig:
    path: str = "cache/models/vanilla"   # a local HF model directory of a supported family
    dtype: str = "auto"                   # auto | float32 | bfloat16 | float16
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    # auto: read from the model's config.json. `viker demo` builds a tiny model of this family
    # (auto = llava): llava | llava_next | qwen2_5_vl | idefics3 | gemma3 (pipeline/models/families.py).
    family: str = "auto"


@dataclass
class TinyModelConfig:
    """Shape of the tiny LLaVA built offline for tests and the demo."""
    vocab_size: int = 700
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    max_positions: int = 128


@dataclass
class FinetuneConfig:
    """Knowledge injection: teach the base model the benchmark (-> vanilla model)."""
    base: str = "cache/models/tiny-base"
    output: str = "cache/models/vanilla"
    # The budget, over which the learning rate follows its cosine; the run ends earlier once the
    # facts are known (stop_known). steps 0: epochs x training QA / batch_size, so a larger world
    # gets a larger budget (the default world: 100 x 432 / 32 = 1350 steps).
    steps: int = 0
    epochs: float = 100.0
    batch_size: int = 32
    lr: float = 1.0e-3              # the tiny model: 2e-3 needed the whole 1400 steps and knew less (see configs/demo.yaml)
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    augment: bool = True           # fresh image jitter every step (memorise people, not pixels)
    formats: bool = False          # also show each QA in the generation prompt (tiny models only)
    lora: bool = False             # full fine-tuning for the tiny model, LoRA for a 7B
    lora_r: int = 16
    lora_alpha: int = 32
    gate_min_acc: float = 0.9      # the demo stops if the vanilla model knows less than this
    # Stop on convergence: every check_every steps, check_size training questions (fixed, 0: all) are
    # asked teacher-forced; the run ends once stop_known of them are answered exactly. 0: the whole budget.
    stop_known: float = 0.95
    check_every: int = 50
    check_size: int = 128
    # Leave this split's people out (e.g. forget_10): the gold model, retain-only, that membership
    # inference (PrivLeak) and the relearning attack compare against. Empty: every person (the vanilla model).
    exclude_split: str = ""


@dataclass
class PrecomputeConfig:
    output: str = "cache/refs/demo"
    pool: str = "people"           # people | pets | scenes | patterns | a directory of images
    reference: str = "pool"        # pool (ViKeR) | own (the "w/o Vis" ablation: k=1, I' = I)
    k: int = 5
    top_k: int = 64
    seed: int = 0
    shard_size: int = 64           # samples per shard
    batch_size: int = 64           # (sample, image) pairs per forward
    prefix_cache: bool = True
    # Which fields stage one scores: reference (R), own (log-lik. on the sample's own image, NPO/IdkPO),
    # idk (log-lik. of idk_answer, IdkPO). A ViKeR-only cache may drop own,idk; train refuses what is missing.
    scores: str = "reference,own,idk"
    prefix_cache_images: int = 0   # image prefixes kept at once; 0: sized from free GPU memory, 32 on CPU
    idk_answer: str = "I don't know."
    dtype: str = "auto"
    allow_benchmark_images: bool = False  # True: pool images may equal benchmark images (the paper's ablation)


@dataclass
class TrainConfig:
    method: str = "viker"          # ga | graddiff | kl_min | npo | idkpo | viker
    output: str = "cache/runs/demo"
    regulariser: str = "kl"        # kl | jsd | cos (ViKeR's D)
    lam: float = 0.5               # ViKeR lambda
    use_ga: bool = True            # False: the "w/o GA" ablation
    token_lambda: bool = False     # experimental (ours): lambda_i from the reference entropy
    beta: float = 0.4              # NPO / IdkPO (convention viker: both; mllmu/openunlearning: NPO only)
    # Loss conventions of the baselines (pipeline/stage2/losses.py, LOSS_CONVENTIONS): viker (ours, the
    # demo's), mllmu (MLLMU-Bench's baselines/*.py) or openunlearning.
    convention: str = "viker"
    idk_beta: float = 0.1          # IdkPO's own beta (conventions mllmu/openunlearning)
    retain_weight: float = 0.0     # alpha of an added retain NLL term (GradDiff uses 1.0 when 0)
    # ViKeR only: none (the paper's loss, no retain data: the default) | nll (+ alpha * NLL on retain,
    # GradDiff's term) | kl (+ KL(P_vanilla || P_cur) on retain, KL_Min's term); alpha = retain_weight or 1.
    retain_term: str = "none"
    steps: int = 0                 # 0: derive from epochs
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2.0e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = ""          # regex over module names; empty: the family's decoder projections
    grad_checkpointing: bool = False
    save_every: int = 0
    seed: int = 0
    online_reference: bool = False
    merge: bool = False
    # The cache's k, K, seed, pool and reference differ from precompute.*: true trains with the
    # cache's (one notice line); false refuses the run naming both values.
    use_cache_settings: bool = False
    data_workers: int = 2          # DataLoader processes reading references and images on demand (0: in the loop)


@dataclass
class EvalConfig:
    sets: str = "forget,test,retain,real"
    few_shot: int = 1
    max_new_tokens: int = 50
    batch_size: int = 32
    coherence_classifier: str = ""   # a local HF text-classification model; empty: model-free score
    results: str = "cache/runs/results.jsonl"
    table_acc: str = "mc_acc"        # the ACC columns of the report: mc_acc (MLLMU-Bench) | fact_acc
    max_profiles: int = 0            # evaluate at most this many profiles per set (0: all)
    likelihood_sets: str = "forget,test,retain,real"  # sets scored by option likelihood (MC-LL, cloze-LL)
    # Generated-answer tasks (protocol viker): mc (letter), gen (ROUGE/BLEU/coherence), cloze, fact.
    tasks: str = "mc,gen,cloze,fact"
    # official: each benchmark's authors' prompts, images and scoring (docs/REAL_BENCHMARKS.md,
    # pipeline/evaluation/protocol_mllmu.py, pipeline/evaluation/clear_eval.py); viker: our own uniform protocol (the
    # miniature benchmark's). Recorded in every results row.
    protocol: str = "viker"
    seed: int = 0                    # official protocol: few-shot profiles and Test_Set image draws
    test_images: str = "random"      # official MLLMU Test_Set: random (one seeded picture per item) | all
    # A gold model directory: trained as the vanilla one but without the forget people
    # (finetune.exclude_split). CLEAR: Forget Quality; MLLMU and the miniature benchmark: PrivLeak.
    gold: str = ""
    few_shot_split: str = "Full_Set" # official MLLMU: the split few-shot examples come from (eval.py --few_shot_data)
    # Membership inference (pipeline/evaluation/mia.py): forget-set QA (members) against mia_split's people, who were
    # never trained on (non-members). auto: when mia_split exists under data.root (the miniature benchmark's
    # Holdout_Set; MLLMU-Bench has no such split, see docs/REAL_BENCHMARKS.md); on: required; off.
    # With evaluate.gold (a model trained without the forget people) each attack also gets PrivLeak.
    mia: str = "auto"
    mia_split: str = "Holdout_Set"
    mia_k: float = 0.4               # the k of min-k% and min-k%++ (OpenUnlearning's default)


@dataclass
class RelearnConfig:
    """`viker attack relearn`: fine-tune an unlearned model on part of the forget set, test the rest."""
    fraction: float = 0.1            # share of the forget QA the attacker fine-tunes on (>= 1 item)
    # Calibrated on the demo's world (forget_10, 4 attacker QA, 32 held out): 40 steps at 1e-4 leave the
    # vanilla (96.9%) and the gold model (3.1%) as they were, so what comes back was hidden, not taught;
    # 10 steps at 1e-3 cut the vanilla to 53.1% (the attack then destroys instead of recovering).
    steps: int = 40
    lr: float = 1.0e-4
    batch_size: int = 4
    seed: int = 0                    # which QA the attacker holds: the same for every method compared
    lora: bool = False               # full fine-tuning (the stronger attacker; LoRA for a 7B)
    lora_r: int = 16
    lora_alpha: int = 32
    results: str = ""                # JSON lines to append the attack's row to (empty: print only)


@dataclass
class DemoConfig:
    """The unlearning sweep `viker demo` runs on the miniature benchmark."""
    methods: str = "ga,graddiff,kl_min,npo,idkpo,viker"
    budgets: str = "16,32,48"        # training steps per run: one trade-off curve per method
    lr: float = 2.0e-3
    lams: str = "0.5"                # ViKeR's lambda; several values give one ViKeR curve each
    seeds: str = "0"
    workers: int = 2                 # processes sharing the sweep, one torch thread each (1: in this process)
    attack_budget: int = 32          # the budget whose runs get the relearning attack (0: none)


@dataclass
class StudyConfig:
    """`viker study`: the comparisons over benchmark draws, splits and seeds (pipeline/study/grid.py)."""
    draws: str = "1,2,3"             # mini.seed of the test draws: >= 3, never 0 (the demo's draw)
    val_draw: int = 4                # mini.seed of the draw that picks hyper-parameters (not a test draw)
    val_split: str = "forget_10"
    splits: str = "forget_5,forget_10,forget_15"
    seeds: str = "0,1"               # training seeds
    methods: str = "ga,graddiff,kl_min,npo,idkpo,viker"
    budgets: str = "8,16,32,48"      # training steps: one forget-vs-utility curve per run
    lrs: str = "1e-3,2e-3"           # candidate learning rates, every method alike
    lams: str = "0.05,0.5"           # candidate ViKeR lambdas
    forget_metric: str = "fact_acc"  # Forget ACC of the matched-forgetting rule: fact_acc | mc_ll_acc | mc_acc
    utility_metric: str = "fact_acc" # retain utility of the selection rule (AUC of retain.<this>)
    ablation_split: str = "forget_10"  # comparisons beyond the main table run on this split, first seed
    refs: str = "pets,scenes,patterns,retain_set,forget_set"   # reference sources beside people
    ks: str = "1,3,10"               # k beside precompute.k
    lam_sweep: str = "0.02,0.1,0.2,1.0"
    regularisers: str = "jsd,cos"    # beside kl
    ablations: bool = True           # false: main table only
    workers: int = 2                 # worker processes, one torch thread each
    output: str = "cache/study"
    report: str = "docs/STUDY.md"
    n_boot: int = 2000               # bootstrap resamples of the 95% intervals


@dataclass
class Config:
    mini: MiniConfig = field(default_factory=MiniConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


def _coerce(key: str, value, typ):
    """Convert a YAML or command-line value to the field's type, or fail naming the key."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return int(as_float)
    if typ is float:
        # YAML 1.1 reads "1e-4" as a string, so floats are parsed here, not by YAML.
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(f"config key '{key}' has an unsupported type {typ!r}")


def _section_types(section_cls) -> dict[str, type]:
    return typing.get_type_hints(section_cls)


def _apply(cfg: Config, key: str, value) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config key '{key}' must look like section.name (e.g. train.lr)")
    section_name, name = parts
    section_types = typing.get_type_hints(Config)
    if section_name not in section_types:
        raise ConfigError(f"unknown config section '{section_name}' in '{key}' "
                          f"(known: {', '.join(section_types)})")
    section = getattr(cfg, section_name)
    types = _section_types(type(section))
    if name not in types:
        raise ConfigError(f"unknown config key '{key}' (known in {section_name}: {', '.join(types)})")
    setattr(section, name, _coerce(key, value, types[name]))


class Above(float):
    """An exclusive lower bound in RANGES: Above(0) means "> 0"."""


# Every numeric setting's allowed range, checked once the file and the overrides are applied:
# (key, lowest, highest or None). Inclusive bounds unless written Above(x). A new numeric key
# gets a row here. Bounds that need the model or the pool (k <= pool size, K <= vocabulary)
# are checked where those are known (precompute.check_against_inputs).
RANGES: tuple[tuple[str, float, float | None], ...] = (
    ("mini.seed", 0, None), ("mini.n_fictitious", 1, None), ("mini.n_real", 0, None),
    ("mini.train_images", 1, None), ("mini.test_images", 0, None), ("mini.pool_size", 1, None),
    ("mini.image_size", 1, None),
    ("tiny.vocab_size", 1, None), ("tiny.image_size", 1, None), ("tiny.patch_size", 1, None),
    ("tiny.vision_hidden", 1, None), ("tiny.vision_layers", 1, None), ("tiny.text_hidden", 1, None),
    ("tiny.text_layers", 1, None), ("tiny.text_heads", 1, None), ("tiny.max_positions", 1, None),
    ("finetune.steps", 0, None), ("finetune.epochs", Above(0), None), ("finetune.batch_size", 1, None),
    ("finetune.lr", 0, None),
    ("finetune.warmup_steps", 0, None), ("finetune.weight_decay", 0, None),
    ("finetune.max_grad_norm", 0, None), ("finetune.seed", 0, None), ("finetune.lora_r", 1, None),
    ("finetune.lora_alpha", 1, None), ("finetune.gate_min_acc", 0, 1), ("finetune.stop_known", 0, 1),
    ("finetune.check_every", 1, None), ("finetune.check_size", 0, None),
    ("precompute.k", 1, None), ("precompute.top_k", 1, None), ("precompute.seed", 0, None),
    ("precompute.shard_size", 1, None), ("precompute.batch_size", 1, None), ("precompute.prefix_cache_images", 0, None),
    ("train.lam", 0, None), ("train.beta", Above(0), None), ("train.retain_weight", 0, None),
    ("train.steps", 0, None), ("train.epochs", 0, None), ("train.batch_size", 1, None),
    ("train.grad_accum", 1, None), ("train.lr", 0, None), ("train.warmup_steps", 0, None),
    ("train.weight_decay", 0, None), ("train.max_grad_norm", 0, None), ("train.lora_r", 1, None),
    ("train.lora_alpha", 1, None), ("train.lora_dropout", 0, 1), ("train.save_every", 0, None),
    ("train.seed", 0, None), ("train.data_workers", 0, None),
    ("evaluate.few_shot", 0, None), ("evaluate.max_new_tokens", 1, None), ("evaluate.batch_size", 1, None),
    ("evaluate.max_profiles", 0, None), ("evaluate.mia_k", Above(0), 1), ("demo.workers", 1, None),
    ("demo.attack_budget", 0, None), ("mini.n_holdout", 0, None),
    ("relearn.fraction", Above(0), 0.9), ("relearn.steps", 1, None), ("relearn.lr", Above(0), None),
    ("relearn.batch_size", 1, None), ("relearn.seed", 0, None), ("relearn.lora_r", 1, None),
    ("relearn.lora_alpha", 1, None),
)


def _bound_text(low, high) -> str:
    low_text = f"> {low:g}" if isinstance(low, Above) else f">= {low:g}"
    return f"{low_text} and <= {high:g}" if high is not None else low_text


def check_ranges(cfg: Config) -> None:
    """Refuse the first setting outside its RANGES row, with the allowed range in the message."""
    from pipeline.models.families import FAMILIES
    if cfg.model.family != "auto" and cfg.model.family not in FAMILIES:
        raise ConfigError(f"config key 'model.family' must be auto or one of {', '.join(FAMILIES)}, "
                          f"got {cfg.model.family!r}")
    for key, low, high in RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        too_low = value <= low if isinstance(low, Above) else value < low
        if too_low or (high is not None and value > high):
            raise ConfigError(f"config key '{key}' must be {_bound_text(low, high)}, got {value!r}")


def csv_list(text: str) -> list[str]:
    """A comma-separated setting (demo.methods, study.budgets, ...) as its stripped, non-empty items."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must be KEY=VALUE, e.g. train.lr=1e-4")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults, then the YAML file, then KEY=VALUE overrides, each checked."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "parse error"
            raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections")
        for section_name, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config section '{section_name}' in {path} must be a mapping")
            for name, value in values.items():
                _apply(cfg, f"{section_name}.{name}", value)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, key, value)
    check_ranges(cfg)
    return cfg
