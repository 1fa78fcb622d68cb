"""Gradient analysis: analytic gradients of KL, per-term gradients of the decoupled losses, and
a numerical check of the KL ≡ DKL theorem.

All gradients are those of the batch-mean losses of :mod:`dkl_lib.losses` (so a row of a
B-row batch carries a factor 1/B). Notebooks 01 and 02 build on these functions.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from . import losses
from ._checks import check_logits_pair, check_positive, compute_dtype

__all__ = [
    "kl_grad_logits",
    "kl_grad_target_logits",
    "term_grads",
    "loss_grads",
    "relative_error",
    "check_kl_dkl_equivalence",
]

GradPair = Tuple[torch.Tensor, torch.Tensor]


def _as_wide(logits, target_logits, temperature):
    temperature = check_positive("temperature", temperature)
    check_logits_pair(logits, target_logits)
    dtype = compute_dtype(logits, target_logits)
    return logits.detach().to(dtype), target_logits.detach().to(dtype), temperature


def kl_grad_logits(logits, target_logits, *, temperature: float = 1.0) -> torch.Tensor:
    """Analytic ∂ kl_loss / ∂ logits = T (s_n − s_m) / B, shape (B, C)."""
    o_n, o_m, t = _as_wide(logits, target_logits, temperature)
    s_n = torch.softmax(o_n / t, dim=1)
    s_m = torch.softmax(o_m / t, dim=1)
    return t * (s_n - s_m) / o_n.shape[0]


def kl_grad_target_logits(logits, target_logits, *, temperature: float = 1.0) -> torch.Tensor:
    """Analytic ∂ kl_loss / ∂ target_logits = s_m ⊙ (d − Σ_j s_m,j d_j) / B, d = o_m − o_n.

    Equivalently T s_m ⊙ (log s_m − log s_n − KL_row) / B: the temperature cancels because
    log s_m − log s_n = d / T − const.
    """
    o_n, o_m, t = _as_wide(logits, target_logits, temperature)
    s_m = torch.softmax(o_m / t, dim=1)
    d = o_m - o_n
    return s_m * (d - (s_m * d).sum(dim=1, keepdim=True)) / o_n.shape[0]


def term_grads(name: str, logits, target_logits, targets=None, **hparams) -> Dict[str, GradPair]:
    """Autograd gradient of each named term of loss ``name`` w.r.t. both inputs.

    Returns ``{term: (grad_logits, grad_target_logits)}``, each (B, C), in the loss's compute dtype;
    a term that does not reach an input gives zeros there (e.g. the wMSE term of DKL on
    ``logits``). The inputs are detached copies, so the caller's tensors are untouched.
    """
    dtype = compute_dtype(logits, target_logits) if isinstance(logits, torch.Tensor) and isinstance(
        target_logits, torch.Tensor) else torch.float32
    o_n = logits.detach().to(dtype).requires_grad_(True) if isinstance(logits, torch.Tensor) else logits
    o_m = (target_logits.detach().to(dtype).requires_grad_(True)
           if isinstance(target_logits, torch.Tensor) else target_logits)
    terms = losses.loss_terms(name, o_n, o_m, targets, **hparams)
    out: Dict[str, GradPair] = {}
    for key, value in terms.items():
        grads = torch.autograd.grad(value, (o_n, o_m), retain_graph=True, allow_unused=True)
        out[key] = tuple(torch.zeros_like(o_n) if g is None else g for g in grads)
    return out


def loss_grads(name: str, logits, target_logits, targets=None, **hparams) -> GradPair:
    """Gradient of the whole loss ``name`` (sum of its terms) w.r.t. (logits, target_logits)."""
    per_term = term_grads(name, logits, target_logits, targets, **hparams).values()
    grad_logits = sum(g[0] for g in per_term)
    grad_target = sum(g[1] for g in per_term)
    return grad_logits, grad_target


def relative_error(value: torch.Tensor, reference: torch.Tensor, scale: float | None = None) -> float:
    """max |value − reference| / scale, scale = max |reference| unless given (absolute error at 0)."""
    if scale is None:
        scale = reference.abs().max().item()
    err = (value - reference).abs().max().item()
    return err / scale if scale > 0 else err


def check_kl_dkl_equivalence(logits, target_logits, *, temperature: float = 1.0) -> Dict[str, float]:
    """Check the theorem: ∇ dkl_loss(α = β = 1) = ∇ kl_loss w.r.t. both inputs.

    Computes both gradients by autograd in float64 and returns the largest error on each side,
    ``{"logits": ..., "target_logits": ...}``, relative to the largest entry of KL's gradient over
    BOTH inputs (the gradient of a function of two tensors is one vector). ≈ 1e-15 when the theorem
    holds. The error is measured against KL's own autograd, whose target-side gradient loses
    digits when s_m is nearly one-hot (it is then a tiny difference of large terms); that is why
    the scale is shared rather than per side.
    """
    o_n = logits.detach().double() if isinstance(logits, torch.Tensor) else logits
    o_m = target_logits.detach().double() if isinstance(target_logits, torch.Tensor) else target_logits
    kl = loss_grads("kl", o_n, o_m, temperature=temperature)
    dkl = loss_grads("dkl", o_n, o_m, temperature=temperature, alpha=1.0, beta=1.0)
    scale = max(kl[0].abs().max().item(), kl[1].abs().max().item())
    return {"logits": relative_error(dkl[0], kl[0], scale),
            "target_logits": relative_error(dkl[1], kl[1], scale)}
