"""dkl_lib.analysis (notebook 05): probes during training, calibration and consistency metrics, grids."""
import math

import pytest
import torch

from dkl_lib import analysis, plots

TINY = {"teacher.train.epochs": 3, "data.n_train": 200, "distill.epochs": 3}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def test_reliability_table_and_ece_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    table = analysis.reliability_table(probs, labels, n_bins=2)
    assert table["count"].tolist() == [0, 4]
    # one bin: mean confidence (0.9 + 0.8 + 0.7 + 0.55) / 4, accuracy 3/4
    assert table.loc[1, "confidence"] == pytest.approx(0.7375) and table.loc[1, "accuracy"] == pytest.approx(0.75)
    assert analysis.expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(abs(0.75 - 0.7375))
    fine = analysis.expected_calibration_error(probs, labels, n_bins=10)
    # bins 0.9 (wrong? no: pred 0 = label 0), 0.8 (pred 0, label 1: wrong), 0.7 (right), 0.55 (right)
    assert fine == pytest.approx((abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(1 - 0.55)) / 4)
    with pytest.raises(ValueError, match="n_bins"):
        analysis.reliability_table(probs, labels, n_bins=0)
    with pytest.raises(ValueError, match="labels"):
        analysis.reliability_table(probs, labels[:2])


def test_intra_class_spread_by_hand():
    same = torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.2, 0.8]], dtype=torch.float64)
    assert analysis.intra_class_spread(same, torch.tensor([0, 0, 1])) == 0.0
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # one class, mean (0.5, 0.5): each vector is at squared distance 0.5
    assert analysis.intra_class_spread(probs, torch.tensor([0, 0])) == pytest.approx(0.5)


PROBS = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), dim=1)
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])

BAD_PREDICTIONS = [
    # (description, probs, labels, exception, message fragment)
    ("nan probability", PROBS.clone().index_fill_(0, torch.tensor([2]), float("nan")), LABELS, ValueError,
     "non-finite"),
    ("raw logits", torch.randn(6, 3) * 5, LABELS, ValueError, "not logits"),
    ("rows not summing to 1", PROBS * 0.5, LABELS, ValueError, "sum to 1"),
    ("empty", torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), ValueError, "empty"),
    ("float labels", PROBS, LABELS.float(), TypeError, "labels must hold integer"),
    ("label out of range", PROBS, torch.tensor([0, 1, 2, 0, 1, 3]), ValueError, "labels out of range"),
    ("integer probs", torch.ones(6, 3, dtype=torch.long), LABELS, TypeError, "floating-point"),
]


@pytest.mark.parametrize("metric", [analysis.expected_calibration_error, analysis.reliability_table,
                                    analysis.intra_class_spread])
@pytest.mark.parametrize("case", BAD_PREDICTIONS, ids=[c[0] for c in BAD_PREDICTIONS])
def test_prediction_metrics_reject_bad_input(metric, case):
    _, probs, labels, exc, fragment = case
    with pytest.raises(exc, match=fragment):
        metric(probs, labels)


def test_prediction_metrics_accept_float32_softmax_output():
    """Rows of a float32 softmax sum to 1 only up to rounding; that is a probability matrix."""
    probs = torch.softmax(torch.randn(50, 1000, generator=torch.Generator().manual_seed(1)) * 4, dim=1)
    labels = torch.randint(0, 1000, (50,), generator=torch.Generator().manual_seed(2))
    ece = analysis.expected_calibration_error(probs, labels)
    assert 0.0 <= ece <= 1.0 and analysis.intra_class_spread(probs, labels) >= 0.0


def test_probe_runs_kl_equals_dkl_in_float64_and_probes_every_epoch(cache):
    res = analysis.probe_runs(["kl", "dkl"], [0], dtype=torch.float64, probe=analysis.parameter_probe,
                              overrides=TINY, cache_dir=cache, progress=False)
    drift = analysis.parameter_drift(res, "kl", "dkl", 0)
    assert len(drift) == 3 and drift["max_param_diff"].max() < 1e-12
    assert (drift["test_acc_kl"] == drift["test_acc_dkl"]).all()
    assert next(res.models[("kl", 0)].parameters()).dtype == torch.float64
    gap = analysis.probe_runs(["kl", "ikl-nogi"], [0], probe=analysis.logit_difference_probe, overrides=TINY,
                              cache_dir=cache, progress=False)
    for history in gap.histories.values():
        assert len(history) == 3 and (history["logit_gap"] > 0).all()
    assert not math.isclose(gap.histories[("kl", 0)]["logit_gap"].iloc[-1],
                            gap.histories[("ikl-nogi", 0)]["logit_gap"].iloc[-1])
    metrics = analysis.prediction_metrics(gap)
    assert set(metrics["loss"]) == {"kl", "ikl-nogi"} and metrics["accuracy"].between(0, 100).all()


def test_sensitivity_grid_counts_runs(cache):
    runs, summary = analysis.sensitivity("ikl", {"alpha": [0.5, 1.0], "temperature": [4.0]}, [0, 1],
                                         overrides=TINY, cache_dir=cache, progress=False)
    assert len(runs) == 4 and summary["n"].tolist() == [2, 2]
    assert set(summary.columns) >= {"alpha", "temperature", "best_mean", "best_std", "last_mean", "collapsed"}
    assert (runs["drop"] == runs["best_acc"] - runs["last_acc"]).all() and (runs["drop"] >= 0).all()
    with pytest.raises(ValueError, match="empty"):
        analysis.sensitivity("ikl", {}, [0], overrides=TINY, cache_dir=cache, progress=False)
    heat = plots.sensitivity_heatmap(summary, "alpha", "temperature")
    assert heat.data[0].z.shape == (1, 2) and "(n=2)" in heat.data[0].text[0][0]
    g = summary.assign(gamma=summary["alpha"])
    line = plots.sensitivity_lines(g, "gamma")
    assert list(line.data[0].error_y.array) == pytest.approx(g["best_std"].tolist())


def test_sensitivity_counts_collapsed_runs_per_cell(monkeypatch):
    """A cell's mean can hide one diverged seed; ``collapsed`` counts such runs (drop > collapse_points)."""
    import pandas as pd
    from types import SimpleNamespace

    # (best, last) per seed for each alpha: one run of alpha=2 falls 30 points, one of alpha=4 exactly 20
    table = {0.5: [(94.0, 93.5), (93.0, 92.0)], 2.0: [(90.0, 60.0), (92.0, 91.0)], 4.0: [(80.0, 60.0), (70.0, 9.0)]}

    def fake_grid(losses, seeds, *, overrides, **_):
        rows = table[overrides["losses.ikl.alpha"]]
        return SimpleNamespace(runs=pd.DataFrame({"loss": "ikl", "seed": seeds, "best_acc": [b for b, _ in rows],
                                                  "last_acc": [last for _, last in rows]}))

    monkeypatch.setattr(analysis.experiments, "run_grid", fake_grid)
    _, summary = analysis.sensitivity("ikl", {"alpha": list(table)}, [0, 1], progress=False)
    assert summary["collapsed"].tolist() == [0, 1, 1]          # 20.0 is not more than 20
    assert summary["last_mean"].tolist() == pytest.approx([92.75, 75.5, 34.5])
    _, strict = analysis.sensitivity("ikl", {"alpha": list(table)}, [0, 1], progress=False, collapse_points=0.9)
    assert strict["collapsed"].tolist() == [1, 2, 2]
    with pytest.raises(ValueError, match="collapse_points"):
        analysis.sensitivity("ikl", {"alpha": [2.0]}, [0], progress=False, collapse_points=-1)


def test_notebook_05_figures_carry_their_data():
    import pandas as pd

    d = pd.DataFrame({"epoch": [1, 2], "max_param_diff": [1e-16, 2e-16]})
    assert list(plots.drift_lines({"float64": d}).data[0].y) == pytest.approx([1e-16, 2e-16])
    m = pd.DataFrame({"loss": ["ikl", "ikl", "ikl-nogi", "ikl-nogi"], "seed": [0, 1, 0, 1],
                      "ece": [0.1, 0.3, 0.2, 0.2]})
    bars = plots.metric_bars(m, {"ece": "ECE"})
    assert list(bars.data[0].y) == pytest.approx([0.2, 0.2])
    assert list(bars.data[0].error_y.array) == pytest.approx([m["ece"][:2].std(), 0.0])
    table = pd.DataFrame({"count": [0, 3], "confidence": [float("nan"), 0.8], "accuracy": [float("nan"), 0.6]})
    rel = plots.reliability_diagram({"ikl": table})
    assert list(rel.data[1].x) == [0.8] and list(rel.data[1].y) == [0.6]
    assert rel.data[1].line.color == plots.color("ikl")


# ------------------------------------------------------------------ found by mutation testing
def test_a_confidence_of_exactly_one_falls_in_the_last_bin():
    """conf = 1.0 (a one-hot row) maps to bin n_bins, which does not exist: it belongs to the last one,
    and every sample is counted once."""
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.45, 0.25], [0.0, 0.0, 1.0], [0.95, 0.05, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    for n_bins in (2, 5, 10):
        table = analysis.reliability_table(probs, labels, n_bins=n_bins)
        assert table["count"].sum() == 4 and table["low"].tolist() == [b / n_bins for b in range(n_bins)]
        assert table["high"].tolist() == [(b + 1) / n_bins for b in range(n_bins)]
        last = table.iloc[-1]
        # the last bin holds 1.0 (right), 1.0 (wrong) and 0.95 (right)
        assert last["count"] == 3 and last["confidence"] == pytest.approx((1.0 + 1.0 + 0.95) / 3)
        assert last["accuracy"] == pytest.approx(2 / 3)
        ece = analysis.expected_calibration_error(probs, labels, n_bins=n_bins)
        assert ece == pytest.approx(3 / 4 * abs(2 / 3 - 2.95 / 3) + 1 / 4 * abs(1.0 - 0.45))


def test_intra_class_spread_is_the_mean_over_classes_of_the_within_class_mean():
    """Classes weigh equally, whatever their size: (spread of class 0 + spread of class 1) / 2."""
    rows = {0: [[1.0, 0.0], [0.0, 1.0]], 1: [[0.2, 0.8], [0.4, 0.6], [0.3, 0.7]]}

    def spread(vectors):
        mean = [sum(v[j] for v in vectors) / len(vectors) for j in range(2)]
        return sum(sum((v[j] - mean[j]) ** 2 for j in range(2)) for v in vectors) / len(vectors)

    probs = torch.tensor(rows[0] + rows[1], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1])
    want = (spread(rows[0]) + spread(rows[1])) / 2
    assert analysis.intra_class_spread(probs, labels) == pytest.approx(want, rel=1e-12)


def test_logit_difference_probe_uses_the_runs_temperature():
    """logit_gap = the pairwise wMSE between the student's test logits and the teacher's, with the
    teacher's weights at settings["temperature"]."""
    from dkl_lib import data as D
    from dkl_lib import losses, models

    data = D.synthetic(n_train=4, n_test=6, num_classes=4, dtype=torch.float64)
    student = models.MLP(in_shape=(1, 8, 8), hidden=(), num_classes=4).double()
    teacher = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    with torch.no_grad():
        logits = student((data.x_test - 0.5) / 0.25)  # synthetic data: mean 0.5, std 0.25
    for t in (1.0, 4.0):
        got = analysis.logit_difference_probe(student, data, teacher, {"temperature": t})["logit_gap"]
        assert got == pytest.approx(float(losses.wmse_pairwise(logits, teacher, temperature=t)), rel=1e-12)
    assert analysis.logit_difference_probe(student, data, teacher, {})["logit_gap"] == pytest.approx(
        float(losses.wmse_pairwise(logits, teacher, temperature=1.0)), rel=1e-12)


def test_sensitivity_shows_one_progress_bar_over_its_cells(monkeypatch, capsys):
    """progress=True drew one run_grid bar per cell (20 bars stacked for notebook 05's α × T grid); now one bar
    counts the cells and the runs inside a cell stay quiet."""
    import pandas as pd
    from types import SimpleNamespace

    calls = []

    def fake_grid(losses, seeds, *, progress, **_):
        calls.append(progress)
        return SimpleNamespace(runs=pd.DataFrame({"loss": "ikl", "seed": seeds, "best_acc": 90.0, "last_acc": 89.0}))

    monkeypatch.setattr(analysis.experiments, "run_grid", fake_grid)
    analysis.sensitivity("ikl", {"alpha": [0.5, 1.0], "temperature": [2.0, 4.0]}, [0, 1], progress=True)
    err = capsys.readouterr().err
    assert calls == [False] * 4
    assert "ikl sensitivity" in err and "4/4" in err
    analysis.sensitivity("ikl", {"alpha": [0.5]}, [0], progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("dtype,n_bins", [(torch.float16, 15), (torch.bfloat16, 100), (torch.float32, 7)])
def test_calibration_bins_low_precision_confidences_where_their_values_lie(dtype, n_bins):
    """conf * n_bins was computed in the input's dtype: in bfloat16 0.828125 * 100 rounds to 83, so the
    sample sat in the bin [0.83, 0.84) above its confidence, and the ECE moved (0.0634 vs 0.0599)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(4000, 10, generator=g), 1).to(dtype)
    probs = probs / probs.double().sum(1, keepdim=True).to(dtype)  # rows summing to 1 within the dtype
    labels = torch.randint(0, 10, (4000,), generator=g)
    table = analysis.reliability_table(probs, labels, n_bins=n_bins)
    conf = probs.max(1).values.double()
    oracle = [int(((conf >= b / n_bins) & ((conf < (b + 1) / n_bins) | (b == n_bins - 1))).sum()) for b in range(n_bins)]
    assert table["count"].tolist() == oracle
    used = table[table["count"] > 0]
    assert ((used["confidence"] >= used["low"] - 1e-12) & (used["confidence"] < used["high"] + 1e-12)).all()
    correct = (probs.double().argmax(1) == labels).double()
    bins = [(conf >= b / n_bins) & ((conf < (b + 1) / n_bins) | (b == n_bins - 1)) for b in range(n_bins)]
    ece = sum(float(m.sum()) / 4000 * abs(float(correct[m].mean() - conf[m].mean())) for m in bins if m.any())
    assert analysis.expected_calibration_error(probs, labels, n_bins=n_bins) == pytest.approx(ece, rel=1e-12)


def test_calibration_n_bins_takes_numpy_integers_and_refuses_floats():
    import numpy as np
    probs, labels = torch.full((4, 2), 0.5), torch.tensor([0, 1, 0, 1])
    assert len(analysis.reliability_table(probs, labels, n_bins=np.int64(5))) == 5
    with pytest.raises(TypeError, match="n_bins must be an integer, got 10.0"):
        analysis.reliability_table(probs, labels, n_bins=10.0)
    with pytest.raises(ValueError, match="n_bins must be >= 1, got 0"):
        analysis.expected_calibration_error(probs, labels, n_bins=0)


def test_sensitivity_refuses_a_grid_whose_cells_are_one_run(monkeypatch):
    """An axis the loss ignores (the temperature of "ce"), one its name fixes (gi of "ikl-nogi") or a value
    listed twice gave a flat grid of one cached run reported as a sensitivity; every cell is checked before
    any trains, so a bad value in the last cell no longer surfaces after the others have trained."""
    def no_training(*args, **kwargs):
        raise AssertionError("trained before the grid was checked")

    monkeypatch.setattr(analysis.experiments, "run_grid", no_training)
    with pytest.raises(ValueError, match=r"same run of 'ce': it ignores temperature"):
        analysis.sensitivity("ce", {"temperature": [1.0, 4.0]}, [0], progress=False)
    with pytest.raises(ValueError, match=r"same run of 'ikl-nogi': it ignores gi"):
        analysis.sensitivity("ikl-nogi", {"gi": [True, False], "alpha": [1.0]}, [0], progress=False)
    with pytest.raises(ValueError, match="lists the cell .* twice"):
        analysis.sensitivity("kl", {"temperature": [4, 4.0]}, [0], progress=False)
    with pytest.raises(ValueError, match="losses.ikl.alpha must be >= 0"):
        analysis.sensitivity("ikl", {"alpha": [1.0, 2.0, -1.0]}, [0], progress=False)


def test_probe_runs_checks_the_dtype_before_the_teacher_trains(monkeypatch):
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was trained before dtype was checked")

    monkeypatch.setattr(analysis.experiments, "get_teacher", no_teacher)
    for dtype in ("float64", torch.int64, torch.float16):
        with pytest.raises(TypeError, match="dtype must be None"):
            analysis.probe_runs(["kl"], [0], dtype=dtype, progress=False)


def test_parameter_drift_names_a_missing_run_or_probes_of_another_kind():
    import pandas as pd
    result = analysis.ProbeResult()
    result.probes[("kl", 0)] = [{"params": torch.zeros(3), "test_logits": torch.zeros(2, 3)}]
    result.probes[("dkl", 0)] = [{"logit_gap": 0.1}]
    result.histories[("kl", 0)] = result.histories[("dkl", 0)] = pd.DataFrame({"test_acc": [50.0], "loss": [1.0]})
    with pytest.raises(ValueError, match=r"no probed run \('ikl', seed 0\).*\('dkl', 0\), \('kl', 0\)"):
        analysis.parameter_drift(result, "kl", "ikl", 0)
    with pytest.raises(ValueError, match=r"\('dkl', 0\) were not made by parameter_probe"):
        analysis.parameter_drift(result, "kl", "dkl", 0)
    with pytest.raises(TypeError, match="ProbeResult"):
        analysis.parameter_drift({}, "kl", "dkl", 0)
    result.probes[("dkl", 0)] = [{"params": torch.ones(3), "test_logits": torch.zeros(2, 3)}]
    assert analysis.parameter_drift(result, "kl", "dkl", 0)["max_param_diff"].tolist() == [1.0]
