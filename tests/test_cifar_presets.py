"""The CIFAR presets end to end on a miniature CIFAR folder: torchvision's file layout with a few dozen
random images (torchvision's checksums bypassed), so what ``gpu-short`` and the released-teacher path
run is exercised on the CPU without the real data set or a network. One epoch; accuracies mean nothing
here (random labels): the checks are on what runs, what is loaded, cached, checkpointed and written."""
import json
import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar

from dkl_lib import configs as C
from dkl_lib import data as D
from dkl_lib import experiments as E
from dkl_lib import models as M
from dkl_lib import train as T


def _pickle(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def write_mini_cifar(root, name, *, n_train, n_test, seed=0):
    """CIFAR-10/100 files as torchvision reads them: pickled dicts of uint8 rows (N, 3072)."""
    rng = np.random.default_rng(seed)
    classes = 100 if name == "cifar100" else 10
    label_key = "fine_labels" if name == "cifar100" else "labels"

    def batch(n):
        return {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                label_key: [int(c) for c in rng.integers(0, classes, size=n)]}

    if name == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        _pickle(folder / "train", batch(n_train))
        _pickle(folder / "test", batch(n_test))
        _pickle(folder / "meta", {"fine_label_names": [f"class{i}" for i in range(100)]})
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            _pickle(folder / f"data_batch_{i}", batch(n_train // 5))
        _pickle(folder / "test_batch", batch(n_test))
        _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})


@pytest.fixture
def mini_cifar(tmp_path, monkeypatch, no_network):
    root = tmp_path / "data"
    write_mini_cifar(root, "cifar100", n_train=48, n_test=24)
    write_mini_cifar(root, "cifar10", n_train=40, n_test=20)
    monkeypatch.setenv("DKL_DATA_DIR", str(root))
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)  # CIFAR100 inherits it
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    return root


def cli(tmp_path, *args):
    out = tmp_path / "out"
    status = E.main([*args, "--seeds", "0", "--epochs", "1", "--device", "cpu", "--quiet",
                     "--cache-dir", str(tmp_path / "runs"), "--out", str(out)])
    assert status == 0
    return json.loads((out / "results.json").read_text()), out


def test_gpu_short_kd_on_mini_cifar100_with_the_released_teacher_layout(tmp_path, mini_cifar):
    """The newcomer's path: CIFAR-100 files in data/downloads, the RepDistiller teacher file beside them."""
    teacher = M.build_model("resnet32x4", 100, seed=5)
    folder = mini_cifar / "teachers" / "resnet32x4_vanilla"
    folder.mkdir(parents=True)
    torch.save({"model": teacher.state_dict(), "epoch": 240}, folder / "ckpt_epoch_240.pth")
    expected_teacher_acc = T.evaluate(teacher, D.cifar("cifar100"), amp=False)

    res, out = cli(tmp_path, "kd", "--preset", "gpu-short", "--losses", "ce,kl,ikl")
    assert res["teacher"]["source"] == "checkpoint" and res["teacher"]["acc"] == pytest.approx(expected_teacher_acc)
    assert [(r["loss"], r["seed"], r["epochs"]) for r in res["runs"]] == [("ce", 0, 1), ("kl", 0, 1), ("ikl", 0, 1)]
    cfg = res["config"]
    assert cfg["data"]["name"] == "cifar100" and cfg["student"]["model"] == "resnet8x4"
    assert cfg["teacher"]["model"] == "resnet32x4" and cfg["checkpoint_every"] == 1
    assert all(0.0 <= r["best_acc"] <= 100.0 for r in res["runs"])
    runs = tmp_path / "runs"
    # three students cached, the teacher too; their per-epoch checkpoints deleted once cached
    assert len(list(runs.glob("student-*"))) == 3 and len(list(runs.glob("teacher-*"))) == 1
    assert not list(runs.glob("*/checkpoints"))
    entry = json.loads(next(runs.glob("student-*/entry.json")).read_text())
    assert entry["result"]["ran_on"]["device"] == "cpu"
    assert "results.csv" in {p.name for p in out.iterdir()}

    again, _ = cli(tmp_path, "kd", "--preset", "gpu-short", "--losses", "ce,kl,ikl")
    assert [r["cached"] for r in again["runs"]] == [True] * 3 and again["teacher"]["source"] == "cache"
    assert [r["best_acc"] for r in again["runs"]] == [r["best_acc"] for r in res["runs"]]


def test_gpu_short_kd_trains_its_teacher_without_the_file(tmp_path, mini_cifar):
    with pytest.warns(UserWarning, match="training a teacher"):
        res, _ = cli(tmp_path, "kd", "--preset", "gpu-short", "--losses", "kl")
    assert res["teacher"]["source"] == "trained" and res["teacher"]["ran_on"]["device"] == "cpu"
    assert res["runs"][0]["epochs"] == 1 and not list((tmp_path / "runs").glob("*/checkpoints"))


def test_gpu_short_adv_on_mini_cifar10(tmp_path, mini_cifar):
    """PreActResNet-18 at eps = 8/255 for one epoch, then the whole evaluation (PGD-k, ART ensemble,
    sanity checks) on a few test images; attacks shortened so that it takes seconds."""
    res, _ = cli(tmp_path, "adv", "--preset", "gpu-short", "--losses", "trades,ikl",
                 "--override", "train.attack_steps=2", "--override", "train.eval_samples=4",
                 "--override", "train.eval_steps=2", "--override", "eval.samples=6",
                 "--override", "eval.pgd_steps=[2,4]", "--override", "eval.apgd_iters=3",
                 "--override", "eval.square_queries=5")
    assert res["config"]["data"]["name"] == "cifar10" and res["config"]["model"]["name"] == "preact_resnet18"
    assert [(r["loss"], r["seed"]) for r in res["runs"]] == [("trades", 0), ("ikl", 0)]
    assert res["passed"] is True
    for run in res["runs"]:
        assert {"clean_acc", "pgd2_acc", "pgd4_acc", "ensemble_acc", "robust_acc"} <= set(run)
        assert run["report"]["epsilon"] == pytest.approx(8 / 255) and run["report"]["n"] == 6
        assert all(c["status"] in ("pass", "warn") for c in run["report"]["checks"]), run["report"]["checks"]
    assert not list((tmp_path / "runs").glob("*/checkpoints"))


KD_CONFIGS = sorted(C.config_dir().glob("kd_cifar100_*.yaml"))


@pytest.mark.parametrize("path", KD_CONFIGS, ids=lambda p: p.stem)
def test_each_kd_config_runs_with_its_released_teacher_file(tmp_path, mini_cifar, path):
    """configs/kd_*.yaml as the README's full-run command, cut to one epoch: the teacher file named
    by the config is loaded (strict keys and shapes), and every loss of the config trains."""
    cfg = C.load_config(path)
    tcfg = cfg["resolved"]["teacher"]
    teacher = M.build_model(tcfg["model"], 100, seed=3)
    target = mini_cifar / tcfg["checkpoint"]
    target.parent.mkdir(parents=True)
    torch.save({"model": teacher.state_dict()}, target)
    res, _ = cli(tmp_path, "kd", "--config", str(path), "--override", "distill.batch_size=16")  # + --epochs 1
    assert res["teacher"]["source"] == "checkpoint"
    assert res["teacher"]["acc"] == pytest.approx(T.evaluate(teacher, D.cifar("cifar100"), amp=False))
    assert [r["loss"] for r in res["runs"]] == cfg["losses"] and all(r["epochs"] == 1 for r in res["runs"])
    assert res["config"]["student"]["model"] == cfg["resolved"]["student"]["model"]
