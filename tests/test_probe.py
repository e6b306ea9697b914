"""The probing attack: the pictures' perturbations (exact, seeded), the paraphrases' facts, the items each probe
asks, the recovery arithmetic, a planted model that answers only mirrored pictures, and `viker attack probe`."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image, ImageOps

from pipeline.config import DataConfig, ModelConfig, ProbeConfig
from pipeline.evaluation import probe as pb
from tests.tiny import make_world

# ------------------------------------------------------------------ pictures


def _picture(seed: int = 0, side: int = 24) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def test_the_center_crop_drops_the_border_and_keeps_the_size():
    framed = np.zeros((10, 10, 3), dtype=np.uint8)
    framed[:, :] = (255, 0, 0)                    # a one-pixel red frame around a blue inside
    framed[1:9, 1:9] = (0, 0, 255)
    out = pb.center_crop(Image.fromarray(framed), 0.8)   # keeps the central 8 x 8: the blue inside only
    assert out.size == (10, 10) and (np.asarray(out) == (0, 0, 255)).all()
    odd = pb.center_crop(_picture(side=25), 0.8)        # 20 of 25 pixels: (2, 2) .. (22, 22)
    expected = _picture(side=25).crop((2, 2, 22, 22)).resize((25, 25), Image.Resampling.BICUBIC)
    assert odd.size == (25, 25) and np.array_equal(np.asarray(odd), np.asarray(expected))
    for keep in (0, 1.5):
        with pytest.raises(ValueError, match="probe.crop"):
            pb.center_crop(_picture(), keep)


def test_the_flip_mirrors_left_to_right_exactly():
    picture = _picture(1)
    flipped = pb.perturb(picture, "flip", ProbeConfig())
    assert np.array_equal(np.asarray(flipped), np.asarray(picture)[:, ::-1])
    assert np.array_equal(np.asarray(pb.perturb(flipped, "flip", ProbeConfig())), np.asarray(picture))
    assert pb.perturb(picture, "paraphrase", ProbeConfig()) is picture


def test_the_noise_has_the_declared_sigma_and_is_the_same_for_the_same_picture_and_seed():
    gray = Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))    # mid-gray: no value clipped at 0.1
    noisy = pb.gaussian_noise(gray, 0.1, seed=0)
    delta = (np.asarray(noisy, dtype=np.float64) - 128) / 255
    assert abs(delta.mean()) < 0.01 and delta.std() == pytest.approx(0.1, rel=0.05)
    assert np.array_equal(np.asarray(pb.gaussian_noise(gray, 0.1, seed=0)), np.asarray(noisy)), "deterministic"
    assert not np.array_equal(np.asarray(pb.gaussian_noise(gray, 0.1, seed=1)), np.asarray(noisy)), "seeded"
    other = Image.fromarray(np.full((64, 64, 3), 127, dtype=np.uint8))
    other_delta = np.asarray(pb.gaussian_noise(other, 0.1, seed=0), dtype=np.float64) - 127
    assert not np.allclose(other_delta, delta * 255), "another picture, other noise"
    assert np.asarray(pb.gaussian_noise(_picture(), 5.0, seed=0)).max() <= 255, "clipped to 8 bits"
    with pytest.raises(ValueError, match="noise_sigma"):
        pb.gaussian_noise(gray, 0.0, seed=0)


def test_a_paraphrases_fact_is_the_one_its_answer_gives_and_its_question_does_not():
    facts = ["Orla Venn", "Malmo", "baker", "1960", "Malmo"]
    assert pb.paraphrase_fact("In which city was Orla Venn born?", "Orla Venn was born in Malmo.", facts) == "Malmo"
    assert pb.paraphrase_fact("What is this person called?", "This person is named Orla Venn.", facts) == "Orla Venn"
    assert pb.paraphrase_fact("Who is this?", "Orla Venn, a baker.", facts) is None, "two facts: ambiguous"
    assert pb.paraphrase_fact("Who is this?", "Someone else.", facts) is None
    assert pb.paraphrase_fact("WHERE?", "born in MALMO", facts) == "Malmo", "case-insensitive"


# ------------------------------------------------------------------ the items

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny benchmark (forget_15: 2 people, 2 held-out portraits each) and three different tiny models."""
    from pipeline.models.modeling import load_model
    torch.set_num_threads(1)
    root, model_dir = make_world(tmp_path_factory, n_fictitious=10, pool_size=1, train_images=1, test_images=2,
                                 n_holdout=0)
    tmp = tmp_path_factory.mktemp("probe")
    dirs = {}
    for name, scale in (("vanilla", 1.0), ("gold", 0.5), ("unlearned", 0.25)):
        dirs[name] = tmp / name
        shutil.copytree(model_dir, dirs[name])
        if scale != 1.0:                 # another model, told apart by its LM head (fingerprint below)
            model, _ = load_model(dirs[name], dtype="float32", device="cpu")
            with torch.no_grad():
                model.lm_head.weight.mul_(scale)
            model.save_pretrained(dirs[name])
    return root, dirs


def test_each_probe_asks_what_it_declares(world):
    from pipeline.evaluation.quantize import fact_sets
    from pipeline.models.encoding import load_image
    root, _ = world
    sets = fact_sets(DataConfig(root=str(root), forget_split="forget_15"), ["forget", "test"])
    forget, test = sets["forget"][0], sets["test"][0]
    assert len(forget) == 2 and {p.id for p in test} == {p.id for p in forget}
    settings = ProbeConfig()
    items = {p: pb.probe_items(p, forget, test, settings) for p in pb.probes_of(settings)}
    questions = [qa.question for p in forget for qa in p.qa]
    facts = [qa.fact for p in forget for qa in p.qa]
    for probe in ("none", "crop", "noise", "flip"):
        these, skipped = items[probe]
        assert [i[1] for i in these] == questions and [i[2] for i in these] == facts and skipped == 0
    own = [load_image(p.image) for p in forget]
    assert np.array_equal(np.asarray(items["none"][0][0][0]), np.asarray(own[0]))
    assert np.array_equal(np.asarray(items["flip"][0][6][0]), np.asarray(ImageOps.mirror(own[1])))
    assert np.array_equal(np.asarray(items["crop"][0][0][0]), np.asarray(pb.center_crop(own[0], 0.8)))
    assert np.array_equal(np.asarray(items["noise"][0][0][0]), np.asarray(pb.gaussian_noise(own[0], 0.1, 0)))
    held, skipped = items["held_out"]
    assert len(held) == 2 * 2 * 6 and skipped == 0, "every training question on each of 2 held-out portraits"
    portraits = {np.asarray(load_image(b)).tobytes() for p in test for b in p.images}
    assert {np.asarray(i[0]).tobytes() for i in held} == portraits
    assert not portraits & {np.asarray(o).tobytes() for o in own}, "held-out portraits, not the forget picture"
    para, skipped = items["paraphrase"]
    assert len(para) == 12 and skipped == 0
    assert not {i[1] for i in para} & set(questions), "reworded questions"
    gts = [g.ground_truth for p in test for g in p.generation]
    assert all(fact in gt and fact not in q for (_, q, fact, _), gt in zip(para, gts))
    assert [i[2] for i in para] == facts, "the mini benchmark words its paraphrases in the training QA's order"
    nobody, skipped = pb.probe_items("held_out", forget, [], settings)
    assert nobody == [] and skipped == 12, "a forget person without Test pictures: counted, not asked"


def test_recovery_is_per_probe_over_the_vanilla_model_and_the_summary_is_the_mean():
    attacked = {"none": 0.2, "held_out": 0.5, "crop": 0.3, "flip": 0.0, "paraphrase": 0.4}
    vanilla = {"none": 0.8, "held_out": 0.625, "crop": 0.6, "flip": 0.0, "paraphrase": 0.8}
    gold = {"none": 0.1, "held_out": 0.125, "crop": 0.0, "flip": 0.0, "paraphrase": 0.2}
    rows, s = pb.with_recovery(attacked, vanilla, gold)
    assert rows["held_out"] == pytest.approx({"acc": 0.5, "vanilla_acc": 0.625, "recovery": 0.8, "change": 0.3,
                                              "gold_acc": 0.125, "gold_recovery": 0.2})
    assert math.isnan(rows["flip"]["recovery"]) and rows["none"]["change"] == 0
    assert s["probes_in_mean"] == ["held_out", "crop", "paraphrase"] and s["probes_left_out"] == ["flip"]
    assert s["mean_recovery"] == pytest.approx((0.8 + 0.5 + 0.5) / 3), "the mean, not the best probe (0.8)"
    assert s["mean_gold_recovery"] == pytest.approx((0.2 + 0.0 + 0.25) / 3)
    assert s["mean_acc"] == pytest.approx(0.4) and s["mean_vanilla_acc"] == pytest.approx(2.025 / 3)
    for r in rows.values():
        r.update(n=6, n_skipped=0)
    rows["paraphrase"]["n_skipped"] = 2
    from pipeline.evaluation.quantize import finite
    shown = pb.format_attack(finite({"crop": 0.8, "noise_sigma": 0.1, "seed": 0, "by_probe": rows, "summary": s}),
                             "GA").splitlines()
    assert shown[0].startswith("GA: probing attack")
    assert shown[2].split() == ["none", "6", "20.0%", "-", "80.0%", "25.0%", "10.0%", "12.5%"]
    assert shown[4].split()[:4] == ["crop", "6", "30.0%", "+10.0"]
    assert shown[6].split()[:4] == ["paraphrase", "6", "(+2", "skipped)"]
    assert "mean recovery over 3 probes (declared summary, not the best probe): 60.0%" in shown[-1]
    assert "left out (recovery undefined): flip" in shown[-1]


# ------------------------------------------------------------------ a planted model, end to end

def _fingerprint(model) -> float:
    return round(float(model.lm_head.weight.detach().double().abs().sum()), 3)


def test_a_model_that_answers_only_mirrored_pictures_is_caught_by_the_flip_probe(world, monkeypatch, tmp_path):
    """Generation replaced by a lookup: the vanilla model answers every item, the gold model none, the unlearned
    model only the mirrored forget pictures. Every number must come from the right model and probe."""
    import pipeline.evaluation.factcheck as factcheck
    from pipeline.evaluation.quantize import fact_sets
    from pipeline.models.encoding import load_image
    from pipeline.models.modeling import load_model
    root, shared = world
    dirs = {name: shutil.copytree(folder, tmp_path / name) for name, folder in shared.items()}   # own memo files
    data = DataConfig(root=str(root), forget_split="forget_15")
    forget = fact_sets(data, ["forget"])["forget"][0]
    mirrored = {np.asarray(ImageOps.mirror(load_image(p.image))).tobytes() for p in forget}
    everything = " ".join(qa.fact for p in forget for qa in p.qa)      # contains every fact asked
    kind = {_fingerprint(load_model(dirs[n], dtype="float32", device="cpu")[0]): n for n in dirs}

    def planted(model, processor, images, prompts, **_):
        who = kind[_fingerprint(model)]
        knows = [who == "vanilla" or (who == "unlearned" and np.asarray(i).tobytes() in mirrored) for i in images]
        assert len(prompts) == len(images) and all(p.endswith("ASSISTANT:") for p in prompts)
        return [everything if k else "I do not know." for k in knows]
    monkeypatch.setattr(factcheck, "generate", planted)
    result = pb.attack(ModelConfig(path=str(dirs["unlearned"]), dtype="float32", device="cpu"), data, ProbeConfig(),
                       reference=str(dirs["vanilla"]), gold=str(dirs["gold"]))
    rows = result["by_probe"]
    assert result["probes"] == ["none", "held_out", "crop", "noise", "flip", "paraphrase"]
    assert rows["flip"] == pytest.approx({"acc": 1.0, "vanilla_acc": 1.0, "recovery": 1.0, "change": 1.0,
                                          "gold_acc": 0.0, "gold_recovery": 0.0, "n": 12, "n_skipped": 0})
    for probe in ("none", "held_out", "crop", "noise", "paraphrase"):
        assert (rows[probe]["acc"], rows[probe]["vanilla_acc"], rows[probe]["recovery"]) == (0.0, 1.0, 0.0), probe
    assert rows["held_out"]["n"] == 24 and rows["paraphrase"]["n"] == 12
    assert result["summary"]["mean_recovery"] == pytest.approx(1 / 5), "the mean over 5 probes, not the flip's 1.0"
    memo = json.loads((dirs["vanilla"] / "probe-reference.json").read_text())
    assert len(memo) == 6 and any("noise0.1|seed0" in k for k in memo) and any("|held_out|Test_Set|" in k for k in memo)


def test_the_cli_explains_itself_prints_the_table_and_appends_the_row(world, tmp_path):
    from pipeline.cli import main
    root, dirs = world
    shown = CliRunner().invoke(main, ["attack", "probe", "--help"])
    text = " ".join(shown.output.split())
    assert shown.exit_code == 0 and "mean recovery over the probes (not the best one)" in text
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(root), "forget_split": "forget_15"},
                                      "model": {"path": str(dirs["unlearned"]), "device": "cpu"}}))
    results = tmp_path / "probe.jsonl"
    out = CliRunner().invoke(main, ["attack", "probe", "--config", str(config), "--reference", str(dirs["vanilla"]),
                                    "probe.probes=flip,paraphrase", "probe.seed=3", f"probe.results={results}"])
    assert out.exit_code == 0, out.output
    assert "unlearned: probing attack, fact accuracy on the forget people asked other ways" in out.output
    firsts = [line.split()[0] for line in out.output.splitlines()[2:] if line.startswith("  ")]
    assert firsts[:4] == ["probe", "none", "flip", "paraphrase"] and "mean recovery over" in out.output
    row = json.loads(results.read_text())
    assert row["probe"]["probes"] == ["none", "flip", "paraphrase"] and row["probe"]["seed"] == 3
    assert row["reference"] == str(dirs["vanilla"]) and row["config"]["probe"]["probes"] == ["flip", "paraphrase"]
    bad = CliRunner().invoke(main, ["attack", "probe", "--config", str(config), "--reference", "x",
                                    "probe.probes=blur"])
    assert bad.exit_code == 1 and "probe.probes" in bad.output.splitlines()[-1]
