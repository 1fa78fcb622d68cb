"""Your own loss: dkl_lib.losses.register_loss, and the registered loss in distill and run_grid."""
import functools
import importlib
import math
import sys
import warnings

import pytest
import torch

import custom_loss_examples as ex
import dkl_lib as dkl
from dkl_lib import data as D
from dkl_lib import experiments as E
from dkl_lib import losses as L
from dkl_lib import models as M
from dkl_lib import train as T

FAST = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=16, progress=False, device="cpu")
TINY = {"data.n_train": 100, "teacher.model_kw.width": 4, "teacher.train.epochs": 1, "distill.epochs": 2,
        "distill.batch_size": 50}


def tiny_data(dtype=torch.float32):
    return D.synthetic(n_train=62, n_test=40, num_classes=4, image_shape=(1, 6, 6), noise=0.35, seed=0, dtype=dtype)


@pytest.fixture(scope="module")
def teacher():
    t = M.build_model("small_cnn", 4, seed=0, width=4)
    T.train_teacher(t, tiny_data(), epochs=2, seed=0, **FAST)
    return t


def student(seed=1, dtype=torch.float32):
    return M.build_model("mlp", 4, seed=seed, in_shape=(1, 6, 6), hidden=(8,)).to(dtype)


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(autouse=True)
def clean_registry():
    """Every test starts and ends with no registered loss."""
    for name in list(L.registered_losses()):
        L.unregister_loss(name)
    yield
    for name in list(L.registered_losses()):
        L.unregister_loss(name)


# ------------------------------------------------------------------------------------ registration
def test_registration_refuses_builtin_names_bad_names_and_bad_callables():
    for name in ("ce", "kl", "dkl", "ikl", "gkl", "dkd", "trades"):
        with pytest.raises(ValueError, match="built-in"):
            L.register_loss(name, ex.kl_copy)
    for name in ("", "My Loss", "ikl-nogi", "mine-gi", "a,b", "-x", 3, None):
        with pytest.raises(ValueError, match="loss name"):
            L.register_loss(name, ex.kl_copy)
    with pytest.raises(TypeError, match="must be callable"):
        L.register_loss("mine", "kl")
    with pytest.raises(TypeError, match=r"must take \(logits, target_logits, \*, targets, class_prior, temperature\)"):
        L.register_loss("mine", lambda logits, target_logits: {})
    with pytest.raises(TypeError, match="uses_prior"):
        L.register_loss("mine", ex.kl_copy, uses_prior="yes")
    assert L.registered_losses() == {}  # nothing half-registered
    # **kwargs is a valid signature; registering a name again replaces it (a re-run notebook cell)
    first = L.register_loss("mine", lambda logits, target_logits, **kw: ex.kl_copy(logits, target_logits, **kw))
    second = L.register_loss("mine", ex.kl_copy, description="kl")
    assert L.registered_losses()["mine"] is second and first.source_sha256 != second.source_sha256
    with pytest.raises(ValueError, match="built-in"):
        L.unregister_loss("kl")
    L.unregister_loss("mine")
    with pytest.raises(ValueError, match="no loss 'mine' is registered"):
        L.unregister_loss("mine")


def test_the_context_manager_unregisters_or_restores():
    with L.custom_loss("mine", ex.kl_copy) as rec:
        assert L.registered_losses() == {"mine": rec} and "mine" not in T.LOSSES
    assert L.registered_losses() == {}
    outer = L.register_loss("mine", ex.kl_by_hand)
    with L.custom_loss("mine", ex.kl_copy):
        assert L.registered_losses()["mine"].fn is ex.kl_copy
    assert L.registered_losses()["mine"] is outer


def test_a_registered_kl_gives_kl_values_and_gradients(rng):
    L.register_loss("kl-copy", ex.kl_copy)
    L.register_loss("kl-by-hand", ex.kl_by_hand)
    a = torch.randn(8, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    ref = dkl.loss_terms("kl", a, b, temperature=3.0)["kl"]
    ref_grads = torch.autograd.grad(ref, (a, b))
    for name, tol in (("kl-copy", 0.0), ("kl-by-hand", 1e-12)):
        got = dkl.loss_terms(name, a, b, targets=None, temperature=3.0)["kl"]
        assert abs(float((got - ref).detach())) <= tol
        for g, r in zip(torch.autograd.grad(got, (a, b)), ref_grads):
            assert (g - r).abs().max() <= tol + 1e-15
    assert L.registered_losses()["kl-copy"].source_sha256 != L.registered_losses()["kl-by-hand"].source_sha256


@pytest.mark.parametrize("result, error, message", [
    (lambda x: x.sum(), TypeError, "must return a non-empty dict"),
    (lambda x: {}, TypeError, "an empty dict"),
    (lambda x: {3: x.sum()}, TypeError, "term named 3"),
    (lambda x: {"ce": x.sum()}, ValueError, "term named 'ce'"),
    (lambda x: {"kd": 1.0}, TypeError, "term 'kd' must be a torch.Tensor"),
    (lambda x: {"kd": x.sum(dim=1)}, ValueError, r"term 'kd' must be a scalar tensor .*shape \(8,\)"),
    (lambda x: {"kd": x.sum().long()}, TypeError, "term 'kd' must be a floating-point tensor"),
    (lambda x: {"ok": x.sum(), "kd": x.sum() / 0.0}, ValueError, r"term 'kd' is not finite"),
])
def test_bad_return_values_are_named(rng, result, error, message):
    def bad(logits, target_logits, *, targets, class_prior, temperature):
        return result(logits)

    L.register_loss("bad", bad)
    a, b = torch.randn(8, 5, generator=rng), torch.randn(8, 5, generator=rng)
    with pytest.raises(error, match=f"custom loss 'bad'.*{message}"):
        dkl.loss_terms("bad", a, b, temperature=2.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        dkl.loss_terms("bad", a, b, temperature=0.0)


# ------------------------------------------------------------------------------------------ distill
def test_a_registered_kl_reproduces_the_kl_trajectory_exactly(teacher):
    L.register_loss("kl-copy", ex.kl_copy)
    d = tiny_data()
    runs = {}
    for loss in ("kl", "kl-copy"):
        s = student()
        runs[loss] = (T.distill(s, teacher, d, loss=loss, epochs=3, warmup_epochs=2, seed=3, **FAST), s)
    kl, copy_ = runs["kl"][0].history, runs["kl-copy"][0].history
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(kl) == strip(copy_)
    assert torch.equal(params(runs["kl"][1]), params(runs["kl-copy"][1]))
    assert runs["kl-copy"][0].config["loss"] == "kl-copy"
    assert runs["kl-copy"][0].config["loss_source_sha256"] == L.registered_losses()["kl-copy"].source_sha256
    assert "loss_source_sha256" not in runs["kl"][0].config  # the built-in losses' configs are unchanged


def test_every_named_term_is_logged_and_summed(teacher):
    L.register_loss("sym-kl", ex.symmetric_kl)
    res = T.distill(student(), teacher, tiny_data(), loss="sym-kl", epochs=3, warmup_epochs=2, seed=0, **FAST)
    assert [h["kd_factor"] for h in res.history] == [0.5, 1.0, 1.0]
    for row in res.history:
        assert {"kl_fwd", "kl_rev", "ce", "loss"} <= set(row) and row["kl_fwd"] > 0 and row["kl_rev"] > 0
        assert row["loss"] == pytest.approx(row["ce"] + row["kd_factor"] * (row["kl_fwd"] + row["kl_rev"]), rel=1e-5)


def test_unused_hyper_parameters_are_ignored_as_for_kl(teacher):
    L.register_loss("kl-copy", ex.kl_copy)
    d = tiny_data()
    plain = T.distill(student(), teacher, d, loss="kl-copy", epochs=1, seed=0, **FAST)
    other = T.distill(student(), teacher, d, loss="kl-copy", epochs=1, seed=0, alpha=3.0, beta=0.5, gamma=2.0,
                      weight_temperature=9.0, **FAST)
    assert plain.history[0]["loss"] == other.history[0]["loss"]
    assert not {"alpha", "beta", "gamma", "weight_temperature"} & set(plain.config)
    assert T.loss_settings("kl-copy") == T.loss_settings("kl")
    with pytest.raises(ValueError, match="gi=True .* uses_prior=True"):
        T.distill(student(), teacher, d, loss="kl-copy", gi=True, epochs=1, **FAST)
    with pytest.raises(ValueError, match="unknown loss 'nope'.*registered: \\['kl-copy'\\]"):
        T.distill(student(), teacher, d, loss="nope", epochs=1, **FAST)
    with pytest.raises(ValueError, match="needs a teacher"):
        T.distill(student(), None, d, loss="kl-copy", epochs=1, **FAST)


def test_a_prior_loss_gets_the_gi_prior_only_with_gi(teacher):
    ex.ikl_with_prior.seen.clear()
    L.register_loss("my-ikl", ex.ikl_with_prior, uses_prior=True)
    assert T.loss_settings("my-ikl") == {"temperature", "weight_temperature", "gi"}
    d = tiny_data()
    runs = {}
    for loss, gi in (("ikl", True), ("my-ikl", True), ("my-ikl", False)):
        s = student()
        runs[loss, gi] = T.distill(s, teacher, d, loss=loss, gi=gi, epochs=2, seed=0, weight_temperature=2.0,
                                   alpha=1.0, beta=1.0, **FAST)
    steps = len(ex.ikl_with_prior.seen) // 2
    assert ex.ikl_with_prior.seen == [(4, 4)] * steps + [None] * steps
    # with alpha = beta = 1 it is ikl, prior and all: the same run
    assert [h["test_acc"] for h in runs["ikl", True].history] == [h["test_acc"] for h in runs["my-ikl", True].history]
    assert all(torch.equal(a, b) for a, b in zip(runs["ikl", True].priors, runs["my-ikl", True].priors))
    assert runs["my-ikl", False].priors is None and runs["my-ikl", True].config["weight_temperature"] == 2.0
    with pytest.raises(ValueError, match="uses_prior=False; it takes no class_prior"):
        L.register_loss("kl-copy", ex.kl_copy)
        dkl.loss_terms("kl-copy", torch.zeros(2, 4), torch.zeros(2, 4), class_prior=torch.full((4, 4), 0.25))


def test_callback_stop_and_checkpoint_resume(teacher, tmp_path):
    L.register_loss("sym-kl", ex.symmetric_kl)
    d = tiny_data()
    whole = T.distill(student(), teacher, d, loss="sym-kl", epochs=3, seed=2, **FAST)
    stopped = T.distill(student(), teacher, d, loss="sym-kl", epochs=3, seed=2, checkpoint_dir=tmp_path,
                        callback=lambda h: len(h) < 2, **FAST)
    assert stopped.stopped == "callback" and len(stopped.history) == 2
    resumed = T.distill(student(), teacher, d, loss="sym-kl", epochs=3, seed=2, checkpoint_dir=tmp_path, **FAST)
    assert resumed.resumed_from == 2
    assert [h["kl_rev"] for h in resumed.history] == [h["kl_rev"] for h in whole.history]
    # another version of the function under the same name does not resume this checkpoint
    L.register_loss("sym-kl", lambda logits, target_logits, **kw: ex.symmetric_kl(logits, target_logits, **kw))
    with pytest.raises(ValueError, match="loss_source_sha256"):
        T.distill(student(), teacher, d, loss="sym-kl", epochs=4, seed=2, checkpoint_dir=tmp_path, **FAST)


def test_a_loss_that_is_not_finite_on_the_first_step_is_named(teacher):
    def blows_up(logits, target_logits, *, targets, class_prior, temperature):
        return {"fine": logits.mean() * 0, "log_zero": torch.log(torch.zeros((), device=logits.device))}

    L.register_loss("blows-up", blows_up)
    with pytest.raises(ValueError, match="custom loss 'blows-up': term 'log_zero' is not finite"):
        T.distill(student(), teacher, tiny_data(), loss="blows-up", epochs=1, **FAST)


def test_no_host_sync_after_the_first_step(teacher, monkeypatch):
    """The finiteness check reads the terms back once per run (first step), not per step."""
    calls = []
    original = L.CustomLoss.__call__

    def spy(self, *args, check_finite=True, **kw):
        calls.append(check_finite)
        return original(self, *args, check_finite=check_finite, **kw)

    monkeypatch.setattr(L.CustomLoss, "__call__", spy)
    L.register_loss("kl-copy", ex.kl_copy)
    T.distill(student(), teacher, tiny_data(), loss="kl-copy", epochs=2, **FAST)
    assert calls[0] is True and len(calls) == 8 and not any(calls[1:])


# ---------------------------------------------------------------------------------------- run_grid
def _grid(losses, tmp_path, seeds=(0,), **kw):
    return E.run_grid(losses, list(seeds), preset="cpu-quick", overrides=dict(TINY), cache_dir=tmp_path,
                      device="cpu", progress=False, **kw)


def test_run_grid_with_a_registered_loss_caches_it_honestly(tmp_path):
    L.register_loss("kl-copy", ex.kl_copy)
    first = _grid(["kl", "kl-copy"], tmp_path)
    kl, mine = first.runs.iloc[0], first.runs.iloc[1]
    assert mine["loss"] == "kl-copy" and not mine["cached"]
    assert (kl["best_acc"], kl["last_acc"]) == (mine["best_acc"], mine["last_acc"])
    assert list(first.histories["kl-copy", 0]["kl"]) == list(first.histories["kl", 0]["kl"])
    again = _grid(["kl-copy"], tmp_path)
    assert bool(again.runs.iloc[0]["cached"]) and again.runs.iloc[0]["config_hash"] == mine["config_hash"]
    # the same name with other code: a new key, trained afresh
    L.register_loss("kl-copy", ex.kl_by_hand)
    changed = _grid(["kl-copy"], tmp_path)
    assert not changed.runs.iloc[0]["cached"] and changed.runs.iloc[0]["config_hash"] != mine["config_hash"]


def test_editing_the_function_source_gives_a_new_key(tmp_path, monkeypatch):
    module = tmp_path / "my_loss_module.py"
    body = ("import dkl_lib as dkl\n\ndef my_loss(logits, target_logits, *, targets, class_prior, temperature):\n"
            "    return {{'kl': {scale} * dkl.kl_loss(logits, target_logits, temperature=temperature)}}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = E.resolve_config("cpu-quick", TINY)
    keys = []
    for scale in ("1.0", "0.5", "1.0"):
        module.write_text(body.format(scale=scale))
        sys.modules.pop("my_loss_module", None)
        importlib.invalidate_caches()
        L.register_loss("mine", importlib.import_module("my_loss_module").my_loss)
        keys.append(E.config_hash(E._run_config(cfg, "mine", 0, "teacher")))
    assert keys[0] != keys[1] and keys[0] == keys[2]
    # closed-over values and defaults are part of the fingerprint; a closure over a tensor cannot be hashed
    def make(scale):
        def scaled(logits, target_logits, *, targets, class_prior, temperature):
            return {"kl": scale * dkl.kl_loss(logits, target_logits, temperature=temperature)}
        return scaled
    assert L._fingerprint(make(1.0)) != L._fingerprint(make(2.0)) and L._fingerprint(make(torch.ones(()))) is None


def test_helpers_that_call_each_other_are_fingerprinted_once_each():
    """Two closed-over helpers that refer to each other (a cycle of closures) are hashed, each by its
    own source and closure, not followed round the cycle for ever; an edit of either changes the key."""
    def make(step):
        def ping(x, n):
            return x if n == 0 else pong(x * step, n - 1)

        def pong(x, n):
            return ping(x, n)

        def looped(logits, target_logits, *, targets, class_prior, temperature):
            return {"kl": ping(dkl.kl_loss(logits, target_logits, temperature=temperature), 2)}
        return looped

    one, half = make(1.0), make(0.5)
    rec = L.register_loss("ping-pong", one)
    try:
        assert rec.source_sha256 is not None and rec.source_sha256 == L._fingerprint(make(1.0))
        assert L._fingerprint(half) != rec.source_sha256  # a value closed over by one helper of the cycle
    finally:
        L.unregister_loss("ping-pong")


def test_a_loss_without_source_is_not_cached_and_warned_once(tmp_path):
    rec = L.register_loss("kl-partial", functools.partial(ex.kl_copy))
    assert rec.source_sha256 is None
    with pytest.warns(E.CacheWarning, match="'kl-partial'.* not cached"):
        first = _grid(["kl-partial"], tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", E.CacheWarning)
        second = _grid(["kl", "kl-partial"], tmp_path)
    assert not first.runs.iloc[0]["cached"] and not second.runs.iloc[1]["cached"]
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()].count("student") == 1  # only kl's entry
    assert second.runs.iloc[1]["best_acc"] == first.runs.iloc[0]["best_acc"]


def test_gi_switches_and_paper_column_for_registered_losses(tmp_path):
    L.register_loss("kl-copy", ex.kl_copy)
    L.register_loss("my-ikl", ex.ikl_with_prior, uses_prior=True)
    cfg = E.resolve_config("cpu-quick", TINY)
    assert E._run_config(cfg, "my-ikl", 0, "t")["distill"]["gi"] is True
    assert E._run_config(cfg, "my-ikl-nogi", 0, "t")["distill"]["gi"] is False
    assert "gi" not in E._run_config(cfg, "kl-copy", 0, "t")["distill"]
    with pytest.raises(ValueError, match="unknown loss 'kl-copy-nogi'"):
        E._run_config(cfg, "kl-copy-nogi", 0, "t")
    import pandas as pd

    table = E.summarize(pd.DataFrame([{"loss": "kl", "best_acc": 1.0, "last_acc": 1.0},
                              {"loss": "kl-copy", "best_acc": 1.0, "last_acc": 1.0}]), paper={"kl": 73.3})
    assert table["paper_top1"].iloc[0] == 73.3 and math.isnan(table["paper_top1"].iloc[1])


def test_workers_get_importable_losses_and_leave_the_others_to_the_parent(tmp_path, monkeypatch):
    """The split, without spawning: importable registered losses go to the workers (with what they need
    to register them), one defined in __main__ (a notebook) trains in the parent."""
    def in_main(logits, target_logits, *, targets, class_prior, temperature):
        return {"kl": dkl.kl_loss(logits, target_logits, temperature=temperature)}

    in_main.__module__ = "__main__"
    L.register_loss("kl-copy", ex.kl_copy)
    assert L.register_loss("kl-main", in_main).import_path is None
    sent = {}

    def fake_workers(kind, jobs, common, workers, **kw):
        sent.update(jobs=list(jobs), custom=common.get("custom_losses"))
        return set(), False  # computes nothing: the grid's own loop trains what is missing

    monkeypatch.setattr(E, "_run_in_workers", fake_workers)
    grid = _grid(["kl", "kl-copy", "kl-main"], tmp_path, workers=2)
    assert sent["jobs"] == [("kl", 0), ("kl-copy", 0)]
    assert sent["custom"] == {"kl-copy": ("custom_loss_examples", "kl_copy", False, "")}
    assert list(grid.runs["loss"]) == ["kl", "kl-copy", "kl-main"]
    assert len(set(grid.runs["best_acc"])) == 1  # three ways to compute KL, one result


def test_workers_train_an_importable_registered_loss_in_spawned_processes(tmp_path):
    torch.set_num_threads(1)
    L.register_loss("sym-kl", ex.symmetric_kl)
    parallel = _grid(["sym-kl"], tmp_path / "par", seeds=(0, 1), workers=2)
    serial = _grid(["sym-kl"], tmp_path / "ser", seeds=(0, 1))
    assert list(parallel.runs["best_acc"]) == list(serial.runs["best_acc"])
    assert list(parallel.runs["config_hash"]) == list(serial.runs["config_hash"])
    assert list(parallel.histories["sym-kl", 1]["kl_rev"]) == list(serial.histories["sym-kl", 1]["kl_rev"])


# The cache key of every built-in loss of every preset, computed before registered losses existed
# (seed 0, teacher key "teacher-key"): adding the registry must not orphan anyone's cached runs. The keys hold
# the library's version, which was "0.1.0" then; since they also hold a hash of the library's code (a changed
# loss is trained again), the test puts that old version back, so what it compares is the rest of the config.
BUILTIN_KEYS = {
    "cpu-quick": "929e477f1508b1d7 50a4f0f6b0f437f0 e70998b97dd7e759 e3d853e368b52387 b07e55566e497edc "
                 "e580f4c06c2dc1ed 4d975b41aa9870c2 9cb7c41cfebe2c5c",
    "gpu-short": "6b1f68fec441c17f 68901d10a65bc16f 8d1a49f4b47b2d76 7e7c3686f3f9e3da 8903e5d927bf2c3f "
                 "cadb5925543ec503 4e1b4918c97467fc e818ef898230b114",
    "imagenet": "645f349ae3c719fd f4a5d12097eaf594 a6b0c3fde322f765 76cc6f419fa0d9a8 a12e74300b66ecdd "
                "0cd92b5ded1a9847 e15df4c479f602f0 92da0cfeefec9fbe",
    "paper": "d9cd229f6fa9afd9 66526744b48202a6 77ac20ea1520c038 9d6fa22d229844a5 f1b0e06656dcd7cf "
             "3b34097dbcbdf348 50380accd50fdb59 d4da71545e14eeff",
}


def test_the_cache_keys_of_the_builtin_losses_are_unchanged(monkeypatch):
    monkeypatch.setattr(E, "_library_version", lambda: "0.1.0")
    L.register_loss("kl-copy", ex.kl_copy)  # a registered loss changes nobody else's key
    assert E.GRID_LOSSES == ("ce", "kl", "dkl", "ikl", "gkl", "dkd", "ikl-nogi", "gkl-nogi")
    for preset, keys in BUILTIN_KEYS.items():
        cfg = E.resolve_config(preset)
        got = [E.config_hash(E._run_config(cfg, spec, 0, "teacher-key"))[:16] for spec in E.GRID_LOSSES]
        assert got == keys.split(), preset
