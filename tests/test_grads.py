"""dkl_lib.grads against autograd, and the memory contract (no B×C×C tensor) of the losses."""
import pytest
import torch

import dkl_lib as dkl
from conftest import random_pair
from dkl_lib import grads
from dkl_lib.profiling import largest_tensor


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 12.0])
def test_analytic_kl_gradients_match_autograd(temperature):
    a, b = random_pair(5, 17, scale=4.0)
    ga, gb = torch.autograd.grad(dkl.kl_loss(a, b, temperature=temperature), (a, b))
    assert torch.allclose(grads.kl_grad_logits(a, b, temperature=temperature), ga, rtol=1e-12, atol=1e-15)
    assert torch.allclose(grads.kl_grad_target_logits(a, b, temperature=temperature), gb, rtol=1e-12,
                          atol=1e-15)


def test_term_grads_returns_zeros_for_unreached_inputs_and_sums_to_loss_grads():
    a, b = random_pair(3, 6)
    per_term = grads.term_grads("dkl", a, b, temperature=2.0)
    assert set(per_term) == {"wmse", "soft_ce"}
    assert torch.count_nonzero(per_term["wmse"][0]) == 0
    total = grads.loss_grads("dkl", a, b, temperature=2.0)
    ref = torch.autograd.grad(dkl.dkl_loss(a, b, temperature=2.0), (a, b))
    assert all(torch.allclose(x, y, rtol=1e-13, atol=1e-16) for x, y in zip(total, ref))
    assert a.grad is None and b.grad is None  # the caller's tensors are untouched


@pytest.mark.parametrize("classes,temperature", [(2, 0.5), (10, 1.0), (100, 4.0), (1000, 10.0)])
def test_check_kl_dkl_equivalence_is_at_rounding_level(classes, temperature):
    a, b = random_pair(4, classes, scale=5.0, grad=False)
    errors = grads.check_kl_dkl_equivalence(a, b, temperature=temperature)
    assert set(errors) == {"logits", "target_logits"}
    assert max(errors.values()) < 1e-12


@pytest.mark.parametrize("broken,side", [
    (lambda a, b, **kw: dkl.ikl_terms(a, b, **kw), "logits"),  # no stop-gradient on Δ(o_n): the student's side
    (lambda a, b, **kw: dkl.dkl_terms(a, b, **{**kw, "alpha": 0.5}), "target_logits"),  # half the wMSE: the teacher's
])
def test_check_kl_dkl_equivalence_reports_a_dkl_that_is_not_kl(monkeypatch, broken, side):
    """The check compares DKL with KL, not KL with itself: a DKL without its stop-gradient, or with the wrong α,
    shows up on the side it changes."""
    a, b = random_pair(4, 10, scale=5.0, grad=False)
    monkeypatch.setitem(dkl.losses.LOSS_TERMS, "dkl", broken)
    errors = grads.check_kl_dkl_equivalence(a, b, temperature=2.0)
    assert errors[side] > 0.1, errors


def test_check_kl_dkl_equivalence_works_from_float32_input():
    a, b = random_pair(4, 10, dtype=torch.float32, grad=False)
    assert max(grads.check_kl_dkl_equivalence(a, b, temperature=2.0).values()) < 1e-12


def test_relative_error_detects_a_difference():
    x = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    assert grads.relative_error(x, x) == 0.0
    assert grads.relative_error(x * (1 + 1e-3), x) == pytest.approx(1e-3, rel=1e-6)


# ------------------------------------------------------------------- no B×C×C tensor, ever
def _largest(fn, batch=8, classes=256):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(batch, classes, generator=g).requires_grad_()
    b = torch.randn(batch, classes, generator=g).requires_grad_()
    y = torch.randint(0, classes, (batch,), generator=g)
    prior = torch.softmax(torch.randn(classes, classes, generator=g), 1)
    rec = largest_tensor(lambda: fn(a, b, y, prior))
    return rec.largest_numel, batch, classes


CALLS = {
    "kl": lambda a, b, y, p: dkl.kl_loss(a, b, temperature=4.0),
    "dkl": lambda a, b, y, p: dkl.dkl_loss(a, b, temperature=4.0),
    "ikl": lambda a, b, y, p: dkl.ikl_loss(a, b, temperature=4.0, weight_temperature=2.0),
    "ikl_gi": lambda a, b, y, p: dkl.ikl_loss(a, b, temperature=4.0, targets=y, class_prior=p),
    "gkl": lambda a, b, y, p: dkl.gkl_loss(a, b, temperature=4.0, gamma=0.5),
    "dkd": lambda a, b, y, p: dkl.dkd_loss(a, b, y, temperature=4.0),
    "wmse": lambda a, b, y, p: dkl.wmse(a, b),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_losses_never_build_a_b_by_c_by_c_tensor(name):
    largest, batch, classes = _largest(CALLS[name])
    # the class prior itself (C×C) is an input; only ikl_gi touches it (its softmax or copy); every other loss
    # stays at O(B·C): not even one C×C tensor (a wMSE computed pairwise one row at a time would make one)
    allowed = classes * classes if name == "ikl_gi" else batch * classes * 2
    assert largest <= allowed, largest


def test_the_memory_probe_catches_the_pairwise_oracle():
    largest, batch, classes = _largest(lambda a, b, y, p: dkl.wmse_pairwise(a, b))
    assert largest >= batch * classes * classes


# ------------------------------------------------------------------ found by mutation testing
def test_relative_error_against_a_zero_reference_is_the_absolute_error():
    x = torch.tensor([1e-3, -2e-3, 0.0], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    assert grads.relative_error(x, zero) == pytest.approx(2e-3, rel=1e-15)
    assert grads.relative_error(zero, zero) == 0.0
    assert grads.relative_error(x, zero, scale=0.0) == pytest.approx(2e-3, rel=1e-15)


def test_check_kl_dkl_equivalence_shares_one_scale_over_both_inputs():
    """A nearly one-hot teacher: KL's target-side gradient is ~1e-13 while the logits side is O(1). Each
    side's error is relative to the largest entry over BOTH sides, so rounding stays at rounding level
    (relative to the tiny side alone it would read ~1e-3)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, generator=g, dtype=torch.float64)
    b = torch.zeros(2, 5, dtype=torch.float64)
    b[:, 0] = 30.0
    kl = grads.loss_grads("kl", a, b, temperature=1.0)
    assert kl[1].abs().max() < 1e-9 * kl[0].abs().max()  # the case is what it says
    errors = grads.check_kl_dkl_equivalence(a, b, temperature=1.0)
    assert max(errors.values()) < 1e-12


def test_student_gradients_pass_gamma_and_weight_temperature_to_gkl():
    teacher, student = [3.0, 1.0, 0.0, -1.0], [0.0, 1.5, 0.5, 0.0]
    df = grads.student_gradients(teacher, student, loss_names=("gkl",), temperature=2.0, gamma=2.5,
                                 weight_temperature=3.0)
    o_n = torch.tensor([student], dtype=torch.float64, requires_grad=True)
    o_m = torch.tensor([teacher], dtype=torch.float64)
    terms = dkl.gkl_terms(o_n, o_m, temperature=2.0, gamma=2.5, weight_temperature=3.0)
    for term, value in terms.items():
        ref = torch.autograd.grad(value, o_n, retain_graph=True)[0][0]
        got = df.query("term == @term").sort_values("cls")["grad"].to_numpy()
        assert torch.allclose(torch.tensor(got), ref, rtol=1e-12, atol=1e-15), term
    plain = grads.student_gradients(teacher, student, loss_names=("gkl",), temperature=2.0)
    assert not torch.allclose(torch.tensor(plain["grad"].to_numpy()), torch.tensor(df["grad"].to_numpy()))


def test_confidence_sweep_norms_are_per_sample_gradient_norms():
    """KL's gradient on all-zero student logits for one sample is T (1/C − p): its norm, per confidence."""
    t, c, conf = 3.0, 5, [0.3, 0.6, 0.95]
    df = grads.confidence_sweep(conf, num_classes=c, temperature=t, loss_names=("kl",))
    for k, got in zip(conf, df.sort_values("confidence")["grad_norm"]):
        p = torch.tensor([k] + [(1 - k) / (c - 1)] * (c - 1), dtype=torch.float64)
        assert got == pytest.approx(float((t * (1.0 / c - p)).norm()), rel=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 3.0])
def test_confidence_sweep_rows_do_not_depend_on_the_other_confidences(gamma):
    """Each confidence's norm is that of the gradient for that one sample alone (autograd on a batch of
    one), whichever confidences share the sweep: also for GKL with γ != 1, whose wMSE divides by a sum
    over the whole batch."""
    c, t = 6, 4.0

    def alone(loss, k):
        p = torch.tensor([k] + [(1 - k) / (c - 1)] * (c - 1), dtype=torch.float64)
        o_n = torch.zeros(1, c, dtype=torch.float64, requires_grad=True)
        kw = dict(temperature=t) if loss == "kl" else dict(temperature=t, alpha=1.0, beta=1.0)
        kw.update({"gamma": gamma} if loss == "gkl" else {})
        terms = dkl.loss_terms(loss, o_n, (t * p.log())[None], **kw)
        return {term: torch.autograd.grad(v, o_n, retain_graph=True)[0].norm().item() for term, v in terms.items()}

    for confs in ([0.5], [0.5, 0.99], [0.2, 0.5, 0.97]):
        df = grads.confidence_sweep(confs, num_classes=c, temperature=t, gamma=gamma, loss_names=("kl", "ikl", "gkl"))
        for loss in ("kl", "ikl", "gkl"):
            for term, want in alone(loss, 0.5).items():
                got = df.query("loss == @loss and term == @term and confidence == 0.5")["grad_norm"].item()
                assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (confs, loss, term)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_simplex_field_is_the_motion_of_one_gradient_step(temperature):
    """Against finite differences: s_n(ε) = softmax((o_n − ε g) / T) with g the per-sample KL gradient
    T (s_n − p) on the student's logits (teacher probabilities p at the same T)."""
    teacher = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    df = grads.simplex_field(teacher, loss="kl", temperature=temperature, resolution=6)
    s_n = torch.tensor(df[["p1", "p2", "p3"]].to_numpy())
    o_n = temperature * s_n.log()
    g = temperature * (s_n - teacher)
    eps = 1e-6
    step = (torch.softmax((o_n - eps * g) / temperature, 1) - torch.softmax((o_n + eps * g) / temperature, 1)) / (2 * eps)
    want = grads.simplex_xy(step)
    assert torch.allclose(torch.tensor(df[["dx", "dy"]].to_numpy()), want, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ found by mutation testing
def test_median_seconds_is_the_median_in_seconds_after_untimed_warmup(monkeypatch):
    import statistics
    from types import SimpleNamespace

    from dkl_lib import profiling

    clock, durations, calls = [0.0], iter([100.0, 1.0, 6.0, 2.0]), []  # the warm-up call is slow

    def fn():
        calls.append(1)
        clock[0] += next(durations)

    monkeypatch.setattr(profiling, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert profiling.median_seconds(fn, repeats=3, warmup=1) == statistics.median([1.0, 6.0, 2.0])
    assert len(calls) == 4
    with pytest.raises(ValueError, match="repeats"):
        profiling.median_seconds(fn, repeats=0)


def test_tensor_recorder_counts_bytes_of_created_tensors_and_of_the_backward_pass():
    from dkl_lib.profiling import TensorRecorder

    a, b = torch.randn(100, dtype=torch.float64), torch.randn(50, dtype=torch.float32)
    with TensorRecorder() as rec:
        made = [b.exp(), a.neg()]
    assert rec.total_bytes == sum(t.numel() * t.element_size() for t in made)
    assert (rec.largest_numel, rec.largest_bytes) == (a.numel(), a.numel() * a.element_size())
    x = torch.randn(100, dtype=torch.float64, requires_grad=True)
    assert largest_tensor(lambda: x.sum(), backward=False).largest_numel == 1
    assert largest_tensor(lambda: x.sum()).largest_numel == x.numel()  # x's gradient, made by backward


@pytest.mark.parametrize("loss", ["kl", "dkl", "ikl"])
def test_simplex_field_does_not_depend_on_the_temperature_for_a_given_teacher_distribution(loss):
    # the simplex dashboard's docstring: T moves the star (softmax(o_m / T)), not the arrows for a given star
    teacher = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    base = grads.simplex_field(teacher, loss=loss, temperature=1.0, resolution=6)
    for temperature in (0.5, 3.0):
        other = grads.simplex_field(teacher, loss=loss, temperature=temperature, resolution=6)
        assert (other[["dx", "dy"]] - base[["dx", "dy"]]).abs().to_numpy().max() < 1e-12
        assert other["dx"].abs().max() > 1e-3


# ----------------------------------------------------------------- notebook 02, section 5: curvature
@pytest.mark.parametrize("loss, settings", [
    ("kl", {}), ("dkl", {"alpha": 2.0, "beta": 0.5}), ("ikl", {"alpha": 1.5, "weight_temperature": 2.0}),
    ("gkl", {"gamma": 0.5, "weight_temperature": 3.0}),
])
def test_student_hessians_match_the_closed_forms_and_autograd_double_backward(loss, settings):
    teacher = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    student = torch.tensor([0.3, 1.2, -0.7, 0.0, 2.5], dtype=torch.float64)
    t = 1.7
    hessians = grads.student_hessians(teacher, student, loss=loss, temperature=t, **settings)
    alpha, beta = settings.get("alpha", 1.0), settings.get("beta", 1.0)
    s_n = torch.softmax(student / t, dim=0)
    cov = lambda q: torch.diag(q) - torch.outer(q, q)  # noqa: E731
    if loss == "kl":
        assert set(hessians) == {"kl"}
        assert torch.allclose(hessians["kl"], cov(s_n), rtol=1e-12, atol=1e-14)
    else:
        assert set(hessians) == {"wmse", "soft_ce"}
        assert torch.allclose(hessians["soft_ce"], beta * cov(s_n), rtol=1e-12, atol=1e-14)
        p = torch.softmax(teacher / settings.get("weight_temperature", t), dim=0) ** settings.get("gamma", 1.0)
        mass = p.sum()
        expected = {"dkl": torch.zeros(5, 5, dtype=torch.float64),
                    "ikl": alpha * (mass * torch.diag(p) - torch.outer(p, p)),
                    "gkl": alpha * (mass * torch.diag(p) - torch.outer(p, p)) / mass**2}[loss]  # GKL: / Σw = P²
        assert torch.allclose(hessians["wmse"], expected, rtol=1e-12, atol=1e-14)
    # an independent path: autograd's double backward through the analytic backward of the losses
    kw = grads._hparams_for(loss, temperature=t, alpha=alpha, beta=beta,
                            weight_temperature=settings.get("weight_temperature"), gamma=settings.get("gamma", 1.0))
    for term, hessian in hessians.items():
        ref = torch.autograd.functional.hessian(
            lambda x: dkl.loss_terms(loss, x[None], teacher[None], **kw)[term], student)
        assert torch.allclose(hessian, ref, rtol=1e-12, atol=1e-14), term


def test_margin_sweep_kl_saturates_and_ikl_wmse_is_a_quadratic():
    t, c, conf = 4.0, 10, 0.9
    margins = [0.0, 10.0, 20.0, 30.0, 40.0, 80.0]
    df = grads.margin_sweep(margins, num_classes=c, teacher_confidence=conf, temperature=t)
    col = lambda loss, term, what: df[(df.loss == loss) & (df.term == term)].set_index("margin")[what]  # noqa: E731
    # KL's gradient is IKL's soft-label CE one, at every margin
    assert (col("kl", "kl", "grad_norm") - col("ikl", "soft_ce", "grad_norm")).abs().max() < 1e-12
    # IKL's wMSE: constant curvature (the teacher's alone: the largest eigenvalue of diag(p) − p pᵀ) ...
    p = torch.full((c,), (1 - conf) / (c - 1), dtype=torch.float64)
    p[0] = conf
    top = float(torch.linalg.eigvalsh(torch.diag(p) - torch.outer(p, p)).max())
    assert (col("ikl", "wmse", "curvature") - top).abs().max() < 1e-12
    # ... and a gradient affine in the margin: its squared norm is a quadratic, so equal steps give
    # equal second differences of the squared norm
    sq = col("ikl", "wmse", "grad_norm") ** 2
    second = [sq[20.0] - 2 * sq[10.0] + sq[0.0], sq[40.0] - 2 * sq[30.0] + sq[20.0]]
    assert second[0] > 0 and abs(second[0] - second[1]) < 1e-9 * sq.max()
    # KL: curvature vanishes and the gradient saturates at T ‖e_1 − p‖ for a confidently wrong student
    kl_curv = col("kl", "kl", "curvature")
    assert kl_curv[80.0] < 1e-3 * kl_curv.max()
    e1 = torch.zeros(c, dtype=torch.float64)
    e1[1] = 1.0
    assert abs(col("kl", "kl", "grad_norm")[80.0] - t * float((e1 - p).norm())) < 1e-3


def test_margin_sweep_and_student_hessians_validate():
    with pytest.raises(ValueError, match="margins"):
        grads.margin_sweep([-1.0])
    with pytest.raises(ValueError, match="teacher_confidence"):
        grads.margin_sweep([1.0], num_classes=4, teacher_confidence=0.2)
    with pytest.raises(ValueError, match="same length"):
        grads.student_hessians([1.0, 0.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        grads.student_hessians([float("nan"), 0.0], [0.0, 0.0])  # checked eagerly, before torch.func


def test_profiling_refuses_bad_arguments_and_does_not_count_in_place_outputs():
    from dkl_lib import profiling
    from dkl_lib.profiling import TensorRecorder

    for kw, error in (({"repeats": True}, TypeError), ({"repeats": 2.5}, TypeError), ({"repeats": "3"}, TypeError),
                      ({"warmup": -2}, ValueError)):
        with pytest.raises(error, match="repeats|warmup"):
            profiling.median_seconds(lambda: None, **kw)
    with pytest.raises(TypeError, match="fn must be a function"):
        profiling.median_seconds(3.0)
    with pytest.raises(TypeError, match="must return a tensor that requires grad"):
        largest_tensor(lambda: 1.0)
    with pytest.raises(TypeError, match="a tensor without grad"):
        largest_tensor(lambda: torch.ones(3).sum())
    big = torch.randn(10 ** 5)
    with TensorRecorder() as rec:
        big.relu_()           # in place: no new tensor
        small = big[:10].exp()
    # counted: the view big[:10] (views are, as documented) and exp's result, not relu_'s 10**5 entries
    assert (rec.largest_numel, rec.total_bytes) == (10, 2 * small.numel() * small.element_size())
