"""Human-readable tables of evaluation reports (Markdown, so they paste into docs unchanged)."""

from __future__ import annotations

from typing import Any


def _header(report: dict[str, Any]) -> list[str]:
    model = report["model"]
    data = {k: report[k] for k in ("train", "test", "query", "gallery") if k in report}
    pre = report["preprocessing"]
    sha = f", sha256 {model['sha256'][:12]}" if model.get("sha256") else ""
    lines = [f"model: {model['name']} ({model['kind']}{sha})"]
    for role, entry in data.items():
        skipped = entry["skipped"]["bad"]
        lines.append(f"{role}: {entry['spec']} ({entry['samples']} samples"
                     f"{f', {skipped} skipped' if skipped else ''}, features {entry['feature_seconds']:.1f} s)")
    lines.append(f"preprocessing: {pre['mode']} size={pre['size']} resize={pre['resize_size']} "
                 f"{pre['interpolation']} mean={list(pre['mean'])} std={list(pre['std'])}")
    return lines


def _knn_rows(results: dict[str, Any]) -> list[str]:
    rows = ["| features | k | top-1 | top-5 |", "|---|---:|---:|---:|"]
    for name, res in results.items():
        for k in res["ks"]:
            used = res["k_used"][str(k)]
            label = f"{k}" if used == k else f"{k} (used {used})"
            rows.append(f"| {name} | {label} | {res['top1'][str(k)]:.2f} | {res['top5'][str(k)]:.2f} |")
    return rows


def _linear_rows(results: dict[str, Any]) -> list[str]:
    rows = ["| features | best lr | best wd | val top-1 | test top-1 | test top-5 |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, res in results.items():
        rows.append(f"| {name} | {res['best_lr']:g} | {res['best_wd']:g} | {res['val_top1']:.2f} | "
                    f"{res['top1']:.2f} | {res['top5']:.2f} |")
    return rows


def _retrieval_rows(results: dict[str, Any]) -> list[str]:
    ks = next(iter(results.values()))["ks"]
    rows = ["| features | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for name, res in results.items():
        rows.append(f"| {name} | " + " | ".join(f"{res['recall'][str(k)]:.2f}" for k in ks) + " |")
    return rows


def format_report(report: dict[str, Any]) -> str:
    """Header lines (model, data, preprocessing) and a Markdown table of the results."""
    rows = {"knn": _knn_rows, "linear": _linear_rows, "retrieval": _retrieval_rows}[report["task"]]
    lines = _header(report) + [""] + rows(report["results"])
    lines.append(f"\ntotal {report['total_seconds']:.1f} s")
    return "\n".join(lines)
