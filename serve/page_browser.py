"""Driving the search page in headless Chromium (selenium): the browser tests, the page benchmark and the demo's
screenshot (``python -m dinoforge.serve.page_browser``) share these steps.

Needs Debian ``chromium`` + ``chromium-driver`` (``make data`` installs them) and ``selenium`` (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import base64
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from dinoforge.core.errors import DinoforgeError, MissingDependencyError

CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: page states (``body[data-state]``) a search can end in
SETTLED = ("done", "error", "key")


def chromium_missing() -> str | None:
    """Why a headless Chromium cannot be driven here, or ``None`` when it can."""
    if not CHROMEDRIVER.is_file() or shutil.which("chromium") is None:
        return "Debian packages chromium and chromium-driver are not installed (run `make data`)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def open_browser(width: int = 1280, height: int = 900) -> Any:
    """A headless Chromium WebDriver that records the browser console (``driver.get_log('browser')``)."""
    missing = chromium_missing()
    if missing:
        raise MissingDependencyError(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or "chromium"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def wait_state(driver: Any, states: tuple[str, ...], timeout_s: float = 30.0) -> str:
    """Wait until the page's ``body[data-state]`` is one of ``states``; returns it."""
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        state = driver.execute_script("return document.body.dataset.state")
        if state in states:
            return state
        time.sleep(0.02)
    raise TimeoutError(f"page stayed in state {state!r}, expected one of {states}")


def upload(driver: Any, image: Path, timeout_s: float = 60.0) -> str:
    """Choose ``image`` in the page's file input (as a person would) and wait for the search to settle."""
    from selenium.webdriver.common.by import By

    driver.execute_script("document.body.dataset.state = 'uploading'")
    driver.find_element(By.ID, "file").send_keys(str(image.resolve()))
    return wait_state(driver, SETTLED, timeout_s)


def result_ids(driver: Any) -> list[str]:
    """Ids of the result grid, in rank order."""
    return driver.execute_script("return [...document.querySelectorAll('#results button')]"
                                 ".map(b => b.dataset.id)")


def canvas_colours(driver: Any, canvas_id: str = "pca") -> int:
    """How many distinct non-black colours the canvas shows (0: blank)."""
    return driver.execute_script(f"""
        const c = document.getElementById('{canvas_id}');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        for (let i = 0; i < d.length; i += 4) {{
            if (d[i + 3] > 0 && (d[i] | d[i + 1] | d[i + 2])) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
        }}
        return seen.size;""")


def console_errors(driver: Any) -> list[str]:
    """Browser console entries at level SEVERE since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def timed_search(driver: Any, image: Path, timeout_s: float = 60.0) -> float:
    """Seconds from handing ``image`` to the page's search to the result grid being shown (in-page clock)."""
    data = base64.b64encode(image.read_bytes()).decode("ascii")
    ms = driver.execute_async_script("""
        const [data, done] = [arguments[0], arguments[arguments.length - 1]];
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const blob = new Blob([bytes], {type: 'image/' + (arguments[1] || 'png')});
        const t0 = performance.now();
        window.dinoforgePage.search(blob).then(() => requestAnimationFrame(() => done(performance.now() - t0)));
        """, data, image.suffix.lstrip(".").lower().replace("jpg", "jpeg"))
    if driver.execute_script("return document.body.dataset.state") != "done":
        raise RuntimeError(driver.find_element("id", "message").text or "search did not finish")
    return float(ms) / 1e3


def pick_query(path: Path) -> Path:
    """``path`` itself, or in a folder its largest image file (most often a photo rather than an icon)."""
    if not path.is_dir():
        return path
    from dinoforge.core.data import IMAGE_EXTENSIONS

    files = [f for f in path.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
    if not files:
        raise DinoforgeError(f"--query {path}: no image files in this folder")
    return max(files, key=lambda f: (f.stat().st_size, f.name))


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinoforge.serve.page_browser",
                                     description="Open the search page of a model + index in headless Chromium, "
                                                 "search with one image and save a screenshot.")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--query", type=Path, required=True, help="image to search with (a folder: its largest)")
    parser.add_argument("--out", type=Path, required=True, help="screenshot PNG")
    args = parser.parse_args(argv)
    from dinoforge.serve.server import BackgroundServer
    from dinoforge.serve.settings import ServeSettings

    try:
        query = pick_query(args.query)
        settings = ServeSettings(model=args.model, index_dir=args.index, port=0)
        with BackgroundServer(settings) as server:
            driver = open_browser(1280, 1000)
            try:
                driver.get(server.url + "/")
                wait_state(driver, ("ready", "error"))
                state = upload(driver, query)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.out))
                ids, pca_drawn = result_ids(driver), canvas_colours(driver) > 0
                caption = driver.find_element("id", "pca-caption").text
            finally:
                driver.quit()
    except (DinoforgeError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if state != "done" or not ids:
        print(f"error: the search ended in state {state!r} with {len(ids)} results", file=sys.stderr)
        return 2
    print(f"searched {query.name}: top results {', '.join(ids[:3])}; screenshot {args.out}")
    if not pca_drawn:
        print(f"note: no patch-PCA view: {caption}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
