"""Real-browser tests: JupyterLab 4 in headless Chromium, notebooks run from the Run menu, widgets moved.

Part of `make test` (and `make test-browser` runs only these). When Chromium is missing it is
installed with apt-get where possible (root, as here and in CI); elsewhere the test fails with the
exact install command. It never skips silently. Screenshots land in reports/screenshots/.
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
    chromium = browser.ensure_chromium()  # raises with the install command when it cannot
    work = tmp_path_factory.mktemp("lab")
    notebooks = work / "notebooks"
    shutil.copytree(REPO / "notebooks", notebooks)  # the browser run must not write into the repo
    with browser.jupyter_lab(notebooks, work) as url:
        yield url, chromium, notebooks


def test_notebook_02_widgets_update_the_plot_in_the_browser(lab):
    url, chromium, _ = lab
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with browser.chromium_page(chromium) as page:
        browser.open_notebook(page, url, "02_gradient_anatomy.ipynb")
        browser.run_all(page)
        assert browser.error_outputs(page) == []
        # 4 static figures + 3 dashboard figures, all rendered by plotly.js
        assert page.locator(".js-plotly-plot").count() == 7
        assert page.locator(".widget-slider").count() >= 17
        page.screenshot(path=str(SCREENSHOTS / "02_gradient_anatomy_run.png"))

        # the first dashboard follows the first static figure: plot 1 is its FigureWidget
        before = [browser.plot_signature(page, i) for i in range(7)]
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
        after = [browser.plot_signature(page, i) for i in range(7)]
        assert after[1] != before[1]  # the dashboard redrew its bars in place ...
        assert after[0] == before[0]  # ... and the static figure above it did not change
        assert float(readout.inner_text()) == pytest.approx(float(old_value) + 0.5)
        page.screenshot(path=str(SCREENSHOTS / "02_gradient_anatomy_slider.png"))
        assert browser.error_outputs(page) == []
