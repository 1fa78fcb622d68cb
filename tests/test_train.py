"""dkl_lib.train: distillation loop, the KL ≡ DKL theorem in training, determinism, stop/interrupt."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import dkl_lib as dkl
from dkl_lib import data as D
from dkl_lib import models as M
from dkl_lib import train as T
from dkl_lib.losses import loss_terms
from dkl_lib.prior import ClassPrior

FAST = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=16, progress=False, device="cpu")


def tiny_data(dtype=torch.float32, **kw):
    args = dict(n_train=62, n_test=40, num_classes=4, image_shape=(1, 6, 6), noise=0.35, seed=0, dtype=dtype)
    args.update(kw)
    return D.synthetic(**args)


@pytest.fixture(scope="module")
def teacher64():
    """A small float64 CNN teacher trained for a few epochs on the tiny data."""
    d = tiny_data(torch.float64)
    t = M.build_model("small_cnn", 4, seed=0, width=4).double()
    res = T.train_teacher(t, d, epochs=3, seed=0, **FAST)
    assert res.best_acc > 50.0  # it learned something (4 classes: chance is 25 %)
    return t


def student64(seed=1):
    return M.build_model("mlp", 4, seed=seed, in_shape=(1, 6, 6), hidden=(8,)).double()


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ------------------------------------------------------------------------------------------ device
def test_select_device():
    assert T.select_device("cpu") == torch.device("cpu")
    assert T.select_device(torch.device("cpu")).type == "cpu"
    assert T.select_device().type in ("cuda", "mps", "cpu")
    assert T.select_device("auto") == T.select_device()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            T.select_device("cuda")
        assert T.select_device().type in ("mps", "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        T.select_device("tpu9")


# ------------------------------------------------------------------------------- the theorem, live
def test_kl_and_dkl_give_the_same_trajectory_and_ikl_does_not(teacher64):
    """α = β = 1: DKL's student gradient equals KL's, so float64 training follows one trajectory."""
    d = tiny_data(torch.float64)
    common = dict(epochs=4, temperature=4.0, warmup_epochs=2, seed=3, **FAST)
    runs = {}
    for loss in ("kl", "dkl", "ikl"):
        s = student64()
        runs[loss] = (T.distill(s, teacher64, d, loss=loss, alpha=None if loss == "kl" else 1.0,
                                beta=None if loss == "kl" else 1.0, **common), s)
    kl, dkl_ = runs["kl"][0].history, runs["dkl"][0].history
    assert [h["test_acc"] for h in kl] == [h["test_acc"] for h in dkl_]
    assert [h["train_acc"] for h in kl] == [h["train_acc"] for h in dkl_]
    for a, b in zip(kl, dkl_):
        assert abs(a["ce"] - b["ce"]) < 1e-6
    assert (params(runs["kl"][1]) - params(runs["dkl"][1])).abs().max() < 1e-6
    # the KD terms differ in value (DKL's wMSE carries no student gradient), not in effect
    assert set(kl[0]) >= {"kl"} and set(dkl_[0]) >= {"wmse", "soft_ce"}
    ikl_params = params(runs["ikl"][1])
    assert (ikl_params - params(runs["kl"][1])).abs().max() > 1e-4
    assert any(abs(a["ce"] - b["ce"]) > 1e-6 for a, b in zip(kl, runs["ikl"][0].history))


def test_same_seed_same_run_other_seed_other_run():
    d = tiny_data()
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)

    def run(seed):
        s = M.build_model("mlp", 4, seed=seed, in_shape=(1, 6, 6), hidden=(8,))
        r = T.distill(s, teacher, d, loss="ikl", gi=True, epochs=2, seed=seed, **FAST)
        return [{k: v for k, v in h.items() if k != "seconds"} for h in r.history], params(s)

    h1, p1 = run(0)
    h2, p2 = run(0)
    h3, p3 = run(1)
    assert h1 == h2 and torch.equal(p1, p2)
    assert not torch.equal(p1, p3)


# ----------------------------------------------------------------------------------------- history
@pytest.mark.parametrize("loss,terms", [("ce", set()), ("kl", {"kl"}), ("dkl", {"wmse", "soft_ce"}),
                                        ("gkl", {"wmse", "soft_ce"}), ("dkd", {"tckd", "nckd"})])
def test_history_has_every_named_term(loss, terms):
    d = tiny_data()
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)
    s = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
    r = T.distill(s, teacher, d, loss=loss, epochs=2, seed=0, **FAST)
    base = {"epoch", "lr", "kd_factor", "loss", "ce", "train_acc", "test_acc", "seconds"}
    assert set(r.history[0]) == base | terms
    assert [h["epoch"] for h in r.history] == [1, 2]
    assert all(0.0 <= h["test_acc"] <= 100.0 and h["seconds"] > 0 for h in r.history)
    assert r.best_acc == max(h["test_acc"] for h in r.history) and r.last_acc == r.history[-1]["test_acc"]
    assert r.best_epoch in (1, 2) and r.stopped is None
    assert [h["kd_factor"] for h in r.history] == [0.0 if loss == "ce" else 1.0] * 2  # ce: no KD term to weigh
    if loss != "ce":  # the total is CE + KD (no warm-up here)
        h = r.history[0]
        assert math.isclose(h["loss"], h["ce"] + sum(h[t] for t in terms), rel_tol=1e-5)
    assert r.teacher_acc is not None and 0.0 <= r.teacher_acc <= 100.0
    assert list(r.frame().columns) == list(r.history[0])


def test_best_epoch_is_the_first_of_the_highest_test_accuracy():
    accs = [40.0, 70.0, 55.0, 70.0, 60.0]
    r = T.TrainResult(model=None, history=[{"epoch": e, "test_acc": a} for e, a in enumerate(accs, 1)], config={})
    assert r.best_acc == max(accs) and r.last_acc == accs[-1]
    assert r.best_epoch == accs.index(max(accs)) + 1  # epoch 2, not the tie at epoch 4
    empty = T.TrainResult(model=None, history=[], config={})
    assert empty.best_epoch is None and math.isnan(empty.best_acc) and math.isnan(empty.last_acc)


def test_warmup_and_learning_rate_schedule():
    d = tiny_data()
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)
    s = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
    r = T.distill(s, teacher, d, loss="kl", epochs=4, warmup_epochs=3, milestones=[2, 3], lr_decay=0.1,
                  kd_weight=2.0, seed=0, **{k: v for k, v in FAST.items() if k != "lr"}, lr=0.1)
    assert [round(h["kd_factor"], 6) for h in r.history] == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 1.0]
    assert [round(h["lr"], 8) for h in r.history] == [0.1, 0.1, 0.01, 0.001]
    h = r.history[0]
    assert math.isclose(h["loss"], h["ce"] + 2.0 * h["kd_factor"] * h["kl"], rel_tol=1e-5)


@pytest.mark.parametrize("augment", [None, {"padding": 1, "flip": True}])
def test_teacher_is_frozen_and_restored(augment):
    """Both teacher paths: logits computed once (no augmentation) and per augmented batch, where a
    teacher left in train mode would update its BatchNorm statistics."""
    d = tiny_data(augment=augment)
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
    T.distill(s, teacher, d, loss="ikl", epochs=1, seed=0, **FAST)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # no step, and BN running stats untouched (eval mode)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_augmented_data_runs_the_teacher_per_batch():
    d = tiny_data(augment={"padding": 1, "flip": True})
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)
    s1 = M.build_model("small_cnn", 4, seed=1, width=2)
    s2 = M.build_model("small_cnn", 4, seed=1, width=2)
    r1 = T.distill(s1, teacher, d, loss="dkd", epochs=1, seed=0, **FAST)
    r2 = T.distill(s2, teacher, d, loss="dkd", epochs=1, seed=0, **FAST)
    assert r1.history[0]["loss"] == r2.history[0]["loss"]  # the augmentation follows the seed
    plain = M.build_model("small_cnn", 4, seed=1, width=2)
    r3 = T.distill(plain, teacher, tiny_data(), loss="dkd", epochs=1, seed=0, **FAST)
    assert r3.history[0]["loss"] != r1.history[0]["loss"]


# ----------------------------------------------------------------------------------------------- GI
def test_gi_prior_is_the_teacher_class_mean_from_the_next_epoch():
    d = tiny_data()
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)
    gi = ClassPrior(4)
    seen = []
    s = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
    r = T.distill(s, teacher, d, loss="ikl", gi=True, weight_temperature=2.0, epochs=2, seed=0,
                  class_prior=gi, callback=lambda h: seen.append(gi.prior.clone()), **FAST)
    assert len(r.priors) == 3 and torch.equal(r.priors[0], torch.full((4, 4), 0.25))
    with torch.no_grad():
        teacher.eval()
        logits = teacher(d.normalize(d.x_train)).double()
    probs = torch.softmax(logits / 2.0, dim=1)
    want = torch.stack([probs[d.y_train == y].mean(0) for y in range(4)]).float()
    assert torch.allclose(r.priors[1], want, atol=1e-5)  # every training sample, once
    assert torch.allclose(r.priors[2], want, atol=1e-5)  # frozen teacher, no augmentation
    assert torch.equal(seen[0], r.priors[1])
    with pytest.raises(ValueError, match="ikl and gkl only"):
        T.distill(s, teacher, d, loss="kl", gi=True, epochs=1, **FAST)


def _distill_with_epoch_starts(teacher, d, **kw):
    """A fresh student64 distilled for 2 epochs of one batch each; returns the result and, per epoch, the
    student's logits on the training set as they were when the epoch began (what that epoch's terms are of)."""
    s = student64()
    states = [copy.deepcopy(s.state_dict())]
    r = T.distill(s, teacher, d, epochs=2, seed=0, callback=lambda h: states.append(copy.deepcopy(s.state_dict())),
                  **{**FAST, "batch_size": d.n_train}, **kw)
    starts = []
    for state in states[:len(r.history)]:
        start = student64()
        start.load_state_dict(state)
        starts.append(T.predict_logits(start, d.x_train, d))
    return r, starts


def test_gi_prior_weights_the_wmse_from_the_next_epoch(teacher64):
    """One batch per epoch: each epoch's wMSE is ikl's wMSE of the student's logits at the start of
    the epoch with class_prior = the prior of the previous epochs (uniform in epoch 1), not the
    sample-wise weights softmax(teacher / T_w)."""
    d = tiny_data(torch.float64)
    kw = dict(temperature=4.0, weight_temperature=0.5, alpha=1.0, beta=1.0)
    r, starts = _distill_with_epoch_starts(teacher64, d, loss="ikl", gi=True, **kw)
    t_logits = T.predict_logits(teacher64, d.x_train, d)
    for epoch, (row, logits) in enumerate(zip(r.history, starts)):
        want = dkl.ikl_terms(logits, t_logits, targets=d.y_train, class_prior=r.priors[epoch].double(), **kw)
        sample_wise = dkl.ikl_terms(logits, t_logits, **kw)
        assert math.isclose(row["wmse"], want["wmse"].item(), rel_tol=1e-9)
        assert math.isclose(row["soft_ce"], want["soft_ce"].item(), rel_tol=1e-9)
        assert not math.isclose(row["wmse"], sample_wise["wmse"].item(), rel_tol=1e-3)  # GI matters here


@pytest.mark.parametrize("loss,gi,kw", [
    ("dkl", False, dict(alpha=2.0, beta=0.5)),
    ("ikl", False, dict(alpha=2.0, beta=0.5, weight_temperature=1.5)),
    ("gkl", False, dict(alpha=2.0, beta=0.5, gamma=1.7, weight_temperature=1.5)),
    ("gkl", True, dict(alpha=2.0, beta=0.5, gamma=1.7, weight_temperature=1.5)),
    ("dkd", False, dict(alpha=1.5, beta=6.0)),
])
def test_distill_trains_with_the_loss_settings_it_is_given(teacher64, loss, gi, kw):
    """One batch per epoch: every named term of the history is the loss's own term, with these α, β, γ, T_w (and
    GI's prior), of the student's logits at the start of the epoch; a setting the trainer dropped or swapped
    (α for β, γ, T_w, GKL's prior) would change a term. T = 3, unequal α and β."""
    d = tiny_data(torch.float64)
    r, starts = _distill_with_epoch_starts(teacher64, d, loss=loss, gi=gi, temperature=3.0, **kw)
    t_logits = T.predict_logits(teacher64, d.x_train, d)
    for epoch, (row, logits) in enumerate(zip(r.history, starts)):
        extra = {"class_prior": r.priors[epoch].double()} if gi else {}
        want = dkl.loss_terms(loss, logits, t_logits, targets=d.y_train, temperature=3.0, **kw, **extra)
        assert set(want) <= set(row)
        for term, value in want.items():
            assert math.isclose(row[term], value.item(), rel_tol=1e-9), (epoch, term)
        swapped = dkl.loss_terms(loss, logits, t_logits, targets=d.y_train, temperature=3.0,
                                 **{**kw, "alpha": kw["beta"], "beta": kw["alpha"]}, **extra)
        assert any(not math.isclose(row[t], v.item(), rel_tol=1e-3) for t, v in swapped.items())
        if gi and epoch > 0:  # the prior of the first epoch is uniform, whose GKL weights equal no GI's
            sample_wise = dkl.loss_terms(loss, logits, t_logits, targets=d.y_train, temperature=3.0, **kw)
            assert not math.isclose(row["wmse"], sample_wise["wmse"].item(), rel_tol=1e-3)


# ------------------------------------------------------------------------------- stop and interrupt
@pytest.mark.parametrize("how", ["return_false", "raise_stop", "interrupt"])
def test_stop_keeps_the_finished_epochs(how):
    d = tiny_data()
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)
    s = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
    calls = []

    def callback(history):
        calls.append(len(history))
        if len(history) == 2:
            if how == "return_false":
                return False
            if how == "raise_stop":
                raise T.StopTraining
            raise KeyboardInterrupt

    r = T.distill(s, teacher, d, loss="kl", epochs=5, seed=0, callback=callback, **FAST)
    assert calls == [1, 2] and len(r.history) == 2
    assert r.stopped == ("interrupted" if how == "interrupt" else "callback")
    assert all(p.requires_grad for p in teacher.parameters())


# ------------------------------------------------------------------------------------- bad input
def test_bad_arguments_are_named():
    d = tiny_data()
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)
    s = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
    cases = [
        (dict(loss="mse"), ValueError, "unknown loss"),
        (dict(loss="kl", epochs=0), ValueError, "epochs"),
        (dict(loss="kl", epochs=1.5), ValueError, "epochs"),
        (dict(loss="kl", lr=-1.0), ValueError, "lr"),
        (dict(loss="kl", momentum=1.0), ValueError, "momentum"),
        (dict(loss="kl", milestones=[3, 2]), ValueError, "milestones"),
        (dict(loss="kl", temperature=0.0), ValueError, "temperature"),
        (dict(loss="gkl", gamma=0.0), ValueError, "gamma"),
        (dict(loss="dkd", beta=-1.0), ValueError, "beta"),
        (dict(loss="kl", batch_size=0), ValueError, "batch_size"),
        (dict(loss="kl", warmup_epochs=-1), ValueError, "warmup_epochs"),
        (dict(loss="ikl", gi="yes"), TypeError, "gi"),
    ]
    for kw, err, word in cases:
        kw.setdefault("epochs", 1)
        with pytest.raises(err, match=word):
            T.distill(s, teacher, d, progress=False, device="cpu", **kw)
    with pytest.raises(ValueError, match="needs a teacher"):
        T.distill(s, None, d, loss="kl", epochs=1)
    with pytest.raises(TypeError, match="TensorData"):
        T.distill(s, teacher, (d.x_train, d.y_train), loss="kl", epochs=1)
    with pytest.raises(TypeError, match="nn.Module"):
        T.train_teacher("resnet", d, epochs=1)
    r = T.distill(s, None, d, loss="ce", epochs=1, **FAST)  # CE needs no teacher
    assert r.teacher_acc is None and len(r.history) == 1


def test_evaluate_and_train_teacher_learns():
    d = tiny_data()
    t = M.build_model("small_cnn", 4, seed=0, width=8)
    r = T.train_teacher(t, d, epochs=4, seed=0, **FAST)
    assert r.history[-1]["test_acc"] == pytest.approx(T.evaluate(t, d))
    assert r.best_acc >= 60.0 and r.config["task"] == "teacher"
    with pytest.raises(ValueError, match="split"):
        T.evaluate(t, d, split="val")


def test_cifar_shaped_pipeline_with_channels_last():
    """The gpu-short path on the CPU: 3x32x32 images, crop+flip, CIFAR ResNets, channels_last."""
    d = D.synthetic(n_train=24, n_test=8, num_classes=10, image_shape=(3, 32, 32), seed=0,
                    augment={"padding": 4, "flip": True})
    teacher = M.build_model("resnet8", 10, seed=0)
    student = M.build_model("wrn_16_1", 10, seed=0)
    r = T.distill(student, teacher, d, loss="ikl", gi=True, epochs=1, seed=0, channels_last=True,
                  **{**FAST, "batch_size": 12})
    assert r.config["channels_last"] is True and len(r.history) == 1
    assert math.isfinite(r.history[0]["loss"]) and r.priors[1].shape == (10, 10)
    assert student.conv1.weight.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------- the optimisation, written out
def test_distill_is_sgd_on_the_weighted_loss_with_every_optimiser_setting(teacher64):
    """Two epochs against torch's SGD and MultiStepLR driven by hand on the same batches: the loss
    ce_weight · CE + factor · kd_weight · KL (warm-up factor 1/2, then 1), momentum, Nesterov, weight
    decay and lr × lr_decay at the milestone, each with a non-default value so that each one counts."""
    d = tiny_data(torch.float64)
    opt_kw = dict(lr=0.2, momentum=0.8, nesterov=True, weight_decay=0.01)
    s = student64()
    ref = copy.deepcopy(s)
    r = T.distill(s, teacher64, d, loss="kl", temperature=2.0, ce_weight=0.3, kd_weight=0.7, warmup_epochs=2,
                  epochs=2, milestones=[1], lr_decay=0.5, batch_size=16, seed=5, progress=False, device="cpu",
                  **opt_kw)
    assert [h["lr"] for h in r.history] == [0.2, 0.1] and [h["kd_factor"] for h in r.history] == [0.5, 1.0]
    t_logits = T.predict_logits(teacher64, d.x_train, d)
    opt = torch.optim.SGD(ref.parameters(), **opt_kw)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.5)
    order = torch.Generator().manual_seed(5)
    for factor in (0.5, 1.0):
        for idx in D.batch_indices(d.n_train, batch_size=16, shuffle=True, generator=order):
            logits = ref(d.normalize(d.x_train[idx]))
            kd = loss_terms("kl", logits, t_logits[idx], temperature=2.0)["kl"]
            loss = 0.3 * F.cross_entropy(logits, d.y_train[idx]) + factor * 0.7 * kd
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    for (name, a), b in zip(s.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_with_augmentation_the_teacher_sees_each_augmented_batch():
    """The teacher's logits are computed once per run only for fixed inputs; with augmentation the
    teacher runs on exactly the augmented images the student trains on."""
    d = tiny_data(augment={"padding": 1, "flip": True})
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)
    s = M.build_model("small_cnn", 4, seed=1, width=2)
    seen_t, seen_s = [], []
    teacher.register_forward_pre_hook(lambda m, a: seen_t.append(a[0].detach().clone()))
    s.register_forward_pre_hook(lambda m, a: seen_s.append(a[0].detach().clone()) if m.training else None)
    T.distill(s, teacher, d, loss="kl", epochs=1, seed=0, **FAST)
    assert len(seen_s) == 4  # 62 images in batches of 16
    for xs in seen_s:
        assert any(xt.shape == xs.shape and torch.equal(xt, xs) for xt in seen_t)


def test_a_student_handed_over_in_eval_mode_trains_in_train_mode():
    d = tiny_data()
    s = M.build_model("small_cnn", 4, seed=1, width=2)
    s.eval()
    stats = {k: v.clone() for k, v in s.state_dict().items() if "running" in k}
    T.train_teacher(s, d, epochs=1, seed=0, **FAST)
    assert s.training  # BatchNorm normalised with the batch statistics, and updated its running ones
    assert all(not torch.equal(s.state_dict()[k], v) for k, v in stats.items())


def test_a_last_batch_of_one_sample_is_skipped_for_batchnorm():
    """BatchNorm1d cannot train on one sample: a last batch of one is skipped (not trained on, no error)."""
    d = tiny_data(n_train=33)  # batches of 16, 16 and 1
    s = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                            torch.nn.Linear(8, 4))
    sizes = []
    s.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]) if m.training else None)
    r = T.train_teacher(s, d, epochs=1, seed=0, **FAST)
    assert sizes == [16, 16] and r.epochs_run == 1 and math.isfinite(r.history[0]["loss"])


def test_a_last_batch_of_one_sample_is_trained_on_without_batchnorm():
    """Only BatchNorm needs two samples: a model without it trains on the one-image last batch (and, in
    distillation with GI, adds it to the class prior), so every training image counts."""
    d = tiny_data(n_train=33)  # batches of 16, 16 and 1
    s = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
    sizes = []
    s.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]) if m.training else None)
    T.train_teacher(s, d, epochs=1, seed=0, **FAST)
    assert sorted(sizes) == [1, 16, 16]
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)
    sizes.clear()
    prior = ClassPrior(4)
    T.distill(s, teacher, d, loss="ikl", gi=True, class_prior=prior, epochs=1, seed=0, **FAST)
    assert sorted(sizes) == [1, 16, 16]
    counts = torch.bincount(d.y_train, minlength=4).float()  # the prior's rows: means over every image
    teacher_probs = torch.softmax(T.predict_logits(teacher, d.x_train, d) / 4.0, dim=1)
    means = torch.stack([teacher_probs[d.y_train == c].mean(0) for c in range(4)])
    assert (counts > 0).all() and torch.allclose(prior.prior, means, atol=1e-6)


@pytest.mark.parametrize("trainer", ["train_teacher", "distill", "adversarial_train"])
def test_data_on_which_no_batch_or_no_test_would_run_is_refused_first(trainer):
    """drop_last with a batch larger than the training set would train on nothing, and an empty test
    set would give every epoch a NaN test accuracy: both are named before anything runs."""
    def run(data, **kw):
        s = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
        if trainer == "train_teacher":
            return T.train_teacher(s, data, epochs=1, **{**FAST, **kw})
        if trainer == "distill":
            return T.distill(s, M.build_model("small_cnn", 4, seed=0, width=4), data, loss="kl", epochs=1,
                             **{**FAST, **kw})
        return T.adversarial_train(dkl.attacks.normalized(s, data), data, loss="trades", epsilon=0.1, epochs=1,
                                   attack_steps=1, **{**FAST, **kw})

    d = tiny_data()
    with pytest.raises(ValueError, match=r"batch_size=64 with drop_last=True leaves no batch to train on: "
                                         r"the data have 62 training images"):
        run(d, batch_size=64, drop_last=True)
    assert run(d, batch_size=64, drop_last=False).epochs_run == 1  # one batch of all 62: fine
    assert run(d, batch_size=62, drop_last=True).epochs_run == 1
    empty_test = D.TensorData(d.x_train, d.y_train, d.x_test[:0], d.y_test[:0], 4, "tiny", d.mean, d.std)
    with pytest.raises(ValueError, match=r"no test images \(x_test is empty\)"):
        run(empty_test)


def test_more_processes_than_images_in_a_batch_are_refused():
    d = tiny_data()
    T._check_split_sizes(d, batch_size=4, drop_last=False, world=4)  # one image each: fine
    with pytest.raises(ValueError, match=r"4 processes share each batch, one image at least each, but a batch "
                                         r"holds 3 \(batch_size=3"):
        T._check_split_sizes(d, batch_size=3, drop_last=False, world=4)


@pytest.mark.parametrize("problem", ["prior", "checkpoint"])
def test_an_error_before_the_first_epoch_gives_the_teacher_its_flags_back(problem, tmp_path):
    """distill freezes the teacher (eval mode, no gradients) for the run and restores it afterwards,
    also when the run stops with an error before training: a class prior of the wrong size, a
    checkpoint folder of another run."""
    d = tiny_data()
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)
    teacher.train()
    s = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
    kw = dict(loss="ikl", gi=True, epochs=1, seed=0, **FAST)
    if problem == "prior":
        with pytest.raises(ValueError, match="class_prior has 5 classes, the data 4"):
            T.distill(s, teacher, d, class_prior=ClassPrior(5), **kw)
    else:
        T.distill(s, teacher, d, checkpoint_dir=tmp_path, **{**kw, "epochs": 2}, callback=lambda h: False)
        with pytest.raises(ValueError, match="checkpoint of a different run"):
            T.distill(s, teacher, d, checkpoint_dir=tmp_path, temperature=2.0, **{**kw, "epochs": 2})
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_a_diverging_run_stops_with_an_error_naming_the_epoch():
    d = tiny_data()
    s = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
    with pytest.raises(FloatingPointError, match="non-finite in epoch 1"):
        T.train_teacher(s, d, epochs=2, seed=0, **{**FAST, "lr": 1e30})


def test_loss_defaults_weight_temperature_is_t_and_dkd_beta_is_8():
    d = tiny_data()
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)
    s = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
    ikl = T.distill(s, teacher, d, loss="ikl", temperature=3.0, epochs=1, **FAST).config
    assert ikl["weight_temperature"] == 3.0 and (ikl["alpha"], ikl["beta"]) == (1.0, 1.0)
    dkd = T.distill(s, teacher, d, loss="dkd", epochs=1, **FAST).config
    assert (dkd["alpha"], dkd["beta"]) == (1.0, 8.0)  # mdistiller's CIFAR-100 DKD


@pytest.mark.parametrize("loss", ["kl", "ikl"])
def test_a_distillation_whose_logits_blow_up_says_it_diverged(loss):
    """Logits that become nan/inf in the middle of an epoch stop the run with a FloatingPointError
    naming the epoch and the learning rate (not the loss's bare 'logits contains non-finite values')."""
    d = tiny_data()
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)
    s = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
    with pytest.raises(FloatingPointError, match=r"diverged: the logits became non-finite in epoch 1 "
                                                 r"\(logits contains non-finite.*now 1e\+30"):
        T.distill(s, teacher, d, loss=loss, epochs=2, seed=0, **{**FAST, "lr": 1e30})


def test_the_shape_probe_runs_without_autograd():
    """_check_fits's forward pass is a probe: no graph, no parameter gradients (it once lost its
    no_grad decorator to a function inserted above it)."""
    d = tiny_data()
    s = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
    seen = []
    s.register_forward_hook(lambda m, a, out: seen.append((torch.is_grad_enabled(), out.requires_grad)))
    T._check_fits("student", s, d, normalize=True)
    assert seen == [(False, False)]


# ------------------------------------------------------------------ found by mutation testing (session 14)
def test_train_accuracy_is_the_percent_correct_of_the_epochs_forward_passes(teacher64):
    """No test read train_acc's value: counting nothing, or a fraction instead of a percent, passed.
    With one batch holding the whole training set and one epoch, train_acc is the accuracy of the model
    before its first step (the forward pass the step is taken from), in percent."""
    d = tiny_data(torch.float64)
    full = dict(FAST, batch_size=d.n_train, epochs=1)
    for run in ("distill", "train_teacher"):
        model = student64(seed=3)
        with torch.no_grad():
            start = copy.deepcopy(model)(d.normalize(d.x_train))
        oracle = 100.0 * float((start.argmax(1) == d.y_train).double().mean())
        if run == "distill":
            result = T.distill(model, teacher64, d, loss="kl", temperature=4.0, seed=0, **full)
        else:
            result = T.train_teacher(model, d, seed=0, **full)
        assert result.history[0]["train_acc"] == pytest.approx(oracle, abs=1e-9), run
        assert 0.0 < oracle < 100.0  # neither extreme: a fraction would read 0.x, a constant 100
