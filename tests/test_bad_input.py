"""Every bad input raises a clear ValueError / TypeError that names the problem."""
import pytest
import torch

import dkl_lib as dkl

B, C = 4, 5
GOOD = torch.randn(B, C)
Y = torch.tensor([0, 1, 2, 3])
PRIOR = torch.full((C, C), 1.0 / C)


def call(name, logits=GOOD, target_logits=GOOD, targets=Y, **kw):
    return dkl.loss_terms(name, logits, target_logits, targets=targets, **kw)


DECOUPLED = ["kl", "dkl", "ikl", "gkl", "dkd"]

CASES = [
    # (description, kwargs for call, exception, message fragment)
    ("1-D logits", dict(logits=torch.randn(C), target_logits=torch.randn(C)), ValueError, "2-D"),
    ("3-D logits", dict(logits=torch.randn(2, B, C), target_logits=torch.randn(2, B, C)), ValueError, "2-D"),
    ("shape mismatch", dict(target_logits=torch.randn(B, C + 1)), ValueError, "same shape"),
    ("batch mismatch", dict(target_logits=torch.randn(B + 1, C)), ValueError, "same shape"),
    ("one class", dict(logits=torch.randn(B, 1), target_logits=torch.randn(B, 1)), ValueError, "C >= 2"),
    ("empty batch", dict(logits=torch.randn(0, C), target_logits=torch.randn(0, C)), ValueError, "empty"),
    ("nan logits", dict(logits=GOOD.clone().index_fill_(1, torch.tensor([2]), float("nan"))), ValueError,
     "non-finite"),
    ("inf target", dict(target_logits=GOOD.clone().index_fill_(0, torch.tensor([1]), float("inf"))),
     ValueError, "non-finite"),
    ("integer logits", dict(logits=torch.ones(B, C, dtype=torch.long)), TypeError, "floating-point"),
    ("numpy logits", dict(logits=GOOD.numpy()), TypeError, "torch.Tensor"),
    ("zero temperature", dict(temperature=0.0), ValueError, "temperature"),
    ("negative temperature", dict(temperature=-1.0), ValueError, "temperature"),
    ("nan temperature", dict(temperature=float("nan")), ValueError, "temperature"),
    ("string temperature", dict(temperature="4"), TypeError, "temperature"),
]


@pytest.mark.parametrize("name", DECOUPLED)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises(name, case):
    _, kwargs, exc, fragment = case
    with pytest.raises(exc, match=fragment):
        call(name, **kwargs)


@pytest.mark.parametrize("name", ["dkl", "ikl", "gkl", "dkd"])
@pytest.mark.parametrize("key", ["alpha", "beta"])
def test_negative_weights_raise(name, key):
    with pytest.raises(ValueError, match=key):
        call(name, **{key: -0.5})


TARGET_CASES = [
    ("target too large", torch.tensor([0, 1, 2, C]), ValueError, "out of range"),
    ("negative target", torch.tensor([0, -1, 2, 3]), ValueError, "out of range"),
    ("float targets", torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "integer"),
    ("wrong length", torch.tensor([0, 1, 2]), ValueError, "shape"),
    ("list targets", [0, 1, 2, 3], TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("name", ["dkd", "ikl_gi", "gkl_gi", "ikl", "gkl"])
@pytest.mark.parametrize("case", TARGET_CASES, ids=[c[0] for c in TARGET_CASES])
def test_bad_targets_raise(name, case):
    """Also for ikl and gkl without a class prior: targets that are given are checked."""
    _, targets, exc, fragment = case
    kw = dict(class_prior=PRIOR) if name.endswith("_gi") else {}
    with pytest.raises(exc, match=fragment):
        call(name.split("_")[0], targets=targets, **kw)


PRIOR_CASES = [
    ("wrong shape", torch.full((C, C + 1), 0.1), ValueError, "shape"),
    ("1-D prior", torch.full((C,), 0.2), ValueError, "shape"),
    ("negative row", PRIOR.clone().index_fill_(0, torch.tensor([3]), -0.2), ValueError, "negative"),
    ("zero row", PRIOR.clone().index_fill_(0, torch.tensor([1]), 0.0), ValueError, "sum to zero"),
    ("nan prior", PRIOR.clone().index_fill_(0, torch.tensor([0]), float("nan")), ValueError, "non-finite"),
    ("integer prior", torch.ones(C, C, dtype=torch.long), TypeError, "floating-point"),
]


@pytest.mark.parametrize("name", ["ikl", "gkl"])
@pytest.mark.parametrize("case", PRIOR_CASES, ids=[c[0] for c in PRIOR_CASES])
def test_bad_class_prior_raises(name, case):
    _, prior, exc, fragment = case
    with pytest.raises(exc, match=fragment):
        call(name, class_prior=prior)


HUGE = torch.randn(B, C, generator=torch.Generator().manual_seed(0)) * 1e4

# logits that overflow float32 when divided by the smallest temperatures a batch of B accepts (~1e-18)
GIANT = HUGE * 1e16
TEMPERATURE_CASES = [
    # float32: |logits| / T must stay below finfo.max / 4, T² / B must not underflow, (weight ·) T² finite
    ("logits over T overflow", dict(logits=GIANT, target_logits=GIANT, temperature=1e-18),
     "logits / temperature overflows"),
    ("target over T overflows", dict(target_logits=GIANT, temperature=1e-18), "target_logits / temperature overflows"),
    ("T squared underflows", dict(temperature=1e-20), r"temperature = 1e-20 is too small for torch.float32 "
     r"computation \(temperature² / batch size underflows to 0, and the loss with it\); use a value >= 2.17e-19"),
    ("1/T overflows too", dict(temperature=1e-39), "temperature² / batch size underflows"),
    ("T squared overflows", dict(temperature=1e20), "temperature² .*overflows"),
    ("T squared beyond Python floats", dict(temperature=1e200), "temperature² .*overflows"),
]


@pytest.mark.parametrize("name", DECOUPLED)
@pytest.mark.parametrize("case", TEMPERATURE_CASES, ids=[c[0] for c in TEMPERATURE_CASES])
def test_temperature_out_of_the_dtype_range_raises(name, case):
    _, kwargs, fragment = case
    with pytest.raises(ValueError, match=fragment):
        call(name, **kwargs)


def test_weight_temperature_out_of_the_dtype_range_raises():
    with pytest.raises(ValueError, match="target_logits / weight_temperature overflows"):
        dkl.ikl_loss(GOOD, HUGE, weight_temperature=1e-36)
    with pytest.raises(ValueError, match="1/weight_temperature overflows"):
        dkl.gkl_loss(GOOD, GOOD, weight_temperature=1e-39, gamma=2.0)
    with pytest.raises(ValueError, match="target_logits / temperature overflows"):
        dkl.wmse(GOOD, HUGE, temperature=1e-36)
    with pytest.raises(ValueError, match="term weight 8"):  # dkd's beta = 8 multiplies T²
        dkl.dkd_loss(GOOD, GOOD, Y, temperature=1e19)


@pytest.mark.parametrize("name", ["ikl", "gkl"])
def test_class_prior_without_targets_raises(name):
    with pytest.raises(ValueError, match="without targets"):
        call(name, targets=None, class_prior=PRIOR)


def test_other_hyper_parameters():
    with pytest.raises(ValueError, match="gamma"):
        dkl.gkl_loss(GOOD, GOOD, gamma=0.0)
    with pytest.raises(ValueError, match="weight_temperature"):
        dkl.ikl_loss(GOOD, GOOD, weight_temperature=-2.0)
    with pytest.raises(ValueError, match="dkd needs targets"):
        dkl.loss_terms("dkd", GOOD, GOOD)
    with pytest.raises(ValueError, match=r"dkd_loss needs targets: the \(B,\) class labels"):
        dkl.dkd_loss(GOOD, GOOD, None)
    with pytest.raises(ValueError, match="unknown loss"):
        dkl.loss_terms("kld", GOOD, GOOD)
    with pytest.raises(ValueError, match="weights must have shape"):
        dkl.wmse(GOOD, GOOD, weights=torch.ones(B, C + 1))
    with pytest.raises(ValueError, match="non-negative"):
        dkl.wmse_pairwise(GOOD, GOOD, weights=-torch.ones(B, C))


def test_hyper_parameters_are_keyword_only():
    with pytest.raises(TypeError):
        dkl.kl_loss(GOOD, GOOD, 4.0)
    with pytest.raises(TypeError):
        dkl.dkl_loss(GOOD, GOOD, 4.0, 1.0, 1.0)
    with pytest.raises(TypeError):
        dkl.dkd_loss(GOOD, GOOD, Y, 4.0)


# ------------------------------------------------------------------ checks found by mutation testing
@pytest.mark.parametrize("name,key", [(n, k) for n in DECOUPLED for k in ("temperature", "alpha", "beta")
                                      if n != "kl" or k == "temperature"])
def test_bool_hyper_parameters_are_refused(name, key):
    """True is an int in Python; a flag passed where a number belongs must not become 1.0."""
    with pytest.raises(TypeError, match=key):
        call(name, **{key: True})


@pytest.mark.parametrize("name", ["dkd", "ikl_gi", "gkl_gi"])
def test_bool_targets_are_refused(name):
    kw = dict(class_prior=PRIOR) if name.endswith("_gi") else {}
    with pytest.raises(TypeError, match="integer"):
        call(name.split("_")[0], targets=torch.tensor([True, False, True, False]), **kw)


@pytest.mark.parametrize("name", ["dkl", "ikl", "gkl"])
def test_beta_times_t_squared_overflow_raises_for_the_decoupled_losses(name):
    """soft_ce = −β T² ...: T² = 1e34 fits float32, β T² = 1e40 does not; refused, not an inf loss."""
    with pytest.raises(ValueError, match="term weight 1e\\+06"):
        call(name, temperature=1e17, beta=1e6)
    value = sum(call(name, temperature=1e17, beta=1.0).values())  # the same T with β = 1 is fine
    assert torch.isfinite(value)


def test_dkd_alpha_times_t_squared_overflow_raises():
    """DKD multiplies TCKD by α T² (and NCKD by β T²): the larger of the two weights counts."""
    with pytest.raises(ValueError, match="term weight 1e\\+06"):
        dkl.dkd_loss(GOOD, GOOD, Y, temperature=1e17, alpha=1e6, beta=0.0)
    with pytest.raises(ValueError, match="term weight 1e\\+06"):
        dkl.dkd_loss(GOOD, GOOD, Y, temperature=1e17, alpha=0.0, beta=1e6)


@pytest.mark.parametrize("name", DECOUPLED)
@pytest.mark.parametrize("side", ["logits", "target_logits"])
def test_large_negative_logits_over_t_are_refused_too(name, side):
    """max |x| counts the negative side: −1e40 overflows float32 as surely as +1e40."""
    negative = -(GIANT.abs() + 1e16)
    with pytest.raises(ValueError, match=f"{side} / temperature overflows"):
        call(name, **{side: negative}, temperature=1e-18)


@pytest.mark.parametrize("name", DECOUPLED)
@pytest.mark.parametrize("fraction", [0.9, 0.3])
def test_logits_over_t_limit_is_a_quarter_of_the_dtype_maximum(name, fraction):
    """|x| / T above finfo.max / 4 is refused: at ±0.9 max, log_softmax's x − max(x) would overflow to
    −inf and the loss to nan."""
    fmax = torch.finfo(torch.float32).max
    t = 1e-18
    x = (torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5]) * (fraction * fmax * t)).expand(B, C).contiguous()
    with pytest.raises(ValueError, match="logits / temperature overflows"):
        call(name, logits=x, temperature=t)


@pytest.mark.parametrize("name", ["ikl", "gkl"])
def test_weight_temperature_divides_only_the_target_logits(name):
    """T_w only scales o_m (the weights): huge logits with a tiny T_w are fine when o_m / T_w is."""
    logits = (torch.randn(B, C, generator=torch.Generator().manual_seed(1)) * 1e4).requires_grad_()
    value = sum(call(name, logits=logits, weight_temperature=1e-36).values())
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("fn", [dkl.wmse, dkl.wmse_pairwise])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_wmse_refuses_non_finite_weights(fn, bad):
    weights = torch.rand(B, C)
    weights[1, 2] = bad
    with pytest.raises(ValueError, match="finite"):
        fn(GOOD, GOOD, weights=weights)


# ----------------------------------------------- loss VALUES beyond float32 for finite, accepted logits
def _big_pair(magnitude, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(8, 10, generator=g, dtype=torch.float64) * magnitude
    b = torch.randn(8, 10, generator=g, dtype=torch.float64) * magnitude
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()


Y8 = torch.arange(8)
PRIOR10 = torch.full((10, 10), 0.1)
OVERFLOW_CASES = [
    # (loss, magnitude of the logits, kwargs, the term that overflows): before the check these
    # returned inf silently (and kl also an inf/nan gradient)
    ("ikl", 1e20, dict(temperature=1.0, class_prior=PRIOR10), "wmse"),
    ("ikl", 1e25, dict(temperature=1.0, weight_temperature=1e25), "wmse"),
    ("dkl", 1e20, dict(temperature=3e18), "wmse"),
    ("gkl", 1e20, dict(temperature=3e18, gamma=0.5), "wmse"),
    ("kl", 1e35, dict(temperature=1e4), "kl"),
    ("dkl", 1e35, dict(temperature=1e4), "soft_ce"),
    ("dkd", 1e35, dict(temperature=1e4), "nckd"),
]


@pytest.mark.parametrize("name,magnitude,kw,term", OVERFLOW_CASES,
                         ids=[f"{c[0]}-{c[1]:g}-{c[3]}" for c in OVERFLOW_CASES])
def test_loss_value_beyond_float32_raises_and_float64_gives_it(name, magnitude, kw, term):
    """Finite logits of ~1e19 and more pass the range checks, but the loss VALUE (the wMSE grows like
    max |o_m − o_n|², T² KL like T · max |o|) can exceed float32: a clear error naming the term and
    float64, never a silent inf. The same logits in float64 give a finite value and gradient."""
    logits, target_logits = _big_pair(magnitude)
    with pytest.raises(ValueError, match=f"{name}: the .*{term}.* overflow.*float64"):
        call(name, logits=logits, target_logits=target_logits, **{"targets": Y8, **kw})
    logits, target_logits = _big_pair(magnitude, torch.float64)
    value = sum(call(name, logits=logits, target_logits=target_logits, **{"targets": Y8, **kw}).values())
    grads = torch.autograd.grad(value, (logits, target_logits), allow_unused=True)
    assert torch.isfinite(value) and all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("fn", [dkl.wmse, dkl.wmse_pairwise])
def test_standalone_wmse_value_beyond_float32_raises(fn):
    logits, target_logits = _big_pair(1e20)
    with pytest.raises(ValueError, match="wmse.* overflows torch.float32"):
        fn(logits, target_logits, weights=torch.full((8, 10), 0.1))


@pytest.mark.parametrize("magnitude,temperature", [(1e19, 1.0), (1e25, 1e-4), (1e30, 1e4), (1e15, 1e14)])
def test_dkl_and_kl_gradients_agree_for_huge_float32_logits(magnitude, temperature):
    """Where the values fit in float32 (here s_m is one-hot, so the wMSE is ~0), nothing is refused
    and the theorem still holds: ∇ DKL = ∇ KL for both inputs, values finite."""
    logits, target_logits = _big_pair(magnitude)
    kl = dkl.kl_loss(logits, target_logits, temperature=temperature)
    dkl_value = dkl.dkl_loss(logits, target_logits, temperature=temperature)
    assert torch.isfinite(kl) and torch.isfinite(dkl_value)
    for g_kl, g_dkl in zip(torch.autograd.grad(kl, (logits, target_logits)),
                           torch.autograd.grad(dkl_value, (logits, target_logits))):
        assert torch.isfinite(g_dkl).all()
        torch.testing.assert_close(g_dkl, g_kl, rtol=1e-4, atol=1e-6 * float(g_kl.abs().max()))


@pytest.mark.parametrize("name", DECOUPLED)
@pytest.mark.parametrize("temperature", [1e-4, 1e4])
def test_temperature_extremes_give_finite_values_and_gradients(name, temperature):
    """T = 1e-4 (near one-hot softmax) and T = 1e4 (near uniform) on ordinary logits: finite."""
    logits, target_logits = _big_pair(5.0)
    value = sum(call(name, logits=logits, target_logits=target_logits, targets=Y8,
                     temperature=temperature).values())
    grads = torch.autograd.grad(value, (logits, target_logits), allow_unused=True)
    assert torch.isfinite(value) and all(g is None or torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------- data helpers (dkl_lib.data)
def _tensor_data(**change):
    from dkl_lib.data import TensorData, synthetic

    d = synthetic(n_train=8, n_test=4, num_classes=4)
    fields = dict(x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test, num_classes=4,
                  name="t", mean=(0.5,), std=(0.25,))
    fields.update(change)
    return TensorData(**fields)


_X8, _Y8 = torch.rand(8, 1, 4, 4), torch.arange(8) % 4
TENSOR_DATA_CASES = [
    # before: accepted silently, then "Target 13 is out of bounds" (IndexError) deep in training, a nan
    # loss, a wrong normalisation, or a TypeError/IndexError later in the run
    ("labels above num_classes", dict(y_train=_Y8 + 10), ValueError, "y_train out of range.*4 classes"),
    ("negative test labels", dict(y_test=torch.tensor([0, 1, -1, 2])), ValueError, "y_test out of range"),
    ("nan images", dict(x_train=torch.full((8, 1, 4, 4), float("nan"))), ValueError, "x_train contains non-finite"),
    ("empty train split", dict(x_train=_X8[:0], y_train=_Y8[:0]), ValueError, "x_train is empty"),
    ("num_classes as a string", dict(num_classes="4"), TypeError, "num_classes must be an integer"),
    ("num_classes 4.5", dict(num_classes=4.5), TypeError, "num_classes must be an integer"),
    ("num_classes None", dict(num_classes=None), TypeError, "num_classes must be an integer"),
    ("nan std", dict(std=(float("nan"),)), ValueError, "std must be finite"),
    ("nan mean", dict(mean=(float("nan"),)), ValueError, "mean must be finite"),
    ("mean as a string", dict(mean="0.5"), TypeError, "mean must be a sequence of numbers"),
    ("labels on another device", dict(y_test=torch.tensor([0, 1, 2, 3], device="meta")), ValueError,
     "x_test and y_test are on different devices"),
    ("test images on another device", dict(x_test=torch.rand(4, 1, 4, 4, device="meta"),
                                           y_test=torch.tensor([0, 1, 2, 3], device="meta")), ValueError,
     "x_train and x_test are on different devices"),
    ("augment not a dict", dict(augment="yes"), ValueError, "augment must be None or a dict"),
    ("augment with an unknown key", dict(augment={"pad": 4}), ValueError, "augment must be None or a dict"),
]


@pytest.mark.parametrize("change,exc,match", [c[1:] for c in TENSOR_DATA_CASES],
                         ids=[c[0] for c in TENSOR_DATA_CASES])
def test_tensor_data_refuses_bad_fields(change, exc, match):
    change = {"x_train": _X8, "y_train": _Y8, **change}
    change.setdefault("x_test", _X8[:4])
    with pytest.raises(exc, match=match):
        _tensor_data(**change)


SYNTHETIC_CASES = [
    # before: a TypeError about '<' between str and int, a randperm() signature dump, silently NaN
    # images (noise=nan), a truncated seed (1.7 ran as 0) or an empty (64, 0, 8, 8) image tensor
    (dict(n_train="5"), TypeError, "n_train must be an integer"),
    (dict(n_train=2.5), TypeError, "n_train must be an integer"),
    (dict(n_test=None), TypeError, "n_test must be an integer"),
    (dict(num_classes=None), TypeError, "num_classes must be an integer"),
    (dict(noise=float("nan")), ValueError, "noise must be a finite number >= 0"),
    (dict(noise=-1.0), ValueError, "noise must be a finite number >= 0"),
    (dict(seed="a"), TypeError, "seed must be an integer"),
    (dict(seed=1.7), TypeError, "seed must be an integer"),
    (dict(image_shape=(0, 8, 8)), ValueError, "image_shape entries must be >= 1"),
    (dict(image_shape=(1, -1, 8)), ValueError, "image_shape entries must be >= 1"),
    (dict(dtype=torch.int64), TypeError, "dtype must be a floating-point"),
]


@pytest.mark.parametrize("kw,exc,match", SYNTHETIC_CASES, ids=[repr(c[0]) for c in SYNTHETIC_CASES])
def test_synthetic_refuses_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        dkl.data.synthetic(**kw)


DIGITS_CASES = [
    # before: "invalid literal for int() with base 10: 'a'", n_train=100.7 and seed=1.7 silently
    # truncated, sklearn's "Seed must be between 0 and 2**32 - 1"
    (dict(seed="a"), TypeError, "seed must be an integer"),
    (dict(seed=1.7), TypeError, "seed must be an integer"),
    (dict(seed=-1), ValueError, "seed must lie in"),
    (dict(n_train="abc"), TypeError, "n_train must be an integer"),
    (dict(n_train=100.7), TypeError, "n_train must be an integer"),
    (dict(n_train=None), TypeError, "n_train must be an integer"),
    (dict(n_test=12.5), TypeError, "n_test must be an integer"),
    (dict(dtype=torch.int64), TypeError, "dtype must be a floating-point"),
]


@pytest.mark.parametrize("kw,exc,match", DIGITS_CASES, ids=[repr(c[0]) for c in DIGITS_CASES])
def test_digits_refuses_bad_arguments(kw, exc, match):
    pytest.importorskip("sklearn")
    with pytest.raises(exc, match=match):
        dkl.data.digits(**kw)


BATCHING_CASES = [
    # before: AttributeError "'list' object has no attribute 'shape'", numpy batches returned as if
    # fine, "tuple index out of range", batches of x and y from two devices, "'<' not supported"
    (lambda: list(dkl.data.batches([1, 2, 3], torch.arange(3), batch_size=2)), TypeError, "x must be a torch.Tensor"),
    (lambda: list(dkl.data.batches(torch.zeros(3).numpy(), torch.arange(3), batch_size=2)), TypeError,
     "x must be a torch.Tensor"),
    (lambda: list(dkl.data.batches(torch.zeros(3), [0, 1, 2], batch_size=2)), TypeError, "y must be a torch.Tensor"),
    (lambda: list(dkl.data.batches(torch.tensor(1.0), torch.tensor(1), batch_size=2)), ValueError,
     "x must have at least 1 dimension"),
    (lambda: list(dkl.data.batches(torch.zeros(3), torch.arange(3, device="meta"), batch_size=2)), ValueError,
     "different devices"),
    (lambda: list(dkl.data.batch_indices("3", batch_size=2)), TypeError, "n must be an integer"),
    (lambda: list(dkl.data.batch_indices(2.5, batch_size=2)), TypeError, "n must be an integer"),
    (lambda: dkl.data.augment_crop_flip(torch.zeros(2, 1, 8, 8).numpy()), TypeError, "x must be a torch.Tensor"),
    (lambda: dkl.data.augment_crop_flip(torch.zeros(2, 1, 8, 8), generator="x"), TypeError,
     "generator must be a torch.Generator"),
]


@pytest.mark.parametrize("fn,exc,match", BATCHING_CASES, ids=[f"case{i}" for i in range(len(BATCHING_CASES))])
def test_batching_helpers_refuse_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


# ----------------------------------------------------------- trainers and attacks: model versus data
def _linear(classes, side=4):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(side * side, classes))


def _squeezed_output():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1), torch.nn.Flatten(0))


_TRAIN = dict(epochs=1, batch_size=4, progress=False)
MODEL_MISMATCH_CASES = [
    # before: "Target 3 is out of bounds" (IndexError) from cross_entropy, a run that trained and
    # reported accuracies for a 10-output model on 4 classes, "mat1 and mat2 shapes cannot be
    # multiplied", or a CE error about class probabilities for a 1-D output
    ("teacher, 3 outputs", lambda d: dkl.train_teacher(_linear(3), d, **_TRAIN), "model must return logits of shape \\(B, 4\\)"),
    ("teacher, 10 outputs", lambda d: dkl.train_teacher(_linear(10), d, **_TRAIN), "model must return logits of shape \\(B, 4\\)"),
    ("teacher, 1-D output", lambda d: dkl.train_teacher(_squeezed_output(), d, **_TRAIN), "got shape \\(1,\\)"),
    ("teacher, wrong input size", lambda d: dkl.train_teacher(_linear(4, side=3), d, **_TRAIN),
     "model cannot take the data's images.*mat1 and mat2"),
    ("distill, teacher 5 outputs", lambda d: dkl.distill(_linear(4), _linear(5), d, **_TRAIN), "teacher must return"),
    ("distill, student 3 outputs", lambda d: dkl.distill(_linear(3), _linear(4), d, loss="ce", **_TRAIN),
     "model must return"),
    ("distill, teacher wrong input", lambda d: dkl.distill(_linear(4), _linear(4, side=3), d, **_TRAIN),
     "teacher cannot take the data's images"),
    ("adversarial, 3 outputs", lambda d: dkl.adversarial_train(_linear(3), d, epsilon=0.1, **_TRAIN),
     "model must return logits of shape \\(B, 4\\)"),
    ("adversarial, 10 outputs", lambda d: dkl.adversarial_train(_linear(10), d, epsilon=0.1, **_TRAIN),
     "model must return logits of shape \\(B, 4\\)"),
    ("evaluate, 3 outputs", lambda d: dkl.train.evaluate(_linear(3), d), "model must return"),
    ("predict_logits, 5 outputs", lambda d: dkl.train.predict_logits(_linear(5), d.x_test, d), "model must return"),
]


@pytest.mark.parametrize("fn,match", [c[1:] for c in MODEL_MISMATCH_CASES], ids=[c[0] for c in MODEL_MISMATCH_CASES])
def test_model_that_does_not_fit_the_data_is_named(fn, match):
    d = dkl.data.synthetic(n_train=8, n_test=4, num_classes=4, image_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=match):
        fn(d)


def test_fit_check_leaves_the_model_unchanged():
    """The once-per-run probe is an eval-mode forward without gradient: the mode, the BatchNorm
    statistics and the parameters' gradients are as before."""
    from dkl_lib.train import _check_fits

    d = dkl.data.synthetic(n_train=8, n_test=4, num_classes=4, image_shape=(1, 4, 4))
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _check_fits("model", model, d, normalize=True)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_callback_that_is_not_callable_is_refused_before_training():
    """Before: "'int' object is not callable" after the first epoch had trained."""
    d = dkl.data.synthetic(n_train=8, n_test=4, num_classes=4, image_shape=(1, 4, 4))
    with pytest.raises(TypeError, match="callback must be a function"):
        dkl.train_teacher(_linear(4), d, callback=5, **_TRAIN)


@pytest.mark.parametrize("kw,match", [
    (dict(epoch=1, epochs=0), "epochs must be a positive integer"),       # before: ZeroDivisionError
    (dict(epoch=-1, epochs=3), "epoch must be an integer in \\[1, epochs"),  # before: ε = -0.033
    (dict(epoch=4, epochs=3), "epoch must be an integer in \\[1, epochs"),   # before: ε = 1.33 ε
    (dict(epoch=1, epochs=3, epsilon=float("nan")), "epsilon must be finite"),
])
def test_epsilon_at_refuses_bad_epochs(kw, match):
    kw = {"epsilon": 0.1, **kw}
    with pytest.raises(ValueError, match=match):
        dkl.train.epsilon_at(kw.pop("epoch"), schedule="increasing", **kw)


_XA, _YA = torch.rand(8, 1, 4, 4), torch.arange(8) % 4
ATTACK_CASES = [
    # before: all-False results (labels beyond the model's classes), "range() arg 3 must not be zero",
    # "torch.cat(): expected a non-empty list", "tuple index out of range", numpy's "index 12 is out of
    # bounds for axis 1", 0.0 for NaN images, an empty DataFrame, broadcasting
    # a 1-channel image to 3 channels, "too many dimensions 'str'"
    ("clean_correct labels beyond the model", lambda: dkl.attacks.clean_correct(_linear(4), _XA, _YA + 10),
     ValueError, "y out of range"),
    ("clean_correct batch_size 0", lambda: dkl.attacks.clean_correct(_linear(4), _XA, _YA, batch_size=0),
     ValueError, "batch_size must be an integer >= 1"),
    ("predict batch_size -1", lambda: dkl.attacks.predict(_linear(4), _XA, batch_size=-1), ValueError,
     "batch_size must be an integer >= 1"),
    ("pgd 1-D model output", lambda: dkl.pgd(_squeezed_output(), _XA, _YA, epsilon=0.1), ValueError,
     "model must return logits of shape \\(B, classes\\)"),
    ("class_separation nan images", lambda: dkl.attacks.class_separation(_XA * float("nan"), _YA), ValueError,
     "x contains non-finite"),
    ("class_separation chunk 0", lambda: dkl.attacks.class_separation(_XA, _YA, chunk=0), ValueError,
     "chunk must be an integer >= 1"),
    ("accuracy_vs_epsilon no epsilons", lambda: dkl.attacks.accuracy_vs_epsilon(_linear(4), _XA, _YA, []),
     ValueError, "epsilons is empty"),
    ("Normalized channel mismatch", lambda: dkl.Normalized(_linear(4), [0.5] * 3, [0.2] * 3)(_XA), ValueError,
     "3 channel"),
    ("Normalized mean as a string", lambda: dkl.Normalized(_linear(4), "a", [1.0]), TypeError,
     "mean and std must be sequences of numbers"),
]


@pytest.mark.parametrize("fn,exc,match", [c[1:] for c in ATTACK_CASES], ids=[c[0] for c in ATTACK_CASES])
def test_attack_helpers_refuse_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_ensemble_refuses_labels_beyond_the_model_before_art():
    """Before: numpy's "index 12 is out of bounds for axis 1 with size 4" from inside ART."""
    pytest.importorskip("art")
    with pytest.raises(ValueError, match="y out of range"):
        dkl.attacks.ensemble_attack(_linear(4), _XA, _YA + 10, epsilon=0.1)


# ------------------------------------------------------------- analysis and gradient helpers
@pytest.mark.parametrize("kw,exc,match", [
    (dict(loss_specs=["foo"]), ValueError, "unknown loss 'foo'"),
    (dict(seeds="a"), ValueError, "seeds must be a non-empty list"),
    (dict(seeds=[]), ValueError, "seeds must be a non-empty list"),
    (dict(loss_specs=[]), ValueError, "losses is empty"),
    (dict(probe=5), TypeError, "probe must be a function"),
])
def test_probe_runs_checks_its_arguments_before_training_the_teacher(monkeypatch, tmp_path, kw, exc, match):
    """Before: the teacher trained first (minutes on the CPU), then the bad spec or seed failed."""
    from dkl_lib import analysis, experiments

    def no_teacher(*args, **kwargs):
        raise AssertionError("the arguments must be checked before the teacher is trained")

    monkeypatch.setattr(experiments, "get_teacher", no_teacher)
    args = {"loss_specs": ["kl"], "seeds": [0], **kw}
    with pytest.raises(exc, match=match):
        analysis.probe_runs(args.pop("loss_specs"), args.pop("seeds"), cache_dir=tmp_path, progress=False, **args)


@pytest.mark.parametrize("grid,exc,match", [
    ({"temperature": []}, ValueError, "grid\\['temperature'\\] is empty"),   # before: pandas' "No objects to concatenate"
    ({"temperature": 4.0}, TypeError, "grid\\['temperature'\\] must be a list"),
    ([("temperature", [4.0])], TypeError, "grid must be a dict"),
])
def test_sensitivity_refuses_a_malformed_grid(monkeypatch, grid, exc, match):
    from dkl_lib import analysis, experiments

    monkeypatch.setattr(experiments, "run_grid", lambda *a, **k: pytest.fail("no run may start"))
    with pytest.raises(exc, match=match):
        analysis.sensitivity("kl", grid, [0])


@pytest.mark.parametrize("fn,exc,match", [
    # before: torch's "The size of tensor a (3) must match ..." and "mat1 and mat2 shapes cannot be multiplied"
    (lambda: dkl.grads.relative_error(torch.ones(3), torch.ones(4)), ValueError, "value and reference must have the same shape"),
    (lambda: dkl.grads.relative_error(torch.ones(3).numpy(), torch.ones(3)), TypeError, "value must be a torch.Tensor"),
    (lambda: dkl.grads.simplex_xy(torch.rand(4, 4)), ValueError, "probs must be a float tensor of shape \\(N, 3\\)"),
])
def test_gradient_helpers_name_the_bad_argument(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


# ------------------------------------------------------------------------- ClassPrior state
@pytest.mark.parametrize("key,value,match", [
    # before: all accepted; a nan prior then made every IKL-GI loss refuse its class_prior at the next step
    ("prior", torch.full((4, 4), float("nan")), "state\\['prior'\\] must hold finite, non-negative"),
    ("prior", -torch.full((4, 4), 0.25), "state\\['prior'\\] must hold finite, non-negative"),
    ("prior", torch.zeros(4, 4), "state\\['prior'\\] has a row that sums to zero"),
    ("sums", torch.full((4, 4), float("inf")), "state\\['sums'\\] must hold finite"),
    ("counts", -torch.ones(4), "state\\['counts'\\] must hold finite, non-negative"),
    ("epochs", "3", "state\\['epochs'\\] must be a non-negative integer"),
    ("epochs", -1, "state\\['epochs'\\] must be a non-negative integer"),
])
def test_class_prior_refuses_a_corrupt_state(key, value, match):
    prior = dkl.ClassPrior(4)
    state = {**prior.state_dict(), key: value}
    with pytest.raises(ValueError, match=match):
        prior.load_state_dict(state)
    torch.testing.assert_close(prior.prior, torch.full((4, 4), 0.25))  # nothing changed


# ------------------------------------------------------------------- figures, widgets, experiments
def _images(n=4, channels=1):
    return torch.rand(n, channels, 8, 8)


PLOT_CASES = [
    # before: numpy's "zero-size array to reduction operation", "operands could not be broadcast",
    # "cannot reshape array", a ZeroDivisionError, or a figure drawn without complaint (nan ε, too few
    # class names, labels not matching the images)
    ("adversarial_examples n=0", lambda P: P.adversarial_examples(_images(), _images(), [0] * 4, [0] * 4, [0] * 4, n=0),
     "n must be >= 1"),
    ("adversarial_examples x/x_adv mismatch", lambda P: P.adversarial_examples(_images(), _images(2), [0] * 4, [0] * 4,
                                                                                 [0] * 4), "x and x_adv must have the same shape"),
    ("adversarial_examples 3 channels", lambda P: P.adversarial_examples(_images(4, 3), _images(4, 3), [0] * 4, [0] * 4,
                                                                          [0] * 4), "x must hold grey images"),
    ("adversarial_examples labels short", lambda P: P.adversarial_examples(_images(), _images(), [0] * 2, [0] * 4, [0] * 4),
     "y must hold one class per image"),
    ("adversarial_examples nan epsilon", lambda P: P.adversarial_examples(_images(), _images(), [0] * 4, [0] * 4, [0] * 4,
                                                                           epsilon=float("nan")), "epsilon must be a finite"),
    ("prior_heatmap cols=0", lambda P: P.prior_heatmap([torch.eye(3), torch.eye(3)], layout="grid", cols=0),
     "cols must be >= 1"),
    ("prior_heatmap class_names short", lambda P: P.prior_heatmap([torch.eye(3)], class_names=["a"]),
     "class_names must give one name per class"),
]


@pytest.mark.parametrize("fn,match", [c[1:] for c in PLOT_CASES], ids=[c[0] for c in PLOT_CASES])
def test_plots_refuse_bad_input(fn, match):
    pytest.importorskip("plotly")
    with pytest.raises(ValueError, match=match):
        fn(dkl.plots)


def test_learning_curves_refuses_zero_columns():
    pytest.importorskip("plotly")
    import pandas as pd

    histories = {("kl", 0): pd.DataFrame({"epoch": [1, 2], "test_acc": [50.0, 60.0]})}
    with pytest.raises(ValueError, match="cols must be >= 1"):  # before: ZeroDivisionError
        dkl.plots.learning_curves(histories, cols=0)


def test_widgets_name_a_bad_seed_and_preset():
    pytest.importorskip("ipywidgets")
    with pytest.raises(TypeError, match="seed must be an integer"):  # before: "manual_seed expected a long"
        dkl.widgets.weights_dashboard(seed="a")
    with pytest.raises(ValueError, match="unknown preset 'foo'"):  # before: traitlets' "Invalid selection"
        dkl.widgets.training_dashboard(preset="foo")


@pytest.mark.parametrize("fn,exc,match", [
    # before: "list indices must be integers or slices, not str" and "dictionary update sequence element #0"
    (lambda E: E.summarize([]), ValueError, "runs must be a DataFrame with the columns"),
    (lambda E: E.load_data("digits"), TypeError, "spec must be a dict"),
])
def test_experiment_helpers_name_the_bad_argument(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn(dkl.experiments)


# ------------------------------------------------------- second look (session 8): plots, configs, batches
def test_plots_refuse_nan_priors_and_empty_tables():
    """A NaN class prior was drawn as a blank heatmap and an empty dict as an empty figure, without a word."""
    from dkl_lib import plots

    priors = torch.full((3, 4, 4), 0.25)
    priors[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(nan or inf\) in snapshots \[1\]"):
        plots.prior_heatmap(priors)
    plots.prior_heatmap(torch.full((3, 4, 4), 0.25))  # the same without the nan draws
    for draw, name in ((plots.drift_lines, "drifts"), (plots.reliability_diagram, "tables")):
        with pytest.raises(ValueError, match=f"{name} is empty: nothing to draw"):
            draw({})
        with pytest.raises(TypeError, match=f"{name} must be a dict"):
            draw(None)


def test_load_config_names_a_path_that_is_no_path_and_batches_take_numpy_integers():
    import numpy as np

    from dkl_lib import configs, data

    with pytest.raises(TypeError, match="path must be the config file's path"):
        configs.load_config(None)
    batches = list(data.batch_indices(10, batch_size=np.int64(4)))  # as the trainers take it
    assert [len(b) for b in batches] == [4, 4, 2]
    with pytest.raises(TypeError, match="batch_size must be an integer"):
        list(data.batch_indices(10, batch_size=2.5))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(data.batch_indices(10, batch_size=0))
