"""Experiment configuration: one typed schema, YAML loading, KEY=VALUE overrides, all checked at load.

One YAML per experiment lives in `configs/`. Each section is a dataclass whose
fields carry their type (choices as `Literal`, lists as `list`), their default,
one line of meaning and their range (`pipeline.schema.setting`). `load_config`
applies the defaults, the file and the overrides, then checks every value and
the rules that tie keys together, before any work starts: an unknown key, a bad
choice or a value out of range is one line naming the key, the value and what
is allowed. docs/CONFIG.md lists every key; it is generated from this module
(`python -m pipeline.config > docs/CONFIG.md`) and a test keeps it in sync.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.data.mini_settings import MiniConfig
from pipeline.schema import ConfigError, check_section, coerce, field_types, setting

DType = Literal["auto", "float32", "bfloat16", "float16"]
SetName = Literal["forget", "test", "retain", "real"]
# train.method: the registry's methods (pipeline/stage2/methods/; a test keeps the two equal).
Method = Literal["ga", "graddiff", "kl_min", "npo", "idkpo", "viker", "simnpo", "rmu", "mmunlearner"]
# demo.methods / study.methods: the methods plus ViKeR with a retain term (ours), compared as methods of their own.
SweepMethod = Literal["ga", "graddiff", "kl_min", "npo", "idkpo", "viker", "simnpo", "rmu", "mmunlearner",
                      "viker+nll", "viker+kl", "viker-ga", "viker-ga+nll", "viker+span", "viker+span+nll",
                      "viker+span-ga", "viker+span-ga+nll", "viker+names", "viker+names+nll", "viker+names-ga",
                      "viker+names-ga+nll"]
Metric = Literal["fact_acc", "mc_ll_acc", "mc_acc"]


@dataclass
class DataConfig:
    benchmark: Literal["mllmu", "clear"] = setting("mllmu", "the benchmark's layout: mllmu (also the miniature benchmark) or clear")
    root: str = setting("cache/mini", "a directory laid out as the benchmark's dataset repository")
    forget_split: str = setting("forget_10", "the split to forget")
    retain_split: str = setting("", "the retain split; empty: the complement MLLMU-Bench pairs with forget_split")
    test_split: str = setting("", "the forget people on other images with paraphrased questions; empty: the "
                                  "benchmark's (MLLMU-Bench Test_Set, CLEAR <forget_split>_perturbed)")
    real_split: str = setting("", "real people, never forgotten; empty: the benchmark's (MLLMU-Bench Retain_Set, "
                                  "CLEAR real_faces)")
    finetune_split: str = setting("ft_Data", "what knowledge injection learns; several splits comma-separated (CLEAR: forget10,retain90)")
    train_root: str = setting("", "a directory in MLLMU-Bench's baseline_train_split layout whose QA the methods train on; "
                                  "empty: each split's own metadata")
    finetune_real: bool = setting(False, "knowledge injection also learns the real set (the miniature benchmark; "
                                         "MLLMU-Bench's vanilla model learned ft_Data only)")
    strict: bool = setting(False, "refuse a forget or retain item the reader drops for its content (an empty "
                                  "answer, a row without training QA) instead of naming it in the log (--strict)")


@dataclass
class ModelConfig:
    path: str = setting("cache/models/vanilla", "a local Hugging Face model directory of a supported family")
    dtype: DType = setting("auto", "weights' dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    family: Literal["auto", "llava", "llava_next", "qwen2_5_vl", "idefics3", "gemma3"] = setting(
        "auto", "auto: read from the model's config.json; `viker demo` builds a tiny model of this family")


@dataclass
class TinyModelConfig:
    """Shape of the tiny LLaVA built offline for tests and the demo."""
    vocab_size: int = setting(700, "tokenizer and embedding size", ge=1)
    image_size: int = setting(32, "vision tower input side", ge=1)
    patch_size: int = setting(8, "vision patch side", ge=1)
    vision_hidden: int = setting(64, "vision width", ge=1)
    vision_layers: int = setting(2, "vision depth", ge=1)
    text_hidden: int = setting(128, "language model width", ge=1)
    text_layers: int = setting(3, "language model depth", ge=1)
    text_heads: int = setting(4, "attention heads", ge=1)
    max_positions: int = setting(128, "longest sequence", ge=1)


@dataclass
class FinetuneConfig:
    """Knowledge injection: teach the base model the benchmark (-> vanilla model)."""
    base: str = setting("cache/models/tiny-base", "the model that learns the benchmark")
    output: str = setting("cache/models/vanilla", "where the taught (vanilla, or gold) model is saved")
    steps: int = setting(0, "step budget; 0: epochs x training QA / batch_size (a larger world gets a larger budget)", ge=0)
    epochs: float = setting(100.0, "budget in epochs when steps is 0", gt=0)
    batch_size: int = setting(32, "QA per step", ge=1)
    lr: float = setting(1.0e-3, "peak learning rate of the warm-up + cosine schedule", gt=0)
    warmup_steps: int = setting(50, "linear warm-up steps", ge=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "gradient clipping (0: none)", ge=0)
    seed: int = setting(0, "data order, augmentation and initialisation", ge=0)
    augment: bool = setting(True, "fresh image jitter every step (memorise people, not pixels)")
    formats: bool = setting(False, "also show each QA in the generation prompt (tiny models only)")
    lora: bool = setting(False, "LoRA instead of full fine-tuning (a 7B model)")
    lora_r: int = setting(16, "LoRA rank when lora", ge=1)
    lora_alpha: int = setting(32, "LoRA alpha when lora", ge=1)
    gate_min_acc: float = setting(0.9, "the demo stops if the vanilla model knows less than this", ge=0, le=1)
    stop_known: float = setting(0.95, "stop once this share of the checked training answers is exact (0: whole budget)",
                                ge=0, le=1)
    check_every: int = setting(50, "steps between convergence checks", ge=1)
    check_size: int = setting(128, "training questions asked at each check (0: all)", ge=0)
    exclude_split: str = setting("", "leave this split's people out: the gold model (empty: every person, the vanilla model)")


@dataclass
class PrecomputeConfig:
    output: str = setting("cache/refs/demo", "the reference cache directory")
    pool: str = setting("people", "reference images: people, pets, scenes, patterns (the benchmark's pools) or a directory")
    reference: Literal["pool", "own"] = setting("pool", "pool: ViKeR's k irrelevant images; own: the w/o Vis ablation (k=1, I' = I)")
    k: int = setting(5, "reference images averaged per sample", ge=1)
    top_k: int = setting(64, "tokens kept per position (the rest is one tail bucket)", ge=1)
    seed: int = setting(0, "which pool images each sample draws", ge=0)
    shard_size: int = setting(64, "samples per HDF5 shard", ge=1)
    batch_size: int = setting(64, "(sample, image) pairs per forward", ge=1)
    prefix_cache: bool = setting(True, "encode each image prefix once and reuse it for every question")
    scores: list[Literal["reference", "own", "idk"]] = setting(
        doc="fields stage one scores: reference (R), own (own-image log-likelihood: NPO, IdkPO), idk (IdkPO); "
            "train refuses a cache without what its method needs", factory=lambda: ["reference", "own", "idk"],
        min_items=1)
    prefix_cache_images: int = setting(0, "image prefixes kept at once; 0: sized from free GPU memory, 32 on CPU", ge=0)
    idk_answer: str = setting("I don't know.", "IdkPO's refusal answer")
    dtype: DType = setting("auto", "stage one's model dtype")
    allow_benchmark_images: bool = setting(False, "accept pool images equal to benchmark images (the paper's ablation)")
    span: Literal["none", "chain"] = setting(
        "none", "none: R as the paper defines it (teacher-forced on the true answer); chain: a fact's later tokens "
                "get the reference's probability of reaching them, p_t times its first tokens' (stage1/spans.py)")
    names: Literal["none", "swap"] = setting(
        "none", "swap: where the question or answer names the forget person, each reference pair also puts a "
                "stranger's name in its place (stage1/counterfactual.py); none: the image swap alone")
    name_pool: str = setting("builtin", "the strangers of names swap: builtin (invented names), a split of "
                                        "data.root whose people were never trained on (Holdout_Set), or a text file "
                                        "with one name per line")


@dataclass
class TrainConfig:
    method: Method = setting("viker", "the unlearning method (docs/METHODS.md)")
    output: str = setting("cache/runs/demo", "the run's directory: adapter, train_config.json, log")
    regulariser: Literal["kl", "jsd", "cos"] = setting("kl", "ViKeR's divergence D")
    lam: float = setting(0.5, "ViKeR's lambda", ge=0)
    use_ga: bool = setting(True, "false: ViKeR's w/o GA ablation")
    token_lambda: bool = setting(False, "experimental: lambda_i from the reference entropy")
    beta: float = setting(0.0, "NPO's and SimNPO's beta (IdkPO's too under convention viker); 0: the convention's "
                               "(docs/METHODS.md): NPO 0.4, 0.1 under openunlearning; SimNPO 2.5, 4.5 under "
                               "mllmu and openunlearning", ge=0)
    convention: Literal["viker", "mllmu", "openunlearning"] = setting(
        "viker", "how the baselines' losses are written (docs/METHODS.md)")
    idk_beta: float = setting(0.1, "IdkPO's beta under conventions mllmu and openunlearning", gt=0)
    simnpo_gamma: float = setting(0.0, "SimNPO's margin, in per-token NLL units (the paper's gamma / beta; "
                                       "OpenUnlearning's delta)", ge=0)
    rmu_layer: int = setting(-1, "RMU: the decoder layer (0-based) whose output is steered; -1: the middle one, "
                                 "(layers - 1) // 2", ge=-1)
    rmu_steering: float = setting(2.0, "RMU's steering coefficient c, the norm of the forget target c*u "
                                       "(OpenUnlearning's RMU.yaml: 2)", gt=0)
    mmu_threshold: float = setting(1.0, "MMUnlearner: a row of a LoRA-targeted weight trains when its forget Fisher "
                                        "over its retain Fisher is >= this (the authors' 1; docs/METHODS.md)", gt=0)
    mmu_mask_samples: int = setting(0, "MMUnlearner: forget and retain samples, each, evenly spaced through the "
                                       "split, whose gradients score the mask; 0: all of both (the authors')", ge=0)
    retain_weight: float = setting(0.0, "alpha, the weight of the method's retain term; 0: the method's default", ge=0)
    retain_term: Literal["none", "nll", "kl"] = setting(
        "none", "ViKeR only: none (the paper's loss), nll (+ retain NLL) or kl (+ KL to the vanilla model on retain)")
    steps: int = setting(0, "training steps; 0: from epochs", ge=0)
    epochs: float = setting(1.0, "epochs over the forget set when steps is 0", ge=0)
    batch_size: int = setting(4, "forget samples per micro-batch", ge=1)
    grad_accum: int = setting(1, "micro-batches per step", ge=1)
    lr: float = setting(2.0e-5, "peak learning rate (linear warm-up and decay)", ge=0)
    warmup_steps: int = setting(0, "linear warm-up steps", ge=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "gradient clipping (0: none)", ge=0)
    lora_r: int = setting(16, "LoRA rank", ge=1)
    lora_alpha: int = setting(16, "LoRA alpha", ge=1)
    lora_dropout: float = setting(0.05, "LoRA dropout", ge=0, le=1)
    lora_targets: str = setting("", "regex over module names; empty: the family's decoder projections")
    grad_checkpointing: bool = setting(False, "activation checkpointing (less memory, slower)")
    save_every: int = setting(0, "steps between resumable checkpoints (0: none)", ge=0)
    seed: int = setting(0, "LoRA init, data order, dropout", ge=0)
    online_reference: bool = setting(False, "ViKeR computes R during training instead of reading the cache")
    merge: bool = setting(False, "also save the adapter merged into the model")
    use_cache_settings: bool = setting(False, "train with the cache's k, K, seed, pool and reference when they "
                                              "differ from precompute.* (else refused)")
    data_workers: int = setting(2, "DataLoader processes reading references and images (0: in the loop)", ge=0)


@dataclass
class EvalConfig:
    sets: list[SetName] = setting(doc="the sets evaluated", factory=lambda: ["forget", "test", "retain", "real"],
                                  min_items=1)
    few_shot: int = setting(1, "worked examples before each multiple-choice item (protocol viker)", ge=0)
    max_new_tokens: int = setting(50, "tokens generated per answer", ge=1)
    batch_size: int = setting(32, "items per forward", ge=1)
    coherence_classifier: str = setting("", "a local HF text-classification model; empty: the model-free score")
    results: str = setting("cache/runs/results.jsonl", "JSON-lines file rows are appended to")
    table_acc: Literal["mc_acc", "fact_acc"] = setting("mc_acc", "the ACC columns of the report")
    max_profiles: int = setting(0, "evaluate at most this many profiles per set (0: all)", ge=0)
    likelihood_sets: list[SetName] = setting(doc="sets also scored by option likelihood (MC-LL, cloze-LL)",
                                             factory=lambda: ["forget", "test", "retain", "real"])
    gen_sets: list[SetName] = setting(doc="sets the gen task runs on (open generation: ROUGE/BLEU/coherence); the "
                                          "others skip it", factory=lambda: ["forget", "test", "retain", "real"])
    tasks: list[Literal["mc", "gen", "cloze", "fact"]] = setting(
        doc="generated-answer tasks (both protocols): mc (letter), gen (ROUGE/BLEU/coherence), cloze, fact",
        factory=lambda: ["mc", "gen", "cloze", "fact"], min_items=1)
    protocol: Literal["viker", "official"] = setting(
        "viker", "official: each benchmark's authors' prompts, images and scoring; viker: our uniform protocol")
    seed: int = setting(0, "official protocol: few-shot profiles and Test_Set image draws", ge=0)
    test_images: Literal["random", "all"] = setting("random", "official MLLMU Test_Set: one seeded picture per item, or all")
    gold: str = setting("", "a gold model directory (trained without the forget people): PrivLeak, CLEAR's Forget Quality")
    gold_distance: bool = setting(True, "with a gold model: KL from its answer distributions on the forget QA, "
                                        "all / key / normal tokens (pipeline/evaluation/oracle.py)")
    few_shot_split: str = setting("Full_Set", "official MLLMU: the split few-shot examples come from")
    mia: Literal["auto", "on", "off"] = setting(
        "auto", "membership inference: auto (when mia_split exists), on (required) or off")
    mia_split: str = setting("Holdout_Set", "never-trained people: the non-members of membership inference")
    mia_k: float = setting(0.4, "the k of min-k% and min-k%++", gt=0, le=1)
    attacks: list[Literal["logit_lens", "probe", "quantize"]] = setting(
        doc="attacks whose summary goes into the row of the evaluations that run the relearning attack (the "
            "demo's and the study's attacked runs, `viker evaluate`), each with its own section's settings",
        factory=list)


@dataclass
class RelearnConfig:
    """`viker attack relearn`: fine-tune an unlearned model on part of the forget set, test the rest."""
    fraction: float = setting(0.1, "share of the forget QA the attacker fine-tunes on (>= 1 item)", gt=0, le=0.9)
    # Calibrated on the demo's world (forget_10, 4 attacker QA, 32 held out): 40 steps at 1e-4 leave the
    # vanilla (96.9%) and the gold model (3.1%) as they were, so what comes back was hidden, not taught.
    steps: int = setting(40, "attacker's fine-tuning steps (the default cell: recovery)", ge=1)
    lr: float = setting(1.0e-4, "attacker's learning rate (the default cell)", gt=0)
    # The worst-case grid, measured on the same world (item split, seed 0: lr 1e-5..3e-3 x 10..160 steps;
    # seed 1: 1e-4, 3e-4 x 20, 40, 80). lr >= 1e-3 destroys the vanilla model (96.9% -> 0-47%): nothing
    # hidden can come back through it. 3e-4 costs the vanilla model 1-4 of 32 items at 20-40 steps (up to 7
    # at 80-160) and teaches the gold model 2 (3.1% -> 9.4%; every cell does on seed 1, the gold row shows
    # it); 1e-5 and 3e-5 bring back less than 1e-4. Attacking GA, NPO, GradDiff and ViKeR (32 steps), 7 of
    # the 8 (method, seed) worst cells of 1e-4..3e-4 x 20..80 lie in this 2 x 2 (ViKeR seed 0: 1e-4 x 80,
    # 2 items more). 4 cells, 120 steps with the default one; with the people split one attack on the demo
    # takes 4.4-5.0 s instead of 1.1-1.5 s (one thread; docs/PERFORMANCE.md).
    grid_lrs: list[float] = setting(doc="learning rates of the worst-case grid, x grid_steps (empty: no grid, "
                                        "the default cell only): worst_recovery",
                                    factory=lambda: [1.0e-4, 3.0e-4], gt=0)
    grid_steps: list[int] = setting(doc="steps of the worst-case grid, x grid_lrs (empty: no grid)",
                                    factory=lambda: [20, 40], ge=1)
    people: bool = setting(True, "also the held-out-people split: the attacker learns all QA of half the forget "
                                 "people, the others' are tested (people_recovery)")
    batch_size: int = setting(4, "attacker's batch size", ge=1)
    seed: int = setting(0, "which QA the attacker holds: the same for every method compared", ge=0)
    lora: bool = setting(False, "LoRA attacker (a 7B); false: full fine-tuning, the stronger attacker")
    lora_r: int = setting(16, "LoRA rank when lora", ge=1)
    lora_alpha: int = setting(32, "LoRA alpha when lora", ge=1)
    results: str = setting("", "JSON lines to append the attack's row to (empty: print only)")


@dataclass
class QuantizeConfig:
    """`viker attack quantize`: round the unlearned model's weights as a deployment would; is the forget set back?"""
    schemes: list[Literal["fp16", "bf16", "int8", "int4", "nf4"]] = setting(
        doc="precisions tried, each against the unquantized model: fp16, bf16 (every weight cast and back), int8, "
            "int4 (round-to-nearest, absmax per group), nf4 (QLoRA's NormalFloat, absmax per block)",
        factory=lambda: ["fp16", "bf16", "int8", "int4", "nf4"], min_items=1)
    group_size: int = setting(128, "int8/int4: weights of a row per absmax scale (GPTQ/AWQ's common 128); 0: one "
                                   "scale per output row", ge=0)
    nf4_block: int = setting(64, "nf4: weights of the flattened matrix per absmax scale (bitsandbytes' default)", ge=1)
    modules: Literal["language", "all"] = setting(
        "language", "Linear layers int8/int4/nf4 round: language (the decoder, what unlearning changed) or all "
                    "(vision tower and projector too, as a bitsandbytes load); the LM head never")
    sets: list[SetName] = setting(doc="sets whose fact accuracy is measured: forget (required: recovery) and utility "
                                      "sets", factory=lambda: ["forget", "retain"], min_items=1)
    results: str = setting("", "JSON lines to append the attack's row to (empty: print only)")


@dataclass
class LogitLensConfig:
    """`viker attack logit-lens`: read every decoder layer through the final norm and LM head; is the answer there?"""
    tokens: Literal["fact", "all"] = setting(
        "fact", "answer tokens the score is read on: fact (the tokens spelling the fact, the key tokens) or all")
    top_k: int = setting(1, "a position is a hit when the true token is among the lens's top k (1: top-1; "
                            "the Head Projection attack's candidate budget is a larger k)", ge=1)
    results: str = setting("", "JSON lines to append the attack's row to (empty: print only)")


@dataclass
class ProbeConfig:
    """`viker attack probe`: ask the forget people's questions on other or altered pictures and in other words."""
    probes: list[Literal["held_out", "crop", "noise", "flip", "paraphrase"]] = setting(
        doc="probes asked, each against the same question unprobed: held_out (the Test split's other portraits), "
            "crop, noise, flip (the forget picture altered), paraphrase (the Test split's reworded questions)",
        factory=lambda: ["held_out", "crop", "noise", "flip", "paraphrase"], min_items=1)
    crop: float = setting(0.8, "crop: the share of each side the center crop keeps, then resized back", gt=0, lt=1)
    noise_sigma: float = setting(0.1, "noise: standard deviation of the Gaussian noise on the [0, 1] pixel scale",
                                 gt=0, le=1)
    seed: int = setting(0, "noise: the seed (with each picture's pixels: a picture gets the same noise for every "
                           "model)", ge=0)
    results: str = setting("", "JSON lines to append the attack's row to (empty: print only)")


@dataclass
class DemoConfig:
    """The unlearning sweep `viker demo` runs on the miniature benchmark."""
    methods: list[SweepMethod] = setting(doc="methods swept",
                                         factory=lambda: ["ga", "graddiff", "kl_min", "npo", "idkpo", "viker"],
                                         min_items=1)
    budgets: list[int] = setting(doc="training steps per run: one trade-off curve per method",
                                 factory=lambda: [16, 32], ge=1, min_items=1)
    lr: float = setting(2.0e-3, "every method's learning rate", gt=0)
    lams: list[float] = setting(doc="ViKeR's lambdas: one ViKeR curve each", factory=lambda: [0.5], ge=0, min_items=1)
    seeds: list[int] = setting(doc="training seeds", factory=lambda: [0], ge=0, min_items=1)
    workers: int = setting(2, "processes sharing the sweep, one torch thread each (1: in this process)", ge=1)
    attack_budget: int = setting(32, "the budget whose runs get the relearning attack (0: none)", ge=0)
    prebuilt: bool = setting(True, "use the vanilla and gold models shipped with viker when made from these "
                                   "settings (false: knowledge injection here, minutes)")


@dataclass
class StudyConfig:
    """`viker study`: the comparisons over benchmark draws, splits and seeds (pipeline/study/grid.py)."""
    draws: list[int] = setting(doc="mini.seed of the test draws: >= 3 distinct, never 0 (the demo's draw)",
                               factory=lambda: [1, 2, 3], ge=1, min_items=3)
    val_draw: int = setting(4, "mini.seed of the draw that picks hyper-parameters (not a test draw)", ge=1)
    val_split: str = setting("forget_10", "the validation draw's forget split")
    splits: list[str] = setting(doc="forget splits compared", factory=lambda: ["forget_5", "forget_10", "forget_15"],
                                min_items=1)
    seeds: list[int] = setting(doc="training seeds", factory=lambda: [0, 1], ge=0, min_items=1)
    methods: list[SweepMethod] = setting(doc="methods compared",
                                         factory=lambda: ["ga", "graddiff", "kl_min", "npo", "idkpo", "viker"],
                                         min_items=1)
    budgets: list[int] = setting(doc="training steps: one forget-vs-utility curve per run",
                                 factory=lambda: [8, 16, 32, 48], ge=1, min_items=1)
    lrs: list[float] = setting(doc="candidate learning rates, every method alike", factory=lambda: [1e-3, 2e-3],
                               gt=0, min_items=1)
    lams: list[float] = setting(doc="candidate ViKeR lambdas", factory=lambda: [0.05, 0.5], ge=0, min_items=1)
    forget_metric: Metric = setting("fact_acc", "Forget ACC of the matched-forgetting rule")
    utility_metric: Metric = setting("fact_acc", "retain utility of the selection rule (AUC of retain.<this>)")
    ablation_split: str = setting("forget_10", "comparisons beyond the main table run on this split, first seed")
    refs: list[str] = setting(doc="reference sources beside people (pools, retain_set, forget_set, own)",
                              factory=lambda: ["pets", "scenes", "patterns", "retain_set", "forget_set"])
    ks: list[int] = setting(doc="k beside precompute.k", factory=lambda: [1, 3, 10], ge=1)
    lam_sweep: list[float] = setting(doc="lambdas of the lambda ablation", factory=lambda: [0.02, 0.1, 0.2, 1.0], ge=0)
    regularisers: list[Literal["kl", "jsd", "cos"]] = setting(doc="divergences beside kl",
                                                              factory=lambda: ["jsd", "cos"])
    ablations: bool = setting(True, "false: main table only")
    workers: int = setting(2, "worker processes, one torch thread each", ge=1)
    output: str = setting("cache/study", "where the study's draws, caches and runs go")
    report: str = setting("docs/STUDY.md", "the report written at the end")


@dataclass
class Config:
    mini: MiniConfig = dataclasses.field(default_factory=MiniConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tiny: TinyModelConfig = dataclasses.field(default_factory=TinyModelConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    precompute: PrecomputeConfig = dataclasses.field(default_factory=PrecomputeConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    relearn: RelearnConfig = dataclasses.field(default_factory=RelearnConfig)
    quantize: QuantizeConfig = dataclasses.field(default_factory=QuantizeConfig)
    logit_lens: LogitLensConfig = dataclasses.field(default_factory=LogitLensConfig)
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)
    study: StudyConfig = dataclasses.field(default_factory=StudyConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)   # section name -> its class, in file order


# ------------------------------------------------------------ the rules that tie keys together

def check_rules(cfg: Config) -> None:
    """What no single field can say: one line naming the keys."""
    t, s = cfg.train, cfg.study
    if t.retain_term != "none" and t.method != "viker":
        raise ConfigError(f"config key 'train.retain_term' applies to method viker only (graddiff and kl_min are "
                          f"the retain-aware baselines); got retain_term={t.retain_term} with method {t.method}")
    if t.online_reference and t.method != "viker":
        raise ConfigError(f"config key 'train.online_reference' applies to method viker only, not {t.method}")
    # the sweep keys whose Variant.reference is set (tests/test_methods.py keeps this rule and the registry equal)
    own_cache = [m for m in cfg.demo.methods if "+span" in m or "+names" in m]
    if own_cache:
        raise ConfigError(f"config key 'demo.methods': {own_cache[0]} needs a reference cache of its own "
                          f"(precompute.span / precompute.names): compare it with viker study, or set those keys "
                          f"for the whole demo")
    if t.online_reference and cfg.precompute.names != "none":
        raise ConfigError("config key 'train.online_reference' computes R from pool images alone: the textual "
                          "counterfactuals of 'precompute.names' swap need the cache (viker precompute)")
    if cfg.precompute.names != "none" and cfg.precompute.reference != "pool":
        raise ConfigError("config key 'precompute.names' swap pairs strangers with the pool images: it needs "
                          f"precompute.reference pool, not {cfg.precompute.reference}")
    if t.steps == 0 and t.epochs == 0:
        raise ConfigError("config keys 'train.steps' and 'train.epochs' are both 0: set one of them > 0")
    if not t.output:
        raise ConfigError("config key 'train.output' is empty: name the run's output directory")
    if "reference" not in cfg.precompute.scores:
        raise ConfigError(f"config key 'precompute.scores' must include reference (the cache's reference "
                          f"distributions), got {cfg.precompute.scores!r}")
    if len(set(s.draws)) < 3:
        raise ConfigError(f"config key 'study.draws' needs >= 3 distinct benchmark draws, got {s.draws!r}")
    if s.val_draw in s.draws:
        raise ConfigError(f"config key 'study.val_draw' ({s.val_draw}) is also a test draw (study.draws): "
                          f"choose hyper-parameters on a draw of its own")
    if "mc_acc" in (s.forget_metric, s.utility_metric) and "mc" not in cfg.evaluate.tasks:
        raise ConfigError("config keys 'study.forget_metric'/'study.utility_metric' mc_acc need the mc task: "
                          "add mc to evaluate.tasks")
    if "forget" not in cfg.quantize.sets:
        raise ConfigError(f"config key 'quantize.sets' must include forget (recovery is measured there), "
                          f"got {','.join(cfg.quantize.sets)}")
    device = cfg.model.device
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"config key 'model.device' must be auto, cpu, cuda or cuda:N, got {device!r}")


# ------------------------------------------------------------ loading

def _apply(cfg: Config, key: str, value) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config key '{key}' must look like section.name (e.g. train.lr)")
    section_name, name = parts
    if section_name not in SECTIONS:
        raise ConfigError(f"unknown config section '{section_name}' in '{key}' (known: {', '.join(SECTIONS)})")
    section = getattr(cfg, section_name)
    types = field_types(type(section))
    if name not in types:
        raise ConfigError(f"unknown config key '{key}' (known in {section_name}: {', '.join(types)})")
    setattr(section, name, coerce(key, value, types[name]))


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must be KEY=VALUE, e.g. train.lr=1e-4")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def check_config(cfg: Config) -> Config:
    """Every field against its type and range, then the rules between keys; returns cfg."""
    for name in SECTIONS:
        check_section(name, getattr(cfg, name))
    check_rules(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults, then the YAML file (after the file it names as `base`), then KEY=VALUE overrides; all checked."""
    cfg = Config()
    if path is not None:
        for section_name, values in _read_yaml(Path(path), ()).items():
            for name, value in values.items():
                _apply(cfg, f"{section_name}.{name}", value)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, key, value)
    return check_config(cfg)


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, dict]:
    """A config file's sections, merged over those of its `base:` file (a path relative to it), key by key.

    A variant (configs/demo_full.yaml) names only what it changes, so the
    settings it shares with its base have one source.
    """
    import yaml
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (f" (the base of {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} is its own base (through {' -> '.join(map(str, seen))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections")
    merged: dict[str, dict] = {}
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"config key 'base' in {path} must be the path of another config file")
        merged = _read_yaml(path.parent / base, seen + (path.resolve(),))
    for section_name, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section_name}' in {path} must be a mapping")
        merged.setdefault(section_name, {}).update(values)
    return merged


def config_dict(cfg: Config) -> dict:
    """The resolved configuration as plain data (what rows and adapters record)."""
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    import yaml
    return yaml.safe_dump(config_dict(cfg), sort_keys=False, default_flow_style=False, width=100)


# ------------------------------------------------------------ docs/CONFIG.md

def reference_markdown() -> str:
    """docs/CONFIG.md: every key with its default, type and choices or range, and its meaning."""
    lines = ["# Configuration reference", "",
             "Every key of the configuration, generated from `pipeline/config.py` "
             "(`python -m pipeline.config > docs/CONFIG.md`; a test checks that this file is in sync).",
             "Set keys in a YAML file (`--config F`, one section per mapping) or on the command line "
             "(`section.key=value`; lists as `a,b,c`). `viker config show [--config F] [KEY=VALUE...]` "
             "prints the resolved configuration. Every value is checked when the configuration is loaded, "
             "before any work starts.", ""]
    from pipeline.schema import range_text, type_text
    for name, cls in SECTIONS.items():
        doc = (cls.__doc__ or "").strip()
        lines += [f"## `{name}`", ""]
        if doc and not doc.startswith(cls.__name__ + "("):
            lines += [doc, ""]
        lines += ["| key | default | allowed | meaning |", "|---|---|---|---|"]
        types = field_types(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            shown = ",".join(map(str, default)) if isinstance(default, list) else str(default).lower() \
                if isinstance(default, bool) else default
            shown = f"`{shown}`" if shown != "" else "(empty)"
            tp = types[f.name]
            allowed = "true, false" if tp is bool else " ".join(filter(None, [type_text(tp), range_text(f)]))
            if f.metadata.get("min_items"):
                allowed += f", at least {f.metadata['min_items']}"
            lines.append(f"| `{name}.{f.name}` | {shown} | {allowed.replace('str', 'text')} | "
                         f"{f.metadata.get('doc', '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
