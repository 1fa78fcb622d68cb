"""Command-line checks shared by the benchmark scripts: a bad option is one line from argparse
(exit status 2), not a traceback from inside torch or statistics."""
from __future__ import annotations

import argparse

import torch


def at_least(low: int):
    """An argparse ``type``: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def int_list(low: int = 1):
    """An argparse ``type``: comma-separated integers, each >= ``low``, at least one."""
    one = at_least(low)

    def parse(text: str) -> list:
        items = [one(item.strip()) for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"needs at least one integer >= {low}")
        return items
    return parse


def devices(parser: argparse.ArgumentParser, text, option: str = "--devices") -> list:
    """The comma-separated devices of ``text`` (cpu, cuda, cuda:N) as names, checked here: an unknown
    type or CUDA without a visible GPU is a parser error naming the option."""
    names = [item.strip() for item in text.split(",") if item.strip()]
    if not names:
        parser.error(f"{option}: no device given; use cpu, cuda or cuda:N")
    for name in names:
        try:
            device = torch.device(name)
        except RuntimeError:
            parser.error(f"{option}: unknown device {name!r}; use cpu, cuda or cuda:N")
        if device.type not in ("cpu", "cuda"):
            parser.error(f"{option}: {name!r} is not measured here; use cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"{option}: {name!r} asked for, but torch sees no CUDA device")
    return names
