""""Curation pays off": pretrain on a curated subset vs a random subset of the same pool (used by bench_curate).

Setup (all real images, labels used only for evaluation and for the diagnostic in-domain fraction):

* labelled set: Fashion-MNIST classes 0-4 (T-shirt, trouser, pullover, dress, coat); its training images
  (``--seeds-per-class`` per class from train[:30000]) are the seeds, its test images the k-NN test set;
* pool: Fashion-MNIST train[30000:60000] (all 10 classes, unlabelled as far as curation knows), tuxpaint
  stamps and foolbox samples, written as PNG files;
* curated subset: ``dinoforge curate`` with recipe ``curate/recipes/payoff_fmnist.yaml`` (self-dedup,
  sample- and cluster-based retrieval from the seeds); random subset: as many pool files drawn uniformly;
* both subsets pretrain the same model (``pretrain/recipes/fmnist.yaml``) for the same number of steps, then
  ``dinoforge eval knn`` (train = seeds, test = the labelled test images) scores each teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
CLASSES = (0, 1, 2, 3, 4)


def foolbox_data() -> Path:
    """The foolbox wheel's sample images (its package is not imported: it needs eagerpy)."""
    import importlib.util

    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the foolbox wheel (sample images) is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _write_labelled(work: Path, per_class: int) -> tuple[Path, Path]:
    from PIL import Image

    from dinoforge.core.data import load_fashion_mnist

    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    for split, xs, ys, limit in (("train", train_x[:30000], train_y[:30000], per_class),
                                 ("test", test_x, test_y, None)):
        for c in CLASSES:
            folder = work / "labelled" / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.nonzero(ys == c)[0][:limit]:
                Image.fromarray(xs[i]).save(folder / f"{i:05d}.png")
    return work / "labelled" / "train", work / "labelled" / "test"


def _write_pool(work: Path, quick: bool) -> tuple[Path, pd.DataFrame]:
    """Pool PNGs plus a side table of the Fashion-MNIST class of each file (diagnostic only)."""
    import shutil

    from PIL import Image

    from dinoforge.core.data import load_fashion_mnist

    pool = work / "pool"
    (pool / "fmnist").mkdir(parents=True, exist_ok=True)
    x, y = load_fashion_mnist("train")
    stop = 30600 if quick else 60000
    rows = []
    for i in range(30000, stop):
        path = pool / "fmnist" / f"{i:05d}.png"
        Image.fromarray(x[i]).save(path)
        rows.append({"path": str(path), "fmnist_class": int(y[i])})
    others = [Path("/usr/share/tuxpaint/stamps"), foolbox_data()]
    for k, root in enumerate(others):
        for f in sorted(root.rglob("*.png"))[: 20 if quick else None]:
            dest = pool / f"other{k}" / f.name
            dest.parent.mkdir(exist_ok=True)
            shutil.copy(f, dest)
            rows.append({"path": str(dest), "fmnist_class": -1})
    return pool, pd.DataFrame(rows)


def _cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, "-m", "dinoforge.core.cli", *args], env=env)
    if done.returncode != 0:  # its own message (e.g. a bad --pretrain-set override) is already on stderr
        raise SystemExit(f"error: `dinoforge {args[0]}` failed with exit status {done.returncode}")


def _pretrain_and_eval(work: Path, name: str, manifest: Path, steps: int, labelled: tuple[Path, Path],
                       extra: list[str]) -> float:
    run = work / f"pretrain-{name}"
    # The recipe's schedules span 10 epochs: size an epoch so the whole schedule (warm-ups, cosine decay to
    # min_lr) fits the budget instead of cutting it short; rounded up so that exactly ``steps`` steps run
    # (max_steps trims the at most 9 extra schedule steps).
    _cli("pretrain", "--config", "fmnist", f"run_dir={run}", f"data.source=manifest:{manifest}",
         "schedule.epochs=10", f"schedule.epoch_length={-(-steps // 10)}", f"train.max_steps={steps}",
         "train.max_minutes=null", "knn.every_steps=null", "knn.at_start=false", "knn.at_end=false",
         "monitor.progress=false", *extra)
    out = work / f"knn-{name}.json"
    _cli("eval", "knn", "--model", str(run / "artifact"), "--train", f"folder:{labelled[0]}", "--test",
         f"folder:{labelled[1]}", "--ks", "20", "--out", str(out), "--no-progress")
    result = json.loads(out.read_text())
    return float(_find_top1(result))


def _find_top1(result: dict[str, Any]) -> float:
    """top-1 at k=20 from an eval JSON report (searched, so the report layout may evolve)."""
    stack: list[Any] = [result]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            top1 = node.get("top1")
            if isinstance(top1, dict) and ("20" in top1 or 20 in top1):
                return top1.get("20", top1.get(20))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise ValueError("no top1[20] in the k-NN report")


def run_payoff(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build the sets, curate, draw the random subset, pretrain both and compare k-NN top-1."""
    from dinoforge.core.config import load_config
    from dinoforge.curate.config import CurateConfig
    from dinoforge.curate.pipeline import run_curation

    labelled = _write_labelled(work, 40 if args.quick else 400)
    pool, classes = _write_pool(work, args.quick)
    # Retrieval needs an embedding, not the model being trained: raw pixels find same-class Fashion-MNIST images
    # well (85% k-NN top-1 in docs/benchmarks.md#core); pass --model for a learned one (e.g. runs/fmnist/artifact).
    model, feature = (args.model, "cls") if args.model else ("pixels", "pixels")
    cfg = load_config(CurateConfig, REPO / "pretrain" / "curate" / "recipes" / "payoff_fmnist.yaml", [
        f"output={work / 'curate'}", f"pool={pool}", f"seeds.labelled={labelled[0]}", f"embed.model={model}",
        f"embed.feature={feature}"])
    report = run_curation(cfg)
    curated = pd.read_csv(work / "curate" / "manifest.csv")
    random_rows = classes.sample(n=len(curated), random_state=0)
    random_rows[["path"]].to_csv(work / "random.csv", index=False)
    in_domain = {name: float(classes.set_index("path").loc[list(paths), "fmnist_class"].isin(CLASSES).mean())
                 for name, paths in (("curated", curated["path"]), ("random", random_rows["path"]))}
    steps = args.budget_steps
    top1 = {name: _pretrain_and_eval(work, name, manifest, steps, labelled, args.pretrain_set)
            for name, manifest in (("curated", work / "curate" / "manifest.csv"), ("random", work / "random.csv"))}
    return {"pool_images": len(classes), "subset_images": len(curated), "pretrain_steps": steps,
            "in_domain_fraction": in_domain, "knn_top1_k20": top1,
            "curated_minus_random": top1["curated"] - top1["random"],
            "curate_report_steps": list(report.get("steps", {}))}
