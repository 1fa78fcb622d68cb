"""ipywidgets dashboards over :mod:`dkl_lib.grads` and :mod:`dkl_lib.plots`.

Each dashboard is a :class:`Dashboard`: an ipywidgets container (``.widget``), the plotly
``FigureWidget`` it updates in place (``.figure``) and its controls by name (``.controls``).
Every callback is a plain named function of values, ``<name>_update(figure, values)``, that the
observers call with ``{control name: value}``; a test can set a control's ``.value`` (or call the
function directly) and look at ``.figure.data``. Displaying a Dashboard in a notebook shows its
widget. Notebook 02 uses these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import ipywidgets as W
import torch

from . import grads, plots

__all__ = [
    "Dashboard",
    "gradient_bars_dashboard",
    "gradient_bars_update",
    "simplex_dashboard",
    "simplex_update",
    "weights_dashboard",
    "weights_update",
]


@dataclass
class Dashboard:
    widget: W.Widget
    figure: object
    controls: Dict[str, W.ValueWidget]
    update: Callable[[object, dict], None]
    state: dict = field(default_factory=dict)

    def values(self) -> dict:
        return {name: c.value for name, c in self.controls.items()}

    def refresh(self, _change=None) -> None:
        """Recompute the figure from the controls' current values."""
        self.update(self.figure, self.values(), **self.state)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def _slider(description, value, low, high, step=0.1, **kw):
    return W.FloatSlider(value=value, min=low, max=high, step=step, description=description,
                         continuous_update=False, readout_format=".2f", layout=W.Layout(width="290px"),
                         style={"description_width": "105px"}, **kw)


def _columns(*columns) -> W.HBox:
    """Columns of controls side by side, wrapping onto the next line when the notebook is narrow."""
    return W.HBox([W.VBox(list(c)) for c in columns], layout=W.Layout(flex_flow="row wrap"))


def _wire(dash: Dashboard) -> Dashboard:
    for control in dash.controls.values():
        control.observe(dash.refresh, names="value")
    return dash


# ------------------------------------------------------------------------- per-class gradient bars
def _logit_vectors(values: dict):
    teacher = [values[k] for k in sorted(k for k in values if k.startswith("teacher_"))]
    student = [values[k] for k in sorted(k for k in values if k.startswith("student_"))]
    return teacher, student


def gradient_bars_data(values: dict):
    """The DataFrame behind the bars for the given control values (see ``student_gradients``)."""
    teacher, student = _logit_vectors(values)
    return grads.student_gradients(teacher, student, loss_names=("dkl", "ikl", "gkl"),
                                   temperature=values["temperature"], alpha=values["alpha"],
                                   beta=values["beta"], weight_temperature=values["weight_temperature"],
                                   gamma=values["gamma"])


def gradient_bars_update(figure, values: dict) -> None:
    """Callback: recompute the per-class gradient bars from ``values`` and update ``figure``."""
    plots.update_gradient_bars(figure, gradient_bars_data(values))


def gradient_bars_dashboard(teacher_logits: Sequence[float] = (3.0, 1.0, 0.0, -1.0),
                            student_logits: Sequence[float] = (0.0, 1.5, 0.5, 0.0)) -> Dashboard:
    """Sliders for the teacher's and student's logits, T, α, β, T_w and γ; grouped bars per class.

    Shows DKL (= KL's gradient: its wMSE bars are exactly zero because the teacher is frozen), IKL
    and GKL, each split into its wMSE and soft-label CE terms.
    """
    if len(teacher_logits) != len(student_logits) or not 2 <= len(teacher_logits) <= 8:
        raise ValueError("teacher_logits and student_logits need the same length, between 2 and 8")
    controls = {}
    for j, v in enumerate(teacher_logits):
        controls[f"teacher_{j}"] = _slider(f"teacher o_m[{j}]", v, -6, 6)
    for j, v in enumerate(student_logits):
        controls[f"student_{j}"] = _slider(f"student o_n[{j}]", v, -6, 6)
    controls.update(temperature=_slider("T", 2.0, 0.5, 10, 0.5), alpha=_slider("α (wMSE)", 1.0, 0, 4),
                    beta=_slider("β (CE)", 1.0, 0, 4), weight_temperature=_slider("T_w (IKL/GKL)", 2.0, 0.5, 10, 0.5),
                    gamma=_slider("γ (GKL)", 1.0, 0.25, 3, 0.05))
    values = {k: c.value for k, c in controls.items()}
    figure = plots.gradient_bars(gradient_bars_data(values), widget=True)
    n = len(teacher_logits)
    names = list(controls)
    panel = _columns([W.HTML("<b>teacher logits</b>")] + [controls[k] for k in names[:n]],
                     [W.HTML("<b>student logits</b>")] + [controls[k] for k in names[n:2 * n]],
                     [W.HTML("<b>hyper-parameters</b>")] + [controls[k] for k in names[2 * n:]])
    return _wire(Dashboard(W.VBox([panel, figure]), figure, controls, gradient_bars_update))


# ------------------------------------------------------------------------- simplex field (C = 3)
def _teacher_probs(values):
    logits = torch.tensor([values["teacher_0"], values["teacher_1"], values["teacher_2"]], dtype=torch.float64)
    return torch.softmax(logits, dim=0)


def simplex_data(values: dict):
    probs = _teacher_probs(values)
    df = grads.simplex_field(probs, loss=values["loss"], temperature=values["temperature"],
                             alpha=values["alpha"], beta=values["beta"], resolution=values.get("resolution", 10))
    return df, grads.simplex_xy(probs[None, :])[0].tolist()


def simplex_update(figure, values: dict) -> None:
    """Callback: recompute the arrows on the simplex for ``values`` and update ``figure``."""
    df, teacher_xy = simplex_data(values)
    plots.update_simplex_quiver(figure, df, teacher_xy=teacher_xy)


def simplex_dashboard(loss: str = "ikl", resolution: int = 10) -> Dashboard:
    """Teacher logits (3 classes), T, α, β: where one gradient step moves the student, per term.

    The teacher's distribution is softmax of its logits (the star). ``loss`` is fixed per dashboard
    because the panels (terms) differ between losses.
    """
    if loss not in ("dkl", "ikl", "gkl", "kl"):
        raise ValueError(f"loss must be one of dkl, ikl, gkl, kl for the simplex view, got {loss!r}")
    controls = {f"teacher_{j}": _slider(f"teacher o_m[{j}]", v, -4, 4) for j, v in enumerate((1.5, 0.5, -0.5))}
    controls.update(temperature=_slider("T", 1.0, 0.5, 5, 0.25), alpha=_slider("α (wMSE)", 1.0, 0, 4),
                    beta=_slider("β (CE)", 1.0, 0, 4))
    values = {**{k: c.value for k, c in controls.items()}, "loss": loss, "resolution": resolution}
    df, teacher_xy = simplex_data(values)
    figure = plots.simplex_quiver(df, teacher_xy=teacher_xy, widget=True,
                                  title=f"{plots.label(loss)}: where a gradient step moves the student")

    def update(fig, vals, loss=loss, resolution=resolution):
        simplex_update(fig, {**vals, "loss": loss, "resolution": resolution})

    panel = _columns(list(controls.values())[:3], list(controls.values())[3:])
    return _wire(Dashboard(W.VBox([panel, figure]), figure, controls, update))


# ------------------------------------------------------------------------- weight heatmaps
def weights_update(figure, values: dict, *, target_logits, targets) -> None:
    """Callback: recompute the sample-wise and class-wise weights and update the heatmaps."""
    mats = grads.weight_matrices(target_logits, targets, weight_temperature=values["weight_temperature"],
                                 sample=int(values["sample"]))
    plots.update_weight_heatmaps(figure, mats)


def weights_dashboard(target_logits: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                      *, seed: int = 0) -> Dashboard:
    """Heatmaps of w = p pᵀ, sample-wise vs class-wise (GI), with sliders for T_w and the sample.

    Without arguments it uses a synthetic teacher batch (6 classes, 48 samples whose logits favour
    their class with noise), so the dashboard runs anywhere.
    """
    if target_logits is None:
        g = torch.Generator().manual_seed(seed)
        targets = torch.arange(48) % 6
        target_logits = torch.randn(48, 6, generator=g) * 1.5
        target_logits[torch.arange(48), targets] += 3.0
    if targets is None:
        raise ValueError("targets are needed with target_logits (the class of each row)")
    controls = {"weight_temperature": _slider("T_w", 2.0, 0.25, 10, 0.25),
                "sample": W.IntSlider(value=0, min=0, max=target_logits.shape[0] - 1, description="sample",
                                      continuous_update=False, layout=W.Layout(width="290px"),
                                      style={"description_width": "105px"})}
    mats = grads.weight_matrices(target_logits, targets, weight_temperature=2.0, sample=0)
    figure = plots.weight_heatmaps(mats, widget=True)
    state = {"target_logits": target_logits, "targets": targets}
    return _wire(Dashboard(W.VBox([W.HBox(list(controls.values())), figure]), figure, controls, weights_update,
                           state))
