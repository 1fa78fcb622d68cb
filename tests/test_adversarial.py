"""Adversarial training: the TRADES and IKL-AT outer losses against torch oracles, the training
loop, the adversarial presets, run_adv_grid (cache, sanity checks) and the `adv` command line."""
import json
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from dkl_lib import attacks as A
from dkl_lib import data as D
from dkl_lib import experiments as E
from dkl_lib import models as M
from dkl_lib import train as T
from conftest import comparison_table


# ------------------------------------------------------------------------------- outer losses
def _pair(b=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    nat = (torch.randn(b, c, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    adv = (torch.randn(b, c, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    y = torch.randint(0, c, (b,), generator=g)
    return nat, adv, y


def _grads(value, *inputs):
    grads = torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def test_trades_terms_match_the_torch_oracle():
    nat, adv, y = _pair()
    terms = T.adversarial_loss_terms("trades", adv, nat, y, beta=6.0)
    oracle_ce = F.cross_entropy(nat, y)
    oracle_kl = 6.0 * F.kl_div(F.log_softmax(adv, 1), F.log_softmax(nat, 1), log_target=True, reduction="batchmean")
    assert set(terms) == {"ce", "kl"}
    assert torch.allclose(terms["ce"], oracle_ce, atol=1e-12) and torch.allclose(terms["kl"], oracle_kl, atol=1e-12)
    total, oracle = sum(terms.values()), oracle_ce + oracle_kl
    for got, want in zip(_grads(total, nat, adv), _grads(oracle, nat, adv)):
        assert torch.allclose(got, want, atol=1e-12)
    assert _grads(terms["kl"], nat)[0].abs().max() > 1e-3  # the natural logits get KL's gradient too
    assert torch.equal(T.adversarial_loss_terms("trades", adv, nat, y)["kl"], terms["kl"])  # default beta = 6


def _ikl_oracle(adv, nat, y, *, alpha, beta, temperature, prior=None, weight_temperature=None):
    """The literal IKL-AT loss (the official code's dkl_loss): pairwise wMSE over all
    class pairs on raw logits, no stop-gradient on either side, plus the soft-label CE."""
    if prior is not None:
        p = prior[y]
    else:
        p = torch.softmax(nat.detach() / (weight_temperature or temperature), 1)
    w = (p[:, :, None] * p[:, None, :]).detach()
    d_nat = nat[:, :, None] - nat[:, None, :]
    d_adv = adv[:, :, None] - adv[:, None, :]
    wmse = alpha / 4 * (w * (d_nat - d_adv) ** 2).sum() / nat.shape[0]
    soft = torch.softmax(nat.detach() / temperature, 1)
    soft_ce = -beta * temperature ** 2 * (soft * F.log_softmax(adv / temperature, 1)).sum(1).mean()
    return wmse, soft_ce


@pytest.mark.parametrize("with_prior", [True, False])
def test_ikl_at_terms_match_the_literal_formula(with_prior):
    nat, adv, y = _pair(seed=1)
    prior = torch.softmax(torch.randn(5, 5, dtype=torch.float64), 1) if with_prior else None
    kw = dict(alpha=20.0, beta=4.0, temperature=1.0)
    terms = T.adversarial_loss_terms("ikl", adv, nat, y, weight_temperature=4.0, class_prior=prior, **kw)
    wmse, soft_ce = _ikl_oracle(adv, nat, y, prior=prior, weight_temperature=4.0, **kw)
    assert set(terms) == {"ce", "wmse", "soft_ce"}
    assert torch.allclose(terms["wmse"], wmse, rtol=1e-10) and torch.allclose(terms["soft_ce"], soft_ce, rtol=1e-10)
    for got, want in zip(_grads(sum(terms.values()), nat, adv), _grads(F.cross_entropy(nat, y) + wmse + soft_ce, nat, adv)):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    # the wMSE reaches BOTH sides (no asymmetry in AT), the soft-CE only the adversarial logits
    assert _grads(terms["wmse"], adv)[0].abs().max() > 1e-3 and _grads(terms["wmse"], nat)[0].abs().max() > 1e-3
    assert _grads(terms["soft_ce"], nat)[0].abs().max() == 0


def test_ikl_at_equals_the_official_code_formula():
    """Official (jiequancui/DKL, Adv-training-dkl): beta_off · 0.25·Σ w (Δn − Δa)² / Σ w + alpha_off ·
    soft-CE at T = 1, with w = p pᵀ from the class prior; ours with alpha = beta_off, beta = alpha_off."""
    nat, adv, y = _pair(seed=2)
    prior = torch.softmax(torch.randn(5, 5, dtype=torch.float64), 1)
    p = prior[y]
    p_n = p[:, :, None] * p[:, None, :]
    d_n = nat[:, :, None] - nat[:, None, :]
    d_a = adv[:, :, None] - adv[:, None, :]
    official = 20.0 * (0.25 * ((d_n - d_a) ** 2 * p_n).sum() / p_n.sum()) + 4.0 * (
        -(F.softmax(nat, 1).detach() * F.log_softmax(adv, 1)).sum(1).mean())
    terms = T.adversarial_loss_terms("ikl", adv, nat, y, class_prior=prior)  # the defaults
    assert torch.allclose(terms["wmse"] + terms["soft_ce"], official, rtol=1e-10)


@pytest.mark.parametrize("beta", [0.0, 1.5])
def test_trades_beta_reaches_the_kl_term(beta):
    nat, adv, y = _pair(seed=3)
    terms = T.adversarial_loss_terms("trades", adv, nat, y, beta=beta)
    oracle = beta * F.kl_div(F.log_softmax(adv, 1), F.log_softmax(nat, 1), log_target=True, reduction="batchmean")
    assert torch.allclose(terms["kl"], oracle, atol=1e-12)
    for got, want in zip(_grads(terms["kl"], nat, adv), _grads(oracle, nat, adv)):
        assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("with_prior", [True, False])
def test_ikl_at_settings_reach_the_loss(with_prior):
    """α, β, T and T_w other than IKL-AT's defaults (α = 20, β = 4, T = 1, T_w = 4): each changes the terms,
    and T ≠ 1 puts the T² on the soft-label CE."""
    nat, adv, y = _pair(seed=4)
    prior = torch.softmax(torch.randn(5, 5, dtype=torch.float64), 1) if with_prior else None
    kw = dict(alpha=3.0, beta=2.0, temperature=2.0)
    terms = T.adversarial_loss_terms("ikl", adv, nat, y, weight_temperature=3.0, class_prior=prior, **kw)
    wmse, soft_ce = _ikl_oracle(adv, nat, y, prior=prior, weight_temperature=3.0, **kw)
    assert torch.allclose(terms["wmse"], wmse, rtol=1e-10) and torch.allclose(terms["soft_ce"], soft_ce, rtol=1e-10)
    total, oracle = sum(terms.values()), F.cross_entropy(nat, y) + wmse + soft_ce
    for got, want in zip(_grads(total, nat, adv), _grads(oracle, nat, adv)):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    defaults = T.adversarial_loss_terms("ikl", adv, nat, y, class_prior=prior)
    assert not torch.allclose(defaults["wmse"], terms["wmse"]) and not torch.allclose(defaults["soft_ce"], terms["soft_ce"])


def test_adversarial_loss_terms_errors():
    nat, adv, y = _pair()
    assert set(T.adversarial_loss_terms("ce", None, nat, y)) == {"ce"}
    with pytest.raises(ValueError, match="unknown adversarial loss"):
        T.adversarial_loss_terms("pgd", adv, nat, y)
    with pytest.raises(ValueError, match="adversarial logits"):
        T.adversarial_loss_terms("trades", None, nat, y)
    with pytest.raises(ValueError, match="beta"):
        T.adversarial_loss_terms("trades", adv, nat, y, beta=-1.0)


def test_epsilon_schedule():
    assert T.epsilon_at(3, epsilon=0.1, epochs=10) == 0.1
    assert T.epsilon_at(3, epsilon=0.1, epochs=10, schedule="increasing") == pytest.approx(0.03)
    with pytest.raises(ValueError, match="schedule"):
        T.epsilon_at(1, epsilon=0.1, epochs=10, schedule="linear")


# -------------------------------------------------------------------------------------- training
def _tiny():
    d = D.synthetic(n_train=48, n_test=24, num_classes=4, noise=0.2, seed=0)
    model = A.normalized(M.build_model("small_cnn", 4, seed=0, width=4), d)
    return model, d


@pytest.mark.parametrize("loss", ["trades", "ikl", "ce"])
def test_adversarial_train_runs_and_logs(loss):
    model, d = _tiny()
    res = T.adversarial_train(model, d, loss=loss, epsilon=0.1, epochs=2, batch_size=16, attack_steps=2,
                              eval_samples=12, eval_steps=2, progress=False, device="cpu",
                              epsilon_schedule="increasing" if loss == "ikl" else "constant")
    h = res.frame()
    assert list(h["epoch"]) == [1, 2] and res.stopped is None
    terms = {"trades": {"kl"}, "ikl": {"wmse", "soft_ce"}, "ce": set()}[loss]
    assert {"loss", "ce", "train_acc", "test_acc", "test_robust_acc", "epsilon", "lr"} | terms <= set(h.columns)
    assert h[["loss", "ce", "test_acc", "test_robust_acc"]].notna().all().all()
    assert (h["test_robust_acc"] <= 100).all()
    if loss == "ikl":
        assert h["epsilon"].tolist() == pytest.approx([0.05, 0.1])
        assert len(res.priors) == 3 and torch.allclose(res.priors[0], torch.full((4, 4), 0.25))
        assert torch.allclose(res.priors[-1].sum(1), torch.ones(4))
    else:
        assert h["epsilon"].tolist() == [0.1, 0.1] and res.priors is None
    assert res.config["loss"] == loss and res.config["task"] == "adversarial"


def test_adversarial_train_with_augmentation_on_rgb_images():
    """The CIFAR path: 3-channel images, crop-and-flip augmentation per batch, increasing ε, cosine lr."""
    d = D.synthetic(n_train=32, n_test=16, num_classes=4, image_shape=(3, 16, 16), seed=1,
                    augment={"padding": 2, "flip": True})
    model = A.normalized(M.build_model("small_cnn", 4, seed=0, width=4, in_channels=3), d)
    res = T.adversarial_train(model, d, loss="ikl", epsilon=8 / 255, epsilon_schedule="increasing", epochs=2,
                              lr_schedule="cosine", attack_steps=2, attack_step_fraction=0.5, batch_size=16,
                              eval_samples=8, eval_steps=2, progress=False, device="cpu")
    assert res.epochs_run == 2 and all(math.isfinite(h["loss"]) for h in res.history)


def test_adversarial_train_is_deterministic_and_validates():
    runs = []
    for _ in range(2):
        model, d = _tiny()
        runs.append(T.adversarial_train(model, d, loss="trades", epsilon=0.1, epochs=1, batch_size=16,
                                        attack_steps=2, eval_samples=0, progress=False, device="cpu").history)
    assert runs[0][0]["loss"] == runs[1][0]["loss"] and runs[0][0]["test_acc"] == runs[1][0]["test_acc"]
    assert math.isnan(runs[0][0]["test_robust_acc"])  # eval_samples = 0 skips it
    model, d = _tiny()
    with pytest.raises(ValueError, match="unknown adversarial loss"):
        T.adversarial_train(model, d, loss="kl", epsilon=0.1, epochs=1)
    with pytest.raises(ValueError, match="lr_schedule"):
        T.adversarial_train(model, d, epsilon=0.1, epochs=1, lr_schedule="step")
    with pytest.raises(ValueError, match="epsilon schedule"):
        T.adversarial_train(model, d, epsilon=0.1, epochs=1, epsilon_schedule="ramp")


def test_cosine_schedule_is_the_official_one():
    model, d = _tiny()
    res = T.adversarial_train(model, d, loss="ce", epsilon=0.1, epochs=3, lr=0.2, lr_schedule="cosine",
                              eval_samples=0, progress=False, device="cpu")
    want = [0.2 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (1, 2, 3)]
    assert [h["lr"] for h in res.history] == pytest.approx(want)


# ------------------------------------------------------------------------------- presets and grid
TINY = {"data.n_train": 100, "train.epochs": 1, "train.eval_samples": 20, "eval.samples": 20,
        "eval.apgd_iters": 5, "eval.square_queries": 5, "eval.pgd_steps": [5, 10], "model.model_kw.width": 4}


def test_adv_presets():
    paper = E.adv_preset("paper")
    assert paper["model"]["name"] == "wrn_34_10" and paper["data"]["name"] == "cifar10"
    t = paper["train"]
    assert (t["epochs"], t["lr"], t["lr_schedule"], t["batch_size"]) == (200, 0.2, "cosine", 128)
    assert t["epsilon"] == pytest.approx(8 / 255) and t["epsilon_schedule"] == "increasing"
    assert (t["attack_steps"], t["attack_step_fraction"]) == (5, 0.5)
    assert paper["losses"]["ikl"] == {"alpha": 20.0, "beta": 4.0, "temperature": 1.0, "weight_temperature": 4.0,
                                      "gi": True}
    assert paper["losses"]["trades"] == {"beta": 6.0} and paper["eval"]["square_queries"] == 5000
    short = E.adv_preset("gpu-short")
    assert short["model"]["name"] == "preact_resnet18" and short["train"]["epsilon"] == pytest.approx(8 / 255)
    quick = E.adv_preset("cpu-quick")
    assert quick["data"]["name"] == "digits" and quick["train"]["epsilon"] == quick["eval"]["epsilon"] == 0.1
    cfg = E.resolve_adv_config("cpu-quick", {"train.epochs": 2, "losses.ikl.alpha": 5.0, "model.model_kw.width": 8})
    assert cfg["train"]["epochs"] == 2 and cfg["losses"]["ikl"]["alpha"] == 5.0 and cfg["model"]["model_kw"]["width"] == 8
    for bad, match in [({"train.epoch": 2}, "unknown config key"), ({"losses.trades.alpha": 1.0}, "trades takes"),
                       ({"losses.kl.beta": 1.0}, "unknown loss"), ({"trainer.epochs": 1}, "unknown config key")]:
        with pytest.raises(ValueError, match=match):
            E.resolve_adv_config("cpu-quick", bad)
    with pytest.raises(ValueError, match="unknown preset"):
        E.adv_preset("cpu-slow")


@pytest.mark.parametrize("override,needle", [
    ({"eval.epsilon": -1}, "eval.epsilon must be > 0"),
    ({"eval.epsilon": 0}, "eval.epsilon must be > 0"),
    ({"train.epochs": -2}, "train.epochs must be a positive integer, got -2"),
    ({"model.dtype": "float16"}, "model.dtype: model dtype must be one of"),
    ({"train.lr_schedule": "linear"}, "train.lr_schedule must be one of"),
    ({"train.epsilon": float("inf")}, "train.epsilon must be a finite number"),
    ({"train.weight_average": 1.5}, "train.weight_average must be < 1"),
    ({"train.weight_average_every": "batch"}, "train.weight_average_every must be one of"),
    ({"losses.ikl.temperature": 0}, "losses.ikl.temperature must be > 0"),
    ({"losses.ikl.gi": "yes"}, "losses.ikl.gi must be true or false"),
    ({"eval.samples": 0}, "eval.samples must be a positive integer"),
    ({"eval.pgd_steps": []}, "eval.pgd_steps must be a non-empty list"),
    ({"eval.pgd_restarts": 1.5}, "eval.pgd_restarts must be a positive integer"),
    ({"eval.ensemble_attacks": ["fab"]}, "unknown ensemble attack 'fab' in eval.ensemble_attacks"),
    ({"eval.ensemble_attacks": "square"}, "eval.ensemble_attacks must be a list or tuple"),
    ({"eval.ensemble_attacks": ["apgd-ce", "apgd-ce"]}, "eval.ensemble_attacks lists apgd-ce more than once"),
    ({"eval.ensemble_attacks": ["square", "apgd-ce"]}, "eval.ensemble_attacks runs square before apgd-ce"),
    ({"model": {"model_kw": {}}}, r"model lacks the setting\(s\) \['model.name'\]"),
])
def test_resolve_adv_config_checks_types_and_ranges_naming_the_key(override, needle):
    with pytest.raises((TypeError, ValueError), match=needle):
        E.resolve_adv_config("cpu-quick", override)


def test_every_adv_preset_passes_the_checks_unchanged():
    for name in E.ADV_PRESETS:
        assert E.resolve_adv_config(name) == {**E.adv_preset(name), "preset": name}


def test_run_adv_grid_checks_the_config_and_the_seeds_before_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before the config was checked")

    monkeypatch.setattr(E.train_mod, "adversarial_train", no_training)
    with pytest.raises(ValueError, match="eval.epsilon must be > 0"):
        E.run_adv_grid(["trades"], [0], overrides={**TINY, "eval.epsilon": -1}, cache_dir=tmp_path, device="cpu",
                       progress=False)
    with pytest.raises(ValueError, match="seeds lists a seed twice"):
        E.run_adv_grid(["trades"], [3, 3], overrides=TINY, cache_dir=tmp_path, device="cpu", progress=False)


def test_adv_paper_numbers():
    table = E.paper_results(task="adversarial")
    got = {(r.dataset, r.loss): (r.clean, r.robust) for r in table.itertuples()}
    assert got == {("CIFAR-10", "trades"): (84.92, 53.08), ("CIFAR-10", "ikl"): (84.80, 57.09),
                   ("CIFAR-100", "trades"): (62.87, 30.29), ("CIFAR-100", "ikl"): (65.76, 31.91)}
    assert (table["model"] == "WRN-34-10").all() and table["source"].str.len().min() > 10
    assert "85.31" in table.set_index(["dataset", "loss"]).loc[("CIFAR-10", "ikl"), "note"]
    assert E.paper_results().shape[0] == 11  # the KD table is unchanged
    ref = E.adv_paper_reference(E.resolve_adv_config("gpu-short"))
    assert set(ref["loss"]) == {"trades", "ikl"} and E.adv_paper_reference(E.resolve_adv_config("cpu-quick")) is None


def test_comparison_says_who_published_each_number():
    """TRADES' CIFAR-10 figure is RobustBench's, not the DKL paper's: its row said "paper (published)"
    although its source column named RobustBench."""
    import pandas as pd

    summary = pd.DataFrame([{"loss": "trades", "n": 2, "clean_acc_mean": 96.5, "clean_acc_std": 0.7,
                             "robust_acc_mean": 68.5, "robust_acc_std": 0.7}])
    config = {"data": {"name": "digits"}, "model": {"name": "small_cnn"}, "preset": "cpu-quick",
              "eval": {"epsilon": 0.1, "pgd_steps": [20, 50], "ensemble_attacks": ["apgd-ce"], "samples": 100}}
    grid = E.AdvGridResult(runs=pd.DataFrame(), summary=summary, checks=pd.DataFrame(), config=config)
    table = grid.comparison().set_index(["data", "method"])
    assert table.loc[("CIFAR-10 (ε = 8/255)", "TRADES"), "who"] == "published (RobustBench)"
    assert "RobustBench" in table.loc[("CIFAR-10 (ε = 8/255)", "TRADES"), "source"]
    dkl_rows = table[table["source"].str.startswith("DKL paper")]
    assert len(dkl_rows) == 3 and (dkl_rows["who"] == "paper (published)").all()
    assert table.loc[("digits (ε = 0.1)", "TRADES (KL)"), "who"] == "ours (measured here)"
    # rows without "reported_by" (a user's own frame) stay the paper's
    own = E.paper_results(task="adversarial").drop(columns=["reported_by"])
    assert set(grid.comparison(paper=own)["who"]) == {"ours (measured here)", "paper (published)"}


def test_adv_run_key_changes_with_everything_a_run_depends_on():
    """Each per-loss setting, each training setting, the model, the data and the seed give another cache key:
    an override of losses.ikl.alpha must not read back the run made with the default α."""
    base = E.resolve_adv_config("cpu-quick")
    keys = [E.config_hash(E._adv_run_config(base, "ikl", 0)), E.config_hash(E._adv_run_config(base, "ikl", 1)),
            E.config_hash(E._adv_run_config(base, "trades", 0))]
    for loss, override in [("ikl", {"losses.ikl.alpha": 5.0}), ("ikl", {"losses.ikl.beta": 3.0}),
                           ("ikl", {"losses.ikl.temperature": 2.0}), ("ikl", {"losses.ikl.weight_temperature": 2.0}),
                           ("ikl", {"losses.ikl.gi": False}), ("trades", {"losses.trades.beta": 3.0}),
                           ("ikl", {"train.epsilon": 0.05}), ("ikl", {"train.attack_steps": 3}),
                           ("ikl", {"model.model_kw.width": 8}), ("ikl", {"data.n_train": 300})]:
        keys.append(E.config_hash(E._adv_run_config(E.resolve_adv_config("cpu-quick", override), loss, 0)))
    assert len(set(keys)) == len(keys)
    # a setting of the other loss does not change this one's key (its cached runs stay valid)
    other = E.resolve_adv_config("cpu-quick", {"losses.trades.beta": 3.0})
    assert E.config_hash(E._adv_run_config(other, "ikl", 0)) == keys[0]


def test_run_adv_grid_hands_the_loss_settings_to_the_trainer(tmp_path, monkeypatch):
    seen = []
    real = E.train_mod.adversarial_train

    def recording(model, data, **kw):
        seen.append({k: kw.get(k) for k in ("loss", "alpha", "beta", "temperature", "weight_temperature", "gi")})
        return real(model, data, **kw)

    monkeypatch.setattr(E.train_mod, "adversarial_train", recording)
    overrides = {**TINY, "eval.ensemble": False, "losses.ikl.alpha": 5.0, "losses.ikl.temperature": 2.0,
                 "losses.ikl.gi": False}
    E.run_adv_grid(["ikl"], [0], overrides=overrides, cache_dir=tmp_path, device="cpu", progress=False)
    assert seen == [{"loss": "ikl", "alpha": 5.0, "beta": 4.0, "temperature": 2.0, "weight_temperature": 4.0,
                     "gi": False}]


def test_run_adv_grid_caches_training_and_evaluation(tmp_path):
    grid = E.run_adv_grid(["trades", "ikl"], [0, 1], overrides=TINY, cache_dir=tmp_path, device="cpu",
                          progress=False)
    runs = grid.runs
    assert [(r.loss, r.seed) for r in runs.itertuples()] == [("trades", 0), ("trades", 1), ("ikl", 0), ("ikl", 1)]
    assert {"clean_acc", "pgd5_acc", "pgd10_acc", "ensemble_acc", "robust_acc", "checks_passed"} <= set(runs.columns)
    assert runs["checks_passed"].all() and grid.passed and not runs["cached"].any()
    assert (runs["robust_acc"] <= runs["ensemble_acc"]).all() and (runs["pgd10_acc"] <= runs["pgd5_acc"]).all()
    assert len(grid.checks) == 4 * len(A.CHECKS) and set(grid.checks["check"]) == set(A.CHECKS)
    assert set(grid.summary["loss"]) == {"trades", "ikl"} and "±" in grid.summary["clean"].iloc[0]
    assert grid.priors[("ikl", 0)].shape == (2, 10, 10)  # digits: 10 classes, 1 epoch
    assert isinstance(grid.models[("trades", 1)], A.Normalized)
    assert len(list(tmp_path.glob("adv-*"))) == 4 and len(list(tmp_path.glob("adveval-*"))) == 4
    again = E.run_adv_grid(["trades", "ikl"], [0, 1], overrides=TINY, cache_dir=tmp_path, device="cpu",
                           progress=False)
    assert again.runs["cached"].all()
    cols = ["clean_acc", "pgd10_acc", "ensemble_acc", "robust_acc"]
    assert again.runs[cols].equals(runs[cols])
    # new evaluation settings: re-evaluated, not retrained
    E.run_adv_grid(["trades"], [0], overrides={**TINY, "eval.pgd_restarts": 2}, cache_dir=tmp_path, device="cpu",
                   progress=False)
    assert len(list(tmp_path.glob("adv-*"))) == 4 and len(list(tmp_path.glob("adveval-*"))) == 5


def test_run_adv_grid_fails_loudly_on_a_broken_check(tmp_path, monkeypatch):
    def no_attack(model, x, y, **kw):
        return A.EnsembleResult(x_adv=x.clone(), correct=A.clean_correct(model, x, y),
                                broken_by=torch.full((x.shape[0],), -1), attacks=("apgd-ce",))

    monkeypatch.setattr(A, "ensemble_attack", no_attack)
    # natural training (fast) of a model that gets the clean inputs right; PGD at ε = 0.4 breaks it
    overrides = {**TINY, "train.epochs": 6, "data.n_train": 300, "model.model_kw.width": 8, "eval.epsilon": 0.4}
    with pytest.warns(UserWarning, match="ensemble_not_above_pgd FAILED"):
        with pytest.raises(A.SanityCheckError, match="ensemble_not_above_pgd") as err:
            E.run_adv_grid(["ce"], [0], overrides=overrides, cache_dir=tmp_path, device="cpu", progress=False)
    assert not err.value.grid.passed and len(err.value.grid.runs) == 1
    assert err.value.grid.runs["clean_acc"].iloc[0] > 50
    out = tmp_path / "out"
    argv = ["adv", "--losses", "ce", "--seeds", "0", "--out", str(out), "--cache-dir", str(tmp_path),
            "--device", "cpu", "--quiet"] + [a for k, v in overrides.items() for a in ("--override", f"{k}={json.dumps(v)}")]
    with pytest.warns(UserWarning):
        assert E.main(argv) == 3
    payload = json.loads((out / "results.json").read_text())
    assert payload["passed"] is False and payload["runs"][0]["failed"] == "ensemble_not_above_pgd"


def test_adv_runs_in_worker_processes_equal_the_sequential_grid(tmp_path):
    """workers=2: training AND evaluation happen in the workers; the grid reads both from the cache
    and reports exactly the one-process numbers, with the runs marked as computed, not cached."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        par = E.run_adv_grid(["trades", "ikl"], [0], overrides=TINY, cache_dir=tmp_path / "par", device="cpu",
                             progress=False, workers=2)
        ser = E.run_adv_grid(["trades", "ikl"], [0], overrides=TINY, cache_dir=tmp_path / "ser", device="cpu",
                             progress=False)
    finally:
        torch.set_num_threads(threads)
    cols = ["loss", "seed", "clean_acc", "pgd5_acc", "pgd10_acc", "ensemble_acc", "robust_acc", "checks_passed",
            "config_hash"]
    assert par.runs[cols].equals(ser.runs[cols]) and not par.runs["cached"].any()
    assert par.checks.drop(columns="detail").equals(ser.checks.drop(columns="detail"))
    for key, model in ser.models.items():
        for (name, a), b in zip(model.state_dict().items(), par.models[key].state_dict().values()):
            assert torch.equal(a, b), (key, name)
    assert len(list((tmp_path / "par").glob("adveval-*"))) == 2


@pytest.mark.parametrize("blocked", ["art", "multiprocess"])
def test_missing_ensemble_library_stops_before_training(tmp_path, monkeypatch, blocked):
    """Without ART (or multiprocess) a grid with the ensemble must stop before its first epoch, not
    after a long training; PGD-only evaluation still runs."""
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now raises ImportError
    for name in [m for m in sys.modules if m.startswith(blocked + ".")]:
        monkeypatch.delitem(sys.modules, name)
    trained = []
    real_train = T.adversarial_train
    monkeypatch.setattr(T, "adversarial_train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    with pytest.raises(ImportError, match=rf"'{blocked}' cannot be imported.*eval.ensemble=false"):
        E.run_adv_grid(["trades"], [0], overrides=TINY, cache_dir=tmp_path, device="cpu", progress=False)
    assert trained == []
    with pytest.raises(ImportError, match="adversarial-robustness-toolbox"):
        A.require_ensemble()
    grid = E.run_adv_grid(["trades"], [0], overrides={**TINY, "eval.ensemble": False}, cache_dir=tmp_path,
                          device="cpu", progress=False)
    assert trained == [1] and grid.runs["ensemble_acc"].isna().all() and grid.passed


def test_run_adv_grid_evaluates_the_first_eval_samples_test_images(tmp_path):
    """The report covers eval.samples images of the TEST set, in order: its clean and PGD accuracies are those of
    the returned model on d.x_test[:20] (recomputed here with the attack functions themselves)."""
    grid = E.run_adv_grid(["trades"], [0], overrides={**TINY, "eval.ensemble": False}, cache_dir=tmp_path,
                          device="cpu", progress=False)
    cfg = E.resolve_adv_config("cpu-quick", {**TINY, "eval.ensemble": False})
    d = E.load_data(cfg["data"])
    model, report = grid.models[("trades", 0)], grid.reports[("trades", 0)]
    x, y = d.x_test[:20].float(), d.y_test[:20]
    assert report.n == 20
    clean = A.clean_correct(model, x, y)
    assert report.clean_acc == pytest.approx(100 * clean.double().mean().item())
    pgd = A.pgd(model, x, y, epsilon=cfg["eval"]["epsilon"], steps=5, restarts=int(cfg["eval"]["pgd_restarts"]), seed=0)
    assert report.pgd_acc[5] == pytest.approx(100 * (clean & pgd.correct).double().mean().item())
    on_train = A.clean_correct(model, d.x_train[:20].float(), d.y_train[:20])
    assert not torch.equal(on_train, clean)  # the train images would give another answer


def test_cli_adv_without_art_prints_one_error_line(tmp_path, monkeypatch, capsys):
    """The `adv` command without ART: `error: <how to install it or run PGD only>` and exit 2, not a
    traceback; an ImportError that is not this one still propagates."""
    monkeypatch.setitem(sys.modules, "art", None)
    for name in [m for m in sys.modules if m.startswith("art.")]:
        monkeypatch.delitem(sys.modules, name)
    argv = ["adv", "--losses", "trades", "--seeds", "0", "--out", str(tmp_path / "out"), "--cache-dir",
            str(tmp_path), "--device", "cpu", "--quiet"] + [a for k, v in TINY.items() for a in ("--override", f"{k}={v}")]
    assert E.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the AutoAttack-style ensemble needs") and err.count("\n") == 1
    assert "'art' cannot be imported" in err and "--override eval.ensemble=false" in err
    with pytest.raises(A.EnsembleUnavailableError):
        A.require_ensemble()
    assert issubclass(A.EnsembleUnavailableError, ImportError)  # `except ImportError` still catches it

    def broken(*args, **kwargs):
        raise ImportError("an unrelated import failed")

    monkeypatch.setattr(E, "run_adv_grid", broken)
    with pytest.raises(ImportError, match="unrelated"):
        E.main(argv)


def test_cli_adv_writes_results(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["adv", "--preset", "cpu-quick", "--losses", "trades,ikl", "--seeds", "0,1", "--out", str(out),
            "--cache-dir", str(tmp_path / "runs"), "--device", "cpu", "--epochs", "1"]
    for key, value in TINY.items():
        if key != "train.epochs":
            argv += ["--override", f"{key}={json.dumps(value)}"]
    assert E.main(argv) == 0
    printed = capsys.readouterr().out
    assert "AutoAttack-style" in printed and "results.json" in printed
    header = next(line.split() for line in printed.splitlines() if line.split()[:1] == ["loss"])
    assert header[:5] == ["loss", "n", "clean", "pgd5", "pgd10"]  # the PGD steps this run evaluated
    payload = json.loads((out / "results.json").read_text())
    assert payload["preset"] == "cpu-quick" and payload["passed"] is True and "not the official" in payload["ensemble_note"]
    assert [(r["loss"], r["seed"]) for r in payload["runs"]] == [("trades", 0), ("trades", 1), ("ikl", 0), ("ikl", 1)]
    for run in payload["runs"]:
        assert {"clean_acc", "pgd5_acc", "pgd10_acc", "ensemble_acc", "robust_acc"} <= set(run)
        assert {c["check"]: c["status"] for c in run["report"]["checks"]}.keys() == set(A.CHECKS)
        assert all(c["status"] in ("pass", "warn") for c in run["report"]["checks"])
    assert (out / "results.csv").exists()
    assert E.main(["adv", "--losses", "trades,pgd", "--out", str(out), "--quiet"]) == 2
    assert "unknown adversarial loss 'pgd'" in capsys.readouterr().err


def test_cli_adv_prints_the_flags_of_its_runs(tmp_path, monkeypatch, capsys):
    """A run flagged for gradient masking (a warning, not a failure: exit 0) is named after the summary,
    with PGD's and the ensemble's accuracy; a grid without flags prints no such line."""
    def report(model, x, y, *, seed, **kw):
        checks = [A._check("eval_mode", True, 0, "all forwards in eval mode")]
        if seed == 1:
            checks.append(A._check("gradient_masking", False, 25.0, "PGD - ensemble = 25.00 points (flag above 10)",
                                   soft=True))
        return A.RobustnessReport(epsilon=0.1, n=20, clean_acc=90.0, pgd_acc={5: 70.0, 10: 65.0}, ensemble_acc=40.0,
                                  robust_acc=38.5, checks=checks)

    monkeypatch.setattr(E.attacks_mod, "evaluate_robustness", report)
    argv = ["adv", "--losses", "trades", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path), "--device",
            "cpu"] + [a for k, v in {**TINY, "eval.ensemble": False}.items() for a in ("--override", f"{k}={json.dumps(v)}")]
    assert E.main(argv + ["--seeds", "0"]) == 0
    assert "flags" not in capsys.readouterr().err
    assert E.main(argv + ["--seeds", "0,1"]) == 0
    printed = capsys.readouterr()
    assert "ensemble" in printed.out and "flags (warnings" in printed.err
    lines = [line for line in printed.err.splitlines() if line.startswith("  ")]
    assert len(lines) == 1 and lines[0].startswith("  trades seed 1: gradient_masking: PGD-10 65.00% vs ensemble 40.00%")
    assert "robust accuracy, the worst case over all attacks, is 38.50%" in lines[0] and "flag above 10" in lines[0]
    assert (tmp_path / "out" / "results.csv").read_text().count("gradient_masking") == 1


def test_adv_cifar_preset_offline_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("DKL_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(D.DatasetNotFoundError, match="download=True"):
        E.run_adv_grid(["trades"], [0], preset="gpu-short", cache_dir=tmp_path / "runs", device="cpu", progress=False)


# ------------------------------------------------------------------------------------------- plots
def test_adversarial_plots_are_made_from_data():
    import pandas as pd
    import plotly.graph_objects as go

    from dkl_lib import plots as P

    hist = {(loss, seed): pd.DataFrame({"epoch": [1, 2], "test_acc": [50.0 + seed, 60.0],
                                        "test_robust_acc": [20.0, 30.0 + seed]})
            for loss in ("trades", "ikl") for seed in (0, 1)}
    fig = P.adversarial_curves(hist)
    means = [t for t in fig.data if t.meta and t.meta.get("kind") == "mean"]
    assert isinstance(fig, go.Figure) and len(means) == 4  # 2 losses x 2 panels
    ikl_robust = next(t for t in means if t.meta == {"loss": "ikl", "metric": "test_robust_acc", "kind": "mean"})
    assert list(ikl_robust.y) == [20.0, 30.5] and ikl_robust.name == "IKL-AT"

    curves = pd.DataFrame({"loss": ["trades"] * 4, "seed": [0, 0, 1, 1], "epsilon": [0.0, 0.1] * 2,
                           "accuracy": [90.0, 50.0, 92.0, 54.0]})
    fig = P.robustness_vs_epsilon(curves, train_epsilon=0.1)
    assert list(fig.data[0].y) == [91.0, 52.0] and list(fig.data[0].error_y.array) == pytest.approx([2 ** 0.5, 8 ** 0.5])

    checks = pd.DataFrame({"loss": ["ikl", "ikl"], "seed": [0, 0], "check": ["eval_mode", "gradient_masking"],
                           "status": ["fail", "warn"], "detail": ["x", "y"]})
    fig = P.sanity_check_table(checks)
    assert [list(r) for r in fig.data[0].z] == [[2, 1]]
    assert [list(r) for r in fig.data[0].text] == [["FAIL", "WARN"]]

    x = torch.rand(3, 1, 8, 8)
    fig = P.adversarial_examples(x, (x + 0.05).clamp(0, 1), [1, 2, 3], [1, 2, 3], [4, 2, 5], n=3, epsilon=0.1)
    assert len(fig.data) == 9 and fig.layout.annotations[0].text == "y=1: 1 → 4"

    table = comparison_table()
    fig = P.adversarial_comparison_bars(table)
    bars = [t for t in fig.data if t.type == "bar"]             # per metric: ours, then the paper's
    assert [list(t.y) for t in bars] == [[95.0], [84.8], [80.0], [57.09]]
    assert [t.marker.pattern.shape for t in bars] == ["", "/", "", "/"]  # the paper's bars are hatched


def _mlp64(d, seed=2):
    return A.normalized(M.build_model("mlp", 3, seed=seed, in_shape=(1, 6, 6), hidden=(8,)).double(), d)


def _data64(**kw):
    args = dict(n_train=24, n_test=30, num_classes=3, image_shape=(1, 6, 6), noise=0.4, seed=5, dtype=torch.float64)
    args.update(kw)
    return D.synthetic(**args)


def _one_batch_epochs(model, d, *, seed, epsilons, steps, step_fraction):
    """What adversarial_train draws when one batch is a whole epoch, written out: per epoch (ε of ``epsilons``)
    the shuffled batch x, y and its TRADES perturbation by ``model`` as it is then, started from the trainer's
    own noise (generator seed + 2_000_003). A generator: step the model between its items."""
    order, starts = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 2_000_003)
    for eps in epsilons:
        idx = torch.randperm(d.n_train, generator=order)
        x, y = d.x_train[idx], d.y_train[idx]
        noise = torch.randn(x.shape, generator=starts, dtype=torch.float32)
        yield x, y, A.trades_perturb(model, x, epsilon=eps, steps=steps, step_size=step_fraction * eps, start_noise=noise)


def _assert_same_parameters(trained, by_hand):
    for (name, a), b in zip(trained.named_parameters(), by_hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_adversarial_train_equals_its_steps_written_out():
    """Two epochs of one batch each against the same steps done by hand: batch order, attack start,
    the TRADES inner PGD at the epoch's ε (increasing schedule) with step attack_step_fraction · ε_e,
    the outer loss, SGD with momentum, Nesterov and weight decay, lr × lr_decay at the milestone, and
    the natural / adversarial training accuracy (non-default values, so that each one counts)."""
    d = _data64()
    opt_kw = dict(lr=0.2, momentum=0.8, nesterov=True, weight_decay=0.01)
    res = T.adversarial_train(_mlp64(d), d, loss="trades", epsilon=0.3, epsilon_schedule="increasing", attack_steps=2,
                              attack_step_fraction=0.5, epochs=2, milestones=[1], lr_decay=0.5, batch_size=24,
                              seed=3, eval_samples=0, progress=False, device="cpu", **opt_kw)
    model = _mlp64(d)
    opt = torch.optim.SGD(model.parameters(), **opt_kw)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.5)
    accs = []
    epsilons = [0.3 * epoch / 2 for epoch in (1, 2)]  # the increasing schedule
    batches = _one_batch_epochs(model, d, seed=3, epsilons=epsilons, steps=2, step_fraction=0.5)
    for epoch, eps, row, (x, y, x_adv) in zip((1, 2), epsilons, res.history, batches):
        nat, adv = model(x), model(x_adv)
        accs.append((100 * (nat.argmax(1) == y).double().mean().item(), 100 * (adv.argmax(1) == y).double().mean().item()))
        assert row["epsilon"] == pytest.approx(eps) and row["lr"] == pytest.approx(0.2 * 0.5 ** (epoch - 1))
        assert (row["train_acc"], row["train_adv_acc"]) == pytest.approx(accs[-1])
        loss = sum(T.adversarial_loss_terms("trades", adv, nat, y).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert any(a != b for a, b in accs)  # the adversarial accuracy is its own number here
    _assert_same_parameters(res.model, model)


@pytest.mark.parametrize("gi", [True, False])
def test_adversarial_train_ikl_equals_its_steps_written_out(gi):
    """IKL-AT, two epochs of one batch, with α, β, T and T_w other than the defaults: the TRADES inner PGD,
    then CE + the literal IKL-AT loss (_ikl_oracle) with GI's prior (uniform in epoch 1, then the class mean of
    softmax(natural logits / T_w) of epoch 1) or sample-wise weights, then SGD."""
    from dkl_lib.prior import ClassPrior

    d = _data64()
    kw = dict(alpha=3.0, beta=2.0, temperature=2.0, weight_temperature=3.0)
    res = T.adversarial_train(_mlp64(d), d, loss="ikl", gi=gi, epsilon=0.3, attack_steps=2, epochs=2, lr=0.1,
                              momentum=0.0, weight_decay=0.0, batch_size=24, seed=3, eval_samples=0, progress=False,
                              device="cpu", class_prior=ClassPrior(3, dtype=torch.float64) if gi else None, **kw)
    model = _mlp64(d)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0, weight_decay=0.0)
    prior = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    for x, y, x_adv in _one_batch_epochs(model, d, seed=3, epsilons=(0.3, 0.3), steps=2, step_fraction=0.25):
        nat, adv = model(x), model(x_adv)
        wmse, soft_ce = _ikl_oracle(adv, nat, y, prior=prior if gi else None, **kw)
        loss = F.cross_entropy(nat, y) + wmse + soft_ce
        if gi:
            probs = torch.softmax(nat.detach() / 3.0, dim=1)
            prior = torch.stack([probs[y == c].mean(0) for c in range(3)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    _assert_same_parameters(res.model, model)
    if gi:
        torch.testing.assert_close(res.priors[2], prior, rtol=1e-12, atol=1e-15)  # after epoch 2


def test_the_attack_runs_in_eval_mode_and_the_outer_step_in_train_mode():
    """Per batch: the inner maximisation's forwards (the natural prediction, then one per step) in eval mode,
    the outer loss's two forwards (natural, adversarial) in train mode, so BatchNorm learns its statistics
    from the training batches and the attack sees fixed ones."""
    d = _data64(n_train=24)
    model = A.normalized(M.build_model("small_cnn", 3, seed=0, width=4, in_channels=1).double(), d)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn
    before = [m.running_mean.clone() for m in bn]
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    T.adversarial_train(model, d, loss="trades", epsilon=0.3, attack_steps=3, epochs=1, batch_size=12, eval_samples=0,
                        progress=False, device="cpu")
    # per batch, at least 1 + 3 forwards of the attack in eval mode, then exactly the two train-mode forwards
    # (then the epoch's own evaluation, in eval mode)
    runs = re.findall(r"e+|T+", "".join("T" if training else "e" for training in modes))
    assert runs[1] == runs[3] == "TT" and len(runs) == 5, runs
    assert len(runs[0]) >= 4 and len(runs[2]) >= 4
    assert all(not torch.equal(m.running_mean, b) for m, b in zip(bn, before))


def test_ikl_at_prior_is_the_class_mean_of_the_natural_softmax_at_t_w():
    """GI: after one epoch (one batch) the prior is the per-class mean of softmax(f(x) / T_w) of the
    NATURAL logits at T_w = 4 (the official code), not of the adversarial ones or at T = 1."""
    d = _data64()
    model = _mlp64(d)
    with torch.no_grad():
        p = torch.softmax(model(d.x_train) / 4.0, dim=1)
    want = torch.stack([p[d.y_train == c].mean(0) for c in range(3)])
    res = T.adversarial_train(model, d, loss="ikl", epsilon=0.3, attack_steps=2, epochs=1, batch_size=24,
                              eval_samples=0, progress=False, device="cpu")
    torch.testing.assert_close(res.priors[1].double(), want, rtol=1e-5, atol=1e-6)


def test_the_robust_accuracy_counts_only_samples_whose_clean_input_is_right(monkeypatch):
    """test_robust_acc = clean correct AND every PGD iterate correct: an attack that breaks nothing
    gives the clean accuracy, not 100 %."""
    def breaks_nothing(model, x, y, **kw):
        return A.PGDResult(x_adv=x.clone(), correct=torch.ones(x.shape[0], dtype=torch.bool, device=x.device))

    monkeypatch.setattr(T, "pgd", breaks_nothing)
    d = _data64()
    res = T.adversarial_train(_mlp64(d), d, loss="trades", epsilon=0.1, attack_steps=1, epochs=1, batch_size=24,
                              eval_samples=None, progress=False, device="cpu")
    row = res.history[0]
    assert row["test_acc"] < 100.0 and row["test_robust_acc"] == pytest.approx(row["test_acc"])


def test_a_diverging_adversarial_run_stops_with_an_error_naming_the_epoch():
    _, d = _tiny()
    model = A.normalized(M.build_model("mlp", 4, seed=0, in_shape=(1, 8, 8), hidden=(8,)), d)
    with pytest.raises(FloatingPointError, match="non-finite in epoch 1"):
        T.adversarial_train(model, d, loss="ce", epsilon=0.1, epochs=2, batch_size=16, lr=1e30, eval_samples=0,
                            progress=False, device="cpu")


def test_the_progress_bar_says_when_a_run_is_being_evaluated(tmp_path, capsys):
    """After training, the robustness evaluation (as long as training in the paper's setting) shows on
    the runs bar, instead of the last epoch's numbers standing still."""
    E.run_adv_grid(["trades"], [0], overrides={**TINY, "eval.ensemble": False}, cache_dir=tmp_path, device="cpu",
                   progress=True)
    err = capsys.readouterr().err
    assert "trades seed 0: evaluating PGD" in err and "evaluating PGD+ensemble" not in err


@pytest.mark.parametrize("loss", ["trades", "ikl"])
def test_an_adversarial_run_whose_logits_blow_up_says_it_diverged(loss):
    _, d = _tiny()
    model = A.normalized(M.build_model("mlp", 4, seed=0, in_shape=(1, 8, 8), hidden=(8,)), d)
    with pytest.raises(FloatingPointError, match=r"diverged: the logits became non-finite in epoch 1 .*now 1e\+30"):
        T.adversarial_train(model, d, loss=loss, epsilon=0.1, attack_steps=1, epochs=2, batch_size=16, lr=1e30,
                            eval_samples=0, progress=False, device="cpu")
