r"""KL, DKL, IKL, GKL and DKD losses on pairs of logit tensors.

Notation: a batch has B rows and C classes.

* ``logits``        = o_n, shape (B, C): the side pulled toward a target (student in knowledge
  distillation, adversarial output in adversarial training);
* ``target_logits`` = o_m, shape (B, C): the target side (teacher, natural output);
* T = ``temperature``; s_m = softmax(o_m / T), s_n = softmax(o_n / T); Δ(o)_jk = o_j − o_k;
  S(·) = stop-gradient.

Argument order follows PyTorch's (input, target): ``loss(logits, target_logits, ...)``. Every loss
returns a scalar batch mean, computes internally in float32 or wider (also for float16/bfloat16
inputs and under autocast), uses log-softmax (never log of softmax), and raises ``ValueError`` or
``TypeError`` with a message naming the problem for bad input, including a temperature whose 1/T
or T² (times the weight of the T²-scaled term), or logits / T, would overflow the compute dtype, or
whose T² / B would underflow it (to 0, which would make the loss 0: float32 needs T >= about
1.1e-19 · sqrt(B); the message names the smallest T).
The decoupled losses, and DKD for a teacher that takes no gradient, have an analytic backward that is
itself differentiable (second derivatives under ``create_graph``).

Precision: at large temperatures KL(s_m ‖ s_n) is O(1/T²) while its two log-probabilities are O(1),
so in float32 the T²-scaled value loses relative digits as T grows, as ``F.kl_div``'s does (for
B = 64, C = 100 and random logits of scale 3: 6e-5 at T = 100, 2e-3 at T = 1000, and more for flatter
logits); pass float64 logits for such temperatures.

Performance contract: every weighted MSE here uses the closed form for rank-one weights
w = p pᵀ, d = o_m − o_n (per row)::

    Σ_jk p_j p_k (d_j − d_k)² = 2 (Σ_j p_j) Σ_j p_j (d_j − d̄)²,   d̄ = Σ_j p_j d_j / Σ_j p_j,

so it costs O(B·C) time and memory; no B×C×C tensor is ever built. :func:`wmse_pairwise` keeps the
literal O(B·C²) sum as a test oracle and benchmark baseline.

Each loss has a ``*_terms`` twin that returns its named terms as a dict (``wmse`` and ``soft_ce``
for the decoupled losses, ``tckd`` and ``nckd`` for DKD, ``kl`` for KL); the loss is their sum.
Notebook 01 derives these losses step by step; notebook 02 plots the gradient of each term.

torch.compile and torch.func: every loss compiles as one graph (``fullgraph=True``) with the eager
values and gradients, so a compiled training step may call them; and every loss works inside
``torch.func`` transforms (grad, jacrev, jvp, hessian, vmap for per-sample gradients) and under
forward-mode AD (``torch.autograd.forward_ad``), where the decoupled losses and DKD run as plain
autograd with their stop-gradients as ``detach`` (same derivatives, first and second order, as the
analytic backward). ``torch.compile`` around a ``torch.func`` transform of dkl/ikl/gkl is not supported.
Under compile and inside torch.func the checks that read tensor values (non-finite logits, overflow
bounds, label ranges, prior rows) are skipped, since each is a device sync the compiler cannot trace
and vmap's batched tensors cannot answer; types, shapes, devices and hyper-parameters are still
checked. Call the loss once eagerly to have the values checked as well.

Your own loss: :func:`register_loss` adds a named loss (a function returning its named terms) that
:func:`loss_terms`, :func:`dkl_lib.train.distill` and :func:`dkl_lib.experiments.run_grid` accept
beside the built-in ones (notebook 05, last section before the dashboard).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from ._checks import (
    check_finite_terms,
    check_logits_pair,
    check_nonnegative,
    check_positive,
    class_prior_bounds,
    compute_dtype,
    forward_ad_active,
    tracing,
    transforming,
)

__all__ = [
    "kl_loss",
    "dkl_loss",
    "ikl_loss",
    "gkl_loss",
    "dkd_loss",
    "kl_terms",
    "dkl_terms",
    "ikl_terms",
    "gkl_terms",
    "dkd_terms",
    "wmse",
    "wmse_pairwise",
    "loss_terms",
    "LOSS_TERMS",
    "BUILTIN_NAMES",
    "CustomLoss",
    "register_loss",
    "unregister_loss",
    "registered_losses",
    "custom_loss",
]

Terms = Dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _no_autocast(device: torch.device):
    """Switch autocast off for the loss computation (inputs are cast to float32 or wider)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type that has no autocast at all
        return contextlib.nullcontext()


def _prepare(logits, target_logits, temperature=None, weight_temperature=None, squared_weight=1.0,
             weight_temperature_name="weight_temperature", targets=None):
    """Validate the pair and cast both to the compute dtype (float32, or float64 if given).

    ``temperature`` / ``weight_temperature``: the divisors of the logits; ``squared_weight``: the
    largest weight multiplying T² (see :func:`~dkl_lib._checks.check_logits_pair`: 1/T, that
    weight times T², and logits / T must be finite). Returns the two cast tensors and
    (max |logits|, max |target_logits|) for :func:`~dkl_lib._checks.check_finite_terms`.
    ``targets``, when given, are checked too, their range read in the same device sync.
    """
    largest = check_logits_pair(logits, target_logits, temperature=temperature,
                      weight_temperature=weight_temperature, squared_weight=squared_weight,
                      weight_temperature_name=weight_temperature_name, targets=targets)
    dtype = compute_dtype(logits, target_logits)
    return logits.to(dtype), target_logits.to(dtype), largest


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_j x_j y_j per row, shape (B, 1) (one product and one sum: what linalg.vecdot dispatches
    to as well, without its unsqueeze)."""
    return (x * y).sum(dim=1, keepdim=True)


def _centered(p: torch.Tensor, d: torch.Tensor, mass):
    """The centred differences d − d̄, d̄ = Σ p d / P (P = ``mass``: the row sums Σ p, without zeros,
    see :func:`_nonzero`), shape (B, C).

    Corrected two-pass mean: the residual Σ p (d − d̄) / P, zero in exact arithmetic, is subtracted
    once more. Without it, when p is nearly one-hot, d − d̄ at the heaviest class is a tiny
    difference of two large numbers and loses most of its digits. ``mass`` = 1 (rows of p summing
    to 1, softmax weights) divides by nothing: two ops less, the same values.
    """
    if not isinstance(mass, torch.Tensor) and mass == 1:
        dev = d - _rowdot(p, d)
        return dev - _rowdot(p, dev)
    dev = d - _rowdot(p, d) / mass
    return dev - _rowdot(p, dev) / mass


def _nonzero(mass: torch.Tensor) -> torch.Tensor:
    """Row sums with each 0 replaced by 1: a row whose weights are all zero has no mean and no
    weight, so it is divided by 1 instead of 0 and its p (d − d̄) and wMSE are 0 (the value of the
    pairwise sum), not 0/0; every product with it is 0 as with the true sum."""
    return mass.masked_fill(mass == 0, 1.0)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T (the tensor itself for T = 1)."""
    return logits * (1.0 / temperature) if temperature != 1.0 else logits


def _constant(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, without dispatching a detach where there is nothing to detach from: a tensor
    that takes no gradient, outside forward-mode AD (a dual tensor's tangent is not requires_grad)
    and outside torch.compile / torch.func (whose wrapped tensors are left to their detach)."""
    return t.detach() if t.requires_grad or forward_ad_active() or tracing() else t


def _powers_safely(low: float, high: float, gamma: float, dtype: torch.dtype) -> bool:
    """Whether weights p with every row maximum >= ``low`` and every entry <= ``high`` <= 1 can be
    raised to ``gamma`` and summed into GKL's Σ_b (Σ_j p_j**γ)² in ``dtype`` without rescaling:
    each row's largest p**γ and its square are then normal numbers (with 2**24 to spare) and the
    whole sum is at most B C², so nothing underflows to 0/0 or overflows."""
    if not 0.0 < low <= high <= 1.0:
        return False
    smallest = min(low, low ** gamma)  # p**γ <= p for γ >= 1, p**γ >= p for γ < 1 (p <= 1)
    return smallest > 0.0 and 2.0 * math.log(smallest) >= math.log(torch.finfo(dtype).tiny) + 24 * math.log(2.0)


def _weights(target_logits, *, weight_temperature, targets, class_prior, gamma=1.0, scale_free=False):
    """The detached weight vectors p (B, C) of w = p pᵀ, or ``None`` for p = softmax(o_m / T); an
    upper bound of the row sums Σ_j p_j (1 for softmax weights; the largest row sum of a prior); and
    whether every row of p is known to hold a positive entry (then no row sum is 0: no guard needed).

    Class-wise global information: p = class_prior[targets] when a prior is given; otherwise
    p = softmax(o_m / T_w). ``targets``: already checked (int64), by the caller's range read.

    ``scale_free`` (GKL, whose wMSE is divided by Σ_b Σ_jk w_jk): p is divided by its largest
    entry in the whole batch before it is raised to ``gamma``, where p**gamma and Σw could otherwise
    underflow to 0/0 (large gamma, tiny priors; see :func:`_powers_safely`). The common factor
    cancels in the ratio. Softmax weights and the rows of a checked prior of probabilities need no
    rescaling for moderate gamma: their row maxima are at least 1/C and the smallest row maximum of
    the prior, known from its check.
    """
    # bounds of p: the largest row sum, the smallest row maximum, the largest entry; softmax weights: row
    # maximum >= 1/C, but not relied on while tracing (C may be symbolic there, and math.log cannot take it)
    traced = tracing()
    high_sum, low, high = 1.0, 0.0 if traced else 1.0 / target_logits.shape[1], 1.0
    if class_prior is not None:
        high_sum, low, high = class_prior_bounds(class_prior, target_logits.shape[1], target_logits.device)
        p = _constant(class_prior)[targets]
        # a checked prior has a positive entry in every row, which a cast to the compute dtype keeps
        # unless it narrows (a float64 row of 1e-50s is all zeros in float32); not checked when tracing
        rows_positive = not traced and (class_prior.dtype == target_logits.dtype
                                        or target_logits.dtype == torch.float64
                                        or class_prior.dtype in (torch.float16, torch.bfloat16))
    elif weight_temperature is not None:
        p = torch.softmax(_constant(target_logits) / weight_temperature, dim=1)
        rows_positive = True  # a softmax's largest entry is at least 1/C
    else:
        p, rows_positive = None, True
    if p is not None and scale_free:
        if _powers_safely(low, high, gamma, target_logits.dtype):
            rows_positive = True  # every row maximum stays a normal number, after the cast and the power
        else:
            # in the wider of the two dtypes: a tiny float64 prior must not flush to zero in float32,
            # and a bf16 prior must not be rescaled at bf16 precision (target_logits are float32 or
            # float64, so the wider one is compute_dtype's answer, found without a dispatched op)
            p = p.to(compute_dtype(p, target_logits))
            p = p / p.amax()
            rows_positive = False  # the rescaling and the power may underflow small positive entries to 0
    elif gamma != 1.0:
        rows_positive = False  # the power may underflow small positive entries to 0
    if p is not None:
        p = p.to(target_logits.dtype)
    if gamma != 1.0:
        if p is None:
            raise AssertionError("caller computes p before applying gamma")
        p = p.pow(gamma)
    # GKL divides by Σ_b (Σ_j p_j)², which cancels the row sums: its bound is that of rows summing to 1
    return p, (high_sum if class_prior is not None and not scale_free else 1.0), rows_positive


class _DecoupledKL(torch.autograd.Function):
    """wMSE and soft-label CE terms in one pass, with their analytic backward.

    Forward returns the two scalars

        wmse    = (α / 4) (1/N) Σ_b Σ_jk p_j p_k (d_j − d_k)²,  d = o_m − o_n (raw logits)
                = (α / 2) (1/N) Σ_b P_b Σ_j p_j (d_j − d̄)²
        soft_ce = −β T² (1/B) Σ_b Σ_j S(s_m)_j log s_n,j

    with N = ``wmse_norm`` (B for DKL and IKL, Σ_b P_b² for GKL) and p detached
    (``weights``, with row sums ``mass``; ``None`` means p = s_m). Backward (w detached):

        ∂wmse/∂o_m = α P p (d − d̄) / N,   ∂wmse/∂o_n = −∂wmse/∂o_m  (0 when ``stop_logits``),
        ∂soft_ce/∂o_n = β T (s_n − s_m) / B,  ∂soft_ce/∂o_m = 0.

    The backward is itself differentiable (Hessians, gradient penalties): under
    ``create_graph=True`` it rebuilds log s_n and p (d − d̄) from the saved inputs with autograd
    on, keeping p, s_m and (for DKL) Δ(o_n) constant as the stop-gradients say; otherwise it uses
    the factors saved by the forward.
    """

    @staticmethod
    def forward(ctx, logits, target_logits, weights, mass, temperature, alpha, beta, wmse_norm, stop_logits):
        batch = logits.shape[0]
        # autograd is off in here: no detach needed for the stop-gradients
        wmse, soft_ce, log_s_n, s_m, p_dev, norm = _decoupled_values(
            logits, target_logits, weights, mass, temperature, alpha, beta, wmse_norm, stop_logits, detach=False)
        ctx.set_materialize_grads(False)  # an unused term's gradient arrives as None, not zeros
        ctx.save_for_backward(log_s_n, s_m, p_dev, mass)
        _keep_inputs(ctx, logits, target_logits, weights)
        ctx.hparams = (temperature, alpha, beta, batch, stop_logits, norm)
        return wmse, soft_ce

    @staticmethod
    def backward(ctx, grad_wmse, grad_soft_ce):
        log_s_n, s_m, p_dev, mass = ctx.saved_tensors
        temperature, alpha, beta, batch, stop_logits, norm = ctx.hparams
        graph = torch.is_grad_enabled()  # create_graph=True: this backward will be differentiated
        if graph:
            logits, target_logits, weights = _kept_inputs(ctx, "a decoupled KL loss (dkl/ikl/gkl)")
            log_s_n = torch.log_softmax(_scaled(logits, temperature), dim=1)
            p = s_m if weights is None else weights
            d = target_logits - (logits.detach() if stop_logits else logits)
            p_dev = p * _centered(p, d, mass if mass is not None else 1.0)
        need_logits, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # in place only into tensors of this backward's own: not while autograd records it, and not
        # for a batched backward (vmap over autograd.grad, is_grads_batched, jacobian(vectorize=True)),
        # whose grad outputs are batched and cannot be written into the unbatched factors
        in_place = not graph and not (_batched(grad_wmse) or _batched(grad_soft_ce))
        grad_w = None
        if grad_wmse is not None and (need_target or (need_logits and not stop_logits)):
            # the scalars first: α/N, times the row sums P (B, 1), then one (B, C) product
            scale = grad_wmse * (alpha / norm) if isinstance(norm, float) else grad_wmse * alpha / norm
            grad_w = p_dev * (scale if mass is None else mass * scale)
        grad_logits = None
        if need_logits:  # in place, except where autograd records this backward
            if grad_soft_ce is not None:
                scale = grad_soft_ce * (beta * temperature / batch)
                grad_logits = log_s_n.exp().sub_(s_m).mul_(scale) if in_place else (log_s_n.exp() - s_m) * scale
            if grad_w is not None and not stop_logits:
                if grad_logits is None:
                    grad_logits = -grad_w
                else:
                    grad_logits = grad_logits.sub_(grad_w) if in_place else grad_logits - grad_w
        grad_target = grad_w if need_target else None
        return grad_logits, grad_target, None, None, None, None, None, None, None


def _keep_inputs(ctx, *inputs) -> None:
    """Keep an autograd.Function's inputs for a differentiated backward (create_graph=True) only.

    They are kept as attributes, not saved tensors: autograd would then refuse a first-order
    backward after an in-place change of an input, which a first-order gradient built from the
    saved factors does not care about. Their versions let :func:`_kept_inputs` refuse such a change
    in the second-order path (not while torch.compile traces, which cannot trace version counters).
    """
    ctx.inputs = inputs
    ctx.versions = None if tracing() else tuple(None if t is None else t._version for t in inputs)


def _kept_inputs(ctx, loss: str) -> tuple:
    """The inputs of :func:`_keep_inputs`, unchanged since the forward (RuntimeError naming ``loss``
    otherwise)."""
    if ctx.versions is not None and any(t is not None and t._version != v for t, v in zip(ctx.inputs, ctx.versions)):
        raise RuntimeError(f"an input of {loss} was modified in place after the loss was computed; "
                           "a backward with create_graph=True needs it unchanged")
    return ctx.inputs


def _batched(grad) -> bool:
    """``grad`` is a batched tensor of vmap (torch.func's, or the one of is_grads_batched); False
    while torch.compile traces (which cannot trace the question, and functionalises in-place ops)."""
    return (grad is not None and not torch.compiler.is_compiling()
            and (torch._C._functorch.is_batchedtensor(grad) or torch._C._functorch.is_legacy_batchedtensor(grad)))


def _decoupled_values(logits, target_logits, weights, mass, temperature, alpha, beta, wmse_norm, stop_logits,
                      detach=True):
    """The forward of :class:`_DecoupledKL`: (wmse, soft_ce) and the factors its backward reuses
    (log s_n, s_m, p (d − d̄), N). ``mass``: the row sums of ``weights``,
    or None with ``weights`` (p = s_m, rows summing to 1).

    Written with the stop-gradients as ``detach`` (s_m, and Δ(o_n) when ``stop_logits``; the
    weights come detached), so that autograd through it gives the analytic backward's gradients:
    the path used inside torch.func transforms, which an autograd.Function of this form cannot enter.
    ``detach=False``: the autograd.Function's forward, where autograd is off and detach a wasted op.
    """
    batch = logits.shape[0]
    log_s_n = torch.log_softmax(_scaled(logits, temperature), dim=1)
    s_m = torch.softmax(_scaled(target_logits.detach() if detach else target_logits, temperature), dim=1)
    p = s_m if weights is None else weights
    student = logits.detach() if stop_logits and detach else logits
    dev = _centered(p, target_logits - student, mass if mass is not None else 1.0)
    norm = float(batch) if wmse_norm is None else wmse_norm
    p_dev = p * dev
    # Σ_j p_j (d_j − d̄)², shape (B, 1); with α = 0 the term is 0 (dev times 0, not a row sum that may
    # overflow to inf times 0 = nan for huge logits; the bound of check_finite_terms scales with α)
    row = _rowdot(p_dev, dev if alpha != 0 else dev * 0.0)
    if mass is not None:
        row = row * mass
    # scaled per row, then summed, like soft_ce below: the sum of B rows may overflow before 1/N (GKL's
    # tensor N: divided, then scaled, two operators where α/(2N) as a tensor would take three)
    wmse = (row * (0.5 * alpha / norm) if isinstance(norm, float) else row.div(norm).mul(0.5 * alpha)).sum()
    # per row, scaled, then summed: a row is at most max |o| / T in size (finite by the range check),
    # but the sum of B such rows may overflow before T² brings it back (inf, or nan once T² is 0)
    soft_ce = torch.linalg.vecdot(s_m, log_s_n).mul(-beta * temperature**2 / batch).sum()
    return wmse, soft_ce, log_s_n, s_m, p_dev, norm


def _decoupled_terms(logits, target_logits, *, temperature, alpha, beta, weight_temperature,
                     targets, class_prior, gamma, gkl_norm, stop_logits, loss_name) -> Terms:
    temperature = check_positive("temperature", temperature)
    alpha = check_nonnegative("alpha", alpha)
    beta = check_nonnegative("beta", beta)
    gamma = check_positive("gamma", gamma)
    if weight_temperature is not None:
        weight_temperature = check_positive("weight_temperature", weight_temperature)
    if class_prior is not None and targets is None:
        raise ValueError("class_prior was given without targets: the prior row of each sample "
                         "is class_prior[targets]")
    # targets are validated whenever given, also when unused: in the logits' device sync
    logits, target_logits, largest = _prepare(logits, target_logits, temperature,
                                              weight_temperature if class_prior is None else None, beta,
                                              targets=targets)
    with _no_autocast(logits.device):
        if gamma != 1.0 and class_prior is None and weight_temperature is None:
            weight_temperature = temperature  # p must exist before it is raised to gamma
        if weight_temperature == temperature and gamma == 1.0 and class_prior is None:
            weight_temperature = None  # p = s_m, computed once inside the kernel
        p, bound_mass, rows_positive = _weights(target_logits, weight_temperature=weight_temperature,
                                                targets=None if targets is None else targets.long(),
                                                class_prior=class_prior, gamma=gamma, scale_free=gkl_norm)
        mass = None if p is None else p.sum(dim=1, keepdim=True)
        norm = None
        if gkl_norm:  # Σ_b Σ_jk w_jk = Σ_b (Σ_j p_j)², which is B when the rows of p sum to 1
            norm = float(logits.shape[0]) if p is None else (mass ** 2).sum()
        if mass is not None and not rows_positive:
            mass = _nonzero(mass)  # after Σw: a zero row adds 0 to it, not 1
        if transforming() or forward_ad_active():  # torch.func, forward-mode AD: plain autograd, same derivatives
            wmse_term, soft_ce = _decoupled_values(logits, target_logits, p, mass, temperature, alpha, beta, norm,
                                                   stop_logits)[:2]
        else:
            wmse_term, soft_ce = _DecoupledKL.apply(logits, target_logits, p, mass, temperature, alpha, beta,
                                                    norm, stop_logits)
    terms = {"wmse": wmse_term, "soft_ce": soft_ce}
    # |wmse| <= (α/8) P² (max_j d - min_j d)² <= (α/2) P² (|o_n| + |o_m|)²; |soft_ce| <= β T² max |log s_n|
    spread = largest[0] + largest[1]
    if not tracing():  # (the bound is not needed there, and log of a symbolic C does not trace on torch 2.4)
        check_finite_terms(loss_name, terms, temperature=temperature, largest=largest,
                           bound=max(0.5 * alpha * bound_mass * bound_mass * spread * spread,
                                     beta * (2.0 * temperature * largest[0]
                                             + temperature * temperature * math.log(logits.shape[1]))))
    return terms


def _total(terms: Terms) -> torch.Tensor:
    return sum(terms.values())


# --------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------
def kl_terms(logits, target_logits, *, temperature: float = 1.0) -> Terms:
    """``{"kl": kl_loss(...)}``; see :func:`kl_loss`."""
    temperature = check_positive("temperature", temperature)
    logits, target_logits, largest = _prepare(logits, target_logits, temperature)
    with _no_autocast(logits.device):
        log_s_n = torch.log_softmax(logits / temperature, dim=1)
        log_s_m = torch.log_softmax(target_logits / temperature, dim=1)
        # per row, scaled, then summed (see _DecoupledKL.forward: the unscaled sum may overflow)
        kl = (log_s_m.exp() * (log_s_m - log_s_n)).sum(dim=1).mul(temperature**2 / logits.shape[0]).sum()
    # KL(s_m ‖ s_n) <= max_j |log s_m,j - log s_n,j| <= 2 max |o_m - o_n| / T
    check_finite_terms("kl", {"kl": kl}, temperature=temperature, largest=largest,
                       bound=2.0 * temperature * (largest[0] + largest[1]))
    return {"kl": kl}


def kl_loss(logits, target_logits, *, temperature: float = 1.0) -> torch.Tensor:
    r"""Temperature-scaled KL divergence KL(s_m ‖ s_n), batch mean, Hinton's T² convention.

    .. math:: T^2 \frac{1}{B} \sum_b \sum_j s_m^j (\log s_m^j - \log s_n^j)

    Equal to ``T*T*F.kl_div(log_softmax(logits/T), log_softmax(target_logits/T),
    log_target=True, reduction="batchmean")``. Gradients reach both inputs when they require
    grad: ∂/∂o_n = T (s_n − s_m) / B and ∂/∂o_m = s_m ⊙ (d − Σ s_m d) / B with d = o_m − o_n.

    Args:
        logits: o_n, shape (B, C), the side pulled toward the target (student).
        target_logits: o_m, shape (B, C), the target side (teacher).
        temperature: T > 0.

    Returns:
        A scalar tensor (float32, or float64 for float64 input).

    Paper: Cui et al., "Decoupled Kullback-Leibler Divergence Loss", NeurIPS 2024, Eq. (1).
    Notebook: 01_kl_to_dkl_derivation.
    """
    return kl_terms(logits, target_logits, temperature=temperature)["kl"]


# --------------------------------------------------------------------------------------------
# DKL
# --------------------------------------------------------------------------------------------
def dkl_terms(logits, target_logits, *, temperature: float = 1.0, alpha: float = 1.0,
              beta: float = 1.0) -> Terms:
    """``{"wmse": ..., "soft_ce": ...}`` of :func:`dkl_loss`; the loss is their sum."""
    return _decoupled_terms(logits, target_logits, temperature=temperature, alpha=alpha, beta=beta,
                            weight_temperature=None, targets=None, class_prior=None, gamma=1.0,
                            gkl_norm=False, stop_logits=True, loss_name="dkl")


def dkl_loss(logits, target_logits, *, temperature: float = 1.0, alpha: float = 1.0,
             beta: float = 1.0) -> torch.Tensor:
    r"""Decoupled KL: weighted MSE of logit differences plus soft-label cross-entropy.

    .. math::
        \frac{\alpha}{4}\frac{1}{B}\sum_b\sum_{j,k} S(w)_{jk}\big(\Delta(o_m)_{jk}
        - S(\Delta(o_n))_{jk}\big)^2 \;-\; \beta T^2 \frac{1}{B}\sum_b S(s_m)^\top \log s_n

    with w = s_m s_mᵀ (at temperature T) and the wMSE on raw logits (DKL paper, Theorem 1, Eq. 3).
    With α = β = 1 its gradients equal those of :func:`kl_loss` with respect to BOTH inputs; the
    wMSE term carries all of the gradient to ``target_logits``, the CE term all of it to
    ``logits``. Hence the asymmetry: when the target side is frozen (a teacher), the wMSE term
    does nothing. The wMSE is computed in closed form, O(B·C).

    Args:
        logits: o_n, shape (B, C). target_logits: o_m, shape (B, C).
        temperature: T > 0 (softmax temperature of the CE term and of the weights).
        alpha: weight of the wMSE term (>= 0). beta: weight of the soft-label CE term (>= 0).

    Mapping from the official code (github.com/jiequancui/DKL): despite its name, its ``dkl_loss``
    has no stop-gradient on Δ(o_n) (its wMSE gradient reaches the student), so it is our
    :func:`ikl_loss`, not this function. It multiplies the CE term by ALPHA and the wMSE term by
    BETA, without T² on CE: official (ALPHA=a, BETA=b, T, T2) = ours ``ikl_loss(alpha=b,
    beta=a/T², temperature=T, weight_temperature=T2)``. This function is that loss with the
    stop-gradient kept (and T2 = T), i.e. KL's gradients for alpha = beta = 1.

    Notebooks: 01_kl_to_dkl_derivation (derivation), 02_gradient_anatomy (gradients).
    """
    return _total(dkl_terms(logits, target_logits, temperature=temperature, alpha=alpha, beta=beta))


# --------------------------------------------------------------------------------------------
# IKL and GKL
# --------------------------------------------------------------------------------------------
def ikl_terms(logits, target_logits, *, temperature: float = 1.0, alpha: float = 1.0,
              beta: float = 1.0, weight_temperature: Optional[float] = None,
              targets: Optional[torch.Tensor] = None,
              class_prior: Optional[torch.Tensor] = None) -> Terms:
    """``{"wmse": ..., "soft_ce": ...}`` of :func:`ikl_loss`; the loss is their sum."""
    return _decoupled_terms(logits, target_logits, temperature=temperature, alpha=alpha, beta=beta,
                            weight_temperature=weight_temperature, targets=targets,
                            class_prior=class_prior, gamma=1.0, gkl_norm=False, stop_logits=False,
                            loss_name="ikl")


def ikl_loss(logits, target_logits, *, temperature: float = 1.0, alpha: float = 1.0,
             beta: float = 1.0, weight_temperature: Optional[float] = None,
             targets: Optional[torch.Tensor] = None,
             class_prior: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Improved KL: DKL with the asymmetry broken and class-wise global information.

    .. math::
        \frac{\alpha}{4}\frac{1}{B}\sum_b\sum_{j,k} S(w)_{jk}\big(\Delta(o_m)_{jk}
        - \Delta(o_n)_{jk}\big)^2 \;-\; \beta T^2 \frac{1}{B}\sum_b S(s_m)^\top \log s_n

    1. No stop-gradient on Δ(o_n): the wMSE gradient also reaches ``logits`` (the student).
    2. w = p pᵀ, always detached, with p = ``class_prior[targets]`` (class-wise global
       information, GI) when both are given, else p = softmax(o_m / T_w), T_w =
       ``weight_temperature`` (default: ``temperature``).

    Args:
        logits: o_n, shape (B, C). target_logits: o_m, shape (B, C).
        temperature: T > 0. alpha: wMSE weight (>= 0). beta: soft-label CE weight (>= 0).
        weight_temperature: T_w > 0 for the sample-wise weights, or None for T.
        targets: (B,) integer class labels, needed with ``class_prior``; checked whenever given.
        class_prior: (C, C) tensor, row y = mean probability vector of class y
            (see :class:`dkl_lib.prior.ClassPrior`); rows non-negative, not all zero.

    Mapping from the official code: official (ALPHA=a, BETA=b, T, T2) = ours (alpha=b,
    beta=a/T², temperature=T, weight_temperature=T2); its GI flag = passing ``class_prior`` and
    ``targets``.

    Paper: Cui et al., NeurIPS 2024, Eq. (5) (IKL). Notebooks: 01, 02, 03, 05.
    """
    return _total(ikl_terms(logits, target_logits, temperature=temperature, alpha=alpha, beta=beta,
                            weight_temperature=weight_temperature, targets=targets,
                            class_prior=class_prior))


def gkl_terms(logits, target_logits, *, temperature: float = 1.0, alpha: float = 1.0,
              beta: float = 1.0, gamma: float = 1.0, weight_temperature: Optional[float] = None,
              targets: Optional[torch.Tensor] = None,
              class_prior: Optional[torch.Tensor] = None) -> Terms:
    """``{"wmse": ..., "soft_ce": ...}`` of :func:`gkl_loss`; the loss is their sum."""
    return _decoupled_terms(logits, target_logits, temperature=temperature, alpha=alpha, beta=beta,
                            weight_temperature=weight_temperature, targets=targets,
                            class_prior=class_prior, gamma=gamma, gkl_norm=True, stop_logits=False,
                            loss_name="gkl")


def gkl_loss(logits, target_logits, *, temperature: float = 1.0, alpha: float = 1.0,
             beta: float = 1.0, gamma: float = 1.0, weight_temperature: Optional[float] = None,
             targets: Optional[torch.Tensor] = None,
             class_prior: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Generalized KL (follow-up paper, arXiv 2503.08038): IKL with p → p**γ, normalised by Σw.

    .. math::
        \frac{\alpha}{4}\,\frac{\sum_b\sum_{j,k} S(w)_{jk}(\Delta(o_m)_{jk}-\Delta(o_n)_{jk})^2}
        {\sum_b\sum_{j,k} S(w)_{jk}} \;-\; \beta T^2 \frac{1}{B}\sum_b S(s_m)^\top \log s_n,
        \qquad w = p^\gamma (p^\gamma)^\top

    with p as in :func:`ikl_loss`. For γ = 1 and rows of p summing to 1, Σw = B and
    gkl_loss equals ikl_loss. Arguments as :func:`ikl_loss`, plus ``gamma`` > 0.

    The ratio does not change when p is multiplied by a constant, so where p**γ or Σw could
    underflow to 0/0 (large γ, tiny priors) p is divided by its largest entry in the batch before
    the power. Softmax weights and priors of probabilities with moderate γ (the row maxima, at
    least 1/C for softmax weights, known for a prior from its check) need no rescaling.
    """
    return _total(gkl_terms(logits, target_logits, temperature=temperature, alpha=alpha, beta=beta,
                            gamma=gamma, weight_temperature=weight_temperature, targets=targets,
                            class_prior=class_prior))


# --------------------------------------------------------------------------------------------
# DKD
# --------------------------------------------------------------------------------------------
def _dkd_parts(logits, target_logits, target_col, target_mask, temperature):
    """The log-space pieces of DKD for both sides (B, C) / (B, 1): log s, log p_t (the target
    column), log(1 − p_t) (the logsumexp of the log-probabilities with the target column at −inf:
    no 1 − p_t, so it stays exact as p_t → 1) and log p̂ = log s − log(1 − p_t), the log-softmax over
    the non-target classes (its target column is meaningless; callers mask it)."""
    parts = []
    for x in (logits, target_logits):
        log_s = torch.log_softmax(_scaled(x, temperature), dim=1)
        log_rest = torch.logsumexp(log_s.masked_fill(target_mask, -math.inf), dim=1, keepdim=True)
        parts.append((log_s, log_s.gather(1, target_col), log_rest, log_s - log_rest))
    return parts


def _dkd_values(logits, target_logits, target_col, target_mask, temperature, alpha, beta):
    """(tckd, nckd), each already weighted by α or β and T² / B, and the factors of the student's
    gradient that :class:`_DKD` saves (log s_n, log p̂_n, p̂_m, p_m,t, 1 − p_m,t). Through plain
    autograd this is the path for a teacher that takes gradients, torch.func, forward-mode AD,
    torch.compile and a differentiated backward; :class:`_DKD` runs it with autograd off."""
    scale = temperature**2 / logits.shape[0]
    (log_n, lt_n, rest_n, hat_log_n), (_, lt_m, rest_m, hat_log_m) = _dkd_parts(
        logits, target_logits, target_col, target_mask, temperature)
    # KL of the binary splits b = (p_t, 1 − p_t), per row, scaled, then summed (see
    # _DecoupledKL.forward: the unscaled sum may overflow)
    p_mt, q_m = lt_m.exp(), rest_m.exp()
    tckd = (p_mt * (lt_m - lt_n) + q_m * (rest_m - rest_n)).mul(alpha * scale).sum()
    # The NCKD sum runs over all C columns with the target's weight p̂_m,t = exp(−inf) = 0; there
    # log p_t − log(1 − p_t) lies within ±(max/2 + log C) on each side (both logs in (−max/2 − log C, 0]
    # by the range check), so the difference is finite: no 0 · inf. p̂_m comes from the same log p̂_m
    # tensor as the difference: the gradient of the teacher then meets log(1 − p_t,m) in one sum (two
    # paths would each round a huge difference differently, leaving an O(1) error where the exact
    # gradient is 0)
    hat_m = hat_log_m.masked_fill(target_mask, -math.inf).exp()
    nckd = (hat_m * (hat_log_m - hat_log_n)).sum(dim=1).mul(beta * scale).sum()
    return tckd, nckd, (log_n, hat_log_n, hat_m, p_mt, q_m)


class _DKD(torch.autograd.Function):
    """DKD's two terms with the analytic gradient of the student (the teacher takes none: the
    caller uses :func:`_dkd_values` when it does). Per row, with z = o_n / T, p = softmax(z),
    p̂ the non-target renormalisation and q_m = 1 − p_m,t:

        ∂TCKD/∂z_j = p_n,j − [j = t] p_m,t − [j ≠ t] q_m p̂_n,j,   ∂NCKD/∂z_j = [j ≠ t] (p̂_n,j − p̂_m,j)

    (each sums to 0 over j), times α or β and T / B. A fraction of the operations that autograd
    records and replays through the log-space formula; the same values. A backward that will be
    differentiated (``create_graph=True``) replays the plain formula under autograd instead.
    """

    @staticmethod
    def forward(ctx, logits, target_logits, target_col, target_mask, temperature, alpha, beta):
        tckd, nckd, factors = _dkd_values(logits, target_logits, target_col, target_mask, temperature, alpha, beta)
        ctx.set_materialize_grads(False)  # an unused term's gradient arrives as None, not zeros
        ctx.save_for_backward(*factors, target_col, target_mask)
        _keep_inputs(ctx, logits, target_logits)
        ctx.hparams = (temperature, alpha, beta)
        return tckd, nckd

    @staticmethod
    def backward(ctx, grad_tckd, grad_nckd):
        log_n, hat_log_n, hat_m, p_mt, q_m, target_col, target_mask = ctx.saved_tensors
        temperature, alpha, beta = ctx.hparams
        if torch.is_grad_enabled():  # create_graph=True: the plain formula, differentiated by autograd
            logits, target_logits = _kept_inputs(ctx, "dkd_loss")
            pairs = [(v, g) for v, g in zip(_dkd_values(logits, target_logits, target_col, target_mask,
                                                        temperature, alpha, beta)[:2], (grad_tckd, grad_nckd))
                     if g is not None]
            grad, = torch.autograd.grad([v for v, _ in pairs], logits, [g for _, g in pairs], create_graph=True)
            return (grad,) + (None,) * 6
        factor = temperature / log_n.shape[0]
        hat_n = hat_log_n.masked_fill(target_mask, -math.inf).exp()
        grad = None
        if grad_tckd is not None:  # α T/B (p_n − [t] p_m,t − q_m p̂_n), p̂_n = 0 at t
            a = grad_tckd * (alpha * factor)
            grad = (log_n.exp() - target_mask * p_mt - q_m * hat_n) * a
        if grad_nckd is not None:  # β T/B (p̂_n − p̂_m)
            part = (hat_n - hat_m) * (grad_nckd * (beta * factor))
            grad = part if grad is None else grad + part
        return (grad,) + (None,) * 6


def dkd_terms(logits, target_logits, targets, *, temperature: float = 1.0, alpha: float = 1.0,
              beta: float = 8.0) -> Terms:
    """``{"tckd": ..., "nckd": ...}`` of :func:`dkd_loss`; the loss is their sum."""
    temperature = check_positive("temperature", temperature)
    alpha = check_nonnegative("alpha", alpha)
    beta = check_nonnegative("beta", beta)
    if targets is None:
        raise ValueError("dkd_loss needs targets: the (B,) class labels that split each distribution into "
                         "its target and non-target parts")
    logits, target_logits, largest = _prepare(logits, target_logits, temperature, squared_weight=max(alpha, beta),
                                              targets=targets)
    targets = targets.long()
    with _no_autocast(logits.device):
        # one boolean mask of the target column, shared by both sides (no per-side index tensors)
        target_col = targets.unsqueeze(1)
        target_mask = target_col == torch.arange(logits.shape[1], device=logits.device)
        args = (logits, target_logits, target_col, target_mask, temperature, alpha, beta)
        # the analytic student gradient where it applies (the usual case: a frozen teacher, a
        # student that takes gradients); anything else through autograd of the same formula
        if (logits.requires_grad and not target_logits.requires_grad and torch.is_grad_enabled()
                and not (tracing() or forward_ad_active())):
            tckd, nckd = _DKD.apply(*args)
        else:
            tckd, nckd, _ = _dkd_values(*args)
    terms = {"tckd": tckd, "nckd": nckd}
    # each KL <= max |log-ratio| <= 4 max |o_m - o_n| / T (the non-target and binary splits)
    check_finite_terms("dkd", terms, temperature=temperature, largest=largest,
                       bound=4.0 * (alpha + beta) * temperature * (largest[0] + largest[1]))
    return terms


def dkd_loss(logits, target_logits, targets, *, temperature: float = 1.0, alpha: float = 1.0,
             beta: float = 8.0) -> torch.Tensor:
    r"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022, Eq. 7).

    .. math:: T^2\big(\alpha\,\mathrm{KL}(b_m \| b_n) + \beta\,\mathrm{KL}(\hat p_m \| \hat p_n)\big)

    batch mean, with b = (p_t, 1 − p_t) the target/non-target binary split of softmax(o / T) and
    p̂ the softmax over the non-target classes; computed in log space (finite for large logits).
    When only ``logits`` take gradients (distillation from a frozen teacher) the backward is the
    closed-form student gradient in one autograd node (fewer kernel launches per training step);
    when ``target_logits`` take gradients too, autograd goes through the same log-space formula.

    Args:
        logits: o_n, shape (B, C). target_logits: o_m, shape (B, C).
        targets: (B,) integer class labels. temperature: T > 0.
        alpha: TCKD weight (>= 0). beta: NCKD weight (>= 0; mdistiller's CIFAR default is 8).
    """
    return _total(dkd_terms(logits, target_logits, targets, temperature=temperature, alpha=alpha,
                            beta=beta))


# --------------------------------------------------------------------------------------------
# the weighted MSE on its own: closed form and literal oracle
# --------------------------------------------------------------------------------------------
def _wmse_weights(target_logits, weights, temperature):
    if weights is None:
        return torch.softmax(target_logits.detach() / temperature, dim=1)
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if weights.shape != target_logits.shape:
        raise ValueError(f"weights must have shape {tuple(target_logits.shape)}, got {tuple(weights.shape)}")
    if not tracing() and (not bool(torch.isfinite(weights).all()) or bool((weights < 0).any())):
        raise ValueError("weights must be finite and non-negative")
    return weights.detach().to(target_logits.dtype)


def _check_wmse_value(name, value, weights, mass, largest) -> None:
    """The wMSE value is finite (see :func:`~dkl_lib._checks.check_finite_terms`; bound
    (1/2) P² (|o_n| + |o_m|)², P = the largest row sum of the weights, 1 for softmax weights)."""
    if tracing():
        return
    top = 1.0 if weights is None else float(mass.max())
    spread = largest[0] + largest[1]
    check_finite_terms(name, {"wmse": value}, largest=largest, bound=0.5 * top * top * spread * spread)


def wmse(logits, target_logits, *, weights: Optional[torch.Tensor] = None,
         temperature: float = 1.0, detach_logits: bool = False) -> torch.Tensor:
    r"""Weighted MSE of pairwise logit differences, closed form, O(B·C).

    .. math:: \frac14\frac1B\sum_b\sum_{j,k} p_j p_k (\Delta(o_m)_{jk}-\Delta(o_n)_{jk})^2
              = \frac12\frac1B\sum_b P\sum_j p_j (d_j-\bar d)^2

    d = o_m − o_n, P = Σ p, d̄ = Σ p d / P; p = ``weights`` (B, C) or softmax(o_m / T), detached.
    ``detach_logits=True`` puts the stop-gradient on Δ(o_n) as in DKL. Same value and gradient
    as :func:`wmse_pairwise`, without its B×C×C tensor; a row whose weights are all zero adds 0.
    """
    temperature = check_positive("temperature", temperature)
    logits, target_logits, largest = _prepare(logits, target_logits, weight_temperature=temperature if weights
                                              is None else None, weight_temperature_name="temperature")
    with _no_autocast(logits.device):
        p = _wmse_weights(target_logits, weights, temperature)
        mass = p.sum(dim=1, keepdim=True)
        dev = _centered(p, target_logits - (logits.detach() if detach_logits else logits), _nonzero(mass))
        value = 0.5 * (mass.squeeze(1) * (p * dev * dev).sum(dim=1)).mean()
    _check_wmse_value("wmse", value, weights, mass, largest)
    return value


def wmse_pairwise(logits, target_logits, *, weights: Optional[torch.Tensor] = None,
                  temperature: float = 1.0, detach_logits: bool = False) -> torch.Tensor:
    r"""The literal O(B·C²) weighted MSE (test oracle and benchmark baseline only).

    .. math:: \frac14\frac1B\sum_b\sum_{j,k} S(w)_{jk}(\Delta(o_m)_{jk}-\Delta(o_n)_{jk})^2,
              \quad w = p p^\top

    Builds the B×C×C tensors Δ(o_m), Δ(o_n) and w explicitly. Arguments as :func:`wmse`.
    """
    temperature = check_positive("temperature", temperature)
    logits, target_logits, largest = _prepare(logits, target_logits, weight_temperature=temperature if weights
                                              is None else None, weight_temperature_name="temperature")
    with _no_autocast(logits.device):
        p = _wmse_weights(target_logits, weights, temperature)
        student = logits.detach() if detach_logits else logits
        delta_m = target_logits[:, :, None] - target_logits[:, None, :]
        delta_n = student[:, :, None] - student[:, None, :]
        w = p[:, :, None] * p[:, None, :]
        value = (w * (delta_m - delta_n) ** 2).sum() / (4 * logits.shape[0])
    _check_wmse_value("wmse_pairwise", value, weights, p.sum(dim=1), largest)
    return value


# --------------------------------------------------------------------------------------------
# dispatch by name (training code, widgets)
# --------------------------------------------------------------------------------------------
LOSS_TERMS: Dict[str, Callable[..., Terms]] = {
    "kl": kl_terms,
    "dkl": dkl_terms,
    "ikl": ikl_terms,
    "gkl": gkl_terms,
    "dkd": dkd_terms,
}


def loss_terms(name: str, logits, target_logits, targets=None, **hparams) -> Terms:
    """Named terms of the loss ``name`` (one of ``LOSS_TERMS``, or a loss added with
    :func:`register_loss`); ``targets`` goes where it is used.

    ``hparams`` are the keyword arguments of that loss's ``*_terms`` function (``temperature``,
    ``alpha``, ...); a registered loss takes ``temperature`` and ``class_prior`` (see
    :func:`register_loss`). An unknown ``name``, or "dkd" without ``targets``, raises ``ValueError``.

    >>> terms = loss_terms("ikl", student_logits, teacher_logits, targets=y, temperature=4.0)
    >>> total = sum(terms.values())
    """
    if name in _REGISTRY:
        return _REGISTRY[name](logits, target_logits, targets=targets, **hparams)
    if name not in LOSS_TERMS:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSS_TERMS) + sorted(_REGISTRY)}")
    if name == "dkd":
        if targets is None:
            raise ValueError("dkd needs targets (the true class of each sample)")
        return dkd_terms(logits, target_logits, targets, **hparams)
    if name in ("ikl", "gkl"):
        return LOSS_TERMS[name](logits, target_logits, targets=targets, **hparams)
    return LOSS_TERMS[name](logits, target_logits, **hparams)


# --------------------------------------------------------------------------------------------
# your own loss: a registry of named custom losses
# --------------------------------------------------------------------------------------------
#: Names a registered loss may not take: the built-in losses of training and of adversarial training.
BUILTIN_NAMES = frozenset({"ce", "kl", "dkl", "ikl", "gkl", "dkd", "trades"})
_NAME = re.compile(r"^[a-z][a-z0-9_]*(-[a-z0-9_]+)*$")
#: History columns a term may not be named after (the trainer logs them beside the terms).
_RESERVED_TERMS = frozenset({"epoch", "lr", "kd_factor", "loss", "ce", "train_acc", "test_acc", "seconds"})
_SIMPLE = (bool, int, float, str, type(None))


def _fingerprint(fn, _path: tuple = ()) -> Optional[str]:
    """SHA-256 of what defines a plain Python function: its source (:func:`inspect.getsource`), its
    default arguments and the values it closes over (plain numbers/strings, or functions, by their
    own fingerprint). None when any of it cannot be read or hashed honestly: no source (a C
    function, ``functools.partial``, a callable object, code typed where no source is kept), or a
    closure over another kind of object (a tensor, a module): such a loss is not cached. ``_path``:
    the functions whose fingerprint is being computed around this one (helpers that call each other
    are hashed once each, a repeat by its place on that path)."""
    if not inspect.isfunction(fn):
        return None
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    parts = [source, repr(fn.__defaults__), repr(sorted((fn.__kwdefaults__ or {}).items()))]
    for value in list(fn.__defaults__ or ()) + list((fn.__kwdefaults__ or {}).values()):
        if not isinstance(value, _SIMPLE):
            return None
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell (a name assigned later in the enclosing function)
            return None
        if isinstance(value, _SIMPLE):
            parts.append(repr(value))
        elif inspect.isfunction(value) and value is not fn:
            outer = [i for i, f in enumerate(_path) if f is value]
            inner = f"<cycle {outer[0]}>" if outer else _fingerprint(value, _path + (fn,))
            if inner is None:
                return None
            parts.append(inner)
        else:
            return None
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _import_path(fn) -> Optional[Tuple[str, str]]:
    """(module, qualified name) under which a fresh (spawned) process finds ``fn`` itself, or None
    (defined in ``__main__`` / a notebook, inside another function, a lambda, not a function)."""
    import importlib

    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not inspect.isfunction(fn) or not module or module == "__main__" or not qualname or "<" in qualname:
        return None
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:  # noqa: BLE001 - any failure means: not importable
        return None
    return (module, qualname) if obj is fn else None


@dataclass(frozen=True)
class CustomLoss:
    """A loss added with :func:`register_loss`.

    Attributes:
        name: its name in ``loss_terms``, ``distill(loss=...)`` and ``run_grid``.
        fn: ``fn(logits, target_logits, *, targets, class_prior, temperature) -> {term: scalar}``.
        uses_prior: whether it takes the GI class prior (``class_prior``; see :func:`register_loss`).
        description: one line for tables and help.
        source_sha256: :func:`_fingerprint` of ``fn`` at registration (part of a run's cache key),
            or None when it cannot be fingerprinted (its runs are then not cached).
        import_path: (module, qualified name) of ``fn`` for worker processes, or None.
    """

    name: str
    fn: Callable[..., Terms]
    uses_prior: bool = False
    description: str = ""
    source_sha256: Optional[str] = None
    import_path: Optional[Tuple[str, str]] = None

    def __call__(self, logits, target_logits, *, targets=None, class_prior=None, temperature: float = 1.0,
                 check_finite: bool = True) -> Terms:
        """The named terms for one batch, checked: a non-empty dict of str → scalar float tensors on
        the logits' device (``TypeError`` / ``ValueError`` naming the loss and the term); with
        ``check_finite`` (one device sync) also finite. The trainer checks finiteness on its
        first batch and per epoch instead of per step."""
        temperature = check_positive("temperature", temperature)
        if class_prior is not None and not self.uses_prior:
            raise ValueError(f"loss {self.name!r} was registered with uses_prior=False; it takes no class_prior")
        terms = self.fn(logits, target_logits, targets=targets, class_prior=class_prior, temperature=temperature)
        where = f"custom loss {self.name!r}"
        if not isinstance(terms, dict) or not terms:
            raise TypeError(f"{where} must return a non-empty dict of named scalar tensors (like "
                            f"loss_terms), got {type(terms).__name__ if not isinstance(terms, dict) else 'an empty dict'}")
        for term, value in terms.items():
            if not isinstance(term, str) or not term:
                raise TypeError(f"{where} returned a term named {term!r}; term names must be non-empty strings")
            if term in _RESERVED_TERMS:
                raise ValueError(f"{where} returned a term named {term!r}, which the training history uses for "
                                 f"something else; rename it (reserved: {sorted(_RESERVED_TERMS)})")
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{where}: term {term!r} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() != 0:
                raise ValueError(f"{where}: term {term!r} must be a scalar tensor (the batch mean, e.g. "
                                 f"`.mean()`), got shape {tuple(value.shape)}")
            if not value.is_floating_point():
                raise TypeError(f"{where}: term {term!r} must be a floating-point tensor, got {value.dtype}")
            if isinstance(logits, torch.Tensor) and value.device != logits.device:
                raise ValueError(f"{where}: term {term!r} is on {value.device}, the logits on {logits.device}")
        if check_finite and not tracing():
            finite = torch.isfinite(torch.stack([v.detach().float() for v in terms.values()])).tolist()
            bad = [term for term, ok in zip(terms, finite) if not ok]
            if bad:
                raise ValueError(f"{where}: term{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} "
                                 f"{'are' if len(bad) > 1 else 'is'} not finite for this batch")
        return terms


_REGISTRY: Dict[str, CustomLoss] = {}


def register_loss(name: str, fn: Callable[..., Terms], *, uses_prior: bool = False,
                  description: str = "") -> CustomLoss:
    """Add your own KD loss under ``name``, for :func:`loss_terms`, :func:`dkl_lib.train.distill`
    and :func:`dkl_lib.experiments.run_grid`, beside kl/dkl/ikl/...

    ``fn(logits, target_logits, *, targets, class_prior, temperature)`` returns a dict of named
    scalar tensors (batch means), like :func:`ikl_terms`; the KD loss is their sum and the training
    history logs each of them per epoch. ``logits`` is the student (o_n), ``target_logits`` the
    teacher (o_m, detached), ``targets`` the labels (B,), ``temperature`` the run's T, and
    ``class_prior`` the (C, C) GI prior of :class:`~dkl_lib.prior.ClassPrior` when the loss was
    registered with ``uses_prior=True`` and the run has GI on (``distill(gi=True)``; ``run_grid``
    turns it on for such a loss unless its name ends in "-nogi"), else None. A registered loss
    uses ``temperature`` (and, with ``uses_prior``, ``weight_temperature`` for the prior, and
    ``gi``); alpha, beta and gamma do not reach it and are ignored, as for ``kl``.

    Registering a name again replaces the earlier loss (re-running a notebook cell). Names are
    lowercase words joined by "-" (not ending in "-gi" / "-nogi", which ``run_grid`` reads as GI
    switches) and may not be a built-in name (:data:`BUILTIN_NAMES`): ``ValueError``; a ``fn`` that
    is not callable with that signature: ``TypeError``.

    Caching: a run's cache key holds the name and :attr:`CustomLoss.source_sha256`, the hash of
    ``fn``'s source (with its defaults and closed-over values) taken now, so editing the function
    and registering it again gives new runs. Helpers or globals it calls are not part of the hash:
    rename the loss (or pass ``use_cache=False``) when only they change. When ``fn`` has no
    readable source (a C function, ``functools.partial``, a callable object), its runs are
    computed every time and not cached (``run_grid`` warns once). Worker processes
    (``run_grid(workers=N)``) import ``fn`` by module and name; a function they cannot import
    (defined in a notebook or ``__main__``) runs in the parent process instead.
    The command line (``python -m dkl_lib.experiments``) knows only the built-in losses.

    >>> def sym_kl(logits, target_logits, *, targets, class_prior, temperature):
    ...     return {"kl_fwd": kl_loss(logits, target_logits, temperature=temperature),
    ...             "kl_rev": kl_loss(target_logits, logits, temperature=temperature)}
    >>> register_loss("sym-kl", sym_kl, description="KL(t||s) + KL(s||t)")
    """
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(("-gi", "-nogi")):
        raise ValueError(f"loss name {name!r} must be lowercase letters, digits and _ in words joined by '-' "
                         "(e.g. 'ikl-student-weights'), not ending in '-gi' or '-nogi'")
    if name in BUILTIN_NAMES:
        raise ValueError(f"{name!r} is a built-in loss; register yours under another name")
    if not callable(fn):
        raise TypeError(f"fn of loss {name!r} must be callable, got {type(fn).__name__}")
    if not isinstance(uses_prior, bool):
        raise TypeError(f"uses_prior must be True or False, got {uses_prior!r}")
    if not isinstance(description, str):
        raise TypeError(f"description must be a string, got {type(description).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (some C functions): checked at call time
        signature = None
    if signature is not None:
        try:
            signature.bind(None, None, targets=None, class_prior=None, temperature=1.0)
        except TypeError as err:
            raise TypeError(f"fn of loss {name!r} must take (logits, target_logits, *, targets, class_prior, "
                            f"temperature); its signature is {name}{signature} ({err})") from None
    record = CustomLoss(name=name, fn=fn, uses_prior=uses_prior, description=description,
                        source_sha256=_fingerprint(fn), import_path=_import_path(fn))
    _REGISTRY[name] = record
    return record


def unregister_loss(name: str) -> None:
    """Remove the registered loss ``name`` (``ValueError`` for a built-in or unknown name)."""
    if name in BUILTIN_NAMES:
        raise ValueError(f"{name!r} is a built-in loss and cannot be unregistered")
    if name not in _REGISTRY:
        raise ValueError(f"no loss {name!r} is registered; registered: {sorted(_REGISTRY)}")
    del _REGISTRY[name]


def registered_losses() -> Dict[str, CustomLoss]:
    """The registered losses, name → :class:`CustomLoss` (a copy; change it with
    :func:`register_loss` / :func:`unregister_loss`)."""
    return dict(_REGISTRY)


@contextlib.contextmanager
def custom_loss(name: str, fn: Callable[..., Terms], *, uses_prior: bool = False,
                description: str = "") -> Iterator[CustomLoss]:
    """:func:`register_loss` for a ``with`` block (tests, one-off comparisons): afterwards the name
    is unregistered again, or an earlier registration under it restored."""
    before = _REGISTRY.get(name)
    record = register_loss(name, fn, uses_prior=uses_prior, description=description)
    try:
        yield record
    finally:
        if before is not None:
            _REGISTRY[name] = before
        else:
            _REGISTRY.pop(name, None)
