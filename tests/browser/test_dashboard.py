"""The dashboard in a real headless browser (Debian's chromium, driven by Selenium through chromium-driver),
against the session stack: log in, see the node and the model's replicas, run a mission and watch its
clones and then its consensus appear. A screenshot is kept under the test's tmp dir; with
MAGI_DOCS_SCREENSHOT=<path> it is also written there (how docs/dashboard.png is made)."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from pathlib import Path

import pytest

from protos.mission import MissionReply, MissionRequest
from shared import bus

MODEL = "smollm2-135m"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

# Decided before any fixture, so a machine without the browser does not start the stack only to skip.
pytestmark = [pytest.mark.browser, pytest.mark.timeout(300),
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                 reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                        "chromium-driver; .ci/run installs them where it can)")]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--hide-scrollbars"):
        options.add_argument(arg)
    # The driver from Debian, by path: Selenium Manager never downloads one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout: float, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}") from None


def _find(css: str):
    from selenium.webdriver.common.by import By

    return lambda driver: driver.find_elements(By.CSS_SELECTOR, css)


async def test_dashboard_shows_nodes_replicas_and_a_mission_live(browser, gateway_url, api_key, nc, tmp_path):
    from selenium.webdriver.common.by import By

    base = gateway_url.removesuffix("/v1")
    browser.get(base + "/")
    key = _wait(browser, lambda d: d.find_element(By.ID, "key") if d.find_element(By.ID, "key").is_displayed()
                else False, 20, "the login form")
    assert not browser.find_element(By.ID, "board").is_displayed()  # nothing before the key
    key.send_keys("wrong key\n")
    _wait(browser, lambda d: "refused" in d.find_element(By.ID, "login-error").text, 20, "the refusal")
    browser.find_element(By.ID, "key").send_keys(api_key + "\n")

    node = _wait(browser, _find('[data-node="testnode"]'), 30, "the local node")[0]
    assert "HEALTHY" in node.text and "RAM" in node.text
    assert browser.get_cookie("magi_dashboard")["httpOnly"]
    assert browser.execute_script("return document.cookie") == ""  # the session is out of the script's reach
    _wait(browser, _find(f'[data-model="{MODEL}"] tr[data-replica][data-state="ready"]'), 60, "a ready replica")
    _wait(browser, lambda d: d.find_element(By.ID, "link").text == "live", 20, "the live feed")

    mission_id = f"browser-{uuid.uuid4().hex[:10]}"
    # Markup in the prompt must show as text, never become markup.
    prompt = "Which colour is the sky on a clear day? Answer in <b id=injected>plain words</b>."
    mission = MissionRequest(prompt=prompt, variations=["in one word", "in one line", "as a question"],
                             max_tokens=24, consensus="medoid", mission_id=mission_id)
    run = asyncio.create_task(bus.request(nc, "magi.mission.run", mission, MissionReply, timeout=180))
    card = f'[data-mission="{mission_id}"]'
    await asyncio.to_thread(_wait, browser, _find(card), 60, "the mission arriving")
    done = await asyncio.to_thread(_wait, browser, _find(f'{card} [data-clone][data-state="done"]'), 120,
                                   "a clone finishing")
    assert done, "a clone appeared"
    reply = await run
    answer = await asyncio.to_thread(_wait, browser, _find(f"{card} .consensus .answer"), 60, "the consensus")
    assert " ".join(answer[0].text.split()) == " ".join(reply.consensus.answer.split())
    clones = browser.find_elements(By.CSS_SELECTOR, f'{card} [data-clone][data-state="done"]')
    assert sorted(c.get_attribute("data-clone") for c in clones) == sorted(c.clone_id for c in reply.clones)
    assert browser.find_element(By.CSS_SELECTOR, f"{card} h3").text == prompt
    assert not browser.find_elements(By.ID, "injected")
    _wait(browser, _find(f'[data-history="{mission_id}"]'), 10, "the mission in the history")
    # The replicas' load follows (the model list is read every 2 s while someone watches).
    _wait(browser, lambda d: sum(int(r.get_attribute("data-served")) for r in
                                 d.find_elements(By.CSS_SELECTOR, f'tr[data-replica][data-model="{MODEL}"]'))
          >= len(reply.clones), 20, "the replicas' served count")

    # What a user sees, kept: the page at full height, so every panel is in the picture.
    height, chrome = browser.execute_script("return [document.documentElement.scrollHeight, "
                                            "window.outerHeight - window.innerHeight]")
    browser.set_window_size(1280, min(height + chrome, 2400))
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("MAGI_DOCS_SCREENSHOT"):
        target = Path(os.environ["MAGI_DOCS_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
