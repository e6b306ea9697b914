"""Models: load a local model of a supported family, build a tiny one offline, wrap it in LoRA.

Nothing here reaches a hub: `load_model` reads a local directory only
(`local_files_only=True`), and `build_tiny` makes a complete HF model directory
(config, weights, BPE tokenizer, processor with a chat template) of any family
in families.FAMILIES from one shape config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import families
from .prompts import IMAGE_TOKEN


# A chat template is required by LlavaProcessor; ours reproduces the MLLMU-Bench prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "\n{% else %}ASSISTANT: {{ m['content'][0]['text'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class ModelError(ValueError):
    """A model that cannot be used; the message is one line."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16 or float16)")
    return table[dtype]


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist (build it with `viker demo` or give a local HF model path)")
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path} has no config.json: not a Hugging Face model directory")
    return path


# Without these a processor still loads, but not the one the model was trained with (no image
# processor settings, default special tokens), and stage one and stage two would silently differ.
PROCESSOR_FILES = (("processor_config.json", "preprocessor_config.json"), ("tokenizer_config.json",),
                   ("tokenizer.json", "tokenizer.model", "vocab.json"))


def check_processor_files(path: Path) -> None:
    for choices in PROCESSOR_FILES:
        if not any((path / name).is_file() for name in choices):
            raise ModelError(f"model directory {path} has no {' or '.join(choices)}: "
                             f"its tokenizer/processor cannot be loaded as saved")


def _cause(err: Exception) -> str:
    """The first line of a library's error, prefixed by its type: enough to act on, never a traceback."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else 'no message'}"


def model_family(path: Path) -> families.Family:
    try:
        return families.family_of_dir(path)
    except families.FamilyError as err:
        raise ModelError(str(err)) from None


# Processors already read in this process, by directory and the state of its non-weight files. Parsing
# one costs ~0.16 s (the tokenizer's JSON), and the demo's and the study's jobs load the same model
# directory for every run and attack: 21 times in the demo. Nothing in viker changes a processor after
# loading it, so one object serves every caller; an edited or replaced file is a new key.
_PROCESSORS: dict[tuple, object] = {}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _processor_key(path: Path) -> tuple:
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES))
    return (str(path.resolve()), *((f.name, (st := f.stat()).st_size, st.st_mtime_ns) for f in files))


def load_processor(path: str | Path):
    path = check_model_dir(path)
    family = model_family(path)
    check_processor_files(path)
    key = _processor_key(path)
    if key in _PROCESSORS:
        return _PROCESSORS[key]
    try:
        processor = families.load_family_processor(path, family)
    except Exception as err:   # transformers raises OSError, ValueError, TypeError... for a damaged tokenizer
        raise ModelError(f"cannot load the tokenizer/processor in {path}: {_cause(err)}") from err
    _PROCESSORS[key] = processor
    return processor


def load_model(path: str | Path, dtype: str = "auto", device: str = "auto", with_processor: bool = True):
    """(model, processor) from a local model directory of a supported family (families.py), in eval mode on `device`."""
    from transformers import AutoModelForImageTextToText
    path = check_model_dir(path)
    model_family(path)                # an unsupported family is refused before anything loads
    if with_processor:
        check_processor_files(path)   # before paying for the weights
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True)
    except Exception as err:   # a damaged *.safetensors raises SafetensorError, a bad config ValueError...
        raise ModelError(f"cannot load the model in {path}: {_cause(err)}") from err
    model.to(dev).eval()
    return model, (load_processor(path) if with_processor else None)


def image_token_id(processor) -> int:
    return families.image_token_id(processor)


# ---------------------------------------------------------------- tiny model

LLAVA_TOKENS = {"specials": ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN], "bos": "<s>", "eos": "</s>",
                "pad": "<pad>", "unk": "<unk>", "extra": {"image_token": IMAGE_TOKEN}}


def train_tokenizer(texts: list[str], vocab_size: int, tokens: dict = LLAVA_TOKENS):
    """A byte-level BPE tokenizer trained on the benchmark's text, with a family's special tokens.

    `tokens`: specials (listed first, so their ids are fixed), bos (prepended
    to every text when set, like LLaMA's tokenizer; None: nothing, like
    Qwen's), eos, pad, unk and extra_special_tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=tokens.get("unk")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(tokens["specials"]), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tokens.get("bos")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=tokens["eos"], pad_token=tokens["pad"],
        unk_token=tokens.get("unk"), extra_special_tokens=dict(tokens.get("extra", {})), padding_side="right",
    )


def build_tiny(family: str, out: str | Path, texts: list[str], cfg, seed: int = 0) -> Path:
    """A tiny randomly initialised model of `family` (families.FAMILIES), saved as a normal HF directory.

    All families share `cfg` (config.TinyModelConfig): one image is 16 image
    tokens in each at the default shape (LLaVA: 32 px / patch 8; Qwen,
    Idefics3 and Gemma 3: patch 4, then 2 x 2 merged or pooled), so their
    costs compare.
    """
    builders = {"llava": build_tiny_llava, "llava_next": build_tiny_llava_next, "qwen2_5_vl": build_tiny_qwen2_5_vl,
                "idefics3": build_tiny_idefics3, "gemma3": build_tiny_gemma3}
    families.family_named(family)
    return builders[family](out, texts, cfg, seed=seed)


def _save(model, processor, tokenizer, out) -> Path:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _text_shape(cfg, tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * 2,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                num_key_value_heads=cfg.text_heads, max_position_embeddings=cfg.max_positions,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def build_tiny_llava_next(out: str | Path, texts: list[str], cfg, seed: int = 0) -> Path:
    """LLaVA-NeXT (1.6): the tiny LLaVA's towers with any-resolution views.

    Grid pinpoints 1x2, 2x1 and 2x2 crops: a square picture at the crop size
    (families.image_side) is one base view + 2 tiles, 36 image features with
    the row-end newlines (the tiny LLaVA has 16).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    side, patch = cfg.image_size, cfg.patch_size
    pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    image_proc = LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                            image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_proc, tokenizer=tokenizer, patch_size=patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_hidden * 2,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=4,
                              image_size=side, patch_size=patch, projection_dim=cfg.vision_hidden)
    config = LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(**_text_shape(cfg, tokenizer)),
                             image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                             image_grid_pinpoints=pinpoints, image_seq_length=(side // patch) ** 2,
                             vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return _save(LlavaNextForConditionalGeneration(config), processor, tokenizer, out)


# Qwen2.5-VL's template without its default system turn (a real checkpoint brings its own template,
# system turn included, and families.render uses whichever the processor has).
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_TOKENS = {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                            "<|image_pad|>", "<|video_pad|>"],
               "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None,
               "extra": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}}


def build_tiny_qwen2_5_vl(out: str | Path, texts: list[str], cfg, seed: int = 0) -> Path:
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = train_tokenizer(texts + ["user\n", "assistant\n"], cfg.vocab_size, QWEN_TOKENS)
    patch, side = cfg.patch_size // 2, cfg.image_size
    # min = max pixels = side^2: the processor keeps a side x side picture as it is (families.image_side)
    image_proc = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=patch,
                                          merge_size=2, temporal_patch_size=2)
    processor = families.qwen_image_processor_class()(image_processor=image_proc, tokenizer=tokenizer,
                                                      chat_template=QWEN_TEMPLATE)
    config = qwen_config(tokenizer, _text_shape(cfg, tokenizer),
                         dict(depth=cfg.vision_layers, hidden_size=cfg.vision_hidden,
                              intermediate_size=cfg.vision_hidden * 2, num_heads=4, patch_size=patch,
                              window_size=side, fullatt_block_indexes=[cfg.vision_layers - 1]),
                         rope_theta=10000.0)
    torch.manual_seed(seed)
    return _save(Qwen2_5_VLForConditionalGeneration(config), processor, tokenizer, out)


def qwen_config(tokenizer, text: dict, vision: dict, rope_theta: float):
    """A Qwen2.5-VL config for a QWEN_TOKENS tokenizer: `text` / `vision` give the shapes.

    M-RoPE splits each head's rotary frequencies over (time, height, width) as
    the 7B checkpoint does (16, 24, 24 of 64): a quarter, then 3/8 each.
    """
    from transformers import Qwen2_5_VLConfig
    half = text["hidden_size"] // text["num_attention_heads"] // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_TOKENS["specials"]}
    return Qwen2_5_VLConfig(
        text_config=dict(text, bos_token_id=tokenizer.pad_token_id,
                         rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": rope_theta}),
        vision_config=dict(vision, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


# Gemma 3's template shape (its BOS comes from the tokenizer here, not the template).
GEMMA3_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA3_TOKENS = {"specials": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                              "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
                 "bos": "<bos>", "eos": "<end_of_turn>", "pad": "<pad>", "unk": "<unk>",
                 "extra": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                           "eoi_token": "<end_of_image>"}}


def build_tiny_gemma3(out: str | Path, texts: list[str], cfg, seed: int = 0) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = train_tokenizer(texts + ["user\n", "model\n"], cfg.vocab_size, GEMMA3_TOKENS)
    patch, side, pool = cfg.patch_size // 2, cfg.image_size, 2
    tokens = (side // patch // pool) ** 2        # SigLIP patches average-pooled pool x pool
    image_proc = Gemma3ImageProcessorPil(size={"height": side, "width": side})
    processor = Gemma3Processor(image_processor=image_proc, tokenizer=tokenizer, chat_template=GEMMA3_TEMPLATE,
                                image_seq_length=tokens)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in GEMMA3_TOKENS["specials"]}
    head_dim = cfg.text_hidden // cfg.text_heads
    config = Gemma3Config(
        text_config=dict(_text_shape(cfg, tokenizer), head_dim=head_dim, query_pre_attn_scalar=head_dim,
                         sliding_window=cfg.max_positions),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=cfg.vision_hidden,
                           intermediate_size=cfg.vision_hidden * 2, num_hidden_layers=cfg.vision_layers,
                           num_attention_heads=4, image_size=side, patch_size=patch),
        mm_tokens_per_image=tokens, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"])
    torch.manual_seed(seed)
    return _save(Gemma3ForConditionalGeneration(config), processor, tokenizer, out)


# Idefics3's template shape (User:<image>question<end_of_utterance>\nAssistant: answer).
IDEFICS3_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
IDEFICS3_TOKENS = {"specials": ["<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<fake_token_around_image>",
                                "<image>", "<global-img>", "<end_of_utterance>"],
                   "bos": "<|begin_of_text|>", "eos": "<end_of_utterance>", "pad": "<pad>", "unk": None,
                   "extra": {"image_token": "<image>"}}


def build_tiny_idefics3(out: str | Path, texts: list[str], cfg, seed: int = 0) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = train_tokenizer(texts + ["User:", "Assistant:"], cfg.vocab_size, IDEFICS3_TOKENS)
    patch, side, scale = cfg.patch_size // 2, cfg.image_size, 2
    # No image splitting: one global picture per image, a fixed number of image tokens.
    image_proc = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": side},
                                           max_image_size={"longest_edge": side})
    processor = Idefics3Processor(image_processor=image_proc, tokenizer=tokenizer,
                                  image_seq_len=(side // patch) ** 2 // scale ** 2, chat_template=IDEFICS3_TEMPLATE)
    config = Idefics3Config(
        vision_config=dict(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_hidden * 2,
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=4, image_size=side,
                           patch_size=patch),
        text_config=dict(_text_shape(cfg, tokenizer), model_type="llama"),
        scale_factor=scale, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    return _save(Idefics3ForConditionalGeneration(config), processor, tokenizer, out)


def build_tiny_llava(out: str | Path, texts: list[str], cfg, seed: int = 0) -> Path:
    """Build and save a tiny randomly initialised LLaVA (`cfg`: config.TinyModelConfig).

    The saved directory loads with AutoProcessor / AutoModelForImageTextToText
    like any HF LLaVA checkpoint.
    """
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    from transformers.models.clip import CLIPImageProcessorPil

    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    image_size, patch = cfg.image_size, cfg.patch_size
    image_proc = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})
    # CLIP's class token is one extra vision position; strategy "default" drops it
    # again, so the prompt holds exactly (image/patch)^2 image tokens.
    processor = LlavaProcessor(image_processor=image_proc, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_hidden * 2,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=4,
                              image_size=image_size, patch_size=patch, projection_dim=cfg.vision_hidden)
    text = LlamaConfig(**_text_shape(cfg, tokenizer))
    # vision_feature_layer -1: with a 2-layer tower, LLaVA's -2 would discard half of it.
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return _save(LlavaForConditionalGeneration(config), processor, tokenizer, out)


# ---------------------------------------------------------------- LoRA

def wrap_lora(model, r: int = 16, alpha: int = 16, dropout: float = 0.05, targets: str = ""):
    """LoRA on the language model only: the vision side and lm_head stay frozen.

    `targets`: a regex over module names; empty means the family's decoder
    projections (families.lora_targets). A plain list like ["q_proj", "v_proj"]
    would also hit the vision tower, hence the regex.
    """
    from peft import LoraConfig, get_peft_model
    import re
    targets = targets or families.lora_targets(model)
    if not any(re.fullmatch(targets, name) for name, _ in model.named_modules()):
        raise ModelError(f"LoRA target pattern {targets!r} matched no module of the model")
    vision = families.family_of_model(model).vision
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    peft_model = get_peft_model(model, config)
    hit = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    if any(f".{part}." in n for n in hit for part in vision):
        raise ModelError(f"LoRA target pattern also matches the vision side ({', '.join(vision)}); "
                         f"restrict it to the language model")
    return peft_model


def set_threads() -> int:
    """Use every core we were given, not more (oversubscription slows small models); returns the count.

    VIKER_THREADS (or else OMP_NUM_THREADS) overrides: parallel workers, such as
    `viker study`'s, pin one thread each, because several torch processes each
    using every core ran 7x slower on 2 cores.
    """
    from pipeline.threads import usable_cores
    n = usable_cores()
    for name in ("VIKER_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ModelError(f"{name}={value!r} must be a positive integer (threads per process)")
            n = int(value)
            break
    torch.set_num_threads(max(1, n))
    return max(1, n)


def prepare_libraries() -> int:
    """Threads, and the libraries' logging, for a process that runs a model (the CLI's and every worker's).

    Returns the torch thread count.
    """
    import warnings
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()      # per-file "Loading weights" bars; our own bars stay
    # peft reads a property that transformers 5.2x deprecates; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    return set_threads()


def load_for_eval(model_dir, adapter=None, dtype: str = "auto", device: str = "auto"):
    """(model, processor) for a base, vanilla or merged model directory, or a base plus a LoRA adapter.

    A `model_dir` holding only an adapter (adapter_config.json, no config.json)
    is read as that adapter on the base it names. Adapters are merged into the
    weights: generation then runs at the plain model's speed.
    """
    base, adapter = _base_and_adapter(Path(model_dir), adapter)
    model, processor = load_model(base, dtype=dtype, device=device)
    if adapter is None:
        return model, processor
    from peft import PeftModel
    merged = PeftModel.from_pretrained(model, str(adapter), is_trainable=False).merge_and_unload()
    return merged.eval(), processor


def _base_and_adapter(model_dir: Path, adapter):
    if adapter is None and (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        base = json.loads((model_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ModelError(f"adapter {model_dir} does not name its base model; pass the base model and the adapter")
        return Path(base), model_dir
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelError(f"adapter {adapter} has no adapter_config.json: not a saved PEFT adapter")
    return model_dir, adapter
