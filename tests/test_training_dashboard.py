"""The training dashboard's logic without a browser: allowed controls, run requests, background runs."""
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
    spec, seed, preset, overrides = widgets.run_request(dict(VALUES, loss="kl", gamma=2.5, alpha=3.0))
    assert (spec, seed, preset) == ("kl", 0, "cpu-quick")
    assert overrides == {"distill.epochs": 2, "distill.temperature": 4.0}
    spec, _, _, overrides = widgets.run_request(dict(VALUES, gi=False, alpha=2.0))
    assert spec == "ikl-nogi" and overrides["losses.ikl.alpha"] == 2.0 and "losses.ikl.gamma" not in overrides
    assert widgets.run_request(dict(VALUES, loss="gkl", gamma=0.5))[3]["losses.gkl.gamma"] == 0.5


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
    assert len(open(path).read().strip().splitlines()) == 3


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
    assert dash.state["progress"].value == 2 and "<table" in dash.state["table"].value
    assert not buttons["export"].disabled and buttons["stop"].disabled and not buttons["run"].disabled
    buttons["run"].click()  # again: a second trace; the first turns grey
    assert session.wait(120)
    assert len(dash.figure.data) == 2 and dash.figure.data[0].line.color == "#bbbbbb"
    assert dash.state["table"].value.count("<tr") == 3  # header + 2 runs
