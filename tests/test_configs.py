"""dkl_lib.configs and configs/*.yaml: every shipped file loads, resolves and round-trips through the
command line; the KD files carry the official per-pair values; broken files fail with the file and
the key in the message."""
import json
import math

import pytest

from dkl_lib import configs as C
from dkl_lib import experiments as E

SHIPPED = C.list_configs()


def _cli_overrides(args) -> dict:
    """What the experiments CLI makes of --override items (JSON, else the raw string)."""
    out = {}
    for item in args.override or []:
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def test_configs_folder_ships_the_issue_7_experiments():
    names = {p.stem for p in SHIPPED}
    assert names == {"kd_cifar100_resnet32x4_resnet8x4", "kd_cifar100_wrn_40_2_wrn_16_2",
                     "kd_cifar100_resnet56_resnet20", "adv_cifar10_wrn_34_10", "adv_cifar100_wrn_34_10",
                     "kd_imagenet_resnet34_resnet18", "kd_imagenet_resnet50_mobilenet_v1"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_config_loads_resolves_and_round_trips_through_the_cli(path):
    cfg = C.load_config(path)
    assert cfg["name"] == path.stem and cfg["task"] in C.TASKS and cfg["sources"]
    resolved = cfg["resolved"]
    assert resolved["preset"] == cfg["preset"]
    for key, value in cfg["overrides"].items():  # every override landed in the resolved config
        node = resolved
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    # the CLI accepts the arguments and parses every override back to the same value
    args = E._parser().parse_args(C.config_to_cli(cfg, out="runs/x"))
    assert args.command == cfg["task"] and args.preset == cfg["preset"] and args.out == "runs/x"
    assert args.losses.split(",") == cfg["losses"]
    assert [int(s) for s in args.seeds.split(",")] == cfg["seeds"]
    assert _cli_overrides(args) == cfg["overrides"]
    assert C.config_command(cfg).startswith("python -m dkl_lib.experiments " + cfg["task"])


def test_kd_configs_carry_the_official_per_pair_values():
    # official IKL_KD (ALPHA, BETA, T = 4) -> ours (alpha = BETA, beta = ALPHA / T²); DKD beta per pair
    official = {"resnet32x4": ("resnet8x4", 1.0, 8.0, 8.0), "wrn_40_2": ("wrn_16_2", 3.0, 12.0, 6.0),
                "resnet56": ("resnet20", 1.0, 4.0, 2.0)}
    # DKLv2 cifar100_config_gkl/*.yaml: GKL_KD (ALPHA, BETA, GAMMA, GI), T2 4, T 4, WARMUP 20
    official_gkl = {"resnet32x4": (1.0, 16.0, 0.05, True), "wrn_40_2": (3.0, 20.0, 0.3, False),
                    "resnet56": (1.0, 4.0, 0.2, True)}
    seen = set()
    for path in SHIPPED:
        cfg = C.load_config(path)
        if cfg["task"] != "kd" or cfg["preset"] == "imagenet":
            continue
        r = cfg["resolved"]
        student, ikl_alpha, ikl_beta, dkd_beta = official[r["teacher"]["model"]]
        seen.add(r["teacher"]["model"])
        assert r["student"]["model"] == student and r["data"]["name"] == "cifar100"
        assert r["teacher"]["checkpoint"] == f"teachers/{r['teacher']['model']}_vanilla/ckpt_epoch_240.pth"
        d = r["distill"]
        assert (d["epochs"], d["batch_size"], d["lr"], d["milestones"], d["temperature"]) == \
            (240, 64, 0.05, [150, 180, 210], 4.0)
        assert r["losses"]["kl"] == {"ce_weight": 0.1, "kd_weight": 0.9, "warmup_epochs": 0}
        assert r["losses"]["dkd"]["beta"] == dkd_beta and d["warmup_epochs"] == 20
        ikl = r["losses"]["ikl"]
        assert ikl["alpha"] == ikl_beta and ikl["beta"] == ikl_alpha / d["temperature"] ** 2
        assert ikl["weight_temperature"] == 100.0
        g_alpha, g_beta, g_gamma, g_gi = official_gkl[r["teacher"]["model"]]
        gkl = r["losses"]["gkl"]
        assert (gkl["alpha"], gkl["beta"], gkl["gamma"], gkl["weight_temperature"], gkl["gi"]) == \
            (g_beta, g_alpha / 16, g_gamma, 4.0, g_gi)
        assert gkl.get("warmup_epochs", d["warmup_epochs"]) == 20
        assert {"kl", "dkd"} <= set(cfg["losses"]) and any(s.startswith("ikl") for s in cfg["losses"])
    assert seen == set(official)


def test_imagenet_configs_carry_the_official_per_pair_values():
    # official IKL_KD (ALPHA, BETA, GI, T2 1, T 1) -> ours (alpha = BETA, beta = ALPHA); DKD beta per pair
    official = {"resnet34": ("resnet18", 1.0, 0.5, 0.5, "resnet34-b627a593.pth"),
                "resnet50": ("mobilenet_v1", 4.0, 1.0, 2.0, "resnet50-0676ba61.pth")}
    # DKLv2 imagenet_config_gkl/*.yaml: GKL_KD (ALPHA, BETA, GAMMA), GI, T2 1; DKLv2 cfg.py: T 1, WARMUP 5
    official_gkl = {"resnet34": (1.0, 0.5, 0.6), "resnet50": (4.0, 1.0, 0.5)}
    seen = set()
    for path in SHIPPED:
        cfg = C.load_config(path)
        if cfg["preset"] != "imagenet":
            continue
        r = cfg["resolved"]
        student, ikl_alpha, ikl_beta, dkd_beta, teacher_file = official[r["teacher"]["model"]]
        seen.add(r["teacher"]["model"])
        assert r["student"]["model"] == student and r["data"] == {"name": "imagenet", "size": 224}
        assert r["teacher"]["checkpoint"] == f"teachers/{teacher_file}"
        d = r["distill"]
        assert (d["epochs"], d["batch_size"], d["lr"], d["weight_decay"], d["milestones"], d["temperature"],
                d["warmup_epochs"]) == (100, 512, 0.2, 1e-4, [30, 60, 90], 1.0, 1)
        assert r["losses"]["kl"] == {"ce_weight": 0.5, "kd_weight": 0.5, "warmup_epochs": 0}
        assert r["losses"]["dkd"]["beta"] == dkd_beta
        ikl = r["losses"]["ikl"]
        assert (ikl["alpha"], ikl["beta"], ikl["gi"], ikl["weight_temperature"]) == (ikl_beta, ikl_alpha, True, 1.0)
        g_alpha, g_beta, g_gamma = official_gkl[r["teacher"]["model"]]
        gkl = r["losses"]["gkl"]
        assert (gkl["alpha"], gkl["beta"], gkl["gamma"], gkl["gi"], gkl["weight_temperature"], gkl["warmup_epochs"]) \
            == (g_beta, g_alpha, g_gamma, True, 1.0, 5)
    assert seen == set(official)
    preset = E.resolve_config("imagenet")  # the preset is the ResNet34 -> ResNet18 file without overrides
    ikl34 = C.load_config(C.config_dir() / "kd_imagenet_resnet34_resnet18.yaml")["resolved"]
    assert {k: ikl34[k] for k in ("data", "teacher", "student", "distill", "losses")} == \
        {k: preset[k] for k in ("data", "teacher", "student", "distill", "losses")}


def test_resnet32x4_config_is_the_paper_preset():
    """Same values AND types as the preset (an int where the preset has a float would change the
    cache hash), so runs from the file reuse the preset's cache entries. (Until the hyper-parameter
    audit the preset's ikl lacked the official T2 = 100, which the file added; now both carry it.)"""
    cfg = C.load_config(C.config_dir() / "kd_cifar100_resnet32x4_resnet8x4.yaml")
    assert E.config_hash(cfg["resolved"]) == E.config_hash(E.resolve_config("paper"))
    assert E.preset("paper")["losses"]["ikl"]["weight_temperature"] == 100.0


@pytest.mark.parametrize("stem,data", [("adv_cifar10_wrn_34_10", "cifar10"), ("adv_cifar100_wrn_34_10", "cifar100")])
def test_adversarial_configs_describe_the_official_ikl_at_recipe(stem, data):
    r = C.load_config(C.config_dir() / f"{stem}.yaml")["resolved"]
    assert r["data"]["name"] == data and r["model"]["name"] == "wrn_34_10"
    t = r["train"]
    assert t["epsilon"] == 8 / 255 and r["eval"]["epsilon"] == 8 / 255  # exactly, not approximately
    assert (t["epochs"], t["batch_size"], t["lr"], t["lr_schedule"]) == (200, 128, 0.2, "cosine")
    assert (t["epsilon_schedule"], t["attack_steps"], t["attack_step_fraction"]) == ("increasing", 5, 0.5)
    assert r["losses"]["trades"]["beta"] == 6.0
    assert r["losses"]["ikl"] == {"alpha": 20.0, "beta": 4.0, "temperature": 1.0, "weight_temperature": 4.0,
                                  "gi": True}
    # AWP as the training script; the average the official sh scripts evaluate (swa.py DIR 0.9 1 200)
    assert (t["awp_gamma"], t["awp_warmup"]) == (0.005, 10)
    assert (t["weight_average"], t["weight_average_from"], t["weight_average_every"]) == (0.9, 1, "epoch")
    assert E.config_hash(r["train"]) == E.config_hash(E.adv_preset("paper")["train"])


GOOD = """\
task: kd
preset: cpu-quick
losses: [kl, ikl]
seeds: [0, 1]
overrides:
  distill.epochs: 2
  losses.ikl.alpha: 2.0
"""


def _write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_small_config_loads_with_defaults(tmp_path):
    # what the strict loader still reads as plain YAML: 0, signed and hexadecimal integers, repeated values
    plain = C._read_yaml(_write(tmp_path, "a: 0\nb: -12\nc: 0x10\nd: [1, 1]\ne: {x: 1, y: 1}\nf: 1_000\n", "p.yaml"))
    assert plain == {"a": 0, "b": -12, "c": 16, "d": [1, 1], "e": {"x": 1, "y": 1}, "f": 1000}
    cfg = C.load_config(_write(tmp_path, GOOD))
    assert cfg["name"] == "exp" and cfg["seeds"] == [0, 1] and cfg["losses"] == ["kl", "ikl"]
    assert cfg["resolved"]["distill"]["epochs"] == 2 and cfg["resolved"]["losses"]["ikl"]["alpha"] == 2.0
    assert C.config_to_cli(cfg) == ["kd", "--preset", "cpu-quick", "--losses", "kl,ikl", "--seeds", "0,1",
                                    "--override", "distill.epochs=2", "--override", "losses.ikl.alpha=2.0"]


@pytest.mark.parametrize("text,needle", [
    (GOOD.replace("distill.epochs: 2", "distill.epoch: 2"), "'distill.epoch'"),
    (GOOD.replace("losses.ikl.alpha", "losses.ikl.alpah"), "'losses.ikl.alpah'"),
    (GOOD.replace("losses.ikl.alpha", "losses.nope.alpha"), "'losses.nope.alpha'"),
    (GOOD + "  teacher.modle: x\n", "'teacher.modle'"),
    (GOOD.replace("preset: cpu-quick", "preset: cpu-fast"), "'cpu-fast'"),
    (GOOD.replace("task: kd", "task: detection"), "'detection'"),
    (GOOD.replace("[kl, ikl]", "[kl, ilk]"), "'ilk'"),
    (GOOD.replace("[kl, ikl]", "[kl, kl]"), "twice"),
    (GOOD.replace("[0, 1]", "[0, -1]"), "'seeds'"),
    (GOOD.replace("[0, 1]", "[0, 0]"), "twice"),
    (GOOD.replace("seeds: [0, 1]\n", ""), "missing key(s) ['seeds']"),
    (GOOD + "epochs: 3\n", "unknown key(s) ['epochs']"),
    (GOOD.replace("losses.ikl.alpha: 2.0", "distill.weight_decay: 5e-4"), "5e-4"),
    (GOOD.replace("losses.ikl.alpha: 2.0", "distill.lr: 8/255"), "8/255"),
    (GOOD.replace("  distill.epochs: 2\n", "  distill.epochs: [2\n"), "not valid YAML"),
    # valid YAML 1.1 that would change the run without a word: a key written twice (the last one wins),
    # a zero-padded or colon-separated integer (octal, base 60)
    (GOOD + "seeds: [7]\n", "refused: the key 'seeds' is written twice (lines 4 and 8)"),
    (GOOD + "  distill.epochs: 3\n", "the key 'distill.epochs' is written twice (lines 6 and 8)"),
    (GOOD.replace("[0, 1]", "[010, 011]"), "refused: the number 010 would be read as octal (8)"),
    (GOOD.replace("distill.epochs: 2", "distill.epochs: 1:30"), "the number 1:30 would be read as base 60 (90)"),
    ("? [a, b]\n: 1\n", "not valid YAML: while constructing a mapping"),  # (an unhashable key: YAML's own error)
    ("- a\n- b\n", "YAML mapping"),
    (GOOD.replace("overrides:", "overrides: 3\nx:").split("  distill")[0], "unknown key(s) ['x']"),
])
def test_a_broken_config_names_the_file_and_the_problem(tmp_path, text, needle):
    path = _write(tmp_path, text, name="broken.yaml")
    with pytest.raises(ValueError) as info:
        C.load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert needle in message, message


def test_an_adversarial_override_the_resolver_refuses_is_named(tmp_path):
    text = "task: adv\npreset: cpu-quick\nlosses: [trades]\nseeds: [0]\noverrides:\n  train.epochz: 3\n"
    with pytest.raises(ValueError, match=r"broken\.yaml: override 'train\.epochz' is refused"):
        C.load_config(_write(tmp_path, text, name="broken.yaml"))


def test_a_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file"):
        C.load_config(tmp_path / "nope.yaml")


def test_override_values_survive_the_cli_encoding():
    cfg = {"task": "adv", "preset": "paper", "losses": ["ikl"], "seeds": [3],
           "overrides": {"a.b": "true", "a.c": "wrn_34_10", "a.d": None, "a.e": {"width": 8},
                         "a.f": 8 / 255, "a.g": "12", "a.h": [1, 2]}}
    args = C.config_to_cli(cfg)
    items = [args[i + 1] for i, a in enumerate(args) if a == "--override"]
    decoded = {}
    for item in items:
        key, text = item.split("=", 1)
        try:
            decoded[key] = json.loads(text)
        except json.JSONDecodeError:
            decoded[key] = text
    assert decoded == cfg["overrides"] and math.isclose(decoded["a.f"], 8 / 255, rel_tol=0, abs_tol=0)
    assert "a.c=wrn_34_10" in items  # plain strings stay readable
    with pytest.raises(ValueError, match="'losses'"):
        C.config_to_cli({"task": "kd", "preset": "paper", "seeds": [0]})


def test_the_module_cli_checks_files(tmp_path, capsys):
    assert C.main(["--check"]) == 0
    assert capsys.readouterr().out.count("ok ") == len(SHIPPED)
    bad = _write(tmp_path, GOOD.replace("distill.epochs", "distill.epoch"), name="bad.yaml")
    assert C.main([str(bad)]) == 2
    assert "bad.yaml: override 'distill.epoch'" in capsys.readouterr().err
    assert C.main([str(_write(tmp_path, GOOD)), "--out", "runs/o"]) == 0
    assert capsys.readouterr().out.strip().endswith("--out runs/o")


def test_without_files_outside_a_clone_the_cli_says_to_name_them(tmp_path, capsys, monkeypatch):
    """An installed package run away from the repository has no configs/ folder: one error line, no traceback."""
    monkeypatch.setattr(C, "config_dir", lambda: tmp_path / "configs")
    assert C.main(["--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no config folder at {tmp_path / 'configs'}") and err.count("\n") == 1


def test_the_printed_command_writes_where_the_config_would(tmp_path, capsys, monkeypatch):
    """Without --out the printed command's --out is the absolute folder that `--config FILE` writes to
    ($DKL_RUNS_DIR/<name>, else <repository>/runs/<name>), whatever the current folder."""
    path = str(_write(tmp_path, GOOD))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DKL_RUNS_DIR", "elsewhere")
    assert C.main([path]) == 0
    name = C.load_config(path)["name"]
    assert capsys.readouterr().out.strip().endswith(f"--out {tmp_path / 'elsewhere' / name}")
    monkeypatch.delenv("DKL_RUNS_DIR")
    assert C.main([path]) == 0
    assert capsys.readouterr().out.strip().endswith(f"--out {E.default_runs_dir() / name}")
    assert E.default_runs_dir().is_absolute()


# ------------------------------------------------------------------ --config in the experiments CLI
def _tiny_config(tmp_path, **extra):
    lines = ["name: tiny_kd", "task: kd", "description: a tiny digits run for the tests", "preset: cpu-quick",
             "losses: [kl, dkl]", "seeds: [0]", "overrides:", "  data.n_train: 100",
             "  teacher.model_kw.width: 4", "  teacher.train.epochs: 1", "  distill.epochs: 1",
             "  distill.batch_size: 50"]
    path = tmp_path / "tiny.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_config_file_equals_the_explicit_command(tmp_path, monkeypatch):
    import json

    from dkl_lib import experiments as E

    monkeypatch.setenv("DKL_RUNS_DIR", str(tmp_path / "runs"))
    path = _tiny_config(tmp_path)
    assert E.main(["kd", "--config", str(path), "--quiet", "--device", "cpu"]) == 0
    by_file = json.loads((tmp_path / "runs" / "tiny_kd" / "results.json").read_text())  # default --out
    explicit = ["kd", "--preset", "cpu-quick", "--losses", "kl,dkl", "--seeds", "0", "--quiet", "--device", "cpu",
                "--out", str(tmp_path / "explicit")]
    for item in ("data.n_train=100", "teacher.model_kw.width=4", "teacher.train.epochs=1", "distill.epochs=1",
                 "distill.batch_size=50"):
        explicit += ["--override", item]
    assert E.main(explicit) == 0
    by_hand = json.loads((tmp_path / "explicit" / "results.json").read_text())
    assert by_file["config"] == by_hand["config"]
    # same runs: the explicit command finds the file's runs in the cache, keyed by the full config
    key = lambda r: (r["loss"], r["seed"], r["config_hash"], r["best_acc"], r["last_acc"])  # noqa: E731
    assert [key(r) for r in by_file["runs"]] == [key(r) for r in by_hand["runs"]]
    assert all(r["cached"] for r in by_hand["runs"])
    # the command line wins over the file
    assert E.main(["kd", "--config", str(path), "--seeds", "1", "--losses", "kl", "--quiet", "--device", "cpu",
                   "--out", str(tmp_path / "override")]) == 0
    runs = json.loads((tmp_path / "override" / "results.json").read_text())["runs"]
    assert [(r["loss"], r["seed"]) for r in runs] == [("kl", 1)]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_epochs_on_the_command_line_beats_the_files_epochs(path):
    """`--config FILE --epochs 1` (a quick check of a full-run config) really runs one epoch; an
    explicit --override typed after it still wins."""
    from dkl_lib import experiments as E

    cfg = C.load_config(path)
    keys = E._EPOCH_KEYS[cfg["task"]]
    parser = E._parser()
    args = parser.parse_args(E._expand_config([cfg["task"], "--config", str(path), "--epochs", "1"]))
    overrides, _, _ = E._grid_args(args, keys)
    assert {k: overrides[k] for k in keys} == {k: 1 for k in keys}
    plain, _, _ = E._grid_args(parser.parse_args(E._expand_config([cfg["task"], "--config", str(path)])), keys)
    assert any(plain.get(k, 1) > 1 for k in keys)  # the file's own epochs, without --epochs
    args = parser.parse_args(E._expand_config([cfg["task"], "--config", str(path), "--epochs", "1",
                                               "--override", f"{keys[0]}=3"]))
    assert E._grid_args(args, keys)[0][keys[0]] == 3


def test_cli_config_errors(tmp_path, capsys):
    """Each mistake is one ``error:`` line and exit status 2, like argparse's."""
    from dkl_lib import experiments as E

    path = _tiny_config(tmp_path)
    for argv, message in ((["adv", "--config", str(path), "--out", str(tmp_path / "x")], "is a 'kd' config"),
                          (["kd", "--config", str(tmp_path / "no_such.yaml")], "no_such.yaml"),
                          (["kd", "--config"], "--config needs a file")):
        with pytest.raises(SystemExit) as stop:
            E.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


# ----------------------------------------------------------- values: types, ranges, inf, names, seeds
ADV = "task: adv\npreset: cpu-quick\nlosses: [trades]\nseeds: [0]\noverrides:\n"


@pytest.mark.parametrize("text,needle", [
    (GOOD + "  distill.temperature: 0\n", "distill.temperature must be > 0"),
    (GOOD + "  distill.lr: abc\n", "distill.lr must be a real number, got str"),
    (GOOD.replace("distill.epochs: 2", "distill.epochs: -1"), "distill.epochs must be a positive integer, got -1"),
    (GOOD.replace("alpha: 2.0", "alpha: -3"), "losses.ikl.alpha must be >= 0"),
    (GOOD + "  distill: 3\n", "distill must be a mapping"),
    (GOOD + "  distill.temperature: .inf\n", "distill.temperature must be a finite number, got inf"),
    (GOOD + "  data.n_train: .nan\n", "data.n_train must be a finite number"),
    (GOOD + "  student.model: resnet8x5\n", "student.model must be one of"),
    (ADV + "  eval.epsilon: -1\n", "eval.epsilon must be > 0"),
    (ADV + "  train.epochs: -2\n", "train.epochs must be a positive integer, got -2"),
    (ADV + "  model.dtype: float16\n", "model.dtype: model dtype must be one of"),
    (ADV + "  eval.ensemble_attacks: [fab]\n", "unknown ensemble attack 'fab' in eval.ensemble_attacks"),
])
def test_a_config_with_a_bad_value_is_refused_naming_the_override(tmp_path, capsys, text, needle):
    """Checked when the file is read (and by --check), not after a teacher has trained for minutes."""
    path = _write(tmp_path, text, name="bad.yaml")
    with pytest.raises(ValueError) as info:
        C.load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: override ") and "is refused" in message and needle in message, message
    for argv in (["--check", str(path)], [str(path)]):  # reported like any other error, no traceback
        assert C.main(argv) == 2
        printed = capsys.readouterr()
        assert needle in printed.err and "ok " not in printed.out and "Traceback" not in printed.err


def test_the_module_cli_reports_a_command_it_cannot_write(tmp_path, capsys, monkeypatch):
    """config_command's errors (an override JSON cannot spell) come out as `error: FILE: ...`, exit 2."""
    cfg = C.load_config(_write(tmp_path, GOOD))
    cfg["overrides"]["distill.temperature"] = math.inf
    monkeypatch.setattr(C, "load_config", lambda path: cfg)
    assert C.main([str(tmp_path / "exp.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'exp.yaml'}: override 'distill.temperature' = inf cannot be written")
    with pytest.raises(ValueError, match="'distill.temperature' = inf cannot be written on a command line"):
        C.config_to_cli(cfg)


@pytest.mark.parametrize("name", ["../../etc", "a/b", "a\\\\b", "..", ".hidden", "x..y", " padded"])
def test_a_name_that_is_not_one_plain_folder_name_is_refused(tmp_path, name):
    path = _write(tmp_path, f'name: "{name}"\n' + GOOD, name="named.yaml")
    with pytest.raises(ValueError, match=r"'name' must be one plain folder name"):
        C.load_config(path)
    assert C.load_config(_write(tmp_path, 'name: kd_v1.2-short\n' + GOOD))["name"] == "kd_v1.2-short"


def test_scalar_seeds_comma_separated_losses_and_a_single_source_are_accepted(tmp_path):
    text = (GOOD.replace("seeds: [0, 1]", "seeds: 3").replace("losses: [kl, ikl]", "losses: kl, ikl")
            + "sources: the official repository\n")
    cfg = C.load_config(_write(tmp_path, text))
    assert cfg["seeds"] == [3] and cfg["losses"] == ["kl", "ikl"] and cfg["sources"] == ["the official repository"]


def test_results_of_a_config_run_name_the_file_and_its_description(tmp_path, monkeypatch):
    """results.json of `kd --config FILE` says which file it came from: the resolved config alone
    carries the preset's description, which names the preset's models (e.g. `paper`'s resnet32x4 ->
    resnet8x4 for a resnet56 -> resnet20 config), not the file's."""
    import json

    from dkl_lib import experiments as E

    monkeypatch.setenv("DKL_RUNS_DIR", str(tmp_path / "runs"))
    path = _tiny_config(tmp_path)
    assert E.main(["kd", "--config", str(path), "--quiet", "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "runs" / "tiny_kd" / "results.json").read_text())
    assert res["config_file"] == {"path": str(path.absolute()), "name": "tiny_kd",
                                  "description": "a tiny digits run for the tests"}
    assert E.main(["kd", "--preset", "cpu-quick", "--losses", "kl", "--seeds", "0", "--quiet", "--device", "cpu",
                   "--override", "data.n_train=100", "--override", "teacher.model_kw.width=4", "--epochs", "1",
                   "--out", str(tmp_path / "plain")]) == 0
    assert "config_file" not in json.loads((tmp_path / "plain" / "results.json").read_text())
