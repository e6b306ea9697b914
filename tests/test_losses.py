"""Loss tests: hand-computed values, the ViKeR gradient identity, edge cases."""
import math

import numpy as np
import pytest
import torch

from pipeline.stage2 import losses as L

D64 = torch.float64


def _logits_from_probs(rows):
    """Logits whose softmax is exactly the given (normalised) rows."""
    return torch.log(torch.tensor(rows, dtype=D64))


# Two examples; softmax rows are known by construction (each row sums to 10).
# example 0: tokens predict y=2 (Q=0.3), y=3 (Q=0.4)
# example 1: token predicts y=0 (Q=0.1), then a padded position (label -100).
PROBS = [
    [[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]],
    [[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]],
]
LABELS = torch.tensor([[2, 3], [0, -100]])
MASK = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)


def test_token_and_sequence_logprobs_hand_values():
    logits = _logits_from_probs(PROBS)
    lp = L.token_logprobs(logits, LABELS.clamp_min(0))
    expected = torch.tensor([[math.log(0.3), math.log(0.4)], [math.log(0.1), math.log(0.7)]])
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, expected, atol=1e-6, rtol=0)
    ll = L.sequence_logprob(logits, LABELS, MASK)
    torch.testing.assert_close(ll, torch.tensor([math.log(0.3) + math.log(0.4), math.log(0.1)]), atol=1e-6, rtol=0)


def test_ga_and_nll_hand_values_with_padding():
    logits = _logits_from_probs(PROBS)
    ga, diag = L.ga_loss(logits, LABELS, MASK)
    expected = torch.tensor([(math.log(0.3) + math.log(0.4)) / 2, math.log(0.1)])
    torch.testing.assert_close(ga, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(diag["forget_nll"], -expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(diag["forget_prob"], torch.tensor([0.35, 0.1]), atol=1e-6, rtol=0)
    assert not diag["forget_nll"].requires_grad

    nll, ndiag = L.nll_loss(logits, LABELS, MASK)
    torch.testing.assert_close(nll, -expected, atol=1e-6, rtol=0)
    assert set(ndiag) == {"nll"}

    # The padded position must not matter, whatever its logits.
    poisoned = logits.clone()
    poisoned[1, 1] = torch.tensor([50.0, -50.0, 3.0, 0.0])
    torch.testing.assert_close(L.ga_loss(poisoned, LABELS, MASK)[0], ga)
    # Even a -inf log-prob there (label -100 gathers index 0) must not give NaN.
    poisoned[1, 1, 0] = -math.inf
    torch.testing.assert_close(L.ga_loss(poisoned, LABELS, MASK)[0], ga)
    torch.testing.assert_close(L.nll_loss(poisoned, LABELS, MASK)[0], nll)


def test_all_padding_example_gives_zero_not_nan():
    logits = torch.zeros(1, 2, 4)
    loss, _ = L.ga_loss(logits, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))
    assert loss.item() == 0.0


def _reference_no_tail(T, V, K, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, T, V, generator=g, dtype=D64)
    idx = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(T)]).unsqueeze(0)
    prob = torch.rand(1, T, K, generator=g, dtype=D64) + 0.1
    prob = prob / prob.sum(-1, keepdim=True)
    labels = torch.randint(0, V, (1, T), generator=g)
    return logits, idx, prob, labels


@pytest.mark.parametrize("lam", [0.05, 0.5])
@pytest.mark.parametrize("T", [1, 3])
def test_viker_gradient_identity(lam, T):
    V, K = 6, 3
    logits, idx, prob, labels = _reference_no_tail(T, V, K, seed=T)
    logits.requires_grad_(True)
    mask = torch.ones(1, T)
    loss, _ = L.viker_loss(logits, labels, mask, idx, prob, torch.zeros(1, T), lam=lam, kind="kl")
    (grad,) = torch.autograd.grad(loss.sum(), logits)

    q = torch.softmax(logits.detach(), -1)
    r_full = torch.zeros(1, T, V, dtype=D64).scatter(-1, idx, prob)
    e_y = torch.nn.functional.one_hot(labels, V).to(D64)
    expected = (e_y - (1 - lam) * q - lam * r_full) / T
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=0)


def test_viker_gradient_zero_on_padded_token():
    V, K = 6, 3
    logits, idx, prob, labels = _reference_no_tail(3, V, K, seed=7)
    logits.requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = L.viker_loss(logits, labels, mask, idx, prob, torch.zeros(1, 3), lam=0.5)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.all(grad[0, 2] == 0)
    q = torch.softmax(logits.detach(), -1)
    r_full = torch.zeros(1, 3, V, dtype=D64).scatter(-1, idx, prob)
    e_y = torch.nn.functional.one_hot(labels, V).to(D64)
    expected = (e_y - 0.5 * q - 0.5 * r_full) / 2
    torch.testing.assert_close(grad[0, :2], expected[0, :2], atol=1e-6, rtol=0)


def _full_kl(r, q):
    return float(np.sum(np.where(r > 0, r * np.log(np.where(r > 0, r, 1.0) / q), 0.0)))


def test_truncated_kl_exact_without_tail_and_lower_bound_with_tail():
    V, K = 20, 5
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        logits = torch.randn(1, 1, V, generator=g, dtype=D64) * 2
        q = torch.softmax(logits, -1)[0, 0].numpy()

        # R supported on K indices: truncation is exact.
        idx = torch.randperm(V, generator=g)[:K]
        p = torch.rand(K, generator=g, dtype=D64) + 0.05
        p = p / p.sum()
        r_full = np.zeros(V)
        r_full[idx.numpy()] = p.numpy()
        r = L.reference_buckets(p.view(1, 1, K), torch.zeros(1, 1))
        d = L.bucket_divergence(r, L.bucket_probs(logits, idx.view(1, 1, K)), "kl")
        assert d.item() == pytest.approx(_full_kl(r_full, q), abs=1e-5)

        # R with mass everywhere: the K+1 bucket KL is a lower bound.
        r_full = torch.softmax(torch.randn(V, generator=g, dtype=D64) * 2, -1).numpy()
        top = np.argsort(-r_full)[:K].copy()
        top_p = torch.tensor(r_full[top])
        r = L.reference_buckets(top_p.view(1, 1, K), (1 - top_p.sum()).view(1, 1))
        d = L.bucket_divergence(r, L.bucket_probs(logits, torch.tensor(top).view(1, 1, K)), "kl").item()
        full = _full_kl(r_full, q)
        assert d <= full + 1e-6
        assert d < full - 1e-4, f"trial {trial}: bound unexpectedly tight"


def test_bucket_probs_values_and_tail_without_floor():
    logits = _logits_from_probs([[[0.1, 0.2, 0.3, 0.4]]])
    qb = L.bucket_probs(logits, torch.tensor([[[3, 0]]]))
    assert qb.dtype == torch.float32 and qb.shape == (1, 1, 3)
    torch.testing.assert_close(qb, torch.tensor([[[0.4, 0.1, 0.5]]]), atol=1e-6, rtol=0)
    # All the mass on the top-K: the tail is exactly 0 (no floor), not negative.
    qb = L.bucket_probs(logits, torch.tensor([[[0, 1, 2, 3]]]))
    assert qb[0, 0, -1].item() == 0.0
    # An explicit floor is still available.
    qb = L.bucket_probs(logits, torch.tensor([[[0, 1, 2, 3]]]), eps=1e-6)
    assert qb[0, 0, -1].item() == pytest.approx(1e-6, rel=1e-3)


def _tail64(logits, idx):
    """Q's tail mass outside idx, in float64 (the reference)."""
    q = torch.softmax(logits.double(), -1)
    return 1.0 - q.gather(-1, idx).sum(-1)


def test_tail_precision_float32_against_float64():
    # Realistic case: the top-K hold ~all the mass, the tail is ~1e-4.
    V, K = 4000, 32
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1, V, generator=g, dtype=D64) * 1.5
    idx = torch.argsort(logits, -1, descending=True)[..., :K]
    boost = torch.zeros_like(logits).scatter(-1, idx, 9.0)
    logits = logits + boost
    ref = _tail64(logits, idx)
    assert 1e-5 < ref.min().item() and ref.max().item() < 1e-2
    tail = L.bucket_probs(logits.float(), idx)[..., -1].double()
    old = (1.0 - torch.softmax(logits.float(), -1).gather(-1, idx).sum(-1)).double()
    rel_new = ((tail - ref).abs() / ref).max().item()
    rel_old = ((old - ref).abs() / ref).max().item()
    assert rel_new < 5e-6, rel_new
    assert rel_old > 10 * rel_new     # what the 1 - sum form lost


def test_saturated_tail_kl_and_gradient_match_float64():
    # GA saturates the logits: Q's tail falls far below the old 1e-6 floor.
    V, K = 50, 3
    logits = torch.zeros(1, 1, V, dtype=D64)
    logits[0, 0, :K] = torch.tensor([60.0, 58.0, 55.0])
    idx = torch.arange(K).view(1, 1, K)
    tail_r = 0.2
    prob = torch.tensor([[[0.5, 0.2, 0.1]]])
    labels, mask = torch.tensor([[0]]), torch.ones(1, 1)

    # float64 reference of the bucket KL, from the full distribution.
    logp = torch.log_softmax(logits, -1)[0, 0]
    log_tail = torch.logsumexp(logp[K:], 0)
    r = torch.tensor([0.5, 0.2, 0.1, tail_r], dtype=D64)
    log_q = torch.cat([logp[:K], log_tail.view(1)])
    kl_ref = float((r * (r.log() - log_q)).sum())
    assert log_tail.exp().item() < 1e-20        # saturated: the old floor was 14 orders above

    x = logits.float().clone().requires_grad_(True)
    _, diag = L.viker_loss(x, labels, mask, idx, prob, torch.tensor([[tail_r]]), lam=1.0, use_ga=False)
    assert diag["divergence"].item() == pytest.approx(kl_ref, rel=1e-5)
    loss, _ = L.viker_loss(x, labels, mask, idx, prob, torch.tensor([[tail_r]]), lam=1.0, use_ga=False)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    # d KL / d z = Q - R (on the full vocabulary, R's tail spread like Q's): the tail entries keep
    # a gradient -tail_r * Q_v / Q_tail, which a floor would have zeroed.
    x64 = logits.clone().requires_grad_(True)
    lp = torch.log_softmax(x64, -1)[0, 0]
    lq = torch.cat([lp[:K], torch.logsumexp(lp[K:], 0).view(1)])
    (r * (r.log() - lq)).sum().backward()
    torch.testing.assert_close(grad.double(), x64.grad, atol=1e-6, rtol=1e-4)
    assert grad[0, 0, K:].abs().sum().item() == pytest.approx(tail_r, rel=1e-4)


def test_reference_buckets_kept_as_stored():
    prob = torch.tensor([[[0.5, 0.3]]], dtype=torch.float16)
    r = L.reference_buckets(prob, torch.tensor([[-1e-4]]))
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, torch.tensor([[[0.5, 0.3, 0.0]]]), atol=1e-3, rtol=0)
    r = L.reference_buckets(prob, torch.tensor([[0.25]]))
    # Not renormalised: the stored sum 1.05 stays.
    assert r.sum().item() == pytest.approx(1.05, abs=1e-3)


def _np_kl(p, q):
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def test_jsd_matches_direct_computation_symmetric_and_bounded():
    r = [0.5, 0.3, 0.2, 0.0]
    q = [0.1, 0.1, 0.3, 0.5]
    m = [(a + b) / 2 for a, b in zip(r, q)]
    expected = 0.5 * _np_kl(r, m) + 0.5 * _np_kl(q, m)
    rt, qt = torch.tensor([r]), torch.tensor([q])
    assert L.bucket_divergence(rt, qt, "jsd").item() == pytest.approx(expected, abs=1e-6)
    assert L.bucket_divergence(qt, rt, "jsd").item() == pytest.approx(expected, abs=1e-6)
    disjoint = L.bucket_divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), "jsd")
    assert disjoint.item() == pytest.approx(math.log(2), abs=1e-6)
    g = torch.Generator().manual_seed(1)
    a = torch.softmax(torch.randn(50, 8, generator=g) * 3, -1)
    b = torch.softmax(torch.randn(50, 8, generator=g) * 3, -1)
    jab, jba = L.bucket_divergence(a, b, "jsd"), L.bucket_divergence(b, a, "jsd")
    torch.testing.assert_close(jab, jba, atol=1e-6, rtol=0)
    assert torch.all(jab >= -1e-7) and torch.all(jab <= math.log(2) + 1e-6)


def test_kl_bucket_divergence_direct():
    r, q = [0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.3, 0.5]
    d = L.bucket_divergence(torch.tensor([r]), torch.tensor([q]), "kl")
    assert d.item() == pytest.approx(_np_kl(r, q), abs=1e-6)


def test_cosine_divergence_direct():
    d = L.bucket_divergence(torch.tensor([[0.6, 0.8]]), torch.tensor([[0.8, 0.6]]), "cos")
    assert d.item() == pytest.approx(1 - 0.96, abs=1e-6)
    r, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.2, 0.6])
    expected = 1 - r @ q / (np.linalg.norm(r) * np.linalg.norm(q))
    d = L.bucket_divergence(torch.tensor(r), torch.tensor(q), "cos")
    assert d.item() == pytest.approx(expected, abs=1e-6)
    same = L.bucket_divergence(torch.tensor(r[None]), torch.tensor(r[None]), "cos")
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_unknown_kind_raises():
    r = torch.tensor([[0.5, 0.5]])
    with pytest.raises(ValueError, match="kl, jsd, cos"):
        L.bucket_divergence(r, r, "l2")
    with pytest.raises(ValueError, match="allowed"):
        L.viker_loss(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1),
                     torch.zeros(1, 1, 2, dtype=torch.long), torch.zeros(1, 1, 2), torch.ones(1, 1),
                     lam=0.5, kind="hellinger")


def test_viker_loss_hand_value_and_flags():
    # Q = (0.1, 0.2, 0.3, 0.4); y = 3; R~ on indices (3, 2) = (0.6, 0.3), tail 0.1.
    logits = _logits_from_probs([[[0.1, 0.2, 0.3, 0.4]]])
    labels, mask = torch.tensor([[3]]), torch.ones(1, 1)
    idx, prob, tail = torch.tensor([[[3, 2]]]), torch.tensor([[[0.6, 0.3]]]), torch.tensor([[0.1]])
    kl = 0.6 * math.log(0.6 / 0.4) + 0.3 * math.log(0.3 / 0.3) + 0.1 * math.log(0.1 / 0.3)
    lam = 0.5
    loss, diag = L.viker_loss(logits, labels, mask, idx, prob, tail, lam=lam)
    assert loss.item() == pytest.approx(math.log(0.4) + lam * kl, abs=1e-6)
    assert diag["forget_logprob"].item() == pytest.approx(math.log(0.4), abs=1e-6)
    assert diag["answer_prob"].item() == pytest.approx(0.4, abs=1e-6)
    assert diag["divergence"].item() == pytest.approx(kl, abs=1e-6)
    assert diag["reg"].item() == pytest.approx(lam * kl, abs=1e-6)
    assert diag["q_tail_mass"].item() == pytest.approx(0.3, abs=1e-6)

    no_ga, _ = L.viker_loss(logits, labels, mask, idx, prob, tail, lam=lam, use_ga=False)
    assert no_ga.item() == pytest.approx(lam * kl, abs=1e-6)

    # token_lambda overrides lam per token.
    tl, _ = L.viker_loss(logits, labels, mask, idx, prob, tail, lam=99.0, token_lambda=torch.tensor([[0.2]]))
    assert tl.item() == pytest.approx(math.log(0.4) + 0.2 * kl, abs=1e-6)


def test_npo_hand_values():
    loss, diag = L.npo_loss(torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -5.0]), beta=0.4)
    # -(2/b) logsigmoid(-b x) = (2/b) log(1 + exp(b x))
    expected = [5.0 * math.log(1 + math.exp(0.4)), 5.0 * math.log(2)]
    torch.testing.assert_close(loss, torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(diag["log_ratio"], torch.tensor([1.0, 0.0]))
    # OpenUnlearning's beta 0.1 (configs/trainer/NPO.yaml): 2/b = 20; log ratio 1 -> 20 log(1 + e^0.1).
    loss, _ = L.npo_loss(torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -5.0]), beta=0.1)
    torch.testing.assert_close(loss, torch.tensor([20.0 * math.log(1 + math.exp(0.1)), 20.0 * math.log(2)]),
                               atol=1e-5, rtol=0)


def test_idkpo_hand_values():
    loss, diag = L.idkpo_loss(
        torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), beta=0.1
    )
    chosen, rejected = 0.1 * 2.0, 0.1 * -1.0
    margin = chosen - rejected
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-margin)), abs=1e-6)
    assert diag["chosen_rewards"].item() == pytest.approx(chosen, abs=1e-6)
    assert diag["rejected_rewards"].item() == pytest.approx(rejected, abs=1e-6)
    assert diag["reward_margin"].item() == pytest.approx(margin, abs=1e-6)
    assert diag["reward_accuracy"].item() == 1.0


def test_kl_retain_loss():
    g = torch.Generator().manual_seed(3)
    cur = torch.randn(2, 3, 5, generator=g, dtype=D64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    same, diag = L.kl_retain_loss(cur, cur.clone(), mask)
    torch.testing.assert_close(same, torch.zeros(2), atol=1e-6, rtol=0)
    assert "retain_kl" in diag

    ref = torch.randn(2, 3, 5, generator=g, dtype=D64)
    kl, _ = L.kl_retain_loss(cur, ref, mask)
    assert torch.all(kl > 1e-3)
    p, q = torch.softmax(ref, -1).numpy(), torch.softmax(cur, -1).numpy()
    tok = [[_np_kl(p[b, t], q[b, t]) for t in range(3)] for b in range(2)]
    expected = torch.tensor([sum(tok[0]) / 3, tok[1][0]])
    torch.testing.assert_close(kl, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", L.DIVERGENCES)
def test_no_nan_with_padding_bf16_and_saturated_logits(kind):
    B, T, V, K = 2, 3, 16, 4
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(torch.bfloat16)
    # Saturated position: float32 softmax underflows to 0 on R's candidates.
    logits[0, 1] = -200.0
    logits[0, 1, 0] = 200.0
    logits.requires_grad_(True)
    idx = torch.randint(1, V, (B, T, K), generator=g)
    prob = torch.full((B, T, K), 0.2, dtype=torch.float16)
    tail = torch.full((B, T), 0.2)
    mask = torch.ones(B, T)
    # Padding as the collate writes it: zeros probs, tail 1, index 0, label -100.
    mask[1, 1:] = 0
    prob[1, 1:] = 0
    tail[1, 1:] = 1
    idx[1, 1:] = 0
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 1:] = -100
    loss, diag = L.viker_loss(logits, labels, mask, idx, prob, tail, lam=0.5, kind=kind)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(v).all() for v in diag.values())
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(grad.float()).all()
    assert torch.all(grad[1, 1:] == 0)


def test_entropy_token_lambda():
    entropy = torch.tensor([[0.0, 2 * math.log(2), 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    lam_t = L.entropy_token_lambda(entropy, mask, lam=0.5, scale=2.0)
    torch.testing.assert_close(lam_t, torch.tensor([[0.5, 0.25, 0.0]]), atol=1e-7, rtol=0)
    with pytest.raises(ValueError):
        L.entropy_token_lambda(entropy, mask, lam=0.5, scale=0.0)


# ------------------------------------------------------- baseline conventions (methods.LOSS_CONVENTIONS)

def test_npo_per_token_convention_by_hand():
    from pipeline.stage2.losses import npo_loss, per_token
    mask = torch.tensor([[1, 1, 1, 0]])
    ll_cur, ll_ref = torch.tensor([-6.0]), torch.tensor([-3.0])
    # mllmu: per-token means -2 and -1, log ratio -1: -(2/0.4) * log(sigmoid(0.4))
    loss, d = npo_loss(per_token(ll_cur, mask), per_token(ll_ref, mask), 0.4)
    assert loss.item() == pytest.approx(-5.0 * math.log(1 / (1 + math.exp(-0.4))), rel=1e-6)
    assert d["log_ratio"].item() == pytest.approx(-1.0)
    # viker / openunlearning: summed, log ratio -3: three times the argument of the sigmoid
    summed, _ = npo_loss(ll_cur, ll_ref, 0.4)
    assert summed.item() == pytest.approx(-5.0 * math.log(1 / (1 + math.exp(-1.2))), rel=1e-6)


def test_idkpo_scaled_form_by_hand():
    # OpenUnlearning's form: beta = idk_beta (0.1), scale 2/beta (which convention uses it: methods/idkpo.py,
    # tests/test_methods.py).
    from pipeline.stage2.losses import idkpo_loss
    beta, scale = 0.1, 2.0 / 0.1
    # margin = 0.1 * ((-2 - -4) - (-5 - -3)) = 0.4
    loss, d = idkpo_loss(torch.tensor([-2.0]), torch.tensor([-4.0]), torch.tensor([-5.0]), torch.tensor([-3.0]),
                         beta, scale=scale)
    assert d["reward_margin"].item() == pytest.approx(0.4)
    assert loss.item() == pytest.approx(-20.0 * math.log(1 / (1 + math.exp(-0.4))), rel=1e-6)


def test_simnpo_hand_values_and_gradient():
    lbar = torch.tensor([-0.5, -2.0], dtype=D64, requires_grad=True)
    loss, d = L.simnpo_loss(lbar, beta=2.5, gamma=0.3)
    # -(2/b) logsigmoid(b (nll - g)) = (2/b) log(1 + exp(-b (nll - g))), nll = -lbar
    expected = [0.8 * math.log(1 + math.exp(-2.5 * (0.5 - 0.3))), 0.8 * math.log(1 + math.exp(-2.5 * (2.0 - 0.3)))]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)
    torch.testing.assert_close(d["token_nll"], torch.tensor([0.5, 2.0]))
    # d/d lbar = 2 sigmoid(-b (nll - g)): positive (minimising lowers lbar), fading once nll passes the margin.
    loss.sum().backward()
    want = [2 / (1 + math.exp(2.5 * (0.5 - 0.3))), 2 / (1 + math.exp(2.5 * (2.0 - 0.3)))]
    torch.testing.assert_close(lbar.grad, torch.tensor(want, dtype=D64), atol=1e-6, rtol=0)
    # As beta -> 0 with no margin it is gradient ascent on lbar: gradient 1.
    tiny = torch.tensor([-0.7], requires_grad=True)
    L.simnpo_loss(tiny, beta=1e-4)[0].sum().backward()
    assert tiny.grad.item() == pytest.approx(1.0, abs=1e-4)


def test_steering_target_is_a_seeded_vector_of_norm_c():
    t = L.steering_target(64, 6.5, seed=3)
    assert t.shape == (64,) and t.dtype == torch.float32
    assert t.norm().item() == pytest.approx(6.5, rel=1e-6) and (t >= 0).all()     # uniform [0, 1) direction
    torch.testing.assert_close(t, L.steering_target(64, 6.5, seed=3), rtol=0, atol=0)
    assert not torch.allclose(t, L.steering_target(64, 6.5, seed=4))
    u = torch.rand(64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(t, 6.5 * u / u.norm())


def test_hidden_distance_hand_values_and_gradient():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [5.0, 5.0]]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    target = torch.tensor([0.0, 1.0])
    dist = L.hidden_distance(hidden, target, mask)
    # per token (1/D) ||h - t||^2: row 0: (1 + 1)/2 = 1, (9 + 9)/2 = 9 -> mean 5; row 1: (0 + 1)/2 = 0.5 (padding out)
    torch.testing.assert_close(dist, torch.tensor([5.0, 0.5]))
    dist.sum().backward()
    # d/dh = 2 (h - t) / D / tokens; 0 at the padded token
    torch.testing.assert_close(hidden.grad, torch.tensor([[[0.5, 0.5], [1.5, 1.5]], [[0.0, -1.0], [0.0, 0.0]]]))
    loss, d = L.rmu_forget_loss(hidden.detach(), mask, target)
    torch.testing.assert_close(loss, dist.detach())
    torch.testing.assert_close(d["hidden_norm"], torch.tensor([(5 ** 0.5 + 5.0) / 2, 0.0]))


def test_rmu_retain_loss_is_zero_at_the_vanilla_and_sends_no_gradient_to_it():
    g = torch.Generator().manual_seed(1)
    vanilla = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    same, d = L.rmu_retain_loss(vanilla.detach().clone(), vanilla, mask)
    torch.testing.assert_close(same, torch.zeros(2))
    torch.testing.assert_close(d["retain_hidden"], torch.zeros(2))
    moved = (vanilla.detach() + 1.0).requires_grad_()
    value, _ = L.rmu_retain_loss(moved, vanilla, mask)
    torch.testing.assert_close(value, torch.ones(2))          # every coordinate 1 apart: (1/D) * D = 1
    value.sum().backward()
    assert vanilla.grad is None and moved.grad is not None
