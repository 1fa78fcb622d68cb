"""The CUDA code paths, checked on a GPU against the CPU (float64) as the oracle.

Every test here is skipped without a CUDA device, so CI (CPU only) skips them all; on a GPU machine
``pytest -m cuda`` runs them, and ``benchmarks/gpu_check.sh`` runs them as its first step. What they
cover is what only a GPU exercises: the losses' kernels and gradients on CUDA (float64, float32 and
under bf16 autocast), the class prior's sums there, the GPU-side crop + flip augmentation, the
trainers' CUDA defaults (bf16 autocast, channels_last, data held on the device), the theorem
(KL and DKL follow one trajectory) on the GPU, a checkpoint written on the GPU resumed on the CPU,
PGD and the ART ensemble on CUDA tensors, and ``torch.compile`` (inductor/Triton) of a loss.
"""
import pytest
import torch

import dkl_lib as dkl
from dkl_lib import attacks as A
from dkl_lib import data as D
from dkl_lib import models as M
from dkl_lib import train as T
from dkl_lib.prior import ClassPrior

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
QUIET = dict(progress=False, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=16)
LOSSES = {"kl": {}, "dkl": {"alpha": 1.0, "beta": 1.0}, "ikl": {"alpha": 1.0, "beta": 1.0},
          "ikl_gi": {"alpha": 1.0, "beta": 1.0, "gi": True}, "gkl": {"alpha": 1.0, "beta": 1.0},
          "dkd": {"alpha": 1.0, "beta": 8.0}}


def _terms_and_grads(name, student, teacher, targets, prior, temperature=4.0):
    """Every named term of loss ``name`` and the gradients of the total on both inputs."""
    hp = dict(LOSSES[name])
    loss = "ikl" if name == "ikl_gi" else name
    if hp.pop("gi", False):
        hp["class_prior"] = prior.to(student.device, student.dtype)
    if loss in ("ikl", "gkl", "dkd") or "class_prior" in hp:
        hp["targets"] = targets.to(student.device)
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(True)
    terms = dkl.loss_terms(loss, s, t, **hp, temperature=temperature)
    total = sum(terms.values())
    gs, gt = torch.autograd.grad(total, (s, t), allow_unused=True)
    zero = torch.zeros_like(s)
    return ({k: v.detach().double().cpu() for k, v in terms.items()},
            (gs if gs is not None else zero).double().cpu(), (gt if gt is not None else zero).double().cpu())


def _inputs(batch=64, classes=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(batch, classes, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, classes, (batch,), generator=g)
    prior = torch.softmax(torch.randn(classes, classes, generator=g, dtype=torch.float64), dim=1)
    return student, teacher, targets, prior


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_on_cuda_match_the_cpu_in_value_and_gradient(name):
    student, teacher, targets, prior = _inputs()
    ref_terms, ref_gs, ref_gt = _terms_and_grads(name, student, teacher, targets, prior)
    # float64 on the GPU: the same numbers as on the CPU
    terms, gs, gt = _terms_and_grads(name, student.to(CUDA), teacher.to(CUDA), targets, prior)
    assert terms.keys() == ref_terms.keys()
    for k in terms:
        torch.testing.assert_close(terms[k], ref_terms[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs, ref_gs, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gt, ref_gt, rtol=1e-9, atol=1e-12)
    assert ref_gs.abs().max() > 1e-3  # the comparison is not of zeros
    # float32 on the GPU against the float64 oracle
    terms, gs, gt = _terms_and_grads(name, student.float().to(CUDA), teacher.float().to(CUDA), targets, prior)
    for k in terms:
        torch.testing.assert_close(terms[k], ref_terms[k], rtol=2e-4, atol=2e-5)
    scale = ref_gs.abs().max()
    assert (gs - ref_gs).abs().max() <= 2e-4 * scale and (gt - ref_gt).abs().max() <= 2e-4 * max(ref_gt.abs().max(), 1)


@pytest.mark.parametrize("name", ["kl", "dkl", "ikl_gi", "dkd"])
def test_losses_under_bf16_autocast_compute_in_float32(name):
    """The trainers run the losses inside bf16 autocast on CUDA; the losses leave it and compute
    in float32, so bf16 logits give the float32 answer for those (rounded) logits."""
    student, teacher, targets, prior = _inputs(seed=1)
    s16, t16 = student.to(CUDA, torch.bfloat16), teacher.to(CUDA, torch.bfloat16)
    ref_terms, ref_gs, _ = _terms_and_grads(name, s16.double(), t16.double(), targets, prior)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        terms, gs, _ = _terms_and_grads(name, s16, t16, targets, prior)
        raw = dkl.loss_terms("ikl" if name == "ikl_gi" else name, s16, t16, targets=targets.to(CUDA),
                             temperature=4.0)
    assert all(v.dtype == torch.float32 for v in raw.values())
    for k in terms:
        torch.testing.assert_close(terms[k], ref_terms[k], rtol=1e-4, atol=1e-5)
    assert (gs - ref_gs).abs().max() <= 1e-2 * ref_gs.abs().max()  # the gradient is returned in bf16


def test_wmse_closed_form_matches_the_pairwise_oracle_on_cuda():
    student, teacher, _, _ = _inputs(batch=32, classes=50, seed=2)
    s = student.to(CUDA).requires_grad_(True)
    closed = dkl.wmse(s, teacher.to(CUDA), temperature=2.0)
    (g_closed,) = torch.autograd.grad(closed, s)
    pair = dkl.wmse_pairwise(s, teacher.to(CUDA), temperature=2.0)
    (g_pair,) = torch.autograd.grad(pair, s)
    torch.testing.assert_close(closed, pair, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_closed, g_pair, rtol=1e-9, atol=1e-12)
    assert closed.device.type == CUDA.type and closed.item() > 0


def test_class_prior_on_cuda_equals_the_cpu_prior():
    g = torch.Generator().manual_seed(3)
    cpu, gpu = ClassPrior(10), ClassPrior(10, device=CUDA)
    for _ in range(3):
        for _ in range(4):
            logits = torch.randn(32, 10, generator=g) * 3
            y = torch.randint(0, 10, (32,), generator=g)
            cpu.update(logits, y, weight_temperature=4.0)
            gpu.update(logits.to(CUDA), y.to(CUDA), weight_temperature=4.0)
        cpu.end_epoch()
        gpu.end_epoch()
    assert gpu.prior.device.type == CUDA.type
    torch.testing.assert_close(gpu.prior.cpu(), cpu.prior, rtol=1e-6, atol=1e-7)
    assert len(gpu.history) == len(cpu.history) == 4
    for a, b in zip(gpu.history, cpu.history):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(cpu.prior, torch.full((10, 10), 0.1))  # it moved off the uniform start


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_gpu_augmentation_draws_the_same_crops_and_flips_as_the_cpu(fmt):
    x = torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(4)).contiguous(memory_format=fmt)
    cpu = D.augment_crop_flip(x, padding=4, flip=True, generator=torch.Generator().manual_seed(5))
    gpu = D.augment_crop_flip(x.to(CUDA), padding=4, flip=True, generator=torch.Generator().manual_seed(5))
    assert gpu.device.type == CUDA.type and gpu.shape == x.shape
    assert gpu.is_contiguous(memory_format=fmt)
    assert torch.equal(gpu.cpu(), cpu)
    assert not torch.equal(cpu, x)  # something was cropped or flipped
    assert 0.0 <= float(gpu.min()) and float(gpu.max()) <= 1.0


def _data(**kw):
    args = dict(n_train=256, n_test=128, num_classes=10, image_shape=(3, 32, 32), noise=0.3, seed=0,
                augment={"padding": 4, "flip": True})
    args.update(kw)
    return D.synthetic(**args)


def test_distillation_on_cuda_uses_bf16_channels_last_and_the_device_held_data():
    d = _data(n_train=512, num_classes=4, image_shape=(3, 8, 8), augment={"padding": 1, "flip": True})
    teacher = M.build_model("small_cnn", 4, seed=0, width=16, in_channels=3)
    t_res = T.train_teacher(teacher, d, epochs=3, seed=0, **QUIET)
    assert t_res.best_acc > 25.0 + 15.0, t_res.history  # four classes: well above chance
    assert t_res.config["device"].startswith(CUDA.type) and t_res.config["amp"] and t_res.config["channels_last"]
    assert next(teacher.parameters()).device.type == CUDA.type
    for loss in ("kl", "ikl"):
        student = M.build_model("small_cnn", 4, seed=1, width=8, in_channels=3)
        res = T.distill(student, teacher, d, loss=loss, gi=loss == "ikl", temperature=4.0, epochs=3, seed=0,
                        **QUIET)
        assert res.config["device"].startswith(CUDA.type) and res.config["amp"] and res.config["channels_last"]
        for h in res.history:
            assert all(torch.isfinite(torch.tensor(float(v))) for k, v in h.items() if isinstance(v, float))
        assert res.best_acc > 25.0 + 15.0, res.history
        w = next(p for p in student.parameters() if p.dim() == 4)
        assert w.is_contiguous(memory_format=torch.channels_last)


def test_kl_and_dkl_give_one_trajectory_on_cuda():
    """The theorem in training, on the GPU (float64, no autocast, no cuDNN: deterministic)."""
    d = _data(n_train=96, n_test=48, num_classes=4, image_shape=(1, 6, 6), augment=None, dtype=torch.float64)
    teacher = M.build_model("small_cnn", 4, seed=0, width=4).double()
    with torch.backends.cudnn.flags(enabled=False):
        T.train_teacher(teacher, d, epochs=2, seed=0, amp=False, channels_last=False, **QUIET)
        runs = {}
        for loss in ("kl", "dkl"):
            s = M.build_model("mlp", 4, seed=1, in_shape=(1, 6, 6), hidden=(8,)).double()
            runs[loss] = (T.distill(s, teacher, d, loss=loss, alpha=None if loss == "kl" else 1.0,
                                    beta=None if loss == "kl" else 1.0, epochs=3, seed=3, amp=False,
                                    channels_last=False, **QUIET), s)
    kl, dkl_ = runs["kl"][0].history, runs["dkl"][0].history
    assert [h["test_acc"] for h in kl] == [h["test_acc"] for h in dkl_]
    for a, b in zip(kl, dkl_):
        assert abs(a["ce"] - b["ce"]) < 1e-6
    pk = torch.cat([p.detach().flatten() for p in runs["kl"][1].parameters()])
    pd = torch.cat([p.detach().flatten() for p in runs["dkl"][1].parameters()])
    assert pk.device.type == CUDA.type and (pk - pd).abs().max() < 1e-6


def test_a_checkpoint_written_on_cuda_resumes_on_the_cpu(tmp_path):
    d = _data(n_train=64, n_test=32, image_shape=(3, 16, 16))
    teacher = M.build_model("small_cnn", 10, seed=0, width=4, in_channels=3)
    student = M.build_model("small_cnn", 10, seed=1, width=4, in_channels=3)
    first = T.distill(student, teacher, d, loss="ikl", gi=True, epochs=2, seed=0, checkpoint_dir=tmp_path,
                      callback=lambda history: len(history) < 1, **QUIET)  # stopped after epoch 1
    assert first.config["device"].startswith(CUDA.type) and first.stopped == "callback"
    resumed = T.distill(M.build_model("small_cnn", 10, seed=1, width=4, in_channels=3), teacher.cpu(),
                        d, loss="ikl", gi=True, epochs=2, seed=0, checkpoint_dir=tmp_path, device="cpu", **QUIET)
    assert resumed.resumed_from == 1 and [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0]["test_acc"] == first.history[0]["test_acc"]
    assert next(resumed.model.parameters()).device.type == "cpu"


@pytest.fixture(scope="module")
def robust_setup():
    d = _data(n_train=512, n_test=128, image_shape=(3, 16, 16), noise=0.2)
    model = M.build_model("small_cnn", 10, seed=0, width=8, in_channels=3)
    T.train_teacher(model, d, epochs=3, seed=0, **QUIET)
    net = A.normalized(model, d).to(CUDA).eval()
    return net, d.x_test.to(CUDA), d.y_test.to(CUDA)


def test_pgd_on_cuda_stays_in_the_ball_and_eps_zero_is_clean(robust_setup):
    net, x, y = robust_setup
    net.train()
    res = A.pgd(net, x, y, epsilon=8 / 255, steps=10, seed=0)
    assert net.training  # mode restored
    assert res.x_adv.device.type == CUDA.type
    assert float((res.x_adv - x).abs().max()) <= 8 / 255 + 1e-6
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    net.eval()
    clean = A.clean_correct(net, x, y)
    zero = A.pgd(net, x, y, epsilon=0.0, steps=5, seed=0)
    assert torch.equal(zero.correct.cpu(), clean.cpu())
    assert res.accuracy <= zero.accuracy


def test_evaluate_robustness_with_the_art_ensemble_on_cuda(robust_setup):
    pytest.importorskip("art")
    net, x, y = robust_setup
    report = A.evaluate_robustness(net, x[:64], y[:64], epsilon=8 / 255, pgd_steps=(10, 20), apgd_iters=10,
                                   square_queries=50, seed=0)
    assert report.passed, report.checks
    assert report.ensemble_acc is not None and report.ensemble_acc <= min(report.pgd_acc.values())
    assert report.robust_acc <= report.clean_acc
    assert not net.training


@pytest.mark.parametrize("loss", ["trades", "ikl"])
def test_adversarial_training_on_cuda_with_awp_and_weight_average(loss):
    d = _data(n_train=128, n_test=64, image_shape=(3, 16, 16))
    model = M.build_model("small_cnn", 10, seed=0, width=4, in_channels=3)
    res = T.adversarial_train(model, d, loss=loss, epsilon=8 / 255, attack_steps=3, epochs=2, seed=0,
                              eval_samples=32, eval_steps=3, awp_gamma=0.005, weight_average=0.9, **QUIET)
    assert res.config["device"].startswith(CUDA.type) and res.config["amp"]
    assert len(res.history) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)


def test_torch_compile_of_ikl_on_cuda_matches_eager():
    pytest.importorskip("triton")
    student, teacher, targets, prior = _inputs(batch=128, classes=100, seed=6)
    s, t = student.float().to(CUDA), teacher.float().to(CUDA)
    p, y = prior.float().to(CUDA), targets.to(CUDA)

    def f(s, t):
        return dkl.ikl_loss(s, t, temperature=4.0, targets=y, class_prior=p)

    compiled = torch.compile(f, fullgraph=True)
    se, sc = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    eager, got = f(se, t), compiled(sc, t)
    (ge,) = torch.autograd.grad(eager, se)
    (gc,) = torch.autograd.grad(got, sc)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dkd_with_a_frozen_teacher_on_cuda_matches_the_cpu(dtype):
    """DKD's analytic student gradient (the KD case: the teacher takes no gradient) on CUDA against
    the CPU's float64 values, in float64 and float32."""
    student, teacher, targets, _ = _inputs(seed=7)

    def run(device, dt):
        s = student.to(device, dt).requires_grad_(True)
        terms = dkl.dkd_terms(s, teacher.to(device, dt), targets.to(device), temperature=4.0, alpha=1.0, beta=8.0)
        assert type(terms["tckd"].grad_fn).__name__ == "_DKDBackward"
        (grad,) = torch.autograd.grad(sum(terms.values()), s)
        return {k: v.detach().double().cpu() for k, v in terms.items()}, grad.double().cpu()

    ref_terms, ref_grad = run("cpu", torch.float64)
    terms, grad = run(CUDA, dtype)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    for k in terms:
        torch.testing.assert_close(terms[k], ref_terms[k], **tol)
    assert (grad - ref_grad).abs().max() <= (1e-9 if dtype == torch.float64 else 2e-4) * ref_grad.abs().max()
    assert ref_grad.abs().max() > 1e-3
