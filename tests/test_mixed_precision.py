"""bf16 autocast in the trainers, checked on the CPU (``amp=True``): the code path a CUDA run takes by
default (bf16 activations, float32 losses, prior and master weights, channels_last), compared with
the same run in float32."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dkl_lib import data as D
from dkl_lib import models as M
from dkl_lib import train as T
from dkl_lib.attacks import Normalized, bf16_autocast, trades_perturb
from dkl_lib.losses import kl_loss

COMMON = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=16, progress=False, device="cpu",
              channels_last=True)
ADV = dict(epochs=2, seed=0, channels_last=True, epsilon=0.03, attack_steps=2, awp_gamma=0.005, awp_warmup=1,
           weight_average=0.9, weight_average_from=1, eval_samples=8, eval_steps=2, lr=0.05, batch_size=16,
           progress=False, device="cpu")
TERMS = ("loss", "ce", "kl", "wmse", "soft_ce", "tckd", "nckd")


def cifar_like():
    return D.synthetic(n_train=48, n_test=32, num_classes=10, image_shape=(3, 16, 16), seed=0,
                       augment={"padding": 2, "flip": True})


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class DtypeRecorder:
    """Records (training flag, output dtype) of a model's first convolution on every call."""

    def __init__(self, model):
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        self.seen = []
        self.handle = conv.register_forward_hook(lambda m, i, o: self.seen.append((m.training, o.dtype)))

    def dtypes(self, training):
        return {dtype for flag, dtype in self.seen if flag == training}


@pytest.fixture(scope="module")
def teacher():
    t = M.build_model("resnet8", 10, seed=0)
    T.train_teacher(t, cifar_like(), epochs=3, seed=0, **COMMON)
    return t


def test_bf16_autocast_helper():
    a, b = torch.randn(4, 5), torch.randn(5, 3)
    with bf16_autocast("cpu", True):
        assert (a @ b).dtype == torch.bfloat16
        assert (a.double() @ b.double()).dtype == torch.float64  # float64 is never cast
    with bf16_autocast(torch.device("cpu"), False):
        assert (a @ b).dtype == torch.float32
    with bf16_autocast("mps", True):  # no autocast for other device types (constructing is enough)
        assert (a @ b).dtype == torch.float32


@pytest.mark.parametrize("loss", ["ce", "kl", "dkl", "ikl", "gkl", "dkd"])
def test_distill_under_bf16_autocast_tracks_float32(teacher, loss):
    d = cifar_like()
    gi = {"gi": True} if loss in ("ikl", "gkl") else {}
    runs = {}
    for amp in (False, True):
        student = M.build_model("resnet8", 10, seed=1)
        before = flat(student)
        rec = DtypeRecorder(student)
        r = T.distill(student, teacher, d, loss=loss, epochs=2, seed=0, amp=amp, **gi, **COMMON)
        rec.handle.remove()
        runs[amp] = (flat(student) - before, r, rec, student)
    (u32, r32, rec32, _), (u16, r16, rec16, student16) = runs[False], runs[True]
    # the mixed-precision path really ran: bf16 activations in training and in evaluation ...
    assert rec16.dtypes(True) == {torch.bfloat16} and rec16.dtypes(False) == {torch.bfloat16}
    assert rec32.dtypes(True) == {torch.float32} and r16.config["amp"] is True and r32.config["amp"] is False
    # ... with float32 master weights kept in channels_last
    assert {p.dtype for p in student16.parameters()} == {torch.float32}
    conv = next(m for m in student16.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # same epoch-1 loss terms (the losses run in float32 on bf16 logits) and nearly the same update
    for name in TERMS:
        if name in r32.history[0]:
            assert r16.history[0][name] == pytest.approx(r32.history[0][name], rel=1e-2, abs=1e-4), name
    assert all(math.isfinite(h["loss"]) for h in r16.history)
    assert F.cosine_similarity(u16, u32, dim=0) > 0.97
    assert float(u16.norm() / u32.norm()) == pytest.approx(1.0, abs=0.02)
    if gi:  # the class prior, accumulated in float64 from the bf16 teacher logits
        assert r16.priors[-1].dtype == r32.priors[-1].dtype and torch.allclose(r16.priors[-1], r32.priors[-1], atol=1e-3)


@pytest.mark.parametrize("loss", ["trades", "ikl"])
def test_adversarial_train_under_bf16_autocast_tracks_float32(loss):
    """The attack, AWP's proxy step, the outer loss and the weight average, under bf16 autocast."""
    d = cifar_like()
    runs = {}
    for amp in (False, True):
        model = M.build_model("resnet8", 10, seed=1)
        before = flat(model)
        rec = DtypeRecorder(model)
        r = T.adversarial_train(model, d, loss=loss, amp=amp, **ADV)
        rec.handle.remove()
        runs[amp] = (flat(model) - before, r, rec, model)
    (u32, r32, _, _), (u16, r16, rec16, model16) = runs[False], runs[True]
    # train mode = the outer step, in bf16; eval mode = the TRADES attack, in bf16, and the per-epoch
    # PGD robustness check, which stays float32 (robust accuracy is never measured in bf16)
    assert rec16.dtypes(True) == {torch.bfloat16} and rec16.dtypes(False) == {torch.bfloat16, torch.float32}
    for name in ("loss", "ce", "soft_ce"):
        if name in r32.history[0]:
            assert r16.history[0][name] == pytest.approx(r32.history[0][name], rel=1e-2), name
    assert F.cosine_similarity(u16, u32, dim=0) > 0.97
    assert {p.dtype for p in model16.parameters()} == {torch.float32} and r16.config["amp"] is True


def test_trades_perturb_and_evaluate_under_bf16_autocast(teacher):
    d = cifar_like()
    net = Normalized(teacher, d.mean, d.std).eval()
    x = d.x_test[:16]
    kw = dict(epsilon=0.03, steps=3, step_size=0.01)
    adv32 = trades_perturb(net, x, generator=torch.Generator().manual_seed(0), amp=False, **kw)
    adv16 = trades_perturb(net, x, generator=torch.Generator().manual_seed(0), amp=True, **kw)
    assert adv16.dtype == x.dtype and (adv16 - x).abs().max() <= 0.03 + 1e-7
    assert 0.0 <= float(adv16.min()) and float(adv16.max()) <= 1.0
    # the first step's signs are noise-driven (KL has zero gradient at x), so compare what the attack
    # achieves: bf16 reaches the float32 attack's KL and far more than a random corner of the ball
    with torch.no_grad():
        def kl_at(a):
            return float(kl_loss(net(a), net(x)))
        g = torch.Generator().manual_seed(1)
        corner = (x + 0.03 * torch.sign(torch.randn(x.shape, generator=g))).clamp(0, 1)
        assert kl_at(adv16) >= 0.9 * kl_at(adv32) and kl_at(adv16) > 10 * kl_at(corner)
    logits32 = T.predict_logits(teacher, d.x_test, d, amp=False)
    logits16 = T.predict_logits(teacher, d.x_test, d, amp=True)
    assert logits16.dtype == torch.float32  # returned in float32 whatever ran inside
    assert torch.allclose(logits16, logits32, rtol=0.05, atol=0.05 * float(logits32.abs().max()))
    assert abs(T.evaluate(teacher, d, amp=True) - T.evaluate(teacher, d, amp=False)) <= 100.0 * 2 / d.n_test
