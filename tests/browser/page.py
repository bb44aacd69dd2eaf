"""Driving the chat page in Debian's headless chromium, through selenium and
/usr/bin/chromedriver (named explicitly: selenium never downloads a browser)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select

from tests import harness

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The closed network refuses chromium's background connections: ask for none.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)

# Records every render of the last answer: (ms since page load, characters).
WATCH_RENDERS = """
window.__renders = [];
if (!window.__watching) {
  window.__watching = true;
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.target.classList && r.target.classList.contains('content') && r.target.closest('.message.assistant')) {
        window.__renders.push([performance.now(), r.target.textContent.length]);
      }
    }
  }).observe(document.getElementById('messages'), {childList: true, subtree: true});
}
"""


def start_chromium(
    profile: Path, log: Path, width: int = 1280, height: int = 900, extra_flags: tuple[str, ...] = ()
) -> webdriver.Chrome:
    os.environ.setdefault("SE_OFFLINE", "true")  # belt and braces: selenium-manager stays offline
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, *extra_flags):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER, log_output=str(log)))


class Page:
    """The chat page in one browser, with the waits its tests need."""

    def __init__(self, driver: webdriver.Chrome, screenshots: Path, name: str) -> None:
        self.driver = driver
        self.screenshots = screenshots
        self.name = name

    # -- basics -------------------------------------------------------------------

    def open(self, url: str, key: str | None = None, models: bool = True) -> Page:
        self.driver.get(f"{url}/")
        self.js("localStorage.clear()")
        if key:
            self.js("localStorage.setItem('tokenwire.apiKey', arguments[0])", key)
        self.driver.refresh()
        if models:
            self.wait(lambda: self.js("return document.getElementById('model').options.length") > 0, "model list")
        return self

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def el(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def els(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.js("return document.querySelector(arguments[0]).textContent", css)  # type: ignore[no-any-return]

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
        """harness.wait_until, where an element not there yet is a condition not met yet."""

        def met() -> Any:
            try:
                return condition()
            except NoSuchElementException:
                return None

        return harness.wait_until(met, timeout, interval=0.05, what=what)

    def shot(self, label: str) -> Path:
        path = self.screenshots / f"{self.name}-{label}.png"
        self.driver.save_screenshot(str(path))
        return path

    # -- the chat -------------------------------------------------------------------

    def choose_model(self, model: str) -> None:
        Select(self.el("#model")).select_by_value(model)

    def set_field(self, css: str, value: str) -> None:
        field = self.el(css)
        field.clear()
        field.send_keys(value)

    def ask(self, question: str) -> None:
        """Type the question and press Enter, as a person would."""
        self.js(WATCH_RENDERS)
        prompt = self.el("#prompt")
        prompt.send_keys(question)
        prompt.send_keys(Keys.ENTER)

    def answers(self) -> list[WebElement]:
        return self.els("#messages .message.assistant")

    def answer_state(self) -> str | None:
        return self.js(  # type: ignore[no-any-return]
            "const a = document.querySelectorAll('#messages .message.assistant');"
            "return a.length ? a[a.length - 1].dataset.state : null"
        )

    def answer_text(self) -> str:
        return self.js(  # type: ignore[no-any-return]
            "const a = document.querySelectorAll('#messages .message.assistant .content');"
            "return a.length ? a[a.length - 1].textContent : ''"
        )

    def answer_part(self, css: str) -> str:
        """The text of a part (.meta, .error) of the last answer, '' when absent."""
        return self.js(  # type: ignore[no-any-return]
            "const a = document.querySelectorAll('#messages .message.assistant');"
            "const part = a.length && a[a.length - 1].querySelector(arguments[0]);"
            "return part ? part.textContent : ''",
            css,
        )

    def answer_data(self, name: str) -> str:
        """A data- attribute of the last answer."""
        return self.js(  # type: ignore[no-any-return]
            "const a = document.querySelectorAll('#messages .message.assistant'); return a[a.length - 1].dataset[arguments[0]]",
            name,
        )

    def wait_answer(self, timeout: float = 120.0) -> str:
        """Until the last answer is finished (done, stopped or error); its state."""
        return self.wait(  # type: ignore[no-any-return]
            lambda: (state := self.answer_state()) in ("done", "stopped", "error") and state, "the answer", timeout
        )

    def cluster_rows(self) -> dict[str, str]:
        """The cluster table's worker rows, model -> text, read at once (it re-renders every few seconds)."""
        return self.js(  # type: ignore[no-any-return]
            "const rows = {};"
            "for (const r of document.querySelectorAll('#cluster tbody tr.worker'))"
            " rows[r.dataset.model] = r.innerText;"
            "return rows"
        )

    def renders(self) -> list[tuple[float, int]]:
        return [tuple(r) for r in self.js("return window.__renders || []")]  # type: ignore[misc]
