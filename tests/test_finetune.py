"""Knowledge injection: the schedule, the teacher-forced check and the stop on convergence."""
import dataclasses
import math

import pytest
import torch

from pipeline.config import FinetuneConfig
from pipeline.stage2 import finetune as ft
from pipeline.data.mllmu import read_split
from pipeline.models.forward import make_text_batch
from tests.tiny import make_world, tiny_config

TINY = tiny_config()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory, TINY, n_fictitious=10, pool_size=2)


def test_warmup_cosine_by_hand():
    assert ft.warmup_cosine(0, 4, 104) == 0.25 and ft.warmup_cosine(3, 4, 104) == 1.0
    assert ft.warmup_cosine(4, 4, 104) == 1.0
    assert math.isclose(ft.warmup_cosine(54, 4, 104), 0.5)      # half-way through the cosine
    assert ft.warmup_cosine(104, 4, 104) == 0.0 and ft.warmup_cosine(500, 4, 104) == 0.0


def test_fraction_known_counts_whole_answers(monkeypatch):
    """Known = every real answer token is the argmax; padding never counts against a row."""
    batch = make_text_batch([[1, 2, 3, 4], [1, 2, 5, 6, 7], [1, 2, 8]], [2, 2, 2], pad_id=0)
    # answers: [3, 4], [5, 6, 7], [8]; the model gets row 0 right, row 1 wrong at its last token, row 2 right
    guess = torch.tensor([[3, 4, 0], [5, 6, 9], [8, 0, 0]])

    def fake_logits(model, b, pixels):
        return torch.nn.functional.one_hot(guess, 10).float()

    monkeypatch.setattr(ft, "answer_logits", fake_logits)
    model = torch.nn.Linear(1, 1)
    assert ft.fraction_known(model, [(batch, torch.zeros(3, 1))]) == 2 / 3
    assert model.training                          # put back in the mode it was in


def test_known_answer_is_what_greedy_decoding_writes(world):
    """The check's claim: a teacher-forced known answer is reproduced by greedy generation."""
    from pipeline.models.generation import generate
    from pipeline.models.modeling import load_model
    from pipeline.models.prompts import fact_prompt
    root, model_dir = world
    model, processor = load_model(model_dir)
    profiles = read_split(root, "ft_Data")[:2]
    bank, examples = ft.build_examples(processor, profiles, None)
    pixels = ft.pixel_values(processor, bank)
    # Teach one answer by heart (a few hundred steps of plain SGD on it alone), then check both ways.
    target = examples[0]
    ids = torch.tensor([target.ids])
    labels = ids.clone()
    labels[0, :target.answer_start] = -100
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    from pipeline.models.forward import forward_inputs
    for _ in range(60):
        out = model(**forward_inputs(model, ids, torch.ones_like(ids), pixels[target.images[:1]]), labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    checks = ft.check_batches(processor, pixels, examples[:1], 0, 0)
    assert ft.fraction_known(model, checks) == 1.0
    qa = profiles[0].qa[0]
    answer = generate(model, processor, [bank[target.images[0]]], [fact_prompt(qa.question)], max_new_tokens=24)[0]
    assert answer.strip().startswith(qa.answer.strip())


def test_finetune_stops_once_the_checked_answers_are_known(world, tmp_path, monkeypatch):
    root, model_dir = world
    profiles = read_split(root, "ft_Data")[:2]
    logged = []
    recipe = FinetuneConfig(base=str(model_dir), steps=8, batch_size=4, lr=1e-3, warmup_steps=1, check_every=2,
                            check_size=5)

    def run(name, **changes):
        settings = dataclasses.replace(recipe, output=str(tmp_path / name), **changes)
        return ft.finetune(settings, profiles, device="cpu", log=logged.append)
    real = ft.fraction_known
    shares = iter([0.2, 0.97])                     # a third call would raise StopIteration
    monkeypatch.setattr(ft, "fraction_known", lambda model, checks: next(shares))
    info = run("a", stop_known=0.95)
    assert info["steps"] == 4 and info["max_steps"] == 8 and info["known_checks"] == [(2, 0.2), (4, 0.97)]
    assert info["final_known"] == 0.97
    assert "97.0% of 5 checked answers known" in info["stopped"] and "stopped after 4 of at most 8 steps" in logged[-1]
    monkeypatch.setattr(ft, "fraction_known", real)
    recipe = dataclasses.replace(recipe, steps=6)
    # An unreachable share: the whole budget runs, and the log says so.
    info = run("b", stop_known=1.0)
    assert info["steps"] == 6 and "budget of 6 steps used up" in info["stopped"]
    assert [s for s, _ in info["known_checks"]] == [2, 4, 6]   # and one last look when the budget ran out
    # stop_known 0: no check at all.
    info = run("c", stop_known=0)
    assert info["steps"] == 6 and info["known_checks"] == [] and info["final_known"] is None


def test_a_hand_built_section_is_range_checked_like_a_loaded_one(tmp_path):
    from pipeline.schema import ConfigError
    with pytest.raises(ConfigError, match="config key 'finetune.batch_size' must be >= 1, got 0"):
        ft.finetune(FinetuneConfig(base=str(tmp_path / "none"), output=str(tmp_path / "out"), batch_size=0), [])
    assert not (tmp_path / "out").exists()


def test_gate_error_says_how_injection_ended():
    from pipeline.jobs.demo import GateError, check_gate
    results = {"forget": {"acc": 0.97}, "retain": {"acc": 0.65}}
    check_gate({"forget": {"acc": 0.9}, "retain": {"acc": 0.95}}, 0.9)       # at the bar: passes
    ran = {"steps": 1400, "max_steps": 1400, "stopped": "budget of 1400 steps used up"}
    with pytest.raises(GateError, match=r"retain 65\.0% < 90%; knowledge injection ran 1400 of at most 1400 steps "
                                        r"\(budget of 1400 steps used up\)\): raise finetune\.steps"):
        check_gate(results, 0.9, ran)
    with pytest.raises(GateError, match=r"retain 65\.0% < 90%\): raise finetune\.steps"):
        check_gate(results, 0.9, {"steps": 10})                  # a model saved before this release
