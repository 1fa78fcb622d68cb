"""dkl_lib.attacks: PGD, the TRADES inner maximisation, the ART ensemble and the sanity checks
(CPU, tiny synthetic data and models; a few seconds in all)."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dkl_lib import attacks as A
from dkl_lib import data as D
from dkl_lib import models as M
from dkl_lib import train as T
from dkl_lib.losses import kl_loss


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained():
    """A small MLP trained (naturally) to 100 % on 4-class synthetic images, wrapped so that it
    takes [0, 1] images; at ε = 0.3 PGD breaks every sample."""
    d = D.synthetic(n_train=128, n_test=48, num_classes=4, noise=0.2, seed=0)
    m = M.build_model("mlp", 4, seed=0, hidden=(32,), in_shape=(1, 8, 8))
    T.train_teacher(m, d, epochs=10, lr=0.1, batch_size=32, progress=False, device="cpu")
    return A.normalized(m, d).eval(), d


class SmallBN(nn.Module):
    """conv - BatchNorm - ReLU - linear (BatchNorm so that train/eval mode matters)."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


class StuckInTrain(nn.Module):
    """A deliberately broken model: eval() does not reach its BatchNorm (a custom train() that
    ignores mode=False), so it is 'left in train mode' whatever the caller does."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def train(self, mode=True):
        return super().train(True)

    def forward(self, x):
        return self.inner(x)


class Rounded(nn.Module):
    """A gradient-masking 'defence': rounds its input to a few grey levels (zero gradient)."""

    def __init__(self, inner, levels=4):
        super().__init__()
        self.inner, self.levels = inner, levels

    def forward(self, x):
        return self.inner(torch.round(x * self.levels) / self.levels)


class Noisy(nn.Module):
    """A non-deterministic model: large random noise on the logits at every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out + 50.0 * torch.randn_like(out)


# -------------------------------------------------------------------------------------- Normalized
def test_normalized_puts_the_normalisation_inside(trained):
    net, d = trained
    x = d.x_test[:5]
    assert torch.allclose(net(x), net.model(d.normalize(x)), atol=1e-6)
    assert set(net.state_dict()) >= {"mean", "std"} and any(k.startswith("model.") for k in net.state_dict())
    with pytest.raises(ValueError, match="std"):
        A.Normalized(nn.Identity(), [0.5], [0.0])
    with pytest.raises(ValueError, match="one value per channel"):
        A.Normalized(nn.Identity(), [0.5, 0.5], [0.2])


# ---------------------------------------------------------------------------------------------- PGD
@pytest.mark.parametrize("epsilon", [0.0, 0.05, 0.3, 0.8])
def test_pgd_and_trades_perturb_stay_in_the_ball_and_in_range(trained, epsilon):
    net, d = trained
    x = d.x_test.clone()
    x[:8] = 0.0  # images on the borders of [0, 1]
    x[8:16] = 1.0
    y = d.y_test
    r = A.pgd(net, x, y, epsilon=epsilon, steps=5, restarts=2, seed=3)
    t = A.trades_perturb(net, x, epsilon=epsilon, steps=5, generator=torch.Generator().manual_seed(0))
    for adv in (r.x_adv, t):
        assert adv.shape == x.shape and adv.dtype == x.dtype
        assert (adv - x).abs().max().item() <= epsilon + 1e-7
        assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
    if epsilon == 0.0:
        assert torch.equal(r.x_adv, x) and torch.equal(t, x)


def test_pgd_is_exact_on_a_linear_two_class_model():
    """Oracle: for a linear 2-class model away from the [0, 1] borders, the worst L∞ perturbation
    lowers the margin by exactly ε·‖w_y − w_other‖₁, and signed-gradient PGD reaches that corner."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(16, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, 16, generator=g, dtype=torch.float64))
        lin.bias.zero_()
    model = nn.Sequential(nn.Flatten(), lin)
    x = (0.5 + 0.05 * torch.randn(200, 1, 4, 4, generator=g, dtype=torch.float64)).clamp(0.3, 0.7)
    logits = model(x).detach()
    y = logits.argmax(1)
    eps = 0.02
    w = lin.weight.detach()
    margin = (logits[:, 0] - logits[:, 1]).abs()
    robust_oracle = margin > eps * (w[0] - w[1]).abs().sum()
    r = A.pgd(model, x, y, epsilon=eps, steps=8, step_size=eps / 4, random_start=False)
    assert torch.equal(r.correct, robust_oracle)
    assert 0 < int(robust_oracle.sum()) < 200  # the case is not trivial


class AlwaysClassZero(nn.Module):
    """Predicts class 0 whatever the input: no attack can break a class-0 sample."""

    def forward(self, x):
        return torch.tensor([1.0, 0.0, 0.0], dtype=x.dtype) + 0.0 * x.flatten(1)[:, :1]


@pytest.mark.parametrize("epsilon", [0.05, 0.2])
def test_pgd_random_start_is_uniform_in_the_whole_ball(epsilon):
    """With no step and no sample broken, x_adv is the random start: x + U(-ε, ε), drawn from the seed."""
    x = torch.full((64, 1, 4, 4), 0.5)  # far from the [0, 1] borders: no clipping
    y = torch.zeros(64, dtype=torch.int64)
    r = A.pgd(AlwaysClassZero(), x, y, epsilon=epsilon, steps=0, seed=5)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert r.correct.all()
    assert torch.allclose(r.x_adv, x + ((2 * u - 1) * epsilon).float(), rtol=0, atol=1e-7)
    offset = r.x_adv - x
    assert offset.min() < -0.99 * epsilon and offset.max() > 0.99 * epsilon
    assert torch.equal(A.pgd(AlwaysClassZero(), x, y, epsilon=epsilon, steps=0, random_start=False).x_adv, x)


def test_pgd_restores_modes_and_leaves_gradients_alone():
    model = SmallBN()
    model.train()
    model.bn.eval()  # mixed flags must come back as they were
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 4, (6,))
    A.pgd(model, x, y, epsilon=0.1, steps=3)
    A.trades_perturb(model, x, epsilon=0.1, steps=3)
    assert model.training and model.conv.training and model.fc.training and not model.bn.training
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no BN update


def test_pgd_more_steps_continue_fewer_steps(trained):
    net, d = trained
    accs = [A.pgd(net, d.x_test, d.y_test, epsilon=0.15, steps=k, restarts=2, seed=1).accuracy for k in (1, 5, 20)]
    assert accs[0] >= accs[1] >= accs[2]
    assert accs[0] > accs[2]  # the attack does something
    again = A.pgd(net, d.x_test, d.y_test, epsilon=0.15, steps=5, restarts=2, seed=1)
    assert again.accuracy == accs[1]  # same seed, same result


def test_trades_perturb_increases_the_kl():
    torch.manual_seed(0)
    model = SmallBN().eval()
    x = torch.rand(16, 1, 8, 8)
    start = A.trades_perturb(model, x, epsilon=0.1, steps=0, generator=torch.Generator().manual_seed(0))
    adv = A.trades_perturb(model, x, epsilon=0.1, steps=10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nat = model(x)
        assert kl_loss(model(adv), nat) > 10 * kl_loss(model(start), nat)
    assert 0 < (start - x).abs().max() <= 0.006  # the 0.001·N(0, 1) start


def test_trades_perturb_is_the_official_trades_inner_loop():
    """Written out as the TRADES code does it: start at x + 0.001·noise (in the ball, in [0, 1]), then per step
    ascend the sign of the gradient of KL(f(x) ‖ f(x')) (batch mean, the natural prediction fixed) and
    project. The direction of the KL, the fixed natural side, the step size and the projection all count:
    the test of the KL's rise above accepts a reversed KL or a CE."""
    torch.manual_seed(0)
    model = SmallBN().eval()
    x = torch.rand(8, 1, 8, 8)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    got = A.trades_perturb(model, x, epsilon=0.1, steps=5, step_size=0.02, start_noise=noise)

    def project(z):
        return torch.min(torch.max(z, x - 0.1), x + 0.1).clamp(0.0, 1.0)

    with torch.no_grad():
        natural = F.log_softmax(model(x), dim=1)
    want = project(x + 0.001 * noise)
    for _ in range(5):
        want = want.detach().requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(want), dim=1), natural, log_target=True, reduction="batchmean")
        (grad,) = torch.autograd.grad(kl, want)
        want = project(want.detach() + 0.02 * grad.sign())
    assert torch.equal(got, want)
    assert (got - x).abs().max() > 0.05  # the steps moved it (5 × 0.02, up to the ball)


def test_bad_arguments(trained):
    net, d = trained
    with pytest.raises(ValueError, match="epsilon"):
        A.pgd(net, d.x_test, d.y_test, epsilon=-0.1)
    with pytest.raises(ValueError, match="y must be an int64"):
        A.pgd(net, d.x_test, d.y_test.float(), epsilon=0.1)
    with pytest.raises(TypeError, match="model"):
        A.pgd(lambda t: t, d.x_test, d.y_test, epsilon=0.1)
    with pytest.raises(ValueError, match="ART refuses"):
        A.ensemble_attack(net, d.x_test, d.y_test, epsilon=0.0)
    with pytest.raises(ValueError, match="unknown ensemble attack"):
        A.ensemble_attack(net, d.x_test, d.y_test, epsilon=0.1, attacks=("fab",))
    with pytest.raises(ValueError, match="ε = 0 case"):
        A.evaluate_robustness(net, d.x_test, d.y_test, epsilon=0.0)


def test_the_ensemble_refuses_attack_lists_whose_counts_would_mislead(trained, monkeypatch):
    """A name listed twice gave two counts under one name in broken_counts (the dict kept the second); a
    single string was split into letters; Square before the APGDs took credit, in the gradient-masking
    flag, for samples the gradient attacks would have broken. All refused before any attack runs."""
    net, d = trained

    def no_attack(*args, **kwargs):
        raise AssertionError("attacked before the attack list was checked")

    monkeypatch.setattr(A, "_pgd", no_attack)
    monkeypatch.setattr(A, "require_ensemble", no_attack)
    with pytest.raises(ValueError, match="lists apgd-ce more than once"):
        A.ensemble_attack(net, d.x_test, d.y_test, epsilon=0.1, attacks=("apgd-ce", "square", "apgd-ce"))
    with pytest.raises(TypeError, match="attacks must be a list or tuple of attack names"):
        A.ensemble_attack(net, d.x_test, d.y_test, epsilon=0.1, attacks="square")
    with pytest.raises(ValueError, match="attacks is empty"):
        A.ensemble_attack(net, d.x_test, d.y_test, epsilon=0.1, attacks=[])
    with pytest.raises(ValueError, match="ensemble_attacks runs square before apgd-dlr"):
        A.evaluate_robustness(net, d.x_test, d.y_test, epsilon=0.1, ensemble_attacks=("apgd-ce", "square", "apgd-dlr"))
    with pytest.raises(ValueError, match="more than once"):
        A.evaluate_robustness(net, d.x_test, d.y_test, epsilon=0.1, ensemble_attacks=("square", "square"))
    assert A.check_ensemble_attacks(["apgd-dlr", "square"], gradient_first=True) == ("apgd-dlr", "square")
    assert A.check_ensemble_attacks(("square", "apgd-ce")) == ("square", "apgd-ce")  # ensemble_attack alone: any order


# ------------------------------------------------------------------------------------ ART ensemble
def test_ensemble_attack_restores_everything(trained):
    net, d = trained
    model = SmallBN()
    model.train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    r = A.ensemble_attack(model, d.x_test[:12], d.y_test[:12], epsilon=0.1, apgd_iters=3, square_queries=5)
    assert np.random.random() == expected  # numpy's global generator is left as it was
    assert model.training and model.bn.training
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    assert r.x_adv.shape == (12, 1, 8, 8) and set(r.broken_by.tolist()) <= {-2, -1, 0, 1, 2}
    assert (r.x_adv - d.x_test[:12]).abs().max() <= 0.1 * (1 + 1e-4) + 1e-6


def test_ensemble_breaks_a_natural_model(trained):
    net, d = trained
    r = A.ensemble_attack(net, d.x_test, d.y_test, epsilon=0.3, apgd_iters=10, square_queries=20)
    assert r.accuracy < 10.0 and r.art_clean_agree == 1.0
    counts = r.broken_counts()
    assert sum(counts.values()) == 48 and counts["apgd-ce"] > 0


# --------------------------------------------------------------------------------- sanity checks
EVAL = dict(apgd_iters=30, square_queries=50, pgd_steps=(10, 20))


def test_evaluate_robustness_passes_on_a_sound_setup(trained):
    net, d = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error", A.GradientMaskingWarning)
        rep = A.evaluate_robustness(net, d.x_test, d.y_test, epsilon=0.3, **EVAL)
    assert rep.passed and not rep.warnings
    assert {c["check"] for c in rep.checks} == set(A.CHECKS)
    assert rep.clean_acc == 100.0 and rep.pgd_acc[20] <= rep.pgd_acc[10] <= rep.clean_acc
    assert rep.robust_acc <= min(rep.ensemble_acc, *rep.pgd_acc.values())
    assert rep.check("eps0_equals_clean")["value"] == rep.clean_acc
    frame = rep.checks_frame()
    assert list(frame["status"].unique()) == ["pass"]
    d2 = rep.to_dict()
    assert d2["pgd_acc"].keys() == {"10", "20"} and d2["passed"] is True
    assert "adversarial-robustness-toolbox" in d2["config"]["ensemble_library"]


def test_checks_fire_on_a_model_left_in_train_mode(trained):
    _, d = trained
    torch.manual_seed(0)
    broken = StuckInTrain(SmallBN())
    with pytest.raises(A.SanityCheckError, match="eval_mode") as err:
        A.evaluate_robustness(broken, d.x_test, d.y_test, epsilon=0.1, ensemble=False, pgd_steps=(2, 4))
    check = err.value.report.check("eval_mode")
    assert check["status"] == "fail" and "TRAINING mode" in check["detail"] and "bn.running_mean" in check["detail"]
    assert broken.training  # (it cannot leave train mode: that is the point)


def test_checks_fire_on_a_gradient_masking_model(trained):
    net, d = trained
    with pytest.warns(A.GradientMaskingWarning, match="gradient masking"):
        rep = A.evaluate_robustness(Rounded(net), d.x_test, d.y_test, epsilon=0.3, **EVAL)
    flag = rep.check("gradient_masking")
    assert flag["status"] == "warn" and flag["value"] > 5  # PGD sees nothing, Square breaks some
    assert rep.pgd_acc[20] == rep.clean_acc and rep.ensemble_acc < rep.clean_acc - 5
    assert rep.ensemble_counts["square"] > 0 and rep.ensemble_counts["apgd-ce"] == 0
    assert rep.passed  # a flag, not a failure: the numbers are right, PGD's is just meaningless


def test_checks_fire_on_a_non_deterministic_model(trained):
    net, d = trained
    torch.manual_seed(0)
    rep = A.evaluate_robustness(Noisy(net), d.x_test, d.y_test, epsilon=0.1, ensemble=False, strict=False,
                                pgd_steps=(2, 4))
    assert "eps0_equals_clean" in rep.failed


def test_eps0_check_fails_when_the_inputs_move_at_eps0(trained, monkeypatch):
    """Same accuracy, but x_adv != x at ε = 0: the check looks at the inputs, not only the accuracy."""
    net, d = trained
    real_pgd = A._pgd

    def moves_at_eps0(model, x, y, *, epsilon, **kw):
        r = real_pgd(model, x, y, epsilon=epsilon, **kw)
        return A.PGDResult(x_adv=(r.x_adv + 1e-3).clamp(0, 1), correct=r.correct) if epsilon == 0 else r

    monkeypatch.setattr(A, "_pgd", moves_at_eps0)
    rep = A.evaluate_robustness(net, d.x_test, d.y_test, epsilon=0.1, ensemble=False, strict=False, pgd_steps=(2,))
    check = rep.check("eps0_equals_clean")
    assert check["value"] == rep.clean_acc and check["status"] == "fail" and "inputs were changed" in check["detail"]


def test_checks_fire_on_normalised_inputs_and_on_a_weak_ensemble(trained, monkeypatch):
    net, d = trained
    rep = A.evaluate_robustness(net, (d.x_test - 0.5) / 0.25, d.y_test, epsilon=0.1, ensemble=False,
                                strict=False, pgd_steps=(2,))
    assert "inputs_in_range" in rep.failed and "Normalized" in rep.check("inputs_in_range")["detail"]
    # with the ensemble on (the default), the same report: the ensemble, which refuses such inputs, is left out
    rep = A.evaluate_robustness(net, (d.x_test - 0.5) / 0.25, d.y_test, epsilon=0.1, strict=False, pgd_steps=(2,))
    assert "inputs_in_range" in rep.failed and "ensemble was not run" in rep.check("inputs_in_range")["detail"]
    assert rep.ensemble_acc is None and rep.pgd_acc
    with pytest.raises(A.SanityCheckError, match="inputs_in_range"):
        A.evaluate_robustness(net, (d.x_test - 0.5) / 0.25, d.y_test, epsilon=0.1, pgd_steps=(2,))

    def no_attack(model, x, y, **kw):  # an ensemble that finds nothing: above PGD, must fail
        return A.EnsembleResult(x_adv=x.clone(), correct=A.clean_correct(model, x, y),
                                broken_by=torch.full((x.shape[0],), -1), attacks=("apgd-ce",))

    monkeypatch.setattr(A, "ensemble_attack", no_attack)
    with pytest.raises(A.SanityCheckError, match="ensemble_not_above_pgd"):
        A.evaluate_robustness(net, d.x_test, d.y_test, epsilon=0.3, pgd_steps=(5,))


def pgd_accuracies(net, d, steps, epsilon):
    """{k: PGD-k robust accuracy} with evaluate_robustness's settings (seed 0, clean input correct too)."""
    clean = A.clean_correct(net, d.x_test, d.y_test)
    return {k: 100.0 * (clean & A.pgd(net, d.x_test, d.y_test, epsilon=epsilon, steps=k, seed=0).correct)
            .double().mean().item() for k in steps}


def test_more_steps_check_passes_a_falling_pgd_curve_and_fails_a_rising_one(trained, monkeypatch):
    net, d = trained
    accs = pgd_accuracies(net, d, (1, 20), 0.15)
    assert accs[1] > accs[20]  # strictly falling: the check must pass
    rep = A.evaluate_robustness(net, d.x_test, d.y_test, epsilon=0.15, ensemble=False, pgd_steps=(1, 20))
    assert rep.pgd_acc == accs and rep.check("more_steps_not_higher")["status"] == "pass"

    real_pgd = A._pgd

    def longer_is_weaker(model, x, y, *, steps, epsilon, **kw):  # PGD-1 breaks every sample: PGD-20 is above
        r = real_pgd(model, x, y, steps=steps, epsilon=epsilon, **kw)
        return A.PGDResult(x_adv=r.x_adv, correct=torch.zeros_like(r.correct)) if steps == 1 and epsilon > 0 else r

    monkeypatch.setattr(A, "_pgd", longer_is_weaker)
    with pytest.raises(A.SanityCheckError, match="more_steps_not_higher"):
        A.evaluate_robustness(net, d.x_test, d.y_test, epsilon=0.15, ensemble=False, pgd_steps=(1, 20))


def test_ensemble_check_compares_with_the_lowest_pgd_accuracy(trained, monkeypatch):
    """An ensemble as weak as PGD-1 is above PGD-20: the check fails, by the gap to the LOWEST PGD."""
    net, d = trained
    accs = pgd_accuracies(net, d, (1, 20), 0.15)

    def as_weak_as_pgd1(model, x, y, *, epsilon, seed, **kw):
        r = A.pgd(model, x, y, epsilon=epsilon, steps=1, seed=seed)
        return A.EnsembleResult(x_adv=r.x_adv, correct=r.correct, broken_by=torch.where(r.correct, -1, 0),
                                attacks=("apgd-ce",))

    monkeypatch.setattr(A, "ensemble_attack", as_weak_as_pgd1)
    rep = A.evaluate_robustness(net, d.x_test, d.y_test, epsilon=0.15, pgd_steps=(1, 20), strict=False)
    check = rep.check("ensemble_not_above_pgd")
    assert rep.ensemble_acc == accs[1] and check["status"] == "fail"
    assert check["value"] == pytest.approx(accs[1] - accs[20]) and check["value"] > 0


def test_accuracy_vs_epsilon_and_class_separation(trained):
    net, d = trained
    frame = A.accuracy_vs_epsilon(net, d.x_test, d.y_test, [0.0, 0.1, 0.3], steps=5)
    assert frame["accuracy"].iloc[0] == 100.0 and frame["accuracy"].is_monotonic_decreasing
    x = torch.zeros(3, 1, 2, 2)
    x[1, 0, 0, 0] = 0.25
    x[2] = 1.0
    assert A.class_separation(x, torch.tensor([0, 1, 1])) == 0.25
    assert math.isinf(A.class_separation(x, torch.tensor([0, 0, 0])))


# ------------------------------------------------------------------ input checks of the attack entry points
@pytest.mark.parametrize("bad", [1.5, -0.2, math.nan, math.inf])
def test_attacks_refuse_inputs_that_are_not_finite_images_in_the_unit_range(bad):
    """An input outside [0, 1] used to come back outside the ε-ball (1.5 -> |x_adv - x| = 0.5) and a
    nan to give 0 % accuracy silently; both attacks now refuse it (evaluate_robustness still
    reports it as its inputs_in_range check)."""
    model = SmallBN().eval()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 4, (6,))
    x[0, 0, 0, 0] = bad
    needle = r"x must hold images in \[0, 1\]" if math.isfinite(bad) else "x contains non-finite values"
    with pytest.raises(ValueError, match=needle):
        A.pgd(model, x, y, epsilon=0.1, steps=3)
    with pytest.raises(ValueError, match=needle):
        A.trades_perturb(model, x, epsilon=0.1, steps=3)
    with pytest.raises(ValueError, match=needle):
        A.accuracy_vs_epsilon(model, x, y, [0.0, 0.1], steps=2)


def test_the_ensemble_refuses_a_float64_model_before_any_attack_runs(monkeypatch):
    """ART feeds float32 arrays: a float64 model failed deep inside ART after every PGD run; now it is named
    first (PGD alone, ensemble=False, still evaluates it)."""
    model = SmallBN().double().eval()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 4, (6,))
    with pytest.raises(ValueError, match="the ART ensemble attacks float32 models .* this model is float64"):
        A.ensemble_attack(model, x, y, epsilon=0.1)
    monkeypatch.setattr(A, "_pgd", lambda *a, **k: pytest.fail("PGD ran before the dtype was checked"))
    with pytest.raises(ValueError, match="this model is float64"):
        A.evaluate_robustness(model, x, y, epsilon=0.1, pgd_steps=(2,))
    monkeypatch.undo()
    assert A.evaluate_robustness(model, x, y, epsilon=0.1, pgd_steps=(2,), ensemble=False, strict=False).pgd_acc


def test_trades_perturb_casts_the_input_to_the_model_dtype_as_pgd_does():
    torch.manual_seed(0)
    model = SmallBN().eval()  # float32 weights
    x, y = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    adv = A.trades_perturb(model, x, epsilon=0.1, steps=3, generator=torch.Generator().manual_seed(0))
    assert adv.dtype == torch.float64 and (adv - x).abs().max() <= 0.1 + 1e-12
    assert A.pgd(model, x, y, epsilon=0.1, steps=3).x_adv.dtype == torch.float64
    double = SmallBN().double().eval()  # and the other way round: float32 images, a float64 model
    adv = A.trades_perturb(double, x.float(), epsilon=0.1, steps=3)
    assert adv.dtype == torch.float32 and (adv - x.float()).abs().max() <= 0.1 + 1e-6


def test_pgd_refuses_labels_out_of_range_and_non_integer_seeds():
    model = SmallBN().eval()  # 4 classes
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    for bad in ([0, 1, 2, 3, 6, 0], [0, 1, 2, 3, -1, 0]):
        with pytest.raises(ValueError, match=r"y out of range: the model has 4 classes.*\[0, 3\]"):
            A.pgd(model, x, torch.tensor(bad), epsilon=0.1, steps=3)
    with pytest.raises(ValueError, match="y out of range"):  # also when the bad label is in a later batch
        A.pgd(model, x, torch.tensor([0, 1, 2, 3, 0, 9]), epsilon=0.1, steps=1, batch_size=2)
    for seed in (1.7, True, "1", None):
        with pytest.raises(TypeError, match="seed must be an integer"):
            A.pgd(model, x, y, epsilon=0.1, steps=1, seed=seed)
    with pytest.raises(TypeError, match="seed must be an integer"):
        A.evaluate_robustness(model, x, y, epsilon=0.1, ensemble=False, pgd_steps=(1,), seed=0.5)
    same = [A.pgd(model, x, y, epsilon=0.1, steps=2, seed=s).x_adv for s in (3, np.int64(3))]
    assert torch.equal(*same)  # any integer type is a seed


class BreaksAboveCenter(nn.Module):
    """Class 1 (wrong for label 0) exactly where the first pixel exceeds 0.6: from x = 0.5 a random
    start in the 0.2-ball breaks a sample with probability 1/4, independently in each restart."""

    def forward(self, x):
        z = x.flatten(1)[:, :1]
        return torch.cat([torch.zeros_like(z), (z - 0.6) * 100.0], dim=1)


def test_pgd_restarts_keep_the_worst_case_of_every_restart():
    """A sample broken by any restart stays broken (its x_adv the first start that broke it); later
    restarts attack only the samples still standing."""
    x = torch.full((64, 1, 2, 2), 0.5)
    y = torch.zeros(64, dtype=torch.int64)
    model = BreaksAboveCenter()
    r = A.pgd(model, x, y, epsilon=0.2, steps=0, restarts=3, seed=7)
    gen = torch.Generator().manual_seed(7)
    starts = [x + ((torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 1) * 0.2).float() for _ in range(3)]
    broken = [model(s).argmax(1) != 0 for s in starts]
    assert not torch.equal(broken[0], broken[2])  # the restarts differ: the case is not trivial
    assert torch.equal(r.correct, ~(broken[0] | broken[1] | broken[2]))
    want = starts[2].clone()
    for b, s in zip(reversed(broken), reversed(starts)):  # the first breaking start wins
        want[b] = s[b]
    assert torch.allclose(r.x_adv, want, rtol=0, atol=1e-7)


def test_the_default_step_size_is_a_quarter_of_epsilon(trained):
    net, d = trained
    x, y = d.x_test[:24], d.y_test[:24]
    a = A.pgd(net, x, y, epsilon=0.1, steps=3, seed=1)
    assert torch.equal(a.x_adv, A.pgd(net, x, y, epsilon=0.1, steps=3, step_size=0.025, seed=1).x_adv)
    assert not torch.equal(a.x_adv, A.pgd(net, x, y, epsilon=0.1, steps=3, step_size=0.05, seed=1).x_adv)
    t = A.trades_perturb(net, x, epsilon=0.1, steps=3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(t, A.trades_perturb(net, x, epsilon=0.1, steps=3, step_size=0.025,
                                           generator=torch.Generator().manual_seed(2)))
    assert not torch.equal(t, A.trades_perturb(net, x, epsilon=0.1, steps=3, step_size=0.05,
                                               generator=torch.Generator().manual_seed(2)))


def _fixed_attacks(monkeypatch, pgd_correct, ens_correct, broken_by, attacks=("apgd-ce",)):
    """PGD (every k, and ε = 0) and the ensemble replaced by fixed outcomes."""
    def fixed_pgd(model, x, y, **kw):
        return A.PGDResult(x_adv=x.clone(), correct=torch.tensor(pgd_correct))

    def fixed_ensemble(model, x, y, **kw):
        return A.EnsembleResult(x_adv=x.clone(), correct=torch.tensor(ens_correct), broken_by=torch.tensor(broken_by),
                                attacks=attacks)

    monkeypatch.setattr(A, "_pgd", fixed_pgd)
    monkeypatch.setattr(A, "ensemble_attack", fixed_ensemble)


def test_robust_accuracies_count_only_samples_whose_clean_input_is_right(monkeypatch):
    """PGD-k, ensemble, worst-case and accuracy_vs_epsilon accuracies all need the clean input right,
    and the worst case takes the ensemble's breaks too."""
    x = torch.full((4, 1, 2, 2), 0.5)
    y = torch.tensor([0, 1, 0, 2])  # AlwaysClassZero: clean right on samples 0 and 2
    _fixed_attacks(monkeypatch, [True] * 4, [False, True, True, True], [0, -2, -1, -2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", A.GradientMaskingWarning)
        rep = A.evaluate_robustness(AlwaysClassZero(), x, y, epsilon=0.1, pgd_steps=(2,), strict=False)
    assert rep.clean_acc == 50.0 and rep.pgd_acc == {2: 50.0}
    assert rep.ensemble_acc == 25.0 and rep.robust_acc == 25.0
    assert A.accuracy_vs_epsilon(AlwaysClassZero(), x, y, [0.1])["accuracy"].tolist() == [50.0]


def test_the_worst_case_is_per_sample_not_the_lowest_accuracy(monkeypatch):
    """robust_acc counts a sample only if PGD AND the ensemble both failed on it: where they break different
    samples it is below both accuracies (here 25 %, where the lower of the two is 50 %)."""
    x = torch.full((4, 1, 2, 2), 0.5)
    y = torch.zeros(4, dtype=torch.int64)  # AlwaysClassZero: every clean input right
    _fixed_attacks(monkeypatch, [False, True, True, False], [True, False, True, True], [-1, 0, -1, -1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", A.GradientMaskingWarning)
        rep = A.evaluate_robustness(AlwaysClassZero(), x, y, epsilon=0.1, pgd_steps=(2,), strict=False)
    assert rep.pgd_acc == {2: 50.0} and rep.ensemble_acc == 75.0
    assert rep.robust_acc == 25.0


def test_a_large_gap_between_pgd_and_the_gradient_ensemble_is_a_masking_flag(monkeypatch):
    """The first half of the flag: APGD (no Square) below PGD by more than masking_gap points."""
    x = torch.full((4, 1, 2, 2), 0.5)
    y = torch.zeros(4, dtype=torch.int64)
    _fixed_attacks(monkeypatch, [True] * 4, [False, False, True, True], [0, 0, -1, -1])  # APGD-CE: 2 of 4
    with pytest.warns(A.GradientMaskingWarning):
        rep = A.evaluate_robustness(AlwaysClassZero(), x, y, epsilon=0.1, pgd_steps=(2,), strict=False)
    assert rep.check("gradient_masking")["status"] == "warn" and rep.check("gradient_masking")["value"] == 50.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", A.GradientMaskingWarning)
        rep = A.evaluate_robustness(AlwaysClassZero(), x, y, epsilon=0.1, pgd_steps=(2,), strict=False,
                                    masking_gap=60.0)
    assert rep.check("gradient_masking")["status"] == "pass"


def test_art_disagreeing_with_the_model_on_clean_inputs_fails_the_check(monkeypatch):
    x = torch.full((4, 1, 2, 2), 0.5)
    y = torch.zeros(4, dtype=torch.int64)

    def disagreeing(model, x, y, **kw):
        return A.EnsembleResult(x_adv=x.clone(), correct=torch.ones(4, dtype=torch.bool),
                                broken_by=torch.full((4,), -1), attacks=("apgd-ce",), art_clean_agree=0.75)

    monkeypatch.setattr(A, "ensemble_attack", disagreeing)
    rep = A.evaluate_robustness(AlwaysClassZero(), x, y, epsilon=0.1, pgd_steps=(2,), strict=False)
    assert rep.check("art_matches_model")["status"] == "fail" and "art_matches_model" in rep.failed
    with pytest.raises(A.SanityCheckError, match="art_matches_model: ART and the model agree on 75.00%"):
        A.evaluate_robustness(AlwaysClassZero(), x, y, epsilon=0.1, pgd_steps=(2,))


def test_square_breaking_what_pgd_already_broke_is_no_masking_flag(monkeypatch):
    """The black-box part of the flag counts only samples that PGD could not break."""
    x = torch.full((4, 1, 2, 2), 0.5)
    y = torch.zeros(4, dtype=torch.int64)
    _fixed_attacks(monkeypatch, [False, True, True, True], [False, True, True, True], [0, -1, -1, -1], ("square",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", A.GradientMaskingWarning)
        rep = A.evaluate_robustness(AlwaysClassZero(), x, y, epsilon=0.1, pgd_steps=(2,), strict=False)
    assert rep.check("gradient_masking")["status"] == "pass"
    _fixed_attacks(monkeypatch, [False, True, True, True], [True, False, True, True], [-1, 0, -1, -1], ("square",))
    with pytest.warns(A.GradientMaskingWarning):
        rep = A.evaluate_robustness(AlwaysClassZero(), x, y, epsilon=0.1, pgd_steps=(2,), strict=False)
    assert rep.check("gradient_masking")["status"] == "warn"


def test_an_ensemble_outside_the_ball_fails_the_ball_check(trained, monkeypatch):
    net, d = trained

    def too_far(model, x, y, **kw):
        return A.EnsembleResult(x_adv=(x + 0.3).clamp(0, 1), correct=A.clean_correct(model, x, y),
                                broken_by=torch.full((x.shape[0],), -1), attacks=("apgd-ce",))

    monkeypatch.setattr(A, "ensemble_attack", too_far)
    rep = A.evaluate_robustness(net, d.x_test, d.y_test, epsilon=0.1, pgd_steps=(2,), strict=False)
    assert "adversarial_in_ball" in rep.failed


def test_the_ensemble_is_fixed_by_its_seed_not_by_numpys_global_state(trained):
    net, d = trained
    x, y = d.x_test[:16], d.y_test[:16]
    runs = []
    for global_seed in (1, 2):
        np.random.seed(global_seed)
        runs.append(A.ensemble_attack(net, x, y, epsilon=0.3, apgd_iters=3, square_queries=10, seed=3).x_adv)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("bad", [-0.5, 1.5, float("nan")])
def test_ensemble_refuses_inputs_outside_the_unit_range(bad):
    """ART clips its inputs to (0, 1) without a word, so normalised images would be attacked as other
    images; the ensemble refuses them as pgd does, before ART is even imported."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(5, 1, 2, 2)
    x[2, 0, 1, 1] = bad
    y = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"non-finite|\[0, 1\]"):
        A.ensemble_attack(model, x, y, epsilon=0.1)
    with pytest.raises(ValueError, match=r"non-finite|\[0, 1\]"):
        A.pgd(model, x, y, epsilon=0.1, steps=1)
