"""The MLflow UI in a real headless Chromium, served by `mlflow server` over a small workflow run's store.

Needs Debian's chromium and chromium-driver (`make test` installs them as root). Screenshots are
kept as test artifacts in $VISIONQC_TEST_ARTIFACTS (default .test-artifacts/).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from conftest import REPO

BIN = Path(sys.executable).parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--window-size=1600,2400"]
ARTIFACTS = Path(os.environ.get("VISIONQC_TEST_ARTIFACTS", REPO / ".test-artifacts"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mlflow_server(finished_workflow, tmp_path):
    """`mlflow server` on 127.0.0.1 over the run's sqlite store; stopped by its PID afterwards."""
    port = free_port()
    store = f"sqlite:///{finished_workflow}/results/mlflow/mlflow.db"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", store, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"mlflow server did not answer in 60 s: {(tmp_path / 'server.log').read_text()[-2000:]}")
        yield url, store
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its worker, by the PID we started
        server.wait(timeout=30)
        log.close()
    assert server.returncode is not None


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait_for_text(driver, texts: list[str], seconds: float = 60) -> str:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + seconds
    while True:
        body = driver.find_element(By.TAG_NAME, "body").text
        if all(text in body for text in texts) or time.monotonic() > deadline:
            return body
        time.sleep(0.5)


def close_assistant(driver) -> None:
    """The assistant side panel opens by default and covers part of the page."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
        button.click()


@pytest.mark.slow
def test_every_stage_run_is_listed_and_the_training_runs_compare(mlflow_server, browser):
    from selenium.webdriver.common.by import By

    url, store = mlflow_server
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("visionqc").experiment_id
    runs = client.search_runs([experiment])
    stages = {run.info.run_name.split(":")[0] for run in runs}
    assert stages >= {"pipeline", "convert", "validate", "fuse", "cache", "train", "merge", "stage_a", "stage_b"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    # the runs table (the model-training view, not the GenAI overview), every pipeline row expanded
    browser.get(f"{url}/#/experiments/{experiment}/runs?workflowType=machine_learning")
    wait_for_text(browser, ["pipeline"])
    close_assistant(browser)
    for expander in browser.find_elements(By.CSS_SELECTOR, 'button[data-component-id*="runnamecellrenderer"]'):
        expander.click()
    expected = sorted(run.info.run_name for run in runs)
    deadline = time.monotonic() + 30
    while (listed := sorted(a.text for a in browser.find_elements(By.CSS_SELECTOR, 'a[href*="/runs/"]'))) != expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    browser.save_screenshot(str(ARTIFACTS / "mlflow-runs.png"))
    assert listed == expected

    # the compare view of the two training runs shows both runs and their metrics
    trains = {run.info.run_name: run for run in runs if run.info.run_name.startswith("train:")}
    assert set(trains) == {"train:demo", "train:demo_lora"}
    ids = json.dumps([run.info.run_id for run in trains.values()])
    browser.get(f"{url}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment])}")
    # the metrics table renders its first rows only; they are the per-source eval curves (eval/<source>_…)
    first = "eval/demo_platform_loss"
    page = wait_for_text(browser, ["Comparing 2 Runs", *trains, first])
    close_assistant(browser)
    browser.save_screenshot(str(ARTIFACTS / "mlflow-compare.png"))
    assert "Comparing 2 Runs" in page and all(name in page for name in trains)
    for metric in (first, "eval/demo_platform_token_acc", "eval/demo_verdicts_loss"):
        assert f"\n{metric}\n" in page, metric
    for run in trains.values():
        value = run.data.metrics[first]
        shown = {f"{value:.4g}", f"{value:.3g}", f"{round(value, 3)}", f"{round(value, 2)}"}
        assert any(text in page for text in shown), (run.info.run_name, value)
