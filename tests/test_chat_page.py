"""The chat page at / in a real headless browser (Debian's chromium + chromium-driver, via selenium).

.ci/run installs chromium with apt-get, so this runs in CI; a missing browser is a failure, not a
skip, unless FOUNDRY_NO_BROWSER=1 says explicitly that no browser is wanted on this machine.
"""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest
from server_helpers import RunningServer
from tiny_models import TinySpec, write_tiny_model

import foundry_mlx as fm

if os.environ.get("FOUNDRY_NO_BROWSER") == "1":
    pytest.skip("FOUNDRY_NO_BROWSER=1: no browser wanted here", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("page") / "tiny.gguf", TinySpec(seed=10, context=1 << 15))


@pytest.fixture(scope="module")
def server(tiny):
    running = RunningServer(str(tiny.path))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    assert binary and driver_path, "chromium and chromium-driver are needed: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def set_field(browser, field: str, value: str) -> None:
    element = browser.find_element(By.ID, field)
    element.clear()
    element.send_keys(value)


def open_page(browser, server) -> WebDriverWait:
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "model").text.startswith("tiny"))
    return wait


def test_send_a_message_and_see_the_streamed_reply(browser, server, tiny):
    model, tokenizer = fm.load(str(tiny.path), progress=False)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello the world"}], add_generation_prompt=True)
    expected = fm.generate(model, tokenizer, prompt, max_tokens=24, temperature=0)
    wait = open_page(browser, server)
    set_field(browser, "temperature", "0")
    set_field(browser, "max_tokens", "24")
    # Count how many times the reply's text changes: more than once means it arrived in pieces.
    browser.execute_script("""
        window.updates = 0;
        new MutationObserver(() => { window.updates += 1; })
            .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)
    set_field(browser, "prompt", "hello the world")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".assistant .stats").text)
    reply = browser.find_element(By.CSS_SELECTOR, ".assistant .content").text
    stats = browser.find_element(By.CSS_SELECTOR, ".assistant .stats").text
    assert browser.find_element(By.CSS_SELECTOR, ".user").text == "hello the world"
    assert reply == expected.strip() or reply == expected  # the DOM's .text trims edge whitespace
    assert "tokens" in stats and "tok/s" in stats, stats
    assert browser.execute_script("return window.updates") > 3


def test_stop_button_ends_the_reply_and_frees_the_slot(browser, server):
    wait = open_page(browser, server)
    browser.find_element(By.ID, "ignore_eos").click()  # a reply that only Stop (or 30,000 tokens) ends
    set_field(browser, "max_tokens", "30000")
    set_field(browser, "prompt", "tell me everything")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: len(b.find_element(By.CSS_SELECTOR, ".assistant .content").text) > 0)
    assert httpx.get(f"{server.url}/health").json()["live"] == 1
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".assistant .stats").text)
    assert "stopped" in browser.find_element(By.CSS_SELECTOR, ".assistant .stats").text
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health").json()["live"] != 0:
        assert time.monotonic() < deadline, "the stopped reply still holds its slot"
        time.sleep(0.1)
    assert browser.find_element(By.ID, "send").is_enabled()
