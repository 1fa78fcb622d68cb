"""Where the suite's folders are.

In a clone of the repository (``make lab``, an editable install, or ``PYTHONPATH`` at the clone) the
package sits beside ``configs/``, ``data/`` and ``runs/``, and those are used, whatever the working
directory (notebooks run in ``notebooks/``). A wheel installed elsewhere (``pip install git+...``)
sits in site-packages, where nothing may be written: its ``runs/`` and ``data/downloads/`` are then
those of the current working directory, and the published numbers come from the copy of
``data/paper_results.json`` packed into the wheel (``dkl_lib.published``, see pyproject.toml).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

_CLONE = Path(__file__).resolve().parent.parent


def repository() -> Optional[Path]:
    """The clone this package was imported from, or None for a package installed elsewhere."""
    marks = (_CLONE / "pyproject.toml", _CLONE / "data" / "paper_results.json")
    return _CLONE if all(mark.is_file() for mark in marks) else None


def home() -> Path:
    """The folder that holds ``runs/``, ``data/`` and ``configs/``: the clone, else the working directory."""
    return repository() or Path.cwd()


def paper_results_file() -> Path:
    """``data/paper_results.json`` of the clone, else the copy installed with the package."""
    clone = repository()
    if clone is not None:
        return clone / "data" / "paper_results.json"
    return Path(__file__).resolve().parent / "published" / "paper_results.json"
