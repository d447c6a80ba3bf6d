"""The review app in a real Chromium (Playwright), served by ``streamlit run`` on the session's
tiny pipeline: sign in, open the top study, see the heat-map overlay. Leaves a screenshot in
``test-artifacts/study.png``."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_settings
from workbench import users

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT_S = 90
USER, PASSWORD = "browser", "browser-fixture-password"  # test fixture only, not a secret

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"streamlit not healthy after {START_TIMEOUT_S}s:\n{log.read_text()}")


@pytest.fixture
def app_url(pipeline, tmp_path: Path) -> Iterator[str]:
    """``streamlit run streamlit_app.py`` on a free port, on a private copy of the catalog."""
    home = tmp_path / "home"
    home.mkdir()
    db = home / "workbench.db"
    src = pipeline.settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(src) as a, sqlite3.connect(db) as b:
        a.backup(b)
    users.add_user(make_settings(home), "test", USER, "clinician", PASSWORD)
    env = {
        **os.environ,
        "WORKBENCH_HOME": str(home),
        "WORKBENCH_DATABASE_URL": f"sqlite:///{db}",
        "WORKBENCH_CACHE": str(pipeline.settings.cache_dir),
        "WORKBENCH_MODELS": str(pipeline.settings.models_dir),
        "PYTHONUNBUFFERED": "1",
    }
    port = free_port()
    log = tmp_path / "streamlit.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                "streamlit_app.py",
                "--server.port",
                str(port),
                "--server.address",
                "127.0.0.1",
                "--server.headless",
                "true",
                "--browser.gatherUsageStats",
                "false",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}/_stcore/health", proc, log)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_a_clinician_signs_in_and_sees_the_heatmap_overlay(app_url: str) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    sync_api.expect.set_options(timeout=60_000)  # the first page load imports torch
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1300})
            page.set_default_timeout(60_000)
            page.goto(app_url)
            page.get_by_label("User name").fill(USER)
            page.get_by_label("Password", exact=True).fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            sync_api.expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
            page.get_by_role("button", name="Open study").click()
            sync_api.expect(page.get_by_role("heading", name="Study S")).to_be_visible()

            caption = page.get_by_text("heat-map overlay", exact=False)
            sync_api.expect(caption).to_be_visible()
            overlay = page.locator("[data-testid='stImage']", has=caption).locator("img")
            sync_api.expect(overlay).to_be_visible()
            overlay.evaluate("img => img.decode()")  # fully loaded before measuring
            natural = overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            box = overlay.bounding_box()
            assert natural[0] > 0 and natural[1] > 0
            assert box is not None and box["width"] > 100 and box["height"] > 100
            sync_api.expect(page.get_by_text("Do you agree with the model?")).to_be_visible()
            page.wait_for_timeout(500)  # let the last fonts and charts settle
            page.screenshot(path=str(ARTIFACTS / "study.png"), full_page=True)
        finally:
            browser.close()
