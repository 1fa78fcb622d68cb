"""ipywidgets dashboards over :mod:`dkl_lib.grads` and :mod:`dkl_lib.plots`.

Each dashboard is a :class:`Dashboard`: an ipywidgets container (``.widget``), the plotly
``FigureWidget`` it updates in place (``.figure``) and its controls by name (``.controls``).
Every callback is a plain named function of values, ``<name>_update(figure, values)``, that the
observers call with ``{control name: value}``; a test can set a control's ``.value`` (or call the
function directly) and look at ``.figure.data``. Displaying a Dashboard in a notebook shows its
widget. Notebook 02 uses the gradient, simplex and weight dashboards; notebook 05 the training
dashboard (:func:`training_dashboard`, whose logic is :class:`TrainingSession`).
"""
from __future__ import annotations

import html

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import ipywidgets as W
import torch

from . import grads, plots, train
from ._checks import check_seed

__all__ = [
    "Dashboard",
    "gradient_bars_dashboard",
    "gradient_bars_update",
    "simplex_dashboard",
    "simplex_update",
    "weights_dashboard",
    "weights_update",
    "ROUNDING_FLOOR",
    "gradient_bars_data",
    "simplex_data",
    # the training dashboard (notebook 05)
    "LOSS_CONTROLS",
    "LOSS_HPARAMS",
    "enabled_controls",
    "loss_settings",
    "run_request",
    "TrainingSession",
    "training_dashboard",
]


@dataclass
class Dashboard:
    """A dashboard: ``widget`` (the ipywidgets container to display), ``figure`` (the plotly
    ``FigureWidget`` it updates in place), ``controls`` ({name: control widget}), ``update`` (the
    callback ``update(figure, values, **update_kwargs)`` run when a control changes), and ``state``
    (further handles, e.g. the training dashboard's buttons and :class:`TrainingSession`)."""

    widget: W.Widget
    figure: object
    controls: Dict[str, W.ValueWidget]
    update: Callable[[object, dict], None]
    update_kwargs: dict = field(default_factory=dict)  # fixed keyword arguments of ``update``
    state: dict = field(default_factory=dict)  # other handles (buttons, session, ...) for callers and tests

    def values(self) -> dict:
        """{control name: its current value}."""
        return {name: c.value for name, c in self.controls.items()}

    def refresh(self, _change=None) -> None:
        """Recompute the figure from the controls' current values."""
        self.update(self.figure, self.values(), **self.update_kwargs)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def _slider(description, value, low, high, step=0.1, readout_format=".2f", **kw):
    return W.FloatSlider(value=value, min=low, max=high, step=step, description=description,
                         continuous_update=False, readout_format=readout_format, layout=W.Layout(width="290px"),
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


#: Gradients below this are float64 rounding of an exact zero (e.g. a student equal to its teacher)
#: and are drawn as 0; otherwise plotly would stretch ±5e-16 to the full height of the axis.
ROUNDING_FLOOR = 1e-12


def gradient_bars_data(values: dict):
    """The DataFrame behind the bars for the given control values (see ``student_gradients``);
    entries smaller than :data:`ROUNDING_FLOOR` in magnitude are set to 0."""
    teacher, student = _logit_vectors(values)
    df = grads.student_gradients(teacher, student, loss_names=("dkl", "ikl", "gkl"),
                                 temperature=values["temperature"], alpha=values["alpha"],
                                 beta=values["beta"], weight_temperature=values["weight_temperature"],
                                 gamma=values["gamma"])
    df["grad"] = df["grad"].where(df["grad"].abs() >= ROUNDING_FLOOR, 0.0)
    return df


def gradient_bars_update(figure, values: dict) -> None:
    """Callback: recompute the per-class gradient bars from ``values`` and update ``figure``."""
    plots.update_gradient_bars(figure, gradient_bars_data(values))


def gradient_bars_dashboard(teacher_logits: Sequence[float] = (3.0, 1.0, 0.0, -1.0),
                            student_logits: Sequence[float] = (0.0, 1.5, 0.5, 0.0)) -> Dashboard:
    """Sliders for the teacher's and student's logits, T, α, β, T_w and γ; grouped bars per class.

    Shows DKL (its wMSE bars are exactly zero because the teacher is frozen, and its CE bars are β
    times KL's gradient), IKL and GKL, each split into its wMSE and soft-label CE terms.
    """
    if len(teacher_logits) != len(student_logits) or not 2 <= len(teacher_logits) <= 8:
        raise ValueError("teacher_logits and student_logits need the same length, between 2 and 8")
    outside = [float(v) for v in (*teacher_logits, *student_logits) if not -6 <= float(v) <= 6]
    if outside:  # a slider would silently clip them
        raise ValueError(f"logits must lie in [-6, 6] (the sliders' range), got {outside}")
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
    """The teacher's distribution s_m = softmax(o_m / T): T softens the star as it does in distillation.
    For a given star, the arrows do not depend on T: the field is drawn over student distributions
    (o_n = T log s_n), and both terms' steps on the simplex are then free of T."""
    logits = torch.tensor([values["teacher_0"], values["teacher_1"], values["teacher_2"]], dtype=torch.float64)
    return torch.softmax(logits / values["temperature"], dim=0)


def simplex_data(values: dict):
    """(the DataFrame of :func:`dkl_lib.grads.simplex_field`, the teacher's (x, y) on the simplex) for the
    control values (teacher_0..2, temperature, alpha, beta, loss, and optionally resolution)."""
    probs = _teacher_probs(values)
    df = grads.simplex_field(probs, loss=values["loss"], temperature=values["temperature"],
                             alpha=values["alpha"], beta=values["beta"], resolution=values.get("resolution", 10),
                             gamma=values.get("gamma", 1.0))
    return df, grads.simplex_xy(probs[None, :])[0].tolist()


def simplex_update(figure, values: dict) -> None:
    """Callback: recompute the arrows on the simplex for ``values`` and update ``figure``."""
    df, teacher_xy = simplex_data(values)
    plots.update_simplex_quiver(figure, df, teacher_xy=teacher_xy)


def simplex_dashboard(loss: str = "ikl", resolution: int = 10) -> Dashboard:
    """Teacher logits (3 classes), T, α, β (and γ for "gkl"): where one gradient step moves the
    student, per term.

    The teacher's distribution is softmax(o_m / T) (the star). ``loss`` is fixed per dashboard
    because the panels (terms) differ between losses; for "kl", which has no α and β, those sliders
    are disabled.
    """
    if loss not in ("dkl", "ikl", "gkl", "kl"):
        raise ValueError(f"loss must be one of dkl, ikl, gkl, kl for the simplex view, got {loss!r}")
    controls = {f"teacher_{j}": _slider(f"teacher o_m[{j}]", v, -4, 4) for j, v in enumerate((1.5, 0.5, -0.5))}
    controls.update(temperature=_slider("T", 1.0, 0.5, 5, 0.25), alpha=_slider("α (wMSE)", 1.0, 0, 4),
                    beta=_slider("β (CE)", 1.0, 0, 4))
    if loss == "kl":
        controls["alpha"].disabled = controls["beta"].disabled = True
    if loss == "gkl":  # (at γ = 1 its field is IKL's)
        controls["gamma"] = _slider("γ (GKL)", 1.0, 0.25, 3, 0.05)
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
    if target_logits is None and targets is not None:
        raise ValueError("targets were given without target_logits: pass both (the teacher's logits and the "
                         "class of each row), or neither for the synthetic batch")
    if target_logits is None:
        g = torch.Generator().manual_seed(check_seed("seed", seed))
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
    return _wire(Dashboard(W.VBox([W.HBox(list(controls.values())), figure]), figure, controls, weights_update,
                           update_kwargs={"target_logits": target_logits, "targets": targets}))


# ------------------------------------------------------------------------- training dashboard
#: which controls mean something for which loss (the others are disabled in the UI): the table a
#: run's cache key uses too (:data:`dkl_lib.train.LOSS_SETTINGS`)
LOSS_CONTROLS = train.LOSS_SETTINGS
LOSS_HPARAMS = train.LOSS_HPARAMS


def enabled_controls(loss: str) -> set:
    """The loss hyper-parameter controls that apply to ``loss`` (γ only for GKL, and so on)."""
    if loss not in LOSS_CONTROLS:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSS_CONTROLS)}")
    return set(LOSS_CONTROLS[loss])


def loss_settings(preset: str, loss: str, temperature: Optional[float] = None) -> dict:
    """The hyper-parameters a run of ``loss`` under ``preset`` uses when nothing overrides them (the
    preset's distill section, its per-loss section, then the loss's defaults), for the controls the
    loss has. A preset without a weight temperature uses T: pass the current ``temperature`` to get
    that (default: the preset's T)."""
    if loss == "ce":
        return {}
    merged = _preset_settings(preset, loss)
    t_w = merged.get("weight_temperature")
    # the defaults a run fills in (dkl_lib.train's own resolution of the loss's hyper-parameters)
    hp = train._loss_hparams(loss, temperature=merged["temperature"], alpha=merged.get("alpha"),
                             beta=merged.get("beta"), gamma=merged.get("gamma", 1.0),
                             weight_temperature=t_w if t_w is not None else temperature)
    out = {key: float(value) for key, value in hp.items()}
    if "gi" in enabled_controls(loss):
        out["gi"] = bool(merged["gi"])
    return out


def _preset_settings(preset: str, loss: str) -> dict:
    """The distillation settings a run of ``loss`` under ``preset`` gets from the preset (its distill
    section, then its per-loss section; only what the loss uses), as the run's own config has them."""
    from . import experiments

    return experiments._run_config(experiments.preset(preset), loss, 0, None)["distill"]


def run_request(values: dict):
    """(loss spec, seed, preset, overrides) for :func:`dkl_lib.experiments.run_grid` from control values.

    Only the hyper-parameters the loss uses, and only those that differ from what the preset would
    use anyway (:func:`loss_settings`), become overrides: the cache key of a run depends neither on
    disabled controls nor on whether a value was typed or inherited, so a dashboard run with the
    preset's settings is the notebook's run (and comes from the cache when it ran there).
    """
    loss = values["loss"]
    used = enabled_controls(loss)
    preset_values = loss_settings(values["preset"], loss, values.get("temperature"))
    overrides = {"distill.epochs": int(values["epochs"])}
    if "temperature" in used and float(values["temperature"]) != preset_values["temperature"]:
        overrides["distill.temperature"] = float(values["temperature"])
    for key in ("alpha", "beta", "weight_temperature", "gamma"):
        if key in used and float(values[key]) != preset_values[key]:
            overrides[f"losses.{loss}.{key}"] = float(values[key])
    spec = loss
    if "gi" in used:
        spec = loss if values["gi"] else f"{loss}-nogi"
    return spec, int(values["seed"]), values["preset"], overrides


class TrainingSession:
    """Short trainings in a background thread, one at a time; the logic behind the dashboard.

    ``start(values)`` launches :func:`dkl_lib.experiments.run_grid` for one (loss, seed) in a
    daemon thread and returns at once; ``on_epoch(history)`` is called after every computed epoch,
    ``on_finish(row)`` after the run (cached runs finish at once), ``on_error(exc)`` on failure.
    ``stop()`` ends the run after the current epoch (the partial run is reported, not cached).
    ``base_overrides`` (dotted preset keys, e.g. ``{"data.n_train": 300}``) apply to every run.
    Finished runs accumulate in :meth:`results` (one row per run, with its configuration), which
    :meth:`export_csv` writes out.
    """

    def __init__(self, *, cache_dir=None, device=None, base_overrides=None, on_epoch=None, on_finish=None,
                 on_error=None):
        import threading

        self.cache_dir, self.device = cache_dir, device
        self.base_overrides = dict(base_overrides or {})
        self.on_epoch, self.on_finish, self.on_error = on_epoch, on_finish, on_error
        self._stop = threading.Event()
        self._thread = None
        self._rows = []
        self.history = []
        self.error = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, values: dict) -> bool:
        """Start a run for the control ``values``; False (and nothing started) if one is running."""
        import threading

        if self.running:
            return False
        request = run_request(values)  # bad values raise here, in the caller's thread
        self._stop.clear()
        self.history, self.error = [], None
        self._thread = threading.Thread(target=self._run, args=(dict(values), request), daemon=True,
                                        name="dkl-training")
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Join the running thread; True when no run is left running."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def _epoch(self, loss, seed, history):
        self.history = list(history)
        if self.on_epoch is not None:
            self.on_epoch(self.history)
        return not self._stop.is_set()

    def _run(self, values, request):
        from . import experiments

        spec, seed, preset, overrides = request
        try:
            grid = experiments.run_grid([spec], [seed], preset=preset, overrides={**self.base_overrides, **overrides},
                                        cache_dir=self.cache_dir, device=self.device, progress=False,
                                        callback=self._epoch)
            run = grid.runs.iloc[0].to_dict()
            history = grid.histories.get((run["loss"], seed))
            if history is not None and not self.history:  # a cached run: show its curve too
                self.history = history.to_dict(orient="records")
                if self.on_epoch is not None:
                    self.on_epoch(self.history)
            row = {"run": values.get("run", len(self._rows) + 1), "loss": spec,
                   **{k: values[k] for k in LOSS_HPARAMS if k in enabled_controls(values["loss"])},
                   "epochs": int(values["epochs"]), "seed": seed, "preset": preset,
                   "best_acc": run["best_acc"], "best_epoch": run["best_epoch"], "last_acc": run["last_acc"],
                   "epochs_run": run["epochs"], "cached": bool(run["cached"]), "stopped": run["stopped"],
                   "seconds": run["seconds"]}
            self._rows.append(row)
            if self.on_finish is not None:
                self.on_finish(row)
        except Exception as exc:  # shown in the dashboard; the kernel stays alive
            self.error = exc
            if self.on_error is not None:
                self.on_error(exc)

    def results(self):
        """One row per finished run: its number, loss, the hyper-parameters it used, and the outcome."""
        import pandas as pd

        table = pd.DataFrame(self._rows)
        first = ["run", "loss", *LOSS_HPARAMS]  # the settings before the outcome, whatever loss ran first
        return table[[c for c in first if c in table] + [c for c in table if c not in first]]

    def export_csv(self, path) -> str:
        """Write the results table to ``path`` (CSV); returns the absolute path."""
        import os

        if not self._rows:
            raise ValueError("no finished runs to export yet")
        self.results().to_csv(path, index=False)
        return os.path.abspath(path)


def _set_widening(slider, value) -> None:
    """Set ``slider`` to ``value``, widening its range rather than clipping the value: a preset's value
    clipped to the slider would make an untouched run another run than the preset's."""
    slider.max = max(slider.max, value)
    slider.min = min(slider.min, value)
    slider.value = value


def _curve_figure(epochs: int = 10):
    import plotly.graph_objects as go

    fig = go.Figure()
    # before the first run: epochs 1..N and 0-100 %, not plotly's empty -1..6 by -1..4 (a negative accuracy
    # axis); the first epoch drawn switches both axes to autorange (see _autorange)
    fig.update_layout(title="test accuracy per epoch (this run in colour, earlier runs in grey)",
                      xaxis=dict(title="epoch", range=[0.5, epochs + 0.5]),
                      yaxis=dict(title="test accuracy (%)", range=[0, 100]), template="plotly_white",
                      height=360, showlegend=True)
    return plots.figure_widget(fig)  # the layout in the widget's first message to the browser


def _autorange(fig) -> None:
    """Let plotly fit both axes to the curves drawn (the fixed ranges of :func:`_curve_figure` are for the empty plot)."""
    fig.layout.xaxis.autorange = True
    fig.layout.yaxis.autorange = True


def training_dashboard(*, preset: str = "cpu-quick", cache_dir=None, device=None, base_overrides=None) -> Dashboard:
    """Control panel for short trainings: loss, α, β, T, T_w, GI, γ, epochs, seed, preset.

    **Run** starts a training in the background (the notebook stays responsive); the plot grows as
    epochs finish and a progress bar follows; **Stop** ends the run cleanly; each finished run is
    appended to the results table with its configuration and run number (the legend's "#n");
    **Export CSV** writes that table to ``dkl_dashboard_results.csv`` in the working directory (the
    status shows the full path, or why it failed). Choosing a loss or a preset sets the sliders to
    what that preset uses for that loss (:func:`loss_settings`; T_w follows T where the preset ties
    them; a slider widens to a preset value beyond its range), and choosing a preset sets the epochs
    slider to the preset's number of epochs, so an untouched run is the preset's own (its learning-rate
    schedule included), and runs already in the cache return at once. A shorter run is a choice: move
    the epochs slider.
    Controls a loss does not use are disabled. The logic is :class:`TrainingSession`, reachable as
    ``dashboard.state["session"]``.
    """
    from . import experiments

    experiments.preset(preset)  # an unknown name: ValueError listing the presets (not a widget TraitError)
    controls = {
        "loss": W.Dropdown(options=["kl", "dkl", "ikl", "gkl", "dkd", "ce"], value="ikl", description="loss"),
        # wide ranges and fine steps: the presets use α up to 16 and β = 1/16 (the official IKL/GKL weights)
        "alpha": _slider("α (wMSE)", 1.0, 0.0, 20.0, 0.25),
        "beta": _slider("β (soft CE)", 1.0, 0.0, 8.0, 1 / 16, readout_format=".4g"),
        "temperature": _slider("T", 4.0, 0.5, 10.0, 0.5),
        "weight_temperature": _slider("T_w", 4.0, 0.5, 10.0, 0.5),
        "gi": W.Checkbox(value=True, description="class-wise GI"),
        "gamma": _slider("γ (GKL)", 1.0, 0.05, 3.0, 0.05),
        "epochs": W.IntSlider(value=10, min=1, max=60, description="epochs", continuous_update=False,
                              layout=W.Layout(width="290px"), style={"description_width": "105px"}),
        "seed": W.BoundedIntText(value=0, min=0, max=10_000, description="seed", layout=W.Layout(width="200px")),
        "preset": W.Dropdown(options=sorted(experiments.PRESETS), value=preset, description="preset"),
    }
    run_button = W.Button(description="Run", button_style="success", icon="play")
    stop_button = W.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
    export_button = W.Button(description="Export CSV", icon="download", disabled=True)
    progress = W.IntProgress(value=0, min=0, max=controls["epochs"].value, description="epochs")
    status = W.HTML("ready")
    table = W.HTML()
    figure = _curve_figure(controls["epochs"].value)

    def set_enabled(_change=None):
        """Enable the loss's controls and set them to what its preset uses (a loss or preset change)."""
        loss = controls["loss"].value
        allowed = enabled_controls(loss)
        for key in LOSS_HPARAMS:
            controls[key].disabled = key not in allowed
        for key, value in loss_settings(controls["preset"].value, loss).items():
            if isinstance(value, bool):
                controls[key].value = value
            else:  # T_w = 100 on gpu-short/paper
                _set_widening(controls[key], value)
        dkd = loss == "dkd"  # DKD's two weights sit on the same sliders
        controls["alpha"].description = "α (TCKD)" if dkd else "α (wMSE)"
        controls["beta"].description = "β (NCKD)" if dkd else "β (soft CE)"

    def set_epochs(_change=None):
        """The preset's number of epochs: a shorter run of a preset never reaches its learning-rate drops."""
        epochs = int(_preset_settings(controls["preset"].value, controls["loss"].value)["epochs"])
        _set_widening(controls["epochs"], epochs)  # 240 for paper
        if not figure.data:  # the empty plot's epoch axis follows
            figure.layout.xaxis.range = [0.5, epochs + 0.5]

    def follow_temperature(change):
        """A preset without a weight temperature uses T: T_w follows T until it is moved by hand."""
        loss = controls["loss"].value
        if "weight_temperature" not in enabled_controls(loss):
            return
        inherits = _preset_settings(controls["preset"].value, loss).get("weight_temperature") is None
        if inherits and controls["weight_temperature"].value == change["old"]:
            controls["weight_temperature"].value = change["new"]

    def on_epoch(history):
        xs = [r["epoch"] for r in history]
        ys = [r["test_acc"] for r in history]
        with figure.batch_update():
            figure.data[-1].x, figure.data[-1].y = xs, ys
            _autorange(figure)
            figure.layout.xaxis.dtick = max(1, -(-len(xs) // 10))  # whole epochs, about ten ticks
        progress.value = min(len(history), progress.max)

    def on_finish(row):
        status.value = (f"finished {row['loss']} seed {row['seed']}: best {row['best_acc']:.2f}%, "
                        f"last {row['last_acc']:.2f}%" + (" (from the cache)" if row["cached"] else "")
                        + (" (stopped early, not cached)" if row["stopped"] else ""))
        table.value = session.results().to_html(index=False, float_format=lambda v: f"{v:.3g}")
        run_button.disabled, stop_button.disabled, export_button.disabled = False, True, False

    def on_error(exc):
        status.value = f"<span style='color:#b00'>failed: {html.escape(f'{type(exc).__name__}: {exc}')}</span>"
        if figure.data and not figure.data[-1].x:  # the failed run drew nothing: drop its empty trace
            figure.data = figure.data[:-1]
        run_button.disabled, stop_button.disabled = False, True

    session = TrainingSession(cache_dir=cache_dir, device=device, base_overrides=base_overrides,
                              on_epoch=on_epoch, on_finish=on_finish, on_error=on_error)

    def run(_button=None):
        if session.running:
            status.value = "a run is already in progress"
            return
        counter[0] += 1
        values = {**{k: c.value for k, c in controls.items()}, "run": counter[0]}
        spec, seed, _, _ = run_request(values)
        for trace in figure.data:  # earlier runs stay, in grey
            trace.line.color, trace.line.width = "#bbbbbb", 1
        loss = values["loss"]
        no_gi = " (no GI)" if spec.endswith("-nogi") else ""
        # the run number is the table's "run" column: it tells apart runs of one loss with other settings
        figure.add_scatter(x=[], y=[], mode="lines+markers", name=f"#{counter[0]} {plots.label(loss)}{no_gi} seed {seed}",
                           line=dict(color=plots.color(loss), width=2.5))
        progress.max, progress.value = values["epochs"], 0
        status.value = f"run #{counter[0]}: {spec} seed {seed} ({values['preset']}) ..."
        run_button.disabled, stop_button.disabled = True, False
        session.start(values)

    def stop(_button=None):
        if session.running:  # a click that arrives after the run ended changes nothing
            session.stop()
            status.value = "stopping after this epoch ..."

    def export(_button=None):
        try:
            status.value = f"wrote {html.escape(session.export_csv('dkl_dashboard_results.csv'))}"
        except (OSError, ValueError) as exc:
            status.value = f"<span style='color:#b00'>export failed: {html.escape(f'{type(exc).__name__}: {exc}')}</span>"

    counter = [0]  # runs started in this dashboard
    run_button.on_click(run)
    stop_button.on_click(stop)
    export_button.on_click(export)
    controls["loss"].observe(set_enabled, names="value")
    controls["preset"].observe(set_enabled, names="value")
    controls["preset"].observe(set_epochs, names="value")
    controls["temperature"].observe(follow_temperature, names="value")
    set_enabled()
    set_epochs()
    panel = _columns([controls[k] for k in ("loss", "preset", "epochs", "seed")],
                     [controls[k] for k in ("temperature", "alpha", "beta")],
                     [controls[k] for k in ("weight_temperature", "gi", "gamma")])
    widget = W.VBox([panel, W.HBox([run_button, stop_button, export_button, progress]), status, figure, table])
    state = {"session": session, "buttons": {"run": run_button, "stop": stop_button, "export": export_button},
             "progress": progress, "status": status, "table": table}
    # no ``update``: the figure changes when epochs finish, not when a control moves
    return Dashboard(widget, figure, controls, lambda fig, values: None, state=state)
