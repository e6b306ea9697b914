"""Models: load any local LLaVA-style model, build a tiny one offline, wrap it in LoRA.

Nothing here reaches a hub: `load_model` reads a local directory only
(`local_files_only=True`), and `build_tiny_llava` makes a complete HF model
directory (config, weights, BPE tokenizer, processor) from a config.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

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


def load_processor(path: str | Path):
    from transformers import AutoProcessor
    path = check_model_dir(path)
    check_processor_files(path)
    try:
        return AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as err:   # transformers raises OSError, ValueError, TypeError... for a damaged tokenizer
        raise ModelError(f"cannot load the tokenizer/processor in {path}: {_cause(err)}") from err


def load_model(path: str | Path, dtype: str = "auto", device: str = "auto", with_processor: bool = True):
    """(model, processor) from a local LLaVA-style directory, in eval mode on `device`."""
    from transformers import AutoModelForImageTextToText
    path = check_model_dir(path)
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
    return processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


# ---------------------------------------------------------------- tiny model

def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on the benchmark's text, with LLaVA's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # Prepend BOS like LLaMA's tokenizer so prompts look the same to both kinds of model.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="right",
    )


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
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden,
                       intermediate_size=cfg.text_hidden * 2, num_hidden_layers=cfg.text_layers,
                       num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_heads,
                       max_position_embeddings=cfg.max_positions,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    # vision_feature_layer -1: with a 2-layer tower, LLaVA's -2 would discard half of it.
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ---------------------------------------------------------------- LoRA

LANGUAGE_MODEL_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def wrap_lora(model, r: int = 16, alpha: int = 16, dropout: float = 0.05, targets: str = LANGUAGE_MODEL_TARGETS):
    """LoRA on the language model only: the vision tower, projector and lm_head stay frozen.

    A plain list like ["q_proj", "v_proj"] would also hit the CLIP tower, hence the regex.
    """
    from peft import LoraConfig, get_peft_model
    import re
    if not any(re.fullmatch(targets, name) for name, _ in model.named_modules()):
        raise ModelError(f"LoRA target pattern {targets!r} matched no module of the model")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    peft_model = get_peft_model(model, config)
    hit = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    if any("vision_tower" in n or "multi_modal_projector" in n for n in hit):
        raise ModelError("LoRA target pattern also matches the vision tower or projector; restrict it to the language model")
    return peft_model


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def set_threads() -> int:
    """Use every core we were given, not more (oversubscription slows small models); returns the count.

    VIKER_THREADS (or else OMP_NUM_THREADS) overrides: parallel workers, such as
    `viker study`'s, pin one thread each, because several torch processes each
    using every core ran 7x slower on 2 cores.
    """
    from . import usable_cores
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
