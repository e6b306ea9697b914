"""Membership-inference attacks: hand-computed statistics, exact AUC, PrivLeak, and planted members."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.config import FinetuneConfig
from pipeline.stage2 import finetune as ft
from pipeline.evaluation import mia
from pipeline.data.mllmu import read_split
from pipeline.models.encoding import encode_pair
from pipeline.models.modeling import load_model
from tests.tiny import make_world, tiny_config

LN2, LN3 = math.log(2), math.log(3)

# Two examples, V = 3, T = 3. Logits are logs of unnormalised probabilities, so p is readable:
#   t0: p = (1/4, 1/4, 1/2)   t1: uniform (1/3 each)   t2: p = (1/8, 2/8, 5/8)
# Row 1 has 2 answer tokens; its third position is padding with logits that would dominate any mean.
P0, P1, P2 = (0.25, 0.25, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.125, 0.25, 0.625)
LOGITS = torch.tensor([[[math.log(x) for x in P0], [0.0, 0.0, 0.0], [math.log(x) for x in P2]],
                       [[math.log(x) for x in P0], [5.0, 5.0, 5.0], [100.0, -100.0, 0.0]]])
LABELS = torch.tensor([[2, 0, 1], [0, 2, 0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
TEXTS = ["abc", "Zoë Zell."]


def by_hand(p, y):
    """(lp, mu, variance) of target y under distribution p, written out term by term."""
    lp = math.log(p[y])
    mu = sum(x * math.log(x) for x in p)
    second = sum(x * math.log(x) ** 2 for x in p)
    return lp, mu, second - mu ** 2


def test_token_statistics_by_hand():
    lp, mu, sigma = mia.token_statistics(LOGITS, LABELS, MASK)
    assert lp.dtype == mu.dtype == sigma.dtype == torch.float32 and lp.shape == (2, 3)
    # t0, target 2: lp = -ln 2, mu = 2 * (1/4) ln(1/4) + (1/2) ln(1/2) = -1.5 ln 2,
    # E[(log p)^2] = 2 * (1/4)(2 ln 2)^2 + (1/2)(ln 2)^2 = 2.5 (ln 2)^2, so variance (ln 2)^2 / 4.
    assert lp[0, 0].item() == pytest.approx(-LN2, abs=1e-6)
    assert mu[0, 0].item() == pytest.approx(-1.5 * LN2, abs=1e-6)
    assert sigma[0, 0].item() == pytest.approx(0.5 * LN2, abs=1e-6)
    # t1 uniform: lp = mu = -ln 3 and variance 0 -> the floor, sigma = sqrt(1e-6).
    assert lp[0, 1].item() == pytest.approx(-LN3, abs=1e-6) and mu[0, 1].item() == pytest.approx(-LN3, abs=1e-6)
    assert sigma[0, 1].item() == pytest.approx(1e-3, rel=1e-4)
    # t2, target 1: lp = ln(1/4); mu and variance from the three terms.
    lp2, mu2, var2 = by_hand(P2, 1)
    assert (lp2, mu2, var2) == pytest.approx((-2 * LN2, -0.9002560512685369, 0.3485663289206611))
    assert lp[0, 2].item() == pytest.approx(lp2, abs=1e-6) and mu[0, 2].item() == pytest.approx(mu2, abs=1e-6)
    assert sigma[0, 2].item() == pytest.approx(math.sqrt(var2), abs=1e-6)
    # Padding: fixed values, whatever its logits.
    assert (lp[1, 2].item(), mu[1, 2].item(), sigma[1, 2].item()) == (0.0, 0.0, 1.0)
    # Half-precision logits still give float32 statistics.
    lp16, _, _ = mia.token_statistics(LOGITS.to(torch.bfloat16), LABELS, MASK)
    assert lp16.dtype == torch.float32 and lp16[0, 0].item() == pytest.approx(-LN2, abs=2e-2)


def test_attack_scores_by_hand():
    stats = mia.token_statistics(LOGITS, LABELS, MASK)
    out = mia.attack_scores(*stats, MASK, TEXTS, k=0.4)
    assert set(out) == set(mia.ATTACKS) and all(len(v) == 2 for v in out.values())
    # Row 0: lp = (-ln 2, -ln 3, -2 ln 2); z = ((-ln2 + 1.5 ln2) / (0.5 ln2), 0, (lp2 - mu2) / sigma2) = (1, 0, z2).
    lp2, mu2, var2 = by_hand(P2, 1)
    z2 = (lp2 - mu2) / math.sqrt(var2)
    assert z2 == pytest.approx(-0.8232425054899952)
    loss0 = (LN2 + LN3 + 2 * LN2) / 3
    # Row 1 (padding ignored): lp = (-2 ln 2, -ln 3) (targets of p = 1/4 and 1/3);
    # z = ((-2 ln2 + 1.5 ln2) / (0.5 ln2), 0) = (-1, 0).
    loss1 = (2 * LN2 + LN3) / 2
    assert out["loss"] == pytest.approx([-loss0, -loss1], abs=1e-6)
    # zlib: len(zlib.compress(b"abc")) = 11 bytes; "Zoë Zell." is 10 UTF-8 bytes (ë takes 2) -> 18 compressed.
    assert (mia.zlib_entropy("abc"), mia.zlib_entropy("Zoë Zell.")) == (11, 18)
    assert out["zlib"] == pytest.approx([-loss0 / 11, -loss1 / 18], abs=1e-6)
    # k = 0.4: int(3 * 0.4) = 1 and int(2 * 0.4) = 0 -> max(1, .) = 1 lowest value in both rows.
    assert out["min_k"] == pytest.approx([-2 * LN2, -2 * LN2], abs=1e-6)
    assert out["min_k_pp"] == pytest.approx([z2, -1.0], abs=1e-3)
    # k = 0.7: int(2.1) = 2 lowest in row 0, int(1.4) = 1 in row 1.
    out7 = mia.attack_scores(*stats, MASK, TEXTS, k=0.7)
    assert out7["min_k"] == pytest.approx([-(2 * LN2 + LN3) / 2, -2 * LN2], abs=1e-6)
    assert out7["min_k_pp"] == pytest.approx([(z2 + 0.0) / 2, -1.0], abs=1e-3)
    # k = 1: every token, so min-k is the mean log-prob, i.e. the LOSS score.
    out1 = mia.attack_scores(*stats, MASK, TEXTS, k=1.0)
    assert out1["min_k"] == pytest.approx(out1["loss"], abs=1e-6)
    assert out1["min_k_pp"] == pytest.approx([(1 + 0 + z2) / 3, (-1 + 0) / 2], abs=1e-3)


def test_attack_scores_refuse_bad_input():
    stats = mia.token_statistics(LOGITS, LABELS, MASK)
    with pytest.raises(ValueError, match="no answer token"):
        mia.attack_scores(*stats, torch.tensor([[1.0, 1, 1], [0, 0, 0]]), TEXTS)
    with pytest.raises(ValueError, match="k must be"):
        mia.attack_scores(*stats, MASK, TEXTS, k=0.0)
    with pytest.raises(ValueError, match="texts"):
        mia.attack_scores(*stats, MASK, TEXTS[:1])


def test_auc_by_hand():
    # members (3, 2, 2) vs non-members (2, 1): of 6 pairs, 3>2, 3>1, 2>1, 2>1 win and 2=2 twice ties -> (4 + 1) / 6.
    assert mia.auc([3, 2, 2], [2, 1]) == pytest.approx(5 / 6)
    assert mia.auc([5, 4, 3], [2, 1]) == 1.0
    assert mia.auc([1, 2], [3, 4, 5]) == 0.0
    assert mia.auc([7, 7], [7, 7, 7]) == 0.5
    # Order of either group is irrelevant; swapping the groups mirrors the AUC.
    assert mia.auc([2, 3, 2], [1, 2]) == pytest.approx(5 / 6)
    assert mia.auc([2, 1], [3, 2, 2]) == pytest.approx(1 / 6)
    for bad in (([], [1.0]), ([1.0], [])):
        with pytest.raises(ValueError, match="both groups"):
            mia.auc(*bad)
    with pytest.raises(ValueError, match="NaN"):
        mia.auc([1.0, float("nan")], [0.0])


def test_auc_matches_a_pairwise_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m, n = rng.integers(0, 6, rng.integers(1, 30)), rng.integers(0, 6, rng.integers(1, 30))   # many ties
        pairs = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in m for b in n)
        assert mia.auc(m, n) == pytest.approx(pairs / (len(m) * len(n)), abs=1e-12)


def test_privleak_by_hand():
    assert mia.privleak(0.75, 0.5) == pytest.approx(50.0)       # leaks more than the gold model
    assert mia.privleak(0.4, 0.5) == pytest.approx(-20.0)       # over-unlearned
    assert mia.privleak(0.6, 0.6) == 0.0
    assert mia.privleak(0.9, 0.6) == pytest.approx(50.0)        # relative to gold, not to 0.5
    with pytest.raises(ValueError):
        mia.privleak(0.5, 0.0)
    # OpenUnlearning's form: opposite sign, relative to 1 - gold.
    assert mia.privleak_openunlearning(0.75, 0.5) == pytest.approx(-50.0)
    assert mia.privleak_openunlearning(0.9, 0.6) == pytest.approx(100 * (0.1 - 0.4) / 0.4)


def aucs(loss, zlib_, min_k, min_k_pp):
    return {"mia_auc_loss": loss, "mia_auc_zlib": zlib_, "mia_auc_min_k": min_k, "mia_auc_min_k_pp": min_k_pp,
            "n_members": 10, "n_nonmembers": 10}


def test_gold_comparison_by_hand():
    gold = aucs(0.55, 0.5, 0.6, 0.5)
    # |auc - gold| = 0.35, 0.1, 0.37, 0.2: min_k, with PrivLeak 100 * 0.37 / 0.6.
    out = mia.gold_comparison(aucs(0.9, 0.6, 0.97, 0.3), gold)
    assert out["privleak_loss"] == pytest.approx(100 * 0.35 / 0.55)
    assert out["privleak_zlib"] == pytest.approx(20.0) and out["privleak_min_k_pp"] == pytest.approx(-40.0)
    assert out["mia_best_of_4_attack"] == "min_k" and out["mia_auc_best_of_4_biased"] == 0.97
    assert out["privleak_best_of_4_biased"] == pytest.approx(100 * 0.37 / 0.6) == out["privleak_min_k"]
    assert out["privleak_ou_min_k"] == pytest.approx(100 * (0.6 - 0.97) / 0.4)
    # An over-unlearned attack can be the best one: |0.05 - 0.5| = 0.45 beats 0.37; its PrivLeak is negative.
    out = mia.gold_comparison(aucs(0.9, 0.6, 0.97, 0.05), gold)
    assert out["mia_best_of_4_attack"] == "min_k_pp" and out["privleak_best_of_4_biased"] == pytest.approx(-90.0)
    # No gold: distance from chance, and no PrivLeak at all.
    for none in (None, {}):
        out = mia.gold_comparison(aucs(0.9, 0.6, 0.97, 0.01), none)
        assert out == {"mia_best_of_4_attack": "min_k_pp", "mia_auc_best_of_4_biased": 0.01}
    assert mia.gold_comparison(aucs(0.9, 0.6, 0.97, 0.3), None)["mia_best_of_4_attack"] == "min_k"
    # Equal distances: the earlier attack in ATTACKS.
    assert mia.gold_comparison(aucs(0.8, 0.2, 0.5, 0.5), None)["mia_best_of_4_attack"] == "loss"


def test_privleak_in_both_conventions_by_hand():
    """g = 0.6, AUC = 0.9: viker's 100 (AUC - g) / g = +50; OpenUnlearning's / MUSE's 100 (g - AUC) / (1 - g) = -75."""
    assert mia.privleak(0.9, 0.6) == pytest.approx(50.0)
    assert mia.privleak_openunlearning(0.9, 0.6) == pytest.approx(-75.0)
    assert mia.gold_comparison(aucs(0.9, 0.9, 0.9, 0.9), aucs(0.6, 0.6, 1.0, 0.6))["privleak_ou_min_k"] is None


def test_the_best_of_four_attack_is_biased_and_the_fixed_one_is_not():
    """Unlearned and gold models drawn from ONE distribution (perfect unlearning): PrivLeak should be ~0.

    36 members, 72 non-members, four correlated attack scores per item (members a little more member-like,
    as after fine-tuning); 400 simulated (unlearned, gold) pairs. Choosing the attack farthest from the gold
    model per row inflates |PrivLeak| (~1.7x here; the review measured 11.2 vs 7.1) and the chosen attack
    changes from draw to draw; the pre-declared min-k% keeps only the sampling noise.
    """
    rng = np.random.default_rng(0)

    def model_aucs():
        scores = rng.normal(size=(108, 1)) + rng.normal(size=(108, 4))   # four attacks reading the same samples
        scores[:36] += 0.3
        return {f"mia_auc_{a}": mia.auc(scores[:36, i], scores[36:, i]) for i, a in enumerate(mia.ATTACKS)}
    best, fixed, fixed_ou, chosen = [], [], [], set()
    for _ in range(400):
        out = mia.gold_comparison(model_aucs(), model_aucs())
        best.append(out["privleak_best_of_4_biased"])
        fixed.append(out[f"privleak_{mia.FIXED_ATTACK}"])
        fixed_ou.append(out[f"privleak_ou_{mia.FIXED_ATTACK}"])
        chosen.add(out["mia_best_of_4_attack"])
    assert mia.FIXED_ATTACK == "min_k" and chosen == set(mia.ATTACKS)
    best_abs, fixed_abs = np.mean(np.abs(best)), np.mean(np.abs(fixed))
    assert best_abs > 1.4 * fixed_abs, (best_abs, fixed_abs)     # 1.7-1.85 over seeds 0-7
    # What is left for the fixed attack is the noise of two AUCs on 36 x 72 samples, in either convention.
    assert fixed_abs < 20 and np.mean(np.abs(fixed_ou)) < 20, (fixed_abs, np.mean(np.abs(fixed_ou)))


def test_the_attack_line_of_a_row_names_both_conventions():
    """format_attacks: the fixed attack's AUC and PrivLeak in both conventions; OU undefined for a gold AUC of 1."""
    from pipeline.evaluation.evaluate import format_attacks
    x = {**aucs(0.8, 0.7, 0.9, 0.6), "privleak_min_k": 50.0, "privleak_ou_min_k": -75.0}
    line = format_attacks({"metrics": {"mia": x}})[0]
    assert "min_k: 0.900; PrivLeak +50.0% (viker: 100(AUC-g)/g), -75.0% (OpenUnlearning/MUSE: 100(g-AUC)/(1-g))" \
        in line and "other attacks (diagnostic): loss 0.800, zlib 0.700, min_k_pp 0.600" in line
    line = format_attacks({"metrics": {"mia": {**x, "privleak_ou_min_k": None}}})[0]
    assert "+50.0% (viker: 100(AUC-g)/g), undefined (OpenUnlearning/MUSE" in line


# ------------------------------------------------------------------ the tiny model

# Plants the members firmly in a few seconds: the loss attack's AUC is 0.92-0.94 over fine-tuning seeds 0-2
# (400 steps at 3e-3 reach 0.98 at three times the cost; the test asks for 0.8).
RECIPE = FinetuneConfig(steps=120, batch_size=8, lr=1e-2, warmup_steps=5, augment=False, stop_known=0.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root, model_dir = make_world(tmp_path_factory, tiny_config(), n_fictitious=10, pool_size=2)
    return root, model_dir, read_split(root, "ft_Data")


def test_items_are_the_training_text(world):
    """qa_items + encode_pair give the fine-tuning sequence minus its EOS, and one image per profile."""
    root, model_dir, profiles = world
    _, processor = load_model(model_dir, dtype="float32", device="cpu")
    items = mia.qa_items(profiles[:2])
    _, examples = ft.build_examples(processor, profiles[:2], None)
    assert [sid for sid, *_ in items] == [f"{p.id}/{j}" for p in profiles[:2] for j in range(len(p.qa))]
    assert len(items) == len(examples) and len({id(image) for _, image, _, _ in items}) == 2
    for (sid, _, prompt, answer), ex in zip(items, examples):
        ids, start = encode_pair(processor, prompt, answer)
        assert ids + [processor.tokenizer.eos_token_id] == ex.ids and start == ex.answer_start


def test_sample_scores_agree_with_likelihoods_and_batching(world):
    """LOSS score x answer length = the summed log-likelihood scoring.py computes; batching changes nothing."""
    from pipeline.evaluation.scoring import answer_logliks
    root, model_dir, profiles = world
    model, processor = load_model(model_dir, dtype="float32", device="cpu")
    items = mia.qa_items(profiles[:3])
    rows = mia.sample_scores(model, processor, items, batch_size=32)
    one = mia.sample_scores(model, processor, items, batch_size=1)
    for a in mia.ATTACKS:
        assert [r[a] for r in rows] == pytest.approx([r[a] for r in one], abs=1e-4)
    sums = answer_logliks(model, processor, [(image, prompt, answer) for _, image, prompt, answer in items])
    lengths = [len(ids) - start for ids, start in (encode_pair(processor, p, a) for _, _, p, a in items)]
    assert [r["loss"] * n for r, n in zip(rows, lengths)] == pytest.approx(sums, abs=1e-3)
    assert [r["id"] for r in rows] == [sid for sid, *_ in items]


def test_planted_members_are_found(world, tmp_path):
    """Members = profiles the model was fine-tuned on; shuffling the labels brings every AUC to chance.

    The gold model learned only the 'retain' profiles, seen by the target too;
    members and non-members are both new to it, so the target leaks more (PrivLeak > 0).
    """
    root, model_dir, profiles = world
    members, nonmembers, retain = profiles[:4], profiles[4:8], profiles[8:]
    for name, taught in (("target", members + retain), ("gold", retain)):
        ft.finetune(replace(RECIPE, base=str(model_dir), output=str(tmp_path / name)), taught, dtype="float32",
                    device="cpu", log=lambda *_: None)
    model, processor = load_model(tmp_path / "target", dtype="float32", device="cpu")
    metrics, rows = mia.membership(model, processor, members, nonmembers, batch_size=16)
    assert metrics["n_members"] == 24 and metrics["n_nonmembers"] == 24 and len(rows) == 48
    assert [r["member"] for r in rows] == [True] * 24 + [False] * 24
    assert metrics["mia_auc_loss"] > 0.8, metrics
    gold_model, _ = load_model(tmp_path / "gold", dtype="float32", device="cpu")
    gold, _ = mia.membership(gold_model, processor, members, nonmembers, batch_size=16)
    out = mia.gold_comparison(metrics, gold)
    assert out["mia_auc_best_of_4_biased"] > 0.8 and out["privleak_min_k"] > 0 and out["privleak_loss"] > 0, \
        (metrics, gold)
    # The same scores with random labels: no attack separates them.
    rng = np.random.default_rng(0)
    for a in mia.ATTACKS:
        scores = np.array([r[a] for r in rows])
        shuffled = []
        for _ in range(20):
            member = rng.permutation(len(rows)) < 24
            shuffled.append(mia.auc(scores[member], scores[~member]))
        assert abs(np.mean(shuffled) - 0.5) < 0.1, (a, shuffled)
