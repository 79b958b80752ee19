"""The search page in a real browser: headless Chromium driven by selenium against a real server and index.

Skipped only when Chromium, its driver or selenium is missing (``make test`` installs them).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dinoforge.core.cli import main as cli_main
from dinoforge.serve.page_browser import (canvas_colours, chromium_missing, console_errors, open_browser,
                                          result_ids, upload, wait_state)
from dinoforge.serve.server import BackgroundServer
from dinoforge.serve.settings import ServeSettings
from tests.serve.helpers import onnx_index_without_patch_tokens, png_header

pytestmark = pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))


@pytest.fixture(scope="module")
def stamps(tuxpaint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 real tuxpaint stamps in three class folders."""
    root = tmp_path_factory.mktemp("page_stamps")
    for category in ("animals", "food", "vehicles"):
        (root / category).mkdir()
        for f in sorted((tuxpaint_dir / category).rglob("*.png"))[:10]:
            shutil.copy(f, root / category / f.name)
    return root


@pytest.fixture(scope="module")
def index_and_head(tiny_artifact: Path, stamps: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("page_browser")
    assert cli_main(["index", "build", "--model", str(tiny_artifact), "--input", str(stamps), "--index",
                     str(root / "index"), "--num-workers", "0", "--no-progress"]) == 0
    assert cli_main(["serve", "build-head", "--model", str(tiny_artifact), "--data", str(stamps), "--out",
                     str(root / "head"), "--k", "5", "--holdout", "0.2", "--no-progress"]) == 0
    return root / "index", root / "head"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = open_browser()
    yield driver
    driver.quit()


def _server(model: Path, index: Path, **extra: Any) -> BackgroundServer:
    return BackgroundServer(ServeSettings(port=0, model=model, index_dir=index, max_pixels=4_000_000, **extra))


def _message(driver: Any) -> str:
    return driver.execute_script("const m = document.getElementById('message'); return m.hidden ? '' : m.textContent")


def test_search_classify_pca_click_and_keyboard(browser: Any, tiny_artifact: Path, stamps: Path,
                                                index_and_head: tuple[Path, Path], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    index, head = index_and_head
    with _server(tiny_artifact, index, head=head) as server:
        browser.get(server.url + "/")
        assert wait_state(browser, ("ready", "error")) == "ready", _message(browser)
        assert "index: 30 images" in browser.find_element(By.ID, "card").text
        query = stamps / "food" / sorted(p.name for p in (stamps / "food").iterdir())[3]
        assert upload(browser, query) == "done", _message(browser)
        ids = result_ids(browser)
        assert ids[0] == f"food/{query.name}" and len(ids) == 12
        assert canvas_colours(browser) > 3  # the patch-PCA picture is drawn
        labels = browser.find_elements(By.CSS_SELECTOR, "#label-list li")
        assert browser.find_element(By.ID, "labels").is_displayed() and labels
        assert labels[0].text.split(" — ")[0] in ("animals", "food", "vehicles")
        browser.save_screenshot(str(tmp_path / "search.png"))
        assert console_errors(browser) == []

        # click a result: it becomes the query (its thumbnail is searched, so it comes back first)
        second = browser.find_elements(By.CSS_SELECTOR, "#results button")[1]
        clicked = second.get_attribute("data-id")
        browser.execute_script("document.body.dataset.state = 'clicked'")
        second.click()
        assert wait_state(browser, ("done", "error")) == "done", _message(browser)
        assert result_ids(browser)[0] == clicked

        # keyboard only: focus a result and press Enter
        third = browser.find_elements(By.CSS_SELECTOR, "#results button")[2]
        wanted = third.get_attribute("data-id")
        browser.execute_script("arguments[0].focus(); document.body.dataset.state = 'keyboard'", third)
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        assert wait_state(browser, ("done", "error")) == "done", _message(browser)
        assert result_ids(browser)[0] == wanted
        assert console_errors(browser) == []

        # a phone-sized screen: nothing wider than the viewport
        browser.set_window_size(390, 844)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        browser.save_screenshot(str(tmp_path / "search-phone.png"))
        browser.set_window_size(1280, 900)


def test_bad_files_get_a_message_on_the_page(browser: Any, tiny_artifact: Path,
                                             index_and_head: tuple[Path, Path], tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(30_000, 30_000))
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"this is text in a file named .png")
    with _server(tiny_artifact, index_and_head[0]) as server:
        browser.get(server.url + "/")
        wait_state(browser, ("ready",))
        assert upload(browser, text) == "error" and "not an image" in _message(browser)
        assert upload(browser, bomb) == "error"
        assert "413" in _message(browser) and "pixel" in _message(browser)
        assert upload(browser, fake) == "error"
        assert "422" in _message(browser) and "not a decodable image" in _message(browser)


def test_api_key_is_asked_once_per_tab_and_a_wrong_key_is_explained(browser: Any, tiny_artifact: Path,
                                                                    stamps: Path,
                                                                    index_and_head: tuple[Path, Path]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with _server(tiny_artifact, index_and_head[0], api_keys=["right-key"]) as server:
        browser.get(server.url + "/")
        assert wait_state(browser, ("key", "ready")) == "key"
        assert "needs an API key" in _message(browser)
        browser.execute_script("document.body.dataset.state = 'typing'")
        browser.find_element(By.ID, "key-input").send_keys("wrong-key", Keys.ENTER)
        assert wait_state(browser, ("key", "ready")) == "key"
        assert "refused this API key" in _message(browser) and "invalid API key" in _message(browser)
        browser.execute_script("document.body.dataset.state = 'typing'")  # so the wait sees the new answer
        browser.find_element(By.ID, "key-input").send_keys("right-key", Keys.ENTER)
        assert wait_state(browser, ("key", "ready")) == "ready"
        query = next((stamps / "vehicles").iterdir())
        assert upload(browser, query) == "done" and result_ids(browser)[0] == f"vehicles/{query.name}"
        browser.refresh()  # same tab: the key is remembered, not asked again
        assert wait_state(browser, ("key", "ready")) == "ready"
        browser.execute_script("sessionStorage.clear()")


def test_empty_index_is_explained(browser: Any, tiny_artifact: Path, stamps: Path, tmp_path: Path) -> None:
    with _server(tiny_artifact, tmp_path / "empty") as server:
        browser.get(server.url + "/")
        wait_state(browser, ("ready",))
        assert "index is empty" in _message(browser)
        assert upload(browser, next((stamps / "food").iterdir())) == "error"
        assert "404" in _message(browser) and "empty" in _message(browser)


_DISPATCH = """
    const [b64, kind, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], 'query.png', {type: 'image/png'}));
    document.body.dataset.state = 'dispatched';
    if (kind === 'drop') {
        document.getElementById('drop').dispatchEvent(
            new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
    } else {
        document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true, cancelable: true}));
    }
    done(true);
"""


def test_drop_and_paste_search_and_a_model_without_patch_tokens_is_explained(
        browser: Any, tiny_artifact: Path, stamps: Path, tmp_path: Path) -> None:
    import base64

    export, index = onnx_index_without_patch_tokens(tiny_artifact, stamps / "animals", tmp_path)
    query = sorted((stamps / "animals").iterdir())[2]
    data = base64.b64encode(query.read_bytes()).decode("ascii")
    with _server(export, index) as server:
        browser.get(server.url + "/")
        wait_state(browser, ("ready",))
        for kind in ("drop", "paste"):
            browser.execute_async_script(_DISPATCH, data, kind)
            assert wait_state(browser, ("done", "error")) == "done", _message(browser)
            assert result_ids(browser)[0] == query.name
            caption = browser.find_element("id", "pca-caption").text
            assert "no patch tokens" in caption and "--patch-tokens" in caption
            assert canvas_colours(browser) == 0  # nothing drawn rather than a wrong picture
        assert "no patch tokens" in browser.find_element("id", "card").text
