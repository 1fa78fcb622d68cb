"""Gradient analysis: analytic gradients of KL, per-term gradients of the decoupled losses, and
a numerical check of the theorem that DKL (α = β = 1) has KL's gradients. The equivalence is of
gradients only: DKL's stop-gradients make it a surrogate whose value is not KL's (nor KL's plus a
constant).

All gradients are those of the batch-mean losses of :mod:`dkl_lib.losses` (so a row of a
B-row batch carries a factor 1/B). Notebooks 01 and 02 build on these functions.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch

from . import losses
from ._checks import check_int, check_logits_pair, check_positive, compute_dtype

__all__ = [
    "kl_grad_logits",
    "kl_grad_target_logits",
    "term_grads",
    "loss_grads",
    "relative_error",
    "check_kl_dkl_equivalence",
    # notebook 01: the derivation, numerically and symbolically
    "equivalence_table",
    "decoupled_by_autograd",
    "STOP_GRADIENT_VARIANTS",
    "stop_gradient_ablation",
    "symbolic_check",
    "wmse_cost",
    # notebook 02: the anatomy of the gradients
    "student_gradients",
    "SIMPLEX_CORNERS",
    "simplex_xy",
    "simplex_field",
    "confidence_sweep",
    "weight_matrices",
    "student_hessians",
    "margin_sweep",
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

    Equivalently T s_m ⊙ (log s_m − log s_n − KL_row) / B with KL_row = Σ_j s_m,j (log s_m,j −
    log s_n,j), the row's KL without the T² factor: the temperature cancels because
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
    for name, t in (("value", value), ("reference", reference)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if value.shape != reference.shape:
        raise ValueError(f"value and reference must have the same shape, got {tuple(value.shape)} and "
                         f"{tuple(reference.shape)}")
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
    # float64 on the CPU (Apple MPS has no float64)
    o_n = logits.detach().cpu().double() if isinstance(logits, torch.Tensor) else logits
    o_m = target_logits.detach().cpu().double() if isinstance(target_logits, torch.Tensor) else target_logits
    kl = loss_grads("kl", o_n, o_m, temperature=temperature)
    dkl = loss_grads("dkl", o_n, o_m, temperature=temperature, alpha=1.0, beta=1.0)
    scale = max(kl[0].abs().max().item(), kl[1].abs().max().item())
    return {"logits": relative_error(dkl[0], kl[0], scale),
            "target_logits": relative_error(dkl[1], kl[1], scale)}


# --------------------------------------------------------------------------------------------
# Notebook 01: the derivation, numerically and symbolically
# --------------------------------------------------------------------------------------------
def _random_pair(batch, classes, *, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=g, dtype=torch.float64) * scale,
            torch.randn(batch, classes, generator=g, dtype=torch.float64) * scale)


def equivalence_table(classes=(2, 10, 100, 1000), temperatures=(0.5, 1.0, 4.0, 10.0), *, batch: int = 4,
                      scale: float = 3.0, seed: int = 0):
    """Largest error between DKL's and KL's gradients (float64) for each C × T, as a DataFrame.

    Columns: classes, temperature, logits, target_logits (errors as in
    :func:`check_kl_dkl_equivalence`) and max_error.
    """
    import pandas as pd

    rows = []
    for c in classes:
        for t in temperatures:
            o_n, o_m = _random_pair(batch, c, scale=scale, seed=seed + c)
            err = check_kl_dkl_equivalence(o_n, o_m, temperature=t)
            rows.append(dict(classes=c, temperature=t, **err, max_error=max(err.values())))
    return pd.DataFrame(rows)


def decoupled_by_autograd(logits, target_logits, *, temperature: float = 1.0, stop_weights: bool = True,
                          stop_logits_delta: bool = True, stop_soft_labels: bool = True) -> torch.Tensor:
    """DKL (α = β = 1) written with plain autograd, each stop-gradient switchable (O(B·C)).

    With all three stop-gradients this is :func:`dkl_lib.losses.dkl_loss`; dropping
    ``stop_logits_delta`` gives IKL without global information. Used to show which stop-gradients
    the equivalence of DKL's and KL's gradients needs.
    """
    temperature = check_positive("temperature", temperature)
    check_logits_pair(logits, target_logits)
    s_m = torch.softmax(target_logits / temperature, dim=1)
    p = s_m.detach() if stop_weights else s_m
    d = target_logits - (logits.detach() if stop_logits_delta else logits)
    dev = d - (p * d).sum(dim=1, keepdim=True)  # rows of p sum to 1
    wmse_term = 0.5 * (p * dev * dev).sum(dim=1).mean()
    labels = s_m.detach() if stop_soft_labels else s_m
    soft_ce = -temperature**2 * (labels * torch.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean()
    return wmse_term + soft_ce


STOP_GRADIENT_VARIANTS = {
    "DKL (all stop-gradients)": {},
    "no S on Δ(o_n)  (= IKL)": {"stop_logits_delta": False},
    "no S on the soft labels s_m": {"stop_soft_labels": False},
    "no S on the weights w": {"stop_weights": False},
}


def stop_gradient_ablation(logits, target_logits, *, temperature: float = 1.0):
    """For each variant of :data:`STOP_GRADIENT_VARIANTS`, the gradient error against KL.

    Returns a DataFrame with columns variant, logits, target_logits (errors relative to the
    largest entry of KL's gradient over both inputs, float64).
    """
    import pandas as pd

    o_n = logits.detach().cpu().double().requires_grad_(True)  # float64 on the CPU (MPS has none)
    o_m = target_logits.detach().cpu().double().requires_grad_(True)
    kl = torch.autograd.grad(losses.kl_loss(o_n, o_m, temperature=temperature), (o_n, o_m))
    scale = max(kl[0].abs().max().item(), kl[1].abs().max().item())
    rows = []
    for name, switches in STOP_GRADIENT_VARIANTS.items():
        value = decoupled_by_autograd(o_n, o_m, temperature=temperature, **switches)
        g = torch.autograd.grad(value, (o_n, o_m))
        rows.append(dict(variant=name, logits=relative_error(g[0], kl[0], scale),
                         target_logits=relative_error(g[1], kl[1], scale)))
    return pd.DataFrame(rows)


def symbolic_check(num_classes: int = 3):
    """Symbolic proof of the theorem for small C with sympy.

    Builds KL(s_m ‖ s_n)·T² and DKL (α = β = 1) in the symbols m_j (target logits), n_j (logits)
    and T, differentiates both w.r.t. every m_j and n_j (DKL's stop-gradients: the weights, the
    soft labels and Δ(o_n) are held constant while differentiating, then substituted back) and
    simplifies the differences. Returns ``{"difference": [...], "grad_logits": [...],
    "grad_target_logits": [...]}``; every difference is 0 when the theorem holds. The returned
    gradients are KL's, simplified.
    """
    import sympy as sp

    if not isinstance(num_classes, int) or num_classes < 2 or num_classes > 4:
        raise ValueError(f"num_classes must be an int in [2, 4] (symbolic cost grows fast), got {num_classes}")
    c = num_classes
    t = sp.Symbol("T", positive=True)
    m = sp.symbols(f"m1:{c + 1}", real=True)
    n = sp.symbols(f"n1:{c + 1}", real=True)
    q = sp.symbols(f"q1:{c + 1}", positive=True)  # stand-ins for the detached s_m
    k = sp.symbols(f"k1:{c + 1}", real=True)  # stand-ins for the detached o_n

    def log_softmax(o):
        lse = sp.log(sum(sp.exp(v / t) for v in o))
        return [v / t - lse for v in o]

    log_s_m, log_s_n = log_softmax(m), log_softmax(n)
    s_m = [sp.exp(v) for v in log_s_m]
    kl = t**2 * sum(s_m[j] * (log_s_m[j] - log_s_n[j]) for j in range(c))
    wmse_term = sp.Rational(1, 4) * sum(q[i] * q[j] * ((m[i] - m[j]) - (k[i] - k[j])) ** 2
                                        for i in range(c) for j in range(c))
    soft_ce = -t**2 * sum(q[j] * log_s_n[j] for j in range(c))
    detached = {**{q[j]: s_m[j] for j in range(c)}, **{k[j]: n[j] for j in range(c)}}
    dkl = wmse_term + soft_ce
    diffs, grad_n, grad_m = [], [], []
    for var_list, out in ((n, grad_n), (m, grad_m)):
        for v in var_list:
            g_kl = sp.diff(kl, v)
            g_dkl = sp.diff(dkl, v).subs(detached)
            diffs.append(sp.simplify(sp.expand(g_kl - g_dkl)))
            out.append(sp.simplify(g_kl))
    return {"difference": diffs, "grad_logits": grad_n, "grad_target_logits": grad_m}


def wmse_cost(classes=(10, 100, 300, 1000), *, batch: int = 64, repeats: int = 3, seed: int = 0,
              threads: Optional[int] = 1):
    """Forward+backward time and largest tensor of the closed-form and the pairwise wMSE.

    A small in-notebook measurement (notebook 01); ``benchmarks/bench_losses.py`` is the real
    benchmark. Returns a DataFrame: classes, method, seconds, largest_tensor_bytes.

    ``threads``: PyTorch's CPU threads during the measurement (restored afterwards; None keeps the
    current setting). One by default: on a machine whose cores other processes use, a parallel
    kernel waits for a descheduled thread, and a 0.3 ms step then takes 10 ms.
    """
    if threads is None:
        return _wmse_cost(classes, batch, repeats, seed)
    previous = torch.get_num_threads()
    torch.set_num_threads(check_int("threads", threads))
    try:
        return _wmse_cost(classes, batch, repeats, seed)
    finally:
        torch.set_num_threads(previous)


def _wmse_cost(classes, batch, repeats, seed):
    import pandas as pd

    from .profiling import largest_tensor, median_seconds

    rows = []
    for c in classes:
        o_n, o_m = _random_pair(batch, c, scale=3.0, seed=seed)
        o_n, o_m = o_n.float().requires_grad_(True), o_m.float()
        for method, fn in (("closed form", losses.wmse), ("pairwise", losses.wmse_pairwise)):
            def run(fn=fn):
                o_n.grad = None
                fn(o_n, o_m).backward()

            seconds = median_seconds(run, repeats=repeats)
            biggest = largest_tensor(lambda fn=fn: fn(o_n, o_m)).largest_bytes
            rows.append(dict(classes=c, method=method, seconds=seconds, largest_tensor_bytes=biggest))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Notebook 02: the anatomy of the gradients on the student's logits
# --------------------------------------------------------------------------------------------
def _row(x, name):
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() != 1:
        raise ValueError(f"{name} must be a 1-D vector of C logits, got shape {tuple(x.shape)}")
    return x[None, :]


def _hparams_for(loss, *, temperature, alpha, beta, weight_temperature, gamma):
    if loss == "kl":
        return dict(temperature=temperature)
    kw = dict(temperature=temperature, alpha=alpha, beta=beta)
    if loss in ("ikl", "gkl"):
        kw["weight_temperature"] = weight_temperature
    if loss == "gkl":
        kw["gamma"] = gamma
    return kw


def student_gradients(teacher_logits, student_logits, *, loss_names=("dkl", "ikl", "gkl"),
                      temperature: float = 1.0, alpha: float = 1.0, beta: float = 1.0,
                      weight_temperature=None, gamma: float = 1.0):
    """Gradient of each named term on the student's logits, teacher frozen, for one sample.

    ``teacher_logits`` and ``student_logits`` are length-C vectors. Returns a tidy DataFrame with
    columns loss, term, cls, grad (one row per loss × term × class). The DKL wMSE rows are exactly
    zero: that is the asymmetry.
    """
    import pandas as pd

    o_m = _row(teacher_logits, "teacher_logits")
    o_n = _row(student_logits, "student_logits")
    rows = []
    for loss in loss_names:
        kw = _hparams_for(loss, temperature=temperature, alpha=alpha, beta=beta,
                          weight_temperature=weight_temperature, gamma=gamma)
        for term, (g_n, _) in term_grads(loss, o_n, o_m, **kw).items():
            rows.extend(dict(loss=loss, term=term, cls=j, grad=float(v)) for j, v in enumerate(g_n[0]))
    return pd.DataFrame(rows)


SIMPLEX_CORNERS = ((0.0, 0.0), (1.0, 0.0), (0.5, 3**0.5 / 2))


def simplex_xy(probs: torch.Tensor) -> torch.Tensor:
    """2-D coordinates of points of the 3-class probability simplex (shape (N, 3) -> (N, 2))."""
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() or probs.dim() != 2 or probs.shape[1] != 3:
        got = f"{probs.dtype} of shape {tuple(probs.shape)}" if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a float tensor of shape (N, 3) (points of the 3-class simplex), got {got}")
    corners = torch.tensor(SIMPLEX_CORNERS, dtype=probs.dtype, device=probs.device)
    return probs @ corners


def simplex_field(teacher_probs, *, loss: str = "ikl", temperature: float = 1.0, alpha: float = 1.0,
                  beta: float = 1.0, resolution: int = 10, gamma: float = 1.0):
    """Where one gradient-descent step moves the student's distribution, per term (C = 3).

    For student distributions s_n on a grid inside the simplex (logits o_n = T log s_n) and a frozen
    teacher with probabilities ``teacher_probs`` (o_m = T log p), the negative gradient -g of each
    term on o_n moves s_n by J(-g), J = (diag(s_n) − s_n s_nᵀ)/T (the softmax Jacobian). Returns a
    DataFrame with columns term, p1, p2, p3, x, y, dx, dy (2-D simplex coordinates and the
    direction of motion; dx, dy are per unit step size, not normalised). ``gamma``: GKL's exponent
    (at γ = 1 GKL's field is IKL's).
    """
    import pandas as pd

    teacher = torch.as_tensor(teacher_probs, dtype=torch.float64)
    if teacher.shape != (3,) or bool((teacher <= 0).any()):
        raise ValueError("teacher_probs must be 3 positive probabilities")
    teacher = teacher / teacher.sum()
    if not isinstance(resolution, int) or resolution < 3:
        raise ValueError(f"resolution must be an int >= 3, got {resolution}")
    pts = [(i, j, resolution - i - j) for i in range(1, resolution) for j in range(1, resolution - i)]
    s_n = torch.tensor(pts, dtype=torch.float64) / resolution
    o_n = temperature * s_n.log()
    o_m = (temperature * teacher.log()).expand_as(o_n)
    kw = _hparams_for(loss, temperature=temperature, alpha=alpha, beta=beta, weight_temperature=None, gamma=gamma)
    per_term = _per_sample_grads(loss, o_n, o_m, **kw)
    if len(per_term) > 1:
        per_term["total"] = sum(per_term.values())
    xy = simplex_xy(s_n)
    frames = []
    for term, g in per_term.items():
        ds = -(s_n * g - s_n * (s_n * g).sum(dim=1, keepdim=True)) / temperature
        dxy = simplex_xy(ds)
        frames.append(pd.DataFrame(dict(term=term, p1=s_n[:, 0], p2=s_n[:, 1], p3=s_n[:, 2], x=xy[:, 0],
                                        y=xy[:, 1], dx=dxy[:, 0], dy=dxy[:, 1])))
    return pd.concat(frames, ignore_index=True)


#: Losses whose value on a batch is the mean of their values on its rows, each row on its own: their
#: per-sample gradient is the batch gradient times B. (GKL divides by a sum over the whole batch.)
_ROW_MEANS = ("kl", "dkl", "ikl", "dkd")


def _per_sample_grads(loss: str, o_n: torch.Tensor, o_m: torch.Tensor, **kw) -> Dict[str, torch.Tensor]:
    """{term: (B, C)} the gradient on the student's logits of each row of (o_n, o_m) as a sample on its
    own: one batch, its mean undone, for the :data:`_ROW_MEANS` losses; each row in a batch of its own
    for the others (GKL: rows share the normaliser Σ_b (Σ_j p_j**γ)², so a batch's rows are not separable)."""
    if loss in _ROW_MEANS:
        return {term: g_n * o_n.shape[0] for term, (g_n, _) in term_grads(loss, o_n, o_m, **kw).items()}
    rows = [term_grads(loss, o_n[i:i + 1], o_m[i:i + 1], **kw) for i in range(o_n.shape[0])]
    return {term: torch.cat([row[term][0] for row in rows]) for term in rows[0]}


def confidence_sweep(confidences, *, num_classes: int = 10, loss_names=("kl", "ikl", "gkl"),
                     temperature: float = 4.0, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                     student_logits=None):
    """Gradient magnitude on the student's logits of each term against the teacher's confidence.

    The teacher puts probability c on class 0 and (1 − c)/(C − 1) on each other class (at
    temperature T); the student's logits are ``student_logits`` (length C), by default all zero
    (a student that knows nothing yet). Returns a DataFrame with columns confidence, loss, term,
    grad_norm (L2 norm over classes).
    """
    import pandas as pd

    conf = torch.as_tensor(confidences, dtype=torch.float64).reshape(-1)
    if bool(((conf <= 0) | (conf >= 1)).any()):
        raise ValueError("confidences must lie strictly between 0 and 1")
    c = num_classes
    probs = ((1 - conf) / (c - 1))[:, None].repeat(1, c)
    probs[:, 0] = conf
    o_m = temperature * probs.log()
    student = torch.zeros(c, dtype=torch.float64) if student_logits is None else _row(student_logits, "student_logits")[0]
    if student.shape != (c,):
        raise ValueError(f"student_logits must have {c} entries, got {tuple(student.shape)}")
    o_n = student.expand_as(o_m).clone()
    rows = []
    for loss in loss_names:
        kw = _hparams_for(loss, temperature=temperature, alpha=alpha, beta=beta, weight_temperature=None,
                          gamma=gamma)
        for term, g_n in _per_sample_grads(loss, o_n, o_m, **kw).items():
            rows.extend(dict(confidence=float(a), loss=loss, term=term, grad_norm=float(b))
                        for a, b in zip(conf, g_n.norm(dim=1)))
    return pd.DataFrame(rows)


def weight_matrices(target_logits, targets, *, weight_temperature: float = 1.0, sample: int = 0):
    """The wMSE weights w = p pᵀ of one sample: sample-wise vs class-wise (GI), for display.

    p_sample = softmax(o_m / T_w) of row ``sample``; p_class = the mean of softmax(o_m / T_w) over
    the rows of the batch with the same target: the prior a :class:`~dkl_lib.prior.ClassPrior`
    holds after one epoch made of this batch.
    Returns ``{"sample": (C, C), "classwise": (C, C), "p_sample": (C,), "p_class": (C,), "target": y}``.
    """
    check_logits_pair(target_logits, target_logits)
    t = check_positive("weight_temperature", weight_temperature)
    batch, classes = target_logits.shape
    if not 0 <= sample < batch:
        raise ValueError(f"sample must be in [0, {batch - 1}], got {sample}")
    from .prior import ClassPrior

    target_logits, targets = target_logits.detach().cpu().double(), targets.cpu()  # MPS has no float64
    p = torch.softmax(target_logits / t, dim=1)
    gi = ClassPrior(classes, dtype=torch.float64, keep_history=False)
    gi.update(target_logits, targets, weight_temperature=t)
    gi.end_epoch()
    y = int(targets[sample])
    p_class = gi.prior[y]
    return {"sample": torch.outer(p[sample], p[sample]), "classwise": torch.outer(p_class, p_class),
            "p_sample": p[sample], "p_class": p_class, "target": y}


# --------------------------------------------------------------------------------------------
# Notebook 02, section 5: curvature, and a student that is confidently wrong
# --------------------------------------------------------------------------------------------
def student_hessians(teacher_logits, student_logits, *, loss: str = "ikl", temperature: float = 1.0,
                     alpha: float = 1.0, beta: float = 1.0, weight_temperature=None,
                     gamma: float = 1.0) -> Dict[str, torch.Tensor]:
    """Hessian of each named term of ``loss`` w.r.t. the student's logits, teacher frozen, one sample.

    ``teacher_logits``, ``student_logits``: length-C vectors. Returns ``{term: (C, C) float64}``,
    computed by ``torch.func.hessian`` through :func:`dkl_lib.losses.loss_terms`. With p the wMSE
    weights (softmax(o_m / T_w), rows summing to P = 1) they are, in closed form,

        wMSE (IKL):       α (P diag(p) − p pᵀ)          (0 for DKL: the stop-gradient on Δ(o_n))
        wMSE (GKL):       α (P diag(p) − p pᵀ) / P²     with p = softmax(o_m / T_w)**γ, P = Σ p (its wMSE
                                                        is divided by Σw = P²; = IKL's for γ = 1)
        soft-label CE:    β (diag(s_n) − s_n s_nᵀ)        (T² and the 1/T² of the softmax cancel)

    so IKL's wMSE is a quadratic in the student's logits (its curvature is the teacher's alone),
    while the CE term's curvature is the student's softmax covariance, which vanishes as the
    student saturates.
    """
    o_m = _row(teacher_logits, "teacher_logits")
    o_n = _row(student_logits, "student_logits")
    if o_m.shape != o_n.shape:
        raise ValueError(f"teacher_logits and student_logits must have the same length, got {o_m.shape[1]} "
                         f"and {o_n.shape[1]}")
    kw = _hparams_for(loss, temperature=temperature, alpha=alpha, beta=beta,
                      weight_temperature=weight_temperature, gamma=gamma)
    names = list(losses.loss_terms(loss, o_n, o_m, **kw))  # eagerly once: the value checks (skipped inside torch.func)
    with warnings.catch_warnings():  # torch's own first torch.func call says torch.jit.script is deprecated
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        return {term: torch.func.hessian(lambda x, term=term: losses.loss_terms(loss, x[None], o_m, **kw)[term])(o_n[0])
                for term in names}


def margin_sweep(margins, *, num_classes: int = 10, teacher_confidence: float = 0.9, loss_names=("kl", "ikl"),
                 temperature: float = 4.0, alpha: float = 1.0, beta: float = 1.0):
    """Gradient size and curvature of each term for a student that is wrong by a growing margin.

    The teacher puts probability ``teacher_confidence`` on class 0 and the rest evenly on the
    others (at temperature T, as in :func:`confidence_sweep`); the student's logits are m on class
    1 and 0 elsewhere, for each margin m in ``margins`` (m = 0: a student that knows nothing; large
    m: confidently wrong). Returns a DataFrame with columns margin, loss, term, grad_norm (L2 norm of
    the term's gradient on the student's logits) and curvature (the largest eigenvalue of the term's
    Hessian there, :func:`student_hessians`).
    """
    import pandas as pd

    m = torch.as_tensor(margins, dtype=torch.float64).reshape(-1)
    if m.numel() == 0 or not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
        raise ValueError("margins must be a non-empty list of finite numbers >= 0")
    c = check_int("num_classes", num_classes, 2)
    conf = float(teacher_confidence)
    if not 1.0 / c < conf < 1.0:
        raise ValueError(f"teacher_confidence must lie strictly between 1/C = {1.0 / c:.3g} and 1, got {conf}")
    probs = torch.full((c,), (1 - conf) / (c - 1), dtype=torch.float64)
    probs[0] = conf
    teacher = temperature * probs.log()
    rows = []
    for margin in m:
        student = torch.zeros(c, dtype=torch.float64)
        student[1] = margin
        for loss in loss_names:
            kw = _hparams_for(loss, temperature=temperature, alpha=alpha, beta=beta, weight_temperature=None,
                              gamma=1.0)
            grads = term_grads(loss, student[None], teacher[None], **kw)
            hessians = student_hessians(teacher, student, loss=loss, temperature=temperature, alpha=alpha, beta=beta)
            for term, (g_n, _) in grads.items():
                rows.append(dict(margin=float(margin), loss=loss, term=term, grad_norm=float(g_n.norm()),
                                 curvature=float(torch.linalg.eigvalsh(hessians[term]).max())))
    return pd.DataFrame(rows)
