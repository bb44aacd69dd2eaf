"""The chat page at `/` of `tokenwire serve` with the real embedded models
(SmolLM2-135M-Instruct, all-MiniLM-L6-v2), in a real headless browser.

Properties, not one build's greedy text: "Paris" in the answer to the one
prompt this small model answers reliably (see test_models.py), streamed in
more than one step; related sentences closer than unrelated ones.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import harness
from tests.browser.page import Page

pytestmark = pytest.mark.models

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
FRANCE = "What is the capital of France? Answer in one sentence."
CHAT_REQUESTS = 'tokenwire_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}'
# The README's picture of the page, refreshed by running this file with TOKENWIRE_README_SCREENSHOT=1.
README_SCREENSHOT = Path(__file__).parents[2] / "docs" / "chat-page.png"


@pytest.fixture(scope="module")
def served() -> Iterator[harness.Serve]:
    serve = harness.Serve(["--log-level", "warning"]).start()
    yield serve
    assert serve.stop() == 0


def test_chat_streams_the_answer_and_the_metrics_count_it(served: harness.Serve, page: Page) -> None:
    # One request first, so that the figures on the page (and the README's picture) are a warm model's.
    warm = {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert httpx.post(f"{served.url}/v1/chat/completions", json=warm, timeout=120).status_code == 200
    before = harness.scrape(f"{served.url}/metrics").get(CHAT_REQUESTS, 0.0)
    page.open(served.url)
    assert page.js("return document.getElementById('model').value") == CHAT
    page.set_field("#temperature", "0")
    page.set_field("#max-tokens", "40")
    page.ask(FRANCE)
    assert page.wait_answer() == "done"
    assert "Paris" in page.answer_text()
    # It arrived piece by piece, each piece rendered as it came.
    renders = page.renders()
    assert len({length for _, length in renders}) >= 2, renders
    assert renders[-1][0] > renders[0][0]
    meta = page.answer_part(".meta")
    assert meta.startswith(CHAT) and " tokens" in meta and "TTFT" in meta and "tokens/s" in meta
    assert harness.scrape(f"{served.url}/metrics")[CHAT_REQUESTS] == before + 1
    path = page.shot("answer")
    if os.environ.get("TOKENWIRE_README_SCREENSHOT"):
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, README_SCREENSHOT)


def test_embeddings_tab_shows_a_similarity(served: harness.Serve, page: Page) -> None:
    page.open(served.url)
    page.el("#tab-embeddings").click()
    assert page.js("return document.getElementById('embed-model').value") == EMBED

    def similarity(a: str, b: str) -> float:
        page.set_field("#text-a", a)
        page.set_field("#text-b", b)
        page.js("delete document.getElementById('similarity').dataset.value")
        page.el("#embed-go").click()
        page.wait(lambda: page.el("#similarity").get_attribute("data-value"), "the similarity")
        assert "(384 dimensions)" in page.text("#similarity")
        return float(page.el("#similarity").get_attribute("data-value"))

    related = similarity("A cat sits on the mat.", "A kitten is sitting on a rug.")
    unrelated = similarity("A cat sits on the mat.", "Interest rates rose by half a point.")
    assert -1 <= unrelated < related <= 1
    assert related > 0.5
    page.shot("embeddings")


def test_cluster_view_lists_the_workers(served: harness.Serve, page: Page) -> None:
    page.open(served.url)
    page.el("#tab-cluster").click()
    # Idle workers: the last heartbeat may still count the previous test's request.
    page.wait(
        lambda: len(rows := page.cluster_rows()) == 2 and all("\t0/" in row for row in rows.values()),
        "both workers, idle",
    )
    rows = page.cluster_rows()
    assert set(rows) == {CHAT, EMBED}
    assert all("SERVING" in row for row in rows.values())
    # The same figures as `tokenwire status`, without the addresses.
    status = httpx.get(f"{served.url}/v1/status").json()
    chat = next(m for m in status["models"] if m["id"] == CHAT)
    assert chat["engine"] == "llama_cpp" and chat["live_workers"] == 1
    assert f"0/{chat['workers'][0]['capacity']}" in rows[CHAT]
    page.shot("cluster")


def test_usable_at_phone_width(served: harness.Serve, page: Page) -> None:
    page.driver.set_window_size(390, 844)
    page.open(served.url)
    # Nothing sticks out sideways; the settings fold away; the composer is on screen.
    assert page.js("return document.documentElement.scrollWidth <= window.innerWidth")
    assert page.js("return document.getElementById('settings').open") is False
    for control in ("#prompt", "#send", "#tab-cluster"):
        box = page.js(
            "const r = document.querySelector(arguments[0]).getBoundingClientRect(); return [r.left, r.right, r.bottom]",
            control,
        )
        assert box[0] >= 0 and box[1] <= 390 and box[2] <= page.js("return window.innerHeight"), (control, box)
    page.ask(FRANCE)
    assert page.wait_answer() == "done"
    assert page.js("return document.documentElement.scrollWidth <= window.innerWidth")
    page.shot("phone")
