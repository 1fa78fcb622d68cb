"""Adversarial weight perturbation (AWP) and the exponential weight average of adversarial_train
(the official IKL-AT recipe): the perturbation against float64 autograd, one AWP training step
against the same step computed by hand, the averaging rule, and bad settings."""
import copy

import pytest
import torch
import torch.nn.functional as F

from dkl_lib import attacks as A
from dkl_lib import data as D
from dkl_lib import models as M
from dkl_lib import train as T


def tiny(**kw):
    args = dict(n_train=24, n_test=20, num_classes=3, image_shape=(1, 6, 6), noise=0.4, seed=5, dtype=torch.float64)
    args.update(kw)
    return D.synthetic(**args)


def mlp(d, seed=0):
    return A.normalized(M.build_model("mlp", 3, seed=seed, in_shape=(1, 6, 6), hidden=(8,)).double(), d)


def test_awp_perturbation_is_the_normalised_loss_gradient_of_each_weight():
    d = tiny()
    model = mlp(d)
    before = copy.deepcopy(model.state_dict())
    x, y = d.x_train, d.y_train

    def loss_fn(m):
        return F.cross_entropy(m(x), y)

    awp = T.AdversarialWeightPerturbation(model, gamma=0.01)
    v = awp.perturbation(loss_fn)
    weights = {n: p for n, p in model.named_parameters() if p.dim() > 1}
    assert sorted(v) == sorted(weights) and len(v) == 2          # the two Linear weights, no bias
    grads = torch.autograd.grad(loss_fn(model), list(weights.values()))
    for (name, w), g in zip(weights.items(), grads):
        expected = 0.01 * w.norm() * g / g.norm()
        torch.testing.assert_close(v[name], expected, rtol=1e-12, atol=1e-15)
        assert v[name].norm().item() == pytest.approx(0.01 * w.norm().item(), rel=1e-12)
    for k, t in model.state_dict().items():                      # computing v changes nothing
        assert torch.equal(t, before[k]), k
    with torch.no_grad():
        base = loss_fn(model).item()
        awp.apply(v, +1.0)
        up = loss_fn(model).item()
        awp.apply(v, -1.0)
    assert up > base                                               # an ascent direction
    for k, t in model.state_dict().items():                        # restored
        torch.testing.assert_close(t, before[k], rtol=0, atol=1e-15)


def test_awp_leaves_the_models_batchnorm_statistics_alone():
    d = tiny(dtype=torch.float32)
    model = A.normalized(M.build_model("small_cnn", 3, seed=0, width=4, in_channels=1), d)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    awp = T.AdversarialWeightPerturbation(model, gamma=0.005)
    awp.perturbation(lambda m: F.cross_entropy(m(d.x_train), d.y_train))
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v), k


def _one_epoch(awp_gamma, awp_warmup=1):
    d = tiny()
    model = mlp(d, seed=3)
    res = T.adversarial_train(model, d, loss="trades", epsilon=0.1, attack_steps=0, epochs=1, batch_size=24, lr=0.1,
                              momentum=0.0, weight_decay=0.0, eval_samples=0, seed=7, awp_gamma=awp_gamma,
                              awp_warmup=awp_warmup, progress=False, device="cpu")
    return d, res


def test_awp_waits_for_its_warm_up_epoch():
    """awp_warmup = 2: epoch 1 trains as without AWP (the same weights to the bit); from epoch 1 on it does not."""
    _, plain = _one_epoch(0.0)
    _, waiting = _one_epoch(0.02, awp_warmup=2)
    _, perturbed = _one_epoch(0.02, awp_warmup=1)
    for (name, a), b, c in zip(waiting.model.named_parameters(), plain.model.parameters(), perturbed.model.parameters()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(b, c) for b, c in zip(plain.model.parameters(), perturbed.model.parameters()))


def test_one_awp_step_equals_the_step_computed_by_hand():
    d, res = _one_epoch(0.02)
    assert res.config["awp_gamma"] == 0.02 and res.config["awp_warmup"] == 1
    # by hand: the batch order, the attack start (0 steps: x + 0.001·N(0, 1) clipped), the
    # perturbation v at w, the gradient at w + v, the SGD step from w
    model = mlp(d, seed=3)
    idx = torch.randperm(24, generator=torch.Generator().manual_seed(7))
    x, y = d.x_train[idx], d.y_train[idx]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7 + 2_000_003), dtype=torch.float32)
    x_adv = (x + 0.001 * noise.double()).clamp(0, 1)

    def loss(m):
        return sum(T.adversarial_loss_terms("trades", m(x_adv), m(x), y).values())

    params = dict(model.named_parameters())
    weights = [n for n, p in params.items() if p.dim() > 1]
    g0 = torch.autograd.grad(loss(model), [params[n] for n in weights])
    v = {n: 0.02 * params[n].norm() * g / g.norm() for n, g in zip(weights, g0)}
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in shifted.named_parameters():
            if n in v:
                p.add_(v[n])
    g1 = torch.autograd.grad(loss(shifted), list(shifted.parameters()))
    expected = {n: p.detach() - 0.1 * g for (n, p), g in zip(model.named_parameters(), g1)}
    for n, p in res.model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-10, atol=1e-12)
    # the control: without AWP the step differs
    _, plain = _one_epoch(0.0)
    diff = max((a - b).abs().max().item() for a, b in zip(plain.model.parameters(), res.model.parameters()))
    assert diff > 1e-6 and "awp_gamma" not in plain.config


@pytest.mark.parametrize("stop", ["interrupt", "diverge"])
def test_the_awp_perturbation_is_taken_off_when_a_step_is_cut_short(stop):
    """The weights are moved to w + v for the outer step and back by v after it, also when Ctrl-C or a
    divergence stops that step half-way: with a learning rate of 0 the model ends where it began."""
    d = tiny()
    model = mlp(d)
    before = copy.deepcopy(model.state_dict())
    calls = []

    def cut(module, args):  # the third training-mode forward of the whole model: inside an outer step
        if module.training:
            calls.append(1)
            if len(calls) == 3:
                if stop == "interrupt":
                    raise KeyboardInterrupt
                return (args[0] * float("nan"),)

    model.register_forward_pre_hook(cut)
    kw = dict(loss="trades", epsilon=0.1, epochs=1, batch_size=8, lr=1e-300, momentum=0.0, weight_decay=0.0,
              attack_steps=1, awp_gamma=0.05, awp_warmup=0, progress=False, device="cpu")
    if stop == "interrupt":
        assert T.adversarial_train(model, d, **kw).stopped == "interrupted"
    else:
        with pytest.raises(FloatingPointError, match="diverged"):
            T.adversarial_train(model, d, **kw)
    for k, v in before.items():
        assert torch.allclose(model.state_dict()[k], v, rtol=0, atol=1e-12), k


def test_weight_average_rule():
    d = tiny(dtype=torch.float32)
    model = A.normalized(M.build_model("small_cnn", 3, seed=0, width=4, in_channels=1), d)
    wa = T.WeightAverage(model, decay=0.75, start=2)
    snapshots = []
    for epoch in (1, 2, 3, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(d.x_train)                                   # moves the BatchNorm statistics too
        snapshots.append(copy.deepcopy(model.state_dict()))
        wa.update(model, epoch)
    # up to the end of epoch `start` the average is the weights; then a <- 0.75 a + 0.25 w per step
    s1, s2, s3, s4 = snapshots
    for k, a in wa.module.state_dict().items():
        if a.is_floating_point():
            expected = 0.75 * (0.75 * s2[k] + 0.25 * s3[k]) + 0.25 * s4[k]
            torch.testing.assert_close(a, expected, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, s4[k]), k                # num_batches_tracked: copied
    assert not wa.module.training and not any(p.requires_grad for p in wa.module.parameters())


def test_adversarial_train_evaluates_and_returns_the_averaged_weights():
    d = tiny(n_train=48)
    kw = dict(loss="trades", epsilon=0.1, attack_steps=2, batch_size=12, lr=0.1, eval_samples=10, seed=1,
              progress=False, device="cpu")
    raw = T.adversarial_train(mlp(d), d, epochs=2, **kw)
    # tau = 0: the average is the weights themselves
    same = T.adversarial_train(mlp(d), d, epochs=2, weight_average=0.0, **kw)
    for a, b in zip(raw.model.parameters(), same.model.parameters()):
        assert torch.equal(a, b)
    assert all(h["test_acc"] == h["test_acc_raw"] for h in same.history)
    # tau close to 1 from the end of epoch 1: the returned model stays at the epoch-1 weights
    first = T.adversarial_train(mlp(d), d, epochs=1, **kw)
    slow = T.adversarial_train(mlp(d), d, epochs=2, weight_average=0.999999, weight_average_from=1, **kw)
    to_first = max((a - b).abs().max().item() for a, b in zip(slow.model.parameters(), first.model.parameters()))
    to_raw = max((a - b).abs().max().item() for a, b in zip(slow.model.parameters(), raw.model.parameters()))
    assert to_first < 1e-4 < to_raw
    assert slow.config["weight_average"] == 0.999999 and slow.config["weight_average_from"] == 1


@pytest.mark.parametrize("kw, match", [
    ({"awp_gamma": -0.1}, "awp_gamma"),
    ({"awp_gamma": 0.01, "loss": "ce"}, "awp_gamma > 0 needs an adversarial loss"),
    ({"awp_gamma": 0.01, "awp_warmup": -1}, "awp_warmup"),
    ({"weight_average": 1.0}, "weight_average"),
    ({"weight_average": 0.9, "weight_average_from": 0}, "weight_average_from"),
    ({"weight_average": 0.9, "weight_average_every": "batch"}, "weight_average_every must be 'step' or 'epoch'"),
])
def test_bad_awp_and_weight_average_settings(kw, match):
    d = tiny()
    args = dict(loss="trades", epsilon=0.1, epochs=1, progress=False, device="cpu")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        T.adversarial_train(mlp(d), d, **args)


def test_the_epoch_accuracies_are_those_of_the_averaged_weights():
    """With a weight average the per-epoch clean and robust accuracies are measured on the averaged
    weights (the returned model), test_acc_raw on the trained ones."""
    d = tiny(n_train=48, n_test=60)
    kw = dict(loss="trades", epsilon=0.1, attack_steps=2, batch_size=12, lr=0.1, eval_samples=None, eval_steps=3,
              seed=1, progress=False, device="cpu")
    res = T.adversarial_train(mlp(d), d, epochs=3, weight_average=0.999999, weight_average_from=1, **kw)
    row = res.history[-1]
    clean = A.clean_correct(res.model, d.x_test, d.y_test)
    robust = clean & A.pgd(res.model, d.x_test, d.y_test, epsilon=0.1, steps=3, seed=1).correct
    assert row["test_acc"] == pytest.approx(100 * clean.double().mean().item())
    assert row["test_robust_acc"] == pytest.approx(100 * robust.double().mean().item())
    raw = T.adversarial_train(mlp(d), d, epochs=3, **kw).history[-1]
    assert row["test_acc_raw"] == raw["test_acc"] != row["test_acc"]
    assert raw["test_robust_acc"] != row["test_robust_acc"]


def test_per_epoch_weight_average_is_the_official_swa_over_the_epoch_end_weights():
    """weight_average_every="epoch" (the average the official sh scripts evaluate, swa.py DIR τ 1 E):
    a = w_1 after epoch 1, then a ← τ·a + (1 − τ)·w_e with w_e the weights at the end of epoch e. The
    epoch-end weights come from runs of 1, 2, 3 epochs (constant lr and ε: the same trajectory)."""
    d = tiny(n_train=48)
    kw = dict(loss="trades", epsilon=0.1, attack_steps=2, batch_size=12, lr=0.1, eval_samples=10, seed=1,
              progress=False, device="cpu")
    ends = [T.adversarial_train(mlp(d), d, epochs=e, **kw).model.state_dict() for e in (1, 2, 3)]
    res = T.adversarial_train(mlp(d), d, epochs=3, weight_average=0.7, weight_average_from=1,
                              weight_average_every="epoch", **kw)
    for key, got in res.model.state_dict().items():
        want = 0.7 * (0.7 * ends[0][key] + 0.3 * ends[1][key]) + 0.3 * ends[2][key]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=key)
    assert res.config["weight_average_every"] == "epoch"
    # the epoch-1 accuracy is that of w_1 itself; later ones are of the average, not of the raw weights
    assert res.history[0]["test_acc"] == res.history[0]["test_acc_raw"]
    per_step = T.adversarial_train(mlp(d), d, epochs=3, weight_average=0.7, weight_average_from=1, **kw)
    assert "weight_average_every" not in per_step.config     # the default keeps older configs' keys
    gap = max((a - b).abs().max().item() for a, b in zip(per_step.model.parameters(), res.model.parameters()))
    assert gap > 1e-6

