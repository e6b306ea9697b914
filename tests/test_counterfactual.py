"""Textual counterfactuals (precompute.names swap): a question that names the person is asked about strangers."""
import json

import pytest

from pipeline.cache.refcache import RefCacheReader
from pipeline.config import ConfigError, PrecomputeConfig, load_config
from pipeline.data.loaders import read_profiles
from pipeline.data.mini import HOLDOUT_SPLIT, make_mini
from pipeline.data.mllmu import read_split
from pipeline.data.records import Sample, forget_samples
from pipeline.jobs import prebuilt
from pipeline.jobs.runs import stranger_names
from pipeline.models.modeling import load_processor
from pipeline.stage1 import counterfactual as cf
from pipeline.stage1 import precompute as pc
from pipeline.stage2.inputs import cache_setting_differences


def _sample(pid, j, question, answer, fact=""):
    return Sample(f"{pid}/{j}", pid, b"", question, answer, fact)


def test_names_pool_draw_and_shared_suffix():
    samples = [_sample("p1", 0, "What is the name of this person?", "This person is named Pim Kester.", "Pim Kester"),
               _sample("p1", 1, "Where was Pim Kester born?", "Pim Kester was born in Kassel.", "Kassel"),
               _sample("p2", 0, "Where was this person born?", "This person was born in Brno.", "Brno")]
    assert cf.person_names(samples) == {"p1": "Pim Kester"}          # p2 has no name QA: image swap only
    assert cf.names_the_person(samples[1].question, samples[1].answer, "Pim Kester")
    assert not cf.names_the_person(samples[2].question, samples[2].answer, "")
    assert cf.swap_name(samples[1].answer, "Pim Kester", "Ilse Venn") == "Ilse Venn was born in Kassel."
    assert cf.stranger_pool(["Ilse Venn", "pim kester", "Ilse Venn", " ", "Orla Holt"], ["Pim Kester"]) == [
        "Ilse Venn", "Orla Holt"]                                     # a forget person's name is never a stranger
    a = cf.draw_strangers("p1/1", 3, cf.BUILTIN, seed=0)
    assert a == cf.draw_strangers("p1/1", 3, cf.BUILTIN, seed=0) and len(set(a)) == 3
    assert a != cf.draw_strangers("p1/1", 3, cf.BUILTIN, seed=1)
    assert cf.draw_strangers("x", 3, ["A B"], seed=0) == ["A B"] * 3     # a pool smaller than k repeats
    with pytest.raises(ValueError, match="empty"):
        cf.draw_strangers("x", 1, [], seed=0)
    assert cf.common_suffix([1, 2, 3, 4], [9, 3, 4]) == 2 and cf.common_suffix([1], [2]) == 0
    assert len(set(cf.BUILTIN)) == len(cf.BUILTIN)


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-world") / "mini"
    make_mini(root, load_config("configs/demo.yaml").mini)
    samples = forget_samples(read_split(root, "forget_10"))
    person = samples[0].profile_id
    return root, [s for s in samples if s.profile_id == person]


def _true_probs(cache, sample_id):
    with RefCacheReader(cache) as reader:
        ref = reader.get(sample_id)
        ids = ref.answer_ids.tolist()
        return [float(ref.topk_prob[t][list(ref.topk_idx[t]).index(i)]) if i in ref.topk_idx[t] else 0.0
                for t, i in enumerate(ids)], ids


def test_a_question_that_names_the_person_is_asked_about_strangers(demo_world, tmp_path):
    root, samples = demo_world
    model = prebuilt.SHIPPED / "vanilla"
    cfg = load_config("configs/demo.yaml", [f"data.root={root}", "precompute.name_pool=Holdout_Set"])
    strangers = stranger_names(cfg)
    holdout = {p.id for p in read_profiles(root, HOLDOUT_SPLIT)}
    assert len(strangers) == len(holdout) >= 4
    for names in ("none", "swap"):
        settings = PrecomputeConfig(output=str(tmp_path / names), k=5, top_k=32, seed=0, names=names,
                                    name_pool="Holdout_Set")
        pc.precompute(str(model), samples, settings, pool_dir=str(root / "pools" / "people"), device="cpu",
                      log=lambda *_: None, strangers=strangers)
    tok = load_processor(model).tokenizer
    named = next(s for s in samples if s.fact and s.fact != cf.person_names(samples)[s.profile_id]
                 and cf.person_names(samples)[s.profile_id] in s.question)
    plain, ids = _true_probs(tmp_path / "none", named.sample_id)
    swapped, _ = _true_probs(tmp_path / "swap", named.sample_id)
    pieces = [tok.decode([i]) for i in ids]
    fact = next(t for t, p in enumerate(pieces) if p.startswith(" ") and p.strip() and named.fact.startswith(p.strip()))
    # the leak: the name in the question brings the fact back whatever the picture (0.38 for " Kassel")
    assert plain[fact] > 0.3, (pieces, plain)
    # asked about strangers, the reference no longer knows it (0.01)
    assert swapped[fact] < plain[fact] / 3, (pieces, swapped)
    # the answer's copy of the name keeps the image-swapped reference
    name_tokens = [t for t, p in enumerate(pieces) if p.strip() and p.strip() in cf.person_names(samples)[named.profile_id]]
    assert name_tokens and all(abs(plain[t] - swapped[t]) < 1e-3 for t in name_tokens)
    # a question that names nobody, with an answer that names nobody, is left as it was
    anonymous = next(s for s in samples if "this person" in s.question and "named" not in s.answer)
    assert _true_probs(tmp_path / "none", anonymous.sample_id) == _true_probs(tmp_path / "swap", anonymous.sample_id)
    # the counterfactual pairs through the naive path (one full forward per row) give the same cache
    naive = PrecomputeConfig(output=str(tmp_path / "naive"), k=5, top_k=32, seed=0, names="swap",
                             name_pool="Holdout_Set", prefix_cache=False)
    pc.precompute(str(model), samples, naive, pool_dir=str(root / "pools" / "people"), device="cpu",
                  log=lambda *_: None, strangers=strangers)
    for s in samples:
        fast, _ = _true_probs(tmp_path / "swap", s.sample_id)
        assert fast == pytest.approx(_true_probs(tmp_path / "naive", s.sample_id)[0], abs=2e-3)
    manifest = json.loads((tmp_path / "swap" / "manifest.json").read_text())
    assert manifest["settings"]["names"] == "swap" and manifest["settings"]["strangers"] == sorted(
        manifest["settings"]["strangers"], key=strangers.index)
    assert "names" in manifest["fingerprint"]["parts"]
    assert "names" not in json.loads((tmp_path / "none" / "manifest.json").read_text())["fingerprint"]["parts"]


def test_settings_that_cannot_go_together_are_refused_and_training_checks_the_cache():
    with pytest.raises(ConfigError, match="precompute.names"):
        load_config(None, ["precompute.names=swap", "precompute.reference=own"])
    with pytest.raises(ConfigError, match="online_reference"):
        load_config(None, ["precompute.names=swap", "train.online_reference=true"])
    made = {"k": 5, "K": 32, "seed": 0, "reference": "pool"}
    want = {**made, "span": "none", "names": "swap"}
    assert cache_setting_differences(made, {}, want, None) == ["precompute.names (config swap, cache none)"]
    cfg = load_config(None, ["precompute.names=swap", "precompute.name_pool=/nowhere/names.txt"])
    with pytest.raises(ValueError, match="neither builtin"):
        stranger_names(cfg)
