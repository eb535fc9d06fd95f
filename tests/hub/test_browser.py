"""The web page in a real browser: Debian's chromium driven by Playwright (no browser download).

Needs ``scripts/setup-browser.sh`` (chromium from apt, playwright from PyPI); skipped, saying so, only
when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hub_testing import Server, make_artifact

from adapterkit.hub import RemoteRegistry

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent; run scripts/setup-browser.sh"),
]


def test_search_open_adapter_and_download_in_chromium(hub_server: Server, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is missing; run scripts/setup-browser.sh")
    art = make_artifact(tmp_path / "sms.safetensors", seed=4242, description="Flags SMS spam")
    with RemoteRegistry(hub_server.url, hub_server.tokens["alice"], cache_dir=tmp_path / "cache") as reg:
        reg.publish(art, "browser-team/sms-spam", metrics={"accuracy": 0.981})
        reg.publish(make_artifact(tmp_path / "other.safetensors", seed=4243), "browser-team/other-task")

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, timeout=TIMEOUT_MS)
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(hub_server.url + "/")
            page.fill("#q", "browser-team sms")  # the server is shared: only this test's adapter matches
            page.click("#search-button")
            page.wait_for_url("**/?q=browser-team+sms")
            links = page.locator("a.adapter-link")
            assert links.all_inner_texts() == ["browser-team/sms-spam"]
            assert "accuracy=0.981" in page.inner_text("#adapters")
            shots = tmp_path / "screenshots"
            shots.mkdir()
            page.screenshot(path=str(shots / "search.png"), full_page=True)

            links.first.click()
            page.wait_for_url("**/adapters/browser-team/sms-spam")
            assert page.inner_text("#adapter-title") == "browser-team/sms-spam"
            assert "load_adapter('hub:browser-team/sms-spam@1')" in page.inner_text("#snippet")
            assert "Flags SMS spam" in page.content()

            href = page.get_attribute("a.download", "href")
            assert href == "/api/adapters/browser-team/sms-spam/versions/1/file"
            response = page.request.get(hub_server.url + href)
            assert response.status == 200
            assert response.body() == art.read_bytes()

            shot = shots / "adapter-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 1000
        finally:
            browser.close()
