import pytest
import torch

from pipeline.data.mllmu import read_split
from pipeline.models.encoding import InputError, encode_pair, load_image, pixel_values
from pipeline.config import FinetuneConfig
from pipeline.stage2.finetune import finetune
from pipeline.models.modeling import ModelError, load_model, wrap_lora
from pipeline.models.prompts import train_text
from tests.tiny import make_world, tiny_config

TINY = tiny_config()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory, TINY, n_fictitious=10, pool_size=2)


def test_saved_model_reloads_through_auto_classes(world):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    root, model_dir = world
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True)
    p = read_split(root, "forget_10")[0]
    prompt, answer = train_text(p.qa[0].question, p.qa[0].answer)
    enc = processor(images=[load_image(p.image)], text=[prompt + answer], return_tensors="pt")
    ids, start = encode_pair(processor, prompt, answer)
    assert enc["input_ids"][0].tolist() == ids, "our image-token expansion must match the processor's"
    assert (enc["input_ids"] == model.config.image_token_index).sum() == (TINY.image_size // TINY.patch_size) ** 2
    assert processor.tokenizer.decode(ids[start:]).strip() == p.qa[0].answer
    out = model(**enc)
    assert out.logits.shape[-1] == len(processor.tokenizer)


def test_a_processor_is_read_once_per_process_until_its_files_change(world, tmp_path):
    import shutil
    from pipeline.models.modeling import load_processor
    _, model_dir = world
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    first = load_processor(copy)
    assert load_processor(copy) is first and load_model(copy, device="cpu")[1] is first
    config = copy / "tokenizer_config.json"
    meta = __import__("json").loads(config.read_text())
    meta["model_max_length"] = 77
    config.write_text(__import__("json").dumps(meta))      # an edited tokenizer is read again
    again = load_processor(copy)
    assert again is not first and again.tokenizer.model_max_length == 77


def test_missing_model_directory_is_one_line(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_unreadable_image_is_one_line():
    with pytest.raises(InputError, match="sample 3: not a readable image"):
        load_image(b"\x89PNG garbage", "sample 3")


def test_empty_and_too_long_answers_are_refused(world):
    _, model_dir = world
    _, processor = load_model(model_dir)
    with pytest.raises(InputError, match="empty answer"):
        encode_pair(processor, "USER: <image>\nq\nASSISTANT:", "  ")
    with pytest.raises(InputError, match="exceeds the model's limit of 40"):
        encode_pair(processor, "USER: <image>\nq\nASSISTANT:", " word" * 50, max_length=40)


def test_lora_targets_only_the_language_model(world):
    _, model_dir = world
    model, _ = load_model(model_dir)
    peft_model = wrap_lora(model, r=4, alpha=8)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("language_model" in n and "lora_" in n for n in names)
    with pytest.raises(ModelError, match="matched no module"):
        wrap_lora(load_model(model_dir)[0], targets=r".*nothing_here")
    with pytest.raises(ModelError, match="vision side .vision_tower"):
        wrap_lora(load_model(model_dir)[0], targets=r".*(q_proj|v_proj)")


def test_one_finetuning_step_moves_the_weights(world, tmp_path):
    root, model_dir = world
    before = load_model(model_dir)[0].state_dict()
    profiles = read_split(root, "ft_Data")[:3]
    recipe = FinetuneConfig(base=str(model_dir), output=str(tmp_path / "vanilla"), steps=1, batch_size=4, lr=1e-2,
                            warmup_steps=1, stop_known=0.0)
    info = finetune(recipe, profiles, device="cpu")
    after = load_model(tmp_path / "vanilla")[0].state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.language_model.embed_tokens.weight" in moved and len(moved) > len(before) // 2
    assert (tmp_path / "vanilla" / "vanilla.json").is_file() and info["n_examples"] == 3 * len(profiles[0].qa)


def test_pixel_values_have_model_shape(world):
    root, model_dir = world
    _, processor = load_model(model_dir)
    p = read_split(root, "forget_10")[0]
    assert pixel_values(processor, [load_image(p.image)]).shape == (1, 3, TINY.image_size, TINY.image_size)


def test_set_threads_honours_viker_threads_then_omp(monkeypatch):
    import torch
    from pipeline.models.modeling import ModelError, set_threads
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setenv("VIKER_THREADS", "1")
        assert set_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("VIKER_THREADS")
        assert set_threads() == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("VIKER_THREADS", "zero")
        with pytest.raises(ModelError, match="VIKER_THREADS"):
            set_threads()
    finally:
        torch.set_num_threads(before)
