"""Real-browser tests: JupyterLab 4 in headless Chromium, notebooks run from the Run menu, widgets moved.

Part of `make test` (and `make test-browser` runs only these). When Chromium is missing it is
installed with apt-get where possible (root, as here and in CI); elsewhere `make test` skips them with the
exact install command as the reason (listed in pytest's summary), and `make test-browser` (which sets
DKL_BROWSER_REQUIRED=1) fails with it. Screenshots land in reports/screenshots/.
"""
import pathlib
import shutil

import pytest

import browser

REPO = pathlib.Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "reports" / "screenshots"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(url, chromium path, notebook folder): a JupyterLab server on a throw-away copy of notebooks/."""
    chromium = browser.ensure_chromium()  # skips or raises with the install command when it cannot
    work = tmp_path_factory.mktemp("lab")
    notebooks = work / "notebooks"
    shutil.copytree(REPO / "notebooks", notebooks)  # the browser run must not write into the repo
    # FAST keeps the notebooks' computations short; DKL_WIDGETS=1 still shows their dashboards
    env = {"FAST": "1", "DKL_WIDGETS": "1", "DKL_RUNS_DIR": str(work / "runs")}
    with browser.jupyter_lab(notebooks, work, env_overrides=env) as url:
        yield url, chromium, notebooks


def test_notebook_02_widgets_update_the_plot_in_the_browser(lab):
    url, chromium, _ = lab
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with browser.chromium_page(chromium) as page:
        browser.open_notebook(page, url, "02_gradient_anatomy.ipynb")
        browser.run_all(page)
        assert browser.error_outputs(page) == []
        # 5 static figures + 3 dashboard figures, all rendered by plotly.js
        assert page.locator(".js-plotly-plot").count() == 8
        assert page.locator(".widget-slider").count() >= 17
        page.screenshot(path=str(SCREENSHOTS / "02_gradient_anatomy_run.png"))

        # the first dashboard follows the first static figure: plot 1 is its FigureWidget
        browser.wait_plots_drawn(page, [0, 1])
        before = [browser.plot_signature(page, i) for i in range(8)]
        assert before[1], "the dashboard's bars are drawn"
        handle = page.locator(".widget-slider .noUi-handle").first
        handle.scroll_into_view_if_needed()
        readout = page.locator(".widget-readout").first
        old_value = readout.inner_text()
        handle.click()
        for _ in range(5):
            page.keyboard.press("ArrowRight")
        page.wait_for_function("(old) => document.querySelector('.widget-readout').innerText !== old", arg=old_value)
        page.wait_for_function(
            """(old) => { const p = document.querySelectorAll('.js-plotly-plot')[1];
                          const now = [...p.querySelectorAll('g.trace.bars g.point > path')]
                                      .map(e => { const b = e.getBBox(); return [b.x, b.y, b.width, b.height]
                                                  .map(v => +v.toFixed(2)); });
                          return JSON.stringify(now) !== JSON.stringify(old); }""",
            arg=before[1], timeout=30_000)
        after = [browser.plot_signature(page, i) for i in range(8)]
        assert after[1] != before[1]  # the dashboard redrew its bars in place ...
        assert after[0] == before[0]  # ... and the static figure above it did not change
        assert float(readout.inner_text()) == pytest.approx(float(old_value) + 0.5)
        page.screenshot(path=str(SCREENSHOTS / "02_gradient_anatomy_slider.png"))
        assert browser.error_outputs(page) == []
        assert browser.page_errors(page) == []  # e.g. no figure widget that stopped taking updates


def test_notebook_05_dashboard_trains_in_the_background(lab, tmp_path):
    """Run notebook 05, press the dashboard's Run, watch the curve grow and the results table gain a row."""
    url, chromium, _ = lab
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with browser.chromium_page(chromium) as page:
        browser.open_notebook(page, url, "05_compare_kl_dkl_ikl.ipynb")
        browser.run_all(page, timeout_s=600)
        assert browser.error_outputs(page) == []
        run_button = page.locator(".widget-button", has_text="Run").last
        run_button.scroll_into_view_if_needed()
        rows_before = page.locator(".widget-html table.dataframe tbody tr").count()
        plot = page.locator(".js-plotly-plot").last
        points_before = plot.locator("g.trace.scatter path.js-line").count()
        # a run that is not in the cache yet, so that its curve grows epoch by epoch
        seed_box = page.locator(".widget-text input").last
        seed_box.fill("4242")
        seed_box.press("Enter")
        run_button.click()
        page.wait_for_function(
            """() => { const p = [...document.querySelectorAll('.js-plotly-plot')].pop();
                       const l = p.querySelector('g.trace.scatter path.js-line');
                       return l && (l.getAttribute('d') || '').split('L').length >= 3; }""",
            timeout=120_000)
        page.screenshot(path=str(SCREENSHOTS / "05_dashboard_running.png"))
        page.wait_for_function(
            "(n) => document.querySelectorAll('.widget-html table.dataframe tbody tr').length > n",
            arg=rows_before, timeout=300_000)
        assert plot.locator("g.trace.scatter path.js-line").count() >= max(points_before, 1)
        assert "finished" in page.locator(".widget-html", has_text="finished").first.inner_text()
        page.screenshot(path=str(SCREENSHOTS / "05_dashboard_finished.png"))
        assert browser.error_outputs(page) == []
        assert browser.page_errors(page) == []


@pytest.mark.parametrize("width_px", [600, 700, 900])
def test_weight_heatmaps_titles_do_not_overlap_when_drawn(tmp_path, width_px):
    """Notebook 02's weights dashboard draws its figure about 700 px wide: the two panel titles (one line each,
    "sample-wise  w = p pᵀ, p = softmax(o_m/T_w)") ran into each other there. Drawn by plotly.js in Chromium."""
    import torch

    from dkl_lib import grads, plots

    targets = torch.arange(48) % 6
    logits = torch.randn(48, 6, generator=torch.Generator().manual_seed(0)) * 1.5
    logits[torch.arange(48), targets] += 3.0
    fig = plots.weight_heatmaps(grads.weight_matrices(logits, targets, weight_temperature=2.0, sample=0))
    with browser.chromium_page(browser.ensure_chromium()) as page:
        browser.show_figure(page, fig, tmp_path / "weights.html", width_px)
        assert len(page.locator("g.annotation-text-g").all()) >= 2  # the two panel titles are drawn
        assert browser.text_overlaps(page) == []


def test_figure_widget_changed_right_after_it_is_shown_draws_the_change(lab):
    """A figure changed in the cell that shows it: the update reaches the browser before plotly's widget code
    has loaded there (dkl.plots.figure_widget loads it once per page, with no time limit), so the figure asks
    Python for its state again. It must draw the changed bars, not the first ones."""
    import nbformat

    url, chromium, notebooks = lab
    cell = ("import plotly.graph_objects as go\nimport dkl_lib as dkl\n"
            "widget = dkl.plots.figure_widget(go.Figure(go.Bar(y=[1, 2, 3]), layout=dict(height=300)))\n"
            "display(widget)\nwidget.data[0].y = [3, 1, 2]")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, str(notebooks / "scratch_figure_widget.ipynb"))
    with browser.chromium_page(chromium) as page:
        browser.open_notebook(page, url, "scratch_figure_widget.ipynb")
        browser.run_all(page)
        browser.wait_plots_drawn(page, [0])
        page.wait_for_function(
            """() => { const bars = [...document.querySelectorAll('.js-plotly-plot g.trace.bars g.point > path')];
                       const h = bars.map(b => b.getBBox().height);
                       return h.length === 3 && h[0] > h[2] && h[2] > h[1]; }""", timeout=30_000)
        assert browser.error_outputs(page) == [] and browser.page_errors(page) == []
