"""Loss functions for tests/test_custom_loss.py, in a module of their own so that a spawned worker
process of ``run_grid(workers=2)`` can import them (a function defined in ``__main__`` cannot be)."""
import torch

import dkl_lib as dkl


def kl_copy(logits, target_logits, *, targets, class_prior, temperature):
    """kl through the library: must reproduce loss="kl" bit for bit."""
    return {"kl": dkl.kl_loss(logits, target_logits, temperature=temperature)}


def kl_by_hand(logits, target_logits, *, targets, class_prior, temperature):
    """KL(s_m || s_n) · T², written out (same value as kl_loss up to rounding)."""
    log_s_n = torch.log_softmax(logits / temperature, dim=1)
    log_s_m = torch.log_softmax(target_logits / temperature, dim=1)
    return {"kl": temperature**2 * (log_s_m.exp() * (log_s_m - log_s_n)).sum(dim=1).mean()}


def symmetric_kl(logits, target_logits, *, targets, class_prior, temperature):
    """KL both ways: two named terms."""
    return {"kl_fwd": dkl.kl_loss(logits, target_logits, temperature=temperature),
            "kl_rev": dkl.kl_loss(target_logits, logits, temperature=temperature)}


def ikl_with_prior(logits, target_logits, *, targets, class_prior, temperature):
    """ikl, with the GI prior when the run passes one (records what it was given)."""
    ikl_with_prior.seen.append(None if class_prior is None else tuple(class_prior.shape))
    return dkl.ikl_terms(logits, target_logits, temperature=temperature, targets=targets, class_prior=class_prior)


ikl_with_prior.seen = []
