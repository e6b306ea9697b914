"""Every supported family end to end on its tiny build, and the family-specific pieces against the library's own.

Per family: the ids viker makes equal the processor's; pixels turn into the
processor's own pixel_values; stage one's prefix path equals its naive path;
2 ViKeR steps, evaluation of one profile and plain-peft loading of the adapter
run through the CLI.
"""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.models import families, prompts
from pipeline.stage1 import precompute as pc
from pipeline.cli import main
from pipeline.config import PrecomputeConfig
from pipeline.data.mllmu import read_split
from pipeline.data.records import forget_samples
from pipeline.models.encoding import encode_pair, pixel_values
from pipeline.models.forward import answer_logits, make_text_batch
from pipeline.models.modeling import load_model, wrap_lora
from tests.tiny import assert_caches_agree, make_world, tiny_config

TINY = tiny_config(text_layers=2)
FAMILIES = ["llava", "llava_next", "qwen2_5_vl", "idefics3", "gemma3"]


@pytest.fixture(scope="module", params=FAMILIES)
def world(request, tmp_path_factory):
    torch.set_num_threads(1)
    root, model_dir = make_world(tmp_path_factory, TINY, family=request.param, n_fictitious=12, pool_size=4)
    return request.param, root, model_dir


def _picture(seed: int, size=(37, 53)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _processor_inputs(processor, text, image):
    family = families.family_of_processor(processor)
    side = families.image_side(processor)
    if side:
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    if family.layout == "crops":
        return processor(text=[text], images=[[image]], do_image_splitting=False, return_tensors="pt")
    return processor(text=[text], images=[image], return_tensors="pt")


def test_ids_and_pixels_equal_the_processors_own(world):
    family, _, model_dir = world
    model, processor = load_model(model_dir, device="cpu")
    assert families.family_of_model(model).name == family == families.family_of_processor(processor).name
    prompt, answer = prompts.train_text("Where was this person born?", "Lyon")
    ids, start = encode_pair(processor, prompt, answer)
    # Made again from the per-processor memo: the same ids, in a list of its own. Every family's processor
    # encodes this same text: a memo shared across processors would hand a later family the wrong ids.
    again, _ = encode_pair(processor, prompt, answer)
    assert again == ids and again is not ids
    image = _picture(0)
    ref = _processor_inputs(processor, families.render(processor, prompt + answer), image)
    assert ref["input_ids"][0].tolist() == ids
    assert (torch.tensor(ids) == families.image_token_id(processor)).sum() == families.image_token_count(processor)
    rows = pixel_values(processor, [image])
    assert rows.ndim == 4 and rows.shape[0] == 1
    made = families.vision_inputs(model, rows)
    assert torch.equal(made["pixel_values"], ref["pixel_values"])
    if "image_grid_thw" in ref:
        assert torch.equal(made["image_grid_thw"], ref["image_grid_thw"])
    # one forward through viker's path = the library's own forward on the processor's inputs
    batch = make_text_batch([ids], [start], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = answer_logits(model, batch, rows)[0]
        theirs = model(**ref).logits[0, start - 1: len(ids) - 1]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_saved_processor_loads_back_as_its_family(world, tmp_path):
    family, _, model_dir = world
    _, processor = load_model(model_dir, device="cpu")
    processor.save_pretrained(tmp_path)        # what fine-tuning and merging do
    meta = json.loads((tmp_path / "processor_config.json").read_text())
    assert meta["processor_class"] == families.FAMILIES[family].processor
    from pipeline.models.modeling import load_processor
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    assert families.family_of_processor(load_processor(tmp_path)).name == family


def test_prompts_render_through_the_chat_template(world):
    family, _, model_dir = world
    _, processor = load_model(model_dir, device="cpu", with_processor=True)
    text = prompts.train_prompt("Who is this?") + " Ada"
    rendered = families.render(processor, text)
    if family == "llava":
        assert rendered == text                                   # MLLMU-Bench's own prompt, as written
        return
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this?"}]}]
    head = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == head + (" Ada" if families.FAMILIES[family].answer_space else "Ada")
    text_only = families.render(processor, "USER: Who is Ada?\nASSISTANT:")
    assert processor.image_token not in text_only and "Who is Ada?" in text_only


def test_qwen_positions_equal_the_models_rope_index(tmp_path_factory):
    _, model_dir = make_world(tmp_path_factory, TINY, family="qwen2_5_vl", n_fictitious=4, pool_size=2)
    model, processor = load_model(model_dir, device="cpu")
    import inspect
    if "mm_token_type_ids" not in inspect.signature(model.model.get_rope_index).parameters:
        pytest.skip("this transformers' get_rope_index predates mm_token_type_ids")
    a, _ = encode_pair(processor, *prompts.train_text("Where was this person born?", "Lyon"))
    b, _ = encode_pair(processor, *prompts.train_text("What is this person's job?", "a baker of bread"))
    pad = processor.tokenizer.pad_token_id
    ids = torch.full((2, max(len(a), len(b))), pad)
    ids[0, :len(a)], ids[1, :len(b)] = torch.tensor(a), torch.tensor(b)
    mask = (torch.arange(ids.shape[1]) < torch.tensor([[len(a)], [len(b)]])).long()
    grid = families.vision_inputs(model, pixel_values(processor, [_picture(1), _picture(2)]))["image_grid_thw"]
    theirs, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == model.config.image_token_id).long(),
                                           image_grid_thw=grid, attention_mask=mask)
    ours = families.rope_positions(model, ids)
    real = mask.bool()
    for row in range(2):   # the library leaves padding at position 1; real tokens must agree
        assert torch.equal(ours[:, row, real[row]], theirs[:, row, real[row]])
    assert families.next_position(model, torch.tensor([a[:a.index(model.config.image_token_id) + 16]])) < len(a)


def test_prefix_path_equals_naive_path_in_float32(world, tmp_path):
    family, root, model_dir = world
    samples = forget_samples(read_split(root, "forget_10"))[:5]
    section = PrecomputeConfig(k=2, top_k=8, seed=0, shard_size=3, batch_size=4)
    args = dict(pool_dir=str(root / "pools" / "people"), device="cpu", log=lambda *_: None)
    pc.precompute(str(model_dir), samples, replace(section, output=str(tmp_path / "prefix"), prefix_cache=True),
                  **args)
    pc.precompute(str(model_dir), samples, replace(section, output=str(tmp_path / "naive"), prefix_cache=False),
                  **args)
    assert_caches_agree(tmp_path / "prefix", tmp_path / "naive")
    manifest = json.loads((tmp_path / "prefix" / "manifest.json").read_text())
    template = manifest["sources"]["prompt_template"]
    if family != "llava":   # the manifest says how this model was prompted, for readers without viker
        from pipeline.models.modeling import load_processor
        processor = load_processor(model_dir)
        assert template["family"] == family
        assert template["image_expansion"] == families.image_expansion(processor)
        assert template["image_side"] == families.image_side(processor)
        assert template["prompt"] == families.render(processor, prompts.train_prompt("{question}"))


def _cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_lora_wraps_the_language_model_only(world):
    """What the CLI run below checks of the saved adapter, on every family without training."""
    family, _, model_dir = world
    model, _ = load_model(model_dir, device="cpu")
    wrapped = wrap_lora(model, r=2, alpha=4, dropout=0.0)
    lora = [n for n, _ in wrapped.named_parameters() if "lora_" in n]
    vision = families.FAMILIES[family].vision
    assert lora and not any(f".{part}." in n for n in lora for part in vision)


# The CLI end to end on LLaVA and on Qwen2.5-VL (its own positions, its own pixel layout); the other
# families' pieces are checked above, their CLI runs are slow.
@pytest.mark.parametrize("world", ["llava", "qwen2_5_vl"] + [pytest.param(f, marks=pytest.mark.slow) for f in
                                                            ("llava_next", "idefics3", "gemma3")], indirect=True)
def test_viker_steps_evaluation_and_plain_peft_adapter(world, tmp_path):
    family, root, model_dir = world
    cache, run_dir, results = tmp_path / "refs", tmp_path / "run", tmp_path / "results.jsonl"
    common = [f"data.root={root}", f"model.path={model_dir}", f"precompute.output={cache}", "precompute.k=2",
              "precompute.top_k=8", "precompute.shard_size=4", "model.device=cpu", f"model.family={family}",
              f"train.output={run_dir}", f"evaluate.results={results}", "evaluate.max_new_tokens=4",
              "evaluate.max_profiles=1", "evaluate.few_shot=0"]
    result = _cli("precompute", *common)
    assert result.exit_code == 0, result.output
    result = _cli("train", *common, "train.method=viker", "train.steps=2", "train.lr=1e-2", "train.lora_r=2")
    assert result.exit_code == 0, result.output
    assert "viker: 2 steps" in result.output
    result = _cli("evaluate", *common, "--adapter", str(run_dir / "adapter"))
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["method"] == "ViKeR" and row["budget"] == 2

    # plain peft on the plain HF model gives the logits viker's wrapped model gives
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    base = AutoModelForImageTextToText.from_pretrained(str(model_dir), local_files_only=True).eval()
    plain = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    vision = families.FAMILIES[family].vision
    lora = [n for n, _ in plain.named_parameters() if "lora_" in n]
    assert lora and not any(f".{part}." in n for n in lora for part in vision)
    assert any(float(p.abs().sum()) > 0 for n, p in plain.named_parameters() if "lora_B" in n)
    model, processor = load_model(model_dir, device="cpu")
    ids, start = encode_pair(processor, *prompts.train_text("Where was this person born?", "Lyon"))
    batch = make_text_batch([ids], [start], processor.tokenizer.pad_token_id)
    rows = pixel_values(processor, [_picture(3)])
    with torch.no_grad():
        got = answer_logits(plain, batch, rows)
        vanilla = answer_logits(model, batch, rows)
    assert not torch.allclose(got, vanilla)            # the adapter changed the model...
    wrapped = wrap_lora(model, r=2, alpha=config["lora_alpha"], dropout=0.0)
    wrapped.load_adapter(str(run_dir / "adapter"), adapter_name="trained")
    wrapped.set_adapter("trained")
    with torch.no_grad():
        torch.testing.assert_close(answer_logits(wrapped.eval(), batch, rows), got, atol=1e-5, rtol=1e-5)


def test_unknown_family_and_family_mismatch_are_one_line(world, tmp_path):
    family, root, model_dir = world
    result = CliRunner().invoke(main, ["precompute", f"model.path={model_dir}", "model.family=gpt2"])
    assert result.exit_code == 1 and "model.family" in result.output and "gpt2" in result.output
    other = "idefics3" if family != "idefics3" else "llava"
    result = CliRunner().invoke(main, ["precompute", f"data.root={root}", f"model.path={model_dir}",
                                       f"model.family={other}", f"precompute.output={tmp_path / 'x'}"])
    assert result.exit_code == 1
    assert f"model.family is {other} but the model at {model_dir} is {family}" in result.output
    config = json.loads((model_dir / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(Exception, match="model type 'gpt2'.* not supported"):
        load_model(bad, device="cpu")
