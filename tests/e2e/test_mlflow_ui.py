"""The MLflow UI as a user sees it, in a real browser: the demo sweep (`nllflow run
experiments/gamma_lr_sweep.yaml`) recorded into a temporary store, an MLflow server over that store
on a loopback port, and Debian's Chromium driven by Playwright. The link nllflow prints opens the
experiment on its runs list; the parent expands to one child per learning rate; the Dataset column
names the data; the chart view draws one NLL curve per learning rate, the values MLflow stored.

With NLLFLOW_SCREENSHOTS=DIR the runs list and the chart view are saved there as runs-list.png and
chart-view.png (the README shows them: tests/e2e/screenshots/)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (.[test])")

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments" / "gamma_lr_sweep.yaml"
DEMO_TIMEOUT_SECONDS = 600
SERVER_TIMEOUT_SECONDS = 120  # healthy after 6-12 s here, once 31 s under load
BROWSER_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# a first visit without MLflow's assistant panel opening over the page; the page's mode (model
# training, not GenAI) must come from the link nllflow prints alone
QUIET_ASSISTANT = """
window.localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
window.localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
"""


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo sweep, as `make demo` runs it, into a temporary nllflow home: (its --json
    summary, the tracking URI)."""
    home = tmp_path_factory.mktemp("ui-home")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "NLLFLOW_"))}
    env.update(
        NLLFLOW_HOME=str(home),
        MLFLOW_TRACKING_URI=uri,
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # the command's own process, as a first `make demo`; a warm runner would only load the suite
        NLLFLOW_WARM="0",
    )
    nllflow = str(Path(sys.executable).with_name("nllflow"))
    process = subprocess.Popen(
        [nllflow, "run", str(DEMO.relative_to(ROOT)), "--json"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=DEMO_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        _stop(process)
        pytest.fail(f"the demo sweep did not finish within {DEMO_TIMEOUT_SECONDS} s")
    finally:
        _stop(process)
        # the background Prefect server the command started (a session of its own), by its PID
        subprocess.run([nllflow, "server", "stop"], env=env, capture_output=True, timeout=120)
    assert process.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1]), uri


@pytest.fixture(scope="module")
def mlflow_ui(demo, tmp_path_factory):
    """`mlflow server` over the demo's store on a free loopback port; its URL. Stopped by PID
    (its process group), also when the start or a test fails."""
    _, uri = demo
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                "--backend-store-uri",
                uri,
                "--default-artifact-root",
                str(log.parent / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT_SECONDS
        while True:
            assert process.poll() is None, f"mlflow server exited:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"mlflow server not healthy after {SERVER_TIMEOUT_SECONDS} s"
            time.sleep(1)
        yield url
    finally:
        _stop(process)


def _screenshot(page, name: str) -> None:
    folder = os.environ.get("NLLFLOW_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))


def test_the_demo_sweep_in_the_mlflow_ui(demo, mlflow_ui):
    from mlflow.tracking import MlflowClient

    from nllflow.tracking.recorder import COLOUR_TAG, PARENT_TAG
    from nllflow.tracking.store import ui_command

    expect = sync_api.expect
    summary, uri = demo
    experiment_id, parent_id = summary["experiment_id"], summary["parent_run_id"]
    # what the store holds (the oracle for what the page shows), and the rates the spec sweeps
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    children = {
        run.info.run_name: run
        for run in client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=100)
    }
    rates = yaml.safe_load(DEMO.read_text())["sweep"]["lr"]
    assert sorted(children) == sorted(f"gamma adam lr={lr:g}" for lr in rates)
    datasets = {
        f"{d.dataset.name} ({d.dataset.digest})" for run in children.values() for d in run.inputs.dataset_inputs
    }
    (dataset,) = datasets
    histories = {
        name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, "nll")}
        for name, run in children.items()
    }
    # the page of the link nllflow prints
    page_path = re.search(r"#/experiments/\S+", ui_command(uri, experiment_id)).group(0)
    assert page_path == f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"

    expect.set_options(timeout=20_000)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            context.add_init_script(QUIET_ASSISTANT)
            page = context.new_page()
            page.goto(f"{mlflow_ui}/{page_path}")  # never wait for "networkidle": the page polls

            # the runs list of model training, not GenAI's overview
            expect(page.locator('[role="grid"]')).to_be_visible()
            expect(page.locator('h2:text-is("Runs")')).to_be_visible()
            expect(page.locator('h2:text-is("Overview")')).to_have_count(0)

            # the parent, collapsed, expands to its children
            parent_row = page.locator('[role="row"]').filter(has=page.get_by_text(parent.info.run_name, exact=True))
            expect(parent_row).to_have_count(1)
            parent_row.locator('button[data-component-id*="runnamecellrenderer"]').click()
            for name in children:
                expect(page.get_by_text(name, exact=True)).to_be_visible()

            # the Dataset column names the data (name and digest) on every child
            expect(page.get_by_test_id("sort-header-Dataset")).to_be_visible()
            cells = page.locator('[role="gridcell"][col-id="attributes.`Dataset`"]', has_text=dataset)
            expect(cells).to_have_count(len(children))
            _screenshot(page, "runs-list.png")

            # the chart view: the NLL per step, one curve per learning rate
            page.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()
            expect(page).to_have_url(re.compile("compareRunsMode=CHART"))
            page.get_by_placeholder("Search metric charts").fill("nll")
            card = page.get_by_test_id("experiment-view-compare-runs-card").filter(has=page.locator('h4[title="nll"]'))
            expect(card).to_be_visible()
            for name in children:
                expect(card.get_by_text(f"{name} (nll)", exact=True)).to_be_visible()
            lines = card.locator("g.scatterlayer g.trace.scatter path.js-line")
            expect(lines).to_have_count(2 * len(children))  # plotly draws each run twice: the line, a faint copy
            # one colour per run, from the figure plotly was given (what is painted depends on hover
            # and on plotly's fade-in transitions, which a loaded machine catches mid-way)
            colours = card.locator(".js-plotly-plot").evaluate(
                "plot => plot.data.map(t => [t.name, (t.line || {}).color || (t.marker || {}).color])"
            )
            by_run = {name: sorted(colour for run, colour in colours if run == name) for name in children}
            # each run: its line in the colour nllflow tagged it with (distinct, in the order of the
            # rates) and a faint copy, the same colour with an alpha channel
            tagged = {name: run.data.tags[COLOUR_TAG] for name, run in children.items()}
            assert by_run == {name: [colour, colour + "26"] for name, colour in tagged.items()}
            assert len(set(tagged.values())) == len(children)

            # full screen, for the picture and for the numbers the chart was given
            card.locator('button[data-component-id="fullscreen_button_chartcard"]').click()
            dialog = page.get_by_role("dialog")
            expect(dialog.locator("g.scatterlayer g.trace.scatter path.js-line")).to_have_count(2 * len(children))
            traces = dialog.locator(".js-plotly-plot").evaluate("plot => plot.data.map(t => [t.name, t.x, t.y])")
            assert {name for name, _, _ in traces} == set(children)
            for name, steps, values in traces:
                stored = histories[name]
                # MLflow samples long histories; every point drawn is a stored one, first and last included
                assert steps[0] == 0 and steps[-1] == max(stored)
                assert all(stored[step] == value for step, value in zip(steps, values, strict=True))
            page.wait_for_timeout(1000)  # plotly's transition, for the picture only
            _screenshot(page, "chart-view.png")
        finally:
            browser.close()
