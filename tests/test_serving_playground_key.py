"""The playground on a server with an API key, in headless chromium: without the key the page shows the
server's 401 message, with the key typed in it generates (under the page's Content-Security-Policy)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("selenium")
pytest.importorskip("httpx")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from hypervocab.serving import ServeLimits, create_app  # noqa: E402

from .models import make  # noqa: E402
from .test_playground import browser, console_errors, direct, fill, generate_enabled, open_page, text_content  # noqa: E402, F401
from .test_serving import Server  # noqa: E402

PROMPT = "for i in range(10):\n    print(i)\n" * 2


def test_the_playground_sends_the_api_key(browser: Any,  # noqa: F811 (a pytest fixture)
                                           smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    model = make("llama", tok)
    s = Server(create_app(model, tok, model_name="tiny", api_key="sk-page",
                          limits=ServeLimits(max_prompt_tokens=400, max_tokens=64, max_queue=2)))
    try:
        open_page(browser, s, prompt=PROMPT, max_tokens=8)
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 60).until(generate_enabled, "the request did not end in 60 s")
        assert "this server needs an API key" in text_content(browser, "#output .error")

        fill(browser, "api_key", "sk-page")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 60).until(generate_enabled, "the generation did not finish in 60 s")
        assert not browser.find_elements(By.CSS_SELECTOR, "#output .error"), text_content(browser, "#output")
        assert text_content(browser, "#output") == direct(model, tok, tok(PROMPT)["input_ids"], 8)[0]
        # the 401 is a failed fetch the browser reports on its console; nothing else may be there
        assert all("401" in e for e in console_errors(browser)), console_errors(browser)
    finally:
        s.stop()
