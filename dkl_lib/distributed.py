"""What a training loop needs to run under ``torchrun`` / DistributedDataParallel (DDP).

Everything here also works in a plain single process (torch.distributed not initialised): the
process is rank 0 of 1, reductions return their input, and rank-0-only code simply runs. So a loop
written with these helpers is the same code with and without ``torchrun``::

    from dkl_lib import distributed as dist

    info = dist.init_from_env()                 # joins the group under torchrun, else a no-op
    device = dist.device_for_rank()             # cuda:LOCAL_RANK, or the CPU
    model = dist.wrap_model(model.to(device))   # DDP when world_size > 1
    gen = torch.Generator().manual_seed(seed)   # the SAME seed on every rank: one global order
    for idx, global_n in dist.shard_batches(n, batch_size=B, rank=info.rank,
                                            world_size=info.world_size, shuffle=True, generator=gen):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss = loss * dist.local_loss_scale(len(idx), global_n, info.world_size)
        ...                                     # backward: DDP averages the gradients over ranks
    totals = dist.all_reduce_sum({"loss": loss_sum, "correct": correct, "seen": seen})
    dist.save_checkpoint(dist.checkpoint_path(run_dir, epoch), state)   # written by rank 0 only
    ...
    ckpt = dist.load_latest_checkpoint(run_dir)  # resume: (path, state) of the newest readable one

**Same global batches.** :func:`shard_batches` draws the epoch order exactly as
:func:`dkl_lib.data.batch_indices` does for one process (same generator, same seed) and gives each
rank a strided share of every global batch, so a run on W processes with per-rank batch B/W sees
exactly the global batches of a one-process run with batch B. With :func:`local_loss_scale` the
DDP-averaged gradient is then the gradient of the global batch mean, also for a short last batch.
(Layers that mix samples, such as BatchNorm, see only the rank's share unless converted with
``wrap_model(..., sync_batchnorm=True)``.)

**Class prior.** :class:`dkl_lib.prior.ClassPrior` all-reduces its sums itself in ``end_epoch``
when a process group is initialised: feed each rank's share with ``update`` and every rank ends
the epoch with the prior of the whole global batch order.

**Checkpoints.** :func:`save_checkpoint` writes on rank 0 only, atomically (temporary file in the
same folder, fsync, ``os.replace``), so a crash leaves the previous checkpoint intact;
:func:`load_latest_checkpoint` returns the newest checkpoint that loads, skipping (with a warning)
a corrupt one. A resumable state holds at least: the unwrapped model's and the optimizer's and
scheduler's ``state_dict()``, the epoch, the shuffle/augmentation generators' ``get_state()``,
``ClassPrior.state_dict()`` and the history so far.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import gc
import hashlib
import numbers
import os
import re
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as tdist

__all__ = [
    "DistInfo",
    "Checkpoint",
    "dist_info",
    "is_main",
    "is_distributed",
    "launched_by_torchrun",
    "init_from_env",
    "cleanup",
    "barrier",
    "device_for_rank",
    "shard_indices",
    "shard_batches",
    "local_loss_scale",
    "all_reduce_sum",
    "all_reduce_mean",
    "broadcast_object",
    "main_process_only",
    "wrap_model",
    "unwrap_model",
    "broadcast_buffers",
    "checkpoint_path",
    "list_checkpoints",
    "save_checkpoint",
    "write_atomic",
    "FileInUseError",
    "STALE_TMP_SECONDS",
    "load_latest_checkpoint",
    "state_digest",
    "CHECKSUM_KEY",
    "prune_checkpoints",
]

Number = Union[int, float]


class DistInfo(NamedTuple):
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its
    machine (the GPU it should use), and ``is_main`` (rank 0: the one that logs and saves)."""

    rank: int
    world_size: int
    local_rank: int
    is_main: bool


class Checkpoint(NamedTuple):
    """What :func:`load_latest_checkpoint` returns: the file and the loaded state."""

    path: Path
    state: dict


# ---------------------------------------------------------------------------------------- process
def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised in this process."""
    return tdist.is_available() and tdist.is_initialized()


def dist_info() -> DistInfo:
    """Rank, world size, local rank and is_main of this process; (0, 1, 0, True) when no process
    group is initialised. The local rank comes from ``LOCAL_RANK`` (set by torchrun)."""
    if not is_distributed():
        return DistInfo(0, 1, 0, True)
    rank, world = tdist.get_rank(), tdist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    return DistInfo(rank, world, local, rank == 0)


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that writes logs and checkpoints."""
    return dist_info().is_main


def launched_by_torchrun(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when the environment says this process is one of a launched group (RANK and
    WORLD_SIZE set, as torchrun does). ``environ``: the mapping to read (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env


def _env_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def init_from_env(backend: Optional[str] = None, *, timeout: Optional[float] = None) -> DistInfo:
    """Join the process group when launched by torchrun; a no-op otherwise. Returns :func:`dist_info`.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (``init_method="env://"``).
    ``backend``: default "nccl" when CUDA is available (then ``torch.cuda.set_device(LOCAL_RANK)``
    first), else "gloo". Calling it again, or in a process that was not launched by torchrun (no
    RANK/WORLD_SIZE), changes nothing. ``timeout``: seconds for collectives (torch's default when
    None).

    Raises:
        ValueError: RANK/WORLD_SIZE set but inconsistent, or MASTER_ADDR/MASTER_PORT missing (the
            message says to launch with torchrun).
    """
    if is_distributed() or not tdist.is_available():
        return dist_info()
    env = os.environ
    if not launched_by_torchrun(env):
        return dist_info()
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    local = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent (need 0 <= RANK < WORLD_SIZE)")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ValueError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not; launch with "
                         f"`torchrun --nproc_per_node=N ...`, which sets all of them")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and tdist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    kwargs = {}
    if timeout is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=float(timeout))
    tdist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    return dist_info()


def cleanup() -> None:
    """Leave the process group (``destroy_process_group``) if one is initialised.

    Unreachable objects are collected first: a DDP wrapper lives in reference cycles and its
    reducer holds the process group, and a group whose last reference goes only at interpreter
    shutdown can abort the process there (gloo's worker threads cannot be joined any more)."""
    if is_distributed():
        gc.collect()
        tdist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if not is_distributed():
        return
    if tdist.get_backend() == "nccl":
        tdist.barrier(device_ids=[dist_info().local_rank])
    else:
        tdist.barrier()


def device_for_rank(device=None) -> torch.device:
    """``device`` when given; else ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", dist_info().local_rank)
    return torch.device("cpu")


def _collective_device() -> torch.device:
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------- sharding
def _check_rank(rank: int, world_size: int) -> None:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def shard_indices(indices, rank: int, world_size: int, *, drop_last: bool = False, pad: bool = True):
    """This rank's share of ``indices``, as ``torch.utils.data.DistributedSampler`` makes it.

    The list is first made divisible by ``world_size``: ``drop_last`` cuts the tail; otherwise
    ``pad`` repeats indices from the start (every rank gets the same number, some samples twice);
    with neither, the shares differ in length by at most one. Rank r then takes every
    ``world_size``-th entry starting at r (a strided split, so consecutive ranks share each run
    of ``world_size`` consecutive entries).

    Args:
        indices: a 1-D tensor or a sequence of ints (e.g. one epoch's shuffled order).
        rank, world_size: this process and the group size (:func:`dist_info`).

    Returns:
        The same kind as ``indices`` (a tensor stays a tensor on its device, else a list).
    """
    _check_rank(rank, world_size)
    is_tensor = isinstance(indices, torch.Tensor)
    if is_tensor and indices.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
    seq = indices if is_tensor else list(indices)
    n = len(seq)
    if drop_last and n % world_size:
        seq = seq[: (n // world_size) * world_size]
    elif pad and n % world_size and n > 0:
        extra = world_size - n % world_size
        reps = -(-extra // n)  # ceil: a tiny list may need repeating more than once
        if is_tensor:
            seq = torch.cat([seq, seq.repeat(reps)[:extra]])
        else:
            seq = seq + (seq * reps)[:extra]
    return seq[rank::world_size]


def shard_batches(n: int, *, batch_size: int, rank: int, world_size: int, shuffle: bool = False,
                  generator: Optional[torch.Generator] = None, drop_last: bool = False,
                  device=None) -> Iterator[Tuple[torch.Tensor, int]]:
    """This rank's part of every GLOBAL batch of ``range(n)``: yields ``(local_indices, global_size)``.

    The global order and batches are exactly those of :func:`dkl_lib.data.batch_indices` with the
    same arguments (``batch_size`` is the GLOBAL batch size; pass a generator with the same seed on
    every rank), and each global batch is split with :func:`shard_indices` (strided, no padding),
    so with ``batch_size`` divisible by ``world_size`` every rank gets ``batch_size / world_size``
    samples per step. A last global batch smaller than ``world_size`` is skipped on every rank
    (some rank would get no sample; DDP needs every rank in every step). Scale each rank's mean
    loss by :func:`local_loss_scale` so that DDP's gradient average is the global-batch mean.

    This is ``shard_indices(batch, rank, world_size, pad=False)`` over ``batch_indices``; a loop
    that needs the whole global batch (e.g. to draw :func:`dkl_lib.data.augment_crop_flip` for the
    global batch and keep this rank's rows, so the augmentation is that of a one-process run) can
    iterate ``batch_indices`` and call :func:`shard_indices` itself.
    """
    from .data import batch_indices

    _check_rank(rank, world_size)
    if isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool) and 0 < batch_size < world_size:
        raise ValueError(f"batch_size={batch_size} is smaller than world_size={world_size}: every global batch "
                         "would leave some rank without a sample, and all would be skipped")
    for batch in batch_indices(n, batch_size=batch_size, shuffle=shuffle, generator=generator,
                               drop_last=drop_last, device=device):
        size = batch.numel()
        if size < world_size:
            continue
        yield shard_indices(batch, rank, world_size, pad=False), size


def local_loss_scale(local_size: int, global_size: int, world_size: int) -> float:
    """The factor for a rank's MEAN loss over its ``local_size`` samples such that the gradient
    DDP averages over ``world_size`` ranks equals the gradient of the mean over the
    ``global_size`` samples of the global batch: ``local_size * world_size / global_size``
    (exactly 1.0 when the global batch splits evenly)."""
    if global_size <= 0 or local_size < 0 or world_size < 1:
        raise ValueError(f"need global_size > 0, local_size >= 0, world_size >= 1; got "
                         f"{local_size}, {global_size}, {world_size}")
    return local_size * world_size / global_size


# -------------------------------------------------------------------------------------- reductions
def _pack(metrics: Mapping[str, object]):
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of name -> number or tensor, got {type(metrics).__name__}")
    keys = sorted(metrics)
    parts, layout = [], []
    for key in keys:
        value = metrics[key]
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().to(torch.float64).reshape(-1)  # cast on the CPU: MPS has no float64
            layout.append((key, tuple(value.shape), value.device))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            t = torch.tensor([float(value)], dtype=torch.float64)
            layout.append((key, None, None))
        else:
            raise TypeError(f"metric {key!r} must be a number or a tensor, got {type(value).__name__}")
        parts.append(t)
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return keys, flat, layout


def _unpack(flat: torch.Tensor, layout) -> Dict[str, object]:
    out, pos = {}, 0
    for key, shape, device in layout:
        if shape is None:
            out[key] = float(flat[pos])
            pos += 1
        else:
            size = 1
            for s in shape:
                size *= s
            out[key] = flat[pos:pos + size].reshape(shape).to(device)
            pos += size
    return out


def _check_same_keys(keys: List[str], numel: int) -> None:
    """Every rank must reduce the same names with the same sizes; compare a checksum (max and min
    over ranks agree only if every rank has the same)."""
    sig = float(zlib.crc32(("\0".join(keys) + f"|{numel}").encode()))
    probe = torch.tensor([sig, -sig], dtype=torch.float64, device=_collective_device())
    tdist.all_reduce(probe, op=tdist.ReduceOp.MAX)
    if probe[0].item() != -probe[1].item():
        raise RuntimeError(f"all_reduce: the ranks hold different metric names or sizes (this rank: {keys})")


def all_reduce_sum(metrics: Mapping[str, object]) -> Dict[str, object]:
    """The sum over all ranks of every entry of ``metrics`` (one all-reduce, in float64).

    Numbers come back as Python floats, tensors as float64 tensors of the same shape on their
    device. In a single process the values come back converted the same way, unchanged. Every
    rank must pass the same names (and tensor sizes); otherwise RuntimeError.
    """
    keys, flat, layout = _pack(metrics)
    if is_distributed() and dist_info().world_size > 1:
        _check_same_keys(keys, flat.numel())
        if flat.numel() == 0:
            return {}
        buf = flat.to(_collective_device())
        tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
        flat = buf.cpu()
    return _unpack(flat, layout)


def all_reduce_mean(metrics: Mapping[str, object], *, weight: Optional[Number] = None) -> Dict[str, object]:
    """The mean over ranks of every entry of ``metrics``.

    ``weight=None``: the plain mean over the ranks. ``weight`` = this rank's count (e.g. its
    number of samples, with ``metrics`` holding per-sample means): the weighted mean
    Σ_r w_r·v_r / Σ_r w_r, which is the mean over all samples of all ranks.
    """
    if weight is None:
        world = dist_info().world_size
        total = all_reduce_sum(metrics)
        return {k: v / world for k, v in total.items()}
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"weight must be a non-negative number, got {weight!r}")
    key = "\0weight"
    # a rank with weight 0 adds exact zeros: its per-sample means may be nan (the mean of no samples)
    scaled = {k: (v * float(weight)) if weight else (torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0.0)
              for k, v in metrics.items()}
    scaled[key] = float(weight)
    total = all_reduce_sum(scaled)
    w = total.pop(key)
    if w <= 0:
        raise ValueError("all_reduce_mean: the weights sum to 0 over the ranks")
    return {k: v / w for k, v in total.items()}


def broadcast_object(obj=None, *, src: int = 0):
    """``obj`` of rank ``src`` on every rank (any picklable object; e.g. a run folder name)."""
    if not (is_distributed() and dist_info().world_size > 1):
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def main_process_only(fn: Callable) -> Callable:
    """Decorator: run ``fn`` on rank 0 only (logs, files, progress bars); other ranks get None."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if is_main():
            return fn(*args, **kwargs)
        return None

    return wrapper


# ------------------------------------------------------------------------------------------- model
def wrap_model(model: torch.nn.Module, device=None, *, sync_batchnorm: bool = False,
               forward_buffer_sync: bool = True, **ddp_kwargs):
    """``DistributedDataParallel(model)`` when more than one process runs, else ``model`` itself.

    The model must already be on its device (:func:`device_for_rank`); DDP copies rank 0's
    parameters and buffers to every rank at construction. ``sync_batchnorm=True`` first converts
    BatchNorm layers to SyncBatchNorm (statistics over the global batch). ``ddp_kwargs`` go to
    DDP (e.g. ``find_unused_parameters=True``).

    ``forward_buffer_sync=False``: DDP does not copy rank 0's buffers (BatchNorm running
    statistics) into every rank at the start of each forward. Needed when a step runs the model
    twice before ``backward`` (TRADES: natural and adversarial inputs): the copy before the second
    forward changes, in place, buffers the first forward saved for backward, and torch 2.11's
    BatchNorm then fails the backward. Call :func:`broadcast_buffers` after each step instead,
    which gives every rank rank 0's buffers as DDP's default does.
    """
    info = dist_info()
    if info.world_size == 1:
        return model
    if sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = device_for_rank(device)
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index if device.index is not None else info.local_rank])
    if not forward_buffer_sync:
        import inspect

        ddp = torch.nn.parallel.DistributedDataParallel
        # torch >= 2.13 names it forward_sync_buffers (broadcast_buffers is deprecated there)
        name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
                else "broadcast_buffers")
        ddp_kwargs.setdefault(name, False)
    return torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics, counters) into every rank's
    ``model`` (a DDP wrapper or the module), one broadcast per dtype; a no-op in one process."""
    if not (is_distributed() and dist_info().world_size > 1):
        return
    buffers = [b for b in unwrap_model(model).buffers()]
    for dtype in sorted({b.dtype for b in buffers}, key=str):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.detach().reshape(-1) for b in group])
        tdist.broadcast(flat, src=src)
        offset = 0
        with torch.no_grad():
            for b in group:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel wrappers and ``torch.compile``'s ``OptimizedModule``, in
    any nesting; the model itself otherwise. Save ``unwrap_model(model).state_dict()`` so that
    checkpoints load without the ``module.`` or ``_orig_mod.`` prefix: into the plain model, into a
    compiled one (through this function), on one process or under torchrun."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile(model)
            model = model._orig_mod
        else:
            return model


# -------------------------------------------------------------------------------------- checkpoints
_CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")

#: The key under which :func:`save_checkpoint` stores the state's :func:`state_digest`.
CHECKSUM_KEY = "_sha256"


def state_digest(state) -> str:
    """SHA-256 of a checkpoint state's content: every tensor's dtype, shape and bytes (on the CPU),
    and the ``repr`` of every other value, walking dicts (sorted keys), lists, tuples and sets (sorted
    items: a set's order changes with the process's string hashing); the same before
    :func:`save_checkpoint` and after :func:`load_latest_checkpoint` (any ``map_location``, any process)."""
    h = hashlib.sha256()

    def feed(obj) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, Mapping):
            h.update(f"D{len(obj)}:".encode())
            for key in sorted(obj, key=repr):
                feed(key)
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{len(obj)}:".encode())
            for item in obj:
                feed(item)
        elif isinstance(obj, (set, frozenset)):
            h.update(f"S{len(obj)}:".encode())
            for item in sorted(obj, key=repr):
                feed(item)
        else:
            h.update(f"{type(obj).__name__}:{obj!r};".encode())

    feed(state)
    return h.hexdigest()


def checkpoint_path(folder, epoch: int) -> Path:
    """``folder/checkpoint-000012.pt`` for epoch 12 (zero-padded so names sort by epoch)."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    return Path(folder) / f"checkpoint-{epoch:06d}.pt"


def list_checkpoints(folder) -> List[Path]:
    """The ``checkpoint-<epoch>.pt`` files of ``folder``, oldest epoch first ([] if none/no folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def _new_file_mode() -> int:
    """0o666 minus the process umask (what open() would give), read without changing the umask
    (os.umask would race with other threads); 0o644 where /proc is not available."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


#: Retry a rename that another process blocks: on Windows ``os.replace`` fails while any program holds
#: the target (or the new file) open, e.g. a results.csv open in Excel or a virus scanner reading it.
_RETRY_REPLACE = os.name == "nt"


class FileInUseError(PermissionError):
    """On Windows: a file could not be replaced because another program keeps it open."""


def _replace_file(tmp, path, *, attempts: int = 10, wait: float = 0.05) -> None:
    """``os.replace(tmp, path)``; on Windows retried for about 2 s on ``PermissionError`` (a scanner or
    reader usually lets go at once), then a :class:`FileInUseError` naming the file and the remedy."""
    for attempt in range(attempts if _RETRY_REPLACE else 1):
        try:
            os.replace(tmp, path)
            return
        except PermissionError as err:
            if not _RETRY_REPLACE:
                raise
            last = err
            time.sleep(wait * (attempt + 1))
    raise FileInUseError(last.errno, f"cannot replace {path}: another program keeps it open (close it, "
                          "e.g. the file in a spreadsheet or editor, and run the same command again)",
                          str(path)) from last


def save_checkpoint(path, state: dict) -> Optional[Path]:
    """Write ``state`` to ``path`` with ``torch.save``, on rank 0 only, atomically.

    The data goes to a temporary file in the same folder, is flushed and fsynced, then renamed
    over ``path`` (``os.replace``), so a reader or a crash sees the old file or the new one, never
    half of one. The file also holds the SHA-256 of the state's content (key ``CHECKSUM_KEY``),
    which :func:`load_latest_checkpoint` checks, so a file damaged later (bytes overwritten in
    place: torch.load alone would load wrong numbers without an error) is refused. Other ranks
    write nothing and return None (call :func:`barrier` after it if they must read the file next).
    Returns the path on rank 0.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    if not is_main():
        return None
    state = {**state, CHECKSUM_KEY: state_digest(state)}
    return write_atomic(path, lambda fh: torch.save(state, fh))


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # EDQUOT: over a disk quota (POSIX)
#: a temporary file of :func:`write_atomic` older than this (seconds) was left by a killed writer
STALE_TMP_SECONDS = 3600.0


def write_atomic(path, write: Callable) -> Path:
    """Write a file so that a reader or a crash sees the old file or the new one, never half of one.

    ``write(fh)`` fills a temporary file in the same folder (binary mode), which is flushed,
    fsynced, given the mode ``open()`` would give (``mkstemp`` creates 0600 files, which other
    users of a shared results folder could not read), then renamed over ``path``. A writer killed
    before the rename (SIGKILL, power loss) leaves its temporary ``.<name>.*.tmp``; those older than
    :data:`STALE_TMP_SECONDS` are removed at the next write of the same file, so repeated kills do
    not fill the disk with dead copies of a model. Used by the run cache, ``--out`` results and
    checkpoints. Returns ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    fh = None
    try:
        with os.fdopen(fd, "wb") as raw:
            fh = _WriteErrors(raw)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
            with contextlib.suppress(AttributeError, OSError):  # os.fchmod does not exist on Windows
                os.fchmod(fh.fileno(), _new_file_mode())
        _replace_file(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # torch.save reports a failed write as "unexpected pos 704 vs 598": say what happened
        cause = err if isinstance(err, OSError) else getattr(fh, "error", None)
        if isinstance(err, Exception) and cause is not None and cause.errno in _DISK_FULL:
            raise OSError(cause.errno, f"no space left to write {path} ({cause.strerror}); free some space "
                          "(old entries of the run cache, old checkpoints) or write elsewhere (--out, "
                          "--cache-dir or DKL_RUNS_DIR)") from err
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (best effort)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


class _WriteErrors:
    """A binary file that remembers the OSError of a failed write (torch.save swallows it)."""

    def __init__(self, fh):
        self._fh, self.error = fh, None

    def write(self, data):
        try:
            return self._fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self._fh, name)

def _remove_stale_tmp(path: Path) -> None:
    """Delete the temporary files of earlier writes of ``path`` older than STALE_TMP_SECONDS (a
    younger one may belong to a writer still at work, e.g. another process saving the same entry)."""
    prefix, cutoff = "." + path.name + ".", time.time() - STALE_TMP_SECONDS
    with contextlib.suppress(OSError):
        for other in path.parent.iterdir():
            name = other.name
            if name.startswith(prefix) and name.endswith(".tmp") and re.fullmatch(r"\w+", name[len(prefix):-4]):
                with contextlib.suppress(OSError):
                    if other.stat().st_mtime < cutoff:
                        other.unlink()

def load_latest_checkpoint(folder, *, map_location="cpu", weights_only: bool = True) -> Optional[Checkpoint]:
    """The newest readable ``checkpoint-<epoch>.pt`` of ``folder`` as ``Checkpoint(path, state)``,
    or None when there is none (a fresh run). Every rank may call it (it only reads).

    A file that fails to load (truncated, corrupt) or whose content does not match the checksum
    :func:`save_checkpoint` stored in it (bytes damaged in place) gives a warning and the next
    older one is tried; the returned state is without the checksum. (A file without a checksum,
    written by hand or by an older version, is returned unchecked.) ``weights_only=True``
    (default) loads tensors, numbers, strings and containers only; pass False only for files you
    trust.
    """
    for path in reversed(list_checkpoints(folder)):
        try:
            state = torch.load(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:  # noqa: BLE001 - any failure: try the previous checkpoint
            warnings.warn(f"checkpoint {path} could not be loaded ({type(err).__name__}: {err}); "
                          "trying the previous one", RuntimeWarning, stacklevel=2)
            continue
        if not isinstance(state, dict):
            warnings.warn(f"checkpoint {path} does not hold a dict; trying the previous one",
                          RuntimeWarning, stacklevel=2)
            continue
        if CHECKSUM_KEY in state:
            stored = state.pop(CHECKSUM_KEY)
            if stored != state_digest(state):
                warnings.warn(f"checkpoint {path} is corrupt (its content does not match its checksum: "
                              "damaged or modified file); trying the previous one", RuntimeWarning, stacklevel=2)
                continue
        return Checkpoint(path, state)
    return None


def prune_checkpoints(folder, *, keep: int = 2) -> List[Path]:
    """Delete all but the newest ``keep`` checkpoints of ``folder`` (rank 0 only); returns the
    deleted paths ([] on other ranks)."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive integer, got {keep!r}")
    if not is_main():
        return []
    old = list_checkpoints(folder)[:-keep]
    for path in old:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return old
