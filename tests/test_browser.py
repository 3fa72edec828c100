"""The course in a real browser: JupyterLab in Debian's chromium, driven by Playwright.

Runs notebook 00 (QUICK) in JupyterLab, moves its seed slider like a student would
and checks that the figure is redrawn in place: a new image, at the same place on
the page while "updating…" shows. On the way it checks what a browser shows and
nbclient cannot: the sliders' tracks line up, the environment report is a table,
and no figure is shrunk to fit the notebook column.

Needs the system chromium (``.ci/install-browser.sh``: ``apt-get install chromium``);
skips, saying so, only when it is not installed. Playwright never downloads a browser
here. Set ``SARA_EDU_BROWSER_SHOTS=/some/folder`` to keep screenshots.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = "00_welcome.ipynb"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 900}  # a laptop screen, file browser open: the column students get
# Every wait polls for its condition; this is only the ceiling against a hang, not a speed requirement: on a busy
# machine JupyterLab's start, Run All and a redraw take many times their quiet-machine seconds.
WAIT_CEILING_S = 900
# JupyterLab settings for a test: render every cell (no virtual scrolling), no news pop-up over the page
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
}


def chromium_path() -> str | None:
    for candidate in (os.environ.get("SARA_EDU_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on 127.0.0.1 with a token, serving a folder that holds a copy of notebook 00."""
    root, home = tmp_path / "course", tmp_path / "home"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / NOTEBOOK, root)
    for name, settings in LAB_SETTINGS.items():
        target = home / "settings" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(settings))
    token, port = secrets.token_hex(16), _free_port()
    env = dict(os.environ, SARA_EDU_QUICK="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), IPYTHONDIR=str(home / "ipython"))
    env.pop("MPLBACKEND", None)  # the kernel's own default: inline figures, as for a student
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               "--LabApp.expose_app_in_browser=True"]  # window.jupyterapp: run cells through lab's own commands
    if os.getuid() == 0:
        command.append("--allow-root")
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_CEILING_S
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"JupyterLab did not answer within {WAIT_CEILING_S} s:\n"
                                         f"{(tmp_path / 'lab.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield f"{url}/lab/tree/{NOTEBOOK}?token={token}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium is not installed: run .ci/install-browser.sh (as root: apt-get install chromium); "
                    "Playwright drives the system browser and cannot download one here")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[dev]' (it is a dev dependency)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


ALL_RAN = """() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = panel && panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;
  if (!kernel) return null;
  const cells = panel.content.model.cells;
  const code = [];
  for (let i = 0; i < cells.length; i++) if (cells.get(i).type === 'code') code.push(cells.get(i));
  const errors = code.flatMap(c => c.outputs.toJSON()).filter(o => o.output_type === 'error');
  if (errors.length) return 'error: ' + errors.map(e => e.ename + ': ' + e.evalue).join('; ');
  return kernel.status === 'idle' && code.every(c => c.executionCount !== null) ? 'done' : null;
}"""

# The images a reader sees in a cell's outputs (a live redraw hides the stale static copy below the controls).
VISIBLE_IMAGES = """(cellIndex) => {
  const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[cellIndex];
  return cell ? [...cell.querySelectorAll('.jp-OutputArea-output img')].filter(i => i.checkVisibility()) : [];
}"""

# Every 30 ms, note where the figure of the slider's cell is and which image it shows, until told to stop.
WATCH_FIGURE = """(cellIndex) => {
  window.__figure = [];
  const visible = """ + VISIBLE_IMAGES + """;
  const look = () => {
    const img = visible(cellIndex)[0];
    if (img) window.__figure.push([img.getBoundingClientRect().top, img.src.length, img.src.slice(-64)]);
  };
  look();
  window.__watch = setInterval(look, 30);
}"""


def _shot(page, name):
    folder = os.environ.get("SARA_EDU_BROWSER_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))


@pytest.mark.slow
def test_a_student_runs_notebook_00_in_jupyterlab_and_the_slider_redraws_the_figure(browser, lab):
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(WAIT_CEILING_S * 1000)  # also Playwright's navigation and locator waits (30 s by default)
    page.goto(lab)
    page.wait_for_function("() => { const p = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                           " return p && p.sessionContext && p.sessionContext.session &&"
                           " p.sessionContext.session.kernel && p.sessionContext.session.kernel.status === 'idle'; }",
                           timeout=WAIT_CEILING_S * 1000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    state = page.wait_for_function(ALL_RAN, timeout=WAIT_CEILING_S * 1000).json_value()
    assert state == "done", state

    cells = page.locator(".jp-Notebook .jp-Cell")
    index = next(i for i in range(cells.count()) if cells.nth(i).locator(".widget-slider").count() == 2)
    cell = cells.nth(index)
    cell.scroll_into_view_if_needed()
    _shot(page, "00_before.png")

    # the tracks of "seed" and "guidance scale" start at the same x (a common label width)
    tracks = cell.locator(".widget-slider .slider-container")
    lefts = [tracks.nth(i).bounding_box()["x"] for i in range(2)]
    widths = [tracks.nth(i).bounding_box()["width"] for i in range(2)]
    assert abs(lefts[0] - lefts[1]) <= 1 and abs(widths[0] - widths[1]) <= 1, (lefts, widths)

    # every figure is shown at its own size: none wider than the column, so none shrunk
    sizes = page.evaluate("[...document.querySelectorAll('.jp-OutputArea-output img')]"
                          ".map(i => [i.naturalWidth, Math.round(i.getBoundingClientRect().width)])")
    assert sizes and all(shown >= natural - 1 for natural, shown in sizes), sizes

    # the environment report is a table, not a Series printout
    report = cells.filter(has_text="notebook.environment_report()")
    assert report.locator(".jp-OutputArea-output table").count() == 1
    assert "dtype: object" not in report.inner_text()

    # move the seed slider as a student does: drag its handle to the right, release
    seen = _drag_seed_and_watch(page, cell, index, 120)
    _shot(page, "00_after.png")
    assert seen[-1][2] != seen[0][2], "the figure was not redrawn"
    tops = {round(top) for top, _, _ in seen}
    # 2 px once, at the first move, where the live figure in the control box takes the static one's place
    assert max(tops) - min(tops) <= 3, f"the figure moved while redrawing (tops {sorted(tops)}): keep the layout still"
    assert page.evaluate(f"({VISIBLE_IMAGES})({index}).length") == 1, \
        "the redraw added a figure instead of replacing it"

    # reload the page with the kernel still running (after a save, as JupyterLab autosaves): the outputs now come
    # from the file, without display ids; the sliders must still redraw the one figure
    page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty")
    page.reload()
    page.wait_for_function(f"() => document.querySelectorAll('.jp-Notebook .jp-Cell').length > {index} && "
                           f"document.querySelectorAll('.jp-Notebook .jp-Cell')[{index}]"
                           ".querySelectorAll('.widget-slider .noUi-handle').length === 2")
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.scroll_into_view_if_needed()
    _shot(page, "00_reloaded.png")
    seen = _drag_seed_and_watch(page, cell, index, 60)
    _shot(page, "00_reloaded_after.png")
    assert seen[-1][2] != seen[0][2], "after a page reload the slider no longer redraws the figure"
    assert page.evaluate(f"({VISIBLE_IMAGES})({index}).length") == 1, "after a reload two figures show"
    page.close()


def _drag_seed_and_watch(page, cell, index, dx) -> list:
    """Drag the cell's first slider ``dx`` px to the right; wait until its figure changes; return what was seen."""
    before = cell.locator(".widget-slider").first.locator(".widget-readout").inner_text()
    page.evaluate(WATCH_FIGURE, index)
    handle = cell.locator(".widget-slider").first.locator(".noUi-handle")
    box = handle.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + dx, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    seed = cell.locator(".widget-slider").first.locator(".widget-readout").inner_text()
    assert seed.strip() not in ("", before.strip()), f"the slider did not move (readout {before!r} -> {seed!r})"
    page.wait_for_function("() => window.__figure.length > 1 && "
                           "window.__figure[window.__figure.length - 1][2] !== window.__figure[0][2]",
                           timeout=WAIT_CEILING_S * 1000)
    page.wait_for_timeout(300)  # let the status line clear
    return page.evaluate("() => { clearInterval(window.__watch); return window.__figure; }")
