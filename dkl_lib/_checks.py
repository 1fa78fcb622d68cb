"""Argument validation shared by the loss and gradient functions.

Every public function of dkl_lib turns bad input into a ``ValueError`` (wrong value) or a
``TypeError`` (wrong kind of object) whose message names the argument and the problem, so that a
mistake never shows up later as a silent NaN.
"""
from __future__ import annotations

import math
import numbers
import os
import weakref
from typing import Optional, Tuple

import torch

__all__ = [
    "check_logits_pair",
    "check_positive",
    "check_nonnegative",
    "check_targets",
    "class_prior_bounds",
    "check_finite_terms",
    "compute_dtype",
    "env_positive_int",
    "tracing",
    "transforming",
    "forward_ad_active",
]


class NonFiniteError(ValueError):
    """Logits holding nan or inf (a ``ValueError``). The trainers turn it into a
    ``FloatingPointError`` saying that the training diverged, naming the epoch."""


def transforming() -> bool:
    """True inside a ``torch.func`` transform (grad, vmap, jacrev, jvp, hessian, ...), outside
    ``torch.compile``'s tracing (which cannot trace the question)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def forward_ad_active() -> bool:
    """True inside a ``torch.autograd.forward_ad.dual_level()`` block (forward-mode AD outside
    torch.func), where an autograd.Function without a ``jvp`` cannot run."""
    return not torch.compiler.is_compiling() and torch.autograd.forward_ad._current_level >= 0


def tracing() -> bool:
    """True while ``torch.compile`` traces the calling code or a ``torch.func`` transform runs it.

    The checks that READ tensor values (non-finite logits, overflow bounds, label ranges, prior
    rows) copy a few numbers to the host: a device sync, and data that the compiler cannot trace
    and that vmap's batched tensors do not have. There they are skipped; the checks of types,
    shapes, devices and hyper-parameters stay. Call the function eagerly (once, outside compile and
    torch.func) to have the values checked too.
    """
    return torch.compiler.is_compiling() or transforming()


def _check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D of shape (B, C), got shape {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} is an empty batch (B = 0)")
    if x.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 classes (C >= 2), got C = {x.shape[1]}")


def _check_temperature_range(name: str, value: float, dtype: torch.dtype,
                             squared_weight: Optional[float], batch: int = 1) -> None:
    """1/T is finite in ``dtype`` (the losses divide the logits by T), and so is w T² when
    ``squared_weight`` w is given (they multiply a term by its weight times T²); then also T² / B is a
    normal number of ``dtype`` (B = ``batch``): the losses scale their batch mean by it, and below that it
    rounds to 0 (float32: T below about 1e-19), which made every value and KL's gradients exactly 0."""
    fmax = torch.finfo(dtype).max
    if squared_weight is not None and value * value / batch < torch.finfo(dtype).tiny:
        smallest = math.sqrt(torch.finfo(dtype).tiny * batch)
        step = 10.0 ** (math.floor(math.log10(smallest)) - 2)  # rounded up to 3 digits: the value shown passes
        raise ValueError(f"{name} = {value:g} is too small for {dtype} computation ({name}² / batch size "
                         f"underflows to 0, and the loss with it); use a value >= "
                         f"{math.ceil(smallest * (1 + 1e-9) / step) * step:.3g}")
    if value * fmax < 1.0:
        raise ValueError(f"{name} = {value:g} is too small for {dtype} computation (1/{name} overflows); "
                         f"use a value >= {1.0 / fmax:.3g}")
    if squared_weight is not None and value * value * squared_weight > fmax:
        what = f"{name}²" if squared_weight == 1 else f"{name}² times the term weight {squared_weight:g}"
        raise ValueError(f"{name} = {value:g} is too large for {dtype} computation ({what} overflows); "
                         f"use a value <= {math.sqrt(fmax / squared_weight):.3g}")


def check_logits_pair(logits, target_logits, *, temperature: Optional[float] = None,
                      weight_temperature: Optional[float] = None, squared_weight: float = 1.0,
                      weight_temperature_name: str = "weight_temperature",
                      targets=None) -> tuple[float, float]:
    """Both logit tensors are finite, float, of shape (B, C) with C >= 2, and of the same shape.

    With ``temperature`` T (already checked to be > 0), also 1/T and w T² are finite in the
    compute dtype (:func:`compute_dtype`; w = ``squared_weight``, the largest weight that
    multiplies T² in the loss, at least 1), and max |x| / T stays below a quarter of the dtype's
    largest value for both tensors, so the scaled logits and their differences are finite;
    ``weight_temperature`` T_w (target side only, no T²; named ``weight_temperature_name`` in the
    messages) likewise. One pass over each tensor and one device-to-host copy for both.

    ``targets`` (optional): class indices checked as :func:`check_targets` checks them against the
    logits, their range read in that same copy (a loss with targets syncs once, not twice).

    Returns (max |logits|, max |target_logits|), read in that same copy, for
    :func:`check_finite_terms`.
    """
    _check_logits("logits", logits)
    _check_logits("target_logits", target_logits)
    if logits.shape != target_logits.shape:
        raise ValueError(
            f"logits and target_logits must have the same shape, got {tuple(logits.shape)} "
            f"and {tuple(target_logits.shape)}"
        )
    if logits.device != target_logits.device:
        raise ValueError(
            f"logits and target_logits are on different devices ({logits.device} and "
            f"{target_logits.device})"
        )
    dtype = compute_dtype(logits, target_logits)
    if temperature is not None:
        _check_temperature_range("temperature", temperature, dtype, max(1.0, squared_weight), logits.shape[0])
    if weight_temperature is not None:
        _check_temperature_range(weight_temperature_name, weight_temperature, dtype, None)
    classes = logits.shape[1]
    if targets is not None:
        check_targets(targets, logits.shape[0], classes, logits.device, values=False)
    if tracing():  # no value read under torch.compile / torch.func: no bound known
        return math.inf, math.inf
    # min and max of each tensor (nan propagates): one fast pass each, one sync for all. (detach, not a
    # no_grad block: two ops more, but the block's enter and exit cost more host time than they do)
    # stack promotes the class indices to dtype, exact up to 2**24 (float32): beyond, a read of their own
    fold = targets is not None and classes <= 2**24
    extremes = torch.stack([v.to(dtype) for x in (logits, target_logits) for v in torch.aminmax(x.detach())]
                           + (list(torch.aminmax(targets)) if fold else []))
    low_n, high_n, low_m, high_m, *label_range = extremes.tolist()
    limit = torch.finfo(dtype).max / 4
    scales = {"temperature": temperature}
    largest_of = []
    for name, low, high in (("logits", low_n, high_n), ("target_logits", low_m, high_m)):
        if not (math.isfinite(low) and math.isfinite(high)):
            raise NonFiniteError(f"{name} contains non-finite values (nan or inf)")
        largest = max(-low, high)
        largest_of.append(largest)
        if name == "target_logits":
            scales[weight_temperature_name] = weight_temperature
        for scale_name, scale in scales.items():
            if scale is not None and largest > limit * scale:
                raise ValueError(
                    f"{name} / {scale_name} overflows {dtype}: max |{name}| = {largest:.3g} and "
                    f"{scale_name} = {scale:g}, but max |{name}| / {scale_name} must stay below "
                    f"{limit:.3g} (a quarter of the largest {dtype})"
                )
    if targets is not None:
        if not fold or label_range[0] < 0 or label_range[1] >= classes:
            # out of range (or too many classes to fold): the exact indices for the message
            check_label_range("targets", targets, classes, owner="the logits have")
    return largest_of[0], largest_of[1]


def check_finite_terms(loss: str, terms: dict, *, bound: float, largest: tuple[float, float],
                       temperature: Optional[float] = None) -> None:
    """The loss values in ``terms`` (name -> scalar tensor) are finite.

    Finite logits that pass :func:`check_logits_pair` can still give a loss VALUE beyond the
    compute dtype: the wMSE grows like (max |o_m - o_n|)², T² KL like T · max |o|, so logits of
    ~1e19 and more overflow float32 (the gradients stay finite). ``bound`` is an upper bound of
    the largest |term| computed from the magnitudes the range check already read: only when it
    comes near the dtype's maximum are the values read back (one device sync), so ordinary
    batches pay nothing. ``largest`` = (max |logits|, max |target_logits|) for the message.
    """
    if not terms or tracing():
        return
    value = next(iter(terms.values()))
    fmax = torch.finfo(value.dtype).max
    if bound <= fmax / 64:  # margin for the rounding of the bound itself
        return
    finite = torch.isfinite(torch.stack([v.detach() for v in terms.values()])).tolist()
    bad = [name for name, ok in zip(terms, finite) if not ok]
    if bad:
        at = "" if temperature is None else f" and temperature = {temperature:g}"
        raise ValueError(
            f"{loss}: the {' and '.join(bad)} term{'s' if len(bad) > 1 else ''} overflow{'' if len(bad) > 1 else 's'} "
            f"{value.dtype} (the value, or a partial sum of it, exceeds {fmax:.3g}) for logits this large: "
            f"max |logits| = {largest[0]:.3g}, max |target_logits| = {largest[1]:.3g}{at}; the inputs are finite "
            f"but the loss is not computable in {value.dtype}: pass float64 logits, or smaller logits"
        )


def check_number(name: str, value, *, low=None, low_open: bool = False, high=None, high_open: bool = False) -> float:
    """A finite real number (bool refused: TypeError), within [low, high] (``low_open`` /
    ``high_open``: the bound itself excluded; ValueError naming the bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not -math.inf < value < math.inf:  # math.isfinite, in comparisons torch.compile can trace (dynamic=True)
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_positive(name: str, value) -> float:
    value = check_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_nonnegative(name: str, value) -> float:
    value = check_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_targets(targets, batch_size: int, num_classes: int, device, *, name: str = "targets",
                  reference: str = "the logits", values: bool = True) -> torch.Tensor:
    """Class indices of shape (B,), integer dtype, each in [0, C) (B = 0 is allowed here: an empty
    batch has nothing out of range). ``name`` and ``reference`` (what holds the classes) go into
    the messages. ``values=False``: type, shape and device only; the caller reads the range itself
    (in one device sync with other values) and checks it with :func:`check_label_bounds`."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {targets.dtype}")
    if targets.shape != (batch_size,):
        raise ValueError(f"{name} must have shape ({batch_size},), got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"{name} are on {targets.device} but {reference} are on {device}")
    if batch_size and values:
        check_label_range(name, targets, num_classes, owner=f"{reference} have")
    return targets.long()


def class_prior_bounds(class_prior, num_classes: int, device) -> Tuple[float, float, float]:
    """Check a class prior: a (C, C) tensor whose rows are non-negative, finite and not all zero;
    returns (the largest row sum, for :func:`check_finite_terms`; the smallest row maximum; the
    largest entry): bounds of the weights p = class_prior[targets], which GKL reads to know whether
    p**gamma can underflow.

    One device sync for valid priors, the first time a prior tensor is checked (a training step
    reuses the epoch's prior: no sync); under torch.compile or torch.func (:func:`tracing`), only
    the type, shape and device are checked and the bounds are (inf, 0, inf), which promise nothing."""
    if not isinstance(class_prior, torch.Tensor):
        raise TypeError(f"class_prior must be a torch.Tensor, got {type(class_prior).__name__}")
    if not class_prior.is_floating_point():
        raise TypeError(f"class_prior must be a floating-point tensor, got dtype {class_prior.dtype}")
    if class_prior.shape != (num_classes, num_classes):
        raise ValueError(
            f"class_prior must have shape (C, C) = ({num_classes}, {num_classes}), "
            f"got {tuple(class_prior.shape)}"
        )
    if class_prior.device != device:
        raise ValueError(f"class_prior is on {class_prior.device} but the logits are on {device}")
    if tracing():  # values not read under torch.compile / torch.func
        return math.inf, 0.0, math.inf
    # a prior is checked once, not at every step of an epoch that uses it: the version it passed with
    # is kept for this very tensor object (an in-place change, of it or through a view, bumps the
    # version; a copy, a pickled or a loaded tensor is another object and is checked anew)
    passed = _CHECKED_PRIORS.get(id(class_prior))
    if passed is not None and passed[0]() is class_prior and passed[1] == class_prior._version:
        return passed[2]
    values = class_prior.detach()
    sums = values.sum(dim=1)
    finite, low, low_sum, high_sum, low_row_max, high = torch.stack([
        torch.isfinite(values).all().to(sums.dtype), values.amin(), sums.amin(), sums.amax(),
        values.amax(dim=1).amin(), values.amax(),
    ]).tolist()
    if not finite:
        raise ValueError("class_prior contains non-finite values (nan or inf)")
    if low < 0:
        bad = sorted(set(torch.nonzero(class_prior < 0)[:, 0].tolist()))[:5]
        raise ValueError(f"class_prior has negative entries in rows {bad}; rows must be probability vectors")
    if low_sum <= 0:
        bad = torch.nonzero(sums <= 0)[:5, 0].tolist()
        raise ValueError(f"class_prior rows {bad} sum to zero; rows must be probability vectors")
    bounds = (high_sum, low_row_max, high)
    _remember_prior(class_prior, bounds)
    return bounds


# id(prior tensor) -> (weak reference to it, its version when it passed, its class_prior_bounds)
_CHECKED_PRIORS: dict = {}


def _remember_prior(class_prior: torch.Tensor, bounds: Tuple[float, float, float]) -> None:
    key = id(class_prior)

    def forget(ref, key=key):  # runs as the tensor is freed, before its id can be reused
        if _CHECKED_PRIORS.get(key, (None,))[0] is ref:
            del _CHECKED_PRIORS[key]

    _CHECKED_PRIORS[key] = (weakref.ref(class_prior, forget), class_prior._version, bounds)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half and bfloat16 inputs are widened)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def env_positive_int(name: str) -> Optional[int]:
    """The positive integer in the environment variable ``name``; None when it is unset or empty;
    ValueError naming the variable for anything else."""
    text = os.environ.get(name)
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return value


# ------------------------------------------------------------- images, labels and seeds (attacks, grids)
def value_range(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of ``x`` as floats, read back in one device sync; both nan when x holds a nan."""
    low, high = torch.aminmax(x.detach())
    return tuple(torch.stack([low, high]).tolist())


def check_finite_values(name: str, x: torch.Tensor) -> tuple[float, float]:
    """Every entry of ``x`` is finite; returns its (min, max), read in one device sync."""
    low, high = value_range(x)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return low, high


def check_unit_range(name: str, x: torch.Tensor) -> None:
    """Every entry of ``x`` is finite and lies in [0, 1] (images; one reduction per call)."""
    low, high = check_finite_values(name, x)
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{name} must hold images in [0, 1], got values in [{low:.4g}, {high:.4g}]; pass raw "
                         f"images and put the normalisation inside the model (dkl_lib.attacks.Normalized)")


def check_label_range(name: str, labels: torch.Tensor, num_classes: int, *, owner: str = "the model has") -> None:
    """Every class index in ``labels`` (non-empty) lies in [0, num_classes); ``owner`` says what has
    the classes in the message ("the model has", "the logits have"). Skipped while torch.compile
    traces or a torch.func transform runs (:func:`tracing`)."""
    if tracing():
        return
    low, high = value_range(labels)
    check_label_bounds(name, low, high, num_classes, owner=owner)


def check_label_bounds(name: str, low: float, high: float, num_classes: int, *, owner: str = "the model has") -> None:
    """The class indices whose smallest and largest values (already read back) are ``low`` and
    ``high`` lie in [0, num_classes); the message of :func:`check_label_range`."""
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} out of range: {owner} {num_classes} classes, so {name} must lie in "
                         f"[0, {num_classes - 1}], got min {int(low)}, max {int(high)}")


def check_int(name: str, value, low: int = 1) -> int:
    """An integer >= ``low``: TypeError for anything else (bool, and floats such as 2.5, are refused
    rather than truncated), ValueError below ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_module(name: str, value) -> None:
    """TypeError unless ``value`` is a ``torch.nn.Module`` (a built model)."""
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")


def check_seed(name: str, value) -> int:
    """An integer seed (bool and floats such as 1.7 are refused rather than truncated)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_seeds(name: str, seeds) -> list[int]:
    """A non-empty list of distinct non-negative integers: one run per seed, so a repeated seed
    (which would count one run twice and report a false ± 0.00) is refused."""
    items = None if isinstance(seeds, (str, bytes, dict)) else seeds
    try:
        items = list(items)
    except TypeError:
        items = []
    if not items or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in items):
        raise ValueError(f"{name} must be a non-empty list of non-negative integers, got {seeds!r}")
    items = [int(s) for s in items]  # numpy's integers too (np.arange(3)), as plain ints
    repeated = sorted({s for s in items if items.count(s) > 1})
    if repeated:
        raise ValueError(f"{name} lists a seed twice ({', '.join(map(str, repeated))} in {items}); each seed is "
                         f"one run, and a repeated run would be counted twice in the mean ± std")
    return items


#: Device types that have no float64 (Apple's Metal, "mps": a float64 tensor there raises TypeError).
NO_FLOAT64_DEVICE_TYPES = ("mps",)


def supports_float64(device) -> bool:
    """Can ``device`` hold float64 tensors? False for Apple MPS, True for the CPU and CUDA."""
    return torch.device(device).type not in NO_FLOAT64_DEVICE_TYPES


def wide_dtype(device) -> torch.dtype:
    """The dtype for sums accumulated on ``device`` (epoch totals, class-prior sums): float64, or
    float32 where the device has no float64 (MPS)."""
    return torch.float64 if supports_float64(device) else torch.float32


def tolerant_console() -> None:
    """Let the command lines print ε, ±, ≤ and → on any console: where stdout or stderr cannot
    encode them (Windows with output redirected to a file or pipe writes in the locale's code page,
    e.g. cp1252), such characters are written as backslash escapes instead of raising
    UnicodeEncodeError after the work is done. UTF-8 streams are left alone."""
    import codecs
    import sys

    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None)
        if not encoding or not hasattr(stream, "reconfigure") or getattr(stream, "errors", "strict") != "strict":
            continue
        try:
            if codecs.lookup(encoding).name == "utf-8":
                continue
            stream.reconfigure(errors="backslashreplace")
        except (LookupError, ValueError, OSError):  # an unknown codec, a closed or detached stream
            continue


def check_model_output(name: str, out, num_classes: Optional[int] = None, *, source: str = "the data") -> None:
    """``out``, what the model ``name`` returned, is a (B, num_classes) logit tensor (2-D only,
    when ``num_classes`` is None). A shape check: no device sync, cheap enough for every batch."""
    if isinstance(out, torch.Tensor) and out.dim() == 2 and (num_classes is None or out.shape[1] == num_classes):
        return
    got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
    want = "(B, classes)" if num_classes is None else f"(B, {num_classes}) for the {num_classes} classes of {source}"
    raise ValueError(f"{name} must return logits of shape {want}, got {got}")
