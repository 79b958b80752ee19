"""``dinoforge dedup INPUT --out DIR``: copies and near-duplicates of an image folder, one image kept per group.

The same machinery as the curation stage's self-deduplication (:func:`~.dedup.run_self_dedup`: k-NN graph of
L2-normalised descriptors through the index layer, edges at cosine similarity ``>= threshold``, then groups
by the descriptor's calibrated :mod:`~.linkage` rule), fed with the copy descriptor
(:class:`~.copynet.CopyDescriptor`) and its calibrated threshold. Rows are ordered by pixel count (largest
first), so the image each group keeps is its largest version; with the shipped head's ``kept`` rule, an
image is removed only when it is itself a near-duplicate of the image kept for it.

Steps (resumable, each marked in ``DIR/steps/`` with a fingerprint of what it read):

* ``embed``: descriptors written part by part (``embed/part-*.npy``, ``embed/rows.csv``); an interrupted run
  re-embeds only the missing parts;
* ``dedup``: the curation step's outputs (``dedup/removed.parquet``, ``components.parquet``, ``report.json``);
* outputs: ``groups.csv`` (group, role kept/copy, path, similarity to the kept image), ``groups.json``,
  ``kept.csv`` (the manifest of kept files, with their group size) and ``groups.png`` (a contact sheet).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from dinoforge.core.data.folder import IMAGE_EXTENSIONS
from dinoforge.core.errors import ConfigError, DataError
from dinoforge.core.extract.external import write_feature_store
from dinoforge.core.fileio import atomic_write_json, atomic_write_text
from dinoforge.core.index import IndexConfig
from dinoforge.core.runtime import init_runtime
from dinoforge.curate.config import DedupConfig
from dinoforge.curate.contact import contact_sheet
from dinoforge.curate.copynet import CopyDescriptor
from dinoforge.curate.dedup import run_self_dedup
from dinoforge.curate.linkage import Linkage
from dinoforge.curate.state import RunState, fingerprint

log = logging.getLogger("dinoforge.curate")
PART_ROWS = 256


def list_images(folder: Path) -> pd.DataFrame:
    """Readable image files under ``folder`` (recursive) as ``path, pixels``, largest first, then by path.

    Raises:
        DataError: ``folder`` is missing, not a folder, or holds no readable image.
    """
    if not folder.is_dir():
        raise DataError(f"input folder {folder} does not exist or is not a folder")
    rows, unreadable = [], []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        try:
            with Image.open(path) as im:
                rows.append((str(path.relative_to(folder)), im.width * im.height, path.stat().st_size,
                             path.stat().st_mtime_ns))
        except (OSError, ValueError):
            unreadable.append(str(path.relative_to(folder)))
    if not rows:
        raise DataError(f"no readable image under {folder} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}; "
                        f"{len(unreadable)} unreadable)")
    table = pd.DataFrame(rows, columns=["path", "pixels", "bytes", "mtime_ns"])
    table = table.sort_values(["pixels", "path"], ascending=[False, True], kind="stable").reset_index(drop=True)
    table.attrs["unreadable"] = unreadable
    return table


def check_output(out: Path) -> None:
    """Raises DataError unless ``out`` can be created and written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create output folder {out}: {err.strerror}") from None
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise DataError(f"output folder {out} is not writable")


def embed_step(state: RunState, folder: Path, files: pd.DataFrame, desc: CopyDescriptor) -> np.ndarray:
    """Descriptors ``[N, D]`` of ``files`` in their order, reusing the parts a previous run wrote."""
    parts = []
    for index, start in enumerate(range(0, len(files), PART_ROWS)):
        path = state.path("embed", f"part-{index:05d}.npy")
        if not path.is_file():
            images = []
            for rel in files["path"].iloc[start:start + PART_ROWS]:
                with Image.open(folder / rel) as im:
                    images.append(im.convert("RGB"))
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, desc(images))
            tmp.replace(path)
            log.info("dedup: embedded %d/%d images", min(start + PART_ROWS, len(files)), len(files))
        parts.append(np.load(path))
    atomic_write_text(state.path("embed", "rows.csv"), files[["path", "pixels"]].to_csv(index=False))
    return np.concatenate(parts)


def group_vectors(state: RunState, vectors: np.ndarray, ids: list[str], threshold: float, k: int,
                  fp: str, linkage: Linkage = "kept") -> dict[str, Any]:
    """The curation dedup step on precomputed unit ``vectors [N, D]`` (resumable under ``fp``)."""
    if state.is_done("dedup", fp):
        return state.report("dedup")
    work = state.begin("dedup", fp)
    store = write_feature_store(work / "features", [vectors], num_rows=len(ids), dim=vectors.shape[1], ids=ids,
                                dtype="float32", fingerprint=fp)
    cfg = DedupConfig(exact=False, near=True, k=k, threshold=threshold, linkage=linkage,
                      index=IndexConfig(kind="flat"))
    report = run_self_dedup(state, store, "cls", cfg)
    state.mark_done("dedup", fp, report)
    return report


def groups_table(state: RunState, vectors: np.ndarray, ids: list[str]) -> pd.DataFrame:
    """``group, role, path, similarity`` of every image in a group of two or more (kept image first)."""
    removed = pq.read_table(state.path("dedup", "removed.parquet")).to_pandas()
    records = []
    for number, (root, members) in enumerate(sorted(removed.groupby("component"), key=lambda g: -len(g[1]))):
        records.append((number, "kept", ids[int(root)], 1.0))
        for row in members["row"].to_numpy():
            records.append((number, "copy", ids[int(row)], float(vectors[int(row)] @ vectors[int(root)])))
    return pd.DataFrame(records, columns=["group", "role", "path", "similarity"])


def write_outputs(folder: Path, out: Path, files: pd.DataFrame, groups: pd.DataFrame,
                  sheet_groups: int) -> pd.DataFrame:
    """Write ``groups.csv``, ``groups.json``, ``kept.csv`` and ``groups.png``; returns the kept table."""
    atomic_write_text(out / "groups.csv", groups.to_csv(index=False))
    nested = [{"kept": g.path.iloc[0], "copies": g.iloc[1:][["path", "similarity"]].to_dict("records")}
              for _, g in groups.groupby("group", sort=True)]
    atomic_write_text(out / "groups.json", json.dumps(nested, indent=1) + "\n")
    sizes = groups.groupby("group").size()
    heads = groups[groups.role == "kept"]
    size_of = dict(zip(heads.path, heads.group.map(sizes), strict=True))
    kept = files[~files.path.isin(set(groups[groups.role == "copy"].path))][["path", "pixels"]].copy()
    kept["group_size"] = [int(size_of.get(p, 1)) for p in kept.path]
    atomic_write_text(out / "kept.csv", kept.to_csv(index=False))
    contact_sheet(folder, groups, out / "groups.png", max_groups=sheet_groups)
    return kept


def run_dedup(input_dir: str | Path, out: str | Path, *, threshold: float | None = None,
              head: str | Path | None = None, k: int = 16, sheet_groups: int = 40,
              linkage: Linkage | None = None) -> dict[str, Any]:
    """Find and write the groups of copies under ``input_dir``; returns the report (also ``DIR/report.json``).

    ``threshold`` and ``linkage`` default to the descriptor's calibrated ones."""
    folder, out = Path(input_dir), Path(out)
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold {threshold} is not a cosine similarity in [-1, 1]")
    files = list_images(folder)
    check_output(out)
    state = RunState(out, init_runtime("cpu"))
    desc = CopyDescriptor(head)
    threshold = desc.threshold if threshold is None else threshold
    linkage = desc.linkage if linkage is None else linkage
    fp = fingerprint("embed", desc.fingerprint, str(folder.resolve()), files.to_dict("list"))
    if not state.is_done("embed", fp):
        state.begin("embed", fp)
    vectors = embed_step(state, folder, files, desc)
    state.mark_done("embed", fp, {"images": len(files), "dim": desc.dim})
    ids = files["path"].tolist()
    report = group_vectors(state, vectors, ids, threshold, k, fingerprint(fp, "dedup", threshold, k, linkage), linkage)
    groups = groups_table(state, vectors, ids)
    kept = write_outputs(folder, out, files, groups, sheet_groups)
    summary = {"input": str(folder), "images": len(files), "unreadable": files.attrs["unreadable"],
               "kept": len(kept), "removed": len(files) - len(kept), "groups": int(groups.group.nunique()),
               "threshold": threshold, "k": k, "linkage": linkage, "descriptor": desc.meta.get("method"),
               "dedup": {key: report.get(key) for key in ("edges", "components_multi", "largest_component")}}
    atomic_write_json(out / "report.json", summary)
    return summary


__all__ = ["check_output", "group_vectors", "groups_table", "list_images", "run_dedup"]
