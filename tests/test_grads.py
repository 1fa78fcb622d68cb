"""dkl_lib.grads against autograd, and the memory contract (no B×C×C tensor) of the losses."""
import pytest
import torch

import dkl_lib as dkl
from conftest import random_pair
from dkl_lib import grads
from dkl_lib.profiling import largest_tensor


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 12.0])
def test_analytic_kl_gradients_match_autograd(temperature):
    a, b = random_pair(5, 17, scale=4.0)
    ga, gb = torch.autograd.grad(dkl.kl_loss(a, b, temperature=temperature), (a, b))
    assert torch.allclose(grads.kl_grad_logits(a, b, temperature=temperature), ga, rtol=1e-12, atol=1e-15)
    assert torch.allclose(grads.kl_grad_target_logits(a, b, temperature=temperature), gb, rtol=1e-12,
                          atol=1e-15)


def test_term_grads_returns_zeros_for_unreached_inputs_and_sums_to_loss_grads():
    a, b = random_pair(3, 6)
    per_term = grads.term_grads("dkl", a, b, temperature=2.0)
    assert set(per_term) == {"wmse", "soft_ce"}
    assert torch.count_nonzero(per_term["wmse"][0]) == 0
    total = grads.loss_grads("dkl", a, b, temperature=2.0)
    ref = torch.autograd.grad(dkl.dkl_loss(a, b, temperature=2.0), (a, b))
    assert all(torch.allclose(x, y, rtol=1e-13, atol=1e-16) for x, y in zip(total, ref))
    assert a.grad is None and b.grad is None  # the caller's tensors are untouched


@pytest.mark.parametrize("classes,temperature", [(2, 0.5), (10, 1.0), (100, 4.0), (1000, 10.0)])
def test_check_kl_dkl_equivalence_is_at_rounding_level(classes, temperature):
    a, b = random_pair(4, classes, scale=5.0, grad=False)
    errors = grads.check_kl_dkl_equivalence(a, b, temperature=temperature)
    assert set(errors) == {"logits", "target_logits"}
    assert max(errors.values()) < 1e-12


def test_check_kl_dkl_equivalence_works_from_float32_input():
    a, b = random_pair(4, 10, dtype=torch.float32, grad=False)
    assert max(grads.check_kl_dkl_equivalence(a, b, temperature=2.0).values()) < 1e-12


def test_relative_error_detects_a_difference():
    x = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    assert grads.relative_error(x, x) == 0.0
    assert grads.relative_error(x * (1 + 1e-3), x) == pytest.approx(1e-3, rel=1e-6)


# ------------------------------------------------------------------- no B×C×C tensor, ever
def _largest(fn, batch=8, classes=256):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(batch, classes, generator=g).requires_grad_()
    b = torch.randn(batch, classes, generator=g).requires_grad_()
    y = torch.randint(0, classes, (batch,), generator=g)
    prior = torch.softmax(torch.randn(classes, classes, generator=g), 1)
    rec = largest_tensor(lambda: fn(a, b, y, prior))
    return rec.largest_numel, batch, classes


CALLS = {
    "kl": lambda a, b, y, p: dkl.kl_loss(a, b, temperature=4.0),
    "dkl": lambda a, b, y, p: dkl.dkl_loss(a, b, temperature=4.0),
    "ikl": lambda a, b, y, p: dkl.ikl_loss(a, b, temperature=4.0, weight_temperature=2.0),
    "ikl_gi": lambda a, b, y, p: dkl.ikl_loss(a, b, temperature=4.0, targets=y, class_prior=p),
    "gkl": lambda a, b, y, p: dkl.gkl_loss(a, b, temperature=4.0, gamma=0.5),
    "dkd": lambda a, b, y, p: dkl.dkd_loss(a, b, y, temperature=4.0),
    "wmse": lambda a, b, y, p: dkl.wmse(a, b),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_losses_never_build_a_b_by_c_by_c_tensor(name):
    largest, batch, classes = _largest(CALLS[name])
    # the class prior itself (C×C) is an input and may be indexed to (B, C); nothing is B×C×C
    assert largest <= max(batch * classes * 2, classes * classes), largest


def test_the_memory_probe_catches_the_pairwise_oracle():
    largest, batch, classes = _largest(lambda a, b, y, p: dkl.wmse_pairwise(a, b))
    assert largest >= batch * classes * classes
