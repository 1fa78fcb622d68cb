"""The losses under ``torch.func`` transforms (grad, hessian, jvp, vmap of per-sample gradients),
against ordinary autograd through the analytic backward, in float64.

Inside a transform the decoupled losses run as plain autograd with the stop-gradients as
``detach`` (an autograd.Function of their form cannot enter functorch); outside, the analytic
backward runs. Both must give the same derivatives, first and second order.
"""
import math

import pytest
import torch

import dkl_lib as dkl
from dkl_lib._checks import tracing, transforming

BATCH, CLASSES = 4, 6


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(BATCH, CLASSES, dtype=torch.float64, generator=gen) * 2
    target_logits = torch.randn(BATCH, CLASSES, dtype=torch.float64, generator=gen) * 2
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    prior = torch.rand(CLASSES, CLASSES, dtype=torch.float64, generator=gen)
    return logits, target_logits, labels, prior / prior.sum(dim=1, keepdim=True)


LOSSES = {
    "kl": ("kl", {}),
    "dkl": ("dkl", {"alpha": 2.0, "beta": 0.5}),
    "ikl": ("ikl", {"weight_temperature": 2.0}),
    "ikl-gi": ("ikl", {"prior": True}),
    "gkl": ("gkl", {"gamma": 0.5}),
    "gkl-gi": ("gkl", {"gamma": 2.0, "prior": True}),
    "dkd": ("dkd", {}),
}


def loss_fn(case, prior):
    name, settings = LOSSES[case]
    settings = dict(settings)
    if settings.pop("prior", False):
        settings["class_prior"] = prior

    def fn(logits, target_logits, labels):
        return sum(dkl.loss_terms(name, logits, target_logits, targets=labels, temperature=3.0,
                                  **settings).values())
    return fn


def autograd_grads(fn, logits, target_logits, labels):
    a, b = logits.clone().requires_grad_(), target_logits.clone().requires_grad_()
    return torch.autograd.grad(fn(a, b, labels), (a, b))


@pytest.mark.parametrize("case", sorted(LOSSES))
def test_func_grad_on_both_inputs_equals_the_analytic_backward(case):
    logits, target_logits, labels, prior = data()
    fn = loss_fn(case, prior)
    mine = torch.func.grad(fn, argnums=(0, 1))(logits, target_logits, labels)
    ref = autograd_grads(fn, logits, target_logits, labels)
    for m, r in zip(mine, ref):
        assert torch.allclose(m, r, rtol=1e-12, atol=1e-15)
    assert ref[0].abs().max() > 1e-3  # a real gradient, not two zeros


@pytest.mark.parametrize("case", sorted(LOSSES))
def test_func_hessian_equals_autograd_double_backward_of_the_analytic_backward(case):
    """hessian = jacfwd(jacrev): forward mode over reverse mode, against create_graph=True through
    the analytic backward (its own second-order path); on the student side and across sides."""
    logits, target_logits, labels, prior = data(1)
    fn = loss_fn(case, prior)
    mine = torch.func.hessian(fn, argnums=0)(logits, target_logits, labels)
    ref = torch.autograd.functional.hessian(lambda a: fn(a, target_logits, labels), logits)
    assert torch.allclose(mine, ref, rtol=1e-10, atol=1e-14)
    assert ref.abs().max() > 1e-3
    cross = torch.func.jacrev(torch.func.grad(fn, argnums=1), argnums=0)(logits, target_logits, labels)
    b = target_logits.clone().requires_grad_()
    a = logits.clone().requires_grad_()
    grad_b, = torch.autograd.grad(fn(a, b, labels), b, create_graph=True)
    rows = [torch.autograd.grad(g, a, retain_graph=True, allow_unused=True)[0] if g.requires_grad else None
            for g in grad_b.flatten()]  # None: no path from a (DKL's stop-gradient on Δ(o_n))
    ref_cross = torch.stack([torch.zeros_like(a) if r is None else r for r in rows]).reshape(*grad_b.shape, *a.shape)
    assert torch.allclose(cross, ref_cross, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("case", sorted(LOSSES))
def test_func_jvp_is_the_gradient_along_the_direction(case):
    logits, target_logits, labels, prior = data(2)
    fn = loss_fn(case, prior)
    gen = torch.Generator().manual_seed(3)
    dirs = (torch.randn(BATCH, CLASSES, dtype=torch.float64, generator=gen),
            torch.randn(BATCH, CLASSES, dtype=torch.float64, generator=gen))
    value, slope = torch.func.jvp(lambda a, b: fn(a, b, labels), (logits, target_logits), dirs)
    grads = autograd_grads(fn, logits, target_logits, labels)
    assert torch.allclose(value, fn(logits, target_logits, labels), rtol=1e-14, atol=0)
    assert torch.allclose(slope, sum((g * d).sum() for g, d in zip(grads, dirs)), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("case", sorted(LOSSES))
def test_vmap_per_sample_gradients_equal_one_backward_per_sample(case):
    logits, target_logits, labels, prior = data(4)
    fn = loss_fn(case, prior)
    per_sample = torch.func.vmap(torch.func.grad(lambda a, b, y: fn(a[None], b[None], y[None]), argnums=(0, 1)))(
        logits, target_logits, labels)
    for i in range(BATCH):
        ref = autograd_grads(fn, logits[i:i + 1], target_logits[i:i + 1], labels[i:i + 1])
        for m, r in zip(per_sample, ref):
            assert torch.allclose(m[i], r[0], rtol=1e-12, atol=1e-15)
    if not case.startswith("gkl"):  # a batch mean: row i's gradient is sample i's / B (GKL divides by Σw)
        batch = autograd_grads(fn, logits, target_logits, labels)
        assert torch.allclose(per_sample[0] / BATCH, batch[0], rtol=1e-12, atol=1e-15)


def test_the_theorem_and_the_asymmetry_hold_under_func_grad():
    """grad DKL = grad KL on both inputs; with the teacher side fixed, DKL's wMSE gives the
    student nothing and IKL's gives it a gradient."""
    logits, target_logits, _, _ = data(5)
    kl = torch.func.grad(lambda a, b: dkl.kl_loss(a, b, temperature=2.0), argnums=(0, 1))(logits, target_logits)
    dkl_grads = torch.func.grad(lambda a, b: dkl.dkl_loss(a, b, temperature=2.0), argnums=(0, 1))(
        logits, target_logits)
    for m, r in zip(dkl_grads, kl):
        assert torch.allclose(m, r, rtol=1e-12, atol=1e-15)
    for name, moves in (("dkl", False), ("ikl", True)):
        wmse_grad = torch.func.grad(lambda a: dkl.loss_terms(name, a, target_logits, temperature=2.0)["wmse"])(logits)
        assert (wmse_grad.abs().max() > 1e-3) == moves, name


def test_inside_transforms_value_checks_are_skipped_and_static_checks_raise():
    logits, target_logits, labels, _ = data(6)
    bad = logits.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        dkl.ikl_loss(bad, target_logits)
    assert torch.isnan(torch.func.grad(lambda a: dkl.ikl_loss(a, target_logits))(bad)).any()
    with pytest.raises(ValueError, match="same shape"):
        torch.func.grad(lambda a: dkl.ikl_loss(a, target_logits[:, :-1]))(logits)
    with pytest.raises(TypeError, match="integer class indices"):
        torch.func.grad(lambda a: dkl.dkd_loss(a, target_logits, labels.double()))(logits)


def test_tracing_and_transforming_tell_eager_from_func_and_compile():
    seen = {}

    def probe(x):
        seen["tracing"], seen["transforming"] = tracing(), transforming()
        return (x * x).sum()

    probe(torch.ones(2))
    assert seen == {"tracing": False, "transforming": False}
    torch.func.grad(probe)(torch.ones(2))
    assert seen == {"tracing": True, "transforming": True}
    torch.func.vmap(probe)(torch.ones(2, 2))
    assert seen == {"tracing": True, "transforming": True}


@pytest.mark.parametrize("case", ["dkl", "ikl", "ikl-gi", "gkl"])
def test_batched_backward_of_an_eager_loss_vmap_over_vjps_and_is_grads_batched(case):
    """The loss computed eagerly (the analytic backward), its backward run batched: torch.func.vmap
    over autograd.grad (rows of a Jacobian), autograd.grad(is_grads_batched=True) and
    autograd.functional.jacobian(vectorize=True). The backward must not write a batched grad output
    into an unbatched tensor in place."""
    logits, target_logits, labels, prior = data(7)
    name, settings = LOSSES[case]
    settings = dict(settings)
    if settings.pop("prior", False):
        settings["class_prior"] = prior
    a, b = logits.clone().requires_grad_(), target_logits.clone().requires_grad_()
    terms = torch.stack(list(dkl.loss_terms(name, a, b, targets=labels, temperature=3.0, **settings).values()))
    rows = [torch.autograd.grad(terms[i], (a, b), retain_graph=True, allow_unused=True) for i in range(2)]
    ref = [torch.stack([torch.zeros_like(x) if r[k] is None else r[k] for r in rows]) for k, x in enumerate((a, b))]
    eye = torch.eye(2, dtype=torch.float64)
    by_vmap = torch.func.vmap(lambda v: torch.autograd.grad(terms, (a, b), v, retain_graph=True))(eye)
    batched = torch.autograd.grad(terms, (a, b), eye, retain_graph=True, is_grads_batched=True)
    jac = torch.autograd.functional.jacobian(
        lambda x, t: torch.stack(list(dkl.loss_terms(name, x, t, targets=labels, temperature=3.0,
                                                     **settings).values())), (logits, target_logits), vectorize=True)
    for mine in (by_vmap, batched, jac):
        for m, r in zip(mine, ref):
            assert torch.allclose(m, r, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("case", sorted(LOSSES))
def test_forward_mode_ad_outside_torch_func_gives_the_directional_derivative(case):
    """torch.autograd.forward_ad (dual tensors): the decoupled losses' autograd.Function has no jvp,
    so there they run the plain-autograd path as inside torch.func; the value checks still run (on
    the primal values)."""
    import torch.autograd.forward_ad as fwAD

    logits, target_logits, labels, prior = data(7)
    fn = loss_fn(case, prior)
    gen = torch.Generator().manual_seed(8)
    dirs = [torch.randn(BATCH, CLASSES, dtype=torch.float64, generator=gen) for _ in range(2)]
    with fwAD.dual_level():
        value = fn(fwAD.make_dual(logits, dirs[0]), fwAD.make_dual(target_logits, dirs[1]), labels)
        slope = fwAD.unpack_dual(value).tangent
    grads = autograd_grads(fn, logits, target_logits, labels)
    assert torch.allclose(slope, sum((g * d).sum() for g, d in zip(grads, dirs)), rtol=1e-12, atol=1e-15)
    bad = logits.clone()
    bad[0, 0] = math.nan
    with fwAD.dual_level(), pytest.raises(ValueError, match="non-finite"):
        fn(fwAD.make_dual(bad, dirs[0]), target_logits, labels)
