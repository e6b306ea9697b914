"""Model families: what differs between LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Idefics3 and Gemma 3, in one table.

Every other module is written once and asks this one where a family differs:

- the prompt: prompts.py writes every prompt in MLLMU-Bench's LLaVA form
  (`USER: <image>\\n{body}\\nASSISTANT:{answer}`). LLaVA reads it as written (the
  benchmark's own prompt, eval.py). For the other families `render` re-renders
  it through the processor's chat template: one user turn holding the image and
  the body, then the generation prompt, then the answer. That is how the
  benchmark's authors prompt Idefics2 (MLLMU-Bench data_process/data_preprocess.py,
  train_collate_fn_idefics: processor.apply_chat_template of [image, question]);
- the text an image placeholder becomes (`image_expansion`: asked of the
  processor itself, once, on a blank picture);
- pixels: every family's images are kept as normalised [N, C, H, W] tensors,
  one row per image (so banks, jitter and row indexing are shared code);
  `vision_inputs` turns rows into what the family's forward takes (Qwen:
  flattened patches + grid, Idefics3: one image per sample, LLaVA-NeXT: its
  views, kept stacked on the channel axis, + image_sizes);
- where the decoder sits (prefix path, LoRA targets) and what is vision side;
- position ids: Qwen's M-RoPE gives an image 2-D positions, so the text after
  it does not sit at its index; `rope_positions` builds them (DESIGN of Qwen2-VL,
  checked against the model's own get_rope_index in tests/test_families.py);
- attention: Gemma 3's image tokens see each other both ways (`image_types`).

Dynamic-resolution processors (Qwen) would give each picture its own number
of image tokens. Every image is resized to one square side first (`image_side`),
so a prompt's image prefix has one length for the whole pool and stage one can
reuse it; the side is part of the cache fingerprint (fingerprint.template_record).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch


class FamilyError(ValueError):
    """A model or processor viker does not know how to drive; the message is one line."""


@dataclass(frozen=True)
class Family:
    name: str                  # config.model_type, and `model.family` for tiny builds
    title: str
    prompt: str                # "mllmu": the benchmark's literal LLaVA prompt; "chat": the chat template
    answer_space: bool         # the answer follows the generation prompt after one space
    decoder: str               # attribute of model.model that is the language model
    vision: tuple[str, ...]    # attributes of model.model on the vision side (never LoRA targets)
    layout: str                # "image": [N,C,H,W]; "patches": Qwen's; "crops": [N,1,C,H,W]; "tiles": [N,P,C,H,W]
    mrope: bool                # 3-D rotary positions (rope_positions)
    processor: str             # processor class name
    image_blocks: bool = False  # image tokens attend to each other both ways (Gemma 3's token_type_ids)


FAMILIES = {
    "llava": Family("llava", "LLaVA-1.5", "mllmu", True, "language_model",
                    ("vision_tower", "multi_modal_projector"), "image", False, "LlavaProcessor"),
    "qwen2_5_vl": Family("qwen2_5_vl", "Qwen2.5-VL", "chat", False, "language_model",
                         ("visual",), "patches", True, "Qwen2_5_VLProcessor"),
    "idefics3": Family("idefics3", "Idefics3 / SmolVLM", "chat", True, "text_model",
                       ("vision_model", "connector"), "crops", False, "Idefics3Processor"),
    "llava_next": Family("llava_next", "LLaVA-NeXT (1.6)", "chat", True, "language_model",
                         ("vision_tower", "multi_modal_projector"), "tiles", False, "LlavaNextProcessor"),
    "gemma3": Family("gemma3", "Gemma 3", "chat", False, "language_model",
                     ("vision_tower", "multi_modal_projector"), "image", False, "Gemma3Processor",
                     image_blocks=True),
}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise FamilyError(f"unknown model family {name!r} (supported: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of_config(config) -> Family:
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise FamilyError(f"model type {kind!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[kind]


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def family_of_model(model) -> Family:
    return family_of_config(_base(model).config)


def family_of_dir(path) -> Family:
    """The family of a saved model directory, from its config.json alone (before anything loads)."""
    try:
        kind = json.loads(Path(path, "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise FamilyError(f"cannot read {Path(path, 'config.json')}: {type(err).__name__}") from None
    if kind not in FAMILIES:
        raise FamilyError(f"model type {kind!r} in {path} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[kind]


def family_of_processor(processor) -> Family:
    by_class = {fam.processor: fam for fam in FAMILIES.values()}
    for cls in type(processor).__mro__:   # the nearest class first (QwenImageOnlyProcessor -> its parent)
        if cls.__name__ in by_class:
            return by_class[cls.__name__]
    raise FamilyError(f"processor {type(processor).__name__} is not one of a supported family "
                      f"({', '.join(f.processor for f in FAMILIES.values())})")


# ---------------------------------------------------------------- processors

_QWEN_PROCESSOR = None


def qwen_image_processor_class():
    """Qwen2_5_VLProcessor without its video processor.

    transformers 5.x will not build the Qwen processor without a video
    processor, and that needs torchvision, which breaks beside the CPU torch
    build here. viker never passes videos: this subclass lists
    only the image processor and the tokenizer, and behaves the same on images.
    """
    global _QWEN_PROCESSOR
    if _QWEN_PROCESSOR is None:
        from transformers import Qwen2_5_VLProcessor

        class QwenImageOnlyProcessor(Qwen2_5_VLProcessor):
            @classmethod
            def get_attributes(cls):
                return ["image_processor", "tokenizer"]

            def to_dict(self):
                # saved under the real class name: the directory reads like any Qwen2.5-VL checkpoint
                return {**super().to_dict(), "processor_class": "Qwen2_5_VLProcessor"}

        _QWEN_PROCESSOR = QwenImageOnlyProcessor
    return _QWEN_PROCESSOR


def load_family_processor(path, family: Family):
    """The processor of a saved model directory (local files only)."""
    from transformers import AutoProcessor
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception:   # Qwen without torchvision or a saved video processor: OSError, ImportError, TypeError...
        if family.name != "qwen2_5_vl":
            raise
        processor = None
    if processor is None or (family.name == "qwen2_5_vl" and not _is_processor_of(processor, family)):
        processor = qwen_image_processor_class().from_pretrained(str(path), local_files_only=True)
    if not _is_processor_of(processor, family):   # AutoProcessor falls back to a bare tokenizer
        raise FamilyError(f"{path} holds a {type(processor).__name__}, not a {family.processor} "
                          f"(its processor_config.json is missing or names another class)")
    return processor


def _is_processor_of(processor, family: Family) -> bool:
    return family.processor in [c.__name__ for c in type(processor).__mro__]


# ---------------------------------------------------------------- prompts

CANONICAL = re.compile(r"USER: (?P<image><image>\n)?(?P<body>.*)\nASSISTANT:(?P<answer>.*)", re.S)
_SENTINEL = "\x00viker-body\x00"


def _chat_parts(processor, with_image: bool) -> tuple[str, str]:
    """(text before the body, text after it) of one user turn + generation prompt, in the model's template."""
    memo = processor.__dict__.setdefault("_viker_chat_parts", {})
    if with_image not in memo:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": _SENTINEL}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        if text.count(_SENTINEL) != 1:
            raise FamilyError(f"the chat template of {type(processor).__name__} does not keep a user text as written")
        memo[with_image] = tuple(text.split(_SENTINEL))
    return memo[with_image]


def render(processor, text: str) -> str:
    """A prompt (+ answer) in MLLMU-Bench's LLaVA form, as this processor's model is prompted."""
    family = family_of_processor(processor)
    if family.prompt == "mllmu":
        return text
    m = CANONICAL.fullmatch(text)
    if m is None:
        raise FamilyError(f"prompt is not in the USER: ... ASSISTANT: form prompts.py writes: {text[:60]!r}")
    head, tail = _chat_parts(processor, bool(m["image"]))
    answer = m["answer"] if family.answer_space else m["answer"].lstrip(" ")
    return head + m["body"] + tail + answer


# ---------------------------------------------------------------- images

QWEN_SIDE = 448   # 16 x 16 merged tokens (256) per image at patch 14, merge 2: Qwen2.5-VL's usual scale


def image_side(processor) -> int | None:
    """The square side every image is resized to first, or None where the processor fixes the size itself.

    Qwen: 448 px, moved inside the processor's [min_pixels, max_pixels] and onto
    its patch x merge grid (so the processor resizes nothing further).
    LLaVA-NeXT: its crop size (336 px for 1.6): one base view plus the tiles of
    the grid pinpoint the processor picks for a square, the same for every image.
    """
    family = family_of_processor(processor)
    if family.layout == "tiles":
        return processor.image_processor.crop_size["height"]
    if family.name != "qwen2_5_vl":
        return None
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    size = ip.size if isinstance(ip.size, dict) else dict(ip.size)
    low = math.ceil(math.sqrt(size["shortest_edge"]) / factor) * factor
    high = math.floor(math.sqrt(size["longest_edge"]) / factor) * factor
    return max(low, min(high, QWEN_SIDE // factor * factor))


def blank_image(processor):
    from PIL import Image
    side = image_side(processor) or 64
    return Image.new("RGB", (side, side))


def _processor_call(processor, text: str, image):
    if family_of_processor(processor).layout == "crops":   # as pixel_values: one global picture, no crops
        return processor(images=[[image]], text=[text], do_image_splitting=False)["input_ids"][0]
    return processor(images=[image], text=[text])["input_ids"][0]


def image_expansion(processor) -> str:
    """The text one image placeholder becomes in this processor's prompts (image tokens and their markers).

    Asked of the processor itself, once, on a blank picture of the size every
    image is brought to: whatever its config spells (patch size, class token,
    merge size, image markers), the ids are the processor's own.
    """
    cached = processor.__dict__.get("_viker_image_expansion")
    if cached is not None:
        return cached
    tok = processor.tokenizer
    token = processor.image_token
    token_id = tok.convert_tokens_to_ids(token)
    with_image = [int(t) for t in _processor_call(processor, token, blank_image(processor))]
    plain = tok(token, add_special_tokens=True)["input_ids"]
    if token_id not in plain or token_id not in with_image:
        raise FamilyError(f"the processor does not expand its image token {token!r}")
    before, after = plain.index(token_id), len(plain) - plain.index(token_id) - 1
    ids = with_image[before: len(with_image) - after]
    text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if tok(text, add_special_tokens=False)["input_ids"] != ids:
        raise FamilyError(f"the image expansion of {type(processor).__name__} does not tokenise back to itself")
    # The image's feature slots are the id the expansion repeats most: the placeholder itself for
    # LLaVA, Qwen and Idefics3, <image_soft_token> for Gemma 3 (whose placeholder is <start_of_image>).
    feature = max(set(ids), key=ids.count)
    processor.__dict__["_viker_image_expansion"] = text
    processor.__dict__["_viker_image_feature"] = (feature, ids.count(feature))
    return text


def image_token_count(processor) -> int:
    """How many feature tokens one image takes in the prompt."""
    image_expansion(processor)
    return processor.__dict__["_viker_image_feature"][1]


def image_token_id(processor) -> int:
    """The id of the tokens that the image's features replace (prefix reuse splits after the last one)."""
    image_expansion(processor)
    return processor.__dict__["_viker_image_feature"][0]


def pixel_values(processor, images) -> torch.Tensor:
    """Normalised [N, C, H, W] pixels of PIL images, as this family's processor makes them."""
    family = family_of_processor(processor)
    ip = processor.image_processor
    if family.layout == "image":
        return ip(images=images, return_tensors="pt")["pixel_values"]
    if family.layout == "crops":   # one global image per picture: no crops, so a fixed token count
        out = ip(images=[[im] for im in images], do_image_splitting=False, return_tensors="pt")["pixel_values"]
        return out[:, 0]
    side = image_side(processor)
    resized = [im.resize((side, side), _bicubic()) if im.size != (side, side) else im for im in images]
    out = ip(images=resized, return_tensors="pt")
    if family.layout == "tiles":   # [N, P, C, H, W] -> [N, P*C, H, W]: the views stacked on channels
        return out["pixel_values"].flatten(1, 2)
    return unpatchify(out["pixel_values"], len(images), side, ip.patch_size, ip.merge_size, ip.temporal_patch_size)


def _bicubic():
    from PIL import Image
    return Image.Resampling.BICUBIC


def patchify(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """[N, C, H, W] -> Qwen2-VL's flat patches [N * H/p * W/p, C * T * p * p] (its processor's layout:
    merge-window order, the picture repeated over the T temporal slots)."""
    n, c, h, w = pixels.shape
    x = pixels.reshape(n, c, h // patch // merge, merge, patch, w // patch // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)                          # N, gh/m, gw/m, mh, mw, C, ph, pw
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)
    return x.reshape(n * (h // patch) * (w // patch), c * temporal * patch * patch)


def unpatchify(flat: torch.Tensor, n: int, side: int, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """patchify's inverse for n square pictures (the temporal copies are equal: the first is kept)."""
    g = side // patch // merge
    c = flat.shape[-1] // (temporal * patch * patch)
    x = flat.reshape(n, g, g, merge, merge, c, temporal, patch, patch)[:, :, :, :, :, :, 0]
    return x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(n, c, side, side).contiguous()


def vision_inputs(model, pixels: torch.Tensor) -> dict:
    """The forward's keyword arguments for [N, C, H, W] rows, one image per sequence in row order."""
    family = family_of_model(model)
    if family.layout == "image":
        return {"pixel_values": pixels}
    if family.layout == "crops":
        return {"pixel_values": pixels.unsqueeze(1)}
    vc = _base(model).config.vision_config
    if family.layout == "tiles":   # every picture was resized to the crop size: image_sizes = (H, W)
        n, views, h, w = pixels.shape
        return {"pixel_values": pixels.reshape(n, views // vc.num_channels, vc.num_channels, h, w),
                "image_sizes": torch.tensor([[h, w]] * n, device=pixels.device)}
    n, _, h, w = pixels.shape
    grid = torch.tensor([[1, h // vc.patch_size, w // vc.patch_size]] * n, device=pixels.device)
    return {"pixel_values": patchify(pixels, vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size),
            "image_grid_thw": grid}


def image_types(model, input_ids: torch.Tensor) -> dict:
    """Gemma 3's token_type_ids (1 on image tokens: they attend to each other both ways); {} elsewhere."""
    if not family_of_model(model).image_blocks:
        return {}
    return {"token_type_ids": (input_ids == _base(model).config.image_token_id).long()}


def generation_inputs(model, input_ids: torch.Tensor, pixels: torch.Tensor | None) -> dict:
    """vision_inputs plus what generate() needs to place Qwen's 3-D positions itself.

    transformers 5.24 finds the image tokens through mm_token_type_ids; 5.17
    (the GPU machine's) has no such argument and reads the token ids.
    """
    import inspect
    kwargs = vision_inputs(model, pixels) if pixels is not None else {}
    kwargs.update(image_types(model, input_ids))
    family = family_of_model(model)
    if family.mrope and pixels is not None:
        inner = _base(model).model
        if "mm_token_type_ids" in inspect.signature(inner.forward).parameters:
            kwargs["mm_token_type_ids"] = (input_ids == _base(model).config.image_token_id).long()
    return kwargs


# ---------------------------------------------------------------- positions

def rope_positions(model, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Qwen's M-RoPE position ids [3, B, L] of right-padded rows, or None for 1-D families.

    Text tokens count up by one in all three rows. An image of g x g merged
    tokens starting at position s takes (s, s + row, s + col), and the text
    after it resumes at s + g (Qwen2-VL's rule; the model's get_rope_index
    computes the same, tests/test_families.py).
    """
    family = family_of_model(model)
    if not family.mrope:
        return None
    import numpy as np
    image_id = _base(model).config.image_token_id
    ids = input_ids.cpu().numpy()
    B, L = ids.shape
    out = np.zeros((3, B, L), np.int64)
    for b in range(B):
        # runs of image / text tokens: [start, end) of each
        flags = ids[b] == image_id
        cuts = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
        pos = 0
        for i, j in zip(np.r_[0, cuts], np.r_[cuts, L]):
            if not flags[i]:
                out[:, b, i:j] = pos + np.arange(j - i)
                pos += j - i
                continue
            g = math.isqrt(j - i)
            if g * g != j - i:
                raise FamilyError(f"an image block of {j - i} tokens is not square; images must be resized "
                                  f"to one square side (families.image_side)")
            r = np.arange(j - i)
            out[0, b, i:j], out[1, b, i:j], out[2, b, i:j] = pos, pos + r // g, pos + r % g
            pos += g
    return torch.from_numpy(out).to(input_ids.device)


def next_position(model, prefix_ids: torch.Tensor) -> int:
    """The position of the first token after a prefix (its length for 1-D families)."""
    positions = rope_positions(model, prefix_ids)
    return prefix_ids.shape[1] if positions is None else int(positions.max()) + 1


# ---------------------------------------------------------------- LoRA

PROJECTIONS = "(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def lora_targets(model) -> str:
    """The decoder's attention and MLP projections, as a regex peft matches on full module names."""
    return rf".*\.{family_of_model(model).decoder}\..*\.{PROJECTIONS}"
