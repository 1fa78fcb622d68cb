"""L∞ attacks and an honest robustness evaluation, for adversarial training (notebook 04).

Images live in [0, 1]; the normalisation is part of the model (:class:`Normalized`), so an
ε-ball is an ε-ball in pixel space and every attack clips to [0, 1].

* :func:`pgd`: untargeted L∞ PGD on the cross-entropy (Madry et al., 2018) with a uniform random
  start in the ε-ball and restarts. Per sample it keeps the FIRST iterate that is misclassified
  (any point of the ε-ball that fools the model is a valid adversarial example), so with the same
  seed and step size a longer run only continues a shorter one and cannot find fewer
  adversarial examples.
* :func:`trades_perturb`: the TRADES inner maximisation (Zhang et al., 2019): PGD on
  KL(f(x) ‖ f(x′)) (``dkl_lib.losses.kl_loss(f(x′), f(x))``) from x + 0.001·N(0, 1).
* :func:`ensemble_attack`: an **AutoAttack-style ensemble run by the Adversarial Robustness
  Toolbox** (ART, ``art.attacks.evasion.AutoAttack``) with an explicit attack list
  (:data:`ENSEMBLE_ATTACKS`: APGD-CE, APGD-DLR, Square). It is *not* the official AutoAttack of
  Croce & Hein (no targeted APGD-T, no FAB-T, ART's implementations), so its numbers are reported
  as "AutoAttack-style (ART)" and are not comparable one-to-one with RobustBench.
* :func:`evaluate_robustness`: clean accuracy, PGD-k for several k with restarts, the ensemble,
  and built-in sanity checks (:data:`CHECKS`) reported in the result; a broken check raises
  :class:`SanityCheckError` (``strict=True``, the default) and a large PGD-vs-ensemble gap gives a
  :class:`GradientMaskingWarning`.

Every attack puts the model in eval mode while it runs and restores the mode it found (and the
parameters' ``.grad``, which ART fills), and never changes the model's weights or buffers.
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (check_finite_values, check_label_range, check_model_output, check_module, check_seed,
                      check_unit_range, value_range)
from ._checks import check_number as _number
from .losses import kl_loss

__all__ = [
    "Normalized",
    "normalized",
    "PGDResult",
    "pgd",
    "trades_perturb",
    "ENSEMBLE_ATTACKS",
    "EnsembleResult",
    "ensemble_attack",
    "check_ensemble_attacks",
    "require_ensemble",
    "EnsembleUnavailableError",
    "CHECKS",
    "RobustnessReport",
    "SanityCheckError",
    "GradientMaskingWarning",
    "evaluate_robustness",
    "accuracy_vs_epsilon",
    "class_separation",
    "clean_correct",
    "predict",
    "bf16_autocast",
]

#: The attacks of :func:`ensemble_attack`, in the order ART runs them (each one only on the samples
#: the previous ones did not break).
ENSEMBLE_ATTACKS = ("apgd-ce", "apgd-dlr", "square")

#: The sanity checks of :func:`evaluate_robustness`: name -> what it verifies. "gradient_masking"
#: is a flag (status "warn"), the others fail (status "fail").
CHECKS = {
    "eval_mode": "every module ran in eval mode and no weight or buffer (BatchNorm statistics) changed",
    "inputs_in_range": "the clean inputs lie in [0, 1]",
    "adversarial_in_ball": "every adversarial input lies in [0, 1] and within ε of its clean input (L∞)",
    "eps0_equals_clean": "PGD with ε = 0 leaves the inputs unchanged and gives exactly the clean accuracy",
    "more_steps_not_higher": "PGD accuracy never rises with more steps (same seed and step size)",
    "ensemble_not_above_pgd": "the ensemble's robust accuracy is not above PGD's",
    "art_matches_model": "ART's wrapper predicts the same classes as the model on the clean inputs",
    "gradient_masking": "the ensemble (incl. the gradient-free Square attack) is not far below PGD",
}


# ------------------------------------------------------------------------------------ validation
def _int(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_ensemble_attacks(attacks, *, name: str = "attacks", gradient_first: bool = False) -> Tuple[str, ...]:
    """``attacks`` as a tuple of names from :data:`ENSEMBLE_ATTACKS`, each at most once.

    With ``gradient_first``, every gradient attack (APGD) must come before the gradient-free Square:
    each attack of the ensemble runs only on the samples the earlier ones did not break, so the share
    of samples Square breaks (the gradient-masking flag of :func:`evaluate_robustness`) means "what the
    gradient attacks missed" only when Square runs last.

    Raises:
        TypeError: not a list or tuple of strings (a single string is refused: "square" is not three attacks).
        ValueError: empty, an unknown name, a name listed twice, or (``gradient_first``) Square before an APGD.
    """
    if isinstance(attacks, (str, bytes)) or not isinstance(attacks, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of attack names from {list(ENSEMBLE_ATTACKS)}, "
                        f"got {attacks!r}")
    attacks = tuple(attacks)
    if not attacks:
        raise ValueError(f"{name} is empty; pass at least one of " + ", ".join(ENSEMBLE_ATTACKS))
    for attack in attacks:
        if not isinstance(attack, str) or attack not in ENSEMBLE_ATTACKS:
            raise ValueError(f"unknown ensemble attack {attack!r} in {name}; choose from {list(ENSEMBLE_ATTACKS)}")
    repeated = sorted({a for a in attacks if attacks.count(a) > 1})
    if repeated:
        raise ValueError(f"{name} lists {', '.join(repeated)} more than once ({list(attacks)}); the ensemble "
                         "counts the samples each attack broke first, by name")
    if gradient_first and "square" in attacks:
        late = [a for a in attacks[attacks.index("square") + 1:] if a != "square"]
        if late:
            raise ValueError(f"{name} runs square before {', '.join(late)} ({list(attacks)}): put the gradient "
                             "attacks first; each attack runs on what the earlier ones left, and the gradient-"
                             "masking check counts what the gradient-free Square broke after the gradient attacks")
    return attacks


def _check_logits(logits, y: Optional[torch.Tensor] = None) -> None:
    """The model returned (B, classes) logits, and every label of ``y`` is one of those classes
    (first batch only: the label check reads back one min/max)."""
    check_model_output("model", logits)
    if y is not None:
        check_label_range("y", y, logits.shape[1])


def _check_xy(x, y=None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError("x must be a floating-point tensor of shape (N, ...) (images in [0, 1])")
    if x.shape[0] == 0:
        raise ValueError("x is empty (N = 0)")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise ValueError(f"y must be an int64 tensor of shape ({x.shape[0]},) with the class of each "
                             f"sample, got {getattr(y, 'dtype', type(y).__name__)} of shape "
                             f"{tuple(getattr(y, 'shape', ()))}")
        if y.device != x.device:
            raise ValueError(f"x and y are on different devices ({x.device} and {y.device})")


# ------------------------------------------------------------------------------- the model wrapper
class Normalized(nn.Module):
    """``model((x - mean) / std)``: puts the per-channel normalisation inside the model.

    Attacks and adversarial training then work on images in [0, 1], where the ε-ball and the
    clipping are defined. ``mean`` and ``std`` are buffers (they move with ``.to()`` and are
    saved in the state dict, under ``mean``/``std``; the wrapped model's keys get ``model.``).

    Args:
        model: any module that takes normalised images.
        mean, std: one value per channel (e.g. ``data.mean``, ``data.std``).
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        check_module("model", model)
        try:
            if isinstance(mean, (str, bytes)) or isinstance(std, (str, bytes)):
                raise TypeError
            mean = torch.as_tensor([float(v) for v in mean], dtype=torch.float32)
            std = torch.as_tensor([float(v) for v in std], dtype=torch.float32)
        except (TypeError, ValueError):
            raise TypeError(f"mean and std must be sequences of numbers (one per channel), got {mean!r} and "
                            f"{std!r}") from None
        if mean.dim() != 1 or mean.shape != std.shape or mean.numel() == 0:
            raise ValueError(f"mean and std need one value per channel, got {tuple(mean.shape)} and "
                             f"{tuple(std.shape)}")
        if not bool(torch.isfinite(mean).all()) or not bool((std > 0).all()):
            raise ValueError(f"mean must be finite and std positive, got {mean.tolist()} and {std.tolist()}")
        self.model = model
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:  # a shape check, free: broadcasting would hide it
            raise ValueError(f"Normalized has {self.mean.shape[1]} channel(s) of mean/std, but x has shape "
                             f"{tuple(x.shape)}; expected (N, {self.mean.shape[1]}, H, W)")
        mean, std = self.mean.to(x.dtype), self.std.to(x.dtype)
        return self.model((x - mean) / std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def normalized(model: nn.Module, data) -> Normalized:
    """``Normalized(model, data.mean, data.std)`` for a :class:`dkl_lib.data.TensorData`."""
    return Normalized(model, data.mean, data.std)


# ----------------------------------------------------------------------------------- mode handling
@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode inside the block; afterwards the training flag of EVERY submodule is restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def bf16_autocast(device, enabled: bool):
    """bf16 autocast for ``device`` ("cuda" or "cpu") when ``enabled``, else a no-op context.

    The trainers turn it on by default on CUDA only. On the CPU it runs when asked for
    (``amp=True``): slower than float32 on most CPUs, but the same mixed-precision code path as a
    GPU run, so that path can be checked without a GPU. Other device types: no autocast.
    float64 tensors are never cast (autocast leaves them alone).
    """
    device_type = torch.device(device).type
    if enabled and device_type in ("cuda", "cpu"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _mean_percent(mask: torch.Tensor) -> float:
    """100 × the fraction of True in a bool tensor (NaN when empty), counted on its device and
    divided in Python: the float64 mean, bit for bit, on devices without float64 too (MPS)."""
    n = mask.numel()
    return 100.0 * (int(mask.sum()) / n) if n else math.nan


def _random_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _project(x_adv: torch.Tensor, x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Nearest point of the ε-ball around x (L∞) inside [0, 1]."""
    return torch.min(torch.max(x_adv, x - epsilon), x + epsilon).clamp_(0.0, 1.0)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """Predicted classes (N,) int64 of the model in eval mode (its mode restored)."""
    check_module("model", model)
    _check_xy(x)
    batch_size = _int("batch_size", batch_size, 1)
    out = []
    with _eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            logits = model(x[start:start + batch_size].to(_model_dtype(model)))
            check_model_output("model", logits)
            out.append(logits.argmax(dim=1))
    return torch.cat(out)


@torch.no_grad()
def clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """Bool tensor (N,): is each sample classified correctly (model in eval mode, mode restored)?"""
    check_module("model", model)
    _check_xy(x, y)
    batch_size = _int("batch_size", batch_size, 1)
    out = []
    dtype = _model_dtype(model)
    with _eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            logits = model(x[start:start + batch_size].to(dtype))
            if start == 0:  # labels beyond the model's classes would count as silently wrong
                _check_logits(logits, y)
            out.append(logits.argmax(dim=1) == y[start:start + batch_size])
    return torch.cat(out)


# -------------------------------------------------------------------------------------------- PGD
@dataclass
class PGDResult:
    """What :func:`pgd` returns.

    Attributes:
        x_adv: (N, ...) adversarial inputs: per sample the first misclassified iterate found, else
            the last iterate of the last restart.
        correct: (N,) bool: True where every iterate of every restart was classified correctly
            (the sample resisted the attack). It does NOT look at the clean input; the robust
            accuracy of :func:`evaluate_robustness` also requires the clean input to be correct.
        seconds: wall time.
    """

    x_adv: torch.Tensor
    correct: torch.Tensor
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        """Percentage of samples that resisted the attack."""
        return _mean_percent(self.correct)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epsilon: float, steps: int = 20,
        step_size: Optional[float] = None, restarts: int = 1, random_start: bool = True,
        seed: int = 0, batch_size: int = 500) -> PGDResult:
    """Untargeted L∞ PGD on the cross-entropy, with random start and restarts.

    Each restart starts at clip(x + U(-ε, ε), 0, 1) (or x with ``random_start=False``) and takes
    ``steps`` signed-gradient steps x′ ← Π(x′ + step_size · sign(∇ CE(f(x′), y))), Π = projection
    onto the ε-ball ∩ [0, 1]. A sample counts as broken as soon as any iterate is misclassified,
    and later restarts only attack the samples still standing. The model runs in eval mode (its
    mode is restored afterwards); gradients are taken with respect to the input only, so no
    parameter's ``.grad`` changes.

    Args:
        model: maps images in [0, 1] to logits (wrap it in :class:`Normalized`).
        x: (N, C, H, W) images in [0, 1]; y: (N,) int64 labels, on x's device.
        epsilon: L∞ radius ε >= 0 (ε = 0 returns x unchanged).
        steps: k >= 0 gradient steps per restart (PGD-k).
        step_size: default ε/4 (2/255 at ε = 8/255); the same for every k, so with the same seed
            PGD-50 continues PGD-20's trajectories.
        restarts: random restarts (>= 1). seed: fixes the random starts (drawn on the CPU).
        batch_size: samples per forward pass.

    Returns:
        :class:`PGDResult` (x_adv, correct, accuracy).

    Raises:
        ValueError: x not finite or outside [0, 1], labels y out of the model's class range, or a
            bad ε, step count, restart count or batch size. TypeError: a non-integer seed.

    Notebook: 04_adversarial_training.
    """
    check_module("model", model)
    _check_xy(x, y)
    check_unit_range("x", x)
    return _pgd(model, x, y, epsilon=epsilon, steps=steps, step_size=step_size, restarts=restarts,
                random_start=random_start, seed=seed, batch_size=batch_size)


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epsilon, steps, step_size, restarts,
         random_start, seed, batch_size) -> PGDResult:
    """:func:`pgd` without the checks of model, x and y (its callers in this module made them)."""
    epsilon = _number("epsilon", epsilon, low=0.0)
    steps = _int("steps", steps, 0)
    restarts = _int("restarts", restarts, 1)
    batch_size = _int("batch_size", batch_size, 1)
    step_size = epsilon / 4.0 if step_size is None else _number("step_size", step_size, low=0.0)
    seed = check_seed("seed", seed)
    start = time.perf_counter()
    gen = _random_generator(seed)
    dtype = _model_dtype(model)
    x = x.detach()
    x_adv_all = x.clone()
    correct_all = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    labels_checked = False
    with _eval_mode(model), torch.enable_grad():
        for b0 in range(0, x.shape[0], batch_size):
            xb, yb = x[b0:b0 + batch_size], y[b0:b0 + batch_size]
            best = xb.clone()
            correct = torch.ones(xb.shape[0], dtype=torch.bool, device=x.device)
            for _ in range(restarts):
                # the random start is drawn for the whole batch, so the draws do not depend on
                # which samples are still standing (same seed, same starts for every k)
                noise = (torch.rand(xb.shape, generator=gen, dtype=torch.float64) * 2 - 1) if random_start else None
                idx = correct.nonzero().flatten()
                if idx.numel() == 0:
                    continue
                x0, y0 = xb[idx], yb[idx]
                xa = x0.clone()
                if noise is not None and epsilon > 0:
                    xa = _project(x0 + (noise[idx.cpu()] * epsilon).to(x0.device, x0.dtype), x0, epsilon)
                alive = torch.ones(idx.numel(), dtype=torch.bool, device=x.device)
                for t in range(steps + 1):
                    xa = xa.detach().requires_grad_(t < steps)
                    logits = model(xa.to(dtype))
                    if not labels_checked:  # the first forward tells the number of classes
                        _check_logits(logits, y)
                        labels_checked = True
                    wrong = (logits.argmax(dim=1) != y0) & alive
                    if bool(wrong.any()):
                        best[idx[wrong]] = xa.detach()[wrong]
                        alive &= ~wrong
                    if t == steps:
                        break
                    loss = F.cross_entropy(logits.float(), y0, reduction="sum")
                    (grad,) = torch.autograd.grad(loss, xa)
                    xa = _project(xa.detach() + step_size * grad.sign(), x0, epsilon)
                still = idx[alive]
                best[still] = xa.detach()[alive]
                correct[idx] = alive
            x_adv_all[b0:b0 + batch_size] = best
            correct_all[b0:b0 + batch_size] = correct
    return PGDResult(x_adv=x_adv_all, correct=correct_all, seconds=time.perf_counter() - start)


def trades_perturb(model: nn.Module, x: torch.Tensor, *, epsilon: float, steps: int = 10,
                   step_size: Optional[float] = None, generator: Optional[torch.Generator] = None,
                   natural_logits: Optional[torch.Tensor] = None, amp: bool = False,
                   start_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The TRADES inner maximisation: x′ maximising KL(f(x) ‖ f(x′)) in the ε-ball (L∞).

    Starts at x + 0.001·N(0, 1) and takes ``steps`` signed-gradient ascent steps on
    ``kl_loss(f(x′), f(x))`` (the natural output f(x) is the fixed target; ``dkl_lib.losses.kl_loss``
    with T = 1), projecting onto the ε-ball ∩ [0, 1] after each. The model runs in eval mode (its
    mode is restored afterwards), as in the official TRADES and IKL-AT code; no parameter's
    ``.grad`` changes.

    Args:
        model: maps images in [0, 1] to logits. x: (B, C, H, W) in [0, 1].
        epsilon: L∞ radius ε >= 0. steps: ascent steps (TRADES: 10; the IKL-AT code: 5).
        step_size: default ε/4 (TRADES uses 0.007 at ε = 0.031).
        generator: CPU generator for the N(0, 1) start (drawn on the CPU, then moved).
        natural_logits: f(x) if already computed in eval mode (detached); else computed here.
        amp: bf16 autocast (:func:`bf16_autocast`; the trainers pass theirs).
        start_noise: the N(0, 1) draw of the start (x's shape) to use instead of drawing one from
            ``generator``; a distributed trainer draws it for the global batch and passes each
            rank its rows, so the start equals that of a one-process run.

    Returns:
        x′ (detached), same shape, dtype and device as x (the model sees it in its own dtype, as
        in :func:`pgd`).

    Raises:
        ValueError: x not finite or outside [0, 1], or a bad ε or step count.

    Notebook: 04_adversarial_training.
    """
    check_module("model", model)
    _check_xy(x)
    check_unit_range("x", x)
    epsilon = _number("epsilon", epsilon, low=0.0)
    steps = _int("steps", steps, 0)
    step_size = epsilon / 4.0 if step_size is None else _number("step_size", step_size, low=0.0)
    x = x.detach()
    dtype = _model_dtype(model)
    autocast = bf16_autocast(x.device, amp)
    if start_noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    else:
        if not isinstance(start_noise, torch.Tensor) or tuple(start_noise.shape) != tuple(x.shape):
            raise ValueError(f"start_noise must be a tensor of x's shape {tuple(x.shape)}, got "
                             f"{getattr(start_noise, 'shape', type(start_noise).__name__)}")
        noise = start_noise
    noise = noise.to(x.device, x.dtype)
    x_adv = _project(x + 0.001 * noise, x, epsilon)
    with _eval_mode(model), torch.enable_grad():
        if natural_logits is None:
            with torch.no_grad(), autocast:
                natural_logits = model(x.to(dtype))
        target = natural_logits.detach().float()
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            with autocast:
                logits = model(x_adv.to(dtype))
            loss = kl_loss(logits.float(), target)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = _project(x_adv.detach() + step_size * grad.sign(), x, epsilon)
    return x_adv.detach()


# --------------------------------------------------------------------------------- ART ensemble
@dataclass
class EnsembleResult:
    """What :func:`ensemble_attack` returns.

    Attributes:
        x_adv: (N, ...) the ensemble's adversarial inputs (the clean input where nothing worked).
        correct: (N,) bool: classified correctly at x_adv (by the model itself, not by ART).
        broken_by: (N,) int64: index into ``attacks`` of the attack that broke the sample, -1 for
            samples no attack broke, -2 for samples already misclassified when clean (ART's
            ``AutoAttack.best_attacks``).
        attacks: the attack names in the order they ran.
        art_clean_agree: fraction of samples on which ART's wrapper and the model predict the same
            class for the clean input (1.0 when the wrapper is set up right).
        seconds: wall time.
    """

    x_adv: torch.Tensor
    correct: torch.Tensor
    broken_by: torch.Tensor
    attacks: Tuple[str, ...]
    art_clean_agree: float = 1.0
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return _mean_percent(self.correct)

    def broken_counts(self) -> Dict[str, int]:
        """{attack name: samples it broke first}, plus "robust" (the samples that survived every attack
        of the ensemble; PGD is not part of it, so this is not the worst-case robust count of
        :func:`evaluate_robustness`) and "clean misclassified"."""
        counts = {name: int((self.broken_by == i).sum()) for i, name in enumerate(self.attacks)}
        counts["robust"] = int((self.broken_by == -1).sum())
        counts["clean misclassified"] = int((self.broken_by == -2).sum())
        return counts


def _art_attacks(classifier, names, *, epsilon, apgd_iters, square_queries, batch_size):
    import numpy as np
    from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack

    out = []
    for name in names:
        if name in ("apgd-ce", "apgd-dlr"):
            out.append(AutoProjectedGradientDescent(
                estimator=classifier, norm=np.inf, eps=epsilon, eps_step=2 * epsilon,
                max_iter=apgd_iters, targeted=False, nb_random_init=1, batch_size=batch_size,
                loss_type="cross_entropy" if name == "apgd-ce" else "difference_logits_ratio",
                verbose=False))
        elif name == "square":
            out.append(SquareAttack(estimator=classifier, norm=np.inf, eps=epsilon, max_iter=square_queries,
                                    p_init=0.8, nb_restarts=1, batch_size=batch_size, verbose=False))
        else:
            raise ValueError(f"unknown ensemble attack {name!r}; choose from {list(ENSEMBLE_ATTACKS)}")
    return out


class EnsembleUnavailableError(ImportError):
    """What :func:`require_ensemble` raises when ART or multiprocess cannot be imported; the message
    says what to install and how to evaluate with PGD only (the command line prints it as its error)."""


def require_ensemble():
    """Import what :func:`ensemble_attack` needs and return ``(AutoAttack, PyTorchClassifier)``.

    Training code calls it before the first epoch, so a missing package stops a long adversarial
    run at its start instead of at its final evaluation.

    Raises:
        EnsembleUnavailableError: (an ``ImportError``) ART (``adversarial-robustness-toolbox``) or
            ``multiprocess`` is missing; the message names the missing module, the pip command, and the
            PGD-only alternative.
    """
    try:
        import multiprocess  # noqa: F401  (AutoAttack.generate imports it; ART does not declare it)
        from art.attacks.evasion import AutoAttack
        from art.estimators.classification import PyTorchClassifier
    except ImportError as err:
        missing = (getattr(err, "name", None) or "").split(".")[0] or str(err)
        raise EnsembleUnavailableError(
            f"the AutoAttack-style ensemble needs the Adversarial Robustness Toolbox and multiprocess, and "
            f"{missing!r} cannot be imported: pip install 'adversarial-robustness-toolbox>=1.20' multiprocess "
            f"(on a machine without network: benchmarks/device_wheels.sh), or evaluate with PGD only "
            f"(ensemble=False; on the command line --override eval.ensemble=false)") from err
    return AutoAttack, PyTorchClassifier


def ensemble_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epsilon: float,
                    attacks: Sequence[str] = ENSEMBLE_ATTACKS, apgd_iters: int = 100,
                    square_queries: int = 1000, batch_size: int = 256, seed: int = 0) -> EnsembleResult:
    """An AutoAttack-style ensemble from the Adversarial Robustness Toolbox (ART), L∞, ε > 0.

    Wraps the model in ``art.estimators.classification.PyTorchClassifier`` (clip values (0, 1),
    float32 numpy inputs, integer labels) and runs ``art.attacks.evasion.AutoAttack`` with the
    explicit list ``attacks`` (default :data:`ENSEMBLE_ATTACKS`): APGD-CE and APGD-DLR (untargeted,
    ``apgd_iters`` iterations, one random start, initial step 2ε as in Croce & Hein) and Square
    (``square_queries`` queries, gradient-free). Each attack runs only on the samples the earlier
    ones did not break. This is **not** the official AutoAttack (which runs APGD-CE, APGD-T,
    FAB-T and Square-5000); report its numbers as "AutoAttack-style (ART)".

    ART puts the model in eval mode and leaves parameter gradients filled; both are restored
    here. ART draws its random numbers from numpy's global generator: it is seeded with ``seed``
    for the call and its previous state restored afterwards.

    ``x``: (N, C, H, W) images in [0, 1]; ``y``: (N,) int64 labels on x's device; ``batch_size``:
    samples per forward pass. Returns an :class:`EnsembleResult` (accuracy in percent).

    Raises:
        ValueError: x not finite or outside [0, 1], epsilon <= 0 (ART refuses ε = 0; check ε = 0
            with :func:`pgd`), an unknown or repeated attack name (:func:`check_ensemble_attacks`),
            DLR with fewer than 3 classes, or a model that is not float32 (ART feeds it float32 inputs).
        TypeError: ``attacks`` not a list or tuple of names.
        EnsembleUnavailableError: (an ``ImportError``) ART (``adversarial-robustness-toolbox``) or
            ``multiprocess`` is missing.
    """
    check_module("model", model)
    _check_xy(x, y)
    check_unit_range("x", x)  # ART would clip the inputs to (0, 1) silently and attack other images
    _check_ensemble_dtype(model)
    epsilon = _number("epsilon", epsilon, low=0.0)
    if epsilon <= 0:
        raise ValueError("epsilon must be > 0 for the ART ensemble (ART refuses ε = 0; use pgd for ε = 0)")
    attacks = check_ensemble_attacks(attacks)
    apgd_iters = _int("apgd_iters", apgd_iters, 1)
    square_queries = _int("square_queries", square_queries, 1)
    batch_size = _int("batch_size", batch_size, 1)
    seed = check_seed("seed", seed)
    import numpy as np
    AutoAttack, PyTorchClassifier = require_ensemble()

    start = time.perf_counter()
    with torch.no_grad():
        logits = []
        with _eval_mode(model):
            for b0 in range(0, x.shape[0], batch_size):
                logits.append(model(x[b0:b0 + batch_size].to(_model_dtype(model))))
        _check_logits(logits[0], y)
        num_classes = logits[0].shape[1]
    if "apgd-dlr" in attacks and num_classes < 3:
        raise ValueError("APGD-DLR needs at least 3 classes")
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    np_state = np.random.get_state()
    try:
        # ART runs a model on CUDA or on the CPU, and moves it there in place: on another device (Apple
        # MPS) it attacks a CPU copy, so the caller's model stays where it is
        art_model = model if x.device.type in ("cuda", "cpu") else copy.deepcopy(model).cpu()
        with _eval_mode(model), _eval_mode(art_model):
            classifier = PyTorchClassifier(
                model=art_model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                nb_classes=num_classes, clip_values=(0.0, 1.0),
                device_type="gpu" if x.device.type == "cuda" else "cpu")
            x_np = x.detach().to(torch.float32).cpu().numpy().astype(np.float32)
            y_np = y.detach().cpu().numpy().astype(np.int64)
            art_pred = classifier.predict(x_np, batch_size=batch_size).argmax(axis=1)
            own_pred = torch.cat(logits).argmax(dim=1).cpu().numpy()
            agree = float((art_pred == own_pred).mean())
            np.random.seed(int(seed) % (2 ** 32))
            art_list = _art_attacks(classifier, attacks, epsilon=epsilon, apgd_iters=apgd_iters,
                                    square_queries=square_queries, batch_size=batch_size)
            auto = AutoAttack(estimator=classifier, norm=np.inf, eps=epsilon, eps_step=2 * epsilon,
                              attacks=art_list, batch_size=batch_size, targeted=False)
            adv_np = auto.generate(x=x_np, y=y_np)
            broken_by = torch.as_tensor(np.asarray(auto.best_attacks, dtype=np.int64))
            x_adv = torch.from_numpy(np.ascontiguousarray(adv_np)).to(x.device, x.dtype)
            correct = clean_correct(model, x_adv, y, batch_size=batch_size)
    finally:
        np.random.set_state(np_state)
        for p, g in grads:
            p.grad = g
    return EnsembleResult(x_adv=x_adv, correct=correct, broken_by=broken_by, attacks=attacks,
                          art_clean_agree=agree, seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------ sanity checking
class SanityCheckError(AssertionError):
    """A robustness evaluation failed one of its sanity checks; the message lists them and the
    report is in ``.report``."""

    def __init__(self, message: str, report: "RobustnessReport"):
        super().__init__(message)
        self.report = report


class GradientMaskingWarning(UserWarning):
    """The ensemble (with the gradient-free Square attack) found far more adversarial examples
    than PGD: PGD's gradients are probably uninformative (gradient masking), so PGD's number is
    not a robustness figure."""


class _Watch:
    """Forward pre-hooks on every submodule: counts forwards that ran in training mode, and
    snapshots the weights and buffers to detect changes."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.train_forwards = 0
        self.train_modules: set = set()
        self.forwards = 0
        self._hooks = []

    def __enter__(self):
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

        def hook(module, args, _name=None):
            self.forwards += 1
            if module.training:
                self.train_forwards += 1
                self.train_modules.add(type(module).__name__)

        self._hooks = [m.register_forward_pre_hook(hook) for m in self.model.modules()]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        now = self.model.state_dict()
        self.changed = [k for k, v in self.state.items()
                        if k not in now or now[k].shape != v.shape or not torch.equal(now[k].detach(), v)]
        return False


def _check(name: str, passed: bool, value, detail: str, *, soft: bool = False) -> dict:
    return {"check": name, "passed": bool(passed), "status": "pass" if passed else ("warn" if soft else "fail"),
            "value": value, "detail": detail, "what": CHECKS[name]}


@dataclass
class RobustnessReport:
    """What :func:`evaluate_robustness` returns (accuracies in percent).

    Attributes:
        epsilon: the L∞ radius. n: samples evaluated.
        clean_acc: clean accuracy.
        pgd_acc: {k: robust accuracy under PGD-k} (a sample counts when its clean input and every
            PGD iterate are classified correctly).
        ensemble_acc: robust accuracy under the AutoAttack-style ART ensemble (None if not run).
        robust_acc: the per-sample worst case over PGD (all k) and the ensemble: the number to
            quote as "robust accuracy" (it is never above any single attack's).
        ensemble_counts: {attack: samples it broke first, "robust", "clean misclassified"}, from
            :meth:`EnsembleResult.broken_counts`; its "robust" counts the samples that survived the
            ensemble alone, which can be more than ``robust_acc`` (that also counts PGD) implies.
        checks: one dict per sanity check: check, passed, status ("pass" / "fail" / "warn"),
            value, detail, what.
        config: the evaluation settings (JSON-able). seconds: {part: wall time}.
    """

    epsilon: float
    n: int
    clean_acc: float
    pgd_acc: Dict[int, float]
    ensemble_acc: Optional[float]
    robust_acc: float
    ensemble_counts: Dict[str, int] = field(default_factory=dict)
    checks: List[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when no check failed (a gradient-masking flag is a warning, not a failure)."""
        return all(c["status"] != "fail" for c in self.checks)

    @property
    def failed(self) -> List[str]:
        return [c["check"] for c in self.checks if c["status"] == "fail"]

    @property
    def warnings(self) -> List[str]:
        return [c["check"] for c in self.checks if c["status"] == "warn"]

    def check(self, name: str) -> dict:
        """The dict of the check ``name`` (a key of :data:`CHECKS`); KeyError when it did not run."""
        for c in self.checks:
            if c["check"] == name:
                return c
        raise KeyError(f"no check named {name!r}; checks: {[c['check'] for c in self.checks]}")

    def checks_frame(self):
        """The checks as a pandas DataFrame (check, status, passed, value, detail, what)."""
        import pandas as pd

        return pd.DataFrame(self.checks, columns=["check", "status", "passed", "value", "detail", "what"])

    def to_dict(self) -> dict:
        """JSON-able: every field, with the PGD keys as strings ("20", "50")."""
        return {"epsilon": self.epsilon, "n": self.n, "clean_acc": self.clean_acc,
                "pgd_acc": {str(k): v for k, v in self.pgd_acc.items()}, "ensemble_acc": self.ensemble_acc,
                "robust_acc": self.robust_acc, "ensemble_counts": dict(self.ensemble_counts),
                "checks": [dict(c) for c in self.checks], "passed": self.passed,
                "config": dict(self.config), "seconds": dict(self.seconds)}

    def summary(self) -> dict:
        """One flat row: epsilon, n, clean_acc, pgd<k>_acc, ensemble_acc, robust_acc, checks."""
        row = {"epsilon": self.epsilon, "n": self.n, "clean_acc": self.clean_acc}
        row.update({f"pgd{k}_acc": v for k, v in self.pgd_acc.items()})
        row.update({"ensemble_acc": self.ensemble_acc, "robust_acc": self.robust_acc,
                    "checks": "passed" if self.passed and not self.warnings else
                    ", ".join([f"FAILED {c}" for c in self.failed] + [f"flag {c}" for c in self.warnings])})
        return row


def _check_ensemble_dtype(model: nn.Module) -> None:
    """ART's PyTorchClassifier feeds the model float32 arrays: a float64 (or half) model would fail deep
    inside ART, after the other attacks had run, so it is refused first."""
    dtype = _model_dtype(model)
    if dtype != torch.float32:
        raise ValueError(f"the ART ensemble attacks float32 models (ART feeds float32 inputs); this model is "
                         f"{str(dtype).replace('torch.', '')}: evaluate a float32 copy (copy.deepcopy(model).float()), "
                         "or run the PGD attacks alone (ensemble=False)")


def evaluate_robustness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epsilon: float,
                        pgd_steps: Sequence[int] = (20, 50), pgd_restarts: int = 1,
                        pgd_step_size: Optional[float] = None, ensemble: bool = True,
                        ensemble_attacks: Sequence[str] = ENSEMBLE_ATTACKS, apgd_iters: int = 100,
                        square_queries: int = 1000, masking_gap: float = 10.0, blackbox_gap: float = 1.0,
                        ensemble_tolerance: float = 0.0, batch_size: int = 500, seed: int = 0,
                        strict: bool = True) -> RobustnessReport:
    """Clean accuracy, PGD-k with restarts and the ART ensemble, with sanity checks built in.

    Runs, on images x in [0, 1] with labels y: the clean accuracy; PGD-k (:func:`pgd`) for each k
    in ``pgd_steps`` with ``pgd_restarts`` restarts, the same seed and the same step size; PGD
    with ε = 0; and (``ensemble=True``) :func:`ensemble_attack`. Then checks (:data:`CHECKS`):

    * ``eval_mode``: every module ran in eval mode and no weight or buffer changed;
    * ``inputs_in_range``: x within [0, 1];
    * ``adversarial_in_ball``: every adversarial input within [0, 1] and ε of x;
    * ``eps0_equals_clean``: PGD at ε = 0 returns x itself and exactly the clean accuracy;
    * ``more_steps_not_higher``: PGD accuracy is non-increasing in k;
    * ``ensemble_not_above_pgd``: ensemble accuracy <= the lowest PGD accuracy + ``ensemble_tolerance``;
    * ``art_matches_model``: ART's wrapper predicts what the model predicts on clean inputs;
    * ``gradient_masking`` (a flag, status "warn", with a :class:`GradientMaskingWarning`): the
      lowest PGD accuracy exceeds the ensemble accuracy by more than ``masking_gap`` percentage
      points, or the gradient-free Square attack breaks samples that the gradient attacks (PGD,
      APGD) could not, more than ``blackbox_gap`` percent of all the evaluated samples: the
      signature of gradients that do not point toward adversarial examples. (APGD beating PGD by
      a few points is normal: it is the stronger gradient attack; Square adding anything
      noticeable is not.)

    Args:
        model: maps [0, 1] images to logits (a :class:`Normalized` model); on x's device.
        x, y: images (N, C, H, W) and int64 labels (N,).
        epsilon: L∞ radius ε > 0.
        pgd_steps: the k of PGD-k (default 20 and 50). pgd_restarts, pgd_step_size: see :func:`pgd`.
        ensemble, ensemble_attacks, apgd_iters, square_queries: see :func:`ensemble_attack`; the
            gradient attacks must come before Square (:func:`check_ensemble_attacks` with
            ``gradient_first``), or the gradient-masking flag would count samples Square broke first.
        masking_gap, blackbox_gap, ensemble_tolerance: thresholds in percentage points (see above).
        batch_size: samples per forward pass. seed: fixes every random start.
        strict: raise :class:`SanityCheckError` when a check fails (after running everything).

    Returns:
        :class:`RobustnessReport`.

    Notebook: 04_adversarial_training.
    """
    check_module("model", model)
    _check_xy(x, y)
    epsilon = _number("epsilon", epsilon, low=0.0)
    if epsilon <= 0:
        raise ValueError("epsilon must be > 0 (the ε = 0 case is one of the built-in checks)")
    steps = sorted({_int("pgd_steps entries", k, 1) for k in pgd_steps})
    if not steps:
        raise ValueError("pgd_steps is empty")
    masking_gap = _number("masking_gap", masking_gap, low=0.0)
    blackbox_gap = _number("blackbox_gap", blackbox_gap, low=0.0)
    ensemble_tolerance = _number("ensemble_tolerance", ensemble_tolerance, low=0.0)
    if ensemble:
        ensemble_attacks = check_ensemble_attacks(ensemble_attacks, name="ensemble_attacks", gradient_first=True)
    seed = check_seed("seed", seed)
    x, y = x.detach(), y.detach()
    n = x.shape[0]
    config = {"epsilon": epsilon, "pgd_steps": steps, "pgd_restarts": int(pgd_restarts),
              "pgd_step_size": epsilon / 4.0 if pgd_step_size is None else float(pgd_step_size),
              "ensemble": bool(ensemble), "ensemble_attacks": list(ensemble_attacks) if ensemble else [],
              "apgd_iters": int(apgd_iters), "square_queries": int(square_queries),
              "masking_gap": masking_gap, "blackbox_gap": blackbox_gap,
              "ensemble_tolerance": ensemble_tolerance, "seed": int(seed),
              "n": n, "ensemble_library": _art_version() if ensemble else None}
    seconds: Dict[str, float] = {}
    checks: List[dict] = []
    if ensemble:
        _check_ensemble_dtype(model)  # before the PGD runs, not after them
    lo, hi = value_range(x)  # out of range is reported (a check), not refused as pgd refuses it
    in_range = lo >= 0.0 and hi <= 1.0
    checks.append(_check("inputs_in_range", in_range, [lo, hi],
                         f"inputs span [{lo:.4g}, {hi:.4g}]" + ("" if in_range else
                         " -- pass raw images in [0, 1] and put the normalisation inside the model "
                         "(dkl_lib.attacks.Normalized)" + ("; the ART ensemble was not run (it refuses such "
                                                           "inputs)" if ensemble else ""))))
    with _Watch(model) as watch:
        t0 = time.perf_counter()
        clean = clean_correct(model, x, y, batch_size=batch_size)
        seconds["clean"] = time.perf_counter() - t0
        clean_acc = _mean_percent(clean)
        zero = _pgd(model, x, y, epsilon=0.0, steps=steps[0], step_size=config["pgd_step_size"],
                    restarts=1, random_start=True, seed=seed, batch_size=batch_size)
        seconds["pgd_eps0"] = zero.seconds
        runs = {}
        for k in steps:
            runs[k] = _pgd(model, x, y, epsilon=epsilon, steps=k, step_size=pgd_step_size,
                           restarts=pgd_restarts, random_start=True, seed=seed, batch_size=batch_size)
            seconds[f"pgd{k}"] = runs[k].seconds
        ens = None
        if ensemble and in_range:  # (out of range: the failed check above is the report)
            ens = ensemble_attack(model, x, y, epsilon=epsilon, attacks=ensemble_attacks,
                                  apgd_iters=apgd_iters, square_queries=square_queries,
                                  batch_size=min(batch_size, 256), seed=seed)
            seconds["ensemble"] = ens.seconds
    # ---- checks
    ok = watch.train_forwards == 0 and not watch.changed
    detail = "all forwards in eval mode; weights and buffers unchanged"
    if watch.train_forwards:
        detail = (f"{watch.train_forwards} of {watch.forwards} module forwards ran in TRAINING mode "
                  f"({', '.join(sorted(watch.train_modules))}): the model ignores eval() or was switched back")
    if watch.changed:
        detail += f"; changed during evaluation: {', '.join(watch.changed[:5])}"
    checks.append(_check("eval_mode", ok, watch.train_forwards, detail))

    worst = 0.0
    for name, adv in [(f"pgd{k}", r.x_adv) for k, r in runs.items()] + ([("ensemble", ens.x_adv)] if ens else []):
        dist = (adv - x).abs().flatten(1).amax(dim=1).max().item()
        outside = max(0.0, -float(adv.min()), float(adv.max()) - 1.0)
        worst = max(worst, dist - epsilon, outside)
    tol = 1e-4 * epsilon + 1e-6
    checks.append(_check("adversarial_in_ball", worst <= tol, worst,
                         "largest excess over ε or outside [0, 1]: " + f"{worst:.3g} (tolerance {tol:.1g})"))

    zero_acc = zero.accuracy
    same_x = bool(torch.equal(zero.x_adv, x))
    eq = same_x and zero_acc == clean_acc and bool(torch.equal(zero.correct, clean))
    checks.append(_check("eps0_equals_clean", eq, zero_acc,
                         f"PGD-{steps[0]} at ε = 0: {zero_acc:.2f}% vs clean {clean_acc:.2f}%"
                         + ("" if same_x else "; the inputs were changed")))

    pgd_acc = {k: _mean_percent(clean & r.correct) for k, r in runs.items()}
    accs = [pgd_acc[k] for k in steps]
    mono = all(b <= a for a, b in zip(accs, accs[1:]))
    checks.append(_check("more_steps_not_higher", mono, accs,
                         ", ".join(f"PGD-{k}: {pgd_acc[k]:.2f}%" for k in steps)))

    robust = clean.clone()
    for r in runs.values():
        robust &= r.correct
    pgd_min = min(accs)
    ensemble_acc = None
    counts: Dict[str, int] = {}
    if ens is not None:
        ens_correct = clean & ens.correct
        ensemble_acc = _mean_percent(ens_correct)
        robust &= ens.correct
        counts = ens.broken_counts()
        checks.append(_check("ensemble_not_above_pgd", ensemble_acc <= pgd_min + ensemble_tolerance,
                             ensemble_acc - pgd_min,
                             f"ensemble {ensemble_acc:.2f}% vs lowest PGD {pgd_min:.2f}%"
                             + (f" (tolerance {ensemble_tolerance:g})" if ensemble_tolerance else "")))
        checks.append(_check("art_matches_model", ens.art_clean_agree == 1.0, ens.art_clean_agree,
                             f"ART and the model agree on {100 * ens.art_clean_agree:.2f}% of clean inputs"))
        pgd_robust = clean.clone()
        for r in runs.values():
            pgd_robust &= r.correct
        extra = pgd_robust & ~ens.correct
        broken_by = ens.broken_by.to(extra.device)
        by = {name: int((extra & (broken_by == i)).sum()) for i, name in enumerate(ens.attacks)}
        gap = pgd_min - ensemble_acc
        blackbox = 100.0 * by.get("square", 0) / n
        masked = gap > masking_gap or blackbox > blackbox_gap
        checks.append(_check("gradient_masking", not masked, gap,
                             f"PGD - ensemble = {gap:.2f} points (flag above {masking_gap:g}); Square "
                             f"(gradient-free) broke {blackbox:.2f}% that the gradient attacks missed (flag "
                             f"above {blackbox_gap:g}); samples PGD missed, by the attack that broke them: {by}",
                             soft=True))
    robust_acc = _mean_percent(robust)
    report = RobustnessReport(epsilon=epsilon, n=n, clean_acc=clean_acc, pgd_acc=pgd_acc,
                              ensemble_acc=ensemble_acc, robust_acc=robust_acc, ensemble_counts=counts,
                              checks=checks, config=config, seconds=seconds)
    if report.warnings:
        warnings.warn("possible gradient masking: " + report.check("gradient_masking")["detail"]
                      + "; PGD's accuracy is not a robustness figure for this model",
                      GradientMaskingWarning, stacklevel=2)
    if strict and not report.passed:
        lines = [f"  {c['check']}: {c['detail']}" for c in checks if c["status"] == "fail"]
        raise SanityCheckError("robustness evaluation failed its sanity checks:\n" + "\n".join(lines)
                               + "\n(pass strict=False to get the report anyway)", report)
    return report


def _art_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return "adversarial-robustness-toolbox " + version("adversarial-robustness-toolbox")
    except Exception:  # noqa: BLE001 - not installed
        return None


# ------------------------------------------------------------------------------------- helpers
def accuracy_vs_epsilon(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: Sequence[float], *,
                        steps: int = 20, restarts: int = 1, seed: int = 0, batch_size: int = 500):
    """PGD-k robust accuracy (percent; clean input and every iterate correct) for each ε, as a
    pandas DataFrame with columns epsilon, accuracy, steps. ε = 0 gives the clean accuracy."""
    import pandas as pd

    if isinstance(epsilons, (str, bytes)):
        raise TypeError(f"epsilons must be a sequence of numbers, got {epsilons!r}")
    epsilons = list(epsilons)
    if not epsilons:
        raise ValueError("epsilons is empty; pass at least one ε (0 gives the clean accuracy)")
    clean = clean_correct(model, x, y, batch_size=batch_size)
    check_unit_range("x", x)  # once, not once per ε
    rows = []
    for eps in epsilons:
        eps = _number("epsilons entries", eps, low=0.0)
        r = _pgd(model, x, y, epsilon=eps, steps=steps, step_size=None, restarts=restarts, random_start=True,
                 seed=seed, batch_size=batch_size)
        rows.append({"epsilon": eps, "accuracy": _mean_percent(clean & r.correct),
                     "steps": steps})
    return pd.DataFrame(rows)


@torch.no_grad()
def class_separation(x: torch.Tensor, y: torch.Tensor, *, chunk: int = 256) -> float:
    """The smallest L∞ distance between two images with different labels (Yang et al., 2020).

    An ε below half of it cannot move an image into an L∞ ball of radius ε around an image of
    another class, so a perfectly robust classifier exists at that ε (notebook 04 uses this to
    justify the ε of the digits data).
    """
    _check_xy(x, y)
    chunk = _int("chunk", chunk, 1)
    check_finite_values("x", x)
    flat = x.detach().flatten(1).cpu().to(torch.float64)  # on the CPU: MPS has no float64
    y = y.cpu()
    best = math.inf
    for start in range(0, flat.shape[0], chunk):
        d = torch.cdist(flat[start:start + chunk], flat, p=math.inf)
        other = y[start:start + chunk, None] != y[None, :]
        if bool(other.any()):
            best = min(best, float(d[other].min()))
    return best
