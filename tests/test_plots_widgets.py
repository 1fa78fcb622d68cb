"""Notebook-facing analysis (grads), figures (plots) and dashboards (widgets), without a browser."""
import inspect

import numpy as np
import pytest
import torch

import dkl_lib as dkl
from dkl_lib import grads, plots, widgets

TEACHER = [3.0, 1.0, 0.0, -1.0]
STUDENT = [0.0, 1.5, 0.5, 0.0]


# ------------------------------------------------------------------------------ grads helpers
def test_student_gradients_match_autograd_and_show_the_asymmetry():
    df = grads.student_gradients(TEACHER, STUDENT, temperature=2.0, alpha=0.7)
    assert set(df["loss"]) == {"dkl", "ikl", "gkl"} and len(df) == 3 * 2 * 4
    o_n = torch.tensor([STUDENT], dtype=torch.float64, requires_grad=True)
    o_m = torch.tensor([TEACHER], dtype=torch.float64)
    ref = torch.autograd.grad(dkl.ikl_terms(o_n, o_m, temperature=2.0, alpha=0.7)["wmse"], o_n)[0][0]
    got = df.query("loss == 'ikl' and term == 'wmse'").sort_values("cls")["grad"].to_numpy()
    assert torch.allclose(torch.tensor(got), ref, atol=1e-14)
    assert (df.query("loss == 'dkl' and term == 'wmse'")["grad"] == 0).all()


def test_student_gradients_rejects_matrices():
    with pytest.raises(ValueError, match="1-D"):
        grads.student_gradients([[1.0, 2.0]], [[0.0, 1.0]])


def test_equivalence_table_and_ablation():
    table = grads.equivalence_table(classes=(2, 50), temperatures=(0.5, 4.0))
    assert len(table) == 4 and table["max_error"].max() < 1e-12
    a, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    ablation = grads.stop_gradient_ablation(a, b, temperature=2.0).set_index("variant")
    assert ablation.iloc[0].max() < 1e-12
    assert (ablation.iloc[1:].max(axis=1) > 1e-2).all()


def test_decoupled_by_autograd_is_dkl_loss():
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    mine = grads.decoupled_by_autograd(a, b, temperature=3.0)
    ref = dkl.dkl_loss(a, b, temperature=3.0)
    assert torch.allclose(mine, ref, rtol=1e-12)
    for x, y in zip(torch.autograd.grad(mine, (a, b)), torch.autograd.grad(ref, (a, b))):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-14)
    no_stop = grads.decoupled_by_autograd(a, b, temperature=3.0, stop_logits_delta=False)
    assert torch.allclose(no_stop, dkl.ikl_loss(a, b, temperature=3.0), rtol=1e-12)


def test_symbolic_check_two_classes():
    out = grads.symbolic_check(num_classes=2)
    assert out["difference"] == [0, 0, 0, 0]
    # the returned KL gradient is a real expression: evaluate it at a point against the analytic one
    import sympy as sp

    expr = out["grad_logits"][0]
    point = {sp.Symbol("T", positive=True): 2.0, sp.Symbol("m1", real=True): 1.0,
             sp.Symbol("m2", real=True): -0.5, sp.Symbol("n1", real=True): 0.3, sp.Symbol("n2", real=True): 0.1}
    value = float(expr.subs(point))
    ref = grads.kl_grad_logits(torch.tensor([[0.3, 0.1]], dtype=torch.float64),
                               torch.tensor([[1.0, -0.5]], dtype=torch.float64), temperature=2.0)[0, 0]
    assert value == pytest.approx(float(ref), rel=1e-12)
    with pytest.raises(ValueError, match="num_classes"):
        grads.symbolic_check(num_classes=7)


def test_simplex_field_moves_toward_the_teacher_and_validates():
    teacher = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    df = grads.simplex_field(teacher, loss="ikl", resolution=8)
    assert set(df["term"]) == {"wmse", "soft_ce", "total"}
    txy = grads.simplex_xy(teacher[None])[0]
    total = df[df["term"] == "total"]
    dots = (txy[0].item() - total["x"]) * total["dx"] + (txy[1].item() - total["y"]) * total["dy"]
    assert (dots > 0).mean() > 0.95
    probs = torch.tensor(total[["p1", "p2", "p3"]].to_numpy())
    assert torch.allclose(probs.sum(1), torch.ones(len(total), dtype=torch.float64))
    with pytest.raises(ValueError, match="teacher_probs"):
        grads.simplex_field([0.5, 0.5])
    with pytest.raises(ValueError, match="resolution"):
        grads.simplex_field(teacher, resolution=2)


def test_confidence_sweep_kl_equals_soft_ce_and_validates():
    df = grads.confidence_sweep([0.3, 0.6, 0.95], num_classes=5)
    kl = df.query("loss == 'kl'")["grad_norm"].to_numpy()
    ce = df.query("loss == 'ikl' and term == 'soft_ce'")["grad_norm"].to_numpy()
    assert torch.allclose(torch.tensor(kl), torch.tensor(ce), atol=1e-12)
    assert (df.query("term == 'wmse'")["grad_norm"] > 0).all()
    with pytest.raises(ValueError, match="between 0 and 1"):
        grads.confidence_sweep([0.0, 0.5])
    with pytest.raises(ValueError, match="5 entries"):
        grads.confidence_sweep([0.5], num_classes=5, student_logits=[0.0, 1.0])


def test_weight_matrices_classwise_is_shared_within_a_class():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(12, 4, generator=g), torch.tensor([0, 1, 2] * 4)
    a = grads.weight_matrices(logits, y, weight_temperature=2.0, sample=0)
    b = grads.weight_matrices(logits, y, weight_temperature=2.0, sample=3)  # same class 0
    p = torch.softmax(logits[0].double() / 2.0, 0)
    assert torch.allclose(a["sample"], torch.outer(p, p))
    assert torch.allclose(a["classwise"], b["classwise"]) and not torch.allclose(a["sample"], b["sample"])
    assert torch.allclose(a["p_class"], torch.softmax(logits[y == 0].double() / 2.0, 1).mean(0))
    with pytest.raises(ValueError, match="sample"):
        grads.weight_matrices(logits, y, sample=12)


def test_wmse_cost_measures_both_methods():
    df = grads.wmse_cost((8, 32), batch=4, repeats=1)
    big = df.set_index(["classes", "method"])["largest_tensor_bytes"]
    assert big[(32, "pairwise")] >= 4 * 32 * 32 * 4 > big[(32, "closed form")]
    assert (df["seconds"] > 0).all()


def test_wmse_cost_runs_on_the_threads_asked_for_and_restores_the_setting(monkeypatch):
    seen = []
    real = grads._wmse_cost
    monkeypatch.setattr(grads, "_wmse_cost", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    outer = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads.wmse_cost((4,), batch=2, repeats=1)                  # one thread by default
        grads.wmse_cost((4,), batch=2, repeats=1, threads=None)    # None: leave the setting alone
        assert seen == [1, 2] and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="threads"):
            grads.wmse_cost((4,), threads=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(outer)


def test_gradient_bars_draw_rounding_noise_as_zero():
    """A student equal to its teacher gets exactly no soft-CE gradient; float64 leaves ±5e-16, which
    the bars must show as 0, not stretched to the axis height."""
    values = {"teacher_0": 3.0, "teacher_1": 1.0, "teacher_2": 0.0, "student_0": 3.0, "student_1": 1.0,
              "student_2": 0.0, "temperature": 2.0, "alpha": 1.0, "beta": 1.0, "weight_temperature": 2.0, "gamma": 1.0}
    raw = grads.student_gradients([3.0, 1.0, 0.0], [3.0, 1.0, 0.0], loss_names=("dkl", "ikl", "gkl"), temperature=2.0,
                                  weight_temperature=2.0)
    assert raw["grad"].abs().max() < widgets.ROUNDING_FLOOR
    assert (widgets.gradient_bars_data(values)["grad"] == 0).all()
    values["student_0"] = 2.0  # a real gradient is untouched
    moved = widgets.gradient_bars_data(values)
    assert moved["grad"].abs().max() > 1e-3 and moved["grad"].tolist() == grads.student_gradients(
        [3.0, 1.0, 0.0], [2.0, 1.0, 0.0], loss_names=("dkl", "ikl", "gkl"), temperature=2.0,
        weight_temperature=2.0)["grad"].where(lambda g: g.abs() >= widgets.ROUNDING_FLOOR, 0.0).tolist()


def test_simplex_temperature_softens_the_teacher_and_kl_has_no_weights():
    dash = widgets.simplex_dashboard("ikl", resolution=5)
    star = list(dash.figure.data[-1].x) + list(dash.figure.data[-1].y)
    dash.controls["temperature"].value = 4.0
    softened = list(dash.figure.data[-1].x) + list(dash.figure.data[-1].y)
    assert softened != star
    p = widgets._teacher_probs(dash.values())
    assert torch.allclose(p, torch.softmax(torch.tensor([1.5, 0.5, -0.5], dtype=torch.float64) / 4.0, 0))
    kl = widgets.simplex_dashboard("kl", resolution=5)
    assert kl.controls["alpha"].disabled and kl.controls["beta"].disabled and not kl.controls["temperature"].disabled


def test_dashboards_refuse_input_they_would_silently_change():
    with pytest.raises(ValueError, match=r"\[-6, 6\].*9.0"):
        widgets.gradient_bars_dashboard([9.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="targets were given without target_logits"):
        widgets.weights_dashboard(targets=torch.arange(6))


# ------------------------------------------------------------------------------ plots
def test_plots_never_call_show():
    import ast

    calls = [n for n in ast.walk(ast.parse(inspect.getsource(plots)))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "show"]
    assert not calls


def test_gradient_bars_and_update():
    df = grads.student_gradients(TEACHER, STUDENT, temperature=2.0)
    fig = plots.gradient_bars(df)
    assert [t.name for t in fig.data] == ["DKL · wMSE", "DKL · soft-label CE", "IKL · wMSE",
                                          "IKL · soft-label CE", "GKL · wMSE", "GKL · soft-label CE"]
    assert list(fig.data[3].y) == df.query("loss == 'ikl' and term == 'soft_ce'")["grad"].tolist()
    assert fig.data[2].marker.color == plots.color("ikl")
    df2 = grads.student_gradients(TEACHER, STUDENT, temperature=5.0)
    plots.update_gradient_bars(fig, df2)
    assert list(fig.data[3].y) == df2.query("loss == 'ikl' and term == 'soft_ce'")["grad"].tolist()
    assert isinstance(plots.gradient_bars(df, widget=True), __import__("plotly").graph_objects.FigureWidget)


def test_simplex_quiver_layout_and_update():
    df = grads.simplex_field([0.2, 0.5, 0.3], loss="ikl", resolution=6)
    fig = plots.simplex_quiver(df, teacher_xy=(0.5, 0.3))
    points = (df["term"] == "wmse").sum()
    assert len(fig.data) == 9 and len(fig.data[1].x) == 3 * points
    assert fig.data[2].x == (0.5,)
    df2 = grads.simplex_field([0.7, 0.2, 0.1], loss="ikl", resolution=6)
    old = list(fig.data[1].x)
    plots.update_simplex_quiver(fig, df2, teacher_xy=(0.2, 0.1))
    assert list(fig.data[1].x) != old and fig.data[2].x == (0.2,)


def test_other_figures_carry_their_data():
    mats = grads.weight_matrices(torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), weight_temperature=1.0)
    heat = plots.weight_heatmaps(mats)
    assert torch.allclose(torch.tensor(heat.data[0].z, dtype=torch.float64), mats["sample"])
    sweep = grads.confidence_sweep([0.3, 0.6], num_classes=4)
    assert len(plots.confidence_lines(sweep).data) == 5  # kl + (wmse, soft_ce) × (ikl, gkl)
    table = grads.equivalence_table(classes=(2, 5), temperatures=(1.0,))
    assert len(plots.equivalence_heatmap(table).data[0].z) == 2
    cost = grads.wmse_cost((4, 8), batch=2, repeats=1)
    assert len(plots.cost_lines(cost).data) == 4


# ------------------------------------------------------------------------------ widgets
def test_gradient_dashboard_sliders_drive_the_figure():
    dash = widgets.gradient_bars_dashboard(TEACHER, STUDENT)
    ikl_wmse = dash.figure.data[2]
    assert max(abs(v) for v in ikl_wmse.y) > 1e-2
    dash.controls["alpha"].value = 0.0  # the observer recomputes the figure
    assert all(v == 0 for v in dash.figure.data[2].y)
    dash.controls["teacher_1"].value = 4.0
    ref = grads.student_gradients([3.0, 4.0, 0.0, -1.0], STUDENT, **{k: dash.values()[k] for k in (
        "temperature", "alpha", "beta", "weight_temperature", "gamma")})
    assert list(dash.figure.data[1].y) == ref.query("loss == 'dkl' and term == 'soft_ce'")["grad"].tolist()


def test_gradient_dashboard_callback_is_a_plain_function():
    dash = widgets.gradient_bars_dashboard()
    values = dict(dash.values(), beta=0.0)
    widgets.gradient_bars_update(dash.figure, values)
    assert all(v == 0 for v in dash.figure.data[1].y)  # DKL CE bars vanish with beta = 0
    with pytest.raises(ValueError, match="same length"):
        widgets.gradient_bars_dashboard([1.0, 2.0], [0.0])


def test_simplex_dashboard_moves_the_teacher():
    dash = widgets.simplex_dashboard(loss="ikl", resolution=6)
    dash.controls["teacher_2"].value = 3.0
    probs = torch.softmax(torch.tensor([1.5, 0.5, 3.0], dtype=torch.float64), 0)
    xy = grads.simplex_xy(probs[None])[0]
    assert dash.figure.data[2].x[0] == pytest.approx(xy[0].item())
    with pytest.raises(ValueError, match="loss"):
        widgets.simplex_dashboard(loss="dkd")


def test_simplex_field_of_gkl_follows_gamma():
    """The GKL view has its own γ (at γ = 1 GKL is IKL): its arrows are each grid point's own gradient,
    as a sample alone (GKL's wMSE normalises over the batch), and the dashboard's γ slider redraws them."""
    teacher = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    ikl = grads.simplex_field(teacher, loss="ikl", resolution=5)
    assert np.allclose(grads.simplex_field(teacher, loss="gkl", resolution=5)[["dx", "dy"]], ikl[["dx", "dy"]])
    gkl = grads.simplex_field(teacher, loss="gkl", resolution=5, gamma=2.5)
    wmse = gkl[gkl["term"] == "wmse"].reset_index(drop=True)
    assert not np.allclose(wmse[["dx", "dy"]], ikl[ikl["term"] == "wmse"][["dx", "dy"]])
    for i in (0, len(wmse) - 1):  # one point alone: the gradient step through the softmax Jacobian
        s_n = torch.tensor(wmse.loc[i, ["p1", "p2", "p3"]].to_numpy(dtype=float))
        o_n = s_n.log()[None].clone().requires_grad_()
        g, = torch.autograd.grad(dkl.gkl_terms(o_n, teacher.log()[None], temperature=1.0, gamma=2.5)["wmse"], o_n)
        ds = -(s_n * g[0] - s_n * (s_n * g[0]).sum())
        assert np.allclose(grads.simplex_xy(ds[None])[0].numpy(), wmse.loc[i, ["dx", "dy"]].to_numpy(dtype=float))
    dash = widgets.simplex_dashboard(loss="gkl", resolution=5)
    before = [list(t.x) for t in dash.figure.data]
    dash.controls["gamma"].value = 2.5
    assert [list(t.x) for t in dash.figure.data] != before
    assert "gamma" not in widgets.simplex_dashboard(loss="ikl", resolution=5).controls


def test_weights_dashboard_temperature_flattens_the_weights():
    dash = widgets.weights_dashboard()
    dash.controls["weight_temperature"].value = 10.0
    z = torch.tensor(dash.figure.data[0].z)
    assert z.max() - z.min() < 0.6 * (1 / 36)
    dash.controls["sample"].value = 1
    assert dash.figure.layout.title.text.endswith("class 1")


# ------------------------------------------------------------------------------ what the rendered figures say
def test_simplex_quiver_names_the_corners():
    df = grads.simplex_field([0.2, 0.5, 0.3], loss="ikl", resolution=6)
    fig = plots.simplex_quiver(df, teacher_xy=(0.5, 0.3))
    corners = [(a.text, a.x, a.y, a.xref) for a in fig.layout.annotations if a.text.startswith("class")]
    panels = len(set(df["term"]))
    assert len(corners) == 3 * panels
    # probability 1 on class k sits at grads.SIMPLEX_CORNERS[k]
    for k, (cx, cy) in enumerate(grads.SIMPLEX_CORNERS):
        assert (f"class {k}", cx, pytest.approx(cy), "x") in [(t, x, pytest.approx(y), r) for t, x, y, r in corners]


def test_weight_heatmaps_colourbar_is_titled():
    mats = grads.weight_matrices(torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), weight_temperature=1.0)
    assert "w" in plots.weight_heatmaps(mats).layout.coloraxis.colorbar.title.text


def test_confidence_lines_keep_coinciding_curves_visible():
    # KL's curve equals IKL's soft-label CE one and GKL's equal IKL's: the later ones are drawn thinner
    sweep = grads.confidence_sweep([0.3, 0.6], num_classes=4)
    fig = plots.confidence_lines(sweep)
    width = {t.name: t.line.width for t in fig.data}
    assert width["KL · KL"] > width["IKL · soft-label CE"] > width["GKL · soft-label CE"]
    assert width["IKL · wMSE"] > width["GKL · wMSE"]


# ------------------------------------------------------------------ found by mutation testing
def _arrows(trace):
    """(start x, start y, end x, end y) arrays of a quiver trace (segments x0, x1, None)."""
    import numpy as np

    x, y = np.array(trace.x, dtype=float).reshape(-1, 3), np.array(trace.y, dtype=float).reshape(-1, 3)
    return x[:, 0], y[:, 0], x[:, 1], y[:, 1]


def test_simplex_arrows_point_along_the_step_on_one_scale_for_every_panel():
    import numpy as np

    def check(fig, df):
        # the longest arrow of ALL panels spans 90 % of the grid's spacing: the side over the resolution
        scale = 0.9 * (1 / resolution) / np.hypot(df["dx"], df["dy"]).max()
        for i, term in enumerate(dict.fromkeys(df["term"])):
            part = df[df["term"] == term]
            x0, y0, x1, y1 = _arrows(fig.data[3 * i + 1])
            np.testing.assert_allclose(x0, part["x"])
            np.testing.assert_allclose(y0, part["y"])
            np.testing.assert_allclose(x1 - x0, scale * part["dx"], atol=1e-15)
            np.testing.assert_allclose(y1 - y0, scale * part["dy"], atol=1e-15)

    resolution = 6
    df = grads.simplex_field([0.2, 0.5, 0.3], loss="ikl", resolution=resolution)
    norms = np.hypot(df["dx"], df["dy"]).groupby(df["term"]).max()
    assert norms.max() > 1.5 * norms.min()  # panels whose own longest arrows differ
    fig = plots.simplex_quiver(df, teacher_xy=(0.5, 0.3))
    check(fig, df)
    df2 = grads.simplex_field([0.7, 0.2, 0.1], loss="ikl", alpha=3.0, resolution=6)
    plots.update_simplex_quiver(fig, df2, teacher_xy=(0.2, 0.1))
    check(fig, df2)


def test_weight_heatmaps_update_sets_both_panels_on_one_colour_range():
    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(12, 4, generator=g) * 0.5, torch.arange(12) % 4
    logits[torch.arange(1, 12), y[1:]] += 4.0  # every sample but the first is confident in its class
    fig = plots.weight_heatmaps(grads.weight_matrices(logits, y, weight_temperature=2.0, sample=1), widget=True)
    # the unsure sample 0: its own weights peak lower than its class's, which set the colour range
    mats = grads.weight_matrices(logits, y, weight_temperature=2.0, sample=0)
    assert mats["classwise"].max() > mats["sample"].max()
    plots.update_weight_heatmaps(fig, mats)
    assert torch.allclose(torch.tensor(fig.data[0].z, dtype=torch.float64), mats["sample"].double())
    assert torch.allclose(torch.tensor(fig.data[1].z, dtype=torch.float64), mats["classwise"].double())
    assert fig.layout.coloraxis.cmax == pytest.approx(float(max(mats["sample"].max(), mats["classwise"].max())))


def test_gradient_bars_data_and_dashboard_pass_every_slider_on():
    import numpy as np

    hp = dict(temperature=3.0, alpha=0.5, beta=2.0, weight_temperature=5.0, gamma=0.4)
    values = {**{f"teacher_{j}": v for j, v in enumerate(TEACHER)},
              **{f"student_{j}": v for j, v in enumerate(STUDENT)}, **hp}
    ref = grads.student_gradients(TEACHER, STUDENT, loss_names=("dkl", "ikl", "gkl"), **hp)
    np.testing.assert_array_equal(widgets.gradient_bars_data(values)["grad"],
                                  ref["grad"].where(ref["grad"].abs() >= widgets.ROUNDING_FLOOR, 0.0))
    dash = widgets.gradient_bars_dashboard(TEACHER, STUDENT)
    for key in ("weight_temperature", "gamma"):  # T_w and γ reach the GKL / IKL bars
        dash.controls[key].value = hp[key]
        ref = grads.student_gradients(TEACHER, STUDENT, **{k: dash.values()[k] for k in hp})
        for trace, (loss, term) in zip(dash.figure.data, dict.fromkeys(zip(ref["loss"], ref["term"]))):
            part = ref[(ref["loss"] == loss) & (ref["term"] == term)]["grad"]
            np.testing.assert_allclose(trace.y, part.where(part.abs() >= widgets.ROUNDING_FLOOR, 0.0), atol=0)


def test_simplex_data_passes_alpha_and_beta_on():
    import pandas as pd

    values = {"teacher_0": 1.0, "teacher_1": 0.0, "teacher_2": -1.0, "temperature": 2.0, "alpha": 0.5,
              "beta": 2.0, "loss": "ikl", "resolution": 5}
    df, xy = widgets.simplex_data(values)
    probs = torch.softmax(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64) / 2.0, 0)
    pd.testing.assert_frame_equal(df, grads.simplex_field(probs, loss="ikl", temperature=2.0, alpha=0.5, beta=2.0,
                                                          resolution=5))
    assert xy == pytest.approx(grads.simplex_xy(probs[None])[0].tolist())
    dash = widgets.simplex_dashboard("ikl", resolution=5)
    dash.controls["alpha"].value = 0.0  # no wMSE term: its panel's arrows have no length
    x0, y0, x1, y1 = _arrows(dash.figure.data[1])
    assert (x0 == x1).all() and (y0 == y1).all()
    x0, _, x1, _ = _arrows(dash.figure.data[4])  # the soft-label CE panel still moves
    assert (x0 != x1).any()


def test_cost_lines_put_time_in_seconds_left_and_bytes_right():
    import pandas as pd

    df = pd.DataFrame({"classes": [10, 100, 10, 100], "method": ["closed form"] * 2 + ["pairwise"] * 2,
                       "seconds": [1e-4, 2e-4, 3e-4, 5e-3], "largest_tensor_bytes": [2560, 25600, 25600, 2560000]})
    fig = plots.cost_lines(df)
    assert [a.text for a in fig.layout.annotations] == ["forward + backward time (s)", "largest tensor (bytes)"]
    assert sorted((t.name, t.xaxis) for t in fig.data) == [("closed form", "x"), ("closed form", "x2"),
                                                           ("pairwise", "x"), ("pairwise", "x2")]
    for t in fig.data:
        part = df[df["method"] == t.name]
        key = "seconds" if t.xaxis == "x" else "largest_tensor_bytes"
        assert list(t.x) == part["classes"].tolist() and list(t.y) == part[key].tolist()


def test_equivalence_heatmap_and_confidence_lines_carry_their_data():
    import numpy as np
    import pandas as pd

    table = pd.DataFrame({"classes": [2, 2, 5, 5], "temperature": [1.0, 4.0, 1.0, 4.0],
                          "max_error": [1e-16, 3e-15, 2e-14, 2e-13]})
    heat = plots.equivalence_heatmap(table).data[0]
    errors = table.pivot(index="classes", columns="temperature", values="max_error")
    np.testing.assert_allclose(heat.z, np.log10(errors.to_numpy()))  # the colour bar says log10
    assert list(heat.y) == ["2", "5"] and list(heat.x) == ["1.0", "4.0"]
    sweep = grads.confidence_sweep([0.3, 0.6, 0.9], num_classes=4)
    for t, (loss, term) in zip(plots.confidence_lines(sweep).data, dict.fromkeys(zip(sweep["loss"], sweep["term"]))):
        part = sweep[(sweep["loss"] == loss) & (sweep["term"] == term)]
        assert t.name == plots.label(loss, term)
        assert list(t.x) == part["confidence"].tolist() and list(t.y) == part["grad_norm"].tolist()


# full-severity colour-vision simulations of Machado, Oliveira & Fernandes (2009), in linear RGB
_CVD_VISION = {"normal": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
               "deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                                [-0.011820, 0.042940, 0.968881]],
               "protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                              [-0.003882, -0.048116, 1.051998]],
               "tritanopia": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602],
                              [0.004733, 0.691367, 0.303900]]}


def _cvd_lab(hex_colour, matrix):
    """CIE L*a*b* of ``hex_colour`` as seen through a colour-vision simulation ``matrix`` (linear RGB)."""
    import numpy as np

    c = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    rgb = np.clip(np.asarray(matrix) @ np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4), 0, 1)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ rgb
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


@pytest.mark.parametrize("group", [("ce", "kl", "dkl", "ikl", "ikl-nogi", "gkl", "gkl-nogi", "dkd"),
                                   ("ce", "trades", "ikl"), ("pass", "warn", "fail", "not run")])
def test_colours_that_share_a_figure_stay_apart_for_colour_blind_readers(group):
    """About one man in twelve has a red-green deficiency: the old palette drew IKL red beside DKD green
    (ΔE 7 under deuteranopia) and KL blue beside GKL purple (ΔE 6). Every pair of colours that can share a
    figure must keep a CIE76 ΔE of at least 10 for normal vision and under the full-severity deuteranopia,
    protanopia and tritanopia simulations of Machado, Oliveira & Fernandes (2009)."""
    import itertools

    import numpy as np

    vision = _CVD_VISION
    colours = {**plots.LOSS_COLORS, **plots.CHECK_STATUS_COLORS}
    close = [(a, b, name, round(float(np.linalg.norm(_cvd_lab(colours[a], m) - _cvd_lab(colours[b], m))), 1))
             for a, b in itertools.combinations(group, 2) for name, m in vision.items()]
    assert [c for c in close if c[3] < 10] == []
    # the simulation itself: red and green merge under deuteranopia, not for normal vision
    red_green = [float(np.linalg.norm(_cvd_lab("#d62728", vision[v]) - _cvd_lab("#2ca02c", vision[v])))
                 for v in ("normal", "deuteranopia")]
    assert red_green[0] > 50 > 10 > red_green[1]


def test_sanity_check_fail_is_a_red_far_from_the_warn_amber():
    """FAIL was Okabe & Ito's vermillion (#d55e00), ΔE 18 from WARN's amber under deuteranopia, while the
    title called it red: FAIL is now a true red, at least ΔE 30 from the amber for every simulated vision."""
    import numpy as np

    vision = _CVD_VISION
    warn, fail = plots.CHECK_STATUS_COLORS["warn"], plots.CHECK_STATUS_COLORS["fail"]
    gaps = {name: float(np.linalg.norm(_cvd_lab(warn, m) - _cvd_lab(fail, m))) for name, m in vision.items()}
    assert min(gaps.values()) >= 30, gaps
    r, g, b = (int(fail[i:i + 2], 16) for i in (1, 3, 5))
    assert r >= 0xb0 and g <= 0x20 and b <= 0x20                 # a red, as the title says


def test_margin_lines_draw_each_term_in_both_panels_with_one_legend_entry():
    sweep = grads.margin_sweep([0.0, 10.0, 20.0], num_classes=4, teacher_confidence=0.7)
    fig = plots.margin_lines(sweep)
    pairs = sweep[["loss", "term"]].drop_duplicates()
    assert len(fig.data) == 2 * len(pairs) == 6
    assert sum(bool(trace.showlegend) for trace in fig.data) == len(pairs)
    curvature = [trace for trace in fig.data if trace.xaxis == "x2"]
    assert sorted(trace.name for trace in curvature) == sorted(plots.label(l, t) for l, t in pairs.itertuples(index=False))
    wmse = next(trace for trace in curvature if trace.name == plots.label("ikl", "wmse"))
    assert max(wmse.y) - min(wmse.y) < 1e-12  # the constant curvature, drawn as it is


def test_cost_lines_tick_the_measured_class_counts_and_powers_of_ten():
    """Plotly's minor log labels read "... 9 100 2 3": C = 300 appeared as "3"."""
    import pandas as pd

    df = pd.DataFrame({"classes": [10, 30, 100, 300] * 2, "method": ["closed form"] * 4 + ["pairwise"] * 4,
                       "seconds": [1e-4, 2e-4, 5e-4, 1e-3, 1e-4, 1e-3, 1e-2, 1e-1],
                       "largest_tensor_bytes": [40, 120, 400, 1200, 400, 3600, 40000, 360000]})
    fig = plots.cost_lines(df)
    for axis in (fig.layout.xaxis, fig.layout.xaxis2):
        assert list(axis.tickvals) == [10, 30, 100, 300] and list(axis.ticktext) == ["10", "30", "100", "300"]
    assert fig.layout.yaxis.dtick == 1 and fig.layout.yaxis2.dtick == 1


def test_simplex_total_arrows_have_their_own_colour():
    df = grads.simplex_field([0.2, 0.5, 0.3], loss="ikl", resolution=6)
    fig = plots.simplex_quiver(df, teacher_xy=(0.5, 0.3))
    colours = {t.name: t.line.color for t in fig.data if t.name in ("wMSE", "soft-label CE", "total")}
    assert len(set(colours.values())) == 3, colours


@pytest.fixture
def comm_opens(monkeypatch):
    """The state each new widget sends in its comm's "open" message (what the browser first renders)."""
    import ipywidgets.widgets.widget as widget_module

    opened, create_comm = [], widget_module.comm.create_comm

    def recording(**kwargs):
        opened.append(kwargs["data"]["state"])
        return create_comm(**kwargs)

    monkeypatch.setattr(widget_module.comm, "create_comm", recording)
    return opened


def _figure_opens(opened):
    return [state for state in opened if "_widget_data" in state]


@pytest.mark.parametrize("make", [
    lambda: widgets.gradient_bars_dashboard(TEACHER, STUDENT),
    lambda: widgets.simplex_dashboard("ikl", resolution=5),
    lambda: widgets.weights_dashboard(),
    lambda: widgets.training_dashboard(),
], ids=["gradient_bars", "simplex", "weights", "training"])
def test_dashboard_figures_reach_the_browser_with_their_traces_in_the_first_message(comm_opens, make):
    """plotly's own FigureWidget opens its comm empty and sends traces and layout a message later; JupyterLab
    could draw the view in between (notebook 02's browser test saw an empty bar chart that sliders never
    filled). Each dashboard's figure must open with everything the view draws."""
    dash = make()
    (state,) = _figure_opens(comm_opens)
    assert len(state["_widget_data"]) == len(dash.figure.data)
    assert state["_widget_layout"]["height"] == dash.figure.layout.height
    assert state["_widget_layout"]["title"]["text"] == dash.figure.layout.title.text


def test_figure_widget_opens_with_its_data_and_still_updates(comm_opens):
    fig = plots.gradient_bars(grads.student_gradients(TEACHER, STUDENT))
    widget = plots.figure_widget(fig)
    (state,) = _figure_opens(comm_opens)
    assert len(state["_widget_data"]) == len(fig.data) > 0
    assert state["_widget_layout"]["height"] == fig.layout.height
    assert [(t.name, t.y) for t in widget.data] == [(t.name, t.y) for t in fig.data]
    widget.data[0].y = [0.5] * len(widget.data[0].y)  # a restyle on the open comm, as a slider's callback does
    assert widget.data[0].y == (0.5,) * len(fig.data[0].y)
    assert len(plots.figure_widget().data) == 0
    # the browser gets a small module of ours and plotly's own widget bundle as data, evaluated once per page
    import plotly.graph_objects as go

    assert state["_plotly_bundle"] == str(go.FigureWidget._esm)
    assert len(state["_esm"]) < 5_000 < len(state["_plotly_bundle"])
    assert "globalThis[BUNDLES]" in state["_esm"] and state["_plotly_version"] == __import__("plotly").__version__
    with pytest.raises(TypeError, match="plotly Figure"):
        plots.figure_widget({"data": []})


def test_figure_widget_sends_its_whole_state_again_when_the_browser_asks(monkeypatch):
    """The browser asks (custom message "dkl_lib:resend") when Python's updates reached it before plotly's code
    could apply them; Python answers with the figure as it is now, then "dkl_lib:resent"."""
    import ipywidgets

    widget = plots.figure_widget(plots.gradient_bars(grads.student_gradients(TEACHER, STUDENT)))
    sent = []
    monkeypatch.setattr(ipywidgets.Widget, "_send", lambda self, msg, buffers=None: sent.append(msg))
    widget.data[0].y = [0.25] * len(widget.data[0].y)  # an update the browser may have missed
    sent.clear()
    widget._handle_custom_msg({"kind": "something else"}, [])
    assert sent == []
    for _ in range(2):  # the second time nothing changed since the first answer: the state is sent all the same
        sent.clear()
        widget._handle_custom_msg({"kind": "dkl_lib:resend"}, [])
        states = [m["state"] for m in sent if m["method"] == "update"]
        assert {key for state in states for key in state} == {"_widget_data", "_widget_layout"}
        data = next(state["_widget_data"] for state in states if "_widget_data" in state)
        assert list(data[0]["y"]) == [0.25] * len(widget.data[0].y)
        assert sent[-1] == {"method": "custom", "content": {"kind": "dkl_lib:resent"}}
    # numpy arrays in the figure (their == is elementwise): answered all the same
    import plotly.graph_objects as go

    arrays = plots.figure_widget(go.Figure(go.Scatter(x=np.arange(3), y=np.array([1.0, 2.0, 3.0]))))
    sent.clear()
    arrays._handle_custom_msg({"kind": "dkl_lib:resend"}, [])
    assert [sorted(m.get("state", {})) for m in sent] == [["_widget_layout"], ["_widget_data"], []]
