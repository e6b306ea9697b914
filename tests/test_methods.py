"""The method registry: one module a method, what each declares, and its loss on a tiny tensor case.

The tensor cases are test_losses.py's (PROBS, LABELS, MASK and the ViKeR bucket
case), reused through each method's own loss call; the loss functions
themselves are tested there.
"""
import math
import subprocess
import sys

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.stage2 import labels
from pipeline.stage2 import methods as M
from pipeline.stage2.errors import TrainError
from pipeline.stage2.methods import forward as F
from pipeline.stage2.stream import MicroBatch, Refs
from tests.test_losses import LABELS, MASK, PROBS, _logits_from_probs, _np_kl

TRAIN_METHODS = ("ga", "graddiff", "kl_min", "npo", "idkpo", "viker", "simnpo", "rmu", "mmunlearner")
SWEEP = TRAIN_METHODS + ("viker+nll", "viker+kl", "viker-ga", "viker-ga+nll", "viker+span", "viker+span+nll",
                         "viker+span-ga", "viker+span-ga+nll", "viker+names", "viker+names+nll", "viker+names-ga",
                         "viker+names-ga+nll")


# ------------------------------------------------------------------ the registry


def test_reference_variants_are_the_keys_the_demo_refuses():
    """Sweep keys with a cache of their own (Variant.reference) are what config.check_rules keeps out of the demo."""
    from typing import get_args
    from pipeline.config import ConfigError, SweepMethod, load_config
    from pipeline.stage2.labels import reference_overrides, train_method
    assert get_args(SweepMethod) == M.SWEEP_KEYS
    own = [k for k, v in M.SWEEP_VARIANTS.items() if v.reference]
    assert len(own) == 8 and reference_overrides("viker+names-ga") == {"span": "chain", "names": "swap"}
    assert train_method("viker+span-ga+nll") == ("viker", {"use_ga": False, "retain_term": "nll"})
    for key in M.SWEEP_KEYS:
        if key in own:
            with pytest.raises(ConfigError, match="needs a reference cache of its own"):
                load_config("configs/demo.yaml", [f"demo.methods={key}"])
        else:
            load_config("configs/demo.yaml", [f"demo.methods={key}"])


def test_registry_names_are_the_config_choices():
    assert M.METHOD_NAMES == TRAIN_METHODS and isinstance(M.METHOD_NAMES, tuple)
    assert M.SWEEP_KEYS == SWEEP and isinstance(M.SWEEP_KEYS, tuple)
    assert tuple(M.METHODS) == TRAIN_METHODS
    assert all(isinstance(m, M.Method) and m.name == name for name, m in M.METHODS.items())
    assert M.get_method("ViKeR") is M.METHODS["viker"] and M.get_method("KL-Min") is M.METHODS["kl_min"]
    assert M.resolve_method(" GradDiff ") == "graddiff"
    with pytest.raises(TrainError) as err:
        M.get_method("viker+nll")   # a sweep key, not a train.method
    assert str(err.value) == ("unknown training method 'viker+nll'; choose one of: "
                              "ga, graddiff, kl_min, npo, idkpo, viker, simnpo, rmu, mmunlearner")


def test_each_method_lives_in_its_own_module():
    for name, m in M.METHODS.items():
        assert type(m).__module__ == f"pipeline.stage2.methods.{name}"


@pytest.mark.parametrize("name", TRAIN_METHODS)
def test_declarations_are_complete(name):
    m = M.METHODS[name]
    assert m.label and set(m.conventions) == set(M.LOSS_CONVENTIONS)
    assert set(m.cache_fields) <= set(M.CACHE_FIELDS)
    assert set(m.retain_term_choices) <= set(M.RETAIN_TERMS) and "none" in m.retain_term_choices
    for term in m.retain_term_choices:
        for convention in M.LOSS_CONVENTIONS:
            d = m.defaults(M.LossSpec(name, retain_term=term, convention=convention))
            assert d.retain and set(d.retain) <= {"nll", "kl", "hidden"} and d.retain_weight >= 0
            assert ("hidden" in d.retain) == (name == "rmu")     # RMU's own term, its own forward


def test_labels_are_read_from_the_registry():
    assert labels.METHOD_LABELS == {"ga": "GA", "graddiff": "GradDiff", "kl_min": "KL_Min", "npo": "NPO",
                                    "idkpo": "IdkPO", "viker": "ViKeR", "simnpo": "SimNPO", "rmu": "RMU",
                                    "mmunlearner": "MMUnlearner",
                                    "viker+nll": "ViKeR+NLL", "viker+kl": "ViKeR+KL", "viker-ga": "ViKeR -GA",
                                    "viker-ga+nll": "ViKeR+NLL -GA", "viker+span": "ViKeR span",
                                    "viker+span+nll": "ViKeR span+NLL", "viker+span-ga": "ViKeR span -GA",
                                    "viker+span-ga+nll": "ViKeR span+NLL -GA", "viker+names": "ViKeR span+names",
                                    "viker+names+nll": "ViKeR span+names+NLL",
                                    "viker+names-ga": "ViKeR span+names -GA",
                                    "viker+names-ga+nll": "ViKeR span+names+NLL -GA"}
    assert tuple(labels.METHOD_LABELS) == M.SWEEP_KEYS
    assert labels.train_method("viker+nll") == ("viker", {"retain_term": "nll"})
    assert labels.train_method(" ViKeR+KL ") == ("viker", {"retain_term": "kl"})
    assert labels.train_method("npo") == ("npo", {})
    assert [k for k in SWEEP if labels.is_viker(k)] == ["viker"] + list(SWEEP[len(TRAIN_METHODS):])
    info = {"method": "viker", "train": {"use_ga": False, "regulariser": "jsd", "retain_term": "kl"},
            "cache_settings": {"reference": "own"}}
    assert labels.method_label(info) == "ViKeR w/o GA w/o Vis (JSD)+KL"
    assert labels.method_label({"method": "kl_min", "train": {"use_ga": False}}) == "KL_Min"
    assert labels.method_label({}) == "adapter" and labels.method_label({"method": "odd"}) == "odd"
    assert labels.file_slug(labels.METHOD_LABELS["viker+nll"]) == "viker-nll"


def test_the_registry_and_labels_load_without_torch():
    # labels.py reads the registry, and the CLI imports labels: neither may pull torch in.
    code = ("import sys, pipeline.stage2.labels, pipeline.stage2.methods as m; m.get_method('npo'); "
            "print(sorted(x for x in ('torch', 'transformers') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ the options


def test_retain_term_and_online_reference_are_checked_against_the_declarations():
    with pytest.raises(TrainError, match="retain_term applies to viker only"):
        M.check_retain_term("nll", "kl_min")
    with pytest.raises(TrainError, match="one of: none, nll, kl"):
        M.check_retain_term("mse", "viker")
    assert M.check_retain_term(" KL ", "viker") == "kl"
    with pytest.raises(TrainError, match="online_reference applies to viker only, not npo"):
        M.check_options(TrainConfig(method="npo", online_reference=True), "npo", "cache", "pool")
    with pytest.raises(TrainError, match="method idkpo needs a reference cache"):
        M.check_options(TrainConfig(method="idkpo", output="out"), "idkpo", None, None)
    M.check_options(TrainConfig(method="viker", online_reference=True, output="out"), "viker", None, "pool")
    M.check_options(TrainConfig(method="graddiff", output="out"), "graddiff", None, None)
    spec = M.loss_spec(TrainConfig(online_reference=True), "viker", 5, 64, 0)
    assert spec.online and not M.METHODS["viker"].uses_cache(spec)
    assert M.METHODS["viker"].uses_cache(M.loss_spec(TrainConfig(), "viker", 5, 64, 0))


def test_unknown_convention_is_one_line():
    with pytest.raises(TrainError, match="train.convention 'tofu' is not one of: viker, mllmu, openunlearning"):
        M.loss_spec(TrainConfig(convention="tofu"), "npo", 5, 64, 0)
    assert M.loss_spec(TrainConfig(convention="MLLMU"), "npo", 5, 64, 0).convention == "mllmu"


# ------------------------------------------------------------------ retain_weight: one meaning


def test_default_retain_terms_are_todays_numbers():
    def terms(name, convention="viker", term="none", weight=0.0):
        return M.METHODS[name].retain_terms(M.LossSpec(name, convention=convention, retain_term=term,
                                                       retain_weight=weight))
    for c in M.LOSS_CONVENTIONS:
        assert terms("ga", c) == terms("idkpo", c) == terms("viker", c) == ()
        # NPO: none, except OpenUnlearning's (configs/trainer/NPO.yaml: alpha 1, retain_loss_type NLL)
        assert terms("npo", c) == ((("nll", 1.0),) if c == "openunlearning" else ())
        assert terms("graddiff", c) == (("nll", 1.0),)
        assert terms("viker", c, "nll") == (("nll", 1.0),) and terms("viker", c, "kl") == (("kl", 1.0),)
        # SimNPO: the authors' plain loss under viker; OpenUnlearning's (SimNPO.yaml: alpha 1, NLL) otherwise
        assert terms("simnpo", c) == (() if c == "viker" else (("nll", 1.0),))
        assert terms("rmu", c) == (("hidden", 1.0),) and terms("rmu", c, weight=3.0) == (("hidden", 3.0),)
        assert terms("mmunlearner", c) == (("nll", 1.0),)     # MLLMU_manifold.py's retain step: outputs.loss
    assert [terms("kl_min", c) for c in M.LOSS_CONVENTIONS] == [(("kl", 1.0),), (("kl", 1.0), ("nll", 1.0)),
                                                                 (("kl", 1.0),)]
    # train.retain_weight is the alpha of that same term, never a term of its own.
    assert terms("kl_min", weight=2.0) == (("kl", 2.0),)
    assert terms("kl_min", "mllmu", weight=2.0) == (("kl", 2.0), ("nll", 2.0))
    assert terms("graddiff", weight=0.5) == (("nll", 0.5),)
    assert terms("viker", term="kl", weight=2.0) == (("kl", 2.0),)
    assert terms("idkpo", "openunlearning", weight=1.0) == terms("npo", weight=1.0) == (("nll", 1.0),)
    assert not M.METHODS["ga"].needs_retain(M.LossSpec("ga"))
    assert M.METHODS["kl_min"].needs_retain(M.LossSpec("kl_min"))


def test_kl_min_retain_weight_weighs_the_kl_and_adds_no_nll():
    spec = M.LossSpec("kl_min", retain_weight=2.0)
    got, d = M.METHODS["kl_min"].combine(_out(retain=True), _batch(retain=True), spec, "cpu", vanilla=VANILLA)
    assert got.item() == pytest.approx(GA_MEAN + 2.0 * KL_UNIFORM, abs=1e-6)
    assert "retain/kl" in d and "retain/nll" not in d
    torch.testing.assert_close(d["retain/kl"], torch.full((2,), KL_UNIFORM), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ needs: declared = read


def _batch(retain=False, **fields):
    mb = MicroBatch(forget=["f0", "f1"], **fields)
    if retain:
        mb.retain = ["r0", "r1"]
    return mb


def _full_batch():
    return MicroBatch(forget=["f0", "f1"], idk=["i0", "i1"], retain=["r0", "r1"], refs=REFS2,
                      ref_logp_own=torch.tensor([-3.0, -2.0]), ref_logp_idk=torch.tensor([-2.0, -1.0]))


def _out(retain=False, idk=False):
    out = {"forget": (_logits_from_probs(PROBS), LABELS, MASK)}
    if idk:
        out["idk"] = (_logits_from_probs(PROBS), IDK_LABELS, MASK)
    if retain:
        out["retain"] = (_logits_from_probs(PROBS), LABELS, MASK)
    return out


@pytest.fixture
def stub_forwards(monkeypatch):
    """forward_parts and frozen_logits without a model: they hand out _out's tensors and record what was asked."""
    asked = {"parts": None, "frozen": 0}

    def parts(net, model, parts, inputs, dev):
        asked["parts"] = set(parts)
        full = _out(retain=True, idk=True)
        return {name: full[name] for name in parts}

    def frozen(model, examples, inputs, dev, images=None):
        asked["frozen"] += 1
        return VANILLA, None

    def hidden(net, model, parts, inputs, dev, layer):      # RMU's: hidden states in the logits' place
        asked["parts"] = set(parts)
        return {name: (HIDDEN, LABELS, MASK) for name in parts}, None

    def frozen_hidden(model, examples, inputs, dev, layer):
        asked["frozen"] += 1
        return HIDDEN_VANILLA, MASK

    monkeypatch.setattr(F, "forward_parts", parts)
    monkeypatch.setattr(F, "frozen_logits", frozen)
    monkeypatch.setattr(F, "forward_hidden", hidden)
    monkeypatch.setattr(F, "frozen_hidden", frozen_hidden)
    return asked


@pytest.mark.parametrize("name,settings", [(n, {}) for n in TRAIN_METHODS] +
                         [("viker", {"retain_term": "nll"}), ("viker", {"retain_term": "kl"}),
                          ("npo", {"retain_weight": 1.0}), ("kl_min", {"convention": "mllmu"}),
                          ("simnpo", {"convention": "openunlearning"})])
def test_a_method_reads_what_it_declares_and_nothing_else(name, settings, stub_forwards):
    m, spec = M.METHODS[name], M.LossSpec(name, **settings)
    needs = m.needs(spec)
    mb = _full_batch()
    for field in ("refs", "ref_logp_own", "ref_logp_idk", "idk", "retain"):
        if field not in needs:
            setattr(mb, field, None)      # what it does not declare, it must not read
    loss, diags = M.micro_batch_loss(None, None, mb, spec, None, "cpu")
    assert torch.isfinite(loss) and diags["forget/loss"].shape == (2,)
    assert stub_forwards["parts"] == {"forget"} | ({"idk"} & set(needs)) | ({"retain"} & set(needs))
    assert stub_forwards["frozen"] == int(any(t in ("kl", "hidden") for t, _ in m.retain_terms(spec)))
    for field in needs:                   # what it declares, a micro-batch must carry
        short = _full_batch()
        setattr(short, field, None)
        with pytest.raises(TrainError, match=f"method {name} needs {field} in every micro-batch"):
            M.micro_batch_loss(None, None, short, spec, None, "cpu")


def test_declared_needs_per_method():
    needs = {n: M.METHODS[n].needs(M.LossSpec(n)) for n in TRAIN_METHODS}
    assert needs == {"ga": (), "graddiff": ("retain",), "kl_min": ("retain",), "npo": ("ref_logp_own",),
                     "idkpo": ("ref_logp_own", "ref_logp_idk", "idk"), "viker": ("refs",), "simnpo": (),
                     "rmu": ("retain",), "mmunlearner": ("retain",)}
    assert M.METHODS["viker"].needs(M.LossSpec("viker", online=True)) == ()
    assert [M.METHODS[n].scores for n in ("npo", "idkpo", "viker")] == [("ref_logp_own",),
                                                                        ("ref_logp_own", "ref_logp_idk"), ()]


# ------------------------------------------------------------------ each method's loss, by hand

# test_losses' two-example case: per-example GA = mean log Q(y) over answer tokens.
GA = [(math.log(0.3) + math.log(0.4)) / 2, math.log(0.1)]
GA_MEAN = sum(GA) / 2
LL = [math.log(0.3) + math.log(0.4), math.log(0.1)]            # summed answer log-likelihoods
IDK_LABELS = torch.tensor([[3, 3], [3, -100]])
LL_IDK = [2 * math.log(0.4), math.log(0.4)]
# The vanilla model of the retain part: uniform, so KL(P_van || Q) is the same at every answer token.
VANILLA = torch.zeros(2, 2, 4)
KL_UNIFORM = _np_kl([0.25] * 4, [0.1, 0.2, 0.3, 0.4])
# RMU's case: hidden states [2, 2, 4] at the answer tokens (row 1's second token is padding), and the vanilla's.
HIDDEN = torch.tensor([[[1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 0.5, 0.5]], [[2.0, 0.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0]]])
HIDDEN_VANILLA = torch.tensor([[[1.0, 1.0, 0.0, -1.0], [0.5, 0.5, 0.5, 0.5]], [[0.0, 0.0, 1.0, 1.0], [0.0] * 4]])
# test_losses' ViKeR bucket case (Q = PROBS row 0; R on (3, 2) = (0.6, 0.3), tail 0.1), at every position.
REFS2 = Refs(torch.tensor([[[3, 2]] * 2] * 2), torch.tensor([[[0.6, 0.3]] * 2] * 2), torch.full((2, 2), 0.1),
             torch.zeros(2, 2))


def test_ga_loss_by_hand():
    loss, d = M.METHODS["ga"].combine(_out(), _batch(), M.LossSpec("ga"), "cpu")
    assert loss.item() == pytest.approx(GA_MEAN, abs=1e-6)
    torch.testing.assert_close(d["forget/nll"], -torch.tensor(GA), atol=1e-6, rtol=0)
    with_retain, d = M.METHODS["ga"].combine(_out(retain=True), _batch(retain=True),
                                             M.LossSpec("ga", retain_weight=0.5), "cpu")
    assert with_retain.item() == pytest.approx(GA_MEAN - 0.5 * GA_MEAN, abs=1e-6) and "retain/nll" in d


def test_graddiff_loss_by_hand():
    # The retain part is the forget part again: NLL = -GA, alpha 1 by default.
    loss, d = M.METHODS["graddiff"].combine(_out(retain=True), _batch(retain=True), M.LossSpec("graddiff"), "cpu")
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(d["retain/nll"], -torch.tensor(GA), atol=1e-6, rtol=0)
    loss, _ = M.METHODS["graddiff"].combine(_out(retain=True), _batch(retain=True),
                                            M.LossSpec("graddiff", retain_weight=3.0), "cpu")
    assert loss.item() == pytest.approx(GA_MEAN - 3.0 * GA_MEAN, abs=1e-6)


@pytest.mark.parametrize("convention", M.LOSS_CONVENTIONS)
def test_kl_min_loss_by_hand(convention):
    loss, d = M.METHODS["kl_min"].combine(_out(retain=True), _batch(retain=True),
                                          M.LossSpec("kl_min", convention=convention), "cpu", vanilla=VANILLA)
    nll = -GA_MEAN if convention == "mllmu" else 0.0   # MLLMU-Bench's KL_Min.py: loss_retain = NLL + KL
    assert loss.item() == pytest.approx(GA_MEAN + KL_UNIFORM + nll, abs=1e-6)
    assert ("retain/nll" in d) == (convention == "mllmu")


@pytest.mark.parametrize("convention", M.LOSS_CONVENTIONS)
def test_npo_loss_by_hand(convention):
    ref = [-3.0, -2.0]
    mb = _batch(ref_logp_own=torch.tensor(ref))
    loss, d = M.METHODS["npo"].combine(_out(), mb, M.LossSpec("npo", beta=0.4, convention=convention), "cpu")
    tokens = [2, 1] if convention == "mllmu" else [1, 1]     # mllmu: per-token mean log-likelihoods
    ratio = [(LL[i] - ref[i]) / tokens[i] for i in range(2)]
    expected = [5.0 * math.log(1 + math.exp(0.4 * r)) for r in ratio]   # -(2/b) logsigmoid(-b x)
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-5)
    torch.testing.assert_close(d["forget/log_ratio"], torch.tensor(ratio), atol=1e-5, rtol=0)


def test_npo_openunlearning_is_their_npo_by_hand_and_by_their_code():
    """OpenUnlearning's NPO (locuslab/open-unlearning, configs/trainer/NPO.yaml: beta 0.1, alpha 1, gamma 1,
    retain_loss_type NLL; src/trainer/unlearn/npo.py NPO.compute_loss; src/trainer/utils.py compute_dpo_loss
    and compute_batch_nll; src/trainer/unlearn/grad_diff.py GradDiff.compute_retain_loss)."""
    import torch.nn.functional as TF
    ref = [-3.0, -2.0]
    # A retain batch of equal answer lengths: their outputs.loss (a token mean over the batch) and our
    # per-example mean then batch mean are the same number there (docs/METHODS.md: what remains different).
    r_probs = [[[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]], [[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]]]
    r_labels, r_mask = torch.tensor([[2, 3], [0, 1]]), torch.ones(2, 2, dtype=torch.bool)
    out = {"forget": (_logits_from_probs(PROBS), LABELS, MASK), "retain": (_logits_from_probs(r_probs), r_labels, r_mask)}
    mb = _batch(retain=True, ref_logp_own=torch.tensor(ref))
    spec = M.loss_spec(TrainConfig(method="npo", convention="openunlearning"), "npo", 5, 64, 0)
    assert spec.beta == 0 and M.METHODS["npo"].beta(spec) == 0.1
    assert M.METHODS["npo"].retain_terms(spec) == (("nll", 1.0),) and "retain" in M.METHODS["npo"].needs(spec)
    loss, d = M.METHODS["npo"].combine(out, mb, spec, "cpu")
    # By hand: mean_i -(2/0.1) log sigmoid(-0.1 (ll_i - ll_ref_i)) + 1 * mean retain NLL.
    forget = [20.0 * math.log(1 + math.exp(0.1 * (LL[i] - ref[i]))) for i in range(2)]
    retain_nll = -(math.log(0.3) + math.log(0.4) + math.log(0.7) + math.log(0.2)) / 4
    assert loss.item() == pytest.approx(sum(forget) / 2 + retain_nll, rel=1e-6)
    # Their code, ported line for line (the logits here are already shifted: position t predicts labels[:, t]).
    logits = _logits_from_probs(PROBS)
    lose_loss = TF.cross_entropy(logits.transpose(-1, -2), LABELS, ignore_index=-100, reduction="none").sum(-1)
    lose_ref_loss = -torch.tensor(ref)                                  # compute_batch_nll of the reference model
    lose_log_ratio = -(lose_loss - lose_ref_loss)
    beta, alpha, gamma = 0.1, 1.0, 1.0
    forget_loss = -2 / beta * TF.logsigmoid(beta * (0.0 - lose_log_ratio)).mean()
    retain_loss = TF.cross_entropy(_logits_from_probs(r_probs).reshape(-1, 4), r_labels.reshape(-1))  # outputs.loss
    assert loss.item() == pytest.approx((gamma * forget_loss + alpha * retain_loss).item(), rel=1e-6)
    # train.beta and train.retain_weight stay the user's overrides.
    user = M.loss_spec(TrainConfig(method="npo", convention="openunlearning", beta=0.3, retain_weight=2.0),
                       "npo", 5, 64, 0)
    assert M.METHODS["npo"].beta(user) == 0.3 and M.METHODS["npo"].retain_terms(user) == (("nll", 2.0),)


@pytest.mark.parametrize("convention", ["viker", "mllmu"])
@pytest.mark.parametrize("name", ["npo", "idkpo"])
def test_beta_zero_is_todays_beta_bit_for_bit(convention, name):
    """train.beta's default 0 means the convention's: 0.4 under viker and mllmu, today's number exactly."""
    mb = _full_batch()
    spec = M.loss_spec(TrainConfig(method=name, convention=convention), name, 5, 64, 0)
    today = M.loss_spec(TrainConfig(method=name, convention=convention, beta=0.4), name, 5, 64, 0)
    assert spec.beta == 0 and today.beta == 0.4
    got, _ = M.METHODS[name].combine(_out(idk=True), mb, spec, "cpu")
    want, _ = M.METHODS[name].combine(_out(idk=True), mb, today, "cpu")
    assert torch.equal(got, want)
    assert M.METHODS[name].retain_terms(spec) == ()


@pytest.mark.parametrize("convention", M.LOSS_CONVENTIONS)
def test_idkpo_loss_by_hand(convention):
    ref_gt, ref_idk = [-3.0, -2.0], [-2.0, -1.0]
    mb = _batch(idk=["i0", "i1"], ref_logp_own=torch.tensor(ref_gt), ref_logp_idk=torch.tensor(ref_idk))
    spec = M.LossSpec("idkpo", beta=0.4, idk_beta=0.1, convention=convention)
    beta, scale = (0.4, 1.0) if convention == "viker" else (0.1, 20.0)   # DPO's form | OpenUnlearning's 2/beta
    assert M.METHODS["idkpo"].beta_scale(spec) == (beta, pytest.approx(scale))
    loss, d = M.METHODS["idkpo"].combine(_out(idk=True), mb, spec, "cpu")
    margin = [beta * ((LL_IDK[i] - ref_idk[i]) - (LL[i] - ref_gt[i])) for i in range(2)]
    expected = [scale * math.log(1 + math.exp(-m)) for m in margin]
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    torch.testing.assert_close(d["forget/reward_margin"], torch.tensor(margin), atol=1e-5, rtol=0)


def test_viker_loss_by_hand_and_its_retain_terms():
    # test_losses.test_viker_loss_hand_value_and_flags, on one position: log Q(y) + lam * KL(R~ || Q~).
    logits = _logits_from_probs([[[0.1, 0.2, 0.3, 0.4]]])
    out = {"forget": (logits, torch.tensor([[3]]), torch.ones(1, 1))}
    refs = Refs(torch.tensor([[[3, 2]]]), torch.tensor([[[0.6, 0.3]]]), torch.tensor([[0.1]]), torch.zeros(1, 1))
    kl = 0.6 * math.log(0.6 / 0.4) + 0.3 * math.log(0.3 / 0.3) + 0.1 * math.log(0.1 / 0.3)
    viker = M.METHODS["viker"]
    loss, d = viker.combine(out, MicroBatch(["f0"]), M.LossSpec("viker", lam=0.5), "cpu", refs=refs)
    assert loss.item() == pytest.approx(math.log(0.4) + 0.5 * kl, abs=1e-6)
    assert not [k for k in d if k.startswith("retain/")]
    no_ga, _ = viker.combine(out, MicroBatch(["f0"]), M.LossSpec("viker", lam=0.5, use_ga=False), "cpu", refs=refs)
    assert no_ga.item() == pytest.approx(0.5 * kl, abs=1e-6)
    # ViKeR+KL, alpha 2: the KL alone; ViKeR+NLL, alpha 1 by default; plain ViKeR with alpha 0.5: NLL.
    retain = {**out, "retain": _out(retain=True)["retain"]}
    mb = MicroBatch(["f0"], retain=["r0", "r1"])
    cases = [(dict(retain_term="kl", retain_weight=2.0), 2.0 * KL_UNIFORM, "retain/kl"),
             (dict(retain_term="nll"), -GA_MEAN, "retain/nll"),
             (dict(retain_weight=0.5), -0.5 * GA_MEAN, "retain/nll")]
    for settings, term, key in cases:
        loss, d = viker.combine(retain, mb, M.LossSpec("viker", lam=0.5, **settings), "cpu", refs=refs,
                                vanilla=VANILLA)
        assert loss.item() == pytest.approx(math.log(0.4) + 0.5 * kl + term, abs=1e-6), settings
        assert [k for k in d if k.startswith("retain/")] == [key]


# ------------------------------------------------------------------ SimNPO and RMU


@pytest.mark.parametrize("convention", M.LOSS_CONVENTIONS)
@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_simnpo_loss_by_hand(convention, gamma):
    # viker: the authors' plain loss, beta 2.5, no retain term; mllmu and openunlearning: OpenUnlearning's,
    # 0.125 x the loss with beta 4.5, + 1 x NLL(retain) (the retain part is the forget part again: NLL = -GA).
    spec = M.loss_spec(TrainConfig(method="simnpo", convention=convention, simnpo_gamma=gamma), "simnpo", 5, 64, 0)
    beta, w, alpha = (2.5, 1.0, 0.0) if convention == "viker" else (4.5, 0.125, 1.0)
    assert M.METHODS["simnpo"].beta(spec) == beta and spec.simnpo_gamma == gamma
    loss, d = M.METHODS["simnpo"].combine(_out(retain=True), _batch(retain=True), spec, "cpu")
    nll = [-LL[0] / 2, -LL[1] / 1]                                        # per-token NLL: 2 and 1 answer tokens
    forget = [w * (2 / beta) * math.log(1 + math.exp(-beta * (x - gamma))) for x in nll]   # -(2/b) logsig(b (x-g))
    assert loss.item() == pytest.approx(sum(forget) / 2 - alpha * GA_MEAN, rel=1e-6)
    torch.testing.assert_close(d["forget/loss"], torch.tensor(forget), atol=1e-6, rtol=0)
    torch.testing.assert_close(d["forget/token_nll"], torch.tensor(nll), atol=1e-6, rtol=0)
    assert ("retain/nll" in d) == (alpha > 0)
    # train.beta overrides the convention's beta; train.retain_weight its alpha.
    user = M.LossSpec("simnpo", beta=1.0, retain_weight=2.0, convention=convention)
    assert M.METHODS["simnpo"].beta(user) == 1.0 and M.METHODS["simnpo"].retain_terms(user) == (("nll", 2.0),)


def test_simnpo_openunlearning_is_their_simnpo_by_their_code():
    """OpenUnlearning's SimNPO (locuslab/open-unlearning, configs/trainer/SimNPO.yaml: delta 0, beta 4.5, alpha 1,
    gamma 0.125, retain_loss_type NLL; src/trainer/unlearn/simnpo.py SimNPO.compute_loss), ported line for line
    (the logits here are already shifted), with a margin delta = train.simnpo_gamma of 0.2."""
    import torch.nn.functional as TF
    r_probs = [[[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]], [[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]]]
    r_labels = torch.tensor([[2, 3], [0, 1]])     # equal retain lengths: their outputs.loss = our mean of means
    out = {"forget": (_logits_from_probs(PROBS), LABELS, MASK),
           "retain": (_logits_from_probs(r_probs), r_labels, torch.ones(2, 2, dtype=torch.bool))}
    spec = M.loss_spec(TrainConfig(method="simnpo", convention="openunlearning", simnpo_gamma=0.2), "simnpo",
                       5, 64, 0)
    loss, _ = M.METHODS["simnpo"].combine(out, _batch(retain=True), spec, "cpu")
    delta, beta, alpha, gamma = 0.2, 4.5, 1.0, 0.125
    logits = _logits_from_probs(PROBS)
    loss_mask = LABELS != -100
    forget_loss = TF.cross_entropy(logits.transpose(-1, -2), LABELS, ignore_index=-100, reduction="none").sum(-1)
    forget_loss = forget_loss / loss_mask.sum(-1) - delta
    forget_loss = -TF.logsigmoid(beta * forget_loss).mean() * 2 / beta
    retain_loss = TF.cross_entropy(_logits_from_probs(r_probs).reshape(-1, 4), r_labels.reshape(-1))
    assert loss.item() == pytest.approx((gamma * forget_loss + alpha * retain_loss).item(), rel=1e-6)


def test_rmu_loss_by_hand():
    spec = M.loss_spec(TrainConfig(method="rmu", rmu_steering=3.0, seed=7), "rmu", 5, 64, 0)
    assert (spec.rmu_layer, spec.rmu_steering, spec.seed) == (-1, 3.0, 7)
    out = {"forget": (HIDDEN, LABELS, MASK), "retain": (HIDDEN, LABELS, MASK)}
    loss, d = M.METHODS["rmu"].combine(out, _batch(retain=True), spec, "cpu", vanilla=HIDDEN_VANILLA)
    u = torch.rand(4, generator=torch.Generator().manual_seed(7))
    cu = (3.0 * u / u.norm()).tolist()
    sq = [[sum((h - t) ** 2 for h, t in zip(tok, cu)) / 4 for tok in row] for row in HIDDEN.tolist()]
    forget = [(sq[0][0] + sq[0][1]) / 2, sq[1][0]]                       # row 1's second token is padding
    retain = [(0.25 + 0.0) / 2, 1.0]                                      # (1/4)||h - h_vanilla||^2 per token
    assert loss.item() == pytest.approx(sum(forget) / 2 + sum(retain) / 2, rel=1e-6)
    torch.testing.assert_close(d["forget/loss"], torch.tensor(forget), atol=1e-6, rtol=0)
    torch.testing.assert_close(d["retain/hidden"], torch.tensor(retain), atol=1e-6, rtol=0)
    assert not [k for k in d if k in ("retain/nll", "retain/kl")]


def _their_activation_loss(activation1, activation2, mask):
    """OpenUnlearning's RMU.compute_activation_loss (src/trainer/unlearn/rmu.py), ported line for line."""
    import torch.nn.functional as TF
    squared_diff = TF.mse_loss(activation1, activation2, reduction="none")
    expanded_mask = mask.unsqueeze(-1).expand_as(squared_diff)
    squared_diff_sum = (squared_diff * expanded_mask).mean(dim=2).sum(dim=(1))
    num_tokens = mask.sum(dim=-1, keepdim=True)
    return (squared_diff_sum / num_tokens).mean()


def test_rmu_is_their_rmu_by_their_code():
    """OpenUnlearning's RMU.compute_loss (configs/trainer/RMU.yaml: steering_coeff 2, alpha 1, gamma 1,
    retain_loss_type EMBED_DIFF) on full sequences masked by labels != -100; ours gathers the answer tokens."""
    g = torch.Generator().manual_seed(0)
    seq, prompt = torch.randn(2, 5, 4, generator=g), 3             # 3 prompt positions, then 2 answer tokens
    vanilla_seq = seq + 0.1 * torch.randn(2, 5, 4, generator=g)
    labels = torch.tensor([[-100] * 3 + [2, 3]] * 2)
    mask = torch.ones(2, 2, dtype=torch.bool)
    spec = M.loss_spec(TrainConfig(method="rmu", convention="openunlearning", seed=5), "rmu", 5, 64, 0)
    out = {"forget": (seq[:, prompt:], labels[:, prompt:], mask), "retain": (seq[:, prompt:], labels[:, prompt:], mask)}
    loss, _ = M.METHODS["rmu"].combine(out, _batch(retain=True), spec, "cpu", vanilla=vanilla_seq[:, prompt:])
    u = torch.rand(4, generator=torch.Generator().manual_seed(5))       # their torch.rand(1, 1, dim), seeded here
    control_vec = (u / torch.norm(u) * 2.0).view(1, 1, 4).expand_as(seq)
    theirs = (1.0 * _their_activation_loss(seq, control_vec, labels != -100)
              + 1.0 * _their_activation_loss(seq, vanilla_seq, labels != -100))
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-6)
    # With answers of different lengths their [b] / [b, 1] division broadcasts to [b, b]: mean_j(S_j) * mean_i(1/n_i)
    # (S_j: example j's summed per-token MSE) instead of mean_j(S_j / n_j), ours (docs/METHODS.md).
    short = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    target = control_vec[:, prompt:]
    sums = ((seq[:, prompt:] - target) ** 2).mean(-1).mul(short).sum(-1)
    assert _their_activation_loss(seq[:, prompt:], target, short).item() == pytest.approx(
        (sums.mean() * (1 / short.sum(-1).float()).mean()).item(), rel=1e-6)
    ours = M.METHODS["rmu"].forget_loss({"forget": (seq[:, prompt:], None, short)}, None, spec, None, "cpu")[0]
    assert ours.mean().item() == pytest.approx((sums / short.sum(-1)).mean().item(), rel=1e-6)
