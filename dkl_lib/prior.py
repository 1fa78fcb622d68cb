"""Class-wise global information (GI) for IKL and GKL: the per-class mean target distribution.

IKL's second change (DKL paper, Sec. 3.2, "class-wise global information") replaces the sample-wise
weights w = s_m s_mᵀ of the wMSE term with class-wise ones: w = p pᵀ, p = ``class_prior[y]``, where
row y of the (C, C) prior is the mean of softmax(o_m / T_w) over the training samples of class y.
:class:`ClassPrior` keeps that prior as follows:

* during an epoch, :meth:`ClassPrior.update` adds softmax(o_m / T_w) of every sample to the row of
  its true class (no gradient);
* :meth:`ClassPrior.end_epoch` normalises each row that received samples to sum 1 and makes it the
  prior of the NEXT epoch; a class that received none keeps its previous row;
* before the first epoch every row is uniform (1/C);
* under ``torch.distributed`` (when initialised) the sums and counts are all-reduced before the
  normalisation, so every rank holds the same prior.

``prior.prior`` is the (C, C) tensor to pass as ``class_prior`` to
:func:`dkl_lib.losses.ikl_loss` / :func:`~dkl_lib.losses.gkl_loss` together with ``targets=y``;
``prior.history`` keeps one snapshot per epoch for the heatmap of notebook 03.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import List, Mapping

import torch

from ._checks import check_label_bounds, check_positive, check_targets, forward_ad_active, tracing, wide_dtype

__all__ = ["ClassPrior"]


def _overflow_message(dtype, t_w) -> str:
    at = "" if t_w is None else f" (weight_temperature = {t_w:g})"
    return f"target_logits / weight_temperature overflows {dtype}{at}; use a larger weight_temperature"


class ClassPrior:
    """Running class-wise mean of the target distribution, switched once per epoch.

    Args:
        num_classes: C >= 2, an int or an integer-like (``numpy.int64``; not a bool or a float).
        device: where the prior and the accumulators live (default CPU). :meth:`update` moves them
            to the device of its inputs when they differ, so this rarely needs setting.
        dtype: floating-point ``torch.dtype`` of :attr:`prior` (float32 by default); sums are
            accumulated in float64 (in float32 on Apple MPS, which has no float64).
        keep_history: keep a CPU snapshot of the prior of every epoch in :attr:`history`.

    Attributes:
        prior: (C, C) tensor in use this epoch; row y sums to 1.
        history: list of (C, C) CPU tensors; ``history[e]`` is the prior used during epoch e
            (0-based), ``history[0]`` the uniform start, the last entry the prior of the next epoch.
        epochs: number of completed :meth:`end_epoch` calls.

    Example::

        gi = ClassPrior(100, device=device)
        for epoch in range(epochs):
            for x, y in loader:
                t = teacher(x)
                gi.update(t, y, weight_temperature=4.0)
                loss = dkl.ikl_loss(student(x), t, targets=y, class_prior=gi.prior, temperature=4.0)
                ...
            gi.end_epoch()
    """

    def __init__(self, num_classes: int, *, device=None, dtype: torch.dtype = torch.float32,
                 keep_history: bool = True):
        try:
            classes = None if isinstance(num_classes, bool) else operator.index(num_classes)
        except TypeError:
            classes = None
        if classes is None or classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        num_classes = classes
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float32), got {dtype!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.num_classes = num_classes
        self.dtype = dtype
        self.keep_history = keep_history
        self._weight_temperature = None  # the last one of _update_checked, for end_epoch's message
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.prior = torch.full((num_classes, num_classes), 1.0 / num_classes, dtype=dtype, device=device)
        self._sums = torch.zeros(num_classes, num_classes, dtype=wide_dtype(device), device=device)
        self._counts = torch.zeros(num_classes, dtype=wide_dtype(device), device=device)
        self.epochs = 0
        self.history: List[torch.Tensor] = [self.prior.detach().cpu().clone()] if keep_history else []

    # ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.prior.device

    def to(self, device) -> "ClassPrior":
        """Move the prior and the accumulators to ``device`` (in place); returns self."""
        device = torch.device(device)
        self.prior = self.prior.to(device)
        self._sums = self._sums.to(device, wide_dtype(device))
        self._counts = self._counts.to(device, wide_dtype(device))
        return self

    @property
    def counts(self) -> torch.Tensor:
        """Samples accumulated per class in the current epoch (float64; float32 on MPS; shape (C,))."""
        return self._counts

    @torch.no_grad()
    def update(self, target_logits: torch.Tensor, targets: torch.Tensor, *,
               weight_temperature: float = 1.0) -> None:
        """Add softmax(target_logits / T_w) of each sample to the row of its true class.

        Args:
            target_logits: o_m, shape (B, C) (the teacher's logits in KD), finite; never
                differentiated.
            targets: (B,) integer true classes.
            weight_temperature: T_w > 0.

        An empty batch (B = 0, e.g. a rank's empty share of a small last batch under
        ``torch.distributed``) adds nothing: the sums over no samples are zero, and the rank still
        joins the all-reduce of :meth:`end_epoch`.
        """
        if not isinstance(target_logits, torch.Tensor) or target_logits.dim() != 2:
            raise ValueError("target_logits must be a tensor of shape (B, C)")
        if target_logits.shape[1] != self.num_classes:
            raise ValueError(f"target_logits has {target_logits.shape[1]} classes, the prior "
                             f"{self.num_classes}")
        if not target_logits.is_floating_point():
            raise TypeError(f"target_logits must be a float tensor, got {target_logits.dtype}")
        t_w = check_positive("weight_temperature", weight_temperature)
        if target_logits.device != self.device:
            self.to(target_logits.device)
        batch = target_logits.shape[0]
        targets = check_targets(targets, batch, self.num_classes, target_logits.device, values=False)
        logits, probs = self._probs(target_logits, t_w)
        if batch and not tracing():
            # one device sync for every value check (a training step calls this once per batch):
            # the targets' range, non-finite logits (aminmax propagates nan; softmax would map -inf
            # to a finite 0), and logits / T_w overflowing (the probabilities' sum is then nan)
            low_y, high_y, low, high, total = torch.stack(
                [targets.amin().to(logits.dtype), targets.amax().to(logits.dtype), *torch.aminmax(logits),
                 probs.sum()]).tolist()
            check_label_bounds("targets", low_y, high_y, self.num_classes, owner="the logits have")
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError("target_logits contain non-finite values (nan or inf)")
            if not math.isfinite(total):
                raise ValueError(_overflow_message(self._sums.dtype, t_w))
        self._add(targets, probs)

    def _probs(self, target_logits: torch.Tensor, t_w: float):
        # (called under no_grad, which records nothing: a detach would be one more dispatched op per
        # step; it is needed only to drop the tangent of a dual tensor under forward-mode AD)
        logits = (target_logits.detach() if forward_ad_active() else target_logits).to(self._sums.dtype)
        return logits, torch.softmax(logits / t_w, dim=1)

    def _add(self, targets: torch.Tensor, probs: torch.Tensor) -> None:
        self._sums.index_add_(0, targets, probs)
        # (index_add_, not bincount, whose output size depends on the values: torch.compile on torch 2.4)
        self._counts.index_add_(0, targets, self._ones_for(targets))

    def _ones_for(self, targets: torch.Tensor) -> torch.Tensor:
        """A vector of ones, one per target, in the counts' dtype: kept from the last batch of the same
        size (every batch of an epoch but the last), instead of one more operator per step; a new one
        while torch.compile traces (which would not see a cached tensor change)."""
        ones = getattr(self, "_ones", None)
        if tracing() or ones is None or ones.shape != targets.shape or ones.device != targets.device \
                or ones.dtype != self._counts.dtype:
            ones = torch.ones(targets.shape, dtype=self._counts.dtype, device=targets.device)
            if not tracing():
                self._ones = ones
        return ones

    @torch.no_grad()
    def _update_checked(self, target_logits: torch.Tensor, targets: torch.Tensor, *, weight_temperature: float) -> None:
        """:meth:`update` for inputs that the caller's loss has just validated (the trainers: ikl
        and gkl check the same target logits and targets in the same step), without a device sync.
        Logits / T_w overflowing the sums' dtype, which :meth:`update` refuses per batch, is caught
        by :meth:`end_epoch` (the sums are then not finite)."""
        if target_logits.device != self.device:
            self.to(target_logits.device)
        self._add(targets.long(), self._probs(target_logits, weight_temperature)[1])
        self._weight_temperature = weight_temperature

    @torch.no_grad()
    def end_epoch(self) -> torch.Tensor:
        """Close the epoch: the normalised sums become the prior of the next epoch; returns it.

        Rows of classes that received samples are normalised to sum 1; the other rows keep their
        previous values. Under an initialised ``torch.distributed`` process group the sums and
        counts of all ranks are added first (one all-reduce), so every rank gets the same prior.
        The accumulators are then cleared.
        """
        sums, counts = self._sums, self._counts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            packed = torch.cat([sums, counts[:, None]], dim=1)
            torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
            sums, counts = packed[:, :-1], packed[:, -1]
        if not tracing() and not bool(torch.isfinite(sums).all()):  # one sync per epoch
            raise ValueError(_overflow_message(sums.dtype, self._weight_temperature))
        seen = counts > 0
        totals = sums.sum(dim=1, keepdim=True)
        new = torch.where(seen[:, None], sums / totals.clamp_min(torch.finfo(sums.dtype).tiny),
                          self.prior.to(sums.dtype))
        self.prior = new.to(self.dtype)
        self._sums.zero_()
        self._counts.zero_()
        self.epochs += 1
        if self.keep_history:
            self.history.append(self.prior.detach().cpu().clone())
        return self.prior

    def history_tensor(self) -> torch.Tensor:
        """The snapshots stacked as (E + 1, C, C): the prior used in each epoch, then the next one."""
        if not self.history:
            raise ValueError("this ClassPrior keeps no history (keep_history=False)")
        return torch.stack(self.history)

    def state_dict(self) -> dict:
        """The prior, the open epoch's accumulators, the epoch count and (with ``keep_history``) the
        history of priors (for checkpoints)."""
        state = {"prior": self.prior.detach().cpu().clone(), "sums": self._sums.cpu().clone(),
                 "counts": self._counts.cpu().clone(), "epochs": self.epochs}
        if self.keep_history:
            state["history"] = [t.clone() for t in self.history]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; ValueError naming the key for a missing entry or a tensor
        of the wrong shape, TypeError for a ``state`` that is not a dict or an entry that is not a
        tensor (nothing is changed then). Its ``history`` (epochs + 1 snapshots) replaces this prior's
        when both keep one; a state without it (from before it was saved) leaves the history as it is."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from ClassPrior.state_dict(), got {type(state).__name__}")
        missing = [key for key in ("prior", "sums", "counts", "epochs") if key not in state]
        if missing:
            raise ValueError(f"state lacks the key(s) {missing}; expected a ClassPrior.state_dict()")
        classes = self.num_classes
        for key, shape in (("prior", (classes, classes)), ("sums", (classes, classes)), ("counts", (classes,))):
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
            if tuple(value.shape) != shape:
                raise ValueError(f"state[{key!r}] has shape {tuple(value.shape)}, expected {shape} "
                                 f"for num_classes = {classes}")
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                raise ValueError(f"state[{key!r}] must hold finite, non-negative floats (a prior, class sums "
                                 f"or counts), got {value.dtype} with a nan, inf or negative entry")
        if bool((state["prior"].sum(dim=1) <= 0).any()):
            raise ValueError("state['prior'] has a row that sums to zero; its rows must be probability vectors")
        epochs = state["epochs"]
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
            raise ValueError(f"state['epochs'] must be a non-negative integer, got {epochs!r}")
        history = state.get("history")
        if history is not None:
            if not isinstance(history, (list, tuple)) or len(history) != int(epochs) + 1 or not all(
                    isinstance(t, torch.Tensor) and tuple(t.shape) == (classes, classes) for t in history):
                raise ValueError(f"state['history'] must be a list of epochs + 1 = {int(epochs) + 1} tensors of "
                                 f"shape {(classes, classes)} (the prior of every epoch)")
        self.prior = state["prior"].to(self.device, self.dtype).clone()
        self._sums = state["sums"].to(self.device, wide_dtype(self.device)).clone()
        self._counts = state["counts"].to(self.device, wide_dtype(self.device)).clone()
        self.epochs = int(epochs)
        if history is not None and self.keep_history:
            self.history = [t.detach().cpu().to(self.dtype).clone() for t in history]

    def __repr__(self) -> str:
        return (f"ClassPrior(num_classes={self.num_classes}, epochs={self.epochs}, "
                f"device={self.device}, accumulated={int(self._counts.sum())})")
