"""Training: a CE teacher, and knowledge distillation with any loss of :mod:`dkl_lib.losses`.

:func:`distill` trains a student with

    loss = ce_weight · CE(student(x), y) + factor(epoch) · kd_weight · Σ terms

where ``terms = dkl_lib.losses.loss_terms(loss, student_logits, teacher_logits, ...)`` (``kl``;
``wmse`` + ``soft_ce`` for dkl/ikl/gkl; ``tckd`` + ``nckd`` for dkd; nothing for ``ce``) and
factor rises linearly from 1/warmup_epochs to 1 over the first ``warmup_epochs`` epochs (the DKD /
mdistiller warm-up). The teacher is frozen: eval mode, no gradient (its mode and
``requires_grad`` flags are restored afterwards). For ikl/gkl with ``gi=True`` a
:class:`~dkl_lib.prior.ClassPrior` collects softmax(teacher / T_w) per class during each epoch and
is used from the next one (:mod:`dkl_lib.prior`).

Both :func:`train_teacher` and :func:`distill` use SGD with momentum and a multi-step learning-rate
decay, shuffle with a ``torch.Generator`` fixed by ``seed`` (same seed, same result on the CPU),
run bf16 autocast and channels_last on CUDA (on the CPU when asked: ``amp=True``), show
``tqdm.auto`` progress bars (``progress=False`` hides them), and return a :class:`TrainResult`: a
per-epoch history of every named loss term (averaged over the epoch), train and test accuracy
(percent), learning rate and seconds, with the best and last epoch. A ``callback(history)`` runs
after every epoch (live plots in notebook 03); it stops training by returning ``False`` or raising
:class:`StopTraining`. Ctrl-C (KeyboardInterrupt) stops too, and the finished epochs are returned
instead of lost.

:func:`adversarial_train` (notebook 04) trains a model whose normalisation sits inside it
(:class:`dkl_lib.attacks.Normalized`) on [0, 1] images with the TRADES or IKL-AT outer loss
(:func:`adversarial_loss_terms`) and the TRADES inner maximisation
(:func:`dkl_lib.attacks.trades_perturb`), optionally with the increasing-ε schedule
(:func:`epsilon_at`) and the cosine learning rate of the official IKL-AT code; it returns the same
:class:`TrainResult`, whose history adds the training ε and a per-epoch PGD robust accuracy.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist
from ._checks import NonFiniteError, check_model_output, check_module, supports_float64, wide_dtype
from ._checks import check_number as _number
from .attacks import _mean_percent, _model_dtype, clean_correct, pgd, trades_perturb
from .attacks import bf16_autocast as _autocast
from .data import TensorData, augment_crop_flip, batch_indices
from .losses import CustomLoss, loss_terms, registered_losses
from .prior import ClassPrior

__all__ = [
    "LOSSES",
    "LOSS_HPARAMS",
    "LOSS_SETTINGS",
    "loss_settings",
    "select_device",
    "StopTraining",
    "TrainResult",
    "evaluate",
    "predict_logits",
    "train_teacher",
    "distill",
]

#: Loss names accepted by :func:`distill`; "ce" means no KD term (the CE-only baseline).
LOSSES = ("ce", "kl", "dkl", "ikl", "gkl", "dkd")
#: The loss hyper-parameters :func:`distill` takes (``gi`` switches IKL/GKL's global information).
LOSS_HPARAMS = ("temperature", "alpha", "beta", "weight_temperature", "gi", "gamma")
#: Which of :data:`LOSS_HPARAMS` each loss uses (the others have no effect on it): a run's cache
#: key keeps only these, and the training dashboard disables the other controls.
LOSS_SETTINGS = {
    "ce": frozenset(),
    "kl": frozenset({"temperature"}),
    "dkl": frozenset({"temperature", "alpha", "beta"}),
    "dkd": frozenset({"temperature", "alpha", "beta"}),
    "ikl": frozenset({"temperature", "alpha", "beta", "weight_temperature", "gi"}),
    "gkl": frozenset({"temperature", "alpha", "beta", "weight_temperature", "gi", "gamma"}),
}
_DEFAULT_ALPHA_BETA = {"dkl": (1.0, 1.0), "ikl": (1.0, 1.0), "gkl": (1.0, 1.0), "dkd": (1.0, 8.0)}


def _custom(loss) -> Optional[CustomLoss]:
    """The registered loss ``loss`` (:func:`dkl_lib.losses.register_loss`), or None."""
    return registered_losses().get(loss) if isinstance(loss, str) and loss not in LOSSES else None


def loss_settings(loss: str) -> frozenset:
    """Which of :data:`LOSS_HPARAMS` the loss ``loss`` uses: :data:`LOSS_SETTINGS` for a built-in
    loss; for a registered one (:func:`dkl_lib.losses.register_loss`) ``temperature``, and with
    ``uses_prior`` also ``weight_temperature`` (the prior's temperature) and ``gi``."""
    if loss in LOSS_SETTINGS:
        return LOSS_SETTINGS[loss]
    record = _custom(loss)
    if record is None:
        raise ValueError(f"unknown loss {loss!r}; choose one of {list(LOSSES) + sorted(registered_losses())}")
    return frozenset({"temperature", "weight_temperature", "gi"} if record.uses_prior else {"temperature"})

Callback = Callable[[List[dict]], Optional[bool]]


class StopTraining(Exception):
    """Raise this from a training callback to stop after the epoch that just finished."""


def _callback_stops(callback: Optional[Callback], history: List[dict]) -> bool:
    """Run the per-epoch callback; True when it asks to stop (returns False or raises StopTraining)."""
    if callback is None:
        return False
    try:
        return callback(history) is False
    except StopTraining:
        return True


# Every progress bar of the library: one line in an 80-column terminal. tqdm's default line (percentage,
# rate, key=value postfix) ran to 100-150 columns: an 80-column terminal cut it (loss name and accuracy lost,
# a bar of one cell) and a console tqdm cannot measure (an IDE's, a pipe into tee) wrapped it onto new lines.
# Rate and percentage are left out (n/total and the remaining time say as much); dynamic_ncols follows the
# terminal's width, also after a resize (in a notebook: the widget takes the output's width).
_BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt}|{bar}| {elapsed}<{remaining}{postfix}"


def _progress_bar(iterable=None, **kwargs):
    """A ``tqdm.auto`` bar in the library's one-line format (postfixes are short texts: set_postfix_str)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, bar_format=_BAR_FORMAT, dynamic_ncols=True, **kwargs)


class _RunProgress:
    """Progress bars and cuDNN autotuning for one training run, shared by both trainers.

    Opens an epoch bar (and a batch bar for long epochs), turns on ``cudnn.benchmark`` on CUDA
    (fixed input shapes), and :meth:`close` restores it and closes the bars.
    """

    def __init__(self, *, epochs: int, steps_per_epoch: int, desc: str, progress: bool, device: torch.device,
                 batch_bar_from: int, initial: int = 0):
        self._cudnn_benchmark = torch.backends.cudnn.benchmark
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.steps_per_epoch = steps_per_epoch
        self.epoch_bar = _progress_bar(total=epochs, initial=initial, desc=desc, disable=not progress, leave=True,
                                       unit="epoch")
        self.batch_bar = None
        if progress and steps_per_epoch >= batch_bar_from:
            self.batch_bar = _progress_bar(total=steps_per_epoch, desc="  batches", leave=False, unit="batch")

    def start_epoch(self) -> None:
        if self.batch_bar is not None:
            self.batch_bar.reset(total=self.steps_per_epoch)

    def step(self) -> None:
        if self.batch_bar is not None:
            self.batch_bar.update()

    def end_epoch(self, history: List[dict], row: dict, callback: Optional[Callback], postfix: str) -> bool:
        """Record the epoch's row, advance the bar; True when the callback asks to stop."""
        history.append(row)
        self.epoch_bar.update()
        self.epoch_bar.set_postfix_str(postfix)
        return _callback_stops(callback, history)

    def close(self) -> None:
        torch.backends.cudnn.benchmark = self._cudnn_benchmark
        if self.batch_bar is not None:
            self.batch_bar.close()
        self.epoch_bar.close()


class _Parallel:
    """One training run's place in a torchrun group; in a plain process (world size 1) every
    method is the identity, so the trainers are one code path with and without torchrun.

    Each rank walks the GLOBAL batches of the one-process order (same seeded generator on every
    rank), draws the random augmentation / attack starts for the whole global batch, and keeps its
    strided share (rows rank, rank + W, ...; :func:`dkl_lib.distributed.shard_indices`). Its mean
    loss is scaled by :func:`~dkl_lib.distributed.local_loss_scale`, so the gradient DDP averages
    is that of the global-batch mean; epoch sums are all-reduced once per epoch.
    """

    def __init__(self):
        info = dist.dist_info()
        self.rank, self.world, self.is_main = info.rank, info.world_size, info.is_main
        self.active = self.world > 1

    def wrap(self, model: nn.Module, device: torch.device, *, forward_buffer_sync: bool = True) -> nn.Module:
        if not self.active:
            return model
        return dist.wrap_model(model, device, forward_buffer_sync=forward_buffer_sync)

    def batches(self, n: int, *, batch_size: int, generator: torch.Generator, drop_last: bool,
                device: torch.device, batchnorm: bool = True):
        """The global batches (index tensors). Every rank must take part, so a batch smaller than 1
        per rank is skipped; for a model with BatchNorm layers (``batchnorm``), which cannot train on
        one sample, so is a batch after the first that is smaller than 2 per rank. (In one process:
        only the one-image last batch of a model with BatchNorm is left out.)"""
        first = True
        least = 2 * self.world if batchnorm else self.world
        for idx in batch_indices(n, batch_size=batch_size, shuffle=True, generator=generator,
                                 drop_last=drop_last, device=device):
            if idx.numel() < self.world or (not first and idx.numel() < least):
                continue
            first = False
            yield idx

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global-batch tensor."""
        return t[self.rank::self.world] if self.active else t

    def scaled(self, loss: torch.Tensor, local_n: int, global_n: int) -> torch.Tensor:
        if not self.active:
            return loss
        return loss * dist.local_loss_scale(local_n, global_n, self.world)

    def epoch_totals(self, sums: Dict[str, torch.Tensor], **counts) -> Dict[str, float]:
        """The epoch's sums (and counts) over all ranks, as floats (one all-reduce)."""
        stats = {**sums, **counts}
        if self.active:
            stats = dist.all_reduce_sum(stats)
        return {k: float(v) for k, v in stats.items()}

    def accuracy(self, model: nn.Module, data: TensorData, *, amp: bool, channels_last: bool) -> float:
        """Top-1 test accuracy (%) of ``model``: under torchrun each rank predicts its strided share
        of the test set and the correct counts are summed, so every rank gets the one-process number
        for 1/N of the work (ImageNet's 50 000 validation images are decoded once, not N times)."""
        x, y = data.x_test[self.rank::self.world], data.y_test[self.rank::self.world]
        correct = _correct(model, x, y, data, amp=amp, channels_last=channels_last)
        totals = self.epoch_totals({}, correct=correct, seen=y.shape[0])
        return _percent(totals["correct"], totals["seen"])

    def collect(self) -> None:
        """Under torchrun, collect unreachable objects: a dropped DDP wrapper sits in reference
        cycles and its reducer holds the process group, which must not outlive the group's own
        shutdown (gloo can abort the process at interpreter exit otherwise)."""
        if self.active:
            import gc

            gc.collect()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on some rank (a stop request)."""
        if not self.active:
            return bool(flag)
        return dist.all_reduce_sum({"flag": float(bool(flag))})["flag"] > 0


#: Config keys that may change between a checkpoint and its resumption (where and how many).
_RESUMABLE_ANYWHERE = ("device", "amp", "channels_last", "world_size", "cpu_threads", "cpu_capability")


class _Checkpoints:
    """Per-epoch checkpoints of one run in ``folder`` (None: off) and resumption from them.

    A checkpoint holds everything the next epoch depends on: the (unwrapped) model, optimizer and
    scheduler states, the generators of batch order / augmentation / attack starts, the class
    prior with its snapshots, and the history, plus the run's config. Written by rank 0 only,
    atomically (:func:`dkl_lib.distributed.save_checkpoint`); read by rank 0 and broadcast, so
    ranks need not share a file system. Resuming a folder whose checkpoint has another config
    raises ``ValueError`` instead of mixing two runs.
    """

    def __init__(self, folder, *, every: int, keep: int, config: dict, par: _Parallel,
                 identity: Optional[Callable[[], Dict[str, Optional[str]]]] = None):
        self.folder = None if folder is None else Path(folder).expanduser()
        self.every = _positive_int("checkpoint_every", every)
        self.keep = _positive_int("keep_checkpoints", keep)
        self.config = {k: v for k, v in config.items() if k not in _RESUMABLE_ANYWHERE}
        self.par = par
        # what the run trains on besides its settings ({"data": digest, "teacher": digest}, see
        # _run_identity), computed only when there are checkpoints
        self.identity = identity() if identity is not None and self.folder is not None else None

    def resume(self, model: nn.Module, optimizer, scheduler, generators: Dict[str, torch.Generator],
               prior: Optional[ClassPrior], extra: Optional[Dict[str, nn.Module]] = None):
        """(first epoch to run (0-based), history so far); restores every state in place
        (``extra``: further modules, e.g. the weight average)."""
        if self.folder is None:
            return 0, []
        found = dist.load_latest_checkpoint(self.folder) if self.par.is_main else None
        found = dist.broadcast_object(found) if self.par.active else found
        if found is None:
            return 0, []
        state = found.state
        stored = {k: v for k, v in state.get("config", {}).items() if k not in _RESUMABLE_ANYWHERE}
        if stored != self.config:
            diff = sorted(k for k in set(stored) | set(self.config) if stored.get(k) != self.config.get(k))
            raise ValueError(f"{found.path} is a checkpoint of a different run (settings differ: {diff}); "
                             "resume with the same settings, use another checkpoint folder, or delete "
                             f"{self.folder} to start this run afresh")
        stored = state.get("identity")  # (None in a checkpoint written before it was recorded)
        if stored is not None and self.identity is not None and stored != self.identity:
            diff = sorted(k for k in set(stored) | set(self.identity) if stored.get(k) != self.identity.get(k))
            raise ValueError(f"{found.path} is a checkpoint of a run on other {' and '.join(diff)} (the same settings, "
                             "but other images, labels or weights); resume with the same ones, use another checkpoint "
                             f"folder, or delete {self.folder} to start this run afresh")
        dist.unwrap_model(model).load_state_dict(state["model"])  # (a torch.compile'd model: its own module)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for name, gen in generators.items():
            gen.set_state(state["generators"][name])
        if prior is not None:
            prior.load_state_dict(state["prior"])  # (its history too, in checkpoints since it holds one)
            if "history" not in state["prior"] and state.get("prior_history") is not None:  # older checkpoints
                prior.history = [t.clone() for t in state["prior_history"]]
        for name, module in (extra or {}).items():  # (a copy of a torch.compile'd model: its own module)
            dist.unwrap_model(module).load_state_dict(state["extra"][name])
        return int(state["epoch"]), list(state["history"])

    def save(self, epoch: int, model: nn.Module, optimizer, scheduler, generators: Dict[str, torch.Generator],
             prior: Optional[ClassPrior], history: List[dict], *, force: bool = False,
             extra: Optional[Dict[str, nn.Module]] = None) -> None:
        """Checkpoint after ``epoch`` (1-based) every ``every`` epochs, or now when ``force``."""
        if self.folder is None or not (force or epoch % self.every == 0):
            return
        state = {"epoch": epoch, "model": dist.unwrap_model(model).state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "generators": {name: gen.get_state() for name, gen in generators.items()},
                 "prior": prior.state_dict() if prior is not None else None,  # (with its history)
                 "history": history, "config": self.config, "identity": self.identity,
                 "extra": {name: dist.unwrap_model(module).state_dict() for name, module in (extra or {}).items()}}
        dist.save_checkpoint(dist.checkpoint_path(self.folder, epoch), state)
        dist.prune_checkpoints(self.folder, keep=self.keep)


class _Run(NamedTuple):
    par: _Parallel
    device: torch.device
    amp: bool
    channels_last: bool
    memory_format: torch.memory_format
    dtype: torch.dtype
    data: TensorData
    config: dict
    checkpoints: _Checkpoints


def _batch(data: TensorData, idx: torch.Tensor, par: "_Parallel", augment: Optional[dict], augment_gen):
    """This rank's share of one global training batch: (idx, x, y, global batch size). In-memory
    data is indexed and augmented for the whole global batch (so every rank gets the one-process
    draws), then split; lazily decoded data (:class:`~dkl_lib.data.FolderData`) decodes only this
    rank's rows, with the crops drawn for the global batch by the data itself."""
    global_n = idx.shape[0]
    if data.lazy:  # crops drawn for the global batch, only this rank's rows decoded
        x = data.x_train.take(idx, keep=par.local)
        idx = par.local(idx)
        return idx, x, data.y_train[idx], global_n
    x, y = data.x_train[idx], data.y_train[idx]
    if augment:
        x = augment_crop_flip(x, generator=augment_gen, **augment)
    return par.local(idx), par.local(x), par.local(y), global_n


def _prefetched(items, fetch):
    """``fetch(item)`` for each item, in order, with the next one computed on a background thread
    while the caller works on the current one (one thread, so calls stay in order and draw their
    random numbers in the same order as without prefetching)."""
    from concurrent.futures import ThreadPoolExecutor

    it = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dkl-prefetch") as pool:
        try:
            pending = pool.submit(fetch, next(it))
        except StopIteration:
            return
        for item in it:
            current, pending = pending, pool.submit(fetch, item)
            yield current.result()
        yield pending.result()


def _start_run(model: nn.Module, data: TensorData, *, device, amp: Optional[bool], channels_last: Optional[bool],
               config: dict, checkpoint_dir, checkpoint_every: int, keep_checkpoints: int,
               teacher: Optional[nn.Module] = None) -> _Run:
    """What both trainers set up first: the device (this rank's under torchrun), bf16 autocast and
    channels_last (default: on for CUDA), the model and data moved there (data in the model's
    dtype), the config completed with those choices, and the run's checkpoints."""
    par = _Parallel()
    _check_split_sizes(data, batch_size=config["batch_size"], drop_last=config["drop_last"], world=par.world)
    dtypes = {_model_dtype(m) for m in (model, teacher) if m is not None}  # float64 keeps a run off MPS
    device = select_device(device, dtype=torch.float64 if torch.float64 in dtypes else _model_dtype(model))
    amp = (device.type == "cuda") if amp is None else bool(amp)
    if amp and device.type not in ("cuda", "cpu"):  # bf16_autocast would silently do nothing there
        raise ValueError(f"amp (bf16 autocast) runs on CUDA and the CPU, not on {device.type}; use amp=False")
    channels_last = (device.type == "cuda") if channels_last is None else bool(channels_last)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model.to(device=device, memory_format=memory_format)
    dtype = _model_dtype(model)
    config = {**config, "device": str(device), "amp": amp, "channels_last": channels_last,
              "dtype": str(dtype).replace("torch.", ""), "world_size": par.world,
              "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
              "cpu_capability": _cpu_capability() if device.type == "cpu" else None}
    data = data.to(device, dtype)
    checkpoints = _Checkpoints(checkpoint_dir, every=checkpoint_every, keep=keep_checkpoints, config=config, par=par,
                               identity=lambda: _run_identity(data, teacher))
    return _Run(par, device, amp, channels_last, memory_format, dtype, data, config, checkpoints)


def _run_identity(data: TensorData, teacher: Optional[nn.Module], rows: int = 256) -> Dict[str, Optional[str]]:
    """Digests of what a run trains on beyond its settings, so that a checkpoint is not resumed on
    other data or with another teacher: the data's description (name, sizes, classes, normalisation,
    augmentation, ``info``), all labels and up to ``rows`` evenly spaced images of each split
    (decoded-per-batch data: the description and labels only); the teacher's parameters and buffers
    (None without one). Independent of the device and memory layout (:func:`dkl_lib.distributed.state_digest`)."""
    facts = data.describe()
    for split in ("train", "test"):
        y = getattr(data, f"y_{split}")
        facts[f"y_{split}"] = y
        if not data.lazy:
            n = y.shape[0]
            idx = torch.linspace(0, n - 1, min(rows, n)).round().long().to(y.device)
            facts[f"x_{split}_rows"] = getattr(data, f"x_{split}")[idx]
    return {"data": dist.state_digest(facts),
            "teacher": None if teacher is None else dist.state_digest(dist.unwrap_model(teacher).state_dict())}


def _has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer (any dimension, SyncBatchNorm too)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _check_split_sizes(data: TensorData, *, batch_size: int, drop_last: bool, world: int) -> None:
    """ValueError, before anything runs, for data on which an epoch would train on no batch or
    measure no test accuracy (the history's test_acc, and the best epoch chosen by it)."""
    if data.n_test < 1:
        raise ValueError("the data have no test images (x_test is empty): the trainers measure the test accuracy "
                         "after every epoch and report the best epoch by it; hold out at least one image")
    if drop_last and batch_size > data.n_train:
        raise ValueError(f"batch_size={batch_size} with drop_last=True leaves no batch to train on: the data have "
                         f"{data.n_train} training images; lower batch_size or set drop_last=False")
    if min(batch_size, data.n_train) < world:
        raise ValueError(f"{world} processes share each batch, one image at least each, but a batch holds "
                         f"{min(batch_size, data.n_train)} (batch_size={batch_size}, {data.n_train} training images); "
                         "raise batch_size or run fewer processes")


def _cpu_capability() -> Optional[str]:
    """The vector instruction set PyTorch's CPU kernels use here ("AVX512", "AVX2", "DEFAULT", ...):
    two CPUs with different ones round float sums differently, so a run's last digits (and, over a
    training, a test image here and there) can differ between machines."""
    try:
        import torch.backends.cpu as cpu_backend

        return cpu_backend.get_cpu_capability()
    except (ImportError, AttributeError):  # a torch without it
        return None


def select_device(device=None, *, dtype: Optional[torch.dtype] = None) -> torch.device:
    """The device to train on: ``device`` if given (a name or torch.device, "auto" = None), else
    CUDA when available, then Apple MPS, then the CPU. Asking for an unavailable CUDA/MPS device
    raises ``ValueError``. Under torchrun (an initialised process group of several ranks) "cuda"
    without an index means this rank's GPU, ``cuda:LOCAL_RANK``.

    ``dtype``: the dtype of the models that will run there. MPS has no float64, so for
    ``dtype=torch.float64`` the automatic choice skips MPS for the CPU (with a warning: the
    float64 checks of the notebooks are small), and an explicit "mps" raises ``ValueError``."""
    info = dist.dist_info()
    local_rank = info.local_rank if info.world_size > 1 else None
    if device is not None and not (isinstance(device, str) and device == "auto"):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"unknown device {device!r}: {err}") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but CUDA is not available")
        if device.type == "mps" and not (torch.backends.mps.is_available()):
            raise ValueError("device 'mps' was requested but MPS is not available")
        if dtype == torch.float64 and not supports_float64(device):
            raise ValueError(f"device {str(device)!r} has no float64 (Apple MPS computes in float32 at most); "
                             "run float64 models with device='cpu', or use float32")
        if device.type == "cuda" and device.index is None and local_rank is not None:
            return torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        if dtype != torch.float64:
            return torch.device("mps")
        warnings.warn("float64 model: running on the CPU, since Apple MPS has no float64 "
                      "(pass device='cpu' to silence this)", stacklevel=2)
    return torch.device("cpu")


@dataclass
class TrainResult:
    """What a training run returns.

    Attributes:
        model: the trained model (trained in place; its last-epoch weights).
        history: one dict per finished epoch with keys ``epoch`` (1-based), ``lr``, ``kd_factor``,
            ``loss`` (the total optimised), ``ce`` and every KD term (``kl``; ``wmse``,
            ``soft_ce``; ``tckd``, ``nckd``) averaged over the epoch's samples, ``train_acc`` and
            ``test_acc`` in percent, and ``seconds``.
        config: the resolved hyper-parameters (JSON-able).
        priors: for GI runs, the class prior used in each epoch (list of (C, C) CPU tensors, one
            more than epochs: the last is the prior for the next epoch); else None.
        teacher_acc: the teacher's test accuracy (percent) for :func:`distill`, else None.
        stopped: None (all epochs ran), "callback" or "interrupted".
        seconds: wall time of the whole run (of this call, when resumed).
        resumed_from: the epoch of the checkpoint this run continued from, else None.
    """

    model: nn.Module
    history: List[dict]
    config: dict
    priors: Optional[List[torch.Tensor]] = None
    teacher_acc: Optional[float] = None
    stopped: Optional[str] = None
    seconds: float = 0.0
    resumed_from: Optional[int] = None

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def best_epoch(self) -> Optional[int]:
        """The 1-based epoch of the highest test accuracy (the first one on ties)."""
        if not self.history:
            return None
        best = max(range(len(self.history)), key=lambda i: (self.history[i]["test_acc"], -i))
        return self.history[best]["epoch"]

    @property
    def best_acc(self) -> float:
        return max((h["test_acc"] for h in self.history), default=math.nan)

    @property
    def last_acc(self) -> float:
        return self.history[-1]["test_acc"] if self.history else math.nan

    @property
    def ran_on(self) -> dict:
        """Where the run ran, not part of what it computes (cache keys leave it out): device,
        dtype, amp, channels_last, world_size, cpu_threads (the CPU's intra-op threads; None on
        GPUs) and cpu_capability (the CPU's vector instructions as PyTorch uses them, e.g. "AVX2" or
        "AVX512"; None on GPUs), which change the results in the last digits only."""
        return {k: self.config.get(k) for k in _RESUMABLE_ANYWHERE + ("dtype",)}

    def summary(self) -> dict:
        """best_acc, best_epoch, last_acc, epochs, seconds, stopped, teacher_acc, resumed_from, ran_on."""
        return {"best_acc": self.best_acc, "best_epoch": self.best_epoch, "last_acc": self.last_acc,
                "epochs": self.epochs_run, "seconds": self.seconds, "stopped": self.stopped,
                "teacher_acc": self.teacher_acc, "resumed_from": self.resumed_from, "ran_on": self.ran_on}

    def frame(self):
        """The history as a pandas DataFrame, one row per epoch."""
        import pandas as pd

        return pd.DataFrame(self.history)


# ------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, data: TensorData, *, batch_size: int = 1000,
                   amp: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Logits (N, classes) of ``model`` in eval mode for raw images x (normalised here with
    ``data``'s mean/std), in batches of ``batch_size``, on x's device (``amp``: bf16 autocast;
    ``channels_last``: that memory format); returned as float32 (float64 models: float64)."""
    was_training = model.training
    model.eval()
    dtype = _model_dtype(model)
    out = []
    try:
        for idx in batch_indices(x.shape[0], batch_size=batch_size, device=x.device):
            xb = data.normalize(x[idx].to(dtype))
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(x.device, amp):
                logits = model(xb)
            check_model_output("model", logits, data.num_classes)  # a shape check, no sync
            out.append(logits.to(torch.float64 if dtype == torch.float64 else torch.float32))
    finally:
        model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, *, split: str = "test", batch_size: int = 1000,
             amp: Optional[bool] = None, channels_last: bool = False) -> float:
    """Top-1 accuracy in percent of ``model`` (eval mode) on ``data``'s "test" or "train" split.

    The model must already be on the data's device. ``amp`` (default: on for CUDA) evaluates under
    bf16 autocast, ``channels_last`` in that memory format; ``batch_size``: images per forward pass.
    """
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    x, y = (data.x_test, data.y_test) if split == "test" else (data.x_train, data.y_train)
    amp = (data.device.type == "cuda") if amp is None else amp
    return _percent(_correct(model, x, y, data, batch_size=batch_size, amp=amp, channels_last=channels_last),
                    y.shape[0])


def _correct(model: nn.Module, x, y: torch.Tensor, data: TensorData, *, batch_size: int = 1000, amp: bool,
             channels_last: bool) -> int:
    """How many of the images x ``model`` classifies as y (0 for no image)."""
    if y.shape[0] == 0:
        return 0
    logits = predict_logits(model, x, data, batch_size=batch_size, amp=amp, channels_last=channels_last)
    return int((logits.argmax(dim=1) == y).sum())


def _percent(correct: float, n: float) -> float:
    """100 · correct / n (NaN for n = 0), one formula for every accuracy, so one process and
    torchrun's summed shares give the same float."""
    return 100.0 * correct / n if n else math.nan


# ----------------------------------------------------------------------------------- validation
def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_milestones(milestones, epochs: int, name: str = "milestones") -> List[int]:
    if milestones is None:
        return []
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
        raise TypeError(f"{name} must be a sequence of epochs, got {milestones!r}")
    out = [_positive_int(f"{name} entries", m) for m in milestones]
    if out != sorted(set(out)):
        raise ValueError(f"{name} must be strictly increasing, got {list(milestones)}")
    return out


def _loss_hparams(loss: str, *, temperature, alpha, beta, gamma, weight_temperature) -> Dict[str, float]:
    """The keyword arguments of loss_terms(loss, ...) (only those the loss takes)."""
    if loss == "ce":
        return {}
    hp = {"temperature": _number("temperature", temperature, low=0.0, low_open=True)}
    if loss == "kl":
        return hp
    record = _custom(loss)
    if record is not None:  # alpha, beta, gamma do not reach a registered loss (ignored, as for kl)
        if record.uses_prior:  # the temperature of the GI prior's softmax, as for ikl
            hp["weight_temperature"] = (hp["temperature"] if weight_temperature is None else
                                        _number("weight_temperature", weight_temperature, low=0.0, low_open=True))
        return hp
    default_alpha, default_beta = _DEFAULT_ALPHA_BETA[loss]
    hp["alpha"] = _number("alpha", default_alpha if alpha is None else alpha, low=0.0)
    hp["beta"] = _number("beta", default_beta if beta is None else beta, low=0.0)
    if loss in ("ikl", "gkl"):
        hp["weight_temperature"] = (hp["temperature"] if weight_temperature is None else
                                    _number("weight_temperature", weight_temperature, low=0.0, low_open=True))
    if loss == "gkl":
        hp["gamma"] = _number("gamma", gamma, low=0.0, low_open=True)
    return hp


# ----------------------------------------------------------------------------------- main loop
def _fit(model: nn.Module, data: TensorData, *, teacher: Optional[nn.Module], loss: str, gi: bool,
         hparams: Dict[str, float], ce_weight: float, kd_weight: float, warmup_epochs: int,
         epochs: int, lr: float, momentum: float, weight_decay: float, milestones: List[int],
         lr_decay: float, nesterov: bool, batch_size: int, drop_last: bool, seed: int, device,
         amp: Optional[bool], channels_last: Optional[bool], progress: bool,
         callback: Optional[Callback], class_prior: Optional[ClassPrior], desc: str,
         config: dict, checkpoint_dir=None, checkpoint_every: int = 1,
         keep_checkpoints: int = 2) -> TrainResult:
    start = time.perf_counter()
    par, device, amp, channels_last, memory_format, dtype, data, config, checkpoints = _start_run(
        model, data, device=device, amp=amp, channels_last=channels_last, config=config,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        teacher=teacher)
    augment = data.augment
    _check_fits("student" if teacher is not None else "model", model, data, normalize=True, amp=amp,
                channels_last=channels_last)

    teacher_flags = teacher_was_training = None  # the teacher's own flags, restored at the end
    teacher_acc = cached_teacher_logits = prior = bars = net = None
    first_epoch, history, stopped = 0, [], None
    try:  # from here on, whatever happens, the teacher gets its flags back (finally, below)
        if teacher is not None:
            teacher.to(device=device, memory_format=memory_format)
            _check_fits("teacher", teacher, data.to(dtype=_model_dtype(teacher)), normalize=True, amp=amp,
                        channels_last=channels_last)
            teacher_was_training = teacher.training
            teacher.eval()
            teacher_flags = [p.requires_grad for p in teacher.parameters()]
            teacher.requires_grad_(False)
            teacher_acc = evaluate(teacher, data.to(dtype=_model_dtype(teacher)), amp=amp,
                                   channels_last=channels_last)
            if not augment and not data.lazy:  # fixed inputs: the frozen teacher's logits are computed once
                t_data = data.to(dtype=_model_dtype(teacher))
                cached_teacher_logits = predict_logits(teacher, t_data.x_train, t_data, amp=amp,
                                                       channels_last=channels_last).to(dtype)

        if gi:
            prior = class_prior if class_prior is not None else ClassPrior(data.num_classes, device=device)
            if prior.num_classes != data.num_classes:
                raise ValueError(f"class_prior has {prior.num_classes} classes, the data {data.num_classes}")
            prior.to(device)
        custom = _custom(loss)  # a registered loss: its terms are checked (no device sync) at every step,
        check_finite = custom is not None  # and for finiteness (one sync) on the first step and per epoch

        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                    weight_decay=weight_decay, nesterov=nesterov)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=lr_decay)
        shuffle_gen = torch.Generator().manual_seed(int(seed))
        augment_gen = torch.Generator().manual_seed(int(seed) + 1_000_003)
        generators = {"shuffle": shuffle_gen, "augment": augment_gen}
        if data.lazy:  # the random crops of images decoded per batch: reseeded, so a run depends on its seed only
            generators["crops"] = data.x_train.generator.manual_seed(int(seed) + 3_000_017)
        steps_per_epoch = max(1, (data.n_train // batch_size) if drop_last else math.ceil(data.n_train / batch_size))

        first_epoch, history = checkpoints.resume(model, optimizer, scheduler, generators, prior)
        net = par.wrap(model, device)  # DDP under torchrun (after resuming: DDP syncs from rank 0)
        bars = _RunProgress(epochs=epochs, steps_per_epoch=steps_per_epoch, desc=desc,
                            progress=progress and par.is_main, device=device, batch_bar_from=100,
                            initial=first_epoch)
        batchnorm = _has_batchnorm(model)
        for epoch in range(first_epoch, epochs):
            t0 = time.perf_counter()
            model.train()
            factor = min(1.0, (epoch + 1) / warmup_epochs) if warmup_epochs > 0 else 1.0
            lr_now = optimizer.param_groups[0]["lr"]
            sums: Dict[str, torch.Tensor] = {}
            correct = torch.zeros((), device=device, dtype=torch.int64)
            seen = 0
            bars.start_epoch()
            batches = par.batches(data.n_train, batch_size=batch_size, generator=shuffle_gen,
                                  drop_last=drop_last, device=device, batchnorm=batchnorm)
            fetch = functools.partial(_batch, data, par=par, augment=augment, augment_gen=augment_gen)
            # images decoded per batch: the next batch is decoded while this one trains
            for idx, x, y, global_n in (_prefetched(batches, fetch) if data.lazy else map(fetch, batches)):
                x = data.normalize(x)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(device, amp):
                    logits = net(x)
                    if teacher is not None and cached_teacher_logits is None:
                        with torch.no_grad():
                            t_logits = teacher(x.to(_model_dtype(teacher)))
                if teacher is not None and cached_teacher_logits is not None:
                    t_logits = cached_teacher_logits[idx]
                ce = F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16)
                                     else logits, y)
                terms: Dict[str, torch.Tensor] = {}
                if loss != "ce":
                    t_logits = t_logits.detach()
                    extra = {}
                    if prior is not None:
                        extra = {"class_prior": prior.prior}
                    if custom is not None:
                        terms = custom(logits, t_logits, targets=y, temperature=hparams["temperature"],
                                       check_finite=check_finite, **extra)
                        check_finite = False
                    else:
                        with _diverging(epoch + 1, lr_now):
                            terms = loss_terms(loss, logits, t_logits, targets=y, **hparams, **extra)
                total = ce_weight * ce
                if terms:
                    total = total + (factor * kd_weight) * sum(terms.values())
                if prior is not None:  # before the backward: a custom loss's checked update then syncs on
                    # the forward alone, not on the backward and the optimizer step (this epoch's prior is
                    # not changed by it: the sums become the next epoch's prior)
                    if custom is None:  # the loss has just checked t_logits and y: no sync at all
                        prior._update_checked(t_logits, y, weight_temperature=hparams["weight_temperature"])
                    else:
                        prior.update(t_logits, y, weight_temperature=hparams["weight_temperature"])
                optimizer.zero_grad(set_to_none=True)
                par.scaled(total, y.shape[0], global_n).backward()
                optimizer.step()
                n = y.shape[0]
                seen += n
                for name, value in (("loss", total), ("ce", ce), *terms.items()):
                    v = value.detach().to(wide_dtype(device)) * n  # float32 on MPS (no float64)
                    sums[name] = sums[name] + v if name in sums else v
                correct += (logits.detach().argmax(dim=1) == y).sum()
                bars.step()
            # DDP copies rank 0's buffers into every rank at the START of each forward, so after the
            # epoch's last one each rank holds its own BatchNorm statistics: give every rank rank 0's
            # (the saved model) before the test pass, the checkpoint and the caller's use of the model
            # (a teacher trained here distils on every rank), as a resumed run has them
            dist.broadcast_buffers(model)
            totals = par.epoch_totals(sums, correct=correct, seen=seen)
            seen, correct = totals.pop("seen"), totals.pop("correct")
            bad = [] if custom is None else [k for k, v in totals.items()
                                             if k not in ("loss", "ce") and not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"custom loss {loss!r}: its term{'s' if len(bad) > 1 else ''} "
                                         f"{', '.join(map(repr, bad))} became non-finite in epoch {epoch + 1}; "
                                         "lower the learning rate or check the loss function")
            if not math.isfinite(totals["loss"]):
                raise FloatingPointError(f"the training loss became non-finite in epoch {epoch + 1}; "
                                         "lower the learning rate or check the data")
            scheduler.step()
            if prior is not None:
                prior.end_epoch()  # all-reduces the class sums under torchrun
            test_acc = par.accuracy(model, data, amp=amp, channels_last=channels_last)
            row = {"epoch": epoch + 1, "lr": lr_now, "kd_factor": factor if loss != "ce" else 0.0}
            row.update({k: v / seen for k, v in totals.items()})
            row.update({"train_acc": 100.0 * correct / seen, "test_acc": test_acc,
                        "seconds": time.perf_counter() - t0})
            stop = par.any(bars.end_epoch(history, row, callback, f"loss {row['loss']:.3f}, test {test_acc:.1f}%"))
            checkpoints.save(epoch + 1, model, optimizer, scheduler, generators, prior, history, force=stop)
            if stop:
                stopped = "callback"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        if bars is not None:
            bars.close()
        net = None  # drop the DDP wrapper now, then collect it (see _Parallel.collect)
        par.collect()
        if teacher_flags is not None:
            for p, flag in zip(teacher.parameters(), teacher_flags):
                p.requires_grad_(flag)
            teacher.train(teacher_was_training)
    return TrainResult(
        model=model, history=history, config=config,
        priors=list(prior.history) if prior is not None and prior.keep_history else None,
        teacher_acc=teacher_acc, stopped=stopped, seconds=time.perf_counter() - start,
        resumed_from=first_epoch or None)


def _common_config(*, epochs, lr, momentum, weight_decay, milestones, lr_decay, nesterov, batch_size,
                   drop_last, seed):
    epochs = _positive_int("epochs", epochs)
    return dict(
        epochs=epochs,
        lr=_number("lr", lr, low=0.0, low_open=True),
        momentum=_number("momentum", momentum, low=0.0, high=1.0, high_open=True),
        weight_decay=_number("weight_decay", weight_decay, low=0.0),
        milestones=_check_milestones(milestones, epochs),
        lr_decay=_number("lr_decay", lr_decay, low=0.0, low_open=True),
        nesterov=bool(nesterov),
        batch_size=_positive_int("batch_size", batch_size),
        drop_last=bool(drop_last),
        seed=_nonneg_int("seed", seed),
    )


def _check_data(data) -> None:
    if not isinstance(data, TensorData):
        raise TypeError(f"data must be a dkl_lib.data.TensorData, got {type(data).__name__}")


def _check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a function of the history (or None), got {type(callback).__name__}")


@contextlib.contextmanager
def _diverging(epoch: int, lr: float):
    """Logits that became nan or inf in the middle of epoch ``epoch`` (a loss's or an attack's
    input check) stop the run with a FloatingPointError that says it diverged, as the end-of-epoch
    check of the loss does."""
    try:
        yield
    except NonFiniteError as err:
        raise FloatingPointError(f"the training diverged: the logits became non-finite in epoch {epoch} ({err}); "
                                 f"lower the learning rate (now {lr:g}), or check the data and the teacher") from err


@torch.no_grad()
def _check_fits(name: str, model: nn.Module, data: TensorData, *, normalize: bool, amp: bool = False,
                channels_last: bool = False) -> None:
    """Once per run, before training: ``model`` takes the data's images and returns logits of shape
    (B, data.num_classes). One eval-mode forward of one black image of the data's shape without
    gradient (mode restored; no BatchNorm statistics, random draws or lazily decoded images change):
    a wrong last layer or input size is named here, not found as "Target 3 is out of bounds" or a
    silently wrong accuracy later. ``amp``, ``channels_last``: as the run's forwards (the same kernels).
    A ``torch.compile``'d model is probed through its own module, eagerly: no compilation for this."""
    model = dist.unwrap_model(model)
    x = torch.zeros((1, *data.image_shape), dtype=_model_dtype(model), device=data.device)
    if normalize:
        x = data.normalize(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        with _autocast(data.device, amp):
            out = model(x)
    except RuntimeError as err:  # e.g. "mat1 and mat2 shapes cannot be multiplied"
        raise ValueError(f"{name} cannot take the data's images (one batch of shape {tuple(x.shape)}): "
                         f"{err}") from err
    finally:
        model.train(was_training)
    check_model_output(name, out, data.num_classes)


def train_teacher(model: nn.Module, data: TensorData, *, epochs: int, lr: float = 0.05,
                  momentum: float = 0.9, weight_decay: float = 5e-4,
                  milestones: Optional[Sequence[int]] = None, lr_decay: float = 0.1,
                  nesterov: bool = False, batch_size: int = 64, drop_last: bool = False,
                  seed: int = 0, device=None, amp: Optional[bool] = None,
                  channels_last: Optional[bool] = None, progress: bool = True,
                  callback: Optional[Callback] = None, desc: str = "teacher", checkpoint_dir=None,
                  checkpoint_every: int = 1, keep_checkpoints: int = 2) -> TrainResult:
    """Train ``model`` on ``data`` with cross-entropy only (a teacher, or the CE baseline).

    Same schedule, history, stop/interrupt, checkpoint/resume and torchrun behaviour as
    :func:`distill` with ``loss="ce"``.
    The model is trained in place on the selected device (:func:`select_device`) in its own
    dtype (a float64 model trains in float64). Notebook 03 trains (or loads from cache) its
    teacher with this.
    """
    check_module("model", model)
    _check_data(data)
    _check_callback(callback)
    cfg = _common_config(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         milestones=milestones, lr_decay=lr_decay, nesterov=nesterov,
                         batch_size=batch_size, drop_last=drop_last, seed=seed)
    config = {"task": "teacher", "loss": "ce", **cfg}
    return _fit(model, data, teacher=None, loss="ce", gi=False, hparams={}, ce_weight=1.0,
                kd_weight=0.0, warmup_epochs=0, device=device, amp=amp, channels_last=channels_last,
                progress=progress, callback=callback, class_prior=None, desc=desc, config=config,
                checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                keep_checkpoints=keep_checkpoints, **cfg)


def distill(student: nn.Module, teacher: Optional[nn.Module], data: TensorData, *, loss: str = "kl",
            gi: bool = False, temperature: float = 4.0, alpha: Optional[float] = None,
            beta: Optional[float] = None, gamma: float = 1.0,
            weight_temperature: Optional[float] = None, ce_weight: float = 1.0,
            kd_weight: float = 1.0, warmup_epochs: int = 0, epochs: int, lr: float = 0.05,
            momentum: float = 0.9, weight_decay: float = 5e-4,
            milestones: Optional[Sequence[int]] = None, lr_decay: float = 0.1,
            nesterov: bool = False, batch_size: int = 64, drop_last: bool = False, seed: int = 0,
            device=None, amp: Optional[bool] = None, channels_last: Optional[bool] = None,
            class_prior: Optional[ClassPrior] = None, progress: bool = True,
            callback: Optional[Callback] = None, desc: Optional[str] = None, checkpoint_dir=None,
            checkpoint_every: int = 1, keep_checkpoints: int = 2) -> TrainResult:
    """Knowledge distillation: train ``student`` from a frozen ``teacher`` with the KD loss ``loss``.

    Student loss per batch = ce_weight · CE(student, y) + factor · kd_weight · Σ
    ``loss_terms(loss, student_logits, teacher_logits, targets=y, ...)``, factor =
    min(1, epoch / warmup_epochs) (1-based epoch; 1 when warmup_epochs = 0).

    Args:
        student, teacher: models with the same number of outputs; the teacher may be None only for
            ``loss="ce"``. Both are moved to the device; the student trains in place in its own
            dtype. The teacher runs in eval mode without gradient (flags restored at the end); when
            the data has no augmentation its logits are computed once per run.
        data: a :class:`~dkl_lib.data.TensorData`; batches are normalised with its mean/std and,
            when ``data.augment`` is set, augmented on the device (:func:`augment_crop_flip`).
        loss: one of :data:`LOSSES`: "ce", "kl", "dkl", "ikl", "gkl", "dkd", or the name of a loss
            registered with :func:`dkl_lib.losses.register_loss` (its named terms are logged like
            the built-in ones; it takes ``temperature``, and with ``uses_prior`` the GI prior).
        gi: ikl/gkl (and registered losses with ``uses_prior``) only: class-wise global information
            from a :class:`ClassPrior` fed with the teacher logits (``class_prior`` lets you pass your
            own, e.g. to watch it live).
        temperature, alpha, beta, gamma, weight_temperature: the loss's hyper-parameters, passed
            only where the loss takes them (alpha/beta default: 1/1, dkd 1/8).
        ce_weight, kd_weight, warmup_epochs: the weights of the two parts and the KD warm-up.
        epochs, lr, momentum, weight_decay, milestones, lr_decay, nesterov, batch_size, drop_last:
            SGD with momentum, learning rate × ``lr_decay`` at each milestone epoch. Every training
            image is used each epoch, except the last batch's with ``drop_last`` and a last batch of
            one image for a student with BatchNorm (which cannot train on one).
        seed: fixes the batch order and the augmentation (build models with
            ``models.build_model(..., seed=...)`` to fix their initialisation too).
        device: None = :func:`select_device`. amp (bf16 autocast), channels_last: default on for
            CUDA only; ``amp=True`` on the CPU runs CPU bf16 autocast (slow; it checks the mixed-precision
            path without a GPU).
        progress: tqdm bars; desc: their label (default: the loss name). callback:
            ``callback(history)`` after each epoch; return False or raise :class:`StopTraining` to stop.
        checkpoint_dir: a folder for per-epoch checkpoints (None: none). When it already holds a
            checkpoint of this run, training RESUMES from the newest one (model, optimizer,
            schedule, batch-order and augmentation generators, class prior, history), so the
            result equals an uninterrupted run; a checkpoint of other settings, other data or
            another teacher (compared by value: labels, sampled images, weights) raises ValueError.
            checkpoint_every: save every N epochs (and when a callback stops the run);
            keep_checkpoints: how many of the newest to keep.

    ``torch.compile(student)`` (and a compiled teacher) may be passed as they are: the run is the
    plain model's (same history, up to float rounding), and checkpoints hold the plain parameter names
    (:func:`dkl_lib.distributed.unwrap_model`), so a compiled run resumes uncompiled and back.

    Under torchrun (an initialised process group, :func:`dkl_lib.distributed.init_from_env`) the
    student is wrapped in DistributedDataParallel and each rank trains on its strided share of
    every global batch of ``batch_size`` (the one-process batches; augmentation drawn for the
    global batch), with its loss scaled so the averaged gradient is the global-batch gradient;
    the class prior and the epoch metrics are all-reduced, the callback's stop request is
    honoured when any rank makes it, progress bars and checkpoints are rank 0's. Without
    BatchNorm the run equals the one-process run up to float rounding; BatchNorm normalises
    each rank's share (as in any DDP training).

    Returns:
        :class:`TrainResult` (history, best/last accuracy, teacher accuracy, GI prior snapshots).

    Notebook: 03_knowledge_distillation (through :func:`dkl_lib.experiments.run_grid`).
    """
    custom = _custom(loss)
    if not isinstance(loss, str) or (loss not in LOSSES and custom is None):
        raise ValueError(f"unknown loss {loss!r}; choose one of {list(LOSSES)} or a registered loss "
                         f"(dkl_lib.losses.register_loss; registered: {sorted(registered_losses())})")
    if not isinstance(gi, bool):
        raise TypeError(f"gi must be True or False, got {gi!r}")
    if gi and "gi" not in loss_settings(loss):
        raise ValueError(f"gi=True (class-wise global information) applies to ikl and gkl only (and to losses "
                         f"registered with uses_prior=True), not {loss!r}")
    check_module("student", student)
    _check_data(data)
    _check_callback(callback)
    if teacher is None:
        if loss != "ce":
            raise ValueError(f"loss {loss!r} needs a teacher (only 'ce' trains without one)")
    else:
        check_module("teacher", teacher)
    if class_prior is not None and not isinstance(class_prior, ClassPrior):
        raise TypeError(f"class_prior must be a dkl_lib.prior.ClassPrior, got {type(class_prior).__name__}")
    hparams = _loss_hparams(loss, temperature=temperature, alpha=alpha, beta=beta, gamma=gamma,
                            weight_temperature=weight_temperature)
    cfg = _common_config(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         milestones=milestones, lr_decay=lr_decay, nesterov=nesterov,
                         batch_size=batch_size, drop_last=drop_last, seed=seed)
    ce_weight = _number("ce_weight", ce_weight, low=0.0)
    kd_weight = _number("kd_weight", kd_weight, low=0.0)
    warmup_epochs = _nonneg_int("warmup_epochs", warmup_epochs)
    config = {"task": "distill", "loss": loss, "gi": gi, **hparams, "ce_weight": ce_weight,
              "kd_weight": kd_weight, "warmup_epochs": warmup_epochs, **cfg}
    if custom is not None:  # a checkpoint of another version of the function is not resumed
        config["loss_source_sha256"] = custom.source_sha256
    result = _fit(student, data, teacher=None if loss == "ce" else teacher, loss=loss, gi=gi,
                  hparams=hparams, ce_weight=ce_weight, kd_weight=kd_weight, warmup_epochs=warmup_epochs,
                  device=device, amp=amp, channels_last=channels_last, progress=progress,
                  callback=callback, class_prior=class_prior, desc=desc or loss + (" (GI)" if gi else ""),
                  config=config, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                  keep_checkpoints=keep_checkpoints, **cfg)
    if loss == "ce" and teacher is not None:  # report the teacher's accuracy beside the baseline
        dev = torch.device(result.config["device"])  # where the student ran; a float64 teacher: the CPU on MPS
        dev = dev if supports_float64(dev) or _model_dtype(teacher) != torch.float64 else torch.device("cpu")
        result.teacher_acc = evaluate(teacher.to(dev), data.to(dev, _model_dtype(teacher)))
    return result


# =========================================================================== adversarial training
#: Outer losses accepted by :func:`adversarial_train`: "ce" = natural training (no attack, the
#: non-robust baseline), "trades" = CE + β·KL(f(x) ‖ f(x′)), "ikl" = IKL-AT.
ADV_LOSSES = ("ce", "trades", "ikl")
#: Defaults of the outer losses. TRADES: β = 6 (Zhang et al., 2019). IKL-AT: the official CIFAR
#: script (jiequancui/DKL, Adv-training-dkl, ``--alpha 4 --beta 20 --T 4``: soft-CE weight 4, wMSE
#: weight 20, soft-CE at temperature 1, class prior from softmax(natural / 4)) in our convention
#: (:func:`dkl_lib.losses.ikl_loss`): alpha = 20 (wMSE), beta = 4 (soft-CE), temperature = 1, weight_temperature = 4.
ADV_DEFAULTS = {"trades": {"beta": 6.0},
                "ikl": {"alpha": 20.0, "beta": 4.0, "temperature": 1.0, "weight_temperature": 4.0, "gi": True}}
__all__ += ["ADV_LOSSES", "ADV_DEFAULTS", "adversarial_loss_terms", "epsilon_at", "adversarial_train"]


class AdversarialWeightPerturbation:
    """Adversarial weight perturbation (AWP; Wu, Xia & Wang, NeurIPS 2020) for one model.

    Before each outer step the perturbation is computed on a proxy copy of the model (train mode,
    so the model's own BatchNorm statistics are untouched): for every weight tensor (parameters
    with more than one dimension: conv and linear weights, not biases or BatchNorm)

        v_l = gamma · ‖w_l‖ · g_l / ‖g_l‖,   g = ∇_w (outer loss) at the current weights,

    i.e. the ascent direction of the loss, rescaled per layer to ``gamma`` × the weight's norm (the
    official code takes one SGD step on the negated loss with a proxy optimizer and normalises the
    weight difference, which is the same direction). The trainer adds v, computes the outer loss
    and its gradient at w + v, steps the optimizer and subtracts v again, so training minimises the
    loss at the worst nearby weights. Under torchrun g is averaged over the ranks, so every rank
    applies the same perturbation.

    Args:
        model: the (unwrapped) model being trained. gamma: the relative size (official
            TRADES-AWP and IKL-AT: 0.005).
    """

    EPS = 1e-20

    def __init__(self, model: nn.Module, *, gamma: float):
        import copy

        self.model = model
        self.gamma = _number("awp_gamma", gamma, low=0.0)
        self.proxy = copy.deepcopy(model)

    def perturbation(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> Dict[str, torch.Tensor]:
        """v (parameter name → tensor) for the loss ``loss_fn(module)`` at the model's weights."""
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        names = [name for name, w in self.proxy.named_parameters() if w.dim() > 1]
        params = dict(self.proxy.named_parameters())
        grads = torch.autograd.grad(loss_fn(self.proxy), [params[n] for n in names], allow_unused=True)
        world = dist.dist_info().world_size
        diff = {}
        with torch.no_grad():
            weights = dict(self.model.named_parameters())
            for name, g in zip(names, grads):
                if g is None:
                    continue
                if world > 1:
                    torch.distributed.all_reduce(g, op=torch.distributed.ReduceOp.SUM)
                    g = g / world
                w = weights[name]
                diff[name] = (self.gamma * w.norm() / (g.norm() + self.EPS)) * g
        return diff

    @torch.no_grad()
    def apply(self, diff: Dict[str, torch.Tensor], sign: float = 1.0) -> None:
        """Add ``sign`` × v to the model's weights (+1 to perturb, −1 to restore)."""
        for name, w in self.model.named_parameters():
            if name in diff:
                w.add_(diff[name], alpha=sign)


class WeightAverage:
    """An exponential moving average of a model's weights (and float buffers), for evaluation.

    ``update(model, epoch)`` after every optimizer step (``every="step"``) or once at the end of
    every epoch (``every="epoch"``; the caller decides, :func:`adversarial_train` does both): a ← w
    up to the end of epoch ``start`` (1-based), then a ← τ·a + (1 − τ)·w at each later update.
    Per step it is the in-loop average of the official IKL-AT training script (τ = 0.9996,
    start = 150 of 200 epochs), which that script computes but never saves; per epoch with
    τ = 0.9, start = 1 it is what the official shell scripts evaluate (``swa.py DIR 0.9 1 200``
    over the 200 saved epoch weights). BatchNorm running statistics are averaged the same way;
    integer buffers are copied.

    Args:
        model: the model being trained (deep-copied; the average is ``self.module``, eval mode).
        decay: τ in [0, 1). start: the 1-based epoch after which averaging begins (>= 1).
        every: "step" or "epoch": how often the caller folds the weights in (recorded here).
    """

    def __init__(self, model: nn.Module, *, decay: float, start: int = 1, every: str = "step"):
        import copy

        self.decay = _number("weight_average", decay, low=0.0, high=1.0, high_open=True)
        self.start = _positive_int("weight_average_from", start)
        self.every = _weight_average_every(every)
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, epoch: int) -> None:
        """Fold ``model``'s current weights into the average (``epoch``: the running 1-based epoch)."""
        tau = self.decay if epoch > self.start else 0.0
        for avg, cur in zip(self.module.state_dict().values(), model.state_dict().values()):
            if avg.is_floating_point():
                avg.mul_(tau).add_(cur.detach(), alpha=1.0 - tau)
            else:
                avg.copy_(cur)


def _weight_average_every(value) -> str:
    if value not in ("step", "epoch"):
        raise ValueError(f"weight_average_every must be 'step' or 'epoch', got {value!r}")
    return value


__all__ += ["AdversarialWeightPerturbation", "WeightAverage"]


def adversarial_loss_terms(loss: str, logits: Optional[torch.Tensor], target_logits: torch.Tensor,
                           targets: torch.Tensor, *, beta: Optional[float] = None, alpha: Optional[float] = None,
                           temperature: float = 1.0, weight_temperature: Optional[float] = None,
                           class_prior: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The named terms of an adversarial-training outer loss; the loss is their sum.

    Args:
        loss: "ce", "trades" or "ikl" (:data:`ADV_LOSSES`).
        logits: f(x′), the adversarial logits (B, C) (unused for "ce", may be None).
        target_logits: f(x), the natural logits (B, C). They keep their gradient: in adversarial
            training both sides belong to the model being trained.
        targets: (B,) int64 labels.
        beta: TRADES: the weight of KL (default 6). IKL: the soft-CE weight (default 4).
        alpha: IKL: the wMSE weight (default 20). temperature: IKL's T (default 1).
        weight_temperature: IKL's T_w for sample-wise weights when no ``class_prior`` is given
            (default: ``temperature``; :func:`adversarial_train` passes :data:`ADV_DEFAULTS`' 4).
        class_prior: IKL's (C, C) class-wise prior (GI; :class:`~dkl_lib.prior.ClassPrior`).

    Returns:
        {"ce": CE(f(x), y)} plus, for "trades", {"kl": β · KL(f(x) ‖ f(x′))} (``kl_loss(f(x′), f(x))``,
        T = 1), and for "ikl", the ``wmse`` and ``soft_ce`` terms of
        ``ikl_loss(f(x′), f(x), targets=y, class_prior=...)`` (α and β inside them).

    Notebook: 04_adversarial_training.
    """
    if not isinstance(loss, str) or loss not in ADV_LOSSES:
        raise ValueError(f"unknown adversarial loss {loss!r}; choose one of {list(ADV_LOSSES)}")
    natural = target_logits.float() if target_logits.dtype in (torch.float16, torch.bfloat16) else target_logits
    terms = {"ce": F.cross_entropy(natural, targets)}
    if loss == "ce":
        return terms
    if logits is None:
        raise ValueError(f"loss {loss!r} needs the adversarial logits")
    if loss == "trades":
        b = ADV_DEFAULTS["trades"]["beta"] if beta is None else _number("beta", beta, low=0.0)
        terms["kl"] = b * loss_terms("kl", logits, target_logits, temperature=1.0)["kl"]
        return terms
    d = ADV_DEFAULTS["ikl"]
    hp = {"temperature": _number("temperature", temperature, low=0.0, low_open=True),
          "alpha": d["alpha"] if alpha is None else _number("alpha", alpha, low=0.0),
          "beta": d["beta"] if beta is None else _number("beta", beta, low=0.0)}
    hp["weight_temperature"] = (hp["temperature"] if weight_temperature is None else
                                _number("weight_temperature", weight_temperature, low=0.0, low_open=True))
    extra = {"class_prior": class_prior} if class_prior is not None else {}
    terms.update(loss_terms("ikl", logits, target_logits, targets=targets, **hp, **extra))
    return terms


def epsilon_at(epoch: int, *, epsilon: float, epochs: int, schedule: str = "constant") -> float:
    """The training ε of a 1-based ``epoch``: ε ("constant"), or ε · epoch / epochs ("increasing",
    the schedule of the official IKL-AT code, which follows LBGAT / improved TRADES)."""
    epsilon = _number("epsilon", epsilon, low=0.0)
    if schedule == "constant":
        return epsilon
    if schedule == "increasing":
        epochs = _positive_int("epochs", epochs)
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or not 1 <= epoch <= epochs:
            raise ValueError(f"epoch must be an integer in [1, epochs = {epochs}] (1-based), got {epoch!r}")
        return epsilon * epoch / epochs
    raise ValueError(f"unknown epsilon schedule {schedule!r}; choose 'constant' or 'increasing'")


def _lr_scheduler(optimizer, *, schedule: str, epochs: int, milestones: List[int], lr_decay: float):
    if schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=lr_decay)
    if schedule == "cosine":  # the official IKL-AT code: lr · ½(1 + cos(π e / (E + 1))), e = 1..E
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e0: 0.5 * (1.0 + math.cos(math.pi * (e0 + 1) / (epochs + 1))))
    raise ValueError(f"unknown lr_schedule {schedule!r}; choose 'multistep' or 'cosine'")


def adversarial_train(model: nn.Module, data: TensorData, *, loss: str = "trades", epsilon: float,
                      epsilon_schedule: str = "constant", attack_steps: int = 10,
                      attack_step_fraction: float = 0.25, beta: Optional[float] = None,
                      alpha: Optional[float] = None, temperature: Optional[float] = None,
                      weight_temperature: Optional[float] = None, gi: Optional[bool] = None,
                      epochs: int, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                      milestones: Optional[Sequence[int]] = None, lr_decay: float = 0.1,
                      lr_schedule: str = "multistep", nesterov: bool = False, batch_size: int = 128,
                      drop_last: bool = False, seed: int = 0, eval_epsilon: Optional[float] = None,
                      eval_steps: int = 10, eval_samples: Optional[int] = 500, device=None,
                      amp: Optional[bool] = None, channels_last: Optional[bool] = None,
                      class_prior: Optional[ClassPrior] = None, progress: bool = True,
                      callback: Optional[Callback] = None, desc: Optional[str] = None, checkpoint_dir=None,
                      checkpoint_every: int = 1, keep_checkpoints: int = 2, awp_gamma: float = 0.0,
                      awp_warmup: int = 0, weight_average: Optional[float] = None,
                      weight_average_from: int = 1, weight_average_every: str = "step") -> TrainResult:
    """Adversarial training (L∞) with the TRADES or IKL-AT outer loss.

    Per batch (x, y), images in [0, 1]:

    1. inner maximisation, model in eval mode (:func:`dkl_lib.attacks.trades_perturb`): x′ = PGD on
       KL(f(x) ‖ f(x′)) from x + 0.001·N(0, 1), ``attack_steps`` steps of size
       ``attack_step_fraction`` · ε_e inside the ε_e-ball ∩ [0, 1] (ε_e from :func:`epsilon_at`);
    2. outer minimisation, model in train mode, natural and adversarial logits from two forward
       passes: loss = Σ :func:`adversarial_loss_terms` (``trades``: CE(f(x), y) + β·KL(f(x) ‖ f(x′));
       ``ikl``: CE(f(x), y) + ikl_loss(f(x′), f(x), GI prior from the natural logits); ``ce``:
       natural training, no attack).

    For ``ikl`` with GI (default) a :class:`~dkl_lib.prior.ClassPrior` collects softmax(f(x) / T_w)
    of the natural logits per class during each epoch and is used from the next one (uniform in
    the first), as in the official code.

    Args:
        model: maps images in [0, 1] to logits, i.e. with the normalisation inside
            (:class:`dkl_lib.attacks.Normalized`); trained in place.
        data: a :class:`~dkl_lib.data.TensorData` (raw [0, 1] images; NOT normalised here);
            augmented per batch when ``data.augment`` is set.
        loss: "trades", "ikl" or "ce". epsilon: the L∞ radius ε of training (and, by default, of the
            per-epoch robust accuracy). epsilon_schedule: "constant" or "increasing" (ε·e/E).
        attack_steps, attack_step_fraction: the inner PGD (TRADES: 10 steps of 0.007 at ε = 0.031;
            the IKL-AT code: 5 steps of ε/2).
        beta, alpha, temperature, weight_temperature, gi: the outer loss's hyper-parameters
            (defaults :data:`ADV_DEFAULTS`); TRADES takes only beta.
        epochs, lr, momentum, weight_decay, milestones, lr_decay, nesterov, batch_size, drop_last:
            SGD with momentum; ``lr_schedule`` "multistep" (× lr_decay at each milestone) or
            "cosine" (the official IKL-AT schedule).
        seed: fixes the batch order, the augmentation and the attack's random start.
        eval_epsilon, eval_steps, eval_samples: after each epoch, the robust accuracy under PGD-
            ``eval_steps`` (one random start) at ``eval_epsilon`` (default ε) on the first
            ``eval_samples`` test images (None = all; 0 = skip), as ``test_robust_acc``.
        awp_gamma, awp_warmup: adversarial weight perturbation
            (:class:`AdversarialWeightPerturbation`) of relative size ``awp_gamma`` (0 = off) against
            this run's own outer loss, in every epoch >= ``awp_warmup`` (1-based, as the official
            ``--awp-warmup``; official IKL-AT: 0.005 from epoch 10).
        weight_average, weight_average_from: τ of an exponential weight average
            (:class:`WeightAverage`, None = off) that starts after epoch ``weight_average_from``; the
            per-epoch test accuracies are then those of the averaged weights (``test_acc_raw``:
            the trained weights), and the returned model holds the averaged weights.
        weight_average_every: "step" (the official script's in-loop average, default) or "epoch"
            (once at the end of each epoch, as the official ``swa.py`` over the saved epochs).
        device, amp, channels_last, progress, callback, class_prior, desc, checkpoint_dir,
            checkpoint_every, keep_checkpoints: as in :func:`distill` (resume from the newest
            checkpoint; the attack's random-start generator is part of it).

    Under torchrun the model is DDP-wrapped as in :func:`distill`: each rank attacks and trains
    on its share of every global batch (the attack starts drawn for the global batch, the inner
    maximisation run on the unwrapped model, which leaves parameter gradients alone), and every
    rank computes the per-epoch clean and robust test accuracy of the same weights.

    Returns:
        :class:`TrainResult`; each history row has epoch, lr, epsilon, loss, ce, the loss terms
        (``kl``; ``wmse``, ``soft_ce``), train_acc (natural) and train_adv_acc (on x′) in train
        mode, test_acc (clean), test_robust_acc and seconds.

    Notebook: 04_adversarial_training (through :func:`dkl_lib.experiments.run_adv_grid`).
    """
    if not isinstance(loss, str) or loss not in ADV_LOSSES:
        raise ValueError(f"unknown adversarial loss {loss!r}; choose one of {list(ADV_LOSSES)}")
    check_module("model", model)
    _check_data(data)
    _check_callback(callback)
    if data.lazy:
        raise ValueError(f"adversarial training needs an in-memory data set (TensorData); {data.name!r} is "
                         "decoded per batch (FolderData), which the attacks and evaluation do not take")
    cfg = _common_config(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         milestones=milestones, lr_decay=lr_decay, nesterov=nesterov,
                         batch_size=batch_size, drop_last=drop_last, seed=seed)
    epsilon = _number("epsilon", epsilon, low=0.0)
    epsilon_at(1, epsilon=epsilon, epochs=cfg["epochs"], schedule=epsilon_schedule)  # validates
    attack_steps = _nonneg_int("attack_steps", attack_steps)
    attack_step_fraction = _number("attack_step_fraction", attack_step_fraction, low=0.0)
    eval_epsilon = epsilon if eval_epsilon is None else _number("eval_epsilon", eval_epsilon, low=0.0)
    eval_steps = _nonneg_int("eval_steps", eval_steps)
    if eval_samples is not None:
        eval_samples = _nonneg_int("eval_samples", eval_samples)
    if lr_schedule not in ("multistep", "cosine"):
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose 'multistep' or 'cosine'")
    hp: Dict[str, object] = {}
    if loss == "trades":
        hp = {"beta": ADV_DEFAULTS["trades"]["beta"] if beta is None else _number("beta", beta, low=0.0)}
    elif loss == "ikl":
        d = ADV_DEFAULTS["ikl"]
        hp = {"alpha": d["alpha"] if alpha is None else _number("alpha", alpha, low=0.0),
              "beta": d["beta"] if beta is None else _number("beta", beta, low=0.0),
              "temperature": d["temperature"] if temperature is None else
              _number("temperature", temperature, low=0.0, low_open=True),
              "weight_temperature": d["weight_temperature"] if weight_temperature is None else
              _number("weight_temperature", weight_temperature, low=0.0, low_open=True),
              "gi": d["gi"] if gi is None else gi}
        if not isinstance(hp["gi"], bool):
            raise TypeError(f"gi must be True or False, got {hp['gi']!r}")
    if class_prior is not None and not isinstance(class_prior, ClassPrior):
        raise TypeError(f"class_prior must be a dkl_lib.prior.ClassPrior, got {type(class_prior).__name__}")
    config = {"task": "adversarial", "loss": loss, **hp, "epsilon": epsilon, "epsilon_schedule": epsilon_schedule,
              "attack_steps": attack_steps, "attack_step_fraction": attack_step_fraction,
              "lr_schedule": lr_schedule, "eval_epsilon": eval_epsilon, "eval_steps": eval_steps,
              "eval_samples": eval_samples, **cfg}
    awp_gamma = _number("awp_gamma", awp_gamma, low=0.0)
    if awp_gamma > 0:  # recorded only when on, so older configs keep their meaning
        if loss == "ce":
            raise ValueError("awp_gamma > 0 needs an adversarial loss ('trades' or 'ikl'), not natural training")
        config.update(awp_gamma=awp_gamma, awp_warmup=_nonneg_int("awp_warmup", awp_warmup))
    weight_average_every = _weight_average_every(weight_average_every)
    if weight_average is not None:
        config.update(weight_average=_number("weight_average", weight_average, low=0.0, high=1.0, high_open=True),
                      weight_average_from=_positive_int("weight_average_from", weight_average_from))
        if weight_average_every != "step":  # recorded only when not the default: older configs keep their keys
            config["weight_average_every"] = weight_average_every

    start = time.perf_counter()
    par, device, amp, channels_last, _, _, data, config, checkpoints = _start_run(
        model, data, device=device, amp=amp, channels_last=channels_last, config=config,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints)
    _check_fits("model", model, data, normalize=False, amp=amp, channels_last=channels_last)
    gi_on = loss == "ikl" and bool(hp.get("gi"))
    prior = None
    if gi_on:
        prior = class_prior if class_prior is not None else ClassPrior(data.num_classes, device=device)
        if prior.num_classes != data.num_classes:
            raise ValueError(f"class_prior has {prior.num_classes} classes, the data {data.num_classes}")
        prior.to(device)
    loss_kw = {k: v for k, v in hp.items() if k != "gi"}
    epochs = cfg["epochs"]
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"])
    scheduler = _lr_scheduler(optimizer, schedule=lr_schedule, epochs=epochs, milestones=cfg["milestones"],
                              lr_decay=cfg["lr_decay"])
    shuffle_gen = torch.Generator().manual_seed(cfg["seed"])
    augment_gen = torch.Generator().manual_seed(cfg["seed"] + 1_000_003)
    attack_gen = torch.Generator().manual_seed(cfg["seed"] + 2_000_003)
    generators = {"shuffle": shuffle_gen, "augment": augment_gen, "attack": attack_gen}
    n_eval = data.n_test if eval_samples is None else min(eval_samples, data.n_test)
    x_eval, y_eval = data.x_test[:n_eval], data.y_test[:n_eval]
    bs = cfg["batch_size"]
    steps_per_epoch = max(1, (data.n_train // bs) if cfg["drop_last"] else math.ceil(data.n_train / bs))
    batchnorm = _has_batchnorm(model)

    awp = AdversarialWeightPerturbation(model, gamma=awp_gamma) if awp_gamma > 0 else None
    averaged = None
    if weight_average is not None:
        averaged = WeightAverage(model, decay=config["weight_average"], start=config["weight_average_from"],
                                 every=weight_average_every)
    extra = {"weight_average": averaged.module} if averaged is not None else None
    eval_model = averaged.module if averaged is not None else model

    first_epoch, history = checkpoints.resume(model, optimizer, scheduler, generators, prior, extra)
    # two forwards (natural, adversarial) per backward: no buffer copy between them; rank 0's
    # BatchNorm statistics go to every rank after each step instead (DDP's default outcome)
    net = par.wrap(model, device, forward_buffer_sync=False)
    dist.broadcast_buffers(model)  # torch < 2.13 skips the buffers at wrap time, too (no-op in one process)
    stopped = None
    bars = _RunProgress(epochs=epochs, steps_per_epoch=steps_per_epoch, desc=desc or loss,
                        progress=progress and par.is_main, device=device, batch_bar_from=50, initial=first_epoch)
    try:
        for epoch in range(first_epoch + 1, epochs + 1):
            t0 = time.perf_counter()
            eps_now = epsilon_at(epoch, epsilon=epsilon, epochs=epochs, schedule=epsilon_schedule)
            lr_now = optimizer.param_groups[0]["lr"]
            sums: Dict[str, torch.Tensor] = {}
            correct = torch.zeros((), device=device, dtype=torch.int64)
            correct_adv = torch.zeros((), device=device, dtype=torch.int64)
            seen = 0
            bars.start_epoch()
            model.train()
            for idx in par.batches(data.n_train, batch_size=bs, generator=shuffle_gen,
                                   drop_last=cfg["drop_last"], device=device, batchnorm=batchnorm):
                _, x, y, global_n = _batch(data, idx, par, data.augment, augment_gen)
                start_noise = None
                if loss != "ce":  # the draw trades_perturb would make for the global batch
                    start_noise = par.local(torch.randn((global_n, *x.shape[1:]), generator=attack_gen,
                                                        dtype=torch.float32))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                x_adv = None
                if loss != "ce":
                    with _diverging(epoch, lr_now):
                        x_adv = trades_perturb(model, x, epsilon=eps_now, steps=attack_steps,
                                               step_size=attack_step_fraction * eps_now, start_noise=start_noise,
                                               amp=amp)
                prior_kw = {"class_prior": prior.prior} if prior is not None else {}
                v = None
                if awp is not None and epoch >= config["awp_warmup"]:
                    def proxy_loss(m, x=x, x_adv=x_adv, y=y, global_n=global_n):
                        with _autocast(device, amp):
                            nat, adv = m(x), m(x_adv)
                        t = adversarial_loss_terms(loss, adv, nat, y, **loss_kw, **prior_kw)
                        return par.scaled(sum(t.values()), y.shape[0], global_n)
                    with _diverging(epoch, lr_now):
                        v = awp.perturbation(proxy_loss)
                    awp.apply(v, +1.0)
                try:  # the step at w + v; v is taken off again whatever happens (Ctrl-C, divergence)
                    model.train()
                    with _autocast(device, amp):
                        nat_logits = net(x)
                        adv_logits = net(x_adv) if x_adv is not None else None
                    with _diverging(epoch, lr_now):
                        terms = adversarial_loss_terms(loss, adv_logits, nat_logits, y, **loss_kw, **prior_kw)
                    total = sum(terms.values())
                    if prior is not None:  # before the backward, as in distill; ikl has checked these inputs
                        prior._update_checked(nat_logits.detach(), y, weight_temperature=loss_kw["weight_temperature"])
                    optimizer.zero_grad(set_to_none=True)
                    par.scaled(total, y.shape[0], global_n).backward()
                    optimizer.step()
                finally:
                    if v is not None:
                        awp.apply(v, -1.0)
                dist.broadcast_buffers(model)  # rank 0's BatchNorm statistics to every rank
                if averaged is not None and averaged.every == "step":
                    averaged.update(model, epoch)
                n = y.shape[0]
                seen += n
                for name, value in (("loss", total), *terms.items()):
                    v = value.detach().to(wide_dtype(device)) * n  # float32 on MPS (no float64)
                    sums[name] = sums[name] + v if name in sums else v
                correct += (nat_logits.detach().argmax(dim=1) == y).sum()
                if adv_logits is not None:
                    correct_adv += (adv_logits.detach().argmax(dim=1) == y).sum()
                bars.step()
            if averaged is not None and averaged.every == "epoch":
                averaged.update(model, epoch)
            totals = par.epoch_totals(sums, correct=correct, correct_adv=correct_adv, seen=seen)
            seen, correct, correct_adv = totals.pop("seen"), totals.pop("correct"), totals.pop("correct_adv")
            if not math.isfinite(totals["loss"]):
                raise FloatingPointError(f"the training loss became non-finite in epoch {epoch}; "
                                         "lower the learning rate or check the data")
            scheduler.step()
            if prior is not None:
                prior.end_epoch()
            row = {"epoch": epoch, "lr": lr_now, "epsilon": eps_now}
            row.update({k: v / seen for k, v in totals.items()})
            row["train_acc"] = 100.0 * correct / seen
            row["train_adv_acc"] = 100.0 * correct_adv / seen if loss != "ce" else math.nan
            row["test_acc"] = _clean_accuracy(eval_model, data.x_test, data.y_test)
            if averaged is not None:
                row["test_acc_raw"] = _clean_accuracy(model, data.x_test, data.y_test)
            if n_eval > 0 and eval_steps > 0 and eval_epsilon > 0:
                res = pgd(eval_model, x_eval, y_eval, epsilon=eval_epsilon, steps=eval_steps, restarts=1,
                          seed=cfg["seed"])
                clean_ok = _clean_correct(eval_model, x_eval, y_eval)
                row["test_robust_acc"] = _mean_percent(clean_ok & res.correct)
            else:
                row["test_robust_acc"] = math.nan
            row["seconds"] = time.perf_counter() - t0
            stop = par.any(bars.end_epoch(history, row, callback,  # (the loss: in the history; 80 columns hold these)
                                          f"clean {row['test_acc']:.1f}%, robust {row['test_robust_acc']:.1f}%"))
            checkpoints.save(epoch, model, optimizer, scheduler, generators, prior, history, force=stop,
                             extra=extra)
            if stop:
                stopped = "callback"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        bars.close()
        net = None  # drop the DDP wrapper now, then collect it (see _Parallel.collect)
        par.collect()
    if averaged is not None and history:  # hand back the weights that were evaluated
        model.load_state_dict(averaged.module.state_dict())
    return TrainResult(model=model, history=history, config=config,
                       priors=list(prior.history) if prior is not None and prior.keep_history else None,
                       stopped=stopped, seconds=time.perf_counter() - start, resumed_from=first_epoch or None)


def _clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return clean_correct(model, x.to(_model_dtype(model)), y)


def _clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return _mean_percent(_clean_correct(model, x, y))
