"""Peak memory of one rank reading a large manifest, measured at two sizes and extrapolated (docs/pretrain.md).

    python bench/bench_manifest_rss.py --rows 2000000 20000000 [--take 5000] [--world 8] [--dir /tmp/x]
    python bench/bench_manifest_rss.py --rows 1000000 --pandas    # the pandas reader (ManifestSource), for scale

For each size a synthetic Arrow manifest (``path`` like ``train/c0123/000004567.jpg`` and an integer
``label``; written a million rows at a time, removed afterwards) is read in a fresh process as one rank of
``--world``: open the source, build the epoch order, take the rank's first ``--take`` records of the epoch
(as the pretraining sampler does, without decoding images). The child reports its memory after imports and
at the end: peak RSS (VmHWM), peak anonymous memory (polled every 5 ms) and file-backed RSS (mapped manifest
pages, shared and reclaimable), and the peak above the post-import RSS (what reading the manifest costs; the
imports — torch, pandas, pyarrow — are every rank's anyway). The growth per row between the two largest
sizes extrapolates to 142M rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TARGET_ROWS = 142_000_000
_CHUNK = 1_000_000


def _status() -> dict[str, float]:
    """MB figures of /proc/self/status (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def write_manifest(path: Path, rows: int, *, parquet: bool = False) -> None:
    """A synthetic manifest of ``rows`` rows, written a chunk at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dinoforge.core.data.arrow_manifest import LABELS_METADATA_KEY

    # As convert_manifest writes it: labels checked once, so opening reads no label page.
    schema = pa.schema([("path", pa.string()), ("label", pa.int64())],
                       metadata=None if parquet else {LABELS_METADATA_KEY: b'{"checked": true}'})
    writer = pq.ParquetWriter(path, schema) if parquet else pa.ipc.new_file(str(path), schema)
    for lo in range(0, rows, _CHUNK):
        n = np.arange(lo, min(lo + _CHUNK, rows))
        label = pa.array(n * 7919 % 1000)
        folder = pc.utf8_lpad(pc.cast(label, pa.string()), width=4, padding="0")
        name = pc.utf8_lpad(pc.cast(pa.array(n), pa.string()), width=9, padding="0")
        paths = pc.binary_join_element_wise("train/c", folder, "/", name, ".jpg", "")
        batch = pa.record_batch([paths, label], schema=schema)
        writer.write_batch(batch)
    writer.close()


def child(path: Path, take: int, world: int, block_size: int) -> dict[str, Any]:
    """Read one rank's first ``take`` records through the source, reporting memory (runs in its own process)."""
    from dinoforge.core.data import EpochOrder, RankSampler, open_source

    before = _status()
    peak_anon = [before["RssAnon"]]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status()["RssAnon"])
            time.sleep(0.005)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    source = open_source(f"manifest:{path}")
    order = EpochOrder(len(source), seed=0, block_size=block_size)
    sampler = iter(RankSampler(order, epoch=1, rank=world - 1, world_size=world))
    paths = 0
    for _ in range(take):
        paths += len(source.record(next(sampler)).path or "")
    done.set()
    watcher.join()
    after = _status()
    return {"rows": len(source), "reader": type(source).__name__, "took": take,
            "baseline_rss_mb": round(before["VmRSS"], 1), "baseline_anon_mb": round(before["RssAnon"], 1),
            "peak_rss_mb": round(after["VmHWM"], 1), "anon_mb": round(max(peak_anon[0], after["RssAnon"]), 1),
            "file_mb": round(after["RssFile"], 1), "bytes_read": paths,
            "above_baseline_mb": round(after["VmHWM"] - before["VmRSS"], 1)}


def measure(rows: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Write a manifest of ``rows`` rows, read it in a child process, delete it."""
    path = workdir / f"manifest-{rows}.{'parquet' if args.pandas else 'arrow'}"
    write_manifest(path, rows, parquet=args.pandas)
    try:
        done = subprocess.run([sys.executable, __file__, "--child", str(path), "--take", str(args.take),
                               "--world", str(args.world), "--block-size", str(args.block_size)],
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["file_size_mb"] = round(path.stat().st_size / 2**20, 1)
    finally:
        path.unlink(missing_ok=True)
    return result


def extrapolate(results: list[dict[str, Any]]) -> dict[str, float]:
    """Per-row growth between the two largest runs and the figures it gives at 142M rows."""
    a, b = results[-2], results[-1]
    out = {}
    for key in ("peak_rss_mb", "anon_mb", "above_baseline_mb"):
        slope = (b[key] - a[key]) / (b["rows"] - a["rows"])
        out[f"{key}_per_million_rows"] = round(slope * 1e6, 2)
        # A slope within noise of zero (or below) extrapolates to the larger of the two measurements.
        out[f"{key}_at_142M"] = round(max(a[key], b[key], b[key] + slope * (TARGET_ROWS - b["rows"])), 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 20_000_000])
    parser.add_argument("--take", type=int, default=5000, help="records this rank reads")
    parser.add_argument("--world", type=int, default=8, help="ranks the epoch is split over")
    parser.add_argument("--block-size", type=int, default=1 << 20, help="rows per block of the epoch order")
    parser.add_argument("--pandas", action="store_true", help="write parquet: measures the pandas reader")
    parser.add_argument("--dir", type=Path, default=None, help="where the manifests are written (default: /tmp)")
    parser.add_argument("--json", action="store_true", help="print only one JSON line of results")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.take, args.world, args.block_size)))
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = [measure(rows, args, Path(tmp)) for rows in sorted(args.rows)]
    if args.json:
        print(json.dumps(results))
        return 0
    for r in results:
        print(json.dumps(r))
    if len(results) >= 2:
        print(json.dumps(extrapolate(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
