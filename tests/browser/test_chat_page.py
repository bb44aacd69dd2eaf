"""The chat page at `/` in a real headless browser, against echo workers: the
protocol paths (Stop, keys, errors, hostile replies) where a deterministic
test double makes the page's behaviour checkable. The real model's tests are
in test_chat_page_models.py."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests import harness
from tests.browser.page import Page
from tests.conftest import API_KEY, CHAT_MODEL, EMBED_MODEL, EchoSystem, start_echo_system, stop_system

FAST_MODEL = "echo-fast"  # 12 words at once
DOOMED_MODEL = "echo-doomed"  # slow; its worker is killed mid-answer
LIMITED_KEY = "limited-key"  # 2 requests per minute
XSS = "<script>window.__xss = 1</script> <img src=x onerror=window.__xss=2> <b>bold</b>"


@dataclass
class PageSystem:
    echo: EchoSystem
    fast: harness.Proc
    doomed: harness.Proc

    @property
    def url(self) -> str:
        return self.echo.url


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageSystem]:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"{LIMITED_KEY} rpm=2\n")
    # echo-chat: 20 ms per word, 200 words: answers long enough to stop.
    echo = start_echo_system(
        delay=0.02, tokens=200, chat_workers=1, context=4096, gateway_args=("--api-keys-file", str(keys))
    )
    gateway = echo.grpc_address
    fast = harness.echo_worker(gateway, FAST_MODEL, "--echo-tokens", "12", "--echo-context-length", "4096")
    doomed = harness.echo_worker(
        gateway, DOOMED_MODEL, "--echo-tokens", "400", "--echo-delay", "0.05", "--echo-context-length", "4096"
    )
    for model in (FAST_MODEL, DOOMED_MODEL):
        harness.wait_for_workers(echo.url, model, 1, key=API_KEY)
    yield PageSystem(echo, fast, doomed)
    fast.stop()
    doomed.stop()
    stop_system(echo)


def requests_served(proc: harness.Proc) -> int:
    return harness.worker_stats(proc.address).requests_total


def test_page_is_static_and_locked_down(system: PageSystem) -> None:
    reply = httpx.get(f"{system.url}/")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/html")
    csp = reply.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    for asset in ("/static/app.js", "/static/style.css"):
        body = httpx.get(f"{system.url}{asset}")
        assert body.status_code == 200
        # Nothing from another origin (no CDN): the page works offline.
        assert "http://" not in body.text and "https://" not in body.text
    assert "http://" not in reply.text and "https://" not in reply.text


def test_answer_streams_then_stop_frees_the_worker(system: PageSystem, page: Page) -> None:
    worker = system.echo.chat_workers[0]
    before = harness.wait_until(lambda: (s := harness.worker_stats(worker.address)).in_flight == 0 and s)
    page.open(system.url, key=API_KEY)
    page.choose_model(CHAT_MODEL)
    page.set_field("#max-tokens", "1000")
    page.ask("tell me a long story about the sea")
    # The words arrive one by one (20 ms each): the page shows a growing answer.
    first = page.wait(lambda: page.answer_state() == "streaming" and len(page.answer_text()), "the first words")
    page.wait(lambda: len(page.answer_text()) > first + 20, "more words")
    assert page.answer_state() == "streaming"
    assert page.el("#stop").is_displayed()
    assert harness.worker_stats(worker.address).in_flight == 1
    page.el("#stop").click()
    assert page.wait_answer() == "stopped"
    assert "stopped" in page.answer_part(".meta")
    stats = harness.wait_until(
        lambda: (
            (s := harness.worker_stats(worker.address)).in_flight == 0
            and s.cancelled_total > before.cancelled_total
            and s
        )
    )
    # This call's own figures (the worker's maximum spans every test's calls).
    assert stats.cancelled_total == before.cancelled_total + 1
    assert stats.tokens_after_cancel_total - before.tokens_after_cancel_total <= 1
    # 200 words would take 4 s; we stopped well before the end.
    assert len(page.answer_text().split()) < 200
    assert not page.el("#stop").is_displayed() and page.el("#send").is_enabled()
    page.shot("stopped")


def test_switch_model(system: PageSystem, page: Page) -> None:
    page.open(system.url, key=API_KEY)
    models = [o.get_attribute("value") for o in page.els("#model option")]
    # Chat models in the chat picker, the embedding model in the embeddings tab.
    assert {CHAT_MODEL, FAST_MODEL, DOOMED_MODEL} <= set(models) and EMBED_MODEL not in models
    assert [o.get_attribute("value") for o in page.els("#embed-model option")] == [EMBED_MODEL]
    served = requests_served(system.fast)
    page.choose_model(FAST_MODEL)
    page.ask("hello from the other model")
    assert page.wait_answer() == "done"
    assert page.answer_part(".meta").startswith(FAST_MODEL)
    assert page.answer_text().split()[:3] == ["hello", "from", "the"]
    assert requests_served(system.fast) == served + 1
    copy = page.el("#messages .message.assistant .copy")
    copy.click()
    page.wait(lambda: copy.text == "Copied", "the copy to be confirmed")
    page.driver.execute_cdp_cmd(
        "Browser.grantPermissions", {"origin": system.url, "permissions": ["clipboardReadWrite"]}
    )
    clipboard = page.driver.execute_async_script("navigator.clipboard.readText().then(arguments[0])")
    assert clipboard == page.answer_text()
    # The choice is remembered.
    page.driver.refresh()
    page.wait(lambda: page.js("return document.getElementById('model').value") == FAST_MODEL, "the remembered model")


def test_history_system_prompt_and_new_chat(system: PageSystem, page: Page) -> None:
    page.open(system.url, key=API_KEY)
    page.choose_model(FAST_MODEL)

    def prompt_tokens() -> int:
        return int(page.answer_data("promptTokens"))

    page.ask("alpha beta")
    page.wait_answer()
    alone = prompt_tokens()  # the echo template: "user: alpha beta"
    assert alone == 3
    page.ask("gamma")
    page.wait_answer()
    # The second request carried the first question and its 12-word answer.
    assert prompt_tokens() == 3 + 13 + 2
    assert len(page.answers()) == 2
    assert "12 tokens" in page.answer_part(".meta")
    page.el("#new-chat").click()
    assert page.answers() == []
    page.set_field("#system", "be brief")
    page.ask("alpha beta")
    page.wait_answer()
    assert prompt_tokens() == 3 + 3  # "system: be brief" first


def test_xss_reply_renders_inert(system: PageSystem, page: Page) -> None:
    page.open(system.url, key=API_KEY)
    page.choose_model(FAST_MODEL)
    page.ask(XSS)
    assert page.wait_answer() == "done"
    # The echo worker repeated the markup: it is on the page as characters...
    answer = page.answer_text()
    assert "<script>window.__xss" in answer and "<img src=x onerror=window.__xss=2>" in answer
    # ...in the question and the answer, and nothing of it became an element or ran.
    assert XSS in page.text("#messages .message.user .content")
    assert page.els("#messages script, #messages img, #messages b") == []
    assert page.js("return window.__xss") is None
    page.shot("inert")


def test_key_prompt_wrong_key_then_success(system: PageSystem, page: Page) -> None:
    page.open(system.url, models=False)  # no key stored
    page.wait(lambda: page.el("#key-dialog").is_displayed(), "the key prompt")
    assert "needs an API key" in page.text("#key-message")
    page.el("#key-input").send_keys("not-a-key\n")
    page.wait(lambda: "refused" in page.text("#key-message"), "the refusal")
    message = page.text("#key-message")
    assert "401" in message and "invalid_api_key" in message
    page.shot("wrong-key")
    page.el("#key-input").send_keys(API_KEY + "\n")
    page.wait(lambda: not page.el("#key-dialog").is_displayed(), "the prompt to close")
    page.wait(lambda: page.els("#model option"), "the models")
    assert page.js("return localStorage.getItem('tokenwire.apiKey')") == API_KEY
    page.choose_model(FAST_MODEL)
    page.ask("hello with a key")
    assert page.wait_answer() == "done"
    assert page.answer_text().startswith("hello with a key")


def test_rate_limit_shows_retry_after(system: PageSystem, page: Page) -> None:
    page.open(system.url, key=LIMITED_KEY)  # listing the models: request 1 of 2
    page.choose_model(FAST_MODEL)
    page.ask("first")
    assert page.wait_answer() == "done"
    page.ask("second")
    assert page.wait_answer() == "error"
    error = page.answer_part(".error")
    assert "429 Too many requests" in error and "rate_limit_exceeded" in error
    assert "2 requests per minute" in error
    assert "Retry after" in error and "s." in error
    # The question was not answered: it is back in the box to send again.
    assert page.el("#prompt").get_attribute("value") == "second"
    page.shot("429")


def test_embeddings_tab(system: PageSystem, page: Page) -> None:
    page.open(system.url, key=API_KEY)
    page.el("#tab-embeddings").click()
    page.set_field("#text-a", "the same words")
    page.set_field("#text-b", "the same words")
    page.el("#embed-go").click()
    page.wait(lambda: page.el("#similarity").get_attribute("data-value"), "the similarity")
    assert float(page.el("#similarity").get_attribute("data-value")) == pytest.approx(1.0, abs=1e-5)
    assert "Cosine similarity: 1.0000 (16 dimensions)" in page.text("#similarity")


def test_cluster_view_lists_workers(system: PageSystem, page: Page) -> None:
    page.open(system.url, key=API_KEY)
    page.el("#tab-cluster").click()
    page.wait(lambda: len(page.cluster_rows()) == 4, "the workers")
    rows = page.cluster_rows()
    assert set(rows) == {CHAT_MODEL, FAST_MODEL, DOOMED_MODEL, EMBED_MODEL}
    assert "SERVING" in rows[CHAT_MODEL] and "0/5" in rows[CHAT_MODEL]
    # Refreshed every few seconds: the load of a running answer (20 s long) shows up, and goes.
    page.el("#tab-chat").click()
    page.choose_model(DOOMED_MODEL)
    page.set_field("#max-tokens", "1000")
    page.ask("a story to watch")
    page.wait(lambda: page.answer_text(), "the answer to start")
    page.el("#tab-cluster").click()
    page.wait(lambda: "1/5" in page.cluster_rows().get(DOOMED_MODEL, ""), "in flight 1/5", timeout=15)
    page.shot("cluster")
    page.el("#tab-chat").click()
    page.el("#stop").click()
    assert page.wait_answer() == "stopped"
    page.el("#tab-cluster").click()
    page.wait(lambda: "0/5" in page.cluster_rows().get(DOOMED_MODEL, ""), "in flight back to 0", timeout=15)


def test_cluster_view_shows_the_keys_batches(system: PageSystem, page: Page) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    lines = "".join(
        json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n"
        for i, body in enumerate(
            [{"model": FAST_MODEL, "prompt": "hi", "max_tokens": 4}, {"model": "nope", "prompt": "x"}]
        )
    )
    uploaded = httpx.post(
        f"{system.url}/v1/files", files={"file": ("b.jsonl", lines)}, data={"purpose": "batch"}, headers=headers
    ).json()
    body = {"input_file_id": uploaded["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    batch_id = httpx.post(f"{system.url}/v1/batches", json=body, headers=headers).json()["id"]
    page.open(system.url, key=API_KEY)
    page.el("#tab-cluster").click()

    def row() -> str:
        return page.js(
            f"const r = document.querySelector('#batches tr[data-batch=\"{batch_id}\"]'); return r ? r.innerText : ''"
        )  # type: ignore[no-any-return]

    page.wait(lambda: "completed" in row(), "the batch completed in the table", timeout=30)
    cells = row().split("\t")
    assert cells[:5] == [batch_id, "/v1/completions", "completed", "1/2", "1"]
    page.shot("cluster-batches")


def test_status_endpoint_hides_workers_and_needs_a_key(system: PageSystem) -> None:
    assert httpx.get(f"{system.url}/v1/status").status_code == 401
    reply = httpx.get(f"{system.url}/v1/status", headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 200
    body = reply.json()
    models = {m["id"]: m for m in body["models"]}
    assert models[FAST_MODEL]["live_workers"] == 1 and models[FAST_MODEL]["kind"] == "chat"
    assert models[EMBED_MODEL]["kind"] == "embedding"
    worker = models[FAST_MODEL]["workers"][0]
    assert set(worker) == {"capacity", "in_flight", "queue_length", "heartbeat_age_seconds", "health"}
    assert worker["health"] == "SERVING"
    for proc in (system.fast, system.doomed, *system.echo.chat_workers):
        port = proc.address.rsplit(":", 1)[1]
        assert port not in reply.text and "@" not in reply.text  # no addresses, no worker ids


def test_mid_stream_error_then_503(system: PageSystem, page: Page) -> None:
    """Runs last: it kills a worker."""
    page.open(system.url, key=API_KEY)
    page.choose_model(DOOMED_MODEL)
    page.ask("words until the worker dies")
    page.wait(lambda: len(page.answer_text().split()) >= 5, "some words")
    system.doomed.signal(signal.SIGKILL)
    assert page.wait_answer(timeout=30) == "error"
    assert "The answer broke off" in page.answer_part(".error")
    assert page.answer_text().startswith("words until the worker dies")  # what came stays
    page.shot("mid-stream-error")
    # The model is still in the picker, but nobody serves it now.
    page.ask("anyone there?")
    assert page.wait_answer(timeout=30) == "error"
    assert "503 Service unavailable" in page.answer_part(".error")
    # Neither message tells where the worker was (cluster-internal).
    port = system.doomed.address.rsplit(":", 1)[1]
    assert port not in page.text("#messages")
    page.shot("503")
