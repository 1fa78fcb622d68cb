"""Drive JupyterLab in headless Chromium (Debian's package) with Playwright, for the browser tests.

What ../shared/BROWSER_TESTING.md records as working here: a JupyterLab server with a throw-away
config on a free localhost port, Debian's /usr/bin/chromium driven by the Python ``playwright``
package (its own browser download does not work offline), kernel readiness read from the status
bar, "Run All" through the Run menu, and clean-up by process id even when a test fails.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import weakref
from contextlib import contextmanager

CHROMIUM = "/usr/bin/chromium"
INSTALL_HINT = "apt-get update && apt-get install -y chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-extensions"]
TOKEN = "dkl-browser-test"
_PAGE_ERRORS = weakref.WeakKeyDictionary()  # page -> uncaught JavaScript errors seen on it


def ensure_chromium() -> str:
    """Path of Chromium; installs Debian's package when missing and possible (root with apt-get, as in CI).

    Where it cannot (not root, no apt-get) the calling test is skipped with the install command as the reason
    (pytest's summary lists it), so ``make test`` on a laptop is not six failures; with
    ``DKL_BROWSER_REQUIRED=1`` (``make test-browser`` sets it) that is a failure instead. A failed install
    always fails."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    apt = shutil.which("apt-get")
    if apt and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run([apt, "update", "-qq"], check=False, env=env, capture_output=True)
        done = subprocess.run([apt, "install", "-y", "-qq", "chromium"], env=env, capture_output=True, text=True)
        if done.returncode == 0 and os.access(CHROMIUM, os.X_OK):
            return CHROMIUM
        raise RuntimeError(f"installing Chromium failed ({done.stderr[-500:]}); run: {INSTALL_HINT}")
    message = f"Chromium is missing at {CHROMIUM} and cannot be installed from here; run as root: {INSTALL_HINT}"
    if os.environ.get("DKL_BROWSER_REQUIRED", "") not in ("", "0"):
        raise RuntimeError(message)
    import pytest

    pytest.skip(message + " (DKL_BROWSER_REQUIRED=1 makes this a failure)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_quiet_settings(config_dir: pathlib.Path) -> None:
    """No news toast, no update checks, no extension manager, no windowing in the throw-away config."""
    settings = config_dir / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # render every cell (no virtual scrolling), so prompts and plots of off-screen cells are in the DOM
    notebook = config_dir / "lab" / "user-settings" / "@jupyterlab" / "notebook-extension"
    notebook.mkdir(parents=True, exist_ok=True)
    (notebook / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    labconfig = config_dir / "labconfig"
    labconfig.mkdir(parents=True, exist_ok=True)
    (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": {
        "@jupyterlab/apputils-extension:announcements": True, "@jupyterlab/extensionmanager-extension": True}}))


@contextmanager
def jupyter_lab(root_dir: pathlib.Path, workdir: pathlib.Path, env_overrides=None):
    """A JupyterLab server serving ``root_dir``; yields its base URL. Killed by process group at exit."""
    port = _free_port()
    home = workdir / "home"
    for sub in ("config", "data", "runtime", "home"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    _write_quiet_settings(workdir / "config")
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(workdir / "config"), JUPYTER_DATA_DIR=str(workdir / "data"),
               JUPYTER_RUNTIME_DIR=str(workdir / "runtime"), HOME=str(home))
    env.pop("FAST", None)
    env.update(env_overrides or {})
    jupyter = pathlib.Path(sys.executable).with_name("jupyter")
    cmd = [str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}", "--ServerApp.allow_root=True",
           f"--ServerApp.root_dir={root_dir}", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly"]
    log = open(workdir / "jupyter.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (workdir / "jupyter.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(server.pid, sig)
                server.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _children(pid: int) -> set:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    kids = {int(p) for p in out.split()}
    for k in list(kids):
        kids |= _children(k)
    return kids


@contextmanager
def chromium_page(executable: str, viewport=(1280, 900)):
    """A Playwright page in headless Chromium; survivors are killed by pid after ``browser.close()``."""
    from playwright.sync_api import sync_playwright

    before = _children(os.getpid())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        spawned = _children(os.getpid()) - before
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            errors = _PAGE_ERRORS.setdefault(page, [])
            page.on("pageerror", lambda error: errors.append(str(error)[:300]))
            yield page
        finally:
            try:
                browser.close()
            finally:
                for pid in spawned:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def open_notebook(page, url: str, name: str, timeout_s: float = 120) -> None:
    page.goto(f"{url}/lab/tree/{name}?reset&token={TOKEN}")
    wait_kernel_idle(page, timeout_s)


def wait_kernel_idle(page, timeout_s: float = 120) -> None:
    """Until the status bar reads '… | Idle' with a real kernel (not 'No Kernel')."""
    page.wait_for_function(
        """() => { const s = document.querySelector('#jp-main-statusbar');
                   return s && /\\|\\s*Idle/.test(s.innerText) && !/No Kernel/.test(s.innerText); }""",
        timeout=timeout_s * 1000)


def run_all(page, timeout_s: float = 300) -> None:
    """Run all cells through the Run menu and wait until every code cell has an execution count."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    item = page.locator('[data-command="runmenu:run-all"]')
    if item.count() == 0:  # JupyterLab 4.6's menu items carry no data-command; match the label exactly
        item = page.locator(".lm-Menu-itemLabel").filter(has_text=re.compile(r"^Run All Cells$"))
    item.first.click()
    page.wait_for_function(
        """() => { const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
                   return p.length > 0 && p.every(e => /\\[\\d+\\]/.test(e.innerText)); }""",
        timeout=timeout_s * 1000)
    wait_kernel_idle(page, timeout_s)


def page_errors(page) -> list:
    """Uncaught JavaScript errors of the page so far (e.g. "[anywidget] Failed to initialize model.": a widget
    that then ignores every update from Python)."""
    return list(_PAGE_ERRORS.get(page, []))


def error_outputs(page) -> list:
    """Texts of error outputs (tracebacks) in the open notebook."""
    return page.eval_on_selector_all('[data-mime-type="application/vnd.jupyter.error"]',
                                     "els => els.map(e => e.innerText.slice(0, 500))")


def plot_signature(page, plot_index: int = 0) -> list:
    """Heights of the bars (or lengths of the paths) of the n-th plotly plot, for before/after checks."""
    return page.evaluate(
        """(i) => { const plots = document.querySelectorAll('.js-plotly-plot');
                    const p = plots[i]; if (!p) return null;
                    return [...p.querySelectorAll('g.trace.bars g.point > path, g.trace.scatter path.js-line')]
                           .map(e => { const b = e.getBBox(); return [b.x, b.y, b.width, b.height].map(v => +v.toFixed(2)); }); }""",
        plot_index)


def wait_plots_drawn(page, indices, timeout_s: float = 60) -> None:
    """Wait until each plotly plot of ``indices`` has drawn its bars or lines: plotly.js (and a
    FigureWidget, through the widget manager) draws after its output appears, later on a loaded machine.
    On a timeout, fails with what each plot holds and the page's JavaScript errors."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            """(idx) => { const plots = document.querySelectorAll('.js-plotly-plot');
                          return idx.every(i => plots[i] && plots[i].querySelector(
                              'g.trace.bars g.point > path, g.trace.scatter path.js-line')); }""",
            arg=list(indices), timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        held = page.evaluate(
            """(idx) => { const plots = document.querySelectorAll('.js-plotly-plot');
                          return idx.map(i => plots[i] ? `plot ${i}: ${plots[i].querySelectorAll('g.trace').length} `
                              + `traces, ${Math.round(plots[i].getBoundingClientRect().height)} px high` : `plot ${i}: missing`); }""",
            list(indices))
        raise AssertionError(f"plots not drawn within {timeout_s} s: {'; '.join(held)}; "
                             f"JavaScript errors: {page_errors(page)}") from None


def text_overlaps(page, plot_index: int = 0) -> list:
    """Pairs of texts (figure title, subplot titles, annotations) whose boxes overlap in the n-th plotly plot."""
    return page.evaluate(
        """(i) => { const p = document.querySelectorAll('.js-plotly-plot')[i]; if (!p) return null;
                    const boxes = [...p.querySelectorAll('g.annotation-text-g, g.g-gtitle')]
                        .map(e => [e.textContent, e.getBoundingClientRect()]).filter(([t, b]) => t && b.width > 0);
                    const out = [];
                    for (let a = 0; a < boxes.length; a++) for (let b = a + 1; b < boxes.length; b++) {
                        const [ta, ra] = boxes[a], [tb, rb] = boxes[b];
                        if (ra.left < rb.right && rb.left < ra.right && ra.top < rb.bottom && rb.top < ra.bottom)
                            out.push([ta, tb]); }
                    return out; }""",
        plot_index)


def show_figure(page, fig, path: pathlib.Path, width_px: int) -> None:
    """Render a plotly figure alone in ``page`` (plotly.js inlined from the installed package: no network)."""
    fig.write_html(str(path), include_plotlyjs=True, full_html=True, default_width=f"{width_px}px")
    page.goto(path.as_uri())
    page.wait_for_selector(".js-plotly-plot g.g-gtitle")
