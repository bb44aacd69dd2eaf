"""A real headless browser for the chat page's tests. Every test gets a fresh
chromium profile. Screenshots go to tests/browser/screenshots/ (gitignored):
the tests save the moments worth seeing, and a failing test leaves
``<test>-FAILED.png`` there, kept until that test passes again."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.page import CHROMEDRIVER, CHROMIUM, Page, start_chromium

FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call" and report.failed:
        item.stash[FAILED] = True


@pytest.fixture(scope="session")
def screenshots() -> Path:
    folder = Path(__file__).parent / "screenshots"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def page(request: pytest.FixtureRequest, screenshots: Path, tmp_path: Path) -> Iterator[Page]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: `make test` installs Debian's chromium and chromium-driver")
    driver = start_chromium(tmp_path / "profile", tmp_path / "chromedriver.log")
    browser = Page(driver, screenshots, request.node.name)
    try:
        yield browser
    finally:
        if request.node.stash.get(FAILED, False):
            print(f"\nscreenshot of the failure: {browser.shot('FAILED')}")
        else:
            (screenshots / f"{request.node.name}-FAILED.png").unlink(missing_ok=True)
        driver.quit()
