"""The training figures and tables of dkl_lib.plots (notebook 03): they carry the data they were given."""
import inspect
import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from dkl_lib import experiments, plots
from dkl_lib.prior import ClassPrior
from conftest import comparison_table

NEW_FUNCTIONS = (plots.histories_frame, plots.learning_curves, plots.final_accuracy_chart,
                 plots.prior_heatmap, plots.paper_comparison)


def fake_histories(losses=("ce", "kl", "dkl", "ikl", "dkd"), seeds=(0, 1, 2), epochs=4):
    """{(loss, seed): per-epoch DataFrame} shaped like GridResult.histories, with distinct values."""
    terms = {"ce": [], "kl": ["kl"], "dkl": ["wmse", "soft_ce"], "ikl": ["wmse", "soft_ce"], "dkd": ["tckd", "nckd"]}
    out = {}
    for i, loss in enumerate(losses):
        for seed in seeds:
            rows = []
            for e in range(1, epochs + 1):
                row = {"epoch": e, "lr": 0.05, "loss": 3.0 / e + seed, "ce": 2.0 / e + 0.1 * seed + 0.01 * i,
                       "train_acc": 50 + 10 * e, "test_acc": 60.0 + 5 * e + seed + i}
                for j, term in enumerate(terms[loss]):
                    row[term] = (j + 1) / e + 0.2 * seed
                rows.append(row)
            out[(loss, seed)] = pd.DataFrame(rows)
    return out


def fake_runs():
    return pd.DataFrame({
        "loss": ["ce"] * 3 + ["kl"] * 3 + ["ikl"] * 3,
        "seed": [0, 1, 2] * 3,
        "best_acc": [90.0, 91.0, 93.0, 95.0, 95.5, 96.5, 94.0, 94.0, 97.0],
        "last_acc": [89.0, 90.0, 92.5, 94.0, 95.5, 96.0, 93.0, 94.5, 96.0],
    })


def traces(fig, **meta):
    return [t for t in fig.data if t.meta and all(t.meta.get(k) == v for k, v in meta.items())]


# ------------------------------------------------------------------------------ no .show()
def test_no_function_calls_show(monkeypatch):
    for fn in NEW_FUNCTIONS:
        assert ".show(" not in inspect.getsource(fn), fn.__name__

    def forbidden(*args, **kwargs):
        raise AssertionError(".show() was called")

    monkeypatch.setattr(go.Figure, "show", forbidden)
    monkeypatch.setattr(plt, "show", forbidden)
    monkeypatch.setattr(matplotlib.figure.Figure, "show", forbidden)
    hist = fake_histories()
    plots.learning_curves(hist)
    plots.final_accuracy_chart(fake_runs(), teacher_acc=98.0)
    plots.prior_heatmap(torch.rand(3, 4, 4))
    plots.prior_heatmap(torch.rand(3, 4, 4), layout="grid")


# ------------------------------------------------------------------------------ learning curves
def test_histories_frame_is_long_and_checks_its_input():
    hist = fake_histories(losses=("kl",), seeds=(0, 1), epochs=3)
    long = plots.histories_frame(hist)
    assert list(long.columns[:3]) == ["loss", "seed", "epoch"] and len(long) == 6
    assert plots.histories_frame(long).equals(long)
    listed = {("kl", 0): hist[("kl", 0)].to_dict(orient="records")}
    assert len(plots.histories_frame(listed)) == 3
    with pytest.raises(ValueError, match="non-empty"):
        plots.histories_frame({})
    with pytest.raises(ValueError, match="pairs"):
        plots.histories_frame({"kl": hist[("kl", 0)]})
    with pytest.raises(ValueError, match="missing"):
        plots.histories_frame(pd.DataFrame({"loss": ["kl"], "epoch": [1]}))


def test_learning_curves_carry_mean_and_std_per_loss_and_term():
    hist = fake_histories()
    long = plots.histories_frame(hist)
    fig = plots.learning_curves(hist)
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0].startswith("test accuracy (%)<br>")  # + the zoom note, tested below
    assert titles[1:] == [f"{plots.TERM_LABELS[t]} term" for t in ("ce", "kl", "soft_ce", "wmse", "tckd", "nckd")]
    for loss in ("ce", "kl", "dkl", "ikl", "dkd"):
        for panel in ("test_acc", "ce"):
            (mean,) = traces(fig, loss=loss, panel=panel, kind="mean")
            part = long[long["loss"] == loss].groupby("epoch")[panel]
            np.testing.assert_allclose(mean.y, part.mean().to_numpy())
            np.testing.assert_allclose([s for s, _ in mean.customdata], part.std(ddof=1).to_numpy())
            assert mean.name == plots.label(loss) and mean.line.color == plots.color(loss)
    # a term appears only for the losses that logged it
    assert {t.meta["loss"] for t in traces(fig, panel="wmse", kind="mean")} == {"dkl", "ikl"}
    assert {t.meta["loss"] for t in traces(fig, panel="kl", kind="mean")} == {"kl"}
    assert {t.meta["loss"] for t in traces(fig, panel="tckd", kind="mean")} == {"dkd"}
    # the band is mean + std on the way out and mean - std on the way back
    band = [t for t in fig.data if t.meta and t.meta.get("kind") == "band" and t.name.startswith("DKD")][0]
    stats = long[long["loss"] == "dkd"].groupby("epoch")["test_acc"].agg(["mean", "std"])
    n = len(stats)
    np.testing.assert_allclose(band.y[:n], (stats["mean"] + stats["std"]).to_numpy())
    np.testing.assert_allclose(band.y[n:], (stats["mean"] - stats["std"]).to_numpy()[::-1])
    # one legend entry per loss, toggling every panel of that loss
    assert sorted(t.name for t in fig.data if t.showlegend) == sorted(plots.label(x) for x in ("ce", "kl", "dkl", "ikl", "dkd"))


def test_learning_curves_options():
    hist = fake_histories(losses=("kl", "ikl"), seeds=(0,))
    fig = plots.learning_curves(hist, terms=["ce"], metric="train_acc", band=False)
    assert [a.text.split("<br>")[0] for a in fig.layout.annotations] == ["train accuracy (%)", "CE term"]
    assert not traces(fig, kind="band")
    (mean,) = traces(fig, loss="kl", panel="ce", kind="mean")
    assert [s for s, _ in mean.customdata] == [0.0] * 4  # one seed: no spread
    with pytest.raises(ValueError, match="metric"):
        plots.learning_curves(hist, metric="nope")
    with pytest.raises(ValueError, match="terms"):
        plots.learning_curves(hist, terms=["nope"])


def test_the_total_training_loss_survives_the_long_table_and_can_be_plotted():
    """The trainers' history column ``loss`` (the epoch's total loss) is kept as ``total_loss`` (``loss``
    names the loss function in the long table), and metric="loss" draws its mean over seeds."""
    hist = fake_histories(losses=("kl", "ikl"), seeds=(0, 1), epochs=3)
    long = plots.histories_frame(hist)
    assert set(long["loss"]) == {"kl", "ikl"}
    kl0 = long[(long["loss"] == "kl") & (long["seed"] == 0)]
    assert kl0["total_loss"].tolist() == hist[("kl", 0)]["loss"].tolist()
    fig = plots.learning_curves(hist, metric="loss", terms=[], band=False)
    assert fig.layout.annotations[0].text == "total loss"
    (mean,) = traces(fig, loss="kl", panel="total_loss", kind="mean")
    want = [(hist[("kl", 0)]["loss"][e] + hist[("kl", 1)]["loss"][e]) / 2 for e in range(3)]
    assert list(mean.y) == pytest.approx(want)


def test_sensitivity_figures_say_which_epoch_they_show():
    s = pd.DataFrame({"alpha": [1.0, 2.0], "temperature": [4.0, 4.0], "n": [2, 2], "best_mean": [70.0, 71.0],
                      "best_std": [0.5, 0.5], "last_mean": [60.0, 61.0], "last_std": [0.4, 0.4]})
    for value, word in [("best", "best-epoch"), ("last", "last-epoch")]:
        heat = plots.sensitivity_heatmap(s, "alpha", "temperature", value=value)
        line = plots.sensitivity_lines(s, "alpha", value=value)
        assert f"{word} test accuracy" in heat.layout.title.text and f"{word} test accuracy" in line.layout.title.text
        assert list(line.data[0].y) == s[f"{value}_mean"].tolist()
    assert plots.sensitivity_lines(s, "alpha", title="mine").layout.title.text == "mine"


# ------------------------------------------------------------------------------ final accuracy (seaborn)
def _errorbar_span(ax, x):
    """(low, high) of the vertical error bar drawn at category position x."""
    for line in ax.lines:
        xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        at = np.isclose(xs, x) & np.isfinite(ys)
        if at.sum() == 2:
            return tuple(sorted(ys[at]))
    raise AssertionError(f"no error bar at x={x}")


def test_final_accuracy_chart_error_bars_are_the_std():
    runs = fake_runs()
    before = set(plt.get_fignums())
    fig = plots.final_accuracy_chart(runs, teacher_acc=98.0, title="t")
    assert isinstance(fig, matplotlib.figure.Figure)
    assert set(plt.get_fignums()) == before  # closed in pyplot: displayed once, as the returned value
    summary = experiments.summarize(runs)
    best_ax, last_ax = fig.axes[:2]
    assert "best" in best_ax.get_title() and "last" in last_ax.get_title() and "n = 3" in best_ax.get_title()
    assert [t.get_text() for t in best_ax.get_xticklabels()] == ["CE only", "KL", "IKL"]
    for ax, col in ((best_ax, "best_acc"), (last_ax, "last_acc")):
        for x, (_, s) in enumerate(summary.iterrows()):
            low, high = _errorbar_span(ax, x)
            assert math.isclose((high - low) / 2, s[f"{col}_std"], rel_tol=1e-9)
            assert math.isclose((high + low) / 2, s[f"{col}_mean"], rel_tol=1e-9)
        # the teacher line
        assert any(np.allclose(line.get_ydata(), 98.0) for line in ax.lines)
    fig.savefig(__import__("io").BytesIO(), format="png")  # renders without pyplot


def test_final_accuracy_chart_order_and_bad_input():
    fig = plots.final_accuracy_chart(fake_runs(), order=["ikl", "kl", "ce"])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["IKL", "KL", "CE only"]
    with pytest.raises(ValueError, match="last_acc"):
        plots.final_accuracy_chart(fake_runs().drop(columns="last_acc"))


# ------------------------------------------------------------------------------ class-prior heatmap
def _prior_history():
    prior = ClassPrior(4)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        prior.update(torch.randn(40, 4, generator=g) * 2, torch.arange(40) % 4, weight_temperature=2.0)
        prior.end_epoch()
    return prior


def test_prior_heatmap_slider_has_one_frame_per_snapshot():
    prior = _prior_history()
    snaps = prior.history_tensor().numpy()
    fig = plots.prior_heatmap(prior.history)
    assert len(fig.frames) == 4 and [f.name for f in fig.frames] == ["0", "1", "2", "3"]
    for e, frame in enumerate(fig.frames):
        np.testing.assert_allclose(np.array(frame.data[0].z, float), snaps[e], rtol=1e-6)
    np.testing.assert_allclose(np.array(fig.data[0].z, float), snaps[-1], rtol=1e-6)  # opens on the last
    np.testing.assert_allclose(fig.frames[0].data[0].z, 0.25)  # the uniform start
    assert fig.layout.sliders[0].active == 3 and len(fig.layout.sliders[0].steps) == 4
    assert fig.data[0].zmax == pytest.approx(snaps.max())  # one colour scale for every epoch
    # a tensor of snapshots (GridResult.priors) gives the same figure data
    same = plots.prior_heatmap(prior.history_tensor(), epochs=[0, 3])
    assert [f.name for f in same.frames] == ["0", "3"]


def test_prior_heatmap_grid_and_diagonal():
    prior = _prior_history()
    fig = plots.prior_heatmap(prior.history_tensor(), layout="grid", epochs=[1, 3], diagonal=False)
    assert len(fig.data) == 2 and not fig.frames
    z = fig.data[1].z
    assert all(z[i][i] is None for i in range(4))
    off = prior.history_tensor()[3].numpy().copy()
    np.fill_diagonal(off, np.nan)
    np.testing.assert_allclose(np.array(z, float), off, rtol=1e-6)
    assert [a.text for a in fig.layout.annotations] == ["after 1 epoch", "after 3 epochs"]
    with pytest.raises(ValueError, match="shape"):
        plots.prior_heatmap(torch.rand(4, 4))
    with pytest.raises(ValueError, match="epochs"):
        plots.prior_heatmap(torch.rand(2, 3, 3), epochs=[5])
    with pytest.raises(ValueError, match="layout"):
        plots.prior_heatmap(torch.rand(2, 3, 3), layout="movie")


# ------------------------------------------------------------------------------ ours beside the paper
def test_paper_comparison_labels_ours_and_the_papers():
    runs = pd.DataFrame({"loss": ["ce", "ce", "kl", "kl", "dkl", "dkl", "ikl-nogi", "ikl-nogi"],
                         "seed": [0, 1] * 4, "best_acc": [90.0, 92.0, 95.0, 96.0, 95.0, 96.0, 93.0, 94.0],
                         "last_acc": [89.0, 91.0, 94.0, 95.0, 94.0, 95.0, 92.0, 94.0]})
    summary = experiments.summarize(runs)
    config = experiments.resolve_config("cpu-quick")
    table = plots.paper_comparison(summary, config=config, teacher_acc=98.5)
    assert set(table["who"]) == {"ours (measured here)", "paper (published)"}
    ours, paper = table[table["who"].str.startswith("ours")], table[table["who"].str.startswith("paper")]
    # no row of ours claims CIFAR-100, every paper row does
    assert not ours["data"].str.contains("CIFAR").any() and ours["data"].str.startswith("digits").all()
    assert (paper["data"] == "CIFAR-100").all() and (paper["teacher → student"] == "resnet32x4 → resnet8x4").all()
    kl_ours = ours.set_index("method").loc["KL"]
    assert kl_ours["top-1 (%)"] == f"{95.5:.2f} ± {np.std([95.0, 96.0], ddof=1):.2f}"
    assert kl_ours["seeds"] == 2
    published = experiments.paper_results()
    cifar = published[(published["dataset"] == "CIFAR-100") & (published["student"] == "resnet8x4")]
    by_loss = dict(zip(cifar["loss"], cifar["top1"]))
    assert paper.set_index("method").loc["KL", "top-1 (%)"] == f"{by_loss['kl']:.2f}"
    assert paper.set_index("method").loc["CE only", "top-1 (%)"] == f"{by_loss['ce']:.2f}"
    assert "KD" in paper.set_index("method").loc["KL", "source"]
    # the paper has no DKL or no-GI row; ours and the paper's row of a method are adjacent
    assert "DKL" not in set(paper["method"]) and "IKL (no GI)" not in set(paper["method"])
    methods = table["method"].tolist()
    assert methods[:4] == ["teacher", "teacher", "CE only", "CE only"] and methods[4:6] == ["KL", "KL"]
    assert table.iloc[0]["top-1 (%)"] == "98.50" and table.iloc[1]["top-1 (%)"] == "79.42"


def test_paper_comparison_takes_the_papers_pair_from_the_config():
    """An ImageNet ResNet34 → ResNet18 config is shown beside the paper's ImageNet numbers for that pair
    (not its CIFAR-100 headline pair); a "-gi" spec of IKL gets the paper's IKL-KD row, which has GI."""
    runs = pd.DataFrame({"loss": ["kl", "ikl-gi", "dkd"], "seed": [0, 0, 0], "best_acc": [70.0, 71.0, 70.5],
                         "last_acc": [69.0, 70.0, 70.0]})
    table = plots.paper_comparison(experiments.summarize(runs), config=experiments.resolve_config("imagenet"))
    paper = table[table["who"].str.startswith("paper")].set_index("method")
    ref = experiments.paper_reference(experiments.resolve_config("imagenet"))
    assert (paper["data"] == "ImageNet").all() and (paper["teacher → student"] == "ResNet34 → ResNet18").all()
    assert paper.loc["KL", "top-1 (%)"] == f"{ref['kl']:.2f}" and paper.loc["DKD", "top-1 (%)"] == f"{ref['dkd']:.2f}"
    assert paper.loc["IKL (GI)", "top-1 (%)"] == f"{ref['ikl']:.2f}"
    assert experiments.paper_pair(experiments.resolve_config("cpu-quick")) is None
    digits = plots.paper_comparison(experiments.summarize(runs), config=experiments.resolve_config("cpu-quick"))
    assert (digits[digits["who"].str.startswith("paper")]["data"] == "CIFAR-100").all()  # the headline pair


def test_paper_comparison_single_seed_and_other_setting():
    runs = pd.DataFrame({"loss": ["kl"], "seed": [0], "best_acc": [95.0], "last_acc": [94.0]})
    table = plots.paper_comparison(experiments.summarize(runs), dataset="ImageNet", teacher="ResNet34",
                                   student="ResNet18")
    assert table.iloc[0]["top-1 (%)"] == "95.00"  # one seed: no ± std
    assert table[table["who"].str.startswith("paper")]["top-1 (%)"].tolist() == ["71.03"]


# ------------------------------------------------------------------------------ what the rendered figures say
def test_prior_heatmap_grid_names_its_axes():
    fig = plots.prior_heatmap(torch.rand(6, 3, 3), layout="grid", epochs=[0, 1, 2, 3, 4, 5], cols=4)
    titled_y = [k for k in fig.layout if k.startswith("yaxis") and fig.layout[k].title.text == "true class y"]
    titled_x = [k for k in fig.layout if k.startswith("xaxis") and fig.layout[k].title.text == "class k"]
    assert sorted(titled_y) == ["yaxis", "yaxis5"]                    # first column of each row
    assert sorted(titled_x) == ["xaxis3", "xaxis4", "xaxis5", "xaxis6"]  # lowest panel of each column


def test_notebook_05_figures_use_display_names_and_show_bin_sizes():
    m = pd.DataFrame({"loss": ["ikl", "ikl", "ikl-nogi", "ikl-nogi"], "seed": [0, 1, 0, 1],
                      "ece": [0.1, 0.3, 0.2, 0.2]})
    bars = plots.metric_bars(m, {"ece": "ECE"})
    assert list(bars.data[0].x) == ["IKL<br>n=2", "IKL (no GI)<br>n=2"]
    assert not bars.data[0].text and "std" in bars.layout.title.text  # n no longer sits on the error bar
    table = pd.DataFrame({"count": [0, 1, 9], "confidence": [float("nan"), 0.2, 0.8],
                          "accuracy": [float("nan"), 1.0, 0.7]})
    rel = plots.reliability_diagram({"ikl": table, "ikl-nogi": table})
    assert [t.name for t in rel.data] == ["perfect", "IKL", "IKL (no GI)"]
    small, big = rel.data[1].marker.size
    assert big > 2 * small                                      # a 1-sample bin is drawn small
    d = pd.DataFrame({"epoch": [1, 2], "max_param_diff": [1e-16, 2e-6]})
    assert plots.drift_lines({"float32": d}).layout.yaxis.exponentformat == "power"  # 10⁻¹⁶, not "0.1f"
    s = pd.DataFrame({"alpha": [0.5, 1.0], "temperature": [4.0, 4.0], "best_mean": [90.0, 91.0],
                      "best_std": [1.0, 1.0], "n": [2, 2]})
    heat = plots.sensitivity_heatmap(s, "alpha", "temperature")
    assert heat.layout.xaxis.title.text.startswith("α") and heat.layout.yaxis.title.text == "temperature T"


def test_sanity_check_table_labels_every_row():
    checks = pd.DataFrame([{"loss": loss, "seed": seed, "check": c, "status": "pass", "detail": ""}
                           for loss in ("trades", "ikl") for seed in (0, 1, 2) for c in ("a", "b", "c")])
    fig = plots.sanity_check_table(checks)
    runs = list(fig.data[0].y)
    assert len(runs) == 6 and list(fig.layout.yaxis.tickvals) == runs and list(fig.layout.yaxis.ticktext) == runs
    assert fig.layout.height >= 230 + 28 * 6                     # room for 6 rows under the title


def test_sanity_check_table_shows_checks_that_did_not_run():
    """A check a run did not do was a blank cell (z None) while the table above it said "not run"; a
    custom title had no key to the colours."""
    checks = pd.DataFrame([{"loss": "sound", "seed": "", "check": c, "status": s, "detail": ""}
                           for c, s in (("a", "pass"), ("b", "warn"), ("c", "fail"))]
                          + [{"loss": "broken", "seed": "", "check": "a", "status": "fail", "detail": ""}])
    fig = plots.sanity_check_table(checks, title="four setups")
    heat = fig.data[0]
    assert [list(r) for r in heat.text] == [["PASS", "WARN", "FAIL"], ["FAIL", "not run", "not run"]]
    assert None not in [v for r in heat.z for v in r]

    def colour_of(z):  # the colour the heatmap draws for z: the colorscale at (z - zmin) / (zmax - zmin)
        at = (z - heat.zmin) / (heat.zmax - heat.zmin)
        stops = [(pos, c) for pos, c in heat.colorscale]
        below = [c for pos, c in stops if pos <= at]
        above = [c for pos, c in stops if pos >= at]
        assert below[-1] == above[0], f"z = {z} falls between two colours"
        return below[-1]

    drawn = {t: colour_of(z) for rt, rz in zip(heat.text, heat.z) for t, z in zip(rt, rz)}
    assert drawn == {"PASS": plots.CHECK_STATUS_COLORS["pass"], "WARN": plots.CHECK_STATUS_COLORS["warn"],
                     "FAIL": plots.CHECK_STATUS_COLORS["fail"], "not run": plots.CHECK_STATUS_COLORS["not run"]}
    assert fig.layout.title.text.startswith("four setups")
    for word in ("PASS", "WARN", "FAIL", "not run"):               # the key is there under a custom title too
        assert word in fig.layout.title.text


def test_adversarial_examples_images_keep_their_own_aspect():
    x = torch.rand(4, 1, 8, 8)
    fig = plots.adversarial_examples(x, (x + 0.05).clamp(0, 1), [1, 2, 3, 4], [1, 2, 3, 4], [4, 2, 5, 4], n=4)
    for k in range(1, 13):  # 3 rows × 4 images: every y axis is tied to its own x axis
        y = fig.layout[f"yaxis{k if k > 1 else ''}"]
        assert y.scaleanchor == f"x{k if k > 1 else ''}"


def test_adversarial_comparison_bars_paper_rows_have_no_error_bar():
    table = comparison_table(clean=97.7, clean_std=0.3)
    fig = plots.adversarial_comparison_bars(table)
    bars = {(t.meta["metric"], t.meta["who"]): t for t in fig.data if t.type == "bar"}
    assert bars[("clean", "ours")].error_y.visible and list(bars[("clean", "ours")].error_y.array) == [0.3]
    assert bars[("clean", "paper")].error_y.visible is False and bars[("robust", "paper")].error_y.visible is False
    assert all(t.cliponaxis is False for t in bars.values())    # "97.7" above the bar is not cut off
    keys = [t for t in fig.data if t.meta.get("kind") == "key"]
    assert [t.name for t in keys] == ["clean accuracy", "robust accuracy"]
    assert all(t.showlegend is False for t in bars.values())
    assert list(fig.layout.xaxis.categoryarray) == [
        "IKL-AT<br>ours<br>(measured here)<br>digits", "IKL-AT<br>paper<br>(published)<br>CIFAR-10"]


def test_adversarial_comparison_bars_keep_labels_apart_and_values_off_the_error_bars():
    """Rotated one-line tick labels ran into each other, a value label sat on its bar's error bar, and a
    "published (RobustBench)" row was drawn as ours (only "paper ..." counted as published)."""
    table = comparison_table(clean=97.7, clean_std=0.3)
    extra = dict(table.iloc[1])
    extra.update({"method": "improved TRADES (AWP, increasing eps)", "loss": "trades",
                  "who": "published (RobustBench)", "data": "CIFAR-100 (ε = 8/255)"})
    table = pd.concat([table, pd.DataFrame([extra])], ignore_index=True)
    fig = plots.adversarial_comparison_bars(table)
    assert fig.layout.xaxis.tickangle == 0
    ticks = list(fig.layout.xaxis.categoryarray)
    assert ticks[2] == "improved TRADES<br>(AWP, increasing eps)<br>published<br>(RobustBench)<br>CIFAR-100<br>(ε = 8/255)"
    assert max(len(line) for tick in ticks for line in tick.split("<br>")) <= 24
    bars = {(t.meta["metric"], t.meta["who"]): t for t in fig.data if t.type == "bar"}
    assert list(bars[("clean", "paper")].x) == ticks[1:]          # the RobustBench row is a published one: hatched
    assert bars[("clean", "paper")].marker.pattern.shape == "/" and not bars[("clean", "ours")].marker.pattern.shape
    for t in bars.values():                                       # the value sits at the bar's foot, inside it
        assert t.textposition == "inside" and t.insidetextanchor == "start" and t.textangle == 0
    assert "published" in fig.layout.title.text and "hatched" in fig.layout.title.text


def test_std_bands_draw_no_markers_at_their_corners():
    # a scatter of <= 20 points defaults to lines+markers: a band's polygon corners showed as stray dots
    fig = plots.learning_curves(fake_histories(epochs=4))
    adv = plots.adversarial_curves({(loss, seed): pd.DataFrame({"epoch": [1, 2], "test_acc": [50.0 + seed, 60.0]})
                                    for loss in ("trades", "ikl") for seed in (0, 1)}, metrics=("test_acc",))
    bands = traces(fig, kind="band") + traces(adv, kind="band")
    assert len(bands) > 2 and all(t.mode == "lines" for t in bands)


# ------------------------------------------------------------------ found by mutation testing
def _skewed(values):
    """Per-seed values whose mean is not their median (and whose std depends on ddof)."""
    return dict(enumerate(values))


def test_learning_curves_draw_the_mean_not_the_median_and_hover_the_seed_count():
    # seed 2 stopped after one epoch: epoch 1 has three seeds (50, 51, 70: mean 57, median 51), epoch 2 two
    hist = {("ikl", 0): pd.DataFrame({"epoch": [1, 2], "test_acc": [50.0, 60.0], "ce": [1.0, 0.5]}),
            ("ikl", 1): pd.DataFrame({"epoch": [1, 2], "test_acc": [51.0, 62.0], "ce": [1.1, 0.6]}),
            ("ikl", 2): pd.DataFrame({"epoch": [1], "test_acc": [70.0], "ce": [3.0]})}
    long = plots.histories_frame(hist)
    fig = plots.learning_curves(hist)
    for panel in ("test_acc", "ce"):
        (mean,) = traces(fig, loss="ikl", panel=panel, kind="mean")
        per_epoch = long.groupby("epoch")[panel]
        np.testing.assert_allclose(mean.y, per_epoch.mean().to_numpy())
        assert [n for _, n in mean.customdata] == per_epoch.count().tolist() == [3, 2]


def test_adversarial_curves_draw_the_mean_and_a_one_std_band():
    hist = {(loss, seed): pd.DataFrame({"epoch": [1, 2], "test_acc": [50.0 + off, 60.0 + 2 * off]})
            for loss in ("trades", "ikl") for seed, off in _skewed((0.0, 1.0, 20.0)).items()}
    long = plots.histories_frame(hist)
    fig = plots.adversarial_curves(hist, metrics=("test_acc",))
    for loss in ("trades", "ikl"):
        stats = long[long["loss"] == loss].groupby("epoch")["test_acc"].agg(["mean", "std"])
        (mean,) = traces(fig, loss=loss, kind="mean")
        np.testing.assert_allclose(mean.y, stats["mean"].to_numpy())
        (band,) = traces(fig, loss=loss, kind="band")
        n = len(stats)
        np.testing.assert_allclose(band.y[:n], (stats["mean"] + stats["std"]).to_numpy())
        np.testing.assert_allclose(band.y[n:], (stats["mean"] - stats["std"]).to_numpy()[::-1])
    two_seeds = plots.adversarial_curves({k: v for k, v in hist.items() if k[1] < 2}, metrics=("test_acc",))
    assert {t.meta["loss"] for t in traces(two_seeds, kind="band")} == {"trades", "ikl"}  # two seeds have a spread


def test_robustness_vs_epsilon_is_the_mean_over_seeds():
    curves = pd.DataFrame({"loss": "ikl", "seed": [0, 0, 1, 1, 2, 2], "epsilon": [0.0, 0.1] * 3,
                           "accuracy": [90.0, 50.0, 91.0, 52.0, 99.0, 70.0]})
    fig = plots.robustness_vs_epsilon(curves)
    stats = curves.groupby("epsilon")["accuracy"].agg(["mean", "std"])
    assert list(fig.data[0].x) == stats.index.tolist()
    assert list(fig.data[0].y) == pytest.approx(stats["mean"].tolist())
    assert list(fig.data[0].error_y.array) == pytest.approx(stats["std"].tolist())


def test_adversarial_comparison_bars_carry_each_metrics_own_value_and_std():
    table = comparison_table(clean=97.7, clean_std=0.3)
    fig = plots.adversarial_comparison_bars(table)
    bars = {(t.meta["metric"], t.meta["who"]): t for t in fig.data if t.type == "bar"}
    ours = table[table["who"].str.startswith("ours")]
    for metric in ("clean", "robust"):
        assert list(bars[(metric, "ours")].y) == ours[f"{metric} (%)"].tolist()
        assert list(bars[(metric, "ours")].error_y.array) == ours[f"{metric} std"].tolist()


def test_paper_comparison_last_epoch_column_is_our_last_epoch():
    runs = pd.DataFrame({"loss": ["kl"] * 3, "seed": [0, 1, 2], "best_acc": [95.0, 96.0, 99.0],
                         "last_acc": [90.0, 94.0, 94.5]})
    table = plots.paper_comparison(experiments.summarize(runs))
    ours = table[table["who"].str.startswith("ours")].set_index("method").loc["KL"]
    for column, key in (("top-1 (%)", "best_acc"), ("last epoch (%)", "last_acc")):
        assert ours[column] == f"{runs[key].mean():.2f} ± {runs[key].std(ddof=1):.2f}"
    assert (table[table["who"].str.startswith("paper")]["last epoch (%)"] == "—").all()  # the paper gives one number


def test_metric_bars_show_mean_and_one_sample_std_in_each_losses_colour():
    m = pd.DataFrame({"loss": ["ikl"] * 3 + ["ikl-nogi"] * 3, "seed": [0, 1, 2] * 2,
                      "ece": [0.10, 0.12, 0.40, 0.20, 0.25, 0.27], "nll": [1.0, 1.1, 2.5, 0.9, 0.95, 1.6]})
    fig = plots.metric_bars(m, {"ece": "ECE", "nll": "NLL"})
    losses = list(dict.fromkeys(m["loss"]))
    assert [t.meta["metric"] for t in fig.data] == ["ece", "nll"]
    for trace in fig.data:
        per_loss = m.groupby("loss")[trace.meta["metric"]]
        assert list(trace.y) == pytest.approx([per_loss.mean()[n] for n in losses])
        assert list(trace.error_y.array) == pytest.approx([per_loss.std(ddof=1)[n] for n in losses])
        assert list(trace.marker.color) == [plots.color(n) for n in losses]
        assert [x.split("<br>")[0] for x in trace.x] == [plots.label(n) for n in losses]


def test_sensitivity_figures_show_each_cells_mean_std_and_n():
    s = pd.DataFrame({"alpha": [0.5, 1.0, 0.5, 1.0], "temperature": [2.0, 2.0, 4.0, 4.0],
                      "best_mean": [90.0, 91.0, 92.0, 93.5], "best_std": [1.0, 0.5, 2.0, float("nan")],
                      "last_mean": [80.0, 81.5, 82.0, 83.0], "last_std": [3.0, 0.25, 1.0, float("nan")],
                      "n": [3, 3, 2, 1]})
    heat = plots.sensitivity_heatmap(s, "alpha", "temperature").data[0]
    assert list(heat.x) == ["0.5", "1.0"] and list(heat.y) == ["2.0", "4.0"]  # x: alpha, y: temperature
    for _, r in s.iterrows():
        i, j = list(heat.y).index(str(r["temperature"])), list(heat.x).index(str(r["alpha"]))
        std = 0.0 if math.isnan(r["best_std"]) else r["best_std"]
        assert heat.z[i][j] == r["best_mean"]
        assert heat.text[i][j] == f"{r['best_mean']:.2f} ± {std:.2f} (n={int(r['n'])})"
    row = s[s["temperature"] == 2.0]
    for value in ("best", "last"):
        line = plots.sensitivity_lines(row, "alpha", value=value).data[0]
        assert list(line.x) == row["alpha"].tolist() and list(line.y) == row[f"{value}_mean"].tolist()
        assert list(line.error_y.array) == row[f"{value}_std"].tolist()
        assert list(line.text) == [f"n={n}" for n in row["n"]]


def test_final_accuracy_chart_draws_each_loss_in_its_colour():
    runs = fake_runs()
    fig = plots.final_accuracy_chart(runs)
    for ax in fig.axes[:2]:
        for x, loss in enumerate(dict.fromkeys(runs["loss"])):
            means = [line for line in ax.lines if line.get_marker() == "D"
                     and np.isfinite(np.asarray(line.get_ydata(), float)[x])]
            assert [matplotlib.colors.to_hex(line.get_color()) for line in means] == [plots.color(loss)]
            dots = [c for c in ax.collections if len(c.get_offsets()) and np.allclose(np.round(c.get_offsets()[:, 0]), x)]
            assert [matplotlib.colors.to_hex(c.get_facecolors()[0]) for c in dots] == [plots.color(loss)]


def test_sanity_check_table_title_names_the_words_in_its_cells():
    """The cells read PASS, WARN and FAIL; the default title's key said 'orange flag', a word no cell shows."""
    checks = pd.DataFrame([{"loss": "ikl", "seed": 0, "check": c, "status": s, "detail": ""}
                           for c, s in (("a", "pass"), ("b", "warn"), ("c", "fail"))])
    fig = plots.sanity_check_table(checks)
    for word in sorted({t for row in fig.data[0].text for t in row if t}):
        assert word in fig.layout.title.text, word


# ------------------------------------------------------------------ found by a reader of the rendered notebooks
def test_order_text_joins_equal_means_instead_of_ranking_them():
    """Notebook 03 printed "KL > DKL" for two losses with one trajectory (94.15 both)."""
    means = pd.Series({"ce": 93.8, "kl": 94.1466666, "dkl": 94.1466667, "ikl": 94.6, "gkl": 94.6, "dkd": 94.0})
    assert plots.order_text(means) == "IKL = GKL > KL = DKL > DKD > CE only"
    assert plots.order_text(means, decimals=8) == "IKL = GKL > DKL > KL > DKD > CE only"
    with pytest.raises(TypeError, match="non-empty pandas Series"):
        plots.order_text(pd.Series(dtype=float))


def test_learning_curves_zoom_the_accuracy_axis_on_the_later_epochs():
    """Epoch 1's low accuracy set the axis (50-95 in notebook 03), so seven losses a few tenths apart drew
    one line; the accuracy panel now fits the mean curves from the second quarter of the epochs on."""
    hist = fake_histories(epochs=12)
    hist[("kl", 0)].loc[0, "test_acc"] = 10.0  # a terrible first epoch
    fig = plots.learning_curves(hist)
    long = plots.histories_frame(hist)
    late = long[long["epoch"] >= 4].groupby(["loss", "epoch"])["test_acc"].mean()
    low, high = fig.layout.yaxis.range
    pad = max(0.1 * (late.max() - late.min()), 0.5)
    assert (low, high) == pytest.approx((late.min() - pad, late.max() + pad))
    assert "zoomed on epochs ≥ 4" in fig.layout.annotations[0].text
    # term panels and short runs keep plotly's own range
    assert fig.layout.yaxis2.range is None
    assert plots.learning_curves(fake_histories(epochs=3)).layout.yaxis.range is None
    assert plots.learning_curves(hist, metric="loss").layout.yaxis.range is None


def test_metric_points_fit_their_axis_and_mark_the_no_gi_variant():
    """Bars from zero drew 94.63 and 94.38 as two equal 95 % bars, in two shades of orange: points with
    error bars on an axis that fits them, the "no GI" variant with an open marker, the reliability
    diagram's "no GI" line dashed as in notebook 03."""
    m = pd.DataFrame({"loss": ["ikl"] * 3 + ["ikl-nogi"] * 3, "seed": [0, 1, 2] * 2,
                      "accuracy": [94.5, 94.7, 94.7, 94.3, 94.4, 94.45]})
    trace = plots.metric_bars(m, {"accuracy": "test accuracy (%)"}).data[0]
    assert trace.type == "scatter" and trace.mode == "markers"
    assert list(trace.marker.symbol) == ["circle", "circle-open"]
    table = pd.DataFrame({"bin": [0, 1], "low": [0.0, 0.5], "high": [0.5, 1.0], "count": [3, 5],
                          "confidence": [0.4, 0.9], "accuracy": [0.3, 0.8]})
    diagram = plots.reliability_diagram({"ikl": table, "ikl-nogi": table})
    assert [t.line.dash for t in diagram.data[1:]] == ["solid", "dash"]


def test_sensitivity_maps_share_a_colour_scale_and_name_their_loss():
    s = pd.DataFrame({"alpha": [0.5, 1.0], "temperature": [2.0, 2.0], "best_mean": [90.0, 92.0],
                      "best_std": [1.0, 0.5], "last_mean": [80.0, 91.0], "last_std": [1.0, 0.5], "n": [2, 2]})
    both = (80.0, 92.0)
    best = plots.sensitivity_heatmap(s, "alpha", "temperature", zrange=both, loss="ikl")
    last = plots.sensitivity_heatmap(s, "alpha", "temperature", value="last", zrange=both)
    assert (best.data[0].zmin, best.data[0].zmax) == (last.data[0].zmin, last.data[0].zmax) == both
    assert best.layout.title.text.startswith("IKL sensitivity: best-epoch")
    assert plots.sensitivity_heatmap(s, "alpha", "temperature").data[0].zmin is None  # default: its own range
    with pytest.raises(ValueError, match="zrange"):
        plots.sensitivity_heatmap(s, "alpha", "temperature", zrange=(92.0, 80.0))
    line = plots.sensitivity_lines(s.rename(columns={"alpha": "gamma"}), "gamma", loss="gkl")
    assert line.layout.title.text.startswith("GKL sensitivity:") and line.data[0].line.color == plots.color("gkl")
