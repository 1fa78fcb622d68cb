import os
import socket

import pytest
import torch

# Tests run on the CPU, offline, with few threads (CI has 2 cores).
os.environ.setdefault("FAST", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def random_pair(batch, classes, *, scale=3.0, dtype=torch.float64, generator=None, grad=True):
    """Two random logit tensors (student, teacher) of shape (batch, classes)."""
    g = generator or torch.Generator().manual_seed(0)
    a = (torch.randn(batch, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    b = (torch.randn(batch, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    return a.requires_grad_(grad), b.requires_grad_(grad)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def comparison_table(clean=95.0, clean_std=1.0):
    """A two-row table for ``plots.adversarial_comparison_bars``: IKL-AT measured here beside the paper's."""
    import pandas as pd

    return pd.DataFrame([{"method": "IKL-AT", "loss": "ikl", "who": "ours (measured here)", "data": "digits",
                          "clean (%)": clean, "clean std": clean_std, "robust (%)": 80.0, "robust std": 2.0,
                          "attack": "a"},
                         {"method": "IKL-AT", "loss": "ikl", "who": "paper (published)", "data": "CIFAR-10",
                          "clean (%)": 84.8, "clean std": float("nan"), "robust (%)": 57.09,
                          "robust std": float("nan"), "attack": "AutoAttack"}])
