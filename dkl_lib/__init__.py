"""dkl_lib: the helper library of the Decoupled KL (DKL) divergence notebook suite.

Use it as ``import dkl_lib as dkl``. The losses live in :mod:`dkl_lib.losses` and are re-exported
here; :mod:`dkl_lib.grads` holds the gradient analysis. Importing the package has no side effects
(no seeding, no downloads).
"""
from . import grads, losses
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
    loss_terms,
    wmse,
    wmse_pairwise,
)

__version__ = "0.1.0"
