"""The training dashboard's logic without a browser: allowed controls, run requests, background runs."""
import pathlib
import time

import pytest

from dkl_lib import widgets

TINY = {"teacher.train.epochs": 3, "data.n_train": 200}
VALUES = dict(loss="ikl", alpha=1.0, beta=1.0, temperature=4.0, weight_temperature=4.0, gi=True, gamma=1.0,
              epochs=2, seed=0, preset="cpu-quick")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def test_enabled_controls_follow_the_loss():
    assert widgets.enabled_controls("ce") == set()
    assert widgets.enabled_controls("kl") == {"temperature"}
    assert "gamma" in widgets.enabled_controls("gkl") and "gamma" not in widgets.enabled_controls("ikl")
    assert "gi" not in widgets.enabled_controls("dkd")
    with pytest.raises(ValueError, match="unknown loss"):
        widgets.enabled_controls("kld")


def test_run_request_uses_only_the_loss_hyper_parameters():
    spec, seed, preset, overrides = widgets.run_request(dict(VALUES, loss="kl", gamma=2.5, alpha=3.0, temperature=2.0))
    assert (spec, seed, preset) == ("kl", 0, "cpu-quick")
    assert overrides == {"distill.epochs": 2, "distill.temperature": 2.0}
    spec, _, _, overrides = widgets.run_request(dict(VALUES, gi=False, alpha=2.0))
    assert spec == "ikl-nogi" and overrides["losses.ikl.alpha"] == 2.0 and "losses.ikl.gamma" not in overrides
    assert widgets.run_request(dict(VALUES, loss="gkl", gamma=0.5))[3]["losses.gkl.gamma"] == 0.5


def test_loss_settings_are_the_presets_and_run_requests_leave_them_out():
    """What a run uses when nothing overrides it: the preset's distill and per-loss sections, then the
    loss's defaults; T_w is T where the preset gives none. A request sends only what differs, so an
    untouched dashboard run has the config (and cache key) of the preset's own run."""
    from dkl_lib import experiments, train

    assert widgets.loss_settings("cpu-quick", "kl") == {"temperature": 4.0}
    assert widgets.loss_settings("cpu-quick", "ikl") == dict(temperature=4.0, alpha=1.0, beta=1.0,
                                                             weight_temperature=4.0, gi=True)
    assert widgets.loss_settings("cpu-quick", "ikl", temperature=2.0)["weight_temperature"] == 2.0
    assert widgets.loss_settings("cpu-quick", "gkl")["gamma"] == experiments.PRESETS["cpu-quick"]["losses"]["gkl"]["gamma"]
    assert widgets.loss_settings("cpu-quick", "dkd")["beta"] == 1.0 and train._DEFAULT_ALPHA_BETA["dkd"][1] == 8.0
    assert widgets.loss_settings("paper", "dkd")["beta"] == experiments.PRESETS["paper"]["losses"]["dkd"]["beta"]
    short = widgets.loss_settings("gpu-short", "ikl")
    assert (short["alpha"], short["beta"]) == (8.0, 1 / 16)
    for loss in ("kl", "dkl", "ikl", "gkl", "dkd"):
        values = dict(VALUES, loss=loss, **widgets.loss_settings("cpu-quick", loss))
        spec, _, _, overrides = widgets.run_request(values)
        assert overrides == {"distill.epochs": 2}
        ours = experiments.resolve_config("cpu-quick", overrides)
        plain = experiments.resolve_config("cpu-quick", {"distill.epochs": 2})
        assert experiments._run_config(ours, spec, 0, "t") == experiments._run_config(plain, spec, 0, "t")
    # T_w tied to T in the preset: moving both together sends only T, moving T_w alone sends T_w
    assert widgets.run_request(dict(VALUES, temperature=2.0, weight_temperature=2.0))[3] == {
        "distill.epochs": 2, "distill.temperature": 2.0}
    assert widgets.run_request(dict(VALUES, weight_temperature=2.0))[3]["losses.ikl.weight_temperature"] == 2.0


def test_dashboard_sliders_take_the_presets_values(cache):
    dash = widgets.training_dashboard(cache_dir=cache, base_overrides=TINY)
    c = dash.controls
    c["loss"].value = "gkl"
    assert c["gamma"].value == widgets.loss_settings("cpu-quick", "gkl")["gamma"] != 1.0
    c["loss"].value = "ikl"
    c["preset"].value = "gpu-short"
    assert (c["alpha"].value, c["beta"].value) == (8.0, 1 / 16)
    c["preset"].value = "cpu-quick"
    assert (c["alpha"].value, c["beta"].value, c["weight_temperature"].value) == (1.0, 1.0, 4.0)
    c["temperature"].value = 2.0  # the preset ties T_w to T ...
    assert c["weight_temperature"].value == 2.0
    c["weight_temperature"].value = 6.0  # ... until T_w is moved by hand
    c["temperature"].value = 3.0
    assert c["weight_temperature"].value == 6.0
    c["loss"].value = "dkd"
    assert c["alpha"].description == "α (TCKD)" and c["beta"].description == "β (NCKD)"
    c["loss"].value = "dkl"
    assert c["alpha"].description == "α (wMSE)"


def test_dashboard_errors_exports_and_late_stops_are_shown(cache, tmp_path, monkeypatch, no_network):
    dash = widgets.training_dashboard(cache_dir=cache)
    status, buttons, session = dash.state["status"], dash.state["buttons"], dash.state["session"]
    dash.controls["preset"].value = "imagenet"  # no ImageNet here: the error names train/<class>/<image>.JPEG
    buttons["run"].click()
    assert session.wait(120) and session.error is not None
    assert "failed:" in status.value and "&lt;class&gt;" in status.value and "<class>" not in status.value
    assert len(dash.figure.data) == 0  # the failed run's empty curve is gone
    before = status.value
    buttons["stop"].click()  # after the run: nothing to stop, the status stays
    assert status.value == before
    session._rows.append({"run": 1, "loss": "kl", "best_acc": 1.0})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dkl_dashboard_results.csv").mkdir()  # cannot be written
    buttons["export"].click()
    assert status.value.startswith("<span") and "export failed" in status.value
    (tmp_path / "dkl_dashboard_results.csv").rmdir()
    buttons["export"].click()
    assert status.value == f"wrote {tmp_path / 'dkl_dashboard_results.csv'}"


def test_results_table_keeps_its_columns_in_order(cache):
    session = widgets.TrainingSession(cache_dir=cache, base_overrides=TINY)
    session._rows += [{"run": 1, "loss": "kl", "temperature": 4.0, "seconds": 1.0},
                      {"run": 2, "loss": "gkl", "temperature": 4.0, "gamma": 0.05, "seconds": 1.0}]
    assert list(session.results().columns) == ["run", "loss", "temperature", "gamma", "seconds"]


def test_session_runs_in_the_background_caches_and_exports(cache, tmp_path):
    seen, finished = [], []
    session = widgets.TrainingSession(cache_dir=cache, base_overrides=TINY, on_epoch=lambda h: seen.append(len(h)),
                                      on_finish=finished.append)
    assert session.start(dict(VALUES, epochs=3))
    assert not session.start(VALUES)  # one run at a time
    assert session.wait(300) and session.error is None
    assert seen == [1, 2, 3] and finished[-1]["cached"] is False and finished[-1]["epochs_run"] == 3
    t0 = time.perf_counter()
    assert session.start(dict(VALUES, epochs=3)) and session.wait(60)
    assert finished[-1]["cached"] is True and time.perf_counter() - t0 < 10
    assert len(session.history) == 3  # the cached run's curve is shown too
    table = session.results()
    assert len(table) == 2 and {"loss", "alpha", "gi", "seed", "best_acc", "last_acc", "cached"} <= set(table)
    path = session.export_csv(tmp_path / "runs.csv")
    assert len(pathlib.Path(path).read_text().strip().splitlines()) == 3


def test_session_stop_ends_a_run_cleanly(cache):
    finished = []
    session = widgets.TrainingSession(cache_dir=cache, base_overrides=TINY, on_finish=finished.append)
    session.on_epoch = lambda history: session.stop() if len(history) == 2 else None
    assert session.start(dict(VALUES, loss="kl", epochs=40))
    assert session.wait(300) and session.error is None
    assert finished[-1]["epochs_run"] == 2 and finished[-1]["stopped"]


def test_session_reports_errors_without_raising(cache):
    errors = []
    session = widgets.TrainingSession(cache_dir=cache, on_error=errors.append)
    session.start(dict(VALUES, preset="gpu-short"))  # CIFAR-100 is not on this machine
    assert session.wait(120)
    assert isinstance(session.error, FileNotFoundError) and errors == [session.error]
    with pytest.raises(ValueError, match="no finished runs"):
        session.export_csv("unused.csv")


def test_dashboard_buttons_and_disabled_controls(cache):
    dash = widgets.training_dashboard(cache_dir=cache, base_overrides=TINY)
    dash.controls["loss"].value = "kl"
    assert dash.controls["gamma"].disabled and dash.controls["alpha"].disabled and not dash.controls["temperature"].disabled
    dash.controls["loss"].value = "gkl"
    assert not dash.controls["gamma"].disabled and not dash.controls["gi"].disabled
    dash.controls["epochs"].value = 2
    buttons, session = dash.state["buttons"], dash.state["session"]
    buttons["run"].click()
    assert session.wait(300) and session.error is None
    assert len(dash.figure.data) == 1 and list(dash.figure.data[0].x) == [1, 2]
    assert dash.figure.layout.xaxis.dtick == 1  # no 1.5-epoch ticks on a short run
    assert dash.state["progress"].value == 2 and "<table" in dash.state["table"].value
    assert not buttons["export"].disabled and buttons["stop"].disabled and not buttons["run"].disabled
    buttons["run"].click()  # again: a second trace; the first turns grey
    assert session.wait(120)
    assert len(dash.figure.data) == 2 and dash.figure.data[0].line.color == "#bbbbbb"
    assert dash.state["table"].value.count("<tr") == 3  # header + 2 runs
    assert [t.name.split()[0] for t in dash.figure.data] == ["#1", "#2"]  # the table's run numbers
    assert session.results()["run"].tolist() == [1, 2]


# ------------------------------------------------------------------ found by mutation testing
def _fake_run_grid(calls, test_acc=(40.0, 70.0, 55.0)):
    """Stands in for experiments.run_grid: one epoch per entry of ``test_acc`` (best is not last), calling
    ``callback`` after each and stopping when it returns False, as run_grid does; records its arguments."""
    import pandas as pd
    from types import SimpleNamespace

    def run_grid(losses, seeds, *, preset, overrides, callback, **kwargs):
        calls.append(dict(losses=list(losses), seeds=list(seeds), preset=preset, overrides=dict(overrides)))
        history, stopped = [], False
        for epoch, acc in enumerate(test_acc[:overrides["distill.epochs"]], start=1):
            history.append({"epoch": epoch, "test_acc": acc, "train_acc": acc / 2})
            if callback(losses[0], seeds[0], list(history)) is False:
                stopped = True
                break
        accs = [r["test_acc"] for r in history]
        best = max(range(len(accs)), key=accs.__getitem__)
        runs = pd.DataFrame([{"loss": losses[0], "seed": seeds[0], "best_acc": accs[best], "best_epoch": best + 1,
                              "last_acc": accs[-1], "epochs": len(accs), "cached": False, "stopped": stopped,
                              "seconds": 0.01}])
        return SimpleNamespace(runs=runs, histories={(losses[0], seeds[0]): pd.DataFrame(history)})

    return run_grid


def test_every_hyper_parameter_a_loss_uses_reaches_the_run_request():
    # the paper's hyper-parameters per loss: KL has T; DKL and DKD two weights; IKL adds T_w; GKL adds γ
    uses = {"kl": {"temperature"}, "dkl": {"temperature", "alpha", "beta"}, "dkd": {"temperature", "alpha", "beta"},
            "ikl": {"temperature", "alpha", "beta", "weight_temperature"},
            "gkl": {"temperature", "alpha", "beta", "weight_temperature", "gamma"}}
    moved = {"temperature": 2.5, "alpha": 3.0, "beta": 0.5, "weight_temperature": 6.5, "gamma": 0.7}
    for loss, keys in uses.items():
        for key in sorted(keys):
            spec, seed, preset, overrides = widgets.run_request(dict(VALUES, loss=loss, seed=7, **{key: moved[key]}))
            target = "distill.temperature" if key == "temperature" else f"losses.{loss}.{key}"
            assert overrides[target] == moved[key], (loss, key)
            assert (spec, seed, preset) == (loss, 7, "cpu-quick")


def test_session_rows_report_the_run_that_ran(monkeypatch):
    from dkl_lib import experiments

    calls, finished = [], []
    monkeypatch.setattr(experiments, "run_grid", _fake_run_grid(calls))
    session = widgets.TrainingSession(base_overrides={"data.n_train": 300}, on_finish=finished.append)
    assert session.start(dict(VALUES, gi=False, epochs=3, seed=4, alpha=2.0)) and session.wait(30)
    assert calls[-1]["losses"] == ["ikl-nogi"] and calls[-1]["seeds"] == [4]
    assert calls[-1]["overrides"] == {"data.n_train": 300, "distill.epochs": 3, "losses.ikl.alpha": 2.0}
    row, acc = finished[-1], [r["test_acc"] for r in session.history]
    assert row["loss"] == "ikl-nogi" and row["seed"] == 4 and row["alpha"] == 2.0
    assert row["best_acc"] == max(acc) != row["last_acc"] == acc[-1] and row["best_epoch"] == 1 + acc.index(max(acc))
    # the settings IKL uses, and no γ (a disabled control) in the table
    assert set(row) & set(widgets.LOSS_HPARAMS) == {"temperature", "alpha", "beta", "weight_temperature", "gi"}


def test_a_stopped_session_runs_its_next_run_to_the_end(monkeypatch):
    from dkl_lib import experiments

    calls, finished = [], []
    monkeypatch.setattr(experiments, "run_grid", _fake_run_grid(calls))
    session = widgets.TrainingSession(on_finish=finished.append)
    session.on_epoch = lambda history: session.stop() if len(history) == 1 else None
    assert session.start(dict(VALUES, epochs=3)) and session.wait(30)
    assert finished[-1]["stopped"] and finished[-1]["epochs_run"] == 1
    session.on_epoch = None
    assert session.start(dict(VALUES, epochs=3)) and session.wait(30)  # Stop, then Run again
    assert not finished[-1]["stopped"] and finished[-1]["epochs_run"] == 3


def test_dashboard_shows_test_accuracy_best_and_last_and_the_stop_button_stops(monkeypatch):
    from dkl_lib import experiments

    calls = []
    monkeypatch.setattr(experiments, "run_grid", _fake_run_grid(calls))
    dash = widgets.training_dashboard()
    status, buttons, session = dash.state["status"], dash.state["buttons"], dash.state["session"]
    dash.controls["gi"].value, dash.controls["epochs"].value = False, 3
    buttons["run"].click()
    assert session.wait(30) and session.error is None
    acc = [r["test_acc"] for r in session.history]
    assert list(dash.figure.data[0].y) == acc  # the axis says test accuracy
    assert dash.figure.data[0].name == f"#1 {widgets.plots.label('ikl')} (no GI) seed 0"
    assert f"best {max(acc):.2f}%" in status.value and f"last {acc[-1]:.2f}%" in status.value
    shown = session.on_epoch  # the dashboard's own epoch handler
    session.on_epoch = lambda history: (shown(history), buttons["stop"].click() if len(history) == 1 else None)
    buttons["run"].click()
    assert session.wait(30) and session.error is None
    assert session.results()["stopped"].tolist() == [False, True] and session.results()["epochs_run"].tolist() == [3, 1]
    assert "stopped early" in status.value


def test_t_w_follows_t_only_where_the_preset_ties_them():
    dash = widgets.training_dashboard()
    c = dash.controls
    c["preset"].value, c["loss"].value = "gpu-short", "gkl"
    own = widgets.loss_settings("gpu-short", "gkl", temperature=-1.0)["weight_temperature"]
    assert own != -1.0 and c["weight_temperature"].value == own  # this preset sets T_w itself
    c["temperature"].value = own / 2
    assert c["weight_temperature"].value == own


def test_loss_settings_agree_with_what_a_run_uses(monkeypatch):
    """The sliders show what a run would use: the per-loss section of a preset wins over its distill
    section, as in the run's own configuration (checked on every preset and on one where they disagree)."""
    import copy

    from dkl_lib import experiments, train

    clash = copy.deepcopy(experiments.PRESETS["cpu-quick"])
    clash["distill"].update(alpha=3.0, weight_temperature=6.0)
    clash["losses"].update(kl={"temperature": 2.0}, ikl={"gi": True, "alpha": 5.0, "weight_temperature": 1.5})
    monkeypatch.setitem(experiments.PRESETS, "clash", clash)
    for preset in experiments.PRESETS:
        for loss in ("kl", "dkl", "ikl", "gkl", "dkd"):
            run = experiments._run_config(experiments.resolve_config(preset), loss, 0, "t")["distill"]
            alpha, beta = train._DEFAULT_ALPHA_BETA.get(loss, (None, None))
            defaults = {"alpha": alpha, "beta": beta, "weight_temperature": run["temperature"], "gamma": 1.0}
            for key, value in widgets.loss_settings(preset, loss).items():
                assert value == run.get(key, defaults.get(key)), (preset, loss, key)
    assert widgets.loss_settings("clash", "kl") == {"temperature": 2.0}
    assert widgets.loss_settings("clash", "ikl")["alpha"] == 5.0


def test_the_empty_curve_plot_shows_epochs_and_0_to_100_percent_then_fits_the_curves(monkeypatch):
    """Before the first run plotly drew its empty default axes, -1 to 6 by -1 to 4: a 'test accuracy (%)' axis
    with negative values. The empty plot now spans the epochs and 0-100 %; the first curve switches to autorange."""
    from dkl_lib import experiments

    monkeypatch.setattr(experiments, "run_grid", _fake_run_grid([]))
    dash = widgets.training_dashboard()
    layout = dash.figure.layout
    assert tuple(layout.yaxis.range) == (0, 100) and layout.yaxis.autorange is not True
    assert tuple(layout.xaxis.range) == (0.5, dash.controls["epochs"].value + 0.5)
    dash.controls["epochs"].value = 3
    dash.state["buttons"]["run"].click()
    assert dash.state["session"].wait(30) and dash.state["session"].error is None
    assert layout.xaxis.autorange is True and layout.yaxis.autorange is True  # fitted to the curve now


def test_choosing_a_preset_shows_its_values_unclipped_so_an_untouched_run_is_the_presets():
    """gpu-short and paper give IKL T_w = 100; the T_w slider ends at 10 and clipped it, so the dashboard showed 10
    and an untouched run sent losses.ikl.weight_temperature = 10: silently another run than the preset's."""
    from dkl_lib import experiments

    dash = widgets.training_dashboard()
    c = dash.controls
    for preset in experiments.PRESETS:
        for loss in ("kl", "dkl", "ikl", "gkl", "dkd"):
            c["preset"].value, c["loss"].value = preset, loss
            settings = widgets.loss_settings(preset, loss)
            assert {key: c[key].value for key in settings} == settings, (preset, loss)
            values = {key: control.value for key, control in c.items()}
            assert widgets.run_request(values)[3] == {"distill.epochs": values["epochs"]}, (preset, loss)


def test_the_epochs_slider_follows_the_preset_so_an_untouched_run_is_the_presets_own(monkeypatch):
    """The slider started at 10 epochs for every preset: an untouched cpu-quick run stopped before the
    preset's learning-rate drops (epochs 18 and 25 of 30) and was not the preset's run (another cache key,
    a lower accuracy than notebook 03's). It now shows the preset's epochs, widening for paper's 240."""
    from dkl_lib import experiments

    calls = []
    monkeypatch.setattr(experiments, "run_grid", _fake_run_grid(calls))
    dash = widgets.training_dashboard()
    c = dash.controls
    for preset in ("cpu-quick", "paper", "gpu-short"):
        c["preset"].value = preset
        epochs = experiments.resolve_config(preset)["distill"]["epochs"]
        assert c["epochs"].value == epochs and c["epochs"].max >= epochs, preset
        assert widgets.run_request({k: w.value for k, w in c.items()})[3] == {"distill.epochs": epochs}
    c["preset"].value = "cpu-quick"
    assert tuple(dash.figure.layout.xaxis.range) == (0.5, c["epochs"].value + 0.5)
    c["epochs"].value = 5  # a choice the user makes stays until the preset changes
    c["loss"].value = "kl"
    assert c["epochs"].value == 5
