"""The panel in a real browser: JupyterLab + Playwright driving Debian's Chromium.

The notebook loads the embedded Gemma at ctx 1024 and shows the panel; the
test types 2048 into the form, sees the reload warning, clicks Apply, and
watches the row go loading → ready with a new pid. A screenshot of the
result is saved in build/screenshots/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest

pytestmark = [pytest.mark.real, pytest.mark.browser]
CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).parent.parent / "build" / "screenshots"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-quic"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium (apt-get)")
    root = tmp_path_factory.mktemp("lab")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%load_ext lemon_magic"),
                nbformat.v4.new_code_cell("%lemon_load gemma3-270m --ctx-size 1024"),
                nbformat.v4.new_code_cell("panel = %lemon_panel\npanel.wait_idle()\npanel")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "panel.ipynb")
    settings = root / "settings"
    settings.mkdir()
    (settings / "overrides.json").write_text(json.dumps(
        {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false",
                                                          "checkForUpdates": False}}))
    port, token = _free_port(), "lemon-test-token"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / "config"),
           "JUPYTER_DATA_DIR": str(root / "data"), "JUPYTER_RUNTIME_DIR": str(root / "runtime")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", f"--LabApp.workspaces_dir={root / 'ws'}",
         f"--LabApp.user_settings_dir={root / 'user-settings'}",
         f"--LabServerApp.app_settings_dir={settings}"],
        env=env, stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/api/status?token={token}", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail("JupyterLab did not start:\n" + (root / "server.log").read_text()[-2000:])
        time.sleep(0.1)
    try:
        yield f"{url}/lab/tree/panel.ipynb?token={token}", root
    finally:
        server.terminate()  # shuts its kernels down; their routers stop the backends
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def _run_all(page: Any) -> None:
    """Run > Run All Cells; retried, because a click right after the page settles can be lost."""
    for _ in range(3):
        page.locator(".lm-MenuBar-item", has_text="Run").click()
        page.locator('li[data-command="runmenu:run-all"]').click()
        try:
            page.locator(".jp-InputPrompt", has_text="[1]:").first.wait_for(timeout=15_000)
            return
        except Exception:  # playwright's TimeoutError
            page.keyboard.press("Escape")
    raise AssertionError("Run All never started the notebook")


def test_reload_from_the_panel_in_jupyterlab(lab: tuple[str, Path]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, _root = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').wait_for(timeout=60_000)
            _run_all(page)

            row = page.locator(".widget-html", has_text="gemma3-270m").filter(has_text="pid").first
            expect(row).to_contain_text("ready", timeout=90_000)
            expect(row).to_contain_text("ctx 1024")
            old_pid = re.search(r"pid (\d+):", row.inner_text())
            assert old_pid is not None

            ctx = page.locator(".widget-text", has_text="ctx size").locator("input")
            expect(ctx).to_have_value("1024", timeout=30_000)  # prefilled with what is loaded
            ctx.fill("2048")
            ctx.press("Tab")
            banner = page.locator(".widget-html", has_text="will reload")
            expect(banner).to_contain_text("will reload gemma3-270m: ctx_size 1024 → 2048 — about",
                                           timeout=30_000)

            page.locator(".widget-button", has_text="Apply").click()
            expect(row).to_contain_text("loading", timeout=30_000)
            expect(row).to_contain_text("ready", timeout=90_000)
            expect(row).to_contain_text("ctx 2048")
            new_pid = re.search(r"pid (\d+):", row.inner_text())
            assert new_pid is not None and new_pid.group(1) != old_pid.group(1)
            expect(page.locator(".widget-html", has_text="no change (no-op)")).to_be_visible()

            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shot = SCREENSHOTS / "panel-after-reload.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


def test_chromium_is_debians() -> None:
    assert shutil.which("chromium") == CHROMIUM
