"""The playground page at ``/``, end to end in a real headless browser (Debian's chromium, via selenium).

The page is driven like a person would: type a prompt, untick chat, click Generate, then read what the
page shows.  What it shows is checked against a direct greedy ``generate`` of the same prompt on the same
tiny model, so the test covers the whole path: page -> fetch -> SSE -> engine -> pieces -> spans.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

selenium = pytest.importorskip("selenium")
httpx = pytest.importorskip("httpx")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from hypervocab.generation import SequenceStats  # noqa: E402
from hypervocab.serving import ServeLimits, create_app  # noqa: E402

from .models import make  # noqa: E402
from .test_serving import Server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# repeated lines, so that the prompt compresses and the tiny model's greedy output uses hypertokens
PROMPT = "for i in range(10):\n    print(i)\n" * 3
# the prompt test_serving's disconnect test uses: its greedy output does not hit EOS within 3000 tokens
LONG_PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef"
MAX_TOKENS = 48
LONG_MAX_TOKENS = 3000


@pytest.fixture(scope="module")
def model(smollm2_tokenizer: Any) -> Any:
    return make("llama", smollm2_tokenizer)


@pytest.fixture(scope="module")
def server(model: Any, smollm2_tokenizer: Any) -> Iterator[Server]:
    # max_tokens is raised so that the Stop test has a generation long enough to interrupt
    app = create_app(model, smollm2_tokenizer, model_name="tiny",
                     limits=ServeLimits(max_prompt_tokens=400, max_tokens=LONG_MAX_TOKENS, max_queue=4))
    s = Server(app)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"the playground test needs Debian's chromium and chromedriver; missing: {', '.join(missing)}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    # the page's console errors are read at the end of each test: a JS exception must fail the test
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def direct(model: Any, tok: Any, ids: list[int], max_tokens: int) -> tuple[str, SequenceStats]:
    """What a direct greedy ``generate`` writes for these base ids, as the engine runs it: (text, stats)."""
    codes = torch.as_tensor(model.codec.encode(ids))[None]
    with torch.no_grad():
        out = model.generate(codes, torch.ones_like(codes), max_new_tokens=max_tokens,
                             max_new_base_tokens=max_tokens, return_dict_in_generate=True)
    return tok.decode(out.new_base_ids[0], skip_special_tokens=True), out.stats[0]


def text_content(driver: WebDriver, css: str) -> str:
    """The exact text of an element: ``.text`` would give the rendered text, trimmed at the ends."""
    return driver.execute_script("return document.querySelector(arguments[0]).textContent", css)


def fill(driver: WebDriver, element_id: str, value: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


def open_page(driver: WebDriver, server: Server, *, prompt: str, max_tokens: int) -> None:
    """Load ``/`` and set the form: the prompt typed in, completions mode (chat unticked), greedy."""
    driver.get(server.url + "/")
    assert "hypervocab playground" in driver.title
    fill(driver, "prompt", prompt)
    # typed keys, not a value set by script: the textarea must hold exactly the prompt, newlines included
    assert driver.find_element(By.ID, "prompt").get_property("value") == prompt
    chat = driver.find_element(By.ID, "chat")
    if chat.is_selected():
        chat.click()
    assert not chat.is_selected()
    fill(driver, "max_tokens", str(max_tokens))
    fill(driver, "temperature", "0")


def generate_enabled(driver: WebDriver) -> bool:
    return driver.find_element(By.ID, "go").is_enabled()


def console_errors(driver: WebDriver) -> list[str]:
    """SEVERE console messages, but the browser's own request for /favicon.ico (the page has none)."""
    return [e["message"] for e in driver.get_log("browser") if "favicon.ico" not in e["message"]]


def test_generate_shows_the_greedy_text_hypertokens_and_compression(browser, server, model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok(PROMPT)["input_ids"]  # /v1/completions tokenizes with the tokenizer's special tokens
    prompt_codes = len(model.codec.encode(ids))
    want, st = direct(model, tok, ids, MAX_TOKENS)
    assert want and prompt_codes < len(ids)  # the test is only meaningful if the prompt compresses

    open_page(browser, server, prompt=PROMPT, max_tokens=MAX_TOKENS)
    browser.find_element(By.ID, "go").click()
    # the click handler disables Generate before its first await (before the click returns), so this
    # waits for the whole stream and its `finally`, not for a state from before the click
    WebDriverWait(browser, 120).until(generate_enabled, "the generation did not finish in 120 s")

    assert not browser.find_elements(By.CSS_SELECTOR, "#output .error"), text_content(browser, "#output")
    assert text_content(browser, "#output") == want
    hyper = browser.find_elements(By.CSS_SELECTOR, "#output span.hyper")
    # a hypertoken is the only thing that flags a piece, so hyper spans appear exactly when it wrote one
    assert bool(hyper) == (st.hypertokens > 0), (len(hyper), st)
    assert st.hypertokens > 0, "pick a prompt whose greedy output uses hypertokens"
    assert all(browser.execute_script("return arguments[0].textContent", s) for s in hyper)

    stats = text_content(browser, "#stats")
    assert stats.startswith(f"prompt: {len(ids)} tokens read as {prompt_codes} codes "), stats
    assert f"output: {st.base_tokens} tokens in {st.codes} steps" in stats, stats
    assert stats.endswith(f"| {st.hypertokens} hypertokens"), stats
    assert not browser.find_element(By.ID, "stop").is_enabled()
    assert console_errors(browser) == []


def test_stop_cancels_the_generation_on_the_server(browser, server):
    before = httpx.get(server.url + "/health").json()["cancelled"]
    open_page(browser, server, prompt=LONG_PROMPT, max_tokens=LONG_MAX_TOKENS)
    browser.find_element(By.ID, "go").click()
    # poll often: on a fast machine the whole generation takes a few seconds, and Stop must come before its end
    WebDriverWait(browser, 120, poll_frequency=0.05).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#output span"),
                                                          "no output appeared in 120 s")
    stop = browser.find_element(By.ID, "stop")
    assert stop.is_enabled()
    stop.click()
    WebDriverWait(browser, 60).until(generate_enabled, "Generate was not enabled again after Stop")
    assert not browser.find_element(By.ID, "stop").is_enabled()
    # an abort is not an error: the page shows what it got and nothing else
    assert not browser.find_elements(By.CSS_SELECTOR, "#output .error"), text_content(browser, "#output")
    assert text_content(browser, "#output")
    # the final chunk (with the usage) never came, so the stats line is still the running one
    assert text_content(browser, "#stats").startswith("output: ")

    # the server notices the closed connection and stops the work at the next step
    deadline = time.monotonic() + 60
    while (health := httpx.get(server.url + "/health").json())["cancelled"] == before:
        assert time.monotonic() < deadline, f"the generation went on after Stop: {health}"
        time.sleep(0.1)
    assert health["cancelled"] == before + 1 and health["waiting"] == 0
    assert console_errors(browser) == []
