"""Values and gradients of the losses against torch oracles and literal float64 formulas."""
import contextlib
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dkl_lib as dkl
from conftest import random_pair
from dkl_lib.grads import relative_error, term_grads


def kl_oracle(logits, target_logits, temperature):
    t = temperature
    return t * t * F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(target_logits / t, dim=1),
                            log_target=True, reduction="batchmean")


def grads_of(value, *inputs):
    return torch.autograd.grad(value, inputs, allow_unused=True, retain_graph=True)


# ------------------------------------------------------------------------------------------ KL
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 10.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_matches_torch_kl_div_value_and_gradient(temperature, dtype):
    a, b = random_pair(6, 13, dtype=dtype)
    ours = dkl.kl_loss(a, b, temperature=temperature)
    ref = kl_oracle(a, b, temperature)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert ours.dim() == 0
    assert torch.allclose(ours, ref.to(ours.dtype), rtol=tol, atol=tol)
    for g, r in zip(grads_of(ours, a, b), grads_of(ref, a, b)):
        assert torch.allclose(g, r, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- KL ≡ DKL theorem
@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 6), classes=st.integers(2, 1000), temperature=st.floats(0.25, 20.0),
       scale=st.floats(0.1, 20.0), seed=st.integers(0, 2**31 - 1))
def test_theorem_dkl_gradients_equal_kl_gradients_on_both_inputs(batch, classes, temperature, scale, seed):
    """|∇DKL − ∇KL| <= 1e-10 · max|∇KL| + the float64 rounding floor, on each input.

    The floor, 64 eps (T + max|o_m − o_n|) / B, is what any float64 computation of these gradients
    from probabilities carries: when s_m and s_n both saturate, the true gradients shrink to ~1e-9
    while probabilities near 1 keep an absolute error of ~1e-16, and KL's own autograd then misses
    the exact gradient by up to 1e-7 relative (test_dkl_gradients_match_exact_arithmetic compares
    with 50-digit arithmetic instead).
    """
    a, b = random_pair(batch, classes, scale=scale, generator=torch.Generator().manual_seed(seed))
    kl = grads_of(dkl.kl_loss(a, b, temperature=temperature), a, b)
    ours = grads_of(dkl.dkl_loss(a, b, temperature=temperature, alpha=1.0, beta=1.0), a, b)
    floor = 64 * torch.finfo(torch.float64).eps * (temperature + (b - a).abs().max().item()) / batch
    for mine, ref in zip(ours, kl):
        assert (mine - ref).abs().max().item() <= 1e-10 * ref.abs().max().item() + floor


@pytest.mark.parametrize("seed,scale,temperature", [(0, 3.0, 0.5), (2, 8.0, 0.5), (5, 2.0, 4.0), (9, 30.0, 1.0)])
def test_dkl_gradients_match_exact_arithmetic(seed, scale, temperature):
    """Per side, against the analytic KL gradient evaluated with 50 digits (mpmath).

    KL's own float64 autograd does not meet this bound when s_m is saturated (seen: 5e-10 of the
    target-side gradient at C = 2, T = 0.5).
    """
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    classes = 4
    a, b = random_pair(1, classes, scale=scale, generator=torch.Generator().manual_seed(seed))
    g_n, g_m = grads_of(dkl.dkl_loss(a, b, temperature=temperature), a, b)
    t = mp.mpf(temperature)
    o_n = [mp.mpf(float(v)) for v in a[0].detach()]
    o_m = [mp.mpf(float(v)) for v in b[0].detach()]
    z_m, z_n = sum(mp.exp(v / t) for v in o_m), sum(mp.exp(v / t) for v in o_n)
    s_m = [mp.exp(v / t) / z_m for v in o_m]
    s_n = [mp.exp(v / t) / z_n for v in o_n]
    d = [m - n for m, n in zip(o_m, o_n)]
    d_bar = sum(s * x for s, x in zip(s_m, d))
    exact_n = [t * (s_n[k] - s_m[k]) for k in range(classes)]
    exact_m = [s_m[k] * (d[k] - d_bar) for k in range(classes)]
    # logits side: T (s_n − s_m) is a difference of terms of size <= T, so it is exact to ~1e-16 T;
    # target side: exact to 1e-13 of its own (possibly tiny) largest entry
    for got, exact, scale in ((g_n, exact_n, t), (g_m, exact_m, max(abs(e) for e in exact_m))):
        assert max(abs(float(got[0, k]) - exact[k]) for k in range(classes)) <= 1e-13 * scale


def test_theorem_fails_when_weights_differ_from_one():
    """The property test above can fail: with alpha != 1 the target-side gradients differ."""
    a, b = random_pair(4, 10)
    kl = grads_of(dkl.kl_loss(a, b, temperature=2.0), a, b)
    off = grads_of(dkl.dkl_loss(a, b, temperature=2.0, alpha=0.5), a, b)
    assert relative_error(off[1], kl[1]) > 0.1


@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_each_term_carries_one_side_of_the_kl_gradient(temperature):
    a, b = random_pair(5, 9)
    kl_n, kl_m = grads_of(dkl.kl_loss(a, b, temperature=temperature), a, b)
    terms = term_grads("dkl", a, b, temperature=temperature)
    wmse_n, wmse_m = terms["wmse"]
    ce_n, ce_m = terms["soft_ce"]
    assert torch.count_nonzero(wmse_n) == 0  # stop-gradient on Δ(o_n)
    assert torch.count_nonzero(ce_m) == 0  # stop-gradient on s_m
    assert relative_error(wmse_m, kl_m) < 1e-12
    assert relative_error(ce_n, kl_n) < 1e-12


def test_ikl_breaks_the_asymmetry():
    a, b = random_pair(5, 9)
    wmse_n, wmse_m = term_grads("ikl", a, b, temperature=4.0)["wmse"]
    assert wmse_n.abs().max() > 1e-3
    assert torch.allclose(wmse_n, -wmse_m, rtol=0, atol=1e-14)
    # ... and the soft-label CE term is the same as DKL's
    assert torch.allclose(term_grads("ikl", a, b, temperature=4.0)["soft_ce"][0],
                          term_grads("dkl", a, b, temperature=4.0)["soft_ce"][0], atol=1e-15)


def test_frozen_teacher_makes_dkl_wmse_useless():
    a, _ = random_pair(3, 6)
    teacher = torch.randn(3, 6, dtype=torch.float64)  # no grad: a frozen teacher
    wmse_term = dkl.dkl_terms(a, teacher, temperature=4.0)["wmse"]
    g = grads_of(wmse_term, a)[0] if wmse_term.requires_grad else None
    assert g is None or torch.count_nonzero(g) == 0
    assert dkl.ikl_terms(a, teacher, temperature=4.0)["wmse"].requires_grad


# --------------------------------------------------------------------- closed form vs pairwise
def pairwise_case(kind, a, b, targets, prior):
    """(library wMSE value, literal pairwise wMSE value) for one weighting scheme."""
    if kind == "sample":
        return dkl.wmse(a, b, temperature=2.0), dkl.wmse_pairwise(a, b, temperature=2.0)
    if kind == "prior":
        w = prior[targets]
        return dkl.wmse(a, b, weights=w), dkl.wmse_pairwise(a, b, weights=w)
    if kind == "dkl_term":
        return (dkl.dkl_terms(a, b, temperature=2.0, beta=0.0)["wmse"],
                dkl.wmse_pairwise(a, b, temperature=2.0, detach_logits=True))
    if kind == "ikl_term":
        return (dkl.ikl_terms(a, b, temperature=2.0, alpha=1.0)["wmse"],
                dkl.wmse_pairwise(a, b, temperature=2.0))
    if kind == "ikl_weight_temperature":
        return (dkl.ikl_terms(a, b, temperature=2.0, weight_temperature=5.0)["wmse"],
                dkl.wmse_pairwise(a, b, temperature=5.0))
    if kind == "ikl_prior":
        return (dkl.ikl_terms(a, b, temperature=2.0, targets=targets, class_prior=prior)["wmse"],
                dkl.wmse_pairwise(a, b, weights=prior[targets]))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["sample", "prior", "dkl_term", "ikl_term", "ikl_weight_temperature",
                                  "ikl_prior"])
def test_closed_form_wmse_equals_pairwise_value_and_gradient(kind):
    g = torch.Generator().manual_seed(7)
    a, b = random_pair(6, 11, scale=4.0, generator=g)
    targets = torch.randint(0, 11, (6,), generator=g)
    prior = torch.softmax(torch.randn(11, 11, generator=g, dtype=torch.float64), dim=1)
    ours, ref = pairwise_case(kind, a, b, targets, prior)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    assert ours.item() > 0.1  # a non-trivial value
    for go, gr in zip(grads_of(ours, a, b), grads_of(ref, a, b)):
        go = torch.zeros_like(a) if go is None else go
        gr = torch.zeros_like(a) if gr is None else gr
        assert torch.allclose(go, gr, rtol=1e-10, atol=1e-12)


def test_wmse_closed_form_identity_per_row():
    """Σ_jk p_j p_k (d_j − d_k)² = 2 (Σp) Σ p (d − d̄)² for unnormalised p, in float64."""
    g = torch.Generator().manual_seed(3)
    p = torch.rand(7, generator=g, dtype=torch.float64) * 3
    d = torch.randn(7, generator=g, dtype=torch.float64)
    literal = sum(p[j] * p[k] * (d[j] - d[k]) ** 2 for j in range(7) for k in range(7))
    dbar = (p * d).sum() / p.sum()
    assert math.isclose(float(literal), float(2 * p.sum() * (p * (d - dbar) ** 2).sum()), rel_tol=1e-12)


def test_wmse_rows_with_all_zero_weights_add_zero_like_the_pairwise_sum():
    """Σ_jk p_j p_k (...)² is 0 for p = 0: the closed form must not turn d̄ = 0/0 into nan."""
    a, b = random_pair(3, 5)
    some = torch.rand(3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    some[1] = 0.0
    for weights in (some, torch.zeros(3, 5, dtype=torch.float64)):
        ours, ref = dkl.wmse(a, b, weights=weights), dkl.wmse_pairwise(a, b, weights=weights)
        assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-15)
        for go, gr in zip(grads_of(ours, a, b), grads_of(ref, a, b)):
            assert torch.allclose(go, gr, rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------- the decoupled losses' backward
def literal_decoupled(a, b, *, temperature, alpha, beta, p, stop_logits, norm=None):
    """Plain autograd, pairwise form, with explicit detach: the oracle of the analytic backward."""
    t = temperature
    student = a.detach() if stop_logits else a
    w = (p[:, :, None] * p[:, None, :]).detach()
    dm = b[:, :, None] - b[:, None, :]
    dn = student[:, :, None] - student[:, None, :]
    wmse_sum = (w * (dm - dn) ** 2).sum() / 4
    wmse_value = alpha * wmse_sum / (a.shape[0] if norm is None else norm)
    soft_ce = -beta * t * t * (torch.softmax(b / t, 1).detach() * torch.log_softmax(a / t, 1)).sum() / a.shape[0]
    return wmse_value + soft_ce


DECOUPLED_VARIANTS = ["dkl", "ikl", "ikl_gi", "ikl_tw", "gkl", "gkl_gi"]


def decoupled_case(loss, a, b, y, prior, *, t=3.0, alpha=0.7, beta=1.3, gamma=1.8):
    """(library value, literal_decoupled oracle value) of one decoupled variant on (a, b)."""
    kw = dict(temperature=t, alpha=alpha, beta=beta)
    s_m = torch.softmax(b.detach() / t, 1)
    if loss == "dkl":
        return dkl.dkl_loss(a, b, **kw), literal_decoupled(a, b, **kw, p=s_m, stop_logits=True)
    if loss == "ikl":
        return dkl.ikl_loss(a, b, **kw), literal_decoupled(a, b, **kw, p=s_m, stop_logits=False)
    if loss == "ikl_gi":
        return (dkl.ikl_loss(a, b, **kw, targets=y, class_prior=prior),
                literal_decoupled(a, b, **kw, p=prior[y], stop_logits=False))
    if loss == "ikl_tw":
        return (dkl.ikl_loss(a, b, **kw, weight_temperature=1.5),
                literal_decoupled(a, b, **kw, p=torch.softmax(b.detach() / 1.5, 1), stop_logits=False))
    if loss == "gkl":
        p = s_m**gamma
        return (dkl.gkl_loss(a, b, **kw, gamma=gamma),
                literal_decoupled(a, b, **kw, p=p, stop_logits=False, norm=(p.sum(1) ** 2).sum()))
    if loss == "gkl_gi":
        p = prior[y] ** gamma
        return (dkl.gkl_loss(a, b, **kw, gamma=gamma, targets=y, class_prior=prior),
                literal_decoupled(a, b, **kw, p=p, stop_logits=False, norm=(p.sum(1) ** 2).sum()))
    raise AssertionError(loss)


def decoupled_inputs(batch, classes, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = random_pair(batch, classes, scale=2.5, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    prior = torch.softmax(torch.randn(classes, classes, generator=g, dtype=torch.float64), dim=1)
    return a, b, y, prior


@pytest.mark.parametrize("loss", DECOUPLED_VARIANTS)
def test_analytic_backward_matches_literal_autograd(loss):
    a, b, y, prior = decoupled_inputs(5, 8, 11)
    ours, ref = decoupled_case(loss, a, b, y, prior)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    for go, gr in zip(grads_of(ours, a, b), grads_of(ref, a, b)):
        assert torch.allclose(go, gr, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("loss", DECOUPLED_VARIANTS)
def test_second_derivatives_match_literal_autograd(loss):
    """create_graph=True sees through the analytic backward: the Hessian over (logits,
    target_logits), all four blocks, is that of the literal float64 formula with its detaches."""
    a, b, y, prior = decoupled_inputs(3, 5, 12)
    hessian = torch.autograd.functional.hessian
    ours = hessian(lambda u, v: decoupled_case(loss, u, v, y, prior)[0], (a.detach(), b.detach()))
    ref = hessian(lambda u, v: decoupled_case(loss, u, v, y, prior)[1], (a.detach(), b.detach()))
    for row_ours, row_ref in zip(ours, ref):
        for block, expected in zip(row_ours, row_ref):
            assert torch.allclose(block, expected, rtol=1e-10, atol=1e-12)
    assert max(block.abs().max().item() for row in ref for block in row) > 0.01  # non-trivial


@pytest.mark.parametrize("loss", DECOUPLED_VARIANTS)
def test_gradgradcheck_on_logits(loss):
    """Double backward (also w.r.t. the incoming gradient) against finite differences of the
    backward; on `logits` none of the losses' weights depend on the input, so they must agree."""
    a, b, y, prior = decoupled_inputs(3, 4, 13)
    b = b.detach()
    assert torch.autograd.gradgradcheck(lambda u: decoupled_case(loss, u, b, y, prior)[0], (a,),
                                        eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("loss", DECOUPLED_VARIANTS)
def test_inputs_changed_in_place_after_the_loss(loss):
    """A first-order backward does not read the inputs again (it uses the factors of the forward), so
    changing them in place afterwards leaves the gradient as it was; a differentiated backward
    (create_graph=True) does read them, and refuses instead of differentiating changed values."""
    a, b, y, prior = decoupled_inputs(3, 5, 15)
    reference = torch.autograd.grad(decoupled_case(loss, a, b, y, prior)[0], a)[0]
    for changed in ("target", "logits"):
        x, t = a.detach().clone().requires_grad_(), b.detach().clone()
        x_used = x * 1.0                          # a non-leaf, as a model's output is
        value = decoupled_case(loss, x_used, t, y, prior)[0]
        (t if changed == "target" else x_used).add_(1.0)
        assert torch.equal(torch.autograd.grad(value, x)[0], reference)
        value = decoupled_case(loss, x * 1.0, t, y, prior)[0]
        t.add_(1.0)
        with pytest.raises(RuntimeError, match="modified in place"):
            torch.autograd.grad(value, x, create_graph=True)


def test_gkl_rescales_a_low_precision_prior_in_the_compute_dtype():
    """The scale-free GKL weights are computed in the wider dtype: a bfloat16 prior gives the value of
    the same prior converted to float32 first (the old order lost bf16 digits in the rescaling)."""
    a, b, y, prior = decoupled_inputs(4, 6, 16)
    a, b = a.float(), b.float()
    low = prior.to(torch.bfloat16)
    kw = dict(temperature=2.0, gamma=2.0, targets=y)
    assert torch.equal(dkl.gkl_loss(a, b, class_prior=low, **kw), dkl.gkl_loss(a, b, class_prior=low.float(), **kw))


# ------------------------------------------------------------------------------ gradcheck
def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_kl_both_inputs():
    a, b = random_pair(3, 5)
    _gradcheck(lambda x, y: dkl.kl_loss(x, y, temperature=2.0), a, b)


def test_gradcheck_dkd_both_inputs():
    a, b = random_pair(3, 5)
    y = torch.tensor([0, 4, 2])
    _gradcheck(lambda u, v: dkl.dkd_loss(u, v, y, temperature=2.0, alpha=1.0, beta=2.0), a, b)


@pytest.mark.parametrize("name", ["ikl", "gkl"])
@pytest.mark.parametrize("with_prior", [False, True])
def test_gradcheck_ikl_gkl_on_logits(name, with_prior):
    # On `logits` these losses have no stop-gradient, so autograd must match finite differences.
    # (On `target_logits` the detached weights make the gradient differ from the derivative of the
    # value on purpose; test_analytic_backward_matches_literal_autograd covers that side.)
    a, b = random_pair(3, 5)
    b = b.detach()
    kwargs = {}
    if with_prior:
        kwargs = dict(targets=torch.tensor([1, 0, 3]),
                      class_prior=torch.softmax(torch.randn(5, 5, dtype=torch.float64), 1))
    fn = dkl.losses.LOSS_TERMS[name]
    _gradcheck(lambda x: sum(fn(x, b, temperature=2.0, alpha=0.8, beta=1.2, **kwargs).values()), a)


def test_gradcheck_dkl_with_frozen_student_side_detached():
    # DKL's value depends on o_n through both terms, but only the CE term's dependence is a
    # gradient: gradcheck of the CE term alone on logits, and of the wMSE term on target_logits
    # with its weights supplied from a frozen copy.
    a, b = random_pair(3, 5)
    b0 = b.detach()
    _gradcheck(lambda x: dkl.dkl_terms(x, b0, temperature=2.0)["soft_ce"], a)
    w = torch.softmax(b0 / 2.0, 1)
    a0 = a.detach()
    _gradcheck(lambda y: dkl.wmse(a0, y, weights=w), b)


# ------------------------------------------------------------------------- GKL and DKD by hand
def test_gkl_hand_computed_small_case():
    o_n = [[1.0, -0.5, 0.25], [0.0, 2.0, -1.0]]
    o_m = [[0.5, 0.0, 1.5], [-1.0, 1.0, 0.5]]
    t, gamma, alpha, beta = 2.0, 0.5, 1.5, 0.75
    num = den = ce = 0.0
    for row_n, row_m in zip(o_n, o_m):
        z_m = sum(math.exp(v / t) for v in row_m)
        s_m = [math.exp(v / t) / z_m for v in row_m]
        z_n = sum(math.exp(v / t) for v in row_n)
        log_s_n = [v / t - math.log(z_n) for v in row_n]
        p = [s**gamma for s in s_m]
        for j in range(3):
            for k in range(3):
                w = p[j] * p[k]
                num += w * ((row_m[j] - row_m[k]) - (row_n[j] - row_n[k])) ** 2
                den += w
        ce -= sum(s * ls for s, ls in zip(s_m, log_s_n))
    expected = alpha / 4 * num / den + beta * t * t * ce / 2
    got = dkl.gkl_loss(torch.tensor(o_n, dtype=torch.float64), torch.tensor(o_m, dtype=torch.float64),
                       temperature=t, gamma=gamma, alpha=alpha, beta=beta)
    assert math.isclose(got.item(), expected, rel_tol=1e-12)


def test_gkl_with_gamma_one_equals_ikl():
    a, b = random_pair(4, 6)
    assert torch.allclose(dkl.gkl_loss(a, b, temperature=3.0, gamma=1.0), dkl.ikl_loss(a, b, temperature=3.0),
                          rtol=1e-12)


def gkl_case(kind):
    """float32 (logits, target_logits, gkl keyword arguments) whose weights p**gamma or Σw
    underflow float32 (all but "ordinary"), and the float64 p**gamma of the literal oracle."""
    g = torch.Generator().manual_seed(21)
    classes, t = 100, 2.0
    a, b = torch.randn(2, classes, generator=g), torch.zeros(2, classes)
    y = torch.tensor([3, 7])
    kw = dict(temperature=t, alpha=0.8, beta=1.2, gamma=30.0)
    if kind == "gamma":  # p = 1/100 everywhere: p**30 = 1e-60
        pass
    elif kind == "one_row_negligible":  # row 0 nearly one-hot: row 1 weighs (1/100)**30 of it
        b[0, 0] = 25.0
    elif kind == "prior_gamma":
        kw.update(targets=y, class_prior=torch.full((classes, classes), 0.01))
    elif kind == "tiny_prior":  # gamma = 1, but Σw = Σ_b (Σ_j p_j)² ~ 1e-80
        prior = torch.softmax(torch.randn(classes, classes, generator=g), 1) * 1e-40
        kw.update(gamma=1.0, targets=y, class_prior=prior)
    elif kind == "ordinary":
        b = torch.randn(2, classes, generator=g) * 3
        kw.update(gamma=1.8)
    elif kind == "ordinary_prior":  # GKL's setting in the presets: a prior of probabilities, gamma = 0.05
        b = torch.randn(2, classes, generator=g) * 3
        prior = torch.softmax(torch.randn(classes, classes, generator=g) * 2, 1)
        kw.update(gamma=0.05, targets=y, class_prior=prior)
    else:
        raise AssertionError(kind)
    if "class_prior" in kw:
        p = kw["class_prior"].double()[y] ** kw["gamma"]
    else:
        p = torch.softmax(b.double() / t, 1) ** kw["gamma"]
    return a, b, kw, p


@pytest.mark.parametrize("kind", ["gamma", "one_row_negligible", "prior_gamma", "tiny_prior", "ordinary",
                                  "ordinary_prior"])
def test_gkl_matches_float64_oracle_when_weights_underflow_float32(kind):
    a, b, kw, p = gkl_case(kind)
    a32, b32 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    ours = dkl.gkl_loss(a32, b32, **kw)
    ref = literal_decoupled(a64, b64, temperature=kw["temperature"], alpha=kw["alpha"], beta=kw["beta"], p=p,
                            stop_logits=False, norm=(p.sum(1) ** 2).sum())
    assert torch.isfinite(ref) and math.isclose(ours.item(), ref.item(), rel_tol=1e-5)
    got = torch.cat(grads_of(ours, a32, b32)).double()
    expected = torch.cat(grads_of(ref, a64, b64))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


def test_gkl_is_invariant_to_a_common_scale_of_the_prior_in_float64():
    """Σ_b (Σ_j p_j)² of a prior scaled by 1e-200 underflows float64; the ratio does not change."""
    a, b, y, prior = decoupled_inputs(4, 6, 14)
    kw = dict(temperature=2.0, gamma=1.5, targets=y)
    ours = dkl.gkl_loss(a, b, class_prior=prior * 1e-200, **kw)
    ref = dkl.gkl_loss(a, b, class_prior=prior, **kw)
    assert torch.allclose(ours, ref, rtol=1e-12)
    for go, gr in zip(grads_of(ours, a, b), grads_of(ref, a, b)):
        assert torch.allclose(go, gr, rtol=1e-10, atol=1e-14)


def test_dkd_hand_computed_small_case():
    o_n = [[1.0, -0.5, 0.25, 0.3], [0.0, 2.0, -1.0, 0.7]]
    o_m = [[0.5, 0.0, 1.5, -0.2], [-1.0, 1.0, 0.5, 2.0]]
    targets = [2, 1]
    t, alpha, beta = 2.0, 1.0, 8.0
    total = 0.0
    for row_n, row_m, y in zip(o_n, o_m, targets):
        probs = []
        for row in (row_n, row_m):
            e = [math.exp(v / t) for v in row]
            probs.append([v / sum(e) for v in e])
        p_n, p_m = probs
        b_n, b_m = [p_n[y], 1 - p_n[y]], [p_m[y], 1 - p_m[y]]
        tckd = sum(m * math.log(m / n) for m, n in zip(b_m, b_n))
        hat_n = [p_n[j] / (1 - p_n[y]) for j in range(4) if j != y]
        hat_m = [p_m[j] / (1 - p_m[y]) for j in range(4) if j != y]
        nckd = sum(m * math.log(m / n) for m, n in zip(hat_m, hat_n))
        total += t * t * (alpha * tckd + beta * nckd)
    got = dkl.dkd_loss(torch.tensor(o_n, dtype=torch.float64), torch.tensor(o_m, dtype=torch.float64),
                       torch.tensor(targets), temperature=t, alpha=alpha, beta=beta)
    assert math.isclose(got.item(), total / 2, rel_tol=1e-12)


def test_dkd_terms_are_named():
    a, b = random_pair(3, 5)
    terms = dkl.dkd_terms(a, b, torch.tensor([0, 1, 2]), temperature=4.0)
    assert set(terms) == {"tckd", "nckd"} and all(v.item() > 0 for v in terms.values())


# ----------------------------------------------------------------- precision, range, autocast
ALL = ["kl", "dkl", "ikl", "gkl", "dkd"]


def test_documented_default_hyper_parameters():
    """The defaults DESIGN and the docstrings state: T = 1 everywhere, α = β = 1 for the decoupled losses,
    γ = 1 for GKL, and DKD's α = 1, β = 8 (the DKD paper's CIFAR-100 β); a default changed in both a *_loss and
    its *_terms would pass every comparison of the two."""
    import inspect

    def defaults(fn):
        return {k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not v.empty}

    for fn in (dkl.kl_loss, dkl.kl_terms):
        assert defaults(fn)["temperature"] == 1.0
    for fn in (dkl.dkl_loss, dkl.dkl_terms, dkl.ikl_loss, dkl.ikl_terms, dkl.gkl_loss, dkl.gkl_terms):
        d = defaults(fn)
        assert (d["temperature"], d["alpha"], d["beta"]) == (1.0, 1.0, 1.0), fn.__name__
    for fn in (dkl.gkl_loss, dkl.gkl_terms):
        assert defaults(fn)["gamma"] == 1.0
    for fn in (dkl.dkd_loss, dkl.dkd_terms):
        d = defaults(fn)
        assert (d["temperature"], d["alpha"], d["beta"]) == (1.0, 1.0, 8.0), fn.__name__


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_low_precision_and_huge_logits_give_finite_values_and_gradients(name, dtype, scale):
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(8, 10, generator=g) * scale).to(dtype).requires_grad_()
    b = (torch.randn(8, 10, generator=g) * scale).to(dtype).requires_grad_()
    y = torch.randint(0, 10, (8,), generator=g)
    value = sum(dkl.loss_terms(name, a, b, targets=y, temperature=4.0).values())
    assert value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert a.grad.dtype == dtype
    if scale == 1.0:  # the half-precision result is the float32 result up to input rounding
        ref = sum(dkl.loss_terms(name, a.detach().float(), b.detach().float(), targets=y,
                                 temperature=4.0).values())
        assert torch.allclose(value, ref, rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("temperature", [1e-18, 1e15])
def test_extreme_temperatures_inside_the_float32_range_give_finite_values_and_gradients(name, temperature):
    """|logits| / T up to ~1e22 and T² up to 1e30 are accepted in float32 and stay finite
    (temperatures beyond the range raise: test_bad_input)."""
    g = torch.Generator().manual_seed(8)
    a = (torch.randn(8, 10, generator=g) * 1e4).requires_grad_()
    b = (torch.randn(8, 10, generator=g) * 1e4).requires_grad_()
    y = torch.randint(0, 10, (8,), generator=g)
    value = sum(dkl.loss_terms(name, a, b, targets=y, temperature=temperature).values())
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_float64_accepts_temperatures_that_overflow_float32():
    a, b = random_pair(3, 5, scale=1e4)
    for temperature in (1e-36, 1e20):
        ours = dkl.kl_loss(a, b, temperature=temperature)
        ref = kl_oracle(a, b, temperature)
        assert torch.isfinite(ref) and torch.allclose(ours, ref, rtol=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_autocast_computes_in_float32(name):
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    ref = sum(dkl.loss_terms(name, a, b, targets=y, temperature=2.0).values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = sum(dkl.loss_terms(name, a, b, targets=y, temperature=2.0).values())
    assert value.dtype == torch.float32
    assert torch.allclose(value, ref, rtol=1e-6)


def test_loss_terms_sum_to_the_loss():
    a, b = random_pair(4, 6)
    y = torch.tensor([0, 1, 2, 3])
    pairs = [
        (dkl.kl_loss(a, b, temperature=2.0), dkl.kl_terms(a, b, temperature=2.0)),
        (dkl.dkl_loss(a, b, temperature=2.0, alpha=2.0), dkl.dkl_terms(a, b, temperature=2.0, alpha=2.0)),
        (dkl.ikl_loss(a, b, temperature=2.0, beta=0.5), dkl.ikl_terms(a, b, temperature=2.0, beta=0.5)),
        (dkl.gkl_loss(a, b, gamma=2.0), dkl.gkl_terms(a, b, gamma=2.0)),
        (dkl.dkd_loss(a, b, y), dkl.dkd_terms(a, b, y)),
    ]
    for loss, terms in pairs:
        assert torch.allclose(loss, sum(terms.values()), rtol=1e-14)


def test_alpha_and_beta_scale_their_terms():
    a, b = random_pair(4, 6)
    base = dkl.ikl_terms(a, b, temperature=2.0)
    scaled = dkl.ikl_terms(a, b, temperature=2.0, alpha=3.0, beta=0.25)
    assert torch.allclose(scaled["wmse"], 3.0 * base["wmse"], rtol=1e-13)
    assert torch.allclose(scaled["soft_ce"], 0.25 * base["soft_ce"], rtol=1e-13)


# -------------------------------------------------------------- found by mutation testing
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("name", ["dkd", "ikl_gi", "gkl_gi"])
def test_any_integer_dtype_of_targets_gives_the_int64_result(name, dtype):
    """Targets are class indices whatever their integer dtype: int32 must not break DKD's gather, and
    uint8 must not be read as a boolean mask by class_prior[targets]."""
    a, b, y, prior = decoupled_inputs(5, 6, 17)
    y = torch.tensor([0, 5, 1, 1, 3])
    loss = name.split("_")[0]
    kw = dict(temperature=2.0, **(dict(class_prior=prior) if name.endswith("_gi") else {}))
    ref = sum(dkl.loss_terms(loss, a, b, targets=y, **kw).values())
    ours = sum(dkl.loss_terms(loss, a, b, targets=y.to(dtype), **kw).values())
    assert torch.equal(ours, ref)
    for go, gr in zip(grads_of(ours, a, b), grads_of(ref, a, b)):
        assert torch.equal(go, gr)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("wide", ["logits", "target_logits"])
def test_a_float64_input_makes_the_computation_float64(name, wide):
    """float32 logits with float64 target_logits (or the reverse) are computed in float64: the result
    is the all-float64 result, not a float32 one."""
    g = torch.Generator().manual_seed(18)
    a, b = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 6, 2, 3])
    mixed = (a, b.float()) if wide == "logits" else (a.float(), b)
    ref = sum(dkl.loss_terms(name, mixed[0].double(), mixed[1].double(), targets=y, temperature=2.0).values())
    ours = sum(dkl.loss_terms(name, *mixed, targets=y, temperature=2.0).values())
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, rtol=1e-15, atol=0)


@pytest.mark.parametrize("fn", [dkl.wmse, dkl.wmse_pairwise])
def test_wmse_weights_are_detached(fn):
    """w = S(p pᵀ): weights that require grad get no gradient, and the logits' gradients are those of
    the detached weights."""
    a, b = random_pair(3, 5)
    w = torch.rand(3, 5, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    ours = fn(a, b, weights=w.clone().requires_grad_())
    ref = fn(a, b, weights=w)
    assert ours.grad_fn is not None and torch.equal(ours, ref)
    leaf = w.clone().requires_grad_()
    value = fn(a, b, weights=leaf)
    assert torch.autograd.grad(value, leaf, allow_unused=True)[0] is None
    for go, gr in zip(grads_of(value, a, b), grads_of(ref, a, b)):
        assert torch.equal(go, gr)


def _extreme_pair(seed, temperature, fraction=0.2):
    """float32 logits with max |logits| / T = fraction · finfo.max (accepted: the limit is a quarter),
    and random target logits of the same scale."""
    fmax = torch.finfo(torch.float32).max
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5]).repeat(4, 1) * (fraction * fmax * temperature)
    b = torch.randn(4, 5, generator=g).clamp(-1, 1) * (fraction * fmax * temperature)
    return a, b, torch.randint(0, 5, (4,), generator=g)


@pytest.mark.parametrize("name", ["kl", "dkd"])
def test_rows_of_size_near_the_logit_limit_sum_without_overflow(name):
    """Each row of KL (or TCKD/NCKD) is at most ~max|o|/T, finite by the range check, but four rows of
    ~1e38 summed before the T² scale overflowed float32 to inf although the loss is ~1e8. Now the float32
    value and gradients are the float64 ones."""
    for seed in range(4):
        a, b, y = _extreme_pair(seed, 1e-15)
        a32, b32 = a.clone().requires_grad_(), b.clone().requires_grad_()
        a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
        ours = sum(dkl.loss_terms(name, a32, b32, targets=y, temperature=1e-15).values())
        ref = sum(dkl.loss_terms(name, a64, b64, targets=y, temperature=1e-15).values())
        assert torch.isfinite(ref) and ref.item() > 1e6
        assert math.isclose(ours.item(), ref.item(), rel_tol=1e-5)
        for got, want in zip(grads_of(ours, a32, b32), grads_of(ref, a64, b64)):
            assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("name", ALL)
def test_accepted_logits_at_a_tiny_temperature_give_a_finite_loss(name):
    """T = 1e-18, the smallest temperatures accepted, logits near the limit (~1e20): the unscaled sum over the
    batch overflowed to inf (and at T = 1e-30, refused now, times a T² of 0 it was nan for about one target
    draw in four). KL and DKD give a finite value; the decoupled losses' wMSE (the squared logit differences,
    ~1e40) often cannot be computed in float32, which they then say instead of returning inf or nan."""
    refused = 0
    for seed in range(12):
        a, b, y = _extreme_pair(seed, 1e-18)
        a, b = a.requires_grad_(), b.requires_grad_()
        try:
            value = sum(dkl.loss_terms(name, a, b, targets=y, temperature=1e-18).values())
        except ValueError as error:
            assert name in ("dkl", "ikl", "gkl") and "the wmse term overflows torch.float32" in str(error)
            refused += 1
            continue
        assert torch.isfinite(value), seed
        assert all(g is None or torch.isfinite(g).all() for g in grads_of(value, a, b)), seed
    assert refused < 12


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_a_temperature_whose_square_underflows_is_refused_and_the_smallest_accepted_is_exact(name, batch):
    """T² / B below float32's smallest normal number rounded the loss's scale to 0: every value, and KL's
    gradients, came out exactly 0 (the theorem failed: DKL's gradients were right). Such a T is refused, naming
    the smallest one that works; at that T the float32 values and gradients are the float64 ones."""
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(batch, 10, generator=g) * 1e4, torch.randn(batch, 10, generator=g) * 1e4
    y = torch.randint(0, 10, (batch,), generator=g)
    with pytest.raises(ValueError, match="temperature² / batch size underflows to 0") as refused:
        dkl.loss_terms(name, a, b, targets=y, temperature=1e-25)
    smallest = float(re.search(r"use a value >= (\S+)$", str(refused.value)).group(1))
    assert math.sqrt(torch.finfo(torch.float32).tiny * batch) <= smallest < 1e-18
    a32, b32 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    ours = dkl.loss_terms(name, a32, b32, targets=y, temperature=smallest)
    ref = dkl.loss_terms(name, a64, b64, targets=y, temperature=smallest)  # float64 accepts far smaller T
    assert sum(ref.values()).item() != 0
    for term, want in ref.items():  # every term, not only the sum (wMSE is 0 here: one-hot weights)
        assert math.isclose(ours[term].item(), want.item(), rel_tol=1e-4), (term, ours[term].item(), want.item())
    got, want = grads_of(sum(ours.values()), a32, b32), grads_of(sum(ref.values()), a64, b64)
    assert want[0].abs().max() > 0  # the student's: T (s_n - s_m) / B, one-hot rows that differ (the
    for g32, g64 in zip(got, want):  # teacher's is s_m ⊙ (d - Σ s_m d) / B, 0 for one-hot s_m)
        assert (g32 is None) == (g64 is None)
        if g64 is not None:
            assert torch.allclose(g32.double(), g64, rtol=1e-4, atol=1e-4 * g64.abs().max().item())


# ------------------------------------------------------ the official code's knobs (README, dkl_loss)
def _official_style(student, teacher, *, knob_alpha, knob_beta, temperature, weight_temperature,
                    prior_rows=None, gamma=None):
    """The official IKL/GKL loss written literally from its formula: BETA · ¼ Σ w (Δ(teacher) −
    Δ(student))² / N + ALPHA · soft-label CE without T²; w from the detached weights, N = B (IKL) or
    Σ w (GKL, ``gamma`` given). No stop-gradient on Δ(student)."""
    if prior_rows is None:
        p = torch.softmax(teacher.detach() / weight_temperature, dim=1)
    else:
        p = prior_rows
    if gamma is not None:
        p = p ** gamma
    w = p[:, :, None] * p[:, None, :]
    d_t = teacher[:, :, None] - teacher[:, None, :]
    d_s = student[:, :, None] - student[:, None, :]
    pair = 0.25 * (w * (d_t - d_s) ** 2).sum()
    pair = pair / (w.sum() if gamma is not None else student.shape[0])
    soft = -(torch.softmax(teacher / temperature, dim=1).detach()
             * torch.log_softmax(student / temperature, dim=1)).sum(1).mean()
    return knob_beta * pair + knob_alpha * soft


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_official_knobs_map_to_ikl_and_gkl_not_dkl(temperature):
    g = torch.Generator().manual_seed(11)
    student = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 7, (5,), generator=g)
    prior = torch.rand(7, 7, generator=g, dtype=torch.float64)
    prior = prior / prior.sum(1, keepdim=True)
    a, b, t2 = 1.3, 2.2, 3.0
    ours_hp = dict(alpha=b, beta=a / temperature**2, temperature=temperature)
    cases = [
        (_official_style(student, teacher, knob_alpha=a, knob_beta=b, temperature=temperature,
                         weight_temperature=t2),
         dkl.ikl_loss(student, teacher, weight_temperature=t2, **ours_hp)),
        (_official_style(student, teacher, knob_alpha=a, knob_beta=b, temperature=temperature,
                         weight_temperature=t2, prior_rows=prior[y]),
         dkl.ikl_loss(student, teacher, targets=y, class_prior=prior, **ours_hp)),
        (_official_style(student, teacher, knob_alpha=a, knob_beta=b, temperature=temperature,
                         weight_temperature=t2, prior_rows=prior[y], gamma=0.05),
         dkl.gkl_loss(student, teacher, targets=y, class_prior=prior, gamma=0.05, **ours_hp)),
    ]
    for official, ours in cases:
        assert torch.allclose(official, ours, rtol=1e-13)
        assert torch.allclose(*[torch.autograd.grad(v, student)[0] for v in (official, ours)],
                              rtol=1e-12, atol=1e-15)
    # the official dkl_loss is NOT our dkl_loss: its wMSE reaches the student, ours stops it there
    official = _official_style(student, teacher, knob_alpha=a, knob_beta=b, temperature=temperature,
                               weight_temperature=temperature)
    ours_dkl = dkl.dkl_loss(student, teacher, **ours_hp)
    assert torch.allclose(official, ours_dkl, rtol=1e-13)  # same value ...
    g_off, g_dkl = (torch.autograd.grad(v, student)[0] for v in (official, ours_dkl))
    assert (g_off - g_dkl).abs().max() > 1e-2  # ... different gradient on the student


def test_stop_gradient_sits_on_the_pulled_side():
    """KL(s_m ‖ s_n) ≡ DKL needs S on Δ(o_n): with S on Δ(o_m) instead, o_m would get no gradient."""
    a, b = random_pair(5, 7)
    t = 2.0
    kl = torch.autograd.grad(dkl.kl_loss(a, b, temperature=t), (a, b))
    s_m = torch.softmax(b / t, dim=1)
    w = (s_m[:, :, None] * s_m[:, None, :]).detach()
    delta = lambda o: o[:, :, None] - o[:, None, :]  # noqa: E731
    soft = -t * t * (s_m.detach() * torch.log_softmax(a / t, dim=1)).sum() / 5
    right = (w * (delta(b) - delta(a.detach())) ** 2).sum() / 20 + soft
    wrong = (w * (delta(b.detach()) - delta(a)) ** 2).sum() / 20 + soft
    g_right = torch.autograd.grad(right, (a, b), retain_graph=True)
    assert all(torch.allclose(x, y, rtol=1e-12, atol=1e-15) for x, y in zip(g_right, kl))
    g_wrong = torch.autograd.grad(wrong, (a, b), allow_unused=True)
    assert g_wrong[1] is None and (g_wrong[0] - kl[0]).abs().max() > 1e-3


def test_kl_is_tckd_plus_weighted_nckd_not_dkd_with_unit_weights():
    """Zhao et al. 2022, Eq. 5: KL = TCKD + (1 − p_t) NCKD per sample, so DKD(α = β = 1) ≠ KL."""
    a, b = random_pair(5, 7)
    y = torch.tensor([0, 3, 6, 2, 2])
    t = 2.0
    p_t = torch.softmax(b / t, dim=1)[torch.arange(5), y]
    for i in range(5):
        terms = dkl.dkd_terms(a[i:i + 1], b[i:i + 1], y[i:i + 1], temperature=t, alpha=1.0, beta=1.0)
        kl = dkl.kl_loss(a[i:i + 1], b[i:i + 1], temperature=t)
        assert torch.allclose(kl, terms["tckd"] + (1 - p_t[i]) * terms["nckd"], rtol=1e-12)
    assert (dkl.dkd_loss(a, b, y, temperature=t, alpha=1.0, beta=1.0) - dkl.kl_loss(a, b, temperature=t)).abs() > 1e-3


def _dkd_literal(logits, target_logits, targets, t, alpha, beta):
    """DKD (Zhao et al. 2022, Eq. 7) from explicit probabilities: b = (p_t, 1 − p_t), p̂ = the
    non-target p / (1 − p_t), KL as Σ q log(q / r); an oracle with none of dkd_terms' log-space steps."""
    total = 0.0
    for o_n, o_m, y in zip(logits, target_logits, targets.tolist()):
        p_n, p_m = torch.softmax(o_n / t, dim=0), torch.softmax(o_m / t, dim=0)
        keep = torch.arange(p_n.shape[0]) != y
        b_n, b_m = torch.stack([p_n[y], 1 - p_n[y]]), torch.stack([p_m[y], 1 - p_m[y]])
        hat_n, hat_m = p_n[keep] / (1 - p_n[y]), p_m[keep] / (1 - p_m[y])
        tckd = (b_m * torch.log(b_m / b_n)).sum()
        nckd = (hat_m * torch.log(hat_m / hat_n)).sum()
        total = total + t * t * (alpha * tckd + beta * nckd)
    return total / logits.shape[0]


@pytest.mark.parametrize("classes,temperature", [(2, 1.0), (3, 2.0), (7, 4.0), (30, 2.0)])
def test_dkd_value_and_gradients_on_both_inputs_match_the_literal_formula(classes, temperature):
    """The masked log-space DKD against explicit probabilities (float64, moderate logits): the
    value and the gradients of both inputs; every target position, including the first and last."""
    g = torch.Generator().manual_seed(classes)
    a, b = random_pair(2 * classes, classes, scale=2.0, generator=g)
    y = torch.arange(2 * classes) % classes
    ours = dkl.dkd_loss(a, b, y, temperature=temperature, alpha=1.5, beta=6.0)
    ref = _dkd_literal(a, b, y, temperature, 1.5, 6.0)
    assert math.isclose(ours.item(), ref.item(), rel_tol=1e-12)
    for mine, want in zip(grads_of(ours, a, b), grads_of(ref, a, b)):
        assert torch.allclose(mine, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dkd_saturated_teacher_gets_no_gradient_and_nothing_is_nan(dtype):
    """A teacher whose softmax is exactly one-hot (logits of 1e6 / 1e150) has a zero DKD gradient;
    its log p̂ differences are huge, and two autograd paths that rounded them differently once left
    an O(1) gradient. Student p_t → 0 and → 1 in the same batch: values and gradients finite."""
    big = 1e6 if dtype == torch.float32 else 1e150
    a, b = random_pair(6, 9, scale=big, dtype=dtype)
    y = torch.tensor([0, 3, 8, 2, 2, 5])
    for loss in (dkl.dkd_loss(a, b, y, temperature=4.0), dkl.dkd_loss(a, b, b.detach().argmax(1), temperature=1.0)):
        grad_a, grad_b = grads_of(loss, a, b)
        assert torch.isfinite(loss) and torch.isfinite(grad_a).all()
        assert torch.equal(grad_b, torch.zeros_like(grad_b))


class _HostReads(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in ("tolist", "item", "__bool__", "__float__", "__int__")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["dkl", "ikl", "gkl"])
def test_alpha_zero_switches_the_wmse_term_off_even_where_its_sum_would_overflow(name):
    """float32 logits of 3e19: the wMSE row sum overflows (an error for α > 0), but with α = 0 the term is
    0, not inf · 0 = nan, and the loss is the soft-label CE alone, as float64 computes it."""
    a = torch.tensor([[-3e19, 3e19, 0.0]], requires_grad=True)
    b = torch.tensor([[1e19, 1e19, 0.0]])
    with pytest.raises(ValueError, match="the wmse term overflows"):
        dkl.loss_terms(name, a, b, temperature=1.0, alpha=1.0)
    terms = dkl.loss_terms(name, a, b, temperature=1.0, alpha=0.0)
    ref = dkl.loss_terms(name, a.double(), b.double(), temperature=1.0, alpha=0.0)
    assert terms["wmse"].item() == 0.0 and ref["wmse"].item() == 0.0
    assert terms["soft_ce"].item() == pytest.approx(ref["soft_ce"].item(), rel=1e-6)
    grad, = torch.autograd.grad(sum(terms.values()), a)
    ref_grad, = torch.autograd.grad(sum(ref.values()), a)
    assert torch.allclose(grad, ref_grad, rtol=1e-6, atol=1e-12) and grad.abs().max() > 0.1


@pytest.mark.parametrize("name", ["dkd", "ikl_gi", "gkl_gi", "ikl", "dkl", "kl"])
def test_a_loss_call_reads_the_device_once(name):
    """Each read of a tensor value is a host-device sync (a stall of a launch-bound GPU step): the
    logits' range and the targets' range come back in one copy (a class prior is read once per
    version, here before the counted call)."""
    a, b, y, prior = decoupled_inputs(5, 6, 23)
    loss = name.split("_")[0]
    kw = dict(class_prior=prior) if name.endswith("_gi") else {}
    dkl.loss_terms(loss, a, b, targets=y, temperature=2.0, **kw)
    with _HostReads() as reads:
        dkl.loss_terms(loss, a, b, targets=y, temperature=2.0, **kw)
    assert reads.count == 1


@pytest.mark.parametrize("name", ["dkd", "ikl_gi", "ikl"])
def test_out_of_range_targets_report_their_exact_extremes(name):
    """The targets' range is read beside the logits' (in their float dtype); an index beyond 2**24
    is re-read exactly for the message, not rounded to the nearest float32."""
    a, b, y, prior = decoupled_inputs(4, 6, 24)
    a, b = a.float(), b.float()
    kw = dict(class_prior=prior.float()) if name.endswith("_gi") else {}
    bad = torch.tensor([0, 2, 2**40 + 1, 3])
    with pytest.raises(ValueError, match=r"targets out of range: the logits have 6 classes.*\[0, 5\], "
                                         r"got min 0, max 1099511627777"):
        dkl.loss_terms(name.split("_")[0], a, b, targets=bad, temperature=2.0, **kw)


# ------------------------------------------------------- DKD's analytic student gradient (frozen teacher)
def _dkd_both_paths(a, b, y, **hp):
    """DKD's terms with a frozen teacher (the analytic _DKD backward) and with a teacher that takes
    gradients (autograd through the same formula), on copies of ``a``."""
    frozen_s, free_s = a.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    frozen = dkl.dkd_terms(frozen_s, b.detach(), y, **hp)
    free = dkl.dkd_terms(free_s, b.detach().clone().requires_grad_(), y, **hp)
    assert type(frozen["tckd"].grad_fn).__name__ == "_DKDBackward"  # the path under test is taken
    assert type(free["tckd"].grad_fn).__name__ != "_DKDBackward"
    return (frozen_s, frozen), (free_s, free)


@pytest.mark.parametrize("classes,temperature", [(2, 1.0), (3, 2.0), (7, 4.0), (30, 2.0)])
def test_dkd_frozen_teacher_value_and_student_gradient_match_the_literal_formula(classes, temperature):
    """The analytic student gradient of DKD (the KD case: the teacher takes none) against explicit
    probabilities in float64, every target position; each term's own gradient against autograd."""
    g = torch.Generator().manual_seed(classes + 100)
    a, b = random_pair(2 * classes, classes, scale=2.0, generator=g)
    y = torch.arange(2 * classes) % classes
    (s, terms), (s_ref, ref_terms) = _dkd_both_paths(a, b, y, temperature=temperature, alpha=1.5, beta=6.0)
    ref = _dkd_literal(s_ref, b.detach(), y, temperature, 1.5, 6.0)
    ours = terms["tckd"] + terms["nckd"]
    assert math.isclose(ours.item(), ref.item(), rel_tol=1e-12)
    (mine,), (want,) = grads_of(ours, s), grads_of(ref, s_ref)
    assert torch.allclose(mine, want, rtol=1e-10, atol=1e-14) and want.abs().max() > 1e-3
    for name in ("tckd", "nckd"):  # one term's backward alone (the other's grad output is None)
        (mine,), (want,) = grads_of(terms[name], s), grads_of(ref_terms[name], s_ref)
        assert torch.allclose(mine, want, rtol=1e-10, atol=1e-14)
        assert want.abs().max() > 1e-4 or (name == "nckd" and classes == 2)  # one non-target class: NCKD = 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dkd_frozen_teacher_extreme_logits_give_autograds_gradient(dtype):
    """Saturated teacher and student (p_t -> 1 and -> 0 in one batch, logits of 1e6 / 1e150) and a
    near one-hot pair: the analytic student gradient is finite and equals autograd's."""
    big = 1e6 if dtype == torch.float32 else 1e150
    for scale in (big, 30.0):
        a, b = random_pair(6, 9, scale=scale, dtype=dtype)
        for y in (torch.tensor([0, 3, 8, 2, 2, 5]), b.detach().argmax(1), a.detach().argmax(1)):
            (s, terms), (s_ref, ref_terms) = _dkd_both_paths(a, b, y, temperature=4.0)
            for name in terms:
                assert torch.equal(terms[name], ref_terms[name])
            (mine,), (want,) = grads_of(sum(terms.values()), s), grads_of(sum(ref_terms.values()), s_ref)
            assert torch.isfinite(mine).all()
            tol = (1e-5 if dtype == torch.float32 else 1e-12) * max(want.abs().max().item(), 1e-30)
            assert (mine - want).abs().max() <= tol


def test_dkd_frozen_teacher_second_order_and_batched_backward():
    """create_graph=True through the analytic backward: Hessian-vector products equal those of
    autograd's path (and gradgradcheck holds); a backward with batched grad outputs (vmap over
    autograd.grad, is_grads_batched) equals the per-term gradients; an in-place change of the
    student logits before a differentiated backward is refused."""
    a, b, y, _ = decoupled_inputs(5, 7, 31)
    v = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (s, terms), (s_ref, ref_terms) = _dkd_both_paths(a, b, y, temperature=2.0, alpha=1.0, beta=3.0)
    (g,), (g_ref,) = [torch.autograd.grad(sum(t.values()), x, create_graph=True) for x, t in
                      ((s, terms), (s_ref, ref_terms))]
    (hv,), (hv_ref,) = [torch.autograd.grad((gx * v).sum(), x, retain_graph=True) for gx, x in ((g, s), (g_ref, s_ref))]
    assert torch.allclose(hv, hv_ref, rtol=1e-10, atol=1e-14) and hv_ref.abs().max() > 1e-3
    frozen_b = b.detach()
    assert torch.autograd.gradgradcheck(
        lambda x: dkl.dkd_loss(x, frozen_b, y, temperature=2.0, alpha=1.0, beta=3.0),
        (a.detach().clone().requires_grad_(),))
    stacked = torch.stack([terms["tckd"], terms["nckd"]])
    rows = torch.stack([torch.autograd.grad(ref_terms[k], s_ref, retain_graph=True)[0] for k in ("tckd", "nckd")])
    eye = torch.eye(2, dtype=torch.float64)
    (by_vmap,) = torch.func.vmap(lambda u: torch.autograd.grad(stacked, s, u, retain_graph=True))(eye)
    (batched,) = torch.autograd.grad(stacked, s, eye, retain_graph=True, is_grads_batched=True)
    for mine in (by_vmap, batched):
        assert torch.allclose(mine, rows, rtol=1e-12, atol=1e-15)
    x = a.detach().clone().requires_grad_()
    student = x * 1.0  # a non-leaf, changed in place after the loss
    loss = dkl.dkd_loss(student, frozen_b, y, temperature=2.0)
    with torch.no_grad():
        student.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(loss, x, create_graph=True)


def _aten_ops_of(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with _Ops() as ops:
        fn()
    return ops.names


@pytest.mark.parametrize("loss", ["ikl", "gkl"])
def test_a_prior_row_flushed_to_zero_by_the_cast_adds_nothing_and_no_nan(loss):
    """A float64 prior whose row is all 1e-50 is valid, but in float32 that row is all zeros: its
    samples' wMSE weight is then 0 (not 0/0). The value and gradient stay finite and match the
    float64 computation (where the row's weight is negligible); an exactly cast prior (float32
    with float32 logits) has no zero row, and the guard against one is not computed (GKL's neither:
    its rows of probabilities raised to gamma = 1 cannot underflow)."""
    a, b, y, base = decoupled_inputs(6, 5, 41)
    prior = base.clone()
    prior[2] = 1e-50
    y = torch.tensor([2, 0, 2, 4, 1, 3])
    kw = dict(temperature=2.0, targets=y, class_prior=prior, alpha=2.0)
    a32 = a.detach().float().requires_grad_()
    ours = sum(dkl.loss_terms(loss, a32, b.detach().float(), **kw).values())
    (g32,) = torch.autograd.grad(ours, a32)
    a64 = a.detach().clone().requires_grad_()
    ref = sum(dkl.loss_terms(loss, a64, b.detach(), **kw).values())
    (g64,) = torch.autograd.grad(ref, a64)
    assert torch.isfinite(ours) and torch.isfinite(g32).all()
    assert math.isclose(ours.item(), ref.item(), rel_tol=1e-5)
    assert (g32.double() - g64).abs().max() <= 1e-5 * g64.abs().max()
    guard = _aten_ops_of(lambda: dkl.loss_terms(loss, a32, b.detach().float(), **kw))
    exact = _aten_ops_of(lambda: dkl.loss_terms(loss, a32, b.detach().float(), **{**kw, "class_prior": base.float()}))
    assert "aten.masked_fill" in guard  # float64 -> float32 may empty a row: guarded
    assert "aten.masked_fill" not in exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_powers_safely_promises_only_weights_that_stay_normal(dtype):
    """Where GKL skips its rescaling, the smallest row maximum, cast to the compute dtype and raised to
    gamma, and its square are normal numbers; the promise is not vacuous (softmax rows of 100 classes
    at gamma 0.05 and 1.8 are safe in float32, gamma 30 only in float64) and refuses what it cannot bound."""
    from dkl_lib.losses import _powers_safely

    tiny = torch.finfo(dtype).tiny
    safe = []
    for low in (0.5, 1e-2, 1e-8, 1e-15, 1e-16, 1e-19, 1e-20, 1e-40, 1e-50, 1e-150, 1e-160, 1e-200):
        for gamma in (0.05, 0.5, 1.0, 1.8, 4.0, 30.0):
            if _powers_safely(low, 1.0, gamma, dtype):
                safe.append((low, gamma))
                row_max = torch.tensor(low, dtype=torch.float64).to(dtype) ** gamma
                assert row_max >= tiny and row_max * row_max >= tiny, (low, gamma)
    assert {(1e-2, 0.05), (1e-2, 1.8), (1e-2, 4.0)} <= set(safe)
    if dtype == torch.float32:
        assert (1e-2, 30.0) not in safe and (1e-20, 1.0) not in safe and (1e-50, 0.05) not in safe
    else:
        assert {(1e-2, 30.0), (1e-50, 1.0)} <= set(safe)
        assert (1e-160, 1.0) not in safe and (1e-200, 0.05) not in safe
    for low, high in ((0.0, 1.0), (0.5, 2.0), (0.6, 0.5), (math.nan, 1.0)):
        assert not _powers_safely(low, high, 1.0, dtype)


@pytest.mark.parametrize("kind", ["gamma", "prior_gamma", "tiny_prior", "ordinary", "ordinary_prior"])
def test_gkl_rescales_and_guards_only_weights_that_could_underflow(kind):
    """GKL divides p by its largest entry (amax) and guards against empty rows (masked_fill) only where
    p**gamma or Σw could underflow: not for softmax weights or a prior of probabilities at moderate gamma."""
    a, b, kw, _ = gkl_case(kind)
    dkl.gkl_loss(a, b, **kw)  # the prior's first check (its bounds are read once, with reductions of their own)
    ops = _aten_ops_of(lambda: dkl.gkl_loss(a.clone().requires_grad_(), b, **kw).backward())
    underflows = kind in ("gamma", "prior_gamma", "tiny_prior")
    assert ("aten.amax" in ops) == underflows and ("aten.masked_fill" in ops) == underflows


@pytest.mark.parametrize("path", ["analytic", "autograd"])
@pytest.mark.parametrize("loss", ["ikl", "gkl"])
def test_a_prior_that_takes_gradients_gets_none_and_changes_nothing(loss, path):
    """w = p pᵀ is detached also when the prior itself takes gradients (a prior computed by a model,
    say): the prior gets no gradient, the value and the student's gradient are those of the detached
    prior; in the autograd.Function and in the plain-autograd path (here: inside a forward-AD level)."""
    import torch.autograd.forward_ad as fwAD

    a, b, y, prior = decoupled_inputs(5, 6, 51)
    source = prior.clone().requires_grad_()
    learned = source * 1.0  # a non-leaf prior in a graph
    kw = dict(temperature=2.0, targets=y, gamma=0.5) if loss == "gkl" else dict(temperature=2.0, targets=y)
    a1, a2 = a.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    with fwAD.dual_level() if path == "autograd" else contextlib.nullcontext():
        with_graph = sum(dkl.loss_terms(loss, a1, b.detach(), class_prior=learned, **kw).values())
        plain = sum(dkl.loss_terms(loss, a2, b.detach(), class_prior=prior, **kw).values())
    with_graph.backward()
    plain.backward()
    assert source.grad is None and torch.allclose(with_graph, plain, rtol=1e-14, atol=0)
    assert torch.allclose(a1.grad, a2.grad, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ found by mutation testing (session 14)
@pytest.mark.parametrize("case", ["weight_temperature", "class_prior", "gkl_gamma"])
def test_centred_differences_keep_their_digits_when_the_weights_do_not_sum_to_one(case):
    """The corrected two-pass mean of _centered was tested only for weights summing to 1 (softmax at the
    loss's own T); IKL with T_w != T, a class prior, or GKL's γ take the general branch (mass != 1).
    Without the correction, the float32 target-side wMSE gradient at the heaviest class lost two thirds
    of its digits (relative error 2.3e-2 against 1.5e-7). Oracle: the gradient of the wMSE,
    α/2 · P · w_k (d_k − d̄) / B with d̄ computed as Σ_j w_j (d_k − d_j) / P in float64, no cancellation."""
    o_m = torch.tensor([[14.0, 0.0, -1.0, 1.0]])
    o_n = torch.tensor([[-30.0, 20.0, 5.0, 1.0]])
    a, b = o_n.clone().requires_grad_(), o_m.clone().requires_grad_()
    if case == "weight_temperature":
        terms = dkl.ikl_terms(a, b, temperature=4.0, weight_temperature=1.0)
        w = torch.softmax(o_m.double() / 1.0, dim=1)[0]
    elif case == "class_prior":
        prior = torch.full((4, 4), 1e-4).fill_diagonal_(1.0)
        prior = prior / prior.sum(dim=1, keepdim=True)
        terms = dkl.ikl_terms(a, b, temperature=4.0, targets=torch.tensor([0]), class_prior=prior)
        w = prior[0].double()
    else:
        terms = dkl.gkl_terms(a, b, temperature=4.0, weight_temperature=1.0, gamma=0.5)
        w = None
    terms["wmse"].backward()
    d = (o_m - o_n).double()[0]
    if w is None:  # GKL: the weights are p**γ rescaled; the oracle takes them from a float64 autograd pass
        a64, b64 = o_n.double().requires_grad_(), o_m.double().requires_grad_()
        dkl.gkl_terms(a64, b64, temperature=4.0, weight_temperature=1.0, gamma=0.5)["wmse"].backward()
        oracle = b64.grad[0]
    else:
        P = w.sum()
        dev = torch.stack([(w * (d[k] - d)).sum() / P for k in range(4)])
        oracle = P * w * dev  # wMSE = Σ_jk w_j w_k (Δ_jk)² / 4 per sample (α = 1, B = 1): ∂/∂o_m = P w (d − d̄)
    rel = ((b.grad.double()[0] - oracle).abs() / oracle.abs()).max().item()
    assert rel < 1e-5, (b.grad[0].tolist(), oracle.tolist())
