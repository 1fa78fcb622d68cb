"""Measured comparisons of KL, DKL and IKL in training (notebook 05).

* :func:`probe_runs` distils students like :func:`dkl_lib.experiments.run_grid` does, and calls a
  probe on the student after every epoch (logit-difference distance to the teacher, parameters,
  ...), so a notebook can watch *how* the losses train, not only how far.
* :func:`expected_calibration_error`, :func:`reliability_table` and :func:`intra_class_spread`
  measure what class-wise global information does to the student's predictions.
* :func:`sensitivity` runs a grid of hyper-parameters × seeds through the cached ``run_grid``.

All results are DataFrames; figures are made from them in :mod:`dkl_lib.plots`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from . import experiments, losses, train
from ._checks import check_int, check_nonnegative, check_seeds, check_targets, value_range

__all__ = [
    "ProbeResult",
    "probe_runs",
    "logit_difference_probe",
    "parameter_probe",
    "parameter_drift",
    "expected_calibration_error",
    "reliability_table",
    "intra_class_spread",
    "prediction_metrics",
    "sensitivity",
]


@dataclass
class ProbeResult:
    """histories: {(loss, seed): per-epoch DataFrame incl. probe columns}; models: the students;
    probes: {(loss, seed): list of raw probe outputs per epoch}; data, teacher, teacher_logits
    (test set), config."""

    histories: Dict[Tuple[str, int], "object"] = field(default_factory=dict)
    models: Dict[Tuple[str, int], torch.nn.Module] = field(default_factory=dict)
    probes: Dict[Tuple[str, int], list] = field(default_factory=dict)
    data: object = None
    teacher: Optional[torch.nn.Module] = None
    teacher_logits: Optional[torch.Tensor] = None
    config: dict = field(default_factory=dict)


_PROBE_DTYPES = (torch.float64, torch.float32)

Probe = Callable[[torch.nn.Module, "object", torch.Tensor, dict], object]


def probe_runs(loss_specs: Sequence[str], seeds: Sequence[int], *, preset: str = "cpu-quick",
               overrides: Optional[dict] = None, probe: Optional[Probe] = None,
               dtype: Optional[torch.dtype] = None, cache_dir=None, device=None,
               progress: bool = True) -> ProbeResult:
    """Distil one student per (loss spec, seed) with the preset's settings and probe every epoch.

    ``probe(student, data, teacher_test_logits, settings)`` runs after each epoch (student in eval
    mode); a dict it returns adds columns to that epoch's history row, anything else is kept in
    ``ProbeResult.probes``. The teacher comes from the run cache (trained once per preset); the
    students are not cached, since the probe is arbitrary. ``dtype=torch.float64`` trains the
    student (and evaluates the teacher) in float64; ``dtype`` is None (the model's float32), torch.float32
    or torch.float64, checked before the teacher trains.

    ``loss_specs`` and ``seeds`` as in :func:`dkl_lib.experiments.run_grid` (the keys of the result
    use its labels: "ikl", "ikl-nogi", ...); ``overrides``, ``cache_dir``, ``device`` as there;
    ``progress``: tqdm bars over the runs.
    """
    import pandas as pd

    # the arguments first: the teacher below may take minutes to train
    loss_specs = experiments._loss_specs(loss_specs)
    seeds = check_seeds("seeds", seeds)
    if probe is not None and not callable(probe):
        raise TypeError(f"probe must be a function (student, data, teacher_logits, settings) or None, "
                        f"got {type(probe).__name__}")
    if dtype is not None and dtype not in _PROBE_DTYPES:
        raise TypeError(f"dtype must be None (the preset's) or one of {list(_PROBE_DTYPES)}, got {dtype!r}")
    cfg = experiments.resolve_config(preset, overrides)
    cache = experiments.RunCache(cache_dir)
    dev = train.select_device(device, dtype=dtype)  # float64: the CPU when the best device is MPS
    data = experiments.load_data(cfg["data"], device=dev)
    teacher, tinfo = experiments.get_teacher(cfg, lambda: data, cache=cache, device=dev, progress=progress)
    if dtype is not None:
        data = data.to(dtype=dtype)
        teacher = teacher.to(dtype)
    teacher_logits = train.predict_logits(teacher.to(dev), data.x_test, data)
    out = ProbeResult(data=data, teacher=teacher, teacher_logits=teacher_logits, config=cfg)
    jobs = [(spec, seed) for spec in loss_specs for seed in seeds]
    for spec, seed in train._progress_bar(jobs, desc="probed runs", disable=not progress, unit="run"):
        rcfg = experiments._run_config(cfg, spec, seed, tinfo["config_hash"])
        settings = dict(rcfg["distill"])
        student = experiments._build(cfg["student"], data, seed=seed)
        if dtype is not None:
            student = student.to(dtype)
        raw = []

        def on_epoch(history, student=student, raw=raw, settings=settings):
            if probe is not None:
                was_training = student.training
                student.eval()
                with torch.no_grad():
                    value = probe(student, data, teacher_logits, settings)
                student.train(was_training)
                raw.append(value)
                if isinstance(value, dict):
                    history[-1].update(value)

        result = train.distill(student, teacher if rcfg["loss"] != "ce" else None, data, loss=rcfg["loss"],
                               seed=seed, device=dev, progress=False, callback=on_epoch, **settings)
        label = experiments._label(spec)
        out.histories[(label, seed)] = pd.DataFrame(result.history)
        out.models[(label, seed)] = student
        out.probes[(label, seed)] = raw
    return out


# ------------------------------------------------------------------------------------ probes
def logit_difference_probe(student, data, teacher_logits, settings) -> dict:
    """How closely the student's pairwise logit differences follow the teacher's, on the test set.

    ``logit_gap`` = wMSE(student, teacher) with the teacher's sample-wise weights at the run's
    temperature (:func:`dkl_lib.losses.wmse`): 0 when every logit difference matches.
    """
    logits = train.predict_logits(student, data.x_test, data)
    temperature = settings.get("temperature", 1.0)
    gap = losses.wmse(logits.to(teacher_logits.dtype), teacher_logits, temperature=temperature)
    return {"logit_gap": float(gap)}


def parameter_probe(student, data, teacher_logits, settings) -> dict:
    """A copy of the student's parameters (flattened, CPU) and its test logits, for drift plots."""
    flat = torch.cat([p.detach().reshape(-1).cpu() for p in student.parameters()])
    return {"params": flat, "test_logits": train.predict_logits(student, data.x_test, data).cpu()}


def parameter_drift(result: ProbeResult, loss_a: str, loss_b: str, seed: int):
    """Per epoch: the largest parameter and test-logit difference between two runs of one seed,
    and both runs' test accuracy (percent) and training loss (from probes made with
    :func:`parameter_probe`). Columns: epoch, max_param_diff, max_logit_diff, test_acc_<loss_a>,
    test_acc_<loss_b>, loss_<loss_a>, loss_<loss_b>."""
    import pandas as pd

    if not isinstance(result, ProbeResult):
        raise TypeError(f"result must be the ProbeResult of probe_runs, got {type(result).__name__}")
    for label in (loss_a, loss_b):
        if (label, seed) not in result.probes:
            raise ValueError(f"no probed run ({label!r}, seed {seed!r}) in result; its runs: {sorted(result.probes)}")
        outputs = result.probes[(label, seed)]
        if not all(isinstance(o, dict) and {"params", "test_logits"} <= set(o) for o in outputs):
            raise ValueError(f"the probes of ({label!r}, {seed!r}) were not made by parameter_probe (each epoch's "
                             "output needs 'params' and 'test_logits'): pass probe=dkl.analysis.parameter_probe, or "
                             "a probe whose dict includes its two keys")
    rows = []
    pa, pb = result.probes[(loss_a, seed)], result.probes[(loss_b, seed)]
    ha, hb = result.histories[(loss_a, seed)], result.histories[(loss_b, seed)]
    for epoch, (a, b) in enumerate(zip(pa, pb), start=1):
        rows.append({"epoch": epoch,
                     "max_param_diff": float((a["params"] - b["params"]).abs().max()),
                     "max_logit_diff": float((a["test_logits"] - b["test_logits"]).abs().max()),
                     f"test_acc_{loss_a}": float(ha["test_acc"].iloc[epoch - 1]),
                     f"test_acc_{loss_b}": float(hb["test_acc"].iloc[epoch - 1]),
                     f"loss_{loss_a}": float(ha["loss"].iloc[epoch - 1]),
                     f"loss_{loss_b}": float(hb["loss"].iloc[epoch - 1])})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------ prediction metrics
def _checked_probs(probs, labels):
    """probs: (N, C) float, N >= 1, entries finite and in [0, 1], rows summing to 1, both within
    max(1e-3, sqrt(eps)) of their dtype (raw logits are not probabilities: apply softmax first);
    labels: (N,) integer classes in [0, C), on the same device. Returns both on the CPU (the metrics
    sum in float64, which Apple MPS does not have)."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError("probs must be a (N, C) tensor of probabilities")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be a floating-point tensor, got dtype {probs.dtype}")
    if probs.shape[0] < 1 or probs.shape[1] < 1:
        raise ValueError(f"probs is empty (shape {tuple(probs.shape)}); need at least one sample and one class")
    if not isinstance(labels, torch.Tensor) or labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must have shape ({probs.shape[0]},)")
    check_targets(labels, probs.shape[0], probs.shape[1], probs.device, name="labels", reference="probs")
    tol = max(1e-3, math.sqrt(torch.finfo(probs.dtype).eps))
    low, high = value_range(probs)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("probs contains non-finite values (nan or inf)")
    if low < -tol or high > 1 + tol:
        raise ValueError(f"probs must lie in [0, 1], got min {low:.4g}, max {high:.4g}; pass "
                         "probabilities (e.g. softmax of the logits), not logits")
    probs, labels = probs.detach().cpu(), labels.cpu()
    off = float((probs.double().sum(dim=1) - 1).abs().max())
    if off > tol:
        raise ValueError(f"rows of probs must sum to 1 (within {tol:.3g}), but one is off by {off:.3g}; "
                         "pass probabilities (e.g. softmax of the logits)")
    return probs, labels


def reliability_table(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 10):
    """Per confidence bin (equal width on [0, 1]): count, mean confidence, accuracy (a DataFrame).

    ``probs``: (N, C) probabilities (rows sum to 1), N >= 1; ``labels``: (N,) integer classes;
    ``n_bins`` >= 1. Columns: bin, low, high, count, confidence, accuracy; confidence and accuracy
    are fractions in [0, 1] (not percent), NaN for an empty bin.
    """
    import pandas as pd

    probs, labels = _checked_probs(probs, labels)
    n_bins = check_int("n_bins", n_bins)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    # binned in float64: conf * n_bins in float16 / bfloat16 rounds up across a bin edge (0.828125 * 100
    # is 83 in bfloat16), putting a sample into the bin above its confidence
    bins = torch.clamp((conf.double() * n_bins).long(), max=n_bins - 1)
    rows = []
    for b in range(n_bins):
        sel = bins == b
        n = int(sel.sum())
        rows.append({"bin": b, "low": b / n_bins, "high": (b + 1) / n_bins, "count": n,
                     "confidence": float(conf[sel].double().mean()) if n else float("nan"),
                     "accuracy": float(correct[sel].mean()) if n else float("nan")})
    return pd.DataFrame(rows)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 10) -> float:
    """ECE = Σ_bins (n_bin / N) |accuracy − confidence| (Guo et al., 2017), in [0, 1]."""
    table = reliability_table(probs, labels, n_bins=n_bins)
    used = table[table["count"] > 0]
    return float(((used["count"] / len(labels)) * (used["accuracy"] - used["confidence"]).abs()).sum())


def intra_class_spread(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean, over classes, of the mean squared distance of a sample's probability vector to its
    class's mean vector: how consistently the model predicts within a class (0 = identical)."""
    probs, labels = _checked_probs(probs, labels)
    spreads = []
    for y in labels.unique():
        p = probs[labels == y].double()
        spreads.append(((p - p.mean(dim=0)) ** 2).sum(dim=1).mean())
    return float(torch.stack(spreads).mean())


def prediction_metrics(result: ProbeResult, *, n_bins: int = 10):
    """Accuracy, ECE and intra-class spread of every probed student on the test set (DataFrame).

    Columns: loss, seed, accuracy (percent, as every accuracy of the training code), ece (a fraction
    in [0, 1], :func:`expected_calibration_error` with ``n_bins``), intra_class_spread.
    """
    import pandas as pd

    rows = []
    labels = result.data.y_test.cpu()
    for (loss, seed), model in result.models.items():
        probs = torch.softmax(train.predict_logits(model, result.data.x_test, result.data).cpu().double(), 1)
        rows.append({"loss": loss, "seed": seed,
                     "accuracy": 100.0 * float((probs.argmax(1) == labels).double().mean()),
                     "ece": expected_calibration_error(probs, labels, n_bins=n_bins),
                     "intra_class_spread": intra_class_spread(probs, labels)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ sensitivity
def sensitivity(loss_spec: str, grid: Dict[str, Sequence[float]], seeds: Sequence[int], *,
                preset: str = "cpu-quick", overrides: Optional[dict] = None, cache_dir=None,
                progress: bool = True, collapse_points: float = 20.0):
    """Accuracy over a grid of hyper-parameters (the cached :func:`run_grid`, one call per cell).

    ``grid`` maps names to values: "temperature" (the distillation temperature) or a loss
    hyper-parameter ("alpha", "beta", "gamma", "weight_temperature"). Returns (runs, summary):
    runs has one row per cell and seed (with ``drop`` = best − last accuracy); summary one row per
    cell with n, mean and std of the best and last accuracy, and ``collapsed``: how many of the
    cell's runs ended more than ``collapse_points`` below their own best epoch (a run that
    diverges after a good start; cell means can hide one such seed).

    ``progress``: one tqdm bar over the cells (not one bar per cell's :func:`run_grid`).
    """
    import itertools

    import pandas as pd

    collapse_points = check_nonnegative("collapse_points", collapse_points)
    name = experiments._parse_loss(loss_spec)[0]
    if not isinstance(grid, dict):
        raise TypeError(f"grid must be a dict of setting name to a list of values, got {type(grid).__name__}")
    names = list(grid)
    if not names:
        raise ValueError("grid is empty")
    axes = []
    for n in names:
        values = grid[n]
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise TypeError(f"grid[{n!r}] must be a list of values, got {values!r}")
        values = list(values)
        if not values:
            raise ValueError(f"grid[{n!r}] is empty; give at least one value")
        axes.append(values)
    seeds = check_seeds("seeds", seeds)
    # every cell's config first (a bad value in the last cell used to surface after the others had
    # trained), and no two cells may be the same run: an axis the loss ignores (the temperature of
    # "ce") or one its name fixes ("gi" of "ikl-nogi") would give a flat grid of one cached run
    cells, seen = [], {}
    for values in itertools.product(*axes):
        cell = dict(zip(names, values))
        extra = dict(overrides or {})
        for key, value in cell.items():
            extra["distill.temperature" if key == "temperature" else f"losses.{name}.{key}"] = value
        run = experiments._run_config(experiments.resolve_config(preset, extra), loss_spec, seeds[0], "teacher")
        key = experiments.config_hash(run)
        if key in seen:
            differ = [k for k in names if seen[key][k] != cell[k]]
            if not differ:
                raise ValueError(f"grid lists the cell {cell} twice (a value repeated in an axis)")
            raise ValueError(f"grid cells {seen[key]} and {cell} are the same run of {loss_spec!r}: it ignores "
                             f"{', '.join(differ)} (the loss settings of {name!r}: "
                             f"{sorted(train.loss_settings(name))}; a '-gi' / '-nogi' name fixes gi)")
        seen[key] = cell
        cells.append((cell, extra))
    frames = []
    for cell, extra in train._progress_bar(cells, desc=f"{loss_spec} sensitivity", unit="cell",
                                           disable=not progress):
        res = experiments.run_grid([loss_spec], list(seeds), preset=preset, overrides=extra,
                                   cache_dir=cache_dir, progress=False)
        frames.append(res.runs.assign(**cell))
    runs = pd.concat(frames, ignore_index=True)
    runs["drop"] = runs["best_acc"] - runs["last_acc"]
    summary = (runs.assign(collapsed=runs["drop"] > collapse_points).groupby(names)
               .agg(n=("seed", "count"), best_mean=("best_acc", "mean"), best_std=("best_acc", "std"),
                    last_mean=("last_acc", "mean"), last_std=("last_acc", "std"),
                    collapsed=("collapsed", "sum"))
               .reset_index())
    return runs, summary
