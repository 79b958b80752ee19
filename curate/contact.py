"""A PNG contact sheet of duplicate groups: one row per group, the kept image first (green frame), then its
copies (red frames) with their similarity to it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageOps

from dinoforge.core.fileio import atomic_open

_KEPT, _COPY, _BG = (40, 160, 60), (200, 50, 50), (245, 245, 245)


def _thumb(path: Path, side: int) -> Image.Image:
    try:
        with Image.open(path) as im:
            return ImageOps.pad(im.convert("RGB"), (side, side), color=_BG)
    except OSError:  # vanished or unreadable since it was embedded: a grey tile keeps the sheet aligned
        return Image.new("RGB", (side, side), (180, 180, 180))


def contact_sheet(folder: Path, groups: pd.DataFrame, out: Path, *, max_groups: int = 40, per_row: int = 8,
                  side: int = 112) -> Path:
    """Draw the first ``max_groups`` groups of ``groups`` (columns group, role, path, similarity) to ``out``.

    Groups come in the table's order (largest first); a group with more members than ``per_row`` shows the
    first ones and says how many more there are. An empty table gives a one-line sheet saying so.
    """
    shown = [g for _, g in groups.groupby("group", sort=True)][:max_groups]
    pad, label = 4, 14
    cell = side + 2 * pad
    sheet = Image.new("RGB", (per_row * cell, max(1, len(shown)) * (cell + label) + label), "white")
    draw = ImageDraw.Draw(sheet)
    if not shown:
        draw.text((pad, pad), "no copies or near-duplicates found", fill="black")
    for r, group in enumerate(shown):
        y = r * (cell + label) + label
        draw.text((pad, y - label + 1), f"group {int(group.group.iloc[0])}: {len(group)} images"
                  + (f" ({len(group) - per_row} not shown)" if len(group) > per_row else ""), fill="black")
        for c, row in enumerate(group.head(per_row).itertuples()):
            x = c * cell
            colour = _KEPT if row.role == "kept" else _COPY
            draw.rectangle((x + 1, y + 1, x + cell - 2, y + cell - 2), outline=colour, width=3)
            sheet.paste(_thumb(folder / row.path, side), (x + pad, y + pad))
            tag = "kept" if row.role == "kept" else f"{row.similarity:.2f}"
            draw.text((x + pad + 2, y + pad + 2), tag, fill=colour, stroke_width=2, stroke_fill="white")
    with atomic_open(out) as handle:
        sheet.save(handle, "PNG")
    return out


__all__ = ["contact_sheet"]
