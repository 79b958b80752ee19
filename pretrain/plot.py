"""``dinoforge plot RUN_DIR``: PNG training curves from a run's ``metrics.jsonl``.

One figure per group of related metrics (losses, schedules, collapse indicators, throughput, k-NN), each
written atomically as ``RUN_DIR/plots/<group>.png``. Groups with no recorded values are skipped.
"""

from __future__ import annotations

import io
from pathlib import Path

from dinoforge.core.errors import DataError
from dinoforge.core.fileio import atomic_write_bytes
from dinoforge.pretrain.monitor import METRICS_FILE, read_metrics

#: Figure name -> metric keys drawn on it (one subplot per key).
GROUPS: dict[str, tuple[str, ...]] = {
    "losses": ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss"),
    "schedules": ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr"),
    "collapse": ("teacher_entropy", "teacher_batch_entropy", "feature_std", "center_norm"),
    "throughput": ("img_per_s", "grad_norm_backbone", "grad_norm_dino_head", "grad_norm_ibot_head"),
    "knn": ("knn_top1", "knn_top5"),
}


def _series(records: list[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Points of ``key`` per evaluation set: k-NN records of different set sizes (periodic subsets vs the full
    sets at the start and end of a run) are not comparable, so each set gets its own line."""
    lines: dict[str, tuple[list[int], list[float]]] = {}
    for rec in records:
        value = rec.get(key)
        if isinstance(value, (int, float)) and "step" in rec:
            label = f"{rec['knn_n_train']} train / {rec['knn_n_test']} test" if "knn_n_train" in rec else ""
            xs, ys = lines.setdefault(label, ([], []))
            xs.append(int(rec["step"]))
            ys.append(float(value))
    return lines


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per metric group that has data.

    Args:
        run_dir: a run directory holding ``metrics.jsonl``.
        out_dir: destination folder (default ``run_dir/plots``).

    Returns:
        The written files.

    Raises:
        DataError: no ``metrics.jsonl`` or no plottable record in it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise DataError(f"{run_dir} is not a run directory: {METRICS_FILE} not found")
    records = read_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    written = []
    for name, keys in GROUPS.items():
        present = [(k, lines) for k in keys if (lines := _series(records, k))]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
        for ax, (key, lines) in zip(axes[0], present, strict=True):
            for label, (xs, ys) in lines.items():
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label or None)
            if any(lines):
                ax.legend(fontsize=7)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{run_dir.name}: {name}")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        path = out_dir / f"{name}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    if not written:
        raise DataError(f"{run_dir / METRICS_FILE} holds no plottable metrics")
    return written
