"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium): open the page of a running `orch serve`, see the nodes of a
spawned family, start a job from the page, watch it finish; a screenshot is saved.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import fleet
from orchestrator.state import Store
from orchestrator.workspace import Workspace
from tests.helpers.serving import serving
from tests.helpers.workspace import primes_workspace

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.sshd,
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them as root)"),
]
ORCH = [sys.executable, "-m", "orchestrator"]
PRIMES_BELOW_300000 = 25997


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Workspace, str, str]]:
    """A workspace with two ready local nodes and `orch serve`: (ws, url, token)."""
    ws = primes_workspace(tmp_path / "ws", count=2, max_nodes=4)
    with serving(ws) as server:
        spawned = server.post("/nodes/spawn", {"family": "workers"})
        assert spawned.status_code == 200 and spawned.json()["ok"], spawned.text
        yield ws, server.url, server.token


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    # The driver is Debian's: Selenium Manager would try to download one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_dashboard_shows_the_fleet_starts_a_job_and_watches_it_finish(
        served: tuple[Workspace, str, str], browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    ws, url, token = served
    browser.get(f"{url}/#token={token}")
    assert "token=" not in browser.current_url, "the token leaves the address bar"

    def fleet_rows() -> list[Any]:
        return browser.find_elements(By.CSS_SELECTOR, "[data-group='local / workers'] tr[data-node]")

    rows = wait_for("the two nodes of workers on the page", lambda: len(fleet_rows()) == 2 and fleet_rows(), 30)
    with Store.open(ws.state_db) as store:
        ids = sorted(n.id for n in fleet.select_nodes(store, family="workers"))
    assert sorted(r.get_attribute("data-node") for r in rows) == ids
    assert all(r.find_element(By.CSS_SELECTOR, ".state").text == "ready" for r in rows)

    browser.find_element(By.ID, "job-input").clear()
    browser.find_element(By.ID, "job-input").send_keys("0:300000")
    browser.find_element(By.ID, "job-submit").click()
    job_row = wait_for("the job on the page",
                       lambda: browser.find_elements(By.CSS_SELECTOR, "#jobs tr[data-job]"), 20)[0]
    job_id = job_row.get_attribute("data-job")
    wait_for("the job done on the page", lambda: browser.find_elements(
        By.CSS_SELECTOR, f"#jobs tr[data-job='{job_id}'][data-state='done']"), 120)
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    assert browser.find_element(By.ID, "error").text == ""
    assert not browser.find_element(By.ID, "token-form").is_displayed(), "the token came in the URL"

    # What the page started is a real job: its output counts the primes below 300,000.
    result = subprocess.run([*ORCH, "job", "result", job_id], cwd=ws.root, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "ORCH_WORKSPACE": str(ws.root)})
    assert result.returncode == 0, result.stderr
    assert sum(int(x) for x in result.stdout.split()) == PRIMES_BELOW_300000
    status = json.loads(subprocess.run([*ORCH, "job", "status", job_id, "--json"], cwd=ws.root, capture_output=True,
                                       text=True, timeout=60).stdout)
    assert status["state"] == "done" and status["nodes"] and set(status["nodes"]) <= set(ids)
    events = browser.find_element(By.ID, "events").text
    assert "job.done" in events or "job.running" in events
