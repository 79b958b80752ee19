"""Human-readable table of a parity report (the JSON form is ``parity.json``)."""

from __future__ import annotations

from typing import Any


def format_report(report: dict[str, Any]) -> str:
    """One block per graph: cosines, max error, k-NN, size, speed, checks."""
    lines = [f"parity of {report['artifact']} ({report['precision']}): "
             f"{'PASSED' if report.get('passed') else 'FAILED'}"]
    for tag, section in report["graphs"].items():
        lines.append(f"  resolution {tag} ({section['images']} images)")
        for run in ("batch16", "batch1"):
            for output, m in section[run].items():
                lines.append(f"    {run:8s} {output:15s} min cos {m['min_cosine']:.6f}  mean cos "
                             f"{m['mean_cosine']:.6f}  max abs {m['max_abs_error']:.3g}")
        if "knn" in section:
            k = section["knn"]
            lines.append(f"    k-NN ({k['n_index']} index / {k['n_queries']} queries, k={k['k']}): "
                         f"agreement {k['top1_agreement']:.4f}  acc {k['accuracy']:.4f} vs torch "
                         f"{k['reference_accuracy']:.4f}  drop {k['drop_pt']:+.2f} pt")
        speed = section["speed"]
        lines.append(f"    size {section['bytes'] / 1e6:.2f} MB  CPU {speed['ms_per_image']:.2f} ms/img "
                     f"(batch {speed['batch']})")
        if "fp32_baseline" in section:
            b = section["fp32_baseline"]
            lines.append(f"    vs fp32 graph: size x{b['size_ratio']:.2f}  speed x{b['speedup']:.2f}"
                         + (f"  k-NN drop {b['int8_knn_drop_vs_fp32_pt']:+.2f} pt" if "knn_accuracy" in b else ""))
        failed = [c for c in section["checks"] if not c["passed"]]
        lines.append("    checks: " + ("all passed" if not failed else
                                         "; ".join(f"{c['check']}={c['value']:.6g} (limit {c['threshold']})"
                                                   for c in failed)))
    return "\n".join(lines)
