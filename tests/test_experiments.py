"""dkl_lib.experiments: presets, the cache (hit, miss, corruption), run_grid, the CLI, paper numbers."""
import csv
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.backends.cpu as cpu_backend

from dkl_lib import data as D
from dkl_lib import experiments as E
from dkl_lib._checks import check_seeds

# digits with 100 training images, a narrow teacher, one epoch each: a grid takes about a second
TINY = {"data.n_train": 100, "teacher.model_kw.width": 4, "teacher.train.epochs": 1, "distill.epochs": 1,
        "distill.batch_size": 50}
REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------- presets
def test_paper_preset_is_the_official_schedule():
    p = E.preset("paper")
    d = p["distill"]
    assert (d["lr"], d["momentum"], d["weight_decay"]) == (0.05, 0.9, 5e-4)
    assert (d["batch_size"], d["epochs"]) == (64, 240)
    assert d["milestones"] == [150, 180, 210] and d["lr_decay"] == 0.1
    assert d["temperature"] == 4.0 and d["warmup_epochs"] == 20
    pair = (p["teacher"]["model"], p["student"]["model"], p["data"]["name"])
    assert pair == ("resnet32x4", "resnet8x4", "cifar100")
    assert E.preset("gpu-short")["distill"]["epochs"] < 240
    assert E.preset("cpu-quick")["data"]["name"] == "digits"
    E.preset("paper")["distill"]["epochs"] = 1
    assert E.PRESETS["paper"]["distill"]["epochs"] == 240  # preset() hands out copies


def test_resolve_config_overrides_and_errors():
    cfg = E.resolve_config("cpu-quick", {"distill.epochs": 2, "losses.ikl.alpha": 3.0,
                                         "losses.kl.temperature": 2.0, "data": {"name": "synthetic"}})
    assert cfg["distill"]["epochs"] == 2 and cfg["losses"]["ikl"]["alpha"] == 3.0
    assert cfg["losses"]["kl"]["temperature"] == 2.0 and cfg["data"] == {"name": "synthetic"}
    with pytest.raises(ValueError, match="unknown preset"):
        E.resolve_config("cpu-slow")
    with pytest.raises(ValueError, match="unknown config key"):
        E.resolve_config("cpu-quick", {"distill.epoch": 2})
    with pytest.raises(ValueError, match="unknown config key"):
        E.resolve_config("cpu-quick", {"trainer.epochs": 2})
    with pytest.raises(ValueError, match="per-loss setting"):
        E.resolve_config("cpu-quick", {"losses.ikl.alfa": 2})
    with pytest.raises(ValueError, match="unknown loss 'ikll'"):
        E.resolve_config("cpu-quick", {"losses.ikll.alpha": 2})
    cfg = E.resolve_config("cpu-quick", {"distill.nesterov": True, "teacher.train.drop_last": True})
    assert cfg["distill"]["nesterov"] is True and cfg["teacher"]["train"]["drop_last"] is True


@pytest.mark.parametrize("override,error,needle", [
    ({"distill.temperature": 0}, ValueError, "distill.temperature must be > 0"),
    ({"distill.lr": "abc"}, TypeError, "distill.lr must be a real number, got str"),
    ({"distill.epochs": -1}, ValueError, "distill.epochs must be a positive integer, got -1"),
    ({"distill.epochs": 2.5}, ValueError, "distill.epochs must be a positive integer"),
    ({"losses.ikl.alpha": -3}, ValueError, "losses.ikl.alpha must be >= 0"),
    ({"losses.gkl.gamma": 0}, ValueError, "losses.gkl.gamma must be > 0"),
    ({"distill": 3}, TypeError, "distill must be a mapping"),
    ({"distill": {"lr": 0.1}}, ValueError, r"distill lacks the setting\(s\) \['distill.epochs'\]"),
    ({"distill.milestones": [5, 3]}, ValueError, "distill.milestones must be strictly increasing"),
    ({"distill.momentum": 1.0}, ValueError, "distill.momentum must be < 1"),
    ({"distill.nesterov": "yes"}, TypeError, "distill.nesterov must be true or false"),
    ({"distill.temperature": float("inf")}, ValueError, "distill.temperature must be a finite number"),
    ({"teacher.train.batch_size": 0}, ValueError, "teacher.train.batch_size must be a positive integer"),
    ({"teacher.model_kw.width": float("nan")}, ValueError, "teacher.model_kw.width must be a finite number"),
    ({"student.model": "resnet8x5"}, ValueError, "student.model must be one of"),
    ({"student.dtype": "float16"}, ValueError, "student.dtype: model dtype must be one of"),
    ({"data": {"name": "mnist"}}, ValueError, "data.name must be one of"),
])
def test_resolve_config_checks_types_and_ranges_naming_the_key(override, error, needle):
    with pytest.raises(error, match=needle):
        E.resolve_config("cpu-quick", override)


def test_model_arguments_are_checked_before_anything_trains():
    """A misspelt or foreign model_kw key is refused when the config is resolved (it used to surface when
    the student was built, after the teacher had trained), naming the key and the model's arguments."""
    with pytest.raises(ValueError, match=r"student.model_kw.widht: not an argument of model 'mlp' \(its "
                                         r"arguments: in_shape, hidden\)"):
        E.resolve_config("cpu-quick", {"student.model_kw.widht": 8})
    with pytest.raises(ValueError, match=r"teacher.model_kw.width: not an argument of model 'resnet32x4' \(it takes"):
        E.resolve_config("gpu-short", {"teacher.model_kw.width": 2})
    with pytest.raises(ValueError, match=r"model.model_kw.depth: not an argument of model 'small_cnn'"):
        E.resolve_adv_config("cpu-quick", {"model.model_kw.depth": 3})
    assert E.resolve_config("cpu-quick", {"student.model_kw.hidden": [8]})["student"]["model_kw"] == {"hidden": [8]}


def test_model_argument_values_are_checked_before_anything_trains():
    """The values too, by the model's own constructor (on the meta device): hidden=16 or "16" (which
    tuple() would have split into the layers 1 and 6) and a zero width are named with their section."""
    for value, error, needle in [("16", TypeError, "hidden must be a sequence of integers such as \\(32,\\)"),
                                 (16, TypeError, "hidden must be a sequence of integers"),
                                 ([8, 0], ValueError, "hidden width must be >= 1, got 0"),
                                 ([8.5], TypeError, "hidden width must be an integer, got 8.5")]:
        with pytest.raises(error, match="student.model_kw: " + needle):
            E.resolve_config("cpu-quick", {"student.model_kw.hidden": value})
    with pytest.raises(ValueError, match="teacher.model_kw: width must be >= 1, got 0"):
        E.resolve_config("cpu-quick", {"teacher.model_kw.width": 0})
    with pytest.raises(TypeError, match="model.model_kw: width must be an integer, got '8'"):
        E.resolve_adv_config("cpu-quick", {"model.model_kw.width": "8"})


def test_settings_that_would_be_silently_ignored_are_refused():
    """A per-loss setting the loss does not take (kl's alpha; the CE baseline's KD weights, which it
    drops) and the top-level preset name would be accepted and change nothing, not even the cache
    key; they are errors. A whole section for a loss the preset does not list is allowed."""
    for override, needle in [({"losses.kl.alpha": 2.0}, r"losses.kl.alpha: not a setting of kl \(its loss "
                                                          r"hyper-parameters: temperature\)"),
                             ({"losses.ce.ce_weight": 0.01}, r"losses.ce.ce_weight: not a setting of ce \(the CE "
                                                             r"baseline trains without a teacher"),
                             ({"losses.dkl": {"gamma": 2.0}}, r"losses.dkl.gamma: not a setting of dkl"),
                             ({"preset": "paper"}, r"unknown config key 'preset'.*--preset on the command line"),
                             ({"description": "mine"}, r"unknown config key 'description'")]:
        with pytest.raises(ValueError, match=needle):
            E.resolve_config("cpu-quick", override)
    cfg = E.resolve_config("cpu-quick", {"losses.kl": {"temperature": 2.0}, "losses.ce.lr": 0.01})
    assert E._run_config(cfg, "kl", 0, "t")["distill"]["temperature"] == 2.0
    assert E._run_config(cfg, "ce", 0, "t")["distill"]["lr"] == 0.01


def test_a_whole_number_for_a_real_setting_is_the_same_run_as_its_float():
    """temperature 4 (YAML, --override) and the preset's 4.0 are one run: one cache key, not two."""
    cfg = E.resolve_config("cpu-quick")
    same = E.resolve_config("cpu-quick", {"distill.temperature": 4, "losses.dkd.beta": 1, "teacher.train.momentum": 0})
    assert same["distill"]["temperature"] == 4.0 and isinstance(same["distill"]["temperature"], float)
    assert isinstance(same["teacher"]["train"]["momentum"], float)
    assert E._run_config(same, "kl", 0, "t") == E._run_config(cfg, "kl", 0, "t")
    assert E.config_hash(E._run_config(same, "dkd", 0, "t")) == E.config_hash(E._run_config(cfg, "dkd", 0, "t"))
    assert same["distill"]["epochs"] == 30 and isinstance(same["distill"]["epochs"], int)  # counts stay integers
    adv = E.resolve_adv_config("cpu-quick", {"eval.masking_gap": 10, "losses.trades.beta": 6})
    assert adv["eval"]["masking_gap"] == 10.0 and isinstance(adv["losses"]["trades"]["beta"], float)
    assert E._adv_run_config(adv, "ce", 0) == E._adv_run_config(E.resolve_adv_config("cpu-quick"), "ce", 0)


def test_data_settings_are_checked_per_data_set(tmp_path, monkeypatch, capsys):
    """Switching the data set with data.name keeps the preset's other data settings; one the new data
    set's loader does not take is named with the data set, before anything is loaded or trained."""
    need = r"data.seed, data.n_train are not settings of cifar100 \(its settings: root\).*data=\{\"name\": \"cifar100\"\}"
    with pytest.raises(ValueError, match=need):
        E.resolve_config("cpu-quick", {"data.name": "cifar100"})
    with pytest.raises(ValueError, match=r"data.n_train is not a setting of cifar10 \(its settings: root\)"):
        E.resolve_adv_config("gpu-short", {"data.n_train": 100})
    with pytest.raises(ValueError, match=r"data.size is not a setting of digits \(its settings: n_test, n_train, seed\)"):
        E.resolve_config("cpu-quick", {"data.size": 8})
    assert E.resolve_config("cpu-quick", {"data": {"name": "cifar100"}})["data"] == {"name": "cifar100"}
    E.resolve_adv_config("cpu-quick", {"data": {"name": "synthetic", "n_train": 20, "num_classes": 3}})
    monkeypatch.setattr(E.data_mod, "cifar", lambda *a, **k: pytest.fail("loaded the data before checking it"))
    argv = ["kd", "--preset", "cpu-quick", "--override", "data.name=cifar100", "--epochs", "1", "--seeds", "0",
            "--losses", "kl", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path), "--quiet"]
    assert E.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.seed, data.n_train are not settings of cifar100") and err.count("\n") == 1
    # a config's preset replaced by --preset (documented: the command line wins): the same clear error
    config = str(REPO / "configs" / "kd_cifar100_resnet32x4_resnet8x4.yaml")
    assert E.main(["kd", "--config", config, "--preset", "cpu-quick", "--epochs", "1", "--out", str(tmp_path / "o"),
                   "--cache-dir", str(tmp_path), "--quiet"]) == 2
    assert "data.seed, data.n_train are not settings of cifar100" in capsys.readouterr().err


def test_every_preset_passes_the_checks_unchanged():
    for name in E.PRESETS:
        assert E.resolve_config(name) == {**E.preset(name), "preset": name}
    E.resolve_config("cpu-quick", {"losses.ikl.weight_temperature": None, "teacher.checkpoint": "t.pth",
                                    "distill": {"epochs": 2}, "student.dtype": "float64"})


def test_run_grid_checks_the_config_and_the_seeds_before_training_the_teacher(tmp_path, monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before the config was checked")

    monkeypatch.setattr(E.train_mod, "train_teacher", no_training)
    monkeypatch.setattr(E.train_mod, "distill", no_training)
    with pytest.raises(ValueError, match="distill.temperature must be > 0"):
        E.run_grid(["kl"], [0], overrides={**TINY, "distill.temperature": 0}, cache_dir=tmp_path, device="cpu",
                   progress=False)
    # a repeated seed would be one run counted twice: n = 2 and a false "± 0.00"
    with pytest.raises(ValueError, match=r"seeds lists a seed twice \(0 in \[0, 0\]\)"):
        E.run_grid(["kl"], [0, 0], overrides=TINY, cache_dir=tmp_path, device="cpu", progress=False)
    base = ["kd", "--losses", "kl", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path), "--quiet",
            "--device", "cpu"]
    assert E.main(base + ["--seeds", "1,2,1"]) == 2
    assert "seeds lists a seed twice (1 in [1, 2, 1])" in capsys.readouterr().err
    assert E.main(base + ["--seeds", "0", "--override", "distill.temperature=0"]) == 2
    assert "distill.temperature must be > 0" in capsys.readouterr().err
    # a repeated loss likewise (names as the grid reads them: trimmed, lower case)
    with pytest.raises(ValueError, match=r"losses lists 'kl' twice \(in \['kl', 'dkl', 'KL '\]\)"):
        E.run_grid(["kl", "dkl", "KL "], [0], overrides=TINY, cache_dir=tmp_path, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"losses lists 'trades' twice"):
        E.run_adv_grid(["trades", "ce", "Trades"], [0], cache_dir=tmp_path, device="cpu", progress=False)
    assert E.main(["kd", "--losses", "kl,ikl,kl", "--seeds", "0"] + base[3:]) == 2
    assert "losses lists 'kl' twice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("teacher-*"))


def test_seeds_may_be_numpy_integers():
    import numpy as np

    seeds = check_seeds("seeds", np.arange(3))
    assert seeds == [0, 1, 2] and all(type(s) is int for s in seeds)
    with pytest.raises(ValueError, match="non-negative integers"):
        check_seeds("seeds", np.array([0.5]))


def test_config_hash_is_canonical():
    assert E.config_hash({"a": 1, "b": [1, 2]}) == E.config_hash({"b": [1, 2], "a": 1})
    assert E.config_hash({"a": 1}) != E.config_hash({"a": 1.5})
    assert len(E.config_hash({})) == 64


def test_run_config_hash_covers_only_what_the_loss_uses():
    cfg = E.resolve_config("cpu-quick")
    kl = E._run_config(cfg, "kl", 0, "t")
    cfg2 = E.resolve_config("cpu-quick", {"losses.dkd.beta": 5.0})
    assert E.config_hash(E._run_config(cfg2, "kl", 0, "t")) == E.config_hash(kl)
    assert E.config_hash(E._run_config(cfg2, "dkd", 0, "t")) != E.config_hash(E._run_config(cfg, "dkd", 0, "t"))
    assert E.config_hash(E._run_config(cfg, "kl", 1, "t")) != E.config_hash(kl)
    assert E._run_config(cfg, "ikl", 0, "t")["distill"]["gi"] is True
    assert E._run_config(cfg, "ikl-nogi", 0, "t")["distill"]["gi"] is False
    assert "gi" not in E._run_config(cfg, "dkl", 0, "t")["distill"]
    with pytest.raises(ValueError, match="unknown loss"):
        E._run_config(cfg, "kl-nogi", 0, "t")
    # the CE baseline uses no teacher and no KD weights: one run whatever the teacher
    ce = E._run_config(cfg, "ce", 0, "t")
    assert ce["teacher_key"] is None and ce == E._run_config(cfg, "ce", 0, "u")
    assert not {"ce_weight", "kd_weight", "warmup_epochs", "temperature"} & set(ce["distill"])


def test_run_config_hash_changes_with_everything_a_run_depends_on():
    """The data, the student, the teacher, the seed and every distillation setting each give another key."""
    cfg = E.resolve_config("cpu-quick")
    changed = [E._run_config(cfg, "kl", 0, "t"), E._run_config(cfg, "kl", 1, "t"), E._run_config(cfg, "kl", 0, "u"),
               E._run_config(cfg, "dkl", 0, "t")]
    overrides = [{"data.n_train": 300}, {"data.seed": 1}, {"student.model_kw.hidden": [32]},
                 {"student.model": "small_cnn", "student.model_kw": {}}, {"distill.lr": 0.02},
                 {"distill.batch_size": 64}, {"distill.temperature": 2.0}, {"distill.warmup_epochs": 0},
                 {"distill.milestones": [18]}]
    for override in overrides:
        changed.append(E._run_config(E.resolve_config("cpu-quick", override), "kl", 0, "t"))
    keys = [E.config_hash(c) for c in changed]
    assert len(set(keys)) == len(keys)


def test_source_fingerprint_follows_every_byte_but_not_line_endings(tmp_path):
    a, b = tmp_path / "losses.py", tmp_path / "train.py"
    a.write_bytes(b"def f(x):\n    return x * 2\n")
    b.write_bytes(b"import torch\n")
    key = E._source_fingerprint([a, b])
    assert len(key) == 16 and key == E._source_fingerprint([a, b])
    a.write_bytes(b"def f(x):\r\n    return x * 2\r\n")  # the same code checked out on Windows
    assert E._source_fingerprint([a, b]) == key
    a.write_bytes(b"def f(x):\n    return x * 3\n")  # one byte of a loss
    assert E._source_fingerprint([a, b]) != key
    a.write_bytes(b"def f(x):\n    return x * 2\n")
    assert E._source_fingerprint([b, a]) != key and E._source_fingerprint([a, tmp_path / "gone.py"]) != key


def test_every_cache_key_holds_the_code_of_the_modules_that_decide_results(monkeypatch):
    import dkl_lib

    package = Path(dkl_lib.__file__).parent
    files = [package / f"{name}.py" for name in E.RESULT_MODULES]
    library = f"{dkl_lib.__version__}+{E._source_fingerprint(files)}"
    assert E._library_version() == library
    cfg = E.resolve_config("cpu-quick")
    tcfg, _ = E._teacher_config(cfg)
    configs = [tcfg, E._run_config(cfg, "kl", 0, "t")]
    assert all(c["library"] == library for c in configs)
    keys = [E.config_hash(c) for c in configs]
    monkeypatch.setattr(E, "_CODE_KEY", "0123456789abcdef")  # as after an edit of a loss, in a new process
    assert E.config_hash(E._teacher_config(cfg)[0]) != keys[0]
    assert E.config_hash(E._run_config(cfg, "kl", 0, "t")) != keys[1]


def test_result_modules_list_every_library_module_they_import():
    """A module that training code imports (at the top or inside a function) decides results too, so it must be
    listed; the exceptions only label or parse (their output is in the config, which is hashed)."""
    import ast
    import dkl_lib

    package = Path(dkl_lib.__file__).parent
    labels_only = {"plots": "ADV_LOSS_LABELS names table columns", "configs": "a config file's values are hashed"}
    missing = {}
    for name in E.RESULT_MODULES:
        tree = ast.parse((package / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [alias.name for alias in node.names]
                for imported in names:
                    if (package / f"{imported}.py").exists() and imported not in E.RESULT_MODULES + tuple(labels_only):
                        missing.setdefault(name, set()).add(imported)
    assert not missing
    assert "plots" not in E.RESULT_MODULES and "widgets" not in E.RESULT_MODULES


def test_a_library_without_source_files_warns_that_keys_cannot_follow_edits(monkeypatch):
    monkeypatch.setattr(E, "_result_sources", lambda: [None] * len(E.RESULT_MODULES))
    with pytest.warns(E.CacheWarning, match="not all readable.*clear the cache folder"):
        assert E._code_key() == "nosource"


# -------------------------------------------------------------------------------------------- cache
def test_cache_round_trip_and_corruption(tmp_path):
    cache = E.RunCache(tmp_path)
    cfg = {"kind": "x", "n": 1}
    assert cache.load("student", cfg) is None  # miss
    folder = cache.save("student", cfg, {"acc": 1.5}, {"model.pt": {"w": torch.arange(3.0)}})
    result, files = cache.load("student", cfg)
    assert result == {"acc": 1.5} and torch.equal(files["model.pt"]["w"], torch.arange(3.0))
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries
    assert cache.load("student", {"kind": "x", "n": 2}) is None

    blob = (folder / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.warns(E.CacheWarning, match="model.pt checksum"):
        assert cache.load("student", cfg) is None
    cache.save("student", cfg, {"acc": 1.5}, {"model.pt": {"w": torch.arange(3.0)}})
    entry = folder / "entry.json"
    entry.write_text(entry.read_text().replace("1.5", "9.5"))  # edited result
    with pytest.warns(E.CacheWarning, match="entry.json checksum"):
        assert cache.load("student", cfg) is None
    entry.write_text(entry.read_text()[:40])  # truncated JSON
    with pytest.warns(E.CacheWarning, match="corrupt"):
        assert cache.load("student", cfg) is None
    assert E.RunCache(tmp_path, enabled=False).load("student", cfg) is None


def _run(tmp_path, losses=("ce", "kl", "ikl"), seeds=(0, 1), **kw):
    return E.run_grid(losses, seeds, preset="cpu-quick", overrides=dict(TINY), cache_dir=tmp_path,
                      device="cpu", progress=False, **kw)


def test_runs_made_by_other_code_are_trained_again_not_read_back(tmp_path, monkeypatch):
    first = _run(tmp_path, losses=("kl",), seeds=(0,))
    assert first.teacher["source"] == "trained" and not first.runs["cached"].any()
    assert _run(tmp_path, losses=("kl",), seeds=(0,)).runs["cached"].all()
    monkeypatch.setattr(E, "_CODE_KEY", "0123456789abcdef")  # the library's code changed since
    edited = _run(tmp_path, losses=("kl",), seeds=(0,))
    assert edited.teacher["source"] == "trained" and not edited.runs["cached"].any()
    assert len(list(tmp_path.glob("student-*"))) == 2 and len(list(tmp_path.glob("teacher-*"))) == 2


def test_run_grid_rows_summary_and_cache_hits(tmp_path):
    first = _run(tmp_path)
    runs = first.runs
    assert list(runs["loss"]) == ["ce", "ce", "kl", "kl", "ikl", "ikl"] and list(runs["seed"]) == [0, 1] * 3
    assert {"loss", "seed", "best_acc", "last_acc", "config_hash", "seconds", "cached"} <= set(runs.columns)
    assert not runs["cached"].any() and first.teacher["source"] == "trained"
    assert runs["config_hash"].nunique() == 6
    assert set(first.summary["loss"]) == {"ce", "kl", "ikl"}
    row = first.summary.set_index("loss").loc["kl"]
    kl = runs[runs["loss"] == "kl"]["best_acc"]
    assert row["best_acc_mean"] == pytest.approx(kl.mean())
    assert row["best_acc_std"] == pytest.approx(kl.std(ddof=1))
    assert "±" in row["best"]
    assert first.priors[("ikl", 0)].shape == (2, 10, 10) and ("kl", 0) not in first.priors
    assert list(first.histories[("kl", 1)]["epoch"]) == [1]
    assert len(list(tmp_path.glob("student-*"))) == 6 and len(list(tmp_path.glob("teacher-*"))) == 1

    second = _run(tmp_path)
    assert second.runs["cached"].all() and second.teacher["source"] == "cache"
    cols = ["loss", "seed", "best_acc", "last_acc", "config_hash"]
    assert second.runs[cols].equals(first.runs[cols])
    assert torch.equal(second.priors[("ikl", 1)], first.priors[("ikl", 1)])

    changed = E.run_grid(["kl"], [0], preset="cpu-quick", overrides={**TINY, "distill.lr": 0.02},
                         cache_dir=tmp_path, device="cpu", progress=False)
    assert not changed.runs["cached"].any()  # a different config is a miss


def test_runs_record_where_they_ran_but_the_cache_key_does_not(tmp_path):
    """The CPU thread count (and device, dtype, amp) is stored with each run, outside the key."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = E.run_grid(["ikl"], [0], preset="cpu-quick", overrides=TINY, cache_dir=tmp_path, device="cpu",
                           progress=False)
        torch.set_num_threads(2)
        second = E.run_grid(["ikl"], [0], preset="cpu-quick", overrides=TINY, cache_dir=tmp_path, device="cpu",
                            progress=False)
    finally:
        torch.set_num_threads(threads)
    assert first.teacher["ran_on"] == {"device": "cpu", "amp": False, "channels_last": False, "world_size": 1,
                                       "cpu_threads": 1, "dtype": "float32",
                                       "cpu_capability": cpu_backend.get_cpu_capability()}
    assert isinstance(first.teacher["ran_on"]["cpu_capability"], str) and first.teacher["ran_on"]["cpu_capability"]
    assert second.teacher["source"] == "cache" and second.teacher["ran_on"]["cpu_threads"] == 1
    assert second.runs["cached"].all()
    (entry,) = tmp_path.glob("student-*")
    assert json.loads((entry / "entry.json").read_text())["result"]["ran_on"]["cpu_threads"] == 1


def test_the_runs_bar_shows_each_runs_epoch_and_the_callback_still_decides(tmp_path, capsys):
    seen = []

    def stop_after_first_epoch(label, seed, history):
        seen.append((label, seed, len(history)))
        return False

    grid = E.run_grid(["kl"], [0], preset="cpu-quick", overrides={**TINY, "distill.epochs": 3},
                      cache_dir=tmp_path, device="cpu", progress=True, callback=stop_after_first_epoch)
    err = capsys.readouterr().err
    assert "runs: 0/1|" in err and "kl seed 0, epoch 1/3, " in err
    assert seen == [("kl", 0, 1)] and grid.runs["epochs"].tolist() == [1]


def test_corrupt_entry_is_warned_about_and_recomputed(tmp_path):
    first = _run(tmp_path, losses=("kl",), seeds=(0,))
    (entry,) = tmp_path.glob("student-*")
    model = entry / "model.pt"
    blob = bytearray(model.read_bytes())
    blob[-20] ^= 0xFF  # flip bits inside the tensor data
    model.write_bytes(bytes(blob))
    with pytest.warns(E.CacheWarning, match="recomputing"):
        again = _run(tmp_path, losses=("kl",), seeds=(0,))
    assert not again.runs["cached"].any()
    assert again.runs["best_acc"].tolist() == first.runs["best_acc"].tolist()  # same seed, same run
    with warnings.catch_warnings():
        warnings.simplefilter("error", E.CacheWarning)
        third = _run(tmp_path, losses=("kl",), seeds=(0,))  # the rewritten entry is valid again
    assert third.runs["cached"].all()


def test_interrupted_grid_keeps_finished_runs_and_caches_only_them(tmp_path):
    def cb(loss, seed, history):
        if loss == "kl" and seed == 1:
            raise KeyboardInterrupt

    with pytest.warns(UserWarning, match="interrupted"):
        grid = _run(tmp_path, losses=("kl",), seeds=(0, 1, 2), callback=cb)
    assert grid.interrupted and grid.runs["seed"].tolist() == [0]
    assert len(list(tmp_path.glob("student-*"))) == 1


def test_runs_in_worker_processes_equal_the_sequential_grid(tmp_path, monkeypatch):
    """workers=2: the students train in two spawned processes and come back through the cache with
    exactly the numbers of the one-process grid; a second call reads the cache without any process."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the teacher, the workers and the sequential students: 1 thread each
    try:
        parallel = _run(tmp_path / "par", losses=("kl", "ikl"), seeds=(0, 1), workers=2)
        serial = _run(tmp_path / "ser", losses=("kl", "ikl"), seeds=(0, 1))
    finally:
        torch.set_num_threads(torch_threads)
    cols = ["loss", "seed", "best_acc", "last_acc", "config_hash"]
    assert parallel.runs[cols].equals(serial.runs[cols]) and not parallel.runs["cached"].any()
    for key, hist in serial.histories.items():
        same = parallel.histories[key].drop(columns="seconds").sort_index(axis=1)
        assert same.equals(hist.drop(columns="seconds").sort_index(axis=1)), key
        if key in serial.priors:
            assert torch.equal(parallel.priors[key], hist_prior := serial.priors[key]) and hist_prior.shape[0] == 2
    assert {r["ran_on"]["cpu_threads"] for r in _entries(tmp_path / "par")} == {1}

    import multiprocessing

    monkeypatch.setattr(multiprocessing, "get_context", lambda *a: pytest.fail("no worker needed"))
    again = _run(tmp_path / "par", losses=("kl", "ikl"), seeds=(0, 1), workers=2)
    assert again.runs["cached"].all() and again.runs[cols].equals(parallel.runs[cols])


def _entries(folder):
    return [json.loads(p.read_text())["result"] for p in Path(folder).glob("student-*/entry.json")]


def test_worker_grid_interrupted_keeps_the_finished_runs(tmp_path, monkeypatch):
    def first_then_ctrl_c(kind, jobs, common, workers, **kw):  # one run finishes, then Ctrl-C
        E._grid_worker(kind, {**common, "threads": 1}, jobs[0])
        return {jobs[0]}, True

    monkeypatch.setattr(E, "_run_in_workers", first_then_ctrl_c)
    _run(tmp_path, losses=("kl",), seeds=(2,))  # cached before
    with pytest.warns(UserWarning, match="interrupted"):
        grid = _run(tmp_path, losses=("kl",), seeds=(0, 1, 2), workers=2)
    assert grid.interrupted and grid.runs["seed"].tolist() == [0, 2]
    assert grid.runs["cached"].tolist() == [False, True]


class _ExitsWhenUnpickled:  # a job that kills its worker process the moment the worker receives it
    def __reduce__(self):
        return (os._exit, (3,))


class _SleepsWhenUnpickled:  # a job that keeps its worker busy for a minute
    def __reduce__(self):
        import time

        return (time.sleep, (60,))


def _alarm(seconds, exc):
    import signal

    def handler(signum, frame):
        raise exc

    signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)


def test_a_dying_worker_raises_instead_of_hanging():
    from concurrent.futures.process import BrokenProcessPool

    _alarm(90, AssertionError("the grid hangs on a dead worker"))
    try:
        with pytest.raises(BrokenProcessPool):
            E._run_in_workers("kd", [_ExitsWhenUnpickled()], {}, 2, desc="", progress=False)
    finally:
        __import__("signal").alarm(0)


def test_ctrl_c_stops_the_workers_at_once():
    import time

    start = time.perf_counter()
    _alarm(8, KeyboardInterrupt())  # Ctrl-C while both workers are busy
    try:
        done, interrupted = E._run_in_workers("kd", [_SleepsWhenUnpickled(), _SleepsWhenUnpickled()], {}, 2,
                                              desc="", progress=False)
    finally:
        __import__("signal").alarm(0)
    assert interrupted and done == set() and time.perf_counter() - start < 30


def test_workers_argument_errors(tmp_path, monkeypatch):
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            _run(tmp_path, workers=bad)
    with pytest.raises(ValueError, match="use_cache=False needs workers=1"):
        _run(tmp_path, workers=2, use_cache=False)
    with pytest.raises(ValueError, match="callback needs workers=1"):
        _run(tmp_path, workers=2, callback=lambda *a: None)
    with pytest.raises(ValueError, match="callback needs workers=1"):
        E.run_adv_grid(["trades"], [0], cache_dir=tmp_path, device="cpu", progress=False, workers=2,
                       callback=lambda *a: None)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="under torchrun"):
        _run(tmp_path, workers=2)


def test_default_workers(monkeypatch):
    monkeypatch.delenv("DKL_WORKERS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert E.default_workers() == 4 and E.default_workers(cap=8) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert E.default_workers() == 1
    monkeypatch.setenv("DKL_WORKERS", "3")
    assert E.default_workers() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("DKL_WORKERS", bad)
        with pytest.raises(ValueError, match="DKL_WORKERS must be a positive integer"):
            E.default_workers()
    monkeypatch.setenv("DKL_WORKERS", "3")
    monkeypatch.setattr(E.train_mod, "select_device", lambda device=None: torch.device("cuda"))
    assert E.default_workers() == 1  # runs on a GPU go one at a time


def test_run_grid_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown loss"):
        _run(tmp_path, losses=("kl", "mse"))
    with pytest.raises(ValueError, match="seeds"):
        _run(tmp_path, seeds=())
    with pytest.raises(ValueError, match="unknown preset"):
        E.run_grid(["kl"], [0], preset="fast", cache_dir=tmp_path)


def test_cifar_preset_offline_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("DKL_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(D.DatasetNotFoundError, match="download=True"):
        E.run_grid(["kl"], [0], preset="gpu-short", cache_dir=tmp_path / "runs", device="cpu", progress=False)
    code = E.main(["kd", "--preset", "gpu-short", "--losses", "kl", "--seeds", "0", "--out",
                   str(tmp_path / "out"), "--cache-dir", str(tmp_path / "runs"), "--device", "cpu", "--quiet"])
    assert code == 2 and not (tmp_path / "out" / "results.json").exists()


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_writes_results_json_and_csv(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["kd", "--preset", "cpu-quick", "--losses", "kl,dkl", "--seeds", "0,1", "--out", str(out),
            "--cache-dir", str(tmp_path / "runs"), "--device", "cpu", "--epochs", "1"]
    for key, value in TINY.items():
        if "epochs" not in key:
            argv += ["--override", f"{key}={value}"]
    assert E.main(argv) == 0
    printed = capsys.readouterr().out
    assert "teacher accuracy" in printed and "results.csv" in printed
    payload = json.loads((out / "results.json").read_text())
    assert payload["preset"] == "cpu-quick" and payload["config"]["distill"]["epochs"] == 1
    assert [(r["loss"], r["seed"]) for r in payload["runs"]] == [("kl", 0), ("kl", 1), ("dkl", 0), ("dkl", 1)]
    assert {s["loss"] for s in payload["summary"]} == {"kl", "dkl"}
    # the theorem again: DKL (alpha = beta = 1) reproduces KL run for run
    best = [r["best_acc"] for r in payload["runs"]]
    assert best[:2] == pytest.approx(best[2:])
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"loss", "seed", "best_acc", "last_acc", "row_type"} <= set(rows[0])
    assert [r["row_type"] for r in rows] == ["run"] * 4 + ["mean", "std"] * 2
    assert rows[4]["loss"] == "kl" and float(rows[4]["best_acc"]) == pytest.approx(
        (float(rows[0]["best_acc"]) + float(rows[1]["best_acc"])) / 2, abs=1e-3)
    # the per-epoch log: a JSON line per trained epoch (the teacher's, then one epoch x 4 runs), appended as
    # they finish
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["seed"], r["epoch"]) for r in log] == [("teacher", 0, 1), ("kl", 0, 1), ("kl", 1, 1),
                                                                 ("dkl", 0, 1), ("dkl", 1, 1)]
    assert all({"time", "test_acc", "ce", "loss_value"} <= set(r) for r in log)
    assert [r["test_acc"] for r in log[1:]] == [r["last_acc"] for r in payload["runs"]]
    assert log[0]["test_acc"] == payload["teacher"]["acc"]
    assert E.main(argv) == 0  # all cached: nothing trained, nothing logged
    assert len((out / "log.jsonl").read_text().splitlines()) == 5


def test_results_csv_mean_and_std_rows_are_statistics_of_every_accuracy():
    """The std row holds the std of teacher_acc over the loss's runs (0 with one shared teacher; blank
    for one run, as best_acc's), never the teacher's accuracy itself."""
    import pandas as pd

    runs = pd.DataFrame({"loss": ["kl", "kl", "ce"], "seed": [0, 1, 0], "best_acc": [80.0, 82.0, 75.0],
                         "last_acc": [79.0, 81.0, 74.0], "teacher_acc": [98.2723] * 3})
    grid = E.GridResult(runs=runs, summary=E.summarize(runs), teacher={"acc": 98.2723})
    rows = list(csv.DictReader(E._results_csv(grid).splitlines()))
    stats = {(r["loss"], r["row_type"]): r for r in rows if r["row_type"] != "run"}
    assert stats[("kl", "mean")]["teacher_acc"] == "98.2723" and stats[("kl", "std")]["teacher_acc"] == "0.0000"
    assert stats[("kl", "std")]["best_acc"] == "1.4142" and stats[("ce", "mean")]["teacher_acc"] == "98.2723"
    assert stats[("ce", "std")]["teacher_acc"] == stats[("ce", "std")]["best_acc"] == ""


def test_summarize_adv_mean_and_std_are_the_sample_statistics_of_each_accuracy():
    """Mean and sample std (ddof = 1) over the seeds, a missing value left out; one value: std NaN."""
    import math
    import statistics

    import pandas as pd

    runs = pd.DataFrame({"loss": ["trades"] * 3 + ["ikl"], "seed": [0, 1, 2, 0],
                         "clean_acc": [80.0, 83.0, 84.5, 81.0], "robust_acc": [40.0, None, 46.0, 47.0]})
    rows = E.summarize_adv(runs).set_index("loss")
    for col, values in (("clean_acc", [80.0, 83.0, 84.5]), ("robust_acc", [40.0, 46.0])):
        assert rows.loc["trades", f"{col}_mean"] == pytest.approx(statistics.mean(values))
        assert rows.loc["trades", f"{col}_std"] == pytest.approx(statistics.stdev(values))
    assert rows.loc["ikl", "robust_acc_mean"] == 47.0 and math.isnan(rows.loc["ikl", "robust_acc_std"])
    assert rows.loc["trades", "n"] == 3 and rows.loc["ikl", "robust"] == "47.00"


def test_cli_as_a_module(tmp_path):
    """`python -m dkl_lib.experiments kd ...` in a fresh process (what the README shows), with two
    worker processes (spawned from the module's main)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dkl_lib.experiments", "kd", "--preset", "cpu-quick", "--losses", "ce,kl",
           "--seeds", "0", "--out", str(out), "--cache-dir", str(tmp_path / "runs"), "--device", "cpu",
           "--epochs", "1", "--quiet", "--override", "data.n_train=100", "--workers", "2",
           "--override", "teacher.model_kw.width=4"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "results.json").exists() and (out / "results.csv").exists()
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["loss"] for r in runs] == ["ce", "kl"] and not any(r["cached"] for r in runs)
    # runs in workers write no per-epoch log; the teacher, trained here before them, does
    assert [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()] == ["teacher"]
    assert len(list((tmp_path / "runs").glob("student-*"))) == 2
    # as __main__ the module still finds its own source: no warning, and the notebooks' cache keys
    assert "CacheWarning" not in proc.stderr
    same = E.run_grid(["ce", "kl"], [0], preset="cpu-quick", cache_dir=tmp_path / "runs", device="cpu", progress=False,
                      overrides={"data.n_train": 100, "teacher.model_kw.width": 4, "distill.epochs": 1,
                                 "teacher.train.epochs": 1})
    assert same.teacher["source"] == "cache" and same.runs["cached"].all()
    assert list(same.runs["config_hash"]) == [r["config_hash"] for r in runs]


def test_cli_errors(tmp_path, capsys):
    base = ["kd", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "runs"), "--quiet"]
    assert E.main(base + ["--losses", "kl,nope"]) == 2
    assert "unknown loss 'nope'" in capsys.readouterr().err
    assert E.main(base + ["--override", "distill.epoch=3"]) == 2
    assert "unknown config key 'distill.epoch'" in capsys.readouterr().err
    for bad, message in ((["--seeds", "a,b"], "--seeds must be comma-separated integers"),
                         (["--override", "distill.epochs"], "--override needs key=value")):
        with pytest.raises(SystemExit) as stop:
            E.main(base + bad)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(f"error: {message}"), err
    with pytest.raises(SystemExit):
        E.main(["kd", "--preset", "paper-long", "--out", "x"])
    with pytest.raises(SystemExit):
        E.main(["adv", "--preset", "paper-long", "--out", "x"])  # `adv` is tested in test_adversarial.py


def test_cli_help_and_out(tmp_path, capsys, monkeypatch):
    """--out is optional in the usage (--config gives it a default) and required otherwise, with a
    one-line error; the defaults that $DKL_RUNS_DIR moves say so."""
    for command in ("kd", "adv"):
        with pytest.raises(SystemExit):
            E.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "[--out DIR]" in text and "required unless --config is given" in text
        assert "cache folder (default: $DKL_RUNS_DIR if set, else <repository>/runs)" in text
        assert "--out defaults to $DKL_RUNS_DIR/<name> if DKL_RUNS_DIR is set, else <repository>/runs/<name>" in text
        assert "--threads N" in text
    monkeypatch.setenv("DKL_RUNS_DIR", str(tmp_path / "runs"))
    assert E.main(["kd", "--losses", "kl", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out DIR is required (the folder for the results); with --config FILE it defaults to {tmp_path / 'runs'}/<name>\n"


def test_cli_threads(tmp_path, monkeypatch, capsys):
    """--threads sets torch's CPU threads for the runs (default 1 for cpu-quick, PyTorch's for the other
    presets; a worker gets its share), and main() restores the caller's count."""
    seen = []
    real_distill = E.train_mod.distill

    def distill(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_distill(*args, **kwargs)

    monkeypatch.setattr(E.train_mod, "distill", distill)
    before = torch.get_num_threads()
    argv = ["kd", "--losses", "kl", "--seeds", "0", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path),
            "--device", "cpu", "--quiet", "--no-cache"] + [a for k, v in TINY.items() for a in ("--override", f"{k}={v}")]
    try:
        torch.set_num_threads(2)
        assert E.main(argv) == 0 and seen == [1]  # cpu-quick: one thread
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert E.main(argv + ["--threads", "2"]) == 0 and seen == [1, 2]
        assert torch.get_num_threads() == 1
        # the other presets keep PyTorch's count; adv too; the --workers share what the command has
        calls = []
        monkeypatch.setattr(E, "run_grid", lambda *a, **k: calls.append(("kd", k["workers"], torch.get_num_threads())) or 1 / 0)
        monkeypatch.setattr(E, "run_adv_grid", lambda *a, **k: calls.append(("adv", k["workers"], torch.get_num_threads())) or 1 / 0)
        torch.set_num_threads(2)
        for command in (["kd", "--preset", "gpu-short"], ["adv"], ["adv", "--preset", "gpu-short", "--threads", "1"]):
            with pytest.raises(ZeroDivisionError):
                E.main(command + ["--out", str(tmp_path / "x"), "--workers", "2"])
        assert calls == [("kd", 2, 2), ("adv", 2, 1), ("adv", 2, 1)]
        assert E.main(["kd", "--threads", "0", "--out", str(tmp_path / "x")]) == 2
        assert capsys.readouterr().err.endswith("error: --threads must be a positive integer, got 0\n")
        # a failure while joining the process group still gives the caller its thread count back
        monkeypatch.setattr(E.dist_mod, "init_from_env", lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            E.main(argv + ["--threads", "1"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ paper numbers
def test_paper_results_file():
    table = E.paper_results()
    assert {"dataset", "teacher", "student", "method", "top1", "source"} <= set(table.columns)
    assert table["source"].str.len().min() > 10  # every entry names its source table
    cifar = table[table["dataset"] == "CIFAR-100"].set_index("method")["top1"].to_dict()
    assert cifar == {"teacher": 79.42, "student (CE)": 72.50, "KD": 73.33, "DKD": 76.32, "IKL-KD": 76.59}
    r34 = table[(table["dataset"] == "ImageNet") & (table["teacher"] == "ResNet34")].set_index("method")["top1"]
    assert r34.to_dict() == {"KD": 71.03, "DKD": 71.70, "IKL-KD": 71.91}
    r50 = table[(table["dataset"] == "ImageNet") & (table["teacher"] == "ResNet50")].set_index("method")["top1"]
    assert r50.to_dict() == {"KD": 70.50, "DKD": 72.05, "IKL-KD": 72.84}
    assert "Table" in table.loc[table["method"] == "IKL-KD", "source"].iloc[0]
    assert E.paper_reference(E.resolve_config("gpu-short")) == {
        "teacher": 79.42, "ce": 72.50, "kl": 73.33, "dkd": 76.32, "ikl": 76.59}
    assert E.paper_reference(E.resolve_config("cpu-quick")) is None
    raw = E.paper_results(as_frame=False)
    assert "DKL" in raw["papers"] and "CRD" in raw["papers"]


def test_lazy_imports():
    """Importing the modules loads neither torchvision, scikit-learn nor pandas (the functions that
    need them import them) and seeds nothing."""
    code = ("import sys, torch; s = torch.random.get_rng_state();"
            "from dkl_lib import data, models, prior, train, experiments;"
            "heavy = [m for m in ('torchvision', 'sklearn', 'pandas') if m in sys.modules];"
            "assert not heavy, heavy;"
            "assert torch.equal(s, torch.random.get_rng_state())")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_teacher_cache_key_changes_with_everything_the_teacher_depends_on():
    """A trained teacher is keyed by its data, model, seed and every training setting (and not by the
    student's settings), so changing any of them trains a new teacher instead of reusing the old one."""
    def key(overrides):
        return E.config_hash(E._teacher_config(E.resolve_config("cpu-quick", overrides))[0])

    keys = [key(o) for o in ({}, {"teacher.seed": 1}, {"teacher.train.lr": 0.1}, {"teacher.train.epochs": 5},
                             {"teacher.train.milestones": [10]}, {"teacher.model_kw.width": 8}, {"data.n_train": 300})]
    assert len(set(keys)) == len(keys)
    assert key({"distill.lr": 0.1, "student.model_kw.hidden": [32]}) == keys[0]


def test_a_trained_teachers_accuracy_is_that_of_its_last_epoch(tmp_path, monkeypatch):
    """The teacher handed to the students is the last epoch's model, so its reported accuracy is the
    last epoch's, not the best one."""
    from dkl_lib import train as T

    def fake_training(model, data, **kw):
        return T.TrainResult(model=model, history=[{"epoch": 1, "test_acc": 90.0}, {"epoch": 2, "test_acc": 80.0}],
                             config={})

    monkeypatch.setattr(E.train_mod, "train_teacher", fake_training)
    cfg = E.resolve_config("cpu-quick", TINY)
    d = E.load_data(cfg["data"], device="cpu")
    _, info = E.get_teacher(cfg, lambda: d, cache=E.RunCache(tmp_path), device="cpu", progress=False)
    assert info["source"] == "trained" and info["acc"] == 80.0 and info["best_acc"] == 90.0


def test_curve_stats_take_the_first_epoch_of_the_best_robust_accuracy():
    nan = float("nan")
    history = [{"epoch": 1, "test_acc": 50.0, "test_robust_acc": 20.0},
               {"epoch": 2, "test_acc": 60.0, "test_robust_acc": 30.0},
               {"epoch": 3, "test_acc": 55.0, "test_robust_acc": 30.0},
               {"epoch": 4, "test_acc": 58.0, "test_robust_acc": nan}]
    stats = E._curve_stats(history)
    assert stats["curve_robust_best_epoch"] == 2 and stats["curve_robust_best_acc"] == 30.0
    assert stats["curve_clean_best_acc"] == 60.0 and stats["curve_clean_last_acc"] == 58.0
    assert stats["curve_robust_last_acc"] != stats["curve_robust_last_acc"]  # NaN: not measured


def test_natural_training_keys_leave_out_the_attack_and_awp_settings():
    """"ce" trains without an attack: its key ignores the attack and AWP settings (which the trainer
    would refuse for natural training: the paper preset has AWP on)."""
    cfg = E.resolve_adv_config("paper")
    ce = E._adv_run_config(cfg, "ce", 0)
    assert not {"epsilon_schedule", "attack_steps", "attack_step_fraction", "awp_gamma", "awp_warmup"} & set(ce["train"])
    other = E._adv_run_config(E.resolve_adv_config("paper", {"train.attack_steps": 3, "train.awp_gamma": 0.01}), "ce", 0)
    assert E.config_hash(other) == E.config_hash(ce)
    assert E._adv_run_config(cfg, "trades", 0)["train"]["awp_gamma"] == 0.005


def test_cli_exit_status_is_130_after_ctrl_c(tmp_path, monkeypatch, capsys):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(E.train_mod, "distill", ctrl_c)
    argv = ["kd", "--losses", "kl", "--seeds", "0", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path),
            "--device", "cpu", "--quiet"] + [a for k, v in TINY.items() for a in ("--override", f"{k}={v}")]
    assert E.main(argv) == 130
    assert capsys.readouterr().err.startswith("interrupted: ")
    assert not (tmp_path / "out" / "results.json").exists()  # no run finished: nothing to write


def _tiny_cli(tmp_path, *extra):
    argv = ["kd", "--preset", "cpu-quick", "--losses", "kl", "--seeds", "0", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "runs"), "--device", "cpu", "--quiet"]
    for key, value in TINY.items():
        argv += ["--override", f"{key}={value}"]
    return argv + list(extra)


def test_cli_ctrl_c_while_the_teacher_trains_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the teacher trains ends the command with status 130 and one line that says how to go
    on, not a KeyboardInterrupt traceback (the teacher's finished epochs are in its checkpoints)."""
    class Stopped:
        stopped = "interrupted"

    monkeypatch.setattr(E.train_mod, "train_teacher", lambda *a, **k: Stopped())
    assert E.main(_tiny_cli(tmp_path, "--checkpoint-every", "1")) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted: teacher training was interrupted; run the same "
                                                   "command again to resume it from its last checkpoint (")
    assert E.main(_tiny_cli(tmp_path)) == 130  # no checkpoints: it says that the teacher starts over
    assert "run the same command again to train it (from the start" in capsys.readouterr().err


def test_cli_ctrl_c_in_a_student_run_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    real = E.train_mod.distill

    def interrupted(*args, **kwargs):
        res = real(*args, **kwargs)
        res.stopped = "interrupted"
        return res

    assert E.main(_tiny_cli(tmp_path)) == 0  # seed 0, into the cache
    monkeypatch.setattr(E.train_mod, "distill", interrupted)
    assert E.main(_tiny_cli(tmp_path, "--seeds", "0,1")) == 130  # seed 0 comes from the cache, seed 1 stops
    err = capsys.readouterr().err
    assert err.startswith("interrupted: results.json holds the finished runs") and "Warning" not in err
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["interrupted"] is True and [r["seed"] for r in written["runs"]] == [0]


@pytest.mark.parametrize("which", ["--out", "--cache-dir"])
def test_cli_unwritable_out_or_cache_folder_fails_before_training(tmp_path, monkeypatch, capsys, which):
    """An --out or cache folder that cannot be written is an error (exit 2, one line) before the
    teacher trains, not a traceback after it (or after the last run)."""
    def no_training(*args, **kwargs):
        raise AssertionError("trained although the results could not be written")

    monkeypatch.setattr(E.train_mod, "train_teacher", no_training)
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder below a file: mkdir fails as on a read-only disk, even as root
    argv = _tiny_cli(tmp_path)
    argv[argv.index(which) + 1] = str(blocker / "sub")
    assert E.main(argv) == 2
    err = capsys.readouterr().err
    what = "--out folder" if which == "--out" else "cache folder"
    assert err.startswith(f"error: cannot write to the {what} {blocker / 'sub'} (") and err.count("\n") == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_cli_results_and_cache_files_get_the_mode_open_would_give(tmp_path):
    """mkstemp creates 0600 files: results.json/.csv and the cache entries were unreadable by the other
    users of a shared folder. Every file written atomically now gets 0666 minus the umask."""
    import stat

    argv = _tiny_cli(tmp_path)
    old = os.umask(0o022)
    try:
        assert E.main(argv) == 0
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"results.json", "results.csv", "entry.json", "model.pt"} <= {p.name for p in written}
    assert [(str(p), oct(stat.S_IMODE(p.stat().st_mode))) for p in written] == [(str(p), oct(0o644)) for p in written]


def test_atomic_writes_remove_the_temporary_files_of_killed_writers(tmp_path):
    """A writer killed before its rename leaves `.<name>.<random>.tmp` (a whole model for a cache entry);
    the next write of the same file removes those older than STALE_TMP_SECONDS, keeps younger ones (a
    writer may still be at work) and never touches other files."""
    from dkl_lib import distributed as dist

    target = tmp_path / "model.pt"
    old_tmp, young_tmp = tmp_path / ".model.pt.ab_c12.tmp", tmp_path / ".model.pt.zz9.tmp"
    others = [tmp_path / ".other.pt.ab_c12.tmp", tmp_path / ".model.pt.x.ab1.tmp", tmp_path / "notes.tmp"]
    for path in [old_tmp, young_tmp, *others]:
        path.write_bytes(b"partial")
    long_ago = time.time() - dist.STALE_TMP_SECONDS - 60
    for path in [old_tmp, *others]:
        os.utime(path, (long_ago, long_ago))
    E.RunCache(tmp_path / "cache")  # unrelated folder: nothing happens there
    dist.write_atomic(target, lambda fh: fh.write(b"new"))
    assert target.read_bytes() == b"new"
    assert not old_tmp.exists() and young_tmp.exists() and all(p.exists() for p in others)
    # a failing writer leaves nothing behind and keeps the old file
    with pytest.raises(RuntimeError):
        dist.write_atomic(target, lambda fh: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.glob(".model.pt.*.tmp")) == [".model.pt.x.ab1.tmp", young_tmp.name]


_REAL_FDOPEN = os.fdopen


class _FullDisk:
    """A binary file on a disk that fills up after ``room`` bytes (os.fdopen's stand-in)."""

    def __init__(self, fd, mode, room=100):
        self._raw, self._room = _REAL_FDOPEN(fd, mode), room

    def write(self, data):
        if len(data) > self._room:
            raise OSError(28, "No space left on device")
        self._room -= len(data)
        return self._raw.write(data)

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()


@pytest.mark.parametrize("write", [lambda fh: torch.save({"w": torch.zeros(1000)}, fh),
                                   lambda fh: fh.write(b"x" * 1000)], ids=["torch.save", "bytes"])
def test_a_full_disk_is_named_as_such(tmp_path, monkeypatch, write):
    """torch.save turns the OSError of a full disk into "unexpected pos 704 vs 598"; the writer says what
    happened and where, removes its temporary file and keeps the previous file."""
    from dkl_lib import distributed as dist

    target = tmp_path / "model.pt"
    target.write_bytes(b"previous")
    monkeypatch.setattr(dist.os, "fdopen", _FullDisk)
    with pytest.raises(OSError, match=r"no space left to write .*model\.pt.*--cache-dir") as info:
        dist.write_atomic(target, write)
    assert info.value.errno == 28
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    # other failures pass through unchanged
    monkeypatch.undo()
    with pytest.raises(ValueError, match="bad state"):
        dist.write_atomic(target, lambda fh: (_ for _ in ()).throw(ValueError("bad state")))


def test_cli_full_disk_is_one_error_line(tmp_path, monkeypatch, capsys):
    from dkl_lib import distributed as dist

    monkeypatch.setattr(dist.os, "fdopen", _FullDisk)
    argv = _tiny_cli(tmp_path)
    assert E.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: [Errno 28] no space left to write ") and "Traceback" not in "\n".join(err)


def test_a_wheel_installed_outside_the_clone_has_the_paper_numbers_and_writes_to_the_working_directory(tmp_path):
    """`pip install git+...` puts the package in site-packages: the published numbers used to be looked for
    beside it (FileNotFoundError in every paper comparison), and runs/ and data/downloads/ were put inside
    site-packages. The wheel now carries data/paper_results.json, and runs and downloads go to the working
    directory. Built offline from this checkout (no build isolation, no dependencies)."""
    import shutil

    wheels, target, work, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "work", tmp_path / "src"
    work.mkdir()
    for name in ("pyproject.toml", "README.md", "data/paper_results.json"):  # a copy: the build writes build/
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dkl_lib", src / "dkl_lib", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), *map(str, wheels.glob("*.whl"))],
                   check=True, capture_output=True, timeout=300)
    probe = ("import json, dkl_lib as dkl; from dkl_lib import configs, data, experiments; "
             "print(json.dumps([dkl.__file__, str(experiments.default_runs_dir()), str(data.default_data_root()), "
             "str(configs.config_dir()), dkl.paper_results(as_frame=False)]))")
    env = {k: v for k, v in os.environ.items() if k not in ("DKL_RUNS_DIR", "DKL_DATA_DIR")}
    env["PYTHONPATH"] = str(target)
    done = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    where, runs, downloads, configs_dir, published = json.loads(done.stdout)
    assert Path(where).is_relative_to(target)
    assert (Path(runs), Path(downloads), Path(configs_dir)) == (work / "runs", work / "data" / "downloads", work / "configs")
    assert published == json.loads((REPO / "data" / "paper_results.json").read_text(encoding="utf-8"))
    # and in this clone, the clone's folders, wherever the process runs
    from dkl_lib import _paths

    assert _paths.repository() == REPO and _paths.paper_results_file() == REPO / "data" / "paper_results.json"


def test_results_csv_writes_epochs_and_counts_as_integers():
    """best_epoch, epochs, resumed_from and n are counts: `12` in results.csv, not `12.0000` (the mean and
    std rows, blank there, had turned them into float columns); accuracies keep their 4 decimals."""
    import pandas as pd

    runs = pd.DataFrame({"loss": ["kl", "kl"], "seed": [0, 1], "best_acc": [80.0, 82.0], "best_epoch": [12, 240],
                         "last_acc": [79.0, 81.0], "teacher_acc": [98.0, 98.0], "epochs": [240, 240],
                         "seconds": [1.5, 2.0], "resumed_from": [None, 117]})
    grid = E.GridResult(runs=runs, summary=E.summarize(runs), teacher={"acc": 98.0})
    rows = list(csv.DictReader(E._results_csv(grid).splitlines()))
    assert [(r["best_epoch"], r["epochs"], r["resumed_from"]) for r in rows[:2]] == [("12", "240", ""),
                                                                                   ("240", "240", "117")]
    assert rows[2]["row_type"] == "mean" and rows[2]["n"] == "2" and rows[2]["best_epoch"] == ""
    assert rows[0]["best_acc"] == "80.0000" and rows[0]["seconds"] == "1.5000"


@pytest.mark.parametrize("task", ["kd", "adv"])
def test_cli_ctrl_c_before_any_run_finished_leaves_the_earlier_results_as_they_were(tmp_path, monkeypatch, capsys,
                                                                                   task):
    """A complete results.json (and .csv) of an earlier command in --out, then another command into the same
    folder stopped by Ctrl-C before its first run finished: the earlier files stay byte for byte and the one
    `interrupted:` line says so. Before the fix they were replaced by an empty results.json ("runs": [],
    "interrupted": true), the earlier command's results lost (for good with --no-cache), under a line that
    said "results.json holds the finished runs"."""
    out = tmp_path / "out"
    out.mkdir()
    before = {name: f"complete results of an earlier command ({name})".encode()
              for name in ("results.json", "results.csv")}
    for name, blob in before.items():
        (out / name).write_bytes(blob)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    if task == "kd":
        monkeypatch.setattr(E.train_mod, "distill", ctrl_c)
        argv = _tiny_cli(tmp_path, "--losses", "ikl")
    else:  # the adv grid as it returns from Ctrl-C in its first run (its training is tested in test_adversarial)
        import pandas as pd

        empty = E.AdvGridResult(runs=pd.DataFrame(), summary=pd.DataFrame(), checks=pd.DataFrame(), interrupted=True)
        monkeypatch.setattr(E, "run_adv_grid", lambda *a, **k: empty)
        argv = ["adv", "--losses", "trades", "--seeds", "0", "--out", str(out), "--cache-dir", str(tmp_path / "runs"),
                "--device", "cpu", "--quiet"]
    assert E.main(argv) == 130
    err = capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert err.count("\n") == 1 and err.startswith(f"interrupted: no run finished, so {out / 'results.json'} and "
                                                   "results.csv were left as they were; run the same command again")
    # no temporary file either; the kd teacher trained before the Ctrl-C, so its epochs are in the per-epoch log
    logged = ["log.jsonl"] if task == "kd" else []
    assert sorted(p.name for p in out.iterdir()) == logged + ["results.csv", "results.json"]
    if logged:
        assert {json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()} == {"teacher"}
    # into an empty folder: no results file (there is no finished run to report; the teacher is cached now)
    for name in list(before) + logged:
        (out / name).unlink()
    assert E.main(argv) == 130
    assert capsys.readouterr().err.startswith(f"interrupted: no run finished, so no results were written to {out};")
    assert list(out.iterdir()) == []


def test_cli_ctrl_c_while_the_data_loads_does_not_claim_results_were_written(tmp_path, monkeypatch, capsys):
    """Ctrl-C that reaches the command before its grid runs (here: while the data set loads) writes nothing,
    and its line says so; it used to say "results.json holds the finished runs (all in the cache)"."""
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "load_data", ctrl_c)
    assert E.main(_tiny_cli(tmp_path)) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"interrupted: no run finished, so no results were written to "
                                                   f"{tmp_path / 'out'};")
    assert not (tmp_path / "out" / "results.json").exists()


def test_progress_bars_fit_one_line_of_an_80_column_terminal(tmp_path, capsys, monkeypatch):
    """The runs bar, the teacher's epoch bar and the trainers' bars hold on one line of 80 columns with all that
    they say (run, seed, epoch, accuracy), at their natural width: tqdm's default line ran to 100-150 columns, so
    an 80-column terminal cut it ("... epoch=25/30, loss=ikl-n", the accuracy lost, a bar of one cell) and a
    console tqdm cannot measure (an IDE's, a pipe into tee) wrapped it onto new lines at every refresh."""
    import io
    import re

    monkeypatch.delenv("COLUMNS", raising=False)  # no terminal to measure: every line at its natural width
    E.run_grid(["gkl-nogi"], [0], preset="cpu-quick", overrides={**TINY, "teacher.train.epochs": 2,
                                                                   "distill.epochs": 2},
               cache_dir=tmp_path, device="cpu", progress=True)
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "|" in line]
    assert max(map(len, lines)) < 80, max(lines, key=len)
    assert any(line.startswith("teacher small_cnn: 2/2|") and ", loss " in line and ", test " in line for line in lines)
    assert any(line.startswith("runs: 1/1|") and re.search(r", gkl-nogi seed 0, epoch 2/2, \d+\.\d%$", line)
               for line in lines), lines

    def rendered(desc, total, n, hours, postfix=None, run=None):  # a bar of a long run: hours of times
        bar = E.train_mod._progress_bar(total=total, desc=desc, unit="run", file=io.StringIO())
        bar.n, bar.start_t = n, bar.start_t - hours * 3600
        if run is not None:  # the grid's per-epoch callback writes the run's postfix
            E._epoch_callback(bar, *run, None)([{"epoch": 123, "test_acc": 77.12}])
        if postfix is not None:
            bar.set_postfix_str(postfix)
        text = str(bar)
        bar.close()
        return text

    long_runs = [rendered("runs", 35, 5, 12.6, run=("ikl-nogi", 4, 240)),
                 rendered("runs", 6, 1, 12.6, run=("trades", 4, 200)),
                 rendered("runs, 4 at a time", 35, 5, 12.6, "finished gkl-nogi seed 4"),
                 rendered("runs", 6, 1, 12.6, "trades seed 4: evaluating PGD+ensemble"),
                 rendered("teacher resnet32x4", 240, 17, 1.2, "loss 0.083, test 95.8%"),
                 rendered("trades", 200, 17, 1.2, "clean 95.8%, robust 50.1%")]
    assert long_runs[0].endswith(", ikl-nogi seed 4, epoch 123/240, 77.1%")
    assert max(map(len, long_runs)) < 80, "\n".join(f"{len(line)} {line}" for line in long_runs)


def test_cli_ctrl_c_with_no_cache_does_not_claim_the_runs_are_cached(tmp_path, monkeypatch, capsys):
    real = E.train_mod.distill
    calls = []

    def second_interrupted(*args, **kwargs):
        res = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            res.stopped = "interrupted"
        return res

    monkeypatch.setattr(E.train_mod, "distill", second_interrupted)
    assert E.main(_tiny_cli(tmp_path, "--seeds", "0,1", "--no-cache")) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: results.json holds the finished runs (--no-cache: they were not cached")
    assert "all in the cache" not in err
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["seed"] for r in written["runs"]] == [0]
