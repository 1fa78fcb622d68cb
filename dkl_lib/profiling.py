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

__all__ = ["TensorRecorder", "largest_tensor", "median_seconds"]


class TensorRecorder(TorchDispatchMode):
    """Records every tensor produced by an aten op while active (forward and backward passes).

    ``largest_numel`` is the size of the largest tensor created, ``largest_bytes`` its size in
    bytes and ``total_bytes`` the sum over all created tensors (an upper bound of traffic, not of
    peak memory, since views and freed tensors are counted too).
    """

    def __init__(self):
        super().__init__()
        self.largest_numel = 0
        self.largest_bytes = 0
        self.total_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                nbytes = t.numel() * t.element_size()
                self.total_bytes += nbytes
                if t.numel() > self.largest_numel:
                    self.largest_numel, self.largest_bytes = t.numel(), nbytes
        return out


def largest_tensor(fn: Callable[[], torch.Tensor], *, backward: bool = True) -> TensorRecorder:
    """Run ``fn()`` (and ``.backward()`` on its result) under a :class:`TensorRecorder`."""
    with TensorRecorder() as rec:
        value = fn()
        if backward:
            value.backward()
    return rec


def median_seconds(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)
