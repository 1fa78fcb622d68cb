"""Small, honest measurements for notebooks: what tensors an operation creates, and how long it takes.

These are for in-notebook illustrations (notebook 01 compares the closed-form wMSE with the literal
pairwise sum). Benchmarks that back the README's numbers live in ``benchmarks/``.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ._checks import check_int

__all__ = ["TensorRecorder", "largest_tensor", "median_seconds"]


class TensorRecorder(TorchDispatchMode):
    """Records every tensor produced by an aten op while active (forward and backward passes).

    ``largest_numel`` is the size of the largest tensor created, ``largest_bytes`` its size in
    bytes and ``total_bytes`` the sum over all created tensors (an upper bound of traffic, not of
    peak memory, since views and freed tensors are counted too). The output of an in-place op
    (``x.relu_()``, ``out=`` arguments) is one of its inputs, not a new tensor, and is not counted.
    """

    def __init__(self):
        super().__init__()
        self.largest_numel = 0
        self.largest_bytes = 0
        self.total_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in inputs:
                nbytes = t.numel() * t.element_size()
                self.total_bytes += nbytes
                if t.numel() > self.largest_numel:
                    self.largest_numel, self.largest_bytes = t.numel(), nbytes
        return out


def largest_tensor(fn: Callable[[], torch.Tensor], *, backward: bool = True) -> TensorRecorder:
    """Run ``fn()`` (and ``.backward()`` on its result, a scalar tensor) under a :class:`TensorRecorder`."""
    if not callable(fn):
        raise TypeError(f"fn must be a function of no arguments, got {type(fn).__name__}")
    with TensorRecorder() as rec:
        value = fn()
        if backward:
            if not isinstance(value, torch.Tensor) or not value.requires_grad:
                raise TypeError("with backward=True, fn must return a tensor that requires grad (a loss), got "
                                + ("a tensor without grad" if isinstance(value, torch.Tensor) else type(value).__name__))
            value.backward()
    return rec


def median_seconds(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` >= 1 calls after ``warmup`` >= 0 calls.

    When CUDA is in use in this process, every timed call is synchronised before and after, so GPU
    work is timed to its end, not only its launch."""
    if not callable(fn):
        raise TypeError(f"fn must be a function of no arguments, got {type(fn).__name__}")
    repeats = check_int("repeats", repeats, 1)
    warmup = check_int("warmup", warmup, 0)

    def sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)
