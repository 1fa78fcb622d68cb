"""Plotly figures made from data (DataFrames of :mod:`dkl_lib.grads`, training histories).

Every function returns a ``plotly.graph_objects.Figure`` (or a ``FigureWidget`` with
``widget=True``, for dashboards that update in place) and never calls ``.show()``. The ``update_*``
twins change an existing figure's data inside one ``batch_update`` (no re-creation, no flicker).
This module is the one place that owns the colours and the display names of losses and terms.
"""
from __future__ import annotations

from typing import Optional

import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = [
    "LOSS_COLORS",
    "LOSS_LABELS",
    "TERM_LABELS",
    "label",
    "color",
    "gradient_bars",
    "update_gradient_bars",
    "simplex_quiver",
    "update_simplex_quiver",
    "weight_heatmaps",
    "update_weight_heatmaps",
    "confidence_lines",
    "equivalence_heatmap",
    "cost_lines",
]

LOSS_LABELS = {"ce": "CE only", "kl": "KL", "dkl": "DKL", "ikl": "IKL", "gkl": "GKL", "dkd": "DKD",
               "trades": "TRADES (KL)"}
LOSS_COLORS = {"ce": "#7f7f7f", "kl": "#1f77b4", "dkl": "#17becf", "ikl": "#d62728", "gkl": "#9467bd",
               "dkd": "#2ca02c", "trades": "#1f77b4"}
TERM_LABELS = {"wmse": "wMSE", "soft_ce": "soft-label CE", "kl": "KL", "tckd": "TCKD", "nckd": "NCKD",
               "ce": "CE", "total": "total"}
# terms of one loss share its colour; the pattern tells them apart
_TERM_PATTERN = {"wmse": "/", "soft_ce": "", "kl": "", "tckd": "x", "nckd": ".", "total": ""}
_TERM_DASH = {"wmse": "dash", "soft_ce": "solid", "kl": "solid", "tckd": "dot", "nckd": "dashdot",
              "total": "solid"}


def label(loss: str, term: Optional[str] = None) -> str:
    """Display name of a loss, or of one of its terms ("IKL · wMSE")."""
    name = LOSS_LABELS.get(loss, loss)
    return name if term is None else f"{name} · {TERM_LABELS.get(term, term)}"


def color(loss: str) -> str:
    return LOSS_COLORS.get(loss, "#333333")


def _figure(widget: bool, fig: go.Figure) -> go.Figure:
    return go.FigureWidget(fig) if widget else fig


# ------------------------------------------------------------------------------ gradient bars
def _pairs(df):
    return list(dict.fromkeys(zip(df["loss"], df["term"])))


def gradient_bars(df, *, widget: bool = False, title: str = "Gradient on the student's logits, per term"):
    """Grouped bars: one trace per (loss, term), x = class, y = gradient (from ``student_gradients``)."""
    fig = go.Figure()
    for loss, term in _pairs(df):
        part = df[(df["loss"] == loss) & (df["term"] == term)]
        fig.add_bar(x=part["cls"].tolist(), y=part["grad"].tolist(), name=label(loss, term),
                    marker=dict(color=color(loss), pattern_shape=_TERM_PATTERN.get(term, "")))
    fig.update_layout(barmode="group", title=title, xaxis_title="class j", yaxis_title="∂ term / ∂ o_n,j",
                      legend_title="loss · term", template="plotly_white", height=420)
    fig.update_xaxes(dtick=1)
    return _figure(widget, fig)


def update_gradient_bars(fig, df) -> None:
    """Set the bars of ``fig`` (made by :func:`gradient_bars`) to the values in ``df``."""
    with fig.batch_update():
        for trace, (loss, term) in zip(fig.data, _pairs(df)):
            part = df[(df["loss"] == loss) & (df["term"] == term)]
            trace.x, trace.y, trace.name = part["cls"].tolist(), part["grad"].tolist(), label(loss, term)


# ------------------------------------------------------------------------------ simplex field
def _segments(part, scale):
    xs, ys = [], []
    for x, y, dx, dy in zip(part["x"], part["y"], part["dx"], part["dy"]):
        xs += [x, x + scale * dx, None]
        ys += [y, y + scale * dy, None]
    return xs, ys


def _arrow_scale(df):
    longest = max(float(((df["dx"] ** 2 + df["dy"] ** 2) ** 0.5).max()), 1e-12)
    return 0.08 / longest  # the longest arrow spans 8% of the triangle's side


def simplex_quiver(df, *, teacher_xy=None, widget: bool = False,
                   title: str = "Where a gradient step moves the student (3 classes)"):
    """One panel per term: arrows of the student's motion on the simplex (from ``simplex_field``).

    Arrows share one scale across panels, so lengths compare between terms. ``teacher_xy``
    (x, y) marks the teacher's distribution.
    """
    terms = list(dict.fromkeys(df["term"]))
    fig = make_subplots(rows=1, cols=len(terms), subplot_titles=[TERM_LABELS.get(t, t) for t in terms])
    scale = _arrow_scale(df)
    outline = dict(x=[0, 1, 0.5, 0], y=[0, 0, 3**0.5 / 2, 0])
    for i, term in enumerate(terms, start=1):
        xs, ys = _segments(df[df["term"] == term], scale)
        fig.add_scatter(**outline, mode="lines", line=dict(color="#999", width=1), showlegend=False,
                        hoverinfo="skip", row=1, col=i)
        fig.add_scatter(x=xs, y=ys, mode="lines+markers", name=TERM_LABELS.get(term, term), showlegend=False,
                        line=dict(width=1.5, color="#d62728" if term == "wmse" else "#1f77b4"),
                        marker=dict(symbol="arrow", size=[0, 8, 0] * (len(xs) // 3), angleref="previous"),
                        row=1, col=i)
        tx, ty = teacher_xy if teacher_xy is not None else (None, None)
        fig.add_scatter(x=[tx], y=[ty], mode="markers", marker=dict(symbol="star", size=14, color="black"),
                        name="teacher", showlegend=(i == 1), row=1, col=i)
        fig.update_xaxes(visible=False, range=[-0.05, 1.05], row=1, col=i)
        fig.update_yaxes(visible=False, range=[-0.05, 0.92], scaleanchor=f"x{i if i > 1 else ''}", row=1, col=i)
    fig.update_layout(title=title, template="plotly_white", height=380)
    return _figure(widget, fig)


def update_simplex_quiver(fig, df, *, teacher_xy=None) -> None:
    """Replace the arrows (and the teacher mark) of a figure made by :func:`simplex_quiver`."""
    terms = list(dict.fromkeys(df["term"]))
    scale = _arrow_scale(df)
    with fig.batch_update():
        for i, term in enumerate(terms):
            xs, ys = _segments(df[df["term"] == term], scale)
            arrows, teacher = fig.data[3 * i + 1], fig.data[3 * i + 2]
            arrows.x, arrows.y = xs, ys
            if teacher_xy is not None:
                teacher.x, teacher.y = [teacher_xy[0]], [teacher_xy[1]]


# ------------------------------------------------------------------------------ weight heatmaps
def weight_heatmaps(mats, *, widget: bool = False):
    """Side-by-side heatmaps of w = p pᵀ: sample-wise and class-wise (from ``weight_matrices``)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("sample-wise  w = p pᵀ, p = softmax(o_m/T_w)",
                                                        "class-wise (GI)  p = mean over the class"))
    zmax = float(max(mats["sample"].max(), mats["classwise"].max()))
    for col, key in ((1, "sample"), (2, "classwise")):
        fig.add_heatmap(z=mats[key].tolist(), coloraxis="coloraxis", row=1, col=col)
        fig.update_yaxes(autorange="reversed", title_text="class j", dtick=1, row=1, col=col)
        fig.update_xaxes(title_text="class k", dtick=1, row=1, col=col)
    fig.update_layout(coloraxis=dict(colorscale="Viridis", cmin=0, cmax=zmax), template="plotly_white",
                      height=400, title=f"wMSE weights for a sample of class {mats['target']}")
    return _figure(widget, fig)


def update_weight_heatmaps(fig, mats) -> None:
    with fig.batch_update():
        fig.data[0].z = mats["sample"].tolist()
        fig.data[1].z = mats["classwise"].tolist()
        fig.layout.coloraxis.cmax = float(max(mats["sample"].max(), mats["classwise"].max()))
        fig.layout.title.text = f"wMSE weights for a sample of class {mats['target']}"


# ------------------------------------------------------------------------------ lines
def confidence_lines(df, *, title: str = "Gradient magnitude on the student against teacher confidence"):
    """One line per (loss, term): grad_norm against confidence (from ``confidence_sweep``)."""
    fig = go.Figure()
    for loss, term in _pairs(df):
        part = df[(df["loss"] == loss) & (df["term"] == term)]
        fig.add_scatter(x=part["confidence"], y=part["grad_norm"], mode="lines", name=label(loss, term),
                        line=dict(color=color(loss), dash=_TERM_DASH.get(term, "solid")))
    fig.update_layout(title=title, xaxis_title="teacher's probability of the top class",
                      yaxis_title="‖∂ term / ∂ o_n‖₂", template="plotly_white", height=420)
    return fig


def equivalence_heatmap(df, *, title: str = "KL vs DKL: largest gradient error (log10)"):
    """Heatmap of log10(max_error) over classes × temperature (from ``equivalence_table``)."""
    import numpy as np

    table = df.pivot(index="classes", columns="temperature", values="max_error")
    z = np.log10(np.maximum(table.to_numpy(), 1e-20))
    fig = go.Figure(go.Heatmap(z=z, x=[str(t) for t in table.columns], y=[str(c) for c in table.index],
                               text=[[f"{v:.1e}" for v in row] for row in table.to_numpy()],
                               texttemplate="%{text}", colorscale="Blues", zmin=-17, zmax=-9,
                               colorbar=dict(title="log10 error")))
    fig.update_layout(title=title, xaxis_title="temperature T", yaxis_title="classes C",
                      template="plotly_white", height=380)
    return fig


def cost_lines(df, *, title: str = "wMSE cost: closed form vs literal pairwise sum"):
    """Time and largest tensor against C, log-log, one line per method (from ``wmse_cost``)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("forward + backward time (s)", "largest tensor (bytes)"))
    palette = {"closed form": "#d62728", "pairwise": "#7f7f7f"}
    for method in dict.fromkeys(df["method"]):
        part = df[df["method"] == method]
        for col, key in ((1, "seconds"), (2, "largest_tensor_bytes")):
            fig.add_scatter(x=part["classes"], y=part[key], mode="lines+markers", name=method,
                            line=dict(color=palette.get(method)), showlegend=(col == 1), row=1, col=col)
    fig.update_xaxes(type="log", title_text="classes C")
    fig.update_yaxes(type="log")
    fig.update_layout(title=title, template="plotly_white", height=380)
    return fig
