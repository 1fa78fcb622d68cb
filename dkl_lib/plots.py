"""Plotly figures made from data (DataFrames of :mod:`dkl_lib.grads`, training histories).

Every figure function returns a ``plotly.graph_objects.Figure`` (or a ``FigureWidget`` with
``widget=True``, for dashboards that update in place) and never calls ``.show()``; the exceptions are
:func:`final_accuracy_chart` (a seaborn / matplotlib ``Figure``) and the tables
:func:`histories_frame` and :func:`paper_comparison` (pandas DataFrames). The ``update_*``
twins change an existing figure's data inside one ``batch_update`` (no re-creation, no flicker).
This module is the one place that owns the colours and the display names of losses and terms.
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
from typing import Optional, Sequence

import plotly
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._checks import check_int

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
    "margin_lines",
    "equivalence_heatmap",
    "cost_lines",
    "drift_lines",
    "metric_bars",
    "reliability_diagram",
    "sensitivity_heatmap",
    "sensitivity_lines",
    "order_text",
    "figure_widget",
    "TRAINING_TERMS",
    "histories_frame",
    "learning_curves",
    "final_accuracy_chart",
    "prior_heatmap",
    "paper_comparison",
]

LOSS_LABELS = {"ce": "CE only", "kl": "KL", "dkl": "DKL", "ikl": "IKL", "gkl": "GKL", "dkd": "DKD",
               "trades": "TRADES (KL)", "ikl-nogi": "IKL (no GI)", "gkl-nogi": "GKL (no GI)",
               "ikl-gi": "IKL (GI)", "gkl-gi": "GKL (GI)"}
# Okabe & Ito's colour-blind-safe colours (tests/test_plots_widgets.py checks every pair under simulated
# deuteranopia, protanopia and tritanopia)
LOSS_COLORS = {"ce": "#555555", "kl": "#0072b2", "dkl": "#56b4e9", "ikl": "#d55e00", "gkl": "#cc79a7",
               "dkd": "#009e73", "trades": "#0072b2", "ikl-nogi": "#e69f00", "gkl-nogi": "#c5b0d5",
               "ikl-gi": "#d55e00", "gkl-gi": "#cc79a7"}  # (with GI: the colour of the preset's GI run)
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
    """The colour (hex) of a loss in every figure; dark grey for an unknown name."""
    return LOSS_COLORS.get(loss, "#333333")


def _dash(loss: str) -> str:
    """Line style of a loss: dashed for the variants drawn over another loss (DKL on KL, "no GI" on GI)."""
    return "dash" if loss in ("dkl", "ikl-nogi", "gkl-nogi") else "solid"


def order_text(means, *, decimals: int = 2) -> str:
    """The losses ordered by a mean, best first, in words: "IKL > GKL > KL = DKL > CE only".

    ``means``: a pandas Series (loss name -> mean). Means equal at ``decimals`` places (as the tables
    print them) are joined by "=", so two losses with one trajectory (KL and DKL) do not read as ranked.
    """
    import pandas as pd

    if not isinstance(means, pd.Series) or means.empty:
        raise TypeError("means must be a non-empty pandas Series of loss name -> mean")
    decimals = check_int("decimals", decimals, 0)
    groups = []
    for loss, value in means.round(decimals).sort_values(ascending=False, kind="stable").items():
        if groups and groups[-1][0] == value:
            groups[-1][1].append(label(loss))
        else:
            groups.append((value, [label(loss)]))
    return " > ".join(" = ".join(names) for _, names in groups)


# The front end of the dashboards' figures (an anywidget module). plotly's FigureWidget sends its whole
# 5 MB widget bundle as each widget's module, and the browser evaluates it again for every figure;
# anywidget gives a widget 2 s to load its module and, past that, drops every later message from Python
# to it ("[anywidget] Failed to initialize model."): on a busy machine (the kernel training on every core)
# a dashboard then draws once and never follows its sliders. This module is small; it evaluates plotly's
# bundle (sent as ``_plotly_bundle``) once per page and plotly version, shares it between every figure,
# and lets the load take as long as it takes: a figure waits for it before it draws.
_FIGURE_WIDGET_ESM = """
const BUNDLES = Symbol.for("dkl_lib.plotly_widget_bundles");

function plotlyBundle(model) {
  const cache = (globalThis[BUNDLES] ??= new Map());
  const version = model.get("_plotly_version");
  if (!cache.has(version)) {
    const url = URL.createObjectURL(new Blob([model.get("_plotly_bundle")], { type: "text/javascript" }));
    const loading = import(url).finally(() => URL.revokeObjectURL(url));
    loading.catch(() => cache.delete(version));  // a failed load is tried again by the next figure
    cache.set(version, loading);
  }
  return cache.get(version);
}

// updates Python sends before plotly's code is there to apply them (the figure changed right after it was
// shown) would be lost: the figure then asks Python for its whole state again and draws from that
const PY2JS = ["addTraces", "deleteTraces", "moveTraces", "restyle", "relayout", "update", "animate",
               "removeLayoutProps", "removeTraceProps"].map((name) => `change:_py2js_${name}`);

function resend(model) {
  return new Promise((resolve) => {
    const done = (msg) => {
      if (msg?.kind !== "dkl_lib:resent") return;
      model.off("msg:custom", done);
      resolve();
    };
    model.on("msg:custom", done);
    model.send({ kind: "dkl_lib:resend" });
    setTimeout(() => done({ kind: "dkl_lib:resent" }), 10000);  // no kernel to answer: draw what there is
  });
}

export default () => {
  let plotlyWidget;  // plotly's own {initialize, render} for this figure, once the bundle is there
  return {
    initialize({ model }) {
      let missed = false;
      const miss = () => { missed = true; };
      for (const event of PY2JS) model.on(event, miss);
      plotlyWidget = plotlyBundle(model).then(async (bundle) => {
        for (const event of PY2JS) model.off(event, miss);
        const widget = bundle.default();
        widget.initialize({ model });
        if (missed) await resend(model);
        return widget;
      });
      plotlyWidget.catch((error) => console.error("[dkl_lib] plotly's figure widget did not load:", error));
    },
    async render({ model, el }) {
      return (await plotlyWidget).render({ model, el });
    },
  };
};
"""


def _equal(a, b) -> bool:
    """``a == b`` for figure data, False where the comparison fails (dicts holding numpy arrays)."""
    try:
        return bool(a == b)
    except (ValueError, TypeError):
        return False


@functools.cache
def _figure_widget_class():
    """The class behind :func:`figure_widget`, made on first use: ``go.FigureWidget`` needs anywidget and
    ipywidgets (the "plots" extra), which static figures do not."""
    import traitlets

    class FigureWidget(go.FigureWidget):
        """A plotly ``FigureWidget`` that (1) sends its traces and layout in its first message to the browser,
        (2) loads plotly's front end once per page (see ``_FIGURE_WIDGET_ESM``) and (3) sends its whole state
        again when the browser asks (:meth:`_resend`).

        (1): plotly's ``FigureWidget`` opens its comm with no traces and no layout and sends them a message
        later; the browser view reads them once, when it draws, and ignores later changes of the whole data,
        so a view drawn between the two messages stays an empty plot that no slider fills. Opening the comm
        only once the figure is built removes that window. (1) and (2) were seen in notebook 02's browser test.
        (plotly 6.0 sends traces and layout only when the figure itself is displayed: inside a dashboard's
        box, never.)"""

        _esm = _FIGURE_WIDGET_ESM
        _plotly_bundle = traitlets.Unicode().tag(sync=True)
        _plotly_version = traitlets.Unicode(plotly.__version__).tag(sync=True)

        @traitlets.default("_plotly_bundle")
        def _bundle(self):
            return str(go.FigureWidget._esm)  # plotly's own widget module, as plotly would send it

        def __init__(self, *args, **kwargs):
            self._hold_open = True
            try:
                super().__init__(*args, **kwargs)
                # plotly 7 sets these two at the end of its __init__; plotly 6.0 only when the figure itself
                # is displayed, never for a figure inside a dashboard's box, which then stayed empty
                if not self._widget_layout:
                    self._widget_layout = copy.deepcopy(self._layout_obj._props)
                if not self._widget_data:
                    self._widget_data = copy.deepcopy(self._data)
            finally:
                self._hold_open = False
            self.open()
            self.on_msg(self._resend)

        def _resend(self, _widget, content, _buffers):
            """The browser's figure missed updates (sent before plotly's code had loaded there): send the whole
            figure again, then say so."""
            if not (isinstance(content, dict) and content.get("kind") == "dkl_lib:resend"):
                return
            for name, value in (("_widget_layout", self._layout_obj._props), ("_widget_data", self._data)):
                if _equal(value, getattr(self, name)):
                    self.send_state(name)  # the browser's copy may be older all the same
                else:
                    setattr(self, name, copy.deepcopy(value))  # sent on assignment
            self.send({"kind": "dkl_lib:resent"})

        def open(self):
            if not getattr(self, "_hold_open", False):
                super().open()

    FigureWidget.__module__, FigureWidget.__qualname__ = __name__, "FigureWidget"
    return FigureWidget


def figure_widget(fig: Optional[go.Figure] = None) -> go.FigureWidget:
    """``fig`` as a plotly ``FigureWidget``, for dashboards that update in place: its first message to the
    browser holds its traces and layout, and the browser loads plotly's widget code once for all such
    figures, with no time limit (plotly's own ``FigureWidget`` loads it for each figure and, on a busy
    machine, can run past anywidget's 2 s and then stop following Python's updates). A figure whose updates
    reached the browser before that code had loaded there asks Python for its whole state before it draws."""
    if fig is not None and not isinstance(fig, go.Figure | go.FigureWidget):
        raise TypeError(f"fig must be a plotly Figure, got {type(fig).__name__}")
    return _figure_widget_class()(fig)


def _figure(widget: bool, fig: go.Figure) -> go.Figure:
    return figure_widget(fig) if widget else fig


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
    """The longest arrow spans 90 % of the grid's spacing (the closest two points of one term), so
    arrows are as long as they can be without reaching the next point."""
    import numpy as np

    longest = max(float(((df["dx"] ** 2 + df["dy"] ** 2) ** 0.5).max()), 1e-12)
    first = df[df["term"] == df["term"].iloc[0]]
    pts = np.stack([first["x"].to_numpy(float), first["y"].to_numpy(float)], axis=1)
    spacing = 0.08 / 0.9
    if len(pts) > 1:
        dist = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
        spacing = float(dist[dist > 0].min()) if (dist > 0).any() else spacing
    return 0.9 * spacing / longest


#: Colours of the simplex panels' arrows, per term.
_TERM_ARROW_COLORS = {"wmse": "#d55e00", "soft_ce": "#0072b2", "total": "#333333"}


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
                        line=dict(width=1.5, color=_TERM_ARROW_COLORS.get(term, "#0072b2")),
                        marker=dict(symbol="arrow", size=[0, 8, 0] * (len(xs) // 3), angleref="previous"),
                        row=1, col=i)
        tx, ty = teacher_xy if teacher_xy is not None else (None, None)
        fig.add_scatter(x=[tx], y=[ty], mode="markers", marker=dict(symbol="star", size=14, color="black"),
                        name="teacher", showlegend=(i == 1), row=1, col=i)
        fig.update_xaxes(visible=False, range=[-0.05, 1.05], row=1, col=i)
        fig.update_yaxes(visible=False, range=[-0.07, 0.94], scaleanchor=f"x{i if i > 1 else ''}", row=1, col=i)
        # which corner is which class (probability 1 on that class), as in grads.SIMPLEX_CORNERS
        ref = f"x{i if i > 1 else ''}"
        for k, (cx, cy, anchor) in enumerate(((0.0, 0.0, "top"), (1.0, 0.0, "top"), (0.5, 3**0.5 / 2, "bottom"))):
            fig.add_annotation(x=cx, y=cy, xref=ref, yref=ref.replace("x", "y"), text=f"class {k}",
                               showarrow=False, yanchor=anchor, font=dict(size=11, color="#555"))
    fig.update_layout(title=title, template="plotly_white", height=460)
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
def _weights_title(mats) -> str:
    return f"wMSE weights w = p pᵀ for a sample of class {mats['target']}"


def weight_heatmaps(mats, *, widget: bool = False):
    """Side-by-side heatmaps of w = p pᵀ: sample-wise and class-wise (from ``weight_matrices``)."""
    # two short lines per panel title: on one line the two titles overlap in a dashboard-width figure
    fig = make_subplots(rows=1, cols=2, subplot_titles=("sample-wise<br>p = softmax(o_m / T_w)",
                                                        "class-wise (GI)<br>p = mean over the class"))
    zmax = float(max(mats["sample"].max(), mats["classwise"].max()))
    for col, key in ((1, "sample"), (2, "classwise")):
        fig.add_heatmap(z=mats[key].tolist(), coloraxis="coloraxis", row=1, col=col)
        fig.update_yaxes(autorange="reversed", title_text="class j", dtick=1, row=1, col=col)
        fig.update_xaxes(title_text="class k", dtick=1, row=1, col=col)
    fig.update_layout(coloraxis=dict(colorscale="Viridis", cmin=0, cmax=zmax, colorbar=dict(title="w_jk")),
                      template="plotly_white",
                      height=420, margin=dict(t=110), title=_weights_title(mats))
    return _figure(widget, fig)


def update_weight_heatmaps(fig, mats) -> None:
    """Set the heatmaps (and the colour range and title) of a figure made by :func:`weight_heatmaps`
    to ``mats`` (from ``weight_matrices``)."""
    with fig.batch_update():
        fig.data[0].z = mats["sample"].tolist()
        fig.data[1].z = mats["classwise"].tolist()
        fig.layout.coloraxis.cmax = float(max(mats["sample"].max(), mats["classwise"].max()))
        fig.layout.title.text = _weights_title(mats)


# ------------------------------------------------------------------------------ lines
def confidence_lines(df, *, title: str = "Gradient magnitude on the student against teacher confidence"):
    """One line per (loss, term): grad_norm against confidence (from ``confidence_sweep``).

    Curves of different losses can coincide exactly (KL's gradient is IKL's soft-label CE one;
    GKL's equals IKL's at γ = 1), so each loss draws a thinner line than the one before it: a
    curve drawn over another leaves the earlier one visible as a wider band around it.
    """
    fig = go.Figure()
    losses = list(dict.fromkeys(df["loss"]))
    for loss, term in _pairs(df):
        part = df[(df["loss"] == loss) & (df["term"] == term)]
        width = 2 + 3 * (len(losses) - 1 - losses.index(loss))
        fig.add_scatter(x=part["confidence"], y=part["grad_norm"], mode="lines", name=label(loss, term),
                        line=dict(color=color(loss), dash=_TERM_DASH.get(term, "solid"), width=width))
    fig.update_layout(title=title, xaxis_title="teacher's probability of the top class",
                      yaxis_title="‖∂ term / ∂ o_n‖₂", template="plotly_white", height=420)
    return fig


def margin_lines(df, *, title: str = "A confidently wrong student: gradient size and curvature of each term"):
    """Two panels against the student's wrong margin (from :func:`dkl_lib.grads.margin_sweep`): the
    gradient norm of each (loss, term), and the largest eigenvalue of its Hessian. Coinciding curves
    (KL and IKL's soft-label CE) stay visible as in :func:`confidence_lines`."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("‖∂ term / ∂ o_n‖₂ (gradient size)",
                                                        "largest Hessian eigenvalue (curvature)"))
    losses = list(dict.fromkeys(df["loss"]))
    for loss, term in _pairs(df):
        part = df[(df["loss"] == loss) & (df["term"] == term)]
        width = 2 + 3 * (len(losses) - 1 - losses.index(loss))
        for col, column in ((1, "grad_norm"), (2, "curvature")):
            fig.add_scatter(x=part["margin"], y=part[column], mode="lines", name=label(loss, term),
                            legendgroup=f"{loss}/{term}", showlegend=col == 1, row=1, col=col,
                            line=dict(color=color(loss), dash=_TERM_DASH.get(term, "solid"), width=width))
    fig.update_xaxes(title_text="student's logit margin on a wrong class")
    fig.update_layout(title=title, template="plotly_white", height=420, margin=dict(t=90))
    return fig


def equivalence_heatmap(df, *, title: str = "KL vs DKL: largest relative gradient error"):
    """Heatmap of log10(max_error) over classes × temperature (from ``equivalence_table``); each cell
    shows the error itself, relative to the largest entry of KL's gradient (see
    :func:`dkl_lib.grads.check_kl_dkl_equivalence`), the colour its log10."""
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
    palette = {"closed form": "#d55e00", "pairwise": "#555555"}
    for method in dict.fromkeys(df["method"]):
        part = df[df["method"] == method]
        for col, key in ((1, "seconds"), (2, "largest_tensor_bytes")):
            fig.add_scatter(x=part["classes"], y=part[key], mode="lines+markers", name=method,
                            line=dict(color=palette.get(method)), showlegend=(col == 1), row=1, col=col)
    classes = sorted({int(c) for c in df["classes"]})
    # ticks at the measured C only, and powers of ten on y: plotly's minor log labels ("2 3 ... 9 100 2 3")
    # read as C = 3 for C = 300
    fig.update_xaxes(type="log", title_text="classes C", tickvals=classes, ticktext=[str(c) for c in classes])
    fig.update_yaxes(type="log", dtick=1, exponentformat="power")
    fig.update_layout(title=title, template="plotly_white", height=380)
    return fig


# ------------------------------------------------------------------------------ notebook 05
def _check_mapping(name: str, value) -> None:
    """A non-empty dict of label -> table: an empty one drew an empty figure without a word."""
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of label -> DataFrame, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} is empty: nothing to draw")


def drift_lines(drifts: dict, *, title: str = "KL vs DKL, same seed: how far the two students drift apart"):
    """Largest parameter difference per epoch (log scale), one line per precision.

    ``drifts`` maps a label (e.g. "float64") to a DataFrame of :func:`dkl_lib.analysis.parameter_drift`.
    """
    _check_mapping("drifts", drifts)
    fig = go.Figure()
    for name, df in drifts.items():
        fig.add_scatter(x=df["epoch"], y=df["max_param_diff"].clip(lower=1e-18), mode="lines+markers", name=name)
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title="max |θ_KL − θ_DKL|", yaxis_type="log",
                      yaxis_exponentformat="power", template="plotly_white", height=380)
    return fig


def metric_bars(df, metrics: dict, *,
                title: str = "IKL with and without class-wise global information: mean ± std over seeds"):
    """One panel per metric: mean over seeds per loss (a point), error bar = std (from ``prediction_metrics``).

    ``metrics`` maps a column of ``df`` to its axis title. Points, not bars from zero: each axis fits
    its values, so a difference of a fraction of a point between two accuracies near 95 % is visible;
    a "no GI" variant gets an open marker besides its colour.
    """
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=list(metrics.values()))
    stats = df.groupby("loss", sort=False)[list(metrics)].agg(["mean", "std", "count"])
    for col, metric in enumerate(metrics, start=1):
        losses = list(stats.index)
        counts = [int(c) for c in stats[(metric, "count")]]
        fig.add_scatter(x=[f"{label(n)}<br>n={c}" for n, c in zip(losses, counts)], y=stats[(metric, "mean")],
                        mode="markers", showlegend=False,
                        error_y=dict(type="data", array=stats[(metric, "std")].fillna(0).tolist(), width=8),
                        marker=dict(color=[color(n) for n in losses], size=13, line=dict(width=2),
                                    symbol=["circle-open" if _dash(n) == "dash" else "circle" for n in losses]),
                        meta={"losses": losses, "metric": metric},
                        hovertemplate="%{x}: %{y:.4g} ± %{error_y.array:.2g}<extra></extra>",
                        row=1, col=col)
    fig.update_layout(title=title, template="plotly_white", height=380)
    return fig


def reliability_diagram(tables: dict, *, title: str = "Reliability diagram (test set, all seeds pooled)"):
    """Accuracy against confidence per bin, one line per model, with the diagonal of perfect calibration.

    ``tables`` maps a label to a :func:`dkl_lib.analysis.reliability_table` DataFrame.
    """
    _check_mapping("tables", tables)
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#999", dash="dot"), name="perfect")
    biggest = max([int(t["count"].max()) for t in tables.values() if len(t)] + [1])
    for name, table in tables.items():
        used = table[table["count"] > 0]
        # marker area ∝ samples in the bin: a near-empty bin far off the diagonal is not read as a trend
        sizes = [4 + 16 * (int(c) / biggest) ** 0.5 for c in used["count"]]
        fig.add_scatter(x=used["confidence"], y=used["accuracy"], mode="lines+markers", name=label(name),
                        text=[f"n={c}" for c in used["count"]], marker=dict(size=sizes),
                        hovertemplate="confidence %{x:.3f}, accuracy %{y:.3f} (%{text})<extra>" + label(name)
                        + "</extra>", line=dict(color=color(name), dash=_dash(name)), meta={"loss": name})
    fig.update_layout(title=title, xaxis_title="confidence", yaxis_title="accuracy", template="plotly_white",
                      legend_title_text="marker area ∝<br>samples in the bin",
                      height=400, xaxis_range=[0, 1.02], yaxis_range=[0, 1.02])
    return fig


#: Axis titles of the hyper-parameters of the sensitivity figures (the notebook's symbols).
_PARAM_LABELS = {"alpha": "α (weight of the wMSE term)", "beta": "β (weight of the soft-label CE term)",
                 "temperature": "temperature T", "weight_temperature": "weight temperature T_w", "gamma": "γ"}


_VALUE_WORDS = {"best": "best-epoch", "last": "last-epoch"}


def _sensitivity_title(value: str, loss: Optional[str], what: str) -> str:
    words = f"Sensitivity: {_VALUE_WORDS.get(value, value)} test accuracy ({what})"
    return words if loss is None else f"{label(loss)} s{words[1:]}"


def sensitivity_heatmap(summary, x: str, y: str, *, value: str = "best", title: Optional[str] = None,
                        zrange: Optional[Sequence[float]] = None, loss: Optional[str] = None):
    """Heatmap of mean accuracy over two hyper-parameters, each cell labelled mean ± std (n).
    ``value``: "best" or "last" (the epoch whose accuracy is shown; the default title says which).
    ``zrange``: (low, high) of the colour scale; give two heatmaps the same one to compare their
    colours (default: this heatmap's own range). ``loss``: named in the default title ("IKL sensitivity: ...")."""
    import numpy as np

    if title is None:
        title = _sensitivity_title(value, loss, "mean ± std, n runs")
    mean = summary.pivot(index=y, columns=x, values=f"{value}_mean")
    std = summary.pivot(index=y, columns=x, values=f"{value}_std")
    count = summary.pivot(index=y, columns=x, values="n")
    text = [[f"{m:.2f} ± {0.0 if np.isnan(s) else s:.2f} (n={int(n)})" for m, s, n in zip(mr, sr, nr)]
            for mr, sr, nr in zip(mean.to_numpy(), std.to_numpy(), count.to_numpy())]
    scale = {}
    if zrange is not None:
        low, high = (float(v) for v in zrange)
        if not low <= high:
            raise ValueError(f"zrange must be (low, high) with low <= high, got {tuple(zrange)}")
        pad = 0.5 if low == high else 0.0  # one value everywhere: a scale of one point around it
        scale = dict(zmin=low - pad, zmax=high + pad)
    fig = go.Figure(go.Heatmap(z=mean.to_numpy(), x=[str(v) for v in mean.columns], y=[str(v) for v in mean.index],
                               text=text, texttemplate="%{text}", colorscale="Viridis",
                               colorbar=dict(title="accuracy (%)"), **scale))
    fig.update_layout(title=title, xaxis_title=_PARAM_LABELS.get(x, x), yaxis_title=_PARAM_LABELS.get(y, y),
                      template="plotly_white", height=380)
    return fig


def sensitivity_lines(summary, x: str, *, value: str = "best", title: Optional[str] = None,
                      loss: Optional[str] = None):
    """Mean accuracy against one hyper-parameter with std error bars (e.g. γ for GKL); ``value`` as
    in :func:`sensitivity_heatmap`; ``loss`` names the loss in the default title and gives the line its
    colour (GKL's when None)."""
    if title is None:
        title = _sensitivity_title(value, loss, "mean ± std over seeds")
    fig = go.Figure(go.Scatter(x=summary[x], y=summary[f"{value}_mean"], mode="lines+markers",
                               error_y=dict(type="data", array=summary[f"{value}_std"].fillna(0).tolist()),
                               text=[f"n={int(n)}" for n in summary["n"]], line=dict(color=color(loss or "gkl"))))
    fig.update_layout(title=title, xaxis_title=_PARAM_LABELS.get(x, x), yaxis_title="test accuracy (%)",
                      template="plotly_white",
                      height=360)
    return fig


# ------------------------------------------------------------------------------ notebook 03: training
#: History columns that hold named loss terms (per-epoch means), in display order.
TRAINING_TERMS = ("ce", "kl", "soft_ce", "wmse", "tckd", "nckd")
_METRIC_LABELS = {"test_acc": "test accuracy (%)", "train_acc": "train accuracy (%)", "total_loss": "total loss",
                  "logit_gap": "logit-difference gap to the teacher (test set)"}


def histories_frame(histories):
    """One long DataFrame (loss, seed, epoch, ...) from training histories.

    ``histories`` is ``GridResult.histories`` ({(loss, seed): per-epoch DataFrame or list of
    dicts}) or already a long DataFrame with ``loss`` and ``seed`` columns (returned as a copy).
    The trainers' per-epoch total loss (their history's ``loss`` column) becomes ``total_loss``,
    since ``loss`` names the loss function here.
    """
    import pandas as pd

    if isinstance(histories, pd.DataFrame):
        missing = {"loss", "seed", "epoch"} - set(histories.columns)
        if missing:
            raise ValueError(f"a history DataFrame needs the columns loss, seed, epoch; missing {sorted(missing)}")
        return histories.copy()
    if not isinstance(histories, dict) or not histories:
        raise ValueError("histories must be a non-empty dict {(loss, seed): history} or a long DataFrame")
    parts = []
    for key, hist in histories.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"history keys must be (loss, seed) pairs, got {key!r}")
        frame = hist if isinstance(hist, pd.DataFrame) else pd.DataFrame(list(hist))
        parts.append(frame.rename(columns={"loss": "total_loss"}).assign(loss=key[0], seed=key[1]))
    long = pd.concat(parts, ignore_index=True)
    front = ["loss", "seed", "epoch"]
    return long[front + [c for c in long.columns if c not in front]]


def _mean_std(part, column):
    """Per-epoch mean and sample std (ddof = 1; 0 for a single seed) of ``column``, and n."""
    stats = part.groupby("epoch")[column].agg(["mean", "std", "count"]).reset_index()
    stats["std"] = stats["std"].fillna(0.0)
    return stats


def _band(fig, stats, *, loss, name, row, col):
    """A filled mean ± std band (one closed polygon) in the loss's colour, from a frame with columns
    epoch, mean, std; hover off. ``name``: the loss's display name (the band is "<name> ± std")."""
    x = stats["epoch"].tolist()
    upper = (stats["mean"] + stats["std"]).tolist()
    lower = (stats["mean"] - stats["std"]).tolist()
    fig.add_scatter(x=x + x[::-1], y=upper + lower[::-1], mode="lines", fill="toself", fillcolor=color(loss),
                    opacity=0.18, line=dict(width=0), hoverinfo="skip", showlegend=False,
                    legendgroup=loss, name=f"{name} ± std", meta={"loss": loss, "kind": "band"},
                    row=row, col=col)


def learning_curves(histories, *, terms=None, metric: str = "test_acc", band: bool = True, cols: int = 3,
                    title: str = "Learning curves: mean ± std over seeds, per loss"):
    """Learning curves per loss: ``metric`` per epoch, then each named loss term per epoch.

    One panel for ``metric`` (default: test accuracy) and one per term (``ce``, ``kl``,
    ``soft_ce``, ``wmse``, ``tckd``, ``nckd``: :data:`TRAINING_TERMS`, or ``terms``) that at least
    one loss logged. Each loss draws its per-epoch mean over seeds as a line (hover: mean ± std, n)
    and, with ``band``, a mean ± std band (sample std, ddof = 1). The term values are the epoch
    means the trainer logged, before the KD warm-up factor. One legend entry per loss toggles it in
    every panel.

    Args:
        histories: ``GridResult.histories`` or a long DataFrame (see :func:`histories_frame`).
        terms: term columns to draw (default: those of :data:`TRAINING_TERMS` present).
        metric: a history column for the first panel ("test_acc", "train_acc", or "loss" for the
            total training loss, ``total_loss`` in :func:`histories_frame`).

    Trace ``meta`` holds {"loss", "panel", "kind": "mean" | "band"} so tests and callers can find
    a curve. Notebook: 03_knowledge_distillation.
    """
    import math

    long = histories_frame(histories)
    metric = "total_loss" if metric == "loss" else metric  # (the loss function's name is the "loss" column here)
    if metric not in long.columns:
        raise ValueError(f"metric {metric!r} is not a history column; have {sorted(long.columns)}")
    if terms is None:
        terms = [t for t in TRAINING_TERMS if t in long.columns and long[t].notna().any()]
    else:
        terms = list(terms)
        unknown = [t for t in terms if t not in long.columns]
        if unknown:
            raise ValueError(f"terms {unknown} are not history columns; have {sorted(long.columns)}")
    panels = [metric] + terms
    cols = check_int("cols", cols, 1)
    rows = math.ceil(len(panels) / cols)
    zoom = _late_range(long, metric) if metric.endswith("_acc") else None
    first_title = _METRIC_LABELS.get(metric, metric)
    if zoom is not None:
        first_title += f"<br><sup>y zoomed on epochs ≥ {zoom[2]} (double-click: all)</sup>"
    names = [first_title] + [f"{TERM_LABELS.get(t, t)} term" for t in terms]
    fig = make_subplots(rows=rows, cols=min(cols, len(panels)), subplot_titles=names,
                        horizontal_spacing=0.07, vertical_spacing=0.14 if rows > 1 else 0.1)
    losses = list(dict.fromkeys(long["loss"]))
    for i, panel in enumerate(panels):
        row, col = i // cols + 1, i % cols + 1
        for loss in losses:
            part = long[(long["loss"] == loss) & long[panel].notna()]
            if part.empty:
                continue
            stats = _mean_std(part, panel)
            if band:
                _band(fig, stats, loss=loss, name=label(loss), row=row, col=col)
            fig.add_scatter(x=stats["epoch"].tolist(), y=stats["mean"].tolist(), mode="lines",
                            name=label(loss), legendgroup=loss, showlegend=(i == 0),
                            line=dict(color=color(loss), width=2, dash=_dash(loss)),
                            customdata=list(zip(stats["std"].tolist(), stats["count"].tolist())),
                            hovertemplate=(f"{label(loss)} · epoch %{{x}}: %{{y:.4g}} ± %{{customdata[0]:.2g}}"
                                           " (n=%{customdata[1]})<extra></extra>"),
                            meta={"loss": loss, "panel": panel, "kind": "mean"}, row=row, col=col)
        fig.update_xaxes(title_text="epoch", row=row, col=col)
    if zoom is not None:
        fig.update_yaxes(range=list(zoom[:2]), row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=300 * rows + 80, legend_title="loss")
    return fig


def _late_range(long, metric):
    """(low, high, from_epoch) of an accuracy panel's y-axis: the per-loss mean curves from the second
    quarter of the epochs on, with a margin; None for fewer than 4 epochs. The first epochs' low
    accuracies would otherwise squeeze the late epochs, where the losses differ by tenths of a point,
    into one line."""
    epochs = long["epoch"].max()
    if not epochs or epochs < 4:
        return None
    start = int(epochs // 4) + 1
    late = long[long["epoch"] >= start].groupby(["loss", "epoch"])[metric].mean()
    if late.empty or late.isna().all():
        return None
    low, high = float(late.min()), float(late.max())
    pad = max(0.1 * (high - low), 0.5)
    return low - pad, high + pad, start


def final_accuracy_chart(runs, *, teacher_acc: Optional[float] = None, order=None,
                         title: Optional[str] = None, figsize=(11, 4.2)):
    """Final test accuracy per loss, best epoch and last epoch side by side (seaborn).

    Two panels sharing the y axis; in each, one point per loss at the mean over seeds with an
    error bar of ± one sample std (ddof = 1, the std of :func:`dkl_lib.experiments.summarize`),
    and every seed's own value as a small dot, so nothing hides behind the error bar. A dashed
    line marks ``teacher_acc``.

    Args:
        runs: ``GridResult.runs`` (columns loss, seed, best_acc, last_acc).
        teacher_acc: the teacher's test accuracy (percent), or None.
        order: losses in display order (default: as they appear in ``runs``).

    Returns:
        a ``matplotlib.figure.Figure``. It is closed in pyplot before it is returned, so a notebook
        shows it exactly once, when the cell's value is the figure (or with ``display(fig)``);
        ``fig.savefig(...)`` works as usual. Notebook: 03_knowledge_distillation.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    missing = {"loss", "seed", "best_acc", "last_acc"} - set(runs.columns)
    if missing:
        raise ValueError(f"runs needs the columns loss, seed, best_acc, last_acc; missing {sorted(missing)}")
    order = list(order) if order is not None else list(dict.fromkeys(runs["loss"]))
    long = runs.melt(id_vars=["loss", "seed"], value_vars=["best_acc", "last_acc"], var_name="epoch",
                     value_name="accuracy")
    long["name"] = long["loss"].map(label)
    names = [label(loss) for loss in order]
    palette = {label(loss): color(loss) for loss in order}
    fig, axes = plt.subplots(1, 2, figsize=figsize, sharey=True)
    for ax, (column, heading) in zip(axes, (("best_acc", "best epoch"), ("last_acc", "last epoch"))):
        part = long[long["epoch"] == column]
        sns.stripplot(data=part, x="name", y="accuracy", hue="name", order=names, hue_order=names,
                      palette=palette, size=4, alpha=0.45, jitter=0.12, legend=False, ax=ax, zorder=1)
        sns.pointplot(data=part, x="name", y="accuracy", hue="name", order=names, hue_order=names,
                      palette=palette, errorbar="sd", capsize=0.25, linestyle="none", markers="D",
                      legend=False, ax=ax)
        if teacher_acc is not None:
            ax.axhline(teacher_acc, color="black", linestyle="--", linewidth=1)
            ax.annotate(f"teacher {teacher_acc:.2f}", (1.0, teacher_acc), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=9)
        n = part.groupby("loss")["seed"].nunique()
        seeds = str(int(n.min())) if n.min() == n.max() else f"{int(n.min())}–{int(n.max())}"
        ax.set_title(f"{heading} (mean ± std, n = {seeds} seeds)")
        ax.set_xlabel("")
        ax.set_ylabel("test accuracy (%)")
        ax.tick_params(axis="x", labelrotation=30)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    plt.close(fig)  # not left open in pyplot: shown once, as the returned value
    return fig


def _prior_array(priors):
    import numpy as np

    if isinstance(priors, (list, tuple)):
        priors = [p.detach().cpu().numpy() if hasattr(p, "detach") else np.asarray(p) for p in priors]
        arr = np.stack(priors) if priors else np.zeros((0,))
    elif hasattr(priors, "detach"):
        arr = priors.detach().cpu().numpy()
    else:
        arr = np.asarray(priors)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2] or arr.shape[0] < 1:
        raise ValueError(f"priors must have shape (snapshots, C, C), got {tuple(arr.shape)}")
    arr = arr.astype(float)
    if not np.isfinite(arr).all():  # plotly would draw the snapshot blank, without a word
        bad = sorted(set(np.nonzero(~np.isfinite(arr))[0].tolist()))[:5]
        raise ValueError(f"priors contain non-finite values (nan or inf) in snapshots {bad}")
    return arr


def prior_heatmap(priors, *, epochs=None, layout: str = "slider", diagonal: bool = True, class_names=None,
                  cols: int = 4, title: str = "Class prior (GI): row y = mean teacher distribution over class y"):
    """The class prior of :class:`dkl_lib.prior.ClassPrior` over epochs, as a heatmap.

    ``priors`` is ``ClassPrior.history`` / ``history_tensor()`` or ``GridResult.priors[key]``:
    snapshot e (0-based) is the prior after e epochs, i.e. the one used during epoch e + 1
    (snapshot 0 is the uniform start).

    Args:
        epochs: the snapshots to show (default: all for the slider, about six for the grid).
        layout: "slider" (one heatmap, a slider / play button over the snapshots, plotly frames;
            the figure opens on the last snapshot) or "grid" (small multiples, one per snapshot).
        diagonal: False blanks the diagonal (each class's own probability) so the colour scale
            spreads over the off-diagonal entries: which classes the teacher confuses.
        class_names: tick labels (default 0..C-1).

    One colour scale for every snapshot (0 to the largest value shown), so colours compare across
    epochs. Notebook: 03_knowledge_distillation.
    """
    import numpy as np

    arr = _prior_array(priors)
    count, classes = arr.shape[0], arr.shape[1]
    if layout not in ("slider", "grid"):
        raise ValueError(f"layout must be 'slider' or 'grid', got {layout!r}")
    if epochs is None:
        epochs = list(range(count)) if layout == "slider" else \
            sorted(set(np.linspace(0, count - 1, min(count, 6)).round().astype(int).tolist()))
    epochs = [int(e) for e in epochs]
    if not epochs or any(e < 0 or e >= count for e in epochs):
        raise ValueError(f"epochs must lie in [0, {count - 1}], got {epochs}")
    if not diagonal:
        arr = arr.copy()
        arr[:, np.arange(classes), np.arange(classes)] = np.nan
    names = [str(c) for c in (class_names if class_names is not None else range(classes))]
    if len(names) != classes:
        raise ValueError(f"class_names must give one name per class ({classes}), got {len(names)}")
    zmax = float(np.nanmax(arr[epochs])) if np.isfinite(arr[epochs]).any() else 1.0
    scale = dict(colorscale="Viridis", zmin=0.0, zmax=zmax)

    def heat(e, **kw):
        z = [[None if np.isnan(v) else float(v) for v in row] for row in arr[e]]
        return go.Heatmap(z=z, x=names, y=names, hovertemplate="true class %{y} → class %{x}: %{z:.3f}"
                          "<extra>after " + str(e) + " epochs</extra>", **kw)

    def caption(e):
        return f"after {e} epoch{'s' if e != 1 else ''}" + (" (uniform start)" if e == 0 else "")

    if layout == "grid":
        cols = check_int("cols", cols, 1)
        rows = -(-len(epochs) // cols)
        fig = make_subplots(rows=rows, cols=min(cols, len(epochs)), subplot_titles=[caption(e) for e in epochs],
                            horizontal_spacing=0.04, vertical_spacing=0.12)
        for i, e in enumerate(epochs):
            fig.add_trace(heat(e, coloraxis="coloraxis"), row=i // cols + 1, col=i % cols + 1)
        fig.update_layout(coloraxis=dict(colorscale="Viridis", cmin=0.0, cmax=zmax, colorbar=dict(title="p")))
        fig.update_yaxes(autorange="reversed", dtick=1)
        fig.update_xaxes(dtick=1)
        for r in range(1, rows + 1):  # the slider layout's axis titles: true class on y, class k on x
            fig.update_yaxes(title_text="true class y", row=r, col=1)
        for i in range(len(epochs)):
            if i + cols >= len(epochs):  # the lowest panel of each column
                fig.update_xaxes(title_text="class k", row=i // cols + 1, col=i % cols + 1)
        fig.update_layout(title=title, template="plotly_white", height=300 * rows + 60)
        return fig

    last = epochs[-1]
    fig = go.Figure(heat(last, colorbar=dict(title="p"), **scale))
    fig.frames = [go.Frame(data=[heat(e, **scale)], name=str(e)) for e in epochs]
    steps = [dict(method="animate", label=str(e),
                  args=[[str(e)], dict(mode="immediate", frame=dict(duration=0, redraw=True),
                                       transition=dict(duration=0))]) for e in epochs]
    fig.update_layout(
        title=title, template="plotly_white", height=520, width=620,
        xaxis=dict(title="class k", dtick=1), yaxis=dict(title="true class y", autorange="reversed", dtick=1),
        sliders=[dict(active=len(epochs) - 1, steps=steps, currentvalue=dict(prefix="epochs finished: "),
                      x=0.1, len=0.9, pad=dict(t=50))],
        updatemenus=[dict(type="buttons", showactive=False, x=0.0, y=0.0, xanchor="left", yanchor="top",
                          pad=dict(t=75),
                          buttons=[dict(label="▶", method="animate",
                                        args=[None, dict(frame=dict(duration=400, redraw=True),
                                                         fromcurrent=False, transition=dict(duration=0))])])],
    )
    return fig


def paper_comparison(summary, *, config: Optional[dict] = None, teacher_acc: Optional[float] = None,
                     paper=None, dataset: Optional[str] = None, teacher: Optional[str] = None,
                     student: Optional[str] = None):
    """Our mean ± std beside the paper's number, one row each, with a ``who`` column.

    For every method (teacher, each loss of ``summary``), the row ``who = "ours (measured here)"``
    holds our best-epoch and last-epoch mean ± std over seeds on OUR data and models (named in
    the ``data`` and ``teacher → student`` columns), and the row ``who = "paper (published)"``
    the published top-1 for ``dataset`` / ``teacher`` → ``student`` with its source: by default the
    pair of ``config`` where the paper reports it (CIFAR-100 resnet32x4 → resnet8x4, ImageNet
    ResNet34 → ResNet18 or ResNet50 → MobileNet), else its headline pair, CIFAR-100 resnet32x4 →
    resnet8x4. Methods the paper does not report (DKL, GKL, IKL without GI) have no paper row. The
    two rows of a method are adjacent; their numbers are NOT comparable when the data differ
    (digits vs CIFAR-100).

    Args:
        summary: ``GridResult.summary`` (loss, n, best_acc_mean/std, last_acc_mean/std).
        config: ``GridResult.config`` (names our data, models and preset).
        teacher_acc: our teacher's test accuracy (``GridResult.teacher["acc"]``, its final weights).
        paper: :func:`dkl_lib.experiments.paper_results` (default: loaded from data/).

    Returns:
        a DataFrame with columns method, who, data, teacher → student, "top-1 (%)" (ours: the
        best-epoch test accuracy, mean ± std over seeds; the paper's: the published figure),
        "last epoch (%)" (ours only), seeds, source. Notebook: 03_knowledge_distillation.
    """
    import math

    import pandas as pd

    if paper is None:
        from .experiments import paper_results

        paper = paper_results()
    from .experiments import paper_pair

    pair = (paper_pair(config) if config else None) or ("CIFAR-100", "resnet32x4", "resnet8x4")
    dataset, teacher, student = (given or default for given, default in zip((dataset, teacher, student), pair))
    sel = paper[(paper["dataset"] == dataset) & (paper["teacher"] == teacher) & (paper["student"] == student)]
    config = config or {}
    data_name = (config.get("data") or {}).get("name", "?")
    n_train = (config.get("data") or {}).get("n_train")
    ours_data = data_name + (f" ({n_train} train images)" if n_train else "")
    ours_pair = f"{(config.get('teacher') or {}).get('model', '?')} → {(config.get('student') or {}).get('model', '?')}"
    ours_source = f"measured with dkl_lib, preset {config.get('preset', '?')!r}"
    paper_pair = f"{teacher} → {student}"

    def fmt(mean, std, n):
        if mean is None or (isinstance(mean, float) and math.isnan(mean)):
            return "—"
        return f"{mean:.2f}" if n < 2 or std is None or math.isnan(std) else f"{mean:.2f} ± {std:.2f}"

    def paper_row(method, key):
        hit = sel[sel["method"] == "teacher"] if key == "teacher" else sel[sel["loss"] == key]
        if hit.empty:
            return None
        r = hit.iloc[0]
        return {"method": method, "who": "paper (published)", "data": dataset, "teacher → student": paper_pair,
                "top-1 (%)": f"{float(r['top1']):.2f}", "last epoch (%)": "—", "seeds": "—",
                "source": f"{r['source']} (paper's name: {r['method']})"}

    rows = []
    if teacher_acc is not None:
        rows.append({"method": "teacher", "who": "ours (measured here)", "data": ours_data,
                     "teacher → student": ours_pair, "top-1 (%)": f"{teacher_acc:.2f}",
                     "last epoch (%)": f"{teacher_acc:.2f}", "seeds": 1,
                     "source": ours_source + " (the teacher's final weights, which the students learn from)"})
    row = paper_row("teacher", "teacher")
    if row:
        rows.append(row)
    for _, s in summary.iterrows():
        loss = s["loss"]
        n = int(s["n"])
        rows.append({"method": label(loss), "who": "ours (measured here)", "data": ours_data,
                     "teacher → student": ours_pair,
                     "top-1 (%)": fmt(s["best_acc_mean"], s["best_acc_std"], n),
                     "last epoch (%)": fmt(s["last_acc_mean"], s["last_acc_std"], n),
                     "seeds": n, "source": ours_source})
        paper_key = loss[:-len("-gi")] if loss.endswith("-gi") else loss  # (the paper's IKL has GI)
        row = paper_row(label(loss), paper_key) if "-" not in paper_key else None
        if row:
            rows.append(row)
    return pd.DataFrame(rows, columns=["method", "who", "data", "teacher → student", "top-1 (%)",
                                       "last epoch (%)", "seeds", "source"])


# ============================================================== notebook 04: adversarial training
#: Legend names of the adversarial-training runs (the loss keys of dkl_lib.train.ADV_LOSSES).
ADV_LOSS_LABELS = {"ce": "natural training (CE)", "trades": "TRADES (KL)", "ikl": "IKL-AT"}
#: Colours of the sanity-check outcomes: Okabe & Ito's bluish green and amber, a true red for FAIL (Okabe &
#: Ito's vermillion was too close to the amber under deuteranopia) and light grey for a check that did not run.
CHECK_STATUS_COLORS = {"pass": "#009e73", "warn": "#e69f00", "fail": "#c00000", "not run": "#cccccc"}
_ADV_METRICS = {"test_acc": "clean accuracy (%)", "test_robust_acc": "robust accuracy, PGD (%)",
                "train_acc": "train accuracy, clean (%)", "train_adv_acc": "train accuracy, adversarial (%)"}
__all__ += ["ADV_LOSS_LABELS", "CHECK_STATUS_COLORS", "adv_label", "adversarial_examples", "adversarial_curves",
            "robustness_vs_epsilon", "sanity_check_table", "adversarial_comparison_bars"]


def adv_label(loss: str) -> str:
    """Legend name of an adversarial-training loss ("IKL-AT", "TRADES (KL)", ...)."""
    return ADV_LOSS_LABELS.get(loss, label(loss))


def adversarial_examples(x, x_adv, y, pred_clean, pred_adv, *, n: int = 8, epsilon: Optional[float] = None,
                         title: str = "Adversarial examples: clean image, perturbation, adversarial image"):
    """A 3 × n grid of grey images: clean inputs (top), the perturbation x′ − x (middle, on a
    diverging scale of ±ε) and the adversarial inputs (bottom); column titles give the label and
    the predictions, e.g. "y=3: 3 → 8".

    Args:
        x, x_adv: (N, 1, H, W) or (N, H, W) tensors / arrays in [0, 1]; y, pred_clean, pred_adv:
            (N,) class indices. The first ``n`` samples are drawn.
        epsilon: the colour range of the perturbation row (default: its largest magnitude).
    """
    import numpy as np

    n = check_int("n", n, 1)
    if epsilon is not None and (isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real)
                                or not math.isfinite(epsilon) or epsilon < 0):
        raise ValueError(f"epsilon must be a finite number >= 0 or None, got {epsilon!r}")

    def arr(name, a):
        a = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
        if a.ndim == 4 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != 3 or a.shape[0] == 0:
            raise ValueError(f"{name} must hold grey images of shape (N, 1, H, W) or (N, H, W) with N >= 1, "
                             f"got shape {a.shape}")
        return a

    x, x_adv = arr("x", x), arr("x_adv", x_adv)
    if x.shape != x_adv.shape:
        raise ValueError(f"x and x_adv must have the same shape, got {x.shape} and {x_adv.shape}")
    labels = {}
    for name, v in (("y", y), ("pred_clean", pred_clean), ("pred_adv", pred_adv)):
        labels[name] = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v).reshape(-1)
        if labels[name].shape[0] != x.shape[0]:
            raise ValueError(f"{name} must hold one class per image ({x.shape[0]}), got {labels[name].shape[0]}")
    x, x_adv = x[:n], x_adv[:n]
    y, pc, pa = (labels[k][:n] for k in ("y", "pred_clean", "pred_adv"))
    n = x.shape[0]
    delta = x_adv - x
    scale = float(epsilon) if epsilon else float(np.abs(delta).max() or 1.0)
    titles = [f"y={int(t)}: {int(a)} → {int(b)}" for t, a, b in zip(y, pc, pa)]
    fig = make_subplots(rows=3, cols=n, subplot_titles=titles + [""] * (2 * n),
                        horizontal_spacing=0.01, vertical_spacing=0.04)
    for j in range(n):
        for row, img, kw in ((1, x[j], dict(zmin=0, zmax=1, colorscale="gray_r")),
                             (2, delta[j], dict(zmin=-scale, zmax=scale, colorscale="RdBu")),
                             (3, x_adv[j], dict(zmin=0, zmax=1, colorscale="gray_r"))):
            fig.add_heatmap(z=img[::-1], showscale=(j == n - 1 and row == 2), row=row, col=j + 1,
                            colorbar=dict(title="x′ − x", len=0.3, y=0.5), hovertemplate="%{z:.3f}<extra></extra>",
                            **kw)
    fig.update_xaxes(visible=False, constrain="domain")
    for row in range(1, 4):
        for col in range(1, n + 1):
            k = (row - 1) * n + col  # each image is square against ITS OWN x axis (not the first panel's)
            fig.update_yaxes(visible=False, scaleanchor=f"x{k if k > 1 else ''}", constrain="domain",
                             row=row, col=col)
    for row, name in ((1, "clean"), (2, "perturbation"), (3, "adversarial")):
        fig.update_yaxes(visible=True, showticklabels=False, showgrid=False, zeroline=False, title_text=name,
                         row=row, col=1)
    fig.update_layout(title=title, height=380, margin=dict(t=80, l=60, r=20, b=10), template="plotly_white")
    fig.update_annotations(font_size=11)
    return fig


def adversarial_curves(histories, *, metrics=("test_acc", "test_robust_acc"), band: bool = True,
                       title: str = "Clean and robust accuracy per epoch: mean ± std over seeds"):
    """One panel per metric (default: clean test accuracy and the per-epoch PGD robust accuracy),
    one line per loss (mean over seeds) with a ± std band.

    ``histories``: ``AdvGridResult.histories`` ({(loss, seed): per-epoch DataFrame}) or a long
    DataFrame with loss, seed, epoch and the metric columns.
    """
    long = histories_frame(histories)
    metrics = [m for m in metrics if m in long.columns]
    if not metrics:
        raise ValueError(f"none of the metrics is in the histories; columns: {sorted(long.columns)}")
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[_ADV_METRICS.get(m, m) for m in metrics])
    for col, metric in enumerate(metrics, start=1):
        for loss in dict.fromkeys(long["loss"]):
            part = long[long["loss"] == loss]
            stats = part.groupby("epoch")[metric].agg(["mean", "std"]).reset_index()
            stats["std"] = stats["std"].fillna(0.0)
            if band and part["seed"].nunique() > 1:
                _band(fig, stats, loss=loss, name=adv_label(loss), row=1, col=col)
            fig.add_scatter(x=stats["epoch"], y=stats["mean"], mode="lines+markers", name=adv_label(loss),
                            line=dict(color=color(loss)), legendgroup=loss, showlegend=(col == 1),
                            meta={"loss": loss, "metric": metric, "kind": "mean"}, row=1, col=col)
        fig.update_xaxes(title_text="epoch", row=1, col=col)
        fig.update_yaxes(title_text="%", row=1, col=col)
    fig.update_layout(title=title, height=380, hovermode="x unified", template="plotly_white")
    return fig


def robustness_vs_epsilon(frame, *, train_epsilon: Optional[float] = None,
                          title: str = "Robust accuracy (PGD) against the attack radius ε"):
    """Accuracy against ε, one line per loss: mean over seeds with ± std error bars.

    ``frame``: a DataFrame with columns loss, seed, epsilon, accuracy (e.g. the rows of
    :func:`dkl_lib.attacks.accuracy_vs_epsilon` for each model, tagged with loss and seed); a
    dashed line marks the training ε.
    """
    missing = {"loss", "epsilon", "accuracy"} - set(frame.columns)
    if missing:
        raise ValueError(f"frame needs the columns loss, epsilon, accuracy; missing {sorted(missing)}")
    fig = go.Figure()
    for loss in dict.fromkeys(frame["loss"]):
        stats = frame[frame["loss"] == loss].groupby("epsilon")["accuracy"].agg(["mean", "std"]).reset_index()
        fig.add_scatter(x=stats["epsilon"], y=stats["mean"], mode="lines+markers", name=adv_label(loss),
                        line=dict(color=color(loss)), meta={"loss": loss},
                        error_y=dict(type="data", array=stats["std"].fillna(0.0), visible=True))
    if train_epsilon is not None:
        fig.add_vline(x=train_epsilon, line_dash="dash", line_color="#555555",
                      annotation_text=f"training ε = {train_epsilon:g}", annotation_position="top right")
    fig.update_layout(title=title, xaxis_title="ε (L∞, images in [0, 1])", yaxis_title="accuracy (%)",
                      yaxis_range=[0, 101], height=380, template="plotly_white")
    return fig


def sanity_check_table(checks, *, title: str = "Sanity checks of every evaluation"):
    """A coloured grid: one row per run (loss, seed), one column per check, cell = its status
    (PASS, WARN, FAIL, or "not run" for a check that run did not do); hovering shows the check's
    detail. A key to the colours is added under ``title``.

    ``checks``: ``AdvGridResult.checks`` (loss, seed, check, status, detail) or the rows of one
    ``RobustnessReport.checks_frame()`` (then one row, named "model").
    """
    import pandas as pd

    checks = pd.DataFrame(checks).copy()
    if "loss" not in checks:
        checks["loss"], checks["seed"] = "model", ""
    checks["run"] = [f"{adv_label(l)} · seed {s}" if s != "" else str(l) for l, s in zip(checks["loss"], checks["seed"])]
    runs = list(dict.fromkeys(checks["run"]))
    names = list(dict.fromkeys(checks["check"]))
    code = {"pass": 0, "warn": 1, "fail": 2}
    not_run = 3
    z, text, hover = [], [], []
    for run in runs:
        part = checks[checks["run"] == run].set_index("check")
        z.append([code.get(part.loc[c, "status"], 2) if c in part.index else not_run for c in names])
        text.append([part.loc[c, "status"].upper() if c in part.index else "not run" for c in names])
        hover.append([str(part.loc[c, "detail"]) if c in part.index else "this evaluation did not run this check"
                      for c in names])
    # four flat bands over z = 0..3: pass, warn, fail, not run
    scale = []
    for k, status in enumerate(("pass", "warn", "fail", "not run")):
        scale += [[k / 4, CHECK_STATUS_COLORS[status]], [(k + 1) / 4, CHECK_STATUS_COLORS[status]]]
    fig = go.Figure(go.Heatmap(z=z, x=names, y=runs, text=text, texttemplate="%{text}", customdata=hover,
                               hovertemplate="%{y}<br>%{x}: %{text}<br>%{customdata}<extra></extra>",
                               colorscale=scale, zmin=-0.5, zmax=3.5, showscale=False, xgap=2, ygap=2))
    key = "green: PASS · amber: WARN (a flag) · red: FAIL · grey: not run"
    # ~28 px per row on top of the title and the rotated check names, and every row's name as a tick
    # (plotly drops category labels that it finds crowded, leaving rows unnamed)
    fig.update_layout(title=f"{title}<br><sup>{key}</sup>", height=250 + 28 * len(runs),
                      yaxis_autorange="reversed", yaxis=dict(tickmode="array", tickvals=runs, ticktext=runs),
                      xaxis_tickangle=-30, margin=dict(l=160, t=90), template="plotly_white")
    return fig


def _wrap_tick(text: str, width: int = 16, longest: int = 24) -> str:
    """``text`` for a horizontal category label: one longer than ``width`` characters is broken before
    each parenthesis ("paper<br>(published)"), and a piece still longer than ``longest`` at spaces."""
    import re
    import textwrap

    text = str(text)
    if len(text) <= width:
        return text
    lines = []
    for piece in re.split(r" (?=\()", text):
        lines += textwrap.wrap(piece, longest) or [piece]
    return "<br>".join(lines)


def adversarial_comparison_bars(table, *, title: str = "Ours (measured here) beside published numbers"):
    """Grouped bars of clean and robust accuracy, one bar group per row of ``table``
    (:meth:`dkl_lib.experiments.AdvGridResult.comparison`): our runs solid, published numbers
    hatched, each labelled with its method, who measured it (``who``) and its data, so that they are
    never mistaken for each other. A row whose ``who`` does not start with "ours" is a published one.

    Bar colour is the method's; robust bars are lighter. Our bars carry ± std error bars; the
    published numbers have no spread, so their bars have none (not a zero-length one). Every bar's
    value is written inside it, at its foot, where no error bar reaches. The category labels are
    wrapped (``<br>``) and stay horizontal, so that neighbours do not run into each other. The
    legend's grey keys say which bar is clean and which robust. Traces: per metric, ours then the
    published ones (``meta`` {"metric", "who": "ours" / "paper"}), then the two legend keys (``meta``
    {"kind": "key"}).
    """
    import math

    rows = [r for _, r in table.iterrows()]
    x_all = ["<br>".join(_wrap_tick(r[k]) for k in ("method", "who", "data")) for r in rows]
    fig = go.Figure()
    for metric in ("clean", "robust"):
        opacity = 1.0 if metric == "clean" else 0.6
        for who, paper in (("ours", False), ("paper", True)):
            part = [(x, r) for x, r in zip(x_all, rows) if (not str(r["who"]).startswith("ours")) == paper]
            if not part:
                continue
            y = [r[f"{metric} (%)"] for _, r in part]
            err = [r.get(f"{metric} std", 0.0) for _, r in part]
            err = [0.0 if e is None or (isinstance(e, float) and math.isnan(e)) else float(e) for e in err]
            fig.add_bar(x=[x for x, _ in part], y=y, name=f"{metric} ({who})", showlegend=False,
                        marker=dict(color=[color(r["loss"]) for _, r in part], opacity=opacity,
                                    pattern=dict(shape="/" if paper else "", solidity=0.2)),
                        error_y=dict(type="data", array=err, visible=not paper), offsetgroup=metric,
                        text=[f"{v:.1f}" for v in y], textposition="inside", insidetextanchor="start",
                        textangle=0, cliponaxis=False,
                        # white on a solid dark bar, black on a lighter or hatched one
                        insidetextfont=dict(color="white" if metric == "clean" and not paper else "black", size=12),
                        hovertext=[f"{metric}; attack: {r['attack']}" for _, r in part],
                        meta={"metric": metric, "who": who})
    for metric, opacity in (("clean", 1.0), ("robust", 0.6)):  # legend keys in neutral grey
        fig.add_scatter(x=[None], y=[None], mode="markers", name=f"{metric} accuracy",
                        marker=dict(symbol="square", size=12, color="#555555", opacity=opacity),
                        meta={"kind": "key", "metric": metric})
    key = "colour: method · lighter: robust · hatched: a published number · hover: the attack"
    fig.update_layout(title=f"{title}<br><sup>{key}</sup>", barmode="group", yaxis_title="accuracy (%)",
                      yaxis_range=[0, 105], height=560, template="plotly_white", margin=dict(t=110),
                      xaxis=dict(categoryorder="array", categoryarray=x_all, tickangle=0, tickfont=dict(size=11)),
                      legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"))
    return fig
