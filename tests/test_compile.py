"""The losses and the class prior under ``torch.compile``: one graph (fullgraph=True), the eager
values and gradients, and the checks that need no tensor values still raise.

Most tests trace with the "aot_eager" backend (dynamo + AOTAutograd, which is where a loss can fail
to compile, without a C++ build); one trains a few steps with the default inductor backend.
"""
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import dkl_lib as dkl
from conftest import random_pair


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: a cache filled by another test (or its recompile limit,
    beyond which dynamo silently runs the function eagerly) must not decide the outcome here.

    Afterwards denormal floats are turned back on: on torch 2.4, loading the first inductor-compiled
    CPU kernel turns on flush-to-zero for the whole process (seen in `make test-min`: a later float64
    test of tiny class priors then read sums of 0), which torch 2.14 no longer does."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_flush_denormal(False)


def compiled(fn):
    """``fn`` compiled as one graph, and the counter that proves a graph was built."""
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def prior_for(classes, seed=0):
    rows = torch.rand(classes, classes, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return rows / rows.sum(dim=1, keepdim=True)


CASES = {
    "kl": lambda a, b, y, prior: dkl.kl_loss(a, b, temperature=4.0),
    "dkl": lambda a, b, y, prior: dkl.dkl_loss(a, b, temperature=4.0, alpha=2.0, beta=0.5),
    "ikl": lambda a, b, y, prior: dkl.ikl_loss(a, b, temperature=4.0, weight_temperature=2.0),
    "ikl-gi": lambda a, b, y, prior: dkl.ikl_loss(a, b, temperature=4.0, targets=y, class_prior=prior.to(a.dtype)),
    "gkl": lambda a, b, y, prior: dkl.gkl_loss(a, b, temperature=4.0, gamma=0.5),
    "gkl-gi": lambda a, b, y, prior: dkl.gkl_loss(a, b, temperature=4.0, gamma=0.5, targets=y,
                                                  class_prior=prior.to(a.dtype)),
    "dkd": lambda a, b, y, prior: dkl.dkd_loss(a, b, y, temperature=4.0, alpha=1.0, beta=8.0),
    "loss_terms-ikl": lambda a, b, y, prior: sum(dkl.loss_terms("ikl", a, b, targets=y, temperature=4.0).values()),
    "wmse": lambda a, b, y, prior: dkl.losses.wmse(a, b, weights=prior.to(a.dtype)[y]),
    "wmse_pairwise": lambda a, b, y, prior: dkl.losses.wmse_pairwise(a, b, temperature=2.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_loss_compiles_as_one_graph_with_the_eager_value_and_gradients(case, dtype):
    batch, classes = 6, 7
    a, b = random_pair(batch, classes, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(2))
    prior = prior_for(classes)
    fn = CASES[case]
    eager = fn(a, b, y, prior)
    eager_grads = torch.autograd.grad(eager, (a, b), allow_unused=True)
    fast, counter = compiled(fn)
    value = fast(a, b, y, prior)
    grads = torch.autograd.grad(value, (a, b), allow_unused=True)
    assert counter.frame_count == 1  # traced (not silently run eagerly), as a single graph
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert value.dtype == eager.dtype
    assert torch.allclose(value, eager, rtol=tol, atol=tol), (case, value.item(), eager.item())
    for mine, ref in zip(grads, eager_grads):
        assert (mine is None) == (ref is None)
        if ref is not None:
            assert torch.allclose(mine, ref, rtol=tol, atol=tol), (case, (mine - ref).abs().max().item())


def test_compiled_decoupled_loss_keeps_the_asymmetry_of_dkl_and_ikl():
    """A frozen teacher: DKL's compiled gradient on the student is the soft-CE one alone, IKL's adds
    the wMSE (the stop-gradient survives tracing)."""
    a, b = random_pair(5, 6, generator=torch.Generator().manual_seed(3))
    b = b.detach()
    for name, with_wmse in (("dkl", False), ("ikl", True)):
        terms, _ = compiled(lambda x, t: dkl.loss_terms(name, x, t, temperature=2.0))
        parts = terms(a, b)
        wmse_grad, = torch.autograd.grad(parts["wmse"], a, allow_unused=True, retain_graph=True)
        ce_grad, = torch.autograd.grad(parts["soft_ce"], a)
        expected_ce = 2.0 * (torch.softmax(a / 2.0, 1) - torch.softmax(b / 2.0, 1)) / 5
        assert torch.allclose(ce_grad, expected_ce, rtol=1e-12, atol=1e-14)
        if with_wmse:
            assert wmse_grad is not None and wmse_grad.abs().max() > 1e-3
        else:
            assert wmse_grad is None or wmse_grad.abs().max() == 0


@pytest.mark.parametrize("bad, error, message", [
    (lambda a, b, y: dkl.ikl_loss(a, b[:, :-1]), ValueError, "same shape"),
    (lambda a, b, y: dkl.ikl_loss(a, b, temperature=-1.0), ValueError, "temperature must be > 0"),
    (lambda a, b, y: dkl.ikl_loss(a, b, targets=y, class_prior=torch.ones(3, 3, dtype=a.dtype)), ValueError,
     "class_prior must have shape"),
    (lambda a, b, y: dkl.dkd_loss(a, b, y.float()), TypeError, "integer class indices"),
    (lambda a, b, y: dkl.kl_loss(a, b.int()), TypeError, "floating-point"),
])
def test_checks_that_read_no_tensor_values_still_raise_under_compile(bad, error, message):
    a, b = random_pair(4, 5, generator=torch.Generator().manual_seed(4))
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(error, match=message):
        torch.compile(bad, backend="aot_eager")(a, b, y)


def test_value_checks_are_eager_only_and_documented():
    """The checks that read tensor values (here: a nan logit) raise eagerly; a compiled call skips
    them (no device sync in a compiled step), as dkl_lib._checks.tracing documents."""
    a, b = random_pair(4, 5, generator=torch.Generator().manual_seed(5))
    a = a.detach().clone()
    a[0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        dkl.ikl_loss(a, b)
    fast, counter = compiled(lambda x, t: dkl.ikl_loss(x, t))
    assert torch.isnan(fast(a, b))
    assert counter.frame_count == 1
    assert "torch.compile" in dkl.losses.__doc__ and "skipped" in dkl._checks.tracing.__doc__


def test_registered_loss_compiles_inside_loss_terms():
    def half_kl(logits, target_logits, *, targets, class_prior, temperature):
        return {"half": 0.5 * dkl.kl_loss(logits, target_logits, temperature=temperature)}

    a, b = random_pair(4, 5, generator=torch.Generator().manual_seed(6))
    with dkl.custom_loss("half-kl-compiled", half_kl):
        fast, counter = compiled(lambda x, t: dkl.loss_terms("half-kl-compiled", x, t, temperature=3.0)["half"])
        value = fast(a, b)
        assert counter.frame_count == 1
        assert torch.allclose(value, 0.5 * dkl.kl_loss(a, b, temperature=3.0), rtol=1e-12, atol=0)


def _train_steps(step, model, optimizer, prior, batches):
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        step(model, prior, x, y).backward()
        optimizer.step()
        prior.end_epoch()  # a new prior every step: the compiled step must read the current one
    return [p.detach().clone() for p in model.parameters()]


def test_a_compiled_ikl_training_step_with_class_prior_matches_eager_under_inductor():
    """The way a user compiles their own step: student forward, frozen teacher, IKL with the GI
    prior updated from the teacher's outputs; inductor (C++ code generation), float32."""
    gen = torch.Generator().manual_seed(7)
    teacher = torch.nn.Linear(12, 5).requires_grad_(False)
    batches = [(torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(3)]

    def step(model, prior, x, y):
        teacher_logits = teacher(x)
        prior.update(teacher_logits, y, weight_temperature=4.0)
        terms = dkl.loss_terms("ikl", model(x), teacher_logits, targets=y, temperature=4.0,
                               class_prior=prior.prior)
        return torch.nn.functional.cross_entropy(model(x), y) + sum(terms.values())

    results = []
    for fn in (step, torch.compile(step)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        prior = dkl.ClassPrior(5)
        results.append((_train_steps(fn, model, optimizer, prior, batches), prior.prior.clone()))
    (eager_params, eager_prior), (fast_params, fast_prior) = results
    assert torch.allclose(fast_prior, eager_prior, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(eager_prior, torch.full((5, 5), 0.2), atol=1e-3)  # the prior did change
    for mine, ref in zip(fast_params, eager_params):
        assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-5)


def test_class_prior_update_compiles_as_one_graph_and_sums_as_eagerly():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(10, 4, generator=gen)
    labels = torch.randint(0, 4, (10,), generator=gen)
    eager, fast_prior = dkl.ClassPrior(4), dkl.ClassPrior(4)
    eager.update(logits, labels, weight_temperature=2.0)
    update, counter = compiled(lambda p, x, y: p.update(x, y, weight_temperature=2.0))
    update(fast_prior, logits, labels)
    assert counter.frame_count == 1
    assert torch.equal(fast_prior.counts, eager.counts)
    assert torch.allclose(fast_prior.end_epoch(), eager.end_epoch(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ trainers with a compiled model
def _digits_like():
    data = dkl.data.synthetic(n_train=96, n_test=48, num_classes=4, image_shape=(1, 8, 8), seed=0)
    make = lambda seed: dkl.models.build_model("small_cnn", 4, seed=seed, in_channels=1, width=8)  # noqa: E731
    return data, make


def test_unwrap_model_reaches_the_module_inside_compile_and_parallel_wrappers():
    model = torch.nn.Linear(3, 2)
    assert dkl.distributed.unwrap_model(torch.compile(model)) is model
    assert dkl.distributed.unwrap_model(torch.compile(torch.nn.DataParallel(model))) is model
    assert dkl.distributed.unwrap_model(torch.nn.DataParallel(torch.compile(model))) is model
    assert dkl.distributed.unwrap_model(model) is model


def test_distill_takes_a_compiled_student_and_its_checkpoints_resume_either_way(tmp_path):
    """A torch.compile'd student trains as the plain one (same history), its checkpoints hold the
    plain parameter names (no ``_orig_mod.``), and a run stopped compiled resumes uncompiled and
    the other way round, ending where the uninterrupted run ends."""
    data, make = _digits_like()
    teacher = make(0)
    dkl.train.train_teacher(teacher, data, epochs=2, progress=False)
    settings = dict(loss="ikl", gi=True, epochs=4, progress=False)
    plain = dkl.train.distill(make(1), teacher, data, **settings)
    fast = dkl.train.distill(torch.compile(make(1), backend="aot_eager"), teacher, data, **settings)
    for mine, ref in zip(fast.history, plain.history):
        assert mine["test_acc"] == ref["test_acc"]
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for first, second in ((True, False), (False, True)):
        folder = tmp_path / f"from_{'compiled' if first else 'plain'}"
        wrap = lambda m, on: torch.compile(m, backend="aot_eager") if on else m  # noqa: E731
        stopped = dkl.train.distill(wrap(make(1), first), teacher, data, checkpoint_dir=folder,
                                    callback=lambda history: len(history) < 2, **settings)
        assert stopped.epochs_run == 2
        saved = torch.load(folder / "checkpoint-000002.pt", weights_only=False)["model"]
        assert set(saved) == set(make(1).state_dict())  # plain names
        resumed = dkl.train.distill(wrap(make(1), second), teacher, data, checkpoint_dir=folder, **settings)
        assert resumed.resumed_from == 2
        assert [h["test_acc"] for h in resumed.history] == [h["test_acc"] for h in plain.history]
        assert resumed.history[-1]["loss"] == pytest.approx(plain.history[-1]["loss"], rel=1e-5)


def test_adversarial_train_takes_a_compiled_model_with_awp_and_weight_average():
    data, make = _digits_like()
    settings = dict(loss="ikl", epsilon=0.1, epochs=2, attack_steps=2, awp_gamma=0.005, awp_warmup=1,
                    weight_average=0.9, weight_average_from=1, eval_samples=16, progress=False)
    normalized = lambda: dkl.attacks.Normalized(make(1), data.mean, data.std)  # noqa: E731
    plain = dkl.train.adversarial_train(normalized(), data, **settings)
    fast = dkl.train.adversarial_train(torch.compile(normalized(), backend="aot_eager"), data, **settings)
    for mine, ref in zip(fast.history, plain.history):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert mine["test_acc"] == ref["test_acc"]


def test_adversarial_train_with_weight_average_resumes_between_compiled_and_plain(tmp_path):
    """The weight average is a copy of the model it was given, so with a torch.compile'd model its
    state_dict has '_orig_mod.' names; the checkpoint must hold the plain names for it too, or a run
    stopped compiled cannot resume uncompiled (and back)."""
    data, make = _digits_like()
    settings = dict(loss="ce", epsilon=0.1, epochs=2, weight_average=0.9, weight_average_from=1,
                    eval_samples=0, progress=False)
    normalized = lambda: dkl.attacks.Normalized(make(1), data.mean, data.std)  # noqa: E731
    wrap = lambda m, on: torch.compile(m, backend="aot_eager") if on else m  # noqa: E731
    plain = dkl.train.adversarial_train(normalized(), data, **settings)
    for first, second in ((True, False), (False, True)):
        folder = tmp_path / f"from_{'compiled' if first else 'plain'}"
        stopped = dkl.train.adversarial_train(wrap(normalized(), first), data, checkpoint_dir=folder,
                                              callback=lambda history: len(history) < 1, **settings)
        assert len(stopped.history) == 1
        saved = torch.load(folder / "checkpoint-000001.pt", weights_only=False)
        assert set(saved["extra"]["weight_average"]) == set(normalized().state_dict())  # plain names
        resumed = dkl.train.adversarial_train(wrap(normalized(), second), data, checkpoint_dir=folder, **settings)
        assert resumed.resumed_from == 1
        assert [h["test_acc"] for h in resumed.history] == [h["test_acc"] for h in plain.history]
        assert resumed.history[-1]["loss"] == pytest.approx(plain.history[-1]["loss"], rel=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_loss_compiles_as_one_graph_with_dynamic_shapes(case):
    """dynamic=True (symbolic batch sizes, as for a batch size that varies): the
    hyper-parameters then arrive as symbolic floats and the class count as a symbolic int, which the
    host-side checks must handle in ways dynamo traces (comparisons, not math.isfinite / math.log)."""
    classes = 7
    prior = prior_for(classes)
    fn = CASES[case]
    counter = CompileCounterWithBackend("aot_eager")
    fast = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for batch in (6, 5, 9):
        a, b = random_pair(batch, classes, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
        y = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(batch + 1))
        value, eager = fast(a, b, y, prior), fn(a, b, y, prior)
        assert torch.allclose(value, eager, rtol=1e-12, atol=1e-12), (case, batch)
        for mine, ref in zip(torch.autograd.grad(value, (a, b), allow_unused=True),
                             torch.autograd.grad(eager, (a, b), allow_unused=True)):
            assert (mine is None) == (ref is None)
            assert ref is None or torch.allclose(mine, ref, rtol=1e-12, atol=1e-12), (case, batch)
    assert 1 <= counter.frame_count <= 3  # traced, not run eagerly


@pytest.mark.parametrize("case", ["gkl", "gkl-gi"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_gkl_rescales_its_weights_while_traced(case, dynamic):
    """Eagerly, GKL skips the rescaling of its weights where the bounds of p promise no underflow (1/C for
    softmax weights, the checked prior's smallest row maximum); while traced it reads no such bound (C
    may be symbolic, the prior's values are not read), so the graph rescales (amax) as it always did, with
    static and with dynamic shapes, and gives the eager value."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return gm.forward

    classes, batch = 7, 6
    a, b = random_pair(batch, classes, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(4))
    prior = prior_for(classes)
    fn = CASES[case]
    value = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)(a, b, y, prior)
    assert len(graphs) == 1 and any("amax" in target for target in graphs[0]), graphs
    assert torch.allclose(value, fn(a, b, y, prior), rtol=1e-12, atol=0)
