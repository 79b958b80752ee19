"""The search page, measured as a person meets it: headless Chromium against `dinoforge serve` on this CPU.

Three figures, each the median of several rounds:

* page load to interactive: navigation start -> the page has its model card and accepts a query
  (the ``dinoforge-interactive`` performance mark; target <= 1 s);
* search round trip: an image handed to the page's search -> the result grid shown (the next animation
  frame after the response is rendered; upload, embedding, search, PCA, thumbnails; target <= 300 ms median);
* ``dinoforge index build`` throughput vs ``dinoforge extract`` on the same folder (whole commands, wall
  clock, alternated in adjacent pairs so machine drift cancels; target >= 90 %).

The index holds >= 1,000 real images: Fashion-MNIST test images (Debian dataset-fashion-mnist) written as
PNG files plus the tuxpaint stamps (Debian tuxpaint-stamps-default). The default model is the compact student
of the distillation recipe (ViT width 64, depth 4, patch 7, 28 px input), randomly initialised: the timings do
not depend on the weights; pass --model to time a trained one.

Usage: python bench/bench_search_page.py [--model M] [--fmnist 1000] [--rounds 3] [--searches 40] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from dinoforge.core.artifact import WEIGHTS_FILE

ROOT = Path(__file__).resolve().parents[1]
DF = [sys.executable, "-m", "dinoforge.core.cli"]
STUDENT = ["--set", "embed_dim=64", "--set", "depth=4", "--set", "num_heads=2", "--set", "patch_size=7",
           "--set", "img_size=28", "--preprocess", "mode=resize", "--preprocess", "size=28"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="artifact or ONNX export (default: the compact student, random init)")
    p.add_argument("--fmnist", type=int, default=1000, help="Fashion-MNIST test images in the folder")
    p.add_argument("--rounds", type=int, default=3, help="alternated extract / index build pairs")
    p.add_argument("--loads", type=int, default=10, help="page loads timed")
    p.add_argument("--searches", type=int, default=40, help="searches timed (after 5 warm-up searches)")
    p.add_argument("--out", type=Path, help="also write the figures as JSON")
    return p.parse_args()


def run(cmd: list[str]) -> float:
    """Wall-clock seconds of a dinoforge command (its output hidden unless it fails)."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def make_folder(root: Path, n_fmnist: int) -> Path:
    from dinoforge.core.data import FASHION_MNIST_CLASSES, FashionMNISTSource

    folder = root / "images"
    src = FashionMNISTSource("test", root=Path("/usr/share/datasets/fashion-mnist"), download=False)
    for i in range(n_fmnist):
        cls = FASHION_MNIST_CLASSES[int(src.targets[i])].replace("/", "-")
        (folder / "fmnist" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(src.images[i]).save(folder / "fmnist" / cls / f"{i:05d}.png")
    shutil.copytree("/usr/share/tuxpaint/stamps", folder / "stamps",
                    ignore=shutil.ignore_patterns("*.ogg", "*.wav", "*.txt", "*.svg", "*.dat"))
    return folder


def throughput(model: Path, folder: Path, work: Path, rounds: int) -> dict[str, Any]:
    """Alternate `extract` and `index build` on the folder; the ratio is the median of adjacent pairs."""
    common = ["--model", str(model), "--input", str(folder), "--no-progress", "--num-workers", "2"]
    pairs = []
    for r in range(rounds):
        extract = run([*DF, "extract", *common, "--output", str(work / f"x{r}"), "--dtype", "float32"])
        build = run([*DF, "index", "build", *common, "--index", str(work / f"i{r}")])
        pairs.append((extract, build))
    count = json.loads((work / "i0" / "build.json").read_text())["count"]
    return {"images": count, "extract_s": [round(e, 2) for e, _ in pairs], "build_s": [round(b, 2) for _, b in pairs],
            "ratio_median": round(statistics.median(e / b for e, b in pairs), 3)}


def start_server(model: Path, index: Path) -> tuple[subprocess.Popen[bytes], str]:
    from dinoforge.serve.server import free_port

    port = free_port()
    proc = subprocess.Popen([*DF, "serve", "--model", str(model), "--index", str(index), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit("dinoforge serve exited during startup")
        time.sleep(0.1)
    proc.kill()
    sys.exit("dinoforge serve did not become ready in 60 s")


def page_figures(url: str, queries: list[Path], loads: int, searches: int) -> dict[str, Any]:
    from dinoforge.serve.page_browser import console_errors, open_browser, timed_search, wait_state

    driver = open_browser()
    try:
        load_ms = []
        for _ in range(loads + 1):  # the first load fills the browser's cache, as a person's second visit would
            driver.get(url + "/")
            wait_state(driver, ("ready",))
            load_ms.append(driver.execute_script(
                "return performance.getEntriesByName('dinoforge-interactive')[0].startTime"))
        trip_ms = [timed_search(driver, q) * 1e3 for q in queries[:5 + searches]][5:]
        errors = console_errors(driver)
    finally:
        driver.quit()
    return {"load_ms_cold": round(load_ms[0], 1), "load_ms_median": round(statistics.median(load_ms[1:]), 1),
            "search_ms_median": round(statistics.median(trip_ms), 1),
            "search_ms_p90": round(sorted(trip_ms)[int(0.9 * (len(trip_ms) - 1))], 1), "searches": len(trip_ms),
            "console_errors": errors}


def machine() -> str:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores"


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_search_page_") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model
        if model is None:
            model = tmp / "student"
            run([*DF, "init", "test", "--out", str(model), "--name", "compact-student-random", *STUDENT])
        folder = make_folder(tmp, args.fmnist)
        if (model / WEIGHTS_FILE).is_file():  # an artifact (export folders carry a model card too)
            build = throughput(model, folder, tmp, args.rounds)
        else:  # `dinoforge extract` runs artifacts only: time the index build alone
            seconds = run([*DF, "index", "build", "--model", str(model), "--input", str(folder), "--index",
                           str(tmp / "i0"), "--no-progress", "--num-workers", "2"])
            count = json.loads((tmp / "i0" / "build.json").read_text())["count"]
            build = {"images": count, "build_s": [round(seconds, 2)], "ratio_median": None}
        queries = sorted(folder.rglob("*.png"))[:: max(1, build["images"] // (args.searches + 5))]
        proc, url = start_server(model, tmp / "i0")
        try:
            page = page_figures(url, queries, args.loads, args.searches)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result = {"machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "model": str(args.model or "compact student (random init)"), "index_build": build, "page": page,
              "command": "python bench/bench_search_page.py " + " ".join(sys.argv[1:])}
    print(json.dumps(result, indent=2))
    targets = [("page load to interactive", page["load_ms_median"], "<= 1000 ms", page["load_ms_median"] <= 1000),
               ("search round trip (median)", page["search_ms_median"], "<= 300 ms", page["search_ms_median"] <= 300),
               ("index build / extract throughput", build["ratio_median"], ">= 0.90",
                build["ratio_median"] is not None and build["ratio_median"] >= 0.9)]
    for name, value, target, ok in targets:
        verdict = "not measured (extract runs artifacts only)" if value is None else "met" if ok else "MISSED"
        print(f"{name:34s} {'-' if value is None else value:>9} (target {target}): {verdict}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
