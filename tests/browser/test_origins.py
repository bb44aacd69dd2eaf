"""A hostile page in Debian's headless chromium, against a bridge with no API keys (the
zero-configuration default): a page served from another local origin (another port) cannot
drive it, a name rebound to 127.0.0.1 is refused, and the chat page at / still answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest
from selenium.webdriver.common.by import By

from tests import harness
from tests.browser.page import Page, start_chromium
from tests.conftest import CHAT_MODEL, EchoSystem, start_echo_system, stop_system

ASK = json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "run me"}], "max_tokens": 4})
# A form posting JSON as text/plain, the trick that needs no preflight: the browser sends
# `<name>=<value>`, here {"model": ..., "pad": "="}, JSON that a lax server would run.
PAGE = """<!doctype html><title>another site</title>
<form id="form" method="post" enctype="text/plain" action="{bridge}/v1/chat/completions">
<input name='{body}, "pad": "' value='"}}'></form>
"""
FETCH = """
const done = arguments[arguments.length - 1];
fetch(arguments[0], arguments[1]).then((r) => done('answered ' + r.status), (e) => done('blocked ' + e.name));
"""


@pytest.fixture(scope="module")
def system() -> Iterator[EchoSystem]:
    echo = start_echo_system(keys="", chat_workers=1, context=4096)  # room for the page's max tokens
    yield echo
    stop_system(echo)


@pytest.fixture(scope="module")
def foreign_site(system: EchoSystem, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Another local origin: 127.0.0.1, another port, a page of its own."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "index.html").write_text(PAGE.format(bridge=system.url, body=ASK[:-1]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(folder)))
    Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def generations(system: EchoSystem) -> int:
    return harness.worker_stats(system.chat_workers[0].address).requests_total


def refusals(system: EchoSystem, status: int) -> float:
    samples = harness.scrape(f"{system.url}/metrics")
    return samples.get(
        f'tokenwire_http_requests_total{{method="POST",route="/v1/chat/completions",status="{status}"}}', 0.0
    )


def test_a_foreign_page_cannot_drive_the_server(system: EchoSystem, foreign_site: str, page: Page) -> None:
    before, refused = generations(system), refusals(system, 415)
    page.driver.get(f"{foreign_site}/index.html")
    # fetch() with JSON needs a preflight, which the bridge does not grant a foreign origin.
    ask = {"method": "POST", "headers": {"Content-Type": "application/json"}, "body": ASK}
    assert page.driver.execute_async_script(FETCH, f"{system.url}/v1/chat/completions", ask) == "blocked TypeError"
    # Reading is blocked too: no Access-Control-Allow-Origin.
    assert page.driver.execute_async_script(FETCH, f"{system.url}/v1/models", {}) == "blocked TypeError"
    # The text/plain form needs no preflight: it arrives, and is refused as not JSON.
    page.js("document.getElementById('form').submit()")
    page.wait(lambda: page.driver.current_url.startswith(system.url), "the form's answer")
    error = json.loads(page.driver.find_element(By.TAG_NAME, "body").text)["error"]
    assert error["code"] == "unsupported_media_type"
    page.shot("form-refused")
    assert refusals(system, 415) == refused + 1
    assert generations(system) == before  # nothing ran


def test_a_rebound_name_is_refused(system: EchoSystem, tmp_path: Path) -> None:
    # DNS rebinding, as the browser sees it: the attacker's name resolves to 127.0.0.1.
    rules = "--host-resolver-rules=MAP rebound.example 127.0.0.1"
    driver = start_chromium(tmp_path / "profile", tmp_path / "chromedriver.log", extra_flags=(rules,))
    try:
        port = system.url.rsplit(":", 1)[1]
        driver.get(f"http://rebound.example:{port}/v1/models")
        error = json.loads(driver.find_element(By.TAG_NAME, "body").text)["error"]
        assert error["code"] == "host_not_allowed"
        driver.get(f"http://localhost:{port}/v1/models")  # a loopback name is served
        assert json.loads(driver.find_element(By.TAG_NAME, "body").text)["data"]
    finally:
        driver.quit()


def test_the_chat_page_still_answers(system: EchoSystem, page: Page) -> None:
    before = generations(system)
    page.open(system.url)
    page.choose_model(CHAT_MODEL)
    page.ask("hello from the same origin")
    assert page.wait_answer() == "done"
    assert "hello" in page.answer_text()
    assert generations(system) == before + 1
