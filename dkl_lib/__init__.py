"""dkl_lib: the helper library of the Decoupled KL (DKL) divergence notebook suite.

Use it as ``import dkl_lib as dkl``. The losses live in :mod:`dkl_lib.losses` and are re-exported
here; :mod:`dkl_lib.grads` holds the gradient analysis; :mod:`dkl_lib.data`, :mod:`dkl_lib.models`,
:mod:`dkl_lib.prior`, :mod:`dkl_lib.train` and :mod:`dkl_lib.experiments` the training engine;
:mod:`dkl_lib.attacks` the adversarial attacks and robustness evaluation. The
figure and widget modules (``dkl.plots``, ``dkl.widgets``, ``dkl.profiling``) are imported on first
use, so ``import dkl_lib`` loads neither plotly nor ipywidgets. Importing the package has no side
effects (no seeding, no downloads).
"""
import importlib

from . import attacks, data, grads, losses, models, prior, train
from .attacks import Normalized, evaluate_robustness, pgd
from .prior import ClassPrior
from .train import StopTraining, adversarial_train, distill, select_device, train_teacher
from .losses import (
    LOSS_TERMS,
    dkd_loss,
    dkd_terms,
    dkl_loss,
    dkl_terms,
    gkl_loss,
    gkl_terms,
    ikl_loss,
    ikl_terms,
    kl_loss,
    kl_terms,
    custom_loss,
    loss_terms,
    register_loss,
    registered_losses,
    unregister_loss,
    wmse,
    wmse_pairwise,
)

__version__ = "0.1.0"

# imported on first use: plotting and widget stacks stay unloaded for training code, and
# `python -m dkl_lib.experiments` does not find its own module already imported by the package
_LAZY = ("plots", "widgets", "profiling", "analysis", "experiments", "configs", "distributed")
_LAZY_NAMES = {"run_grid": "experiments", "run_adv_grid": "experiments", "paper_results": "experiments"}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name in _LAZY_NAMES:
        return getattr(__getattr__(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'dkl_lib' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + list(_LAZY_NAMES))
