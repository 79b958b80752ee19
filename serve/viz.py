"""``dinoforge viz pca`` and ``dinoforge viz neighbours``: the page's pictures as PNG files.

The PCA itself is :func:`dinoforge.serve.patch_pca.patch_pca`, the one behind ``POST /v1/query``.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dinoforge.core.errors import ConfigError, DataError, ImageDecodeError
from dinoforge.core.pooling import pooled_dim
from dinoforge.core.preprocess import decode_image
from dinoforge.serve.backends.base import Backend
from dinoforge.serve.index_build import open_backend
from dinoforge.serve.index_store import DB_FILE, IndexStore
from dinoforge.serve.patch_pca import PatchPCA, patch_pca
from dinoforge.serve.pooling import PoolingOptions
from dinoforge.serve.routes.query import NO_PATCH_TOKENS
from dinoforge.serve.thumbnails import thumb_path

TILE = 224  # px of one picture in the output PNGs
LABEL_H = 18  # px of the text line under a tile


def _load(path: Path) -> Image.Image:
    try:
        return decode_image(path.read_bytes())
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    except ImageDecodeError as err:
        raise DataError(f"{path}: {err}") from None


def _tile(image: Image.Image, side: int = TILE, nearest: bool = False) -> Image.Image:
    """``image`` fitted into a white ``side`` x ``side`` square."""
    image = image.convert("RGB")
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - size[0]) // 2, (side - size[1]) // 2))
    return canvas


def _patch_tokens(backend: Backend, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
    """Patch tokens ``[h*w, D]`` of one image and its grid ``(h, w)``."""
    pixels = backend.pre(image)[None]  # [1, 3, H, W]
    feats = backend.core(pixels)
    if feats.patch is None:
        raise ConfigError(NO_PATCH_TOKENS)
    p = backend.info.patch_size
    return feats.patch[0].astype(np.float32), (pixels.shape[-2] // p, pixels.shape[-1] // p)


def _pair(image: Image.Image, picture: PatchPCA) -> Image.Image:
    """The image beside its PCA picture (one block per patch)."""
    out = Image.new("RGB", (2 * TILE, TILE), (255, 255, 255))
    out.paste(_tile(image), (0, 0))
    out.paste(_tile(Image.fromarray(picture.rgb), nearest=True), (TILE, 0))
    return out


def write_pca(backend: Backend, images: list[Path], out: Path) -> list[Path]:
    """``NAME.pca.png`` per image (its own PCA) and ``joint.pca.png`` (one PCA over all, one row per image)."""
    if not backend.has_patch_tokens:
        raise ConfigError(NO_PATCH_TOKENS)
    decoded = [_load(p) for p in images]
    tokens = [_patch_tokens(backend, im) for im in decoded]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, image, (tok, grid) in zip(images, decoded, tokens, strict=True):
        target = out / f"{path.stem}.pca.png"
        _pair(image, patch_pca([tok], [grid])[0]).save(target)
        written.append(target)
    joint = patch_pca([t for t, _ in tokens], [g for _, g in tokens])
    sheet = Image.new("RGB", (2 * TILE, TILE * len(images)), (255, 255, 255))
    for row, (image, picture) in enumerate(zip(decoded, joint, strict=True)):
        sheet.paste(_pair(image, picture), (0, row * TILE))
    sheet.save(out / "joint.pca.png")
    return [*written, out / "joint.pca.png"]


def _labelled(tile: Image.Image, text: str) -> Image.Image:
    cell = Image.new("RGB", (tile.width, tile.height + LABEL_H), (255, 255, 255))
    cell.paste(tile, (0, 0))
    ImageDraw.Draw(cell).text((4, tile.height + 3), text[:32], fill=(30, 30, 30))
    return cell


def _thumbnail(index_dir: Path, item_id: str, side: int) -> Image.Image:
    path = thumb_path(index_dir, item_id)
    if not path.is_file():
        return Image.new("RGB", (side, side), (235, 235, 235))  # indexed without a thumbnail
    return _tile(Image.open(io.BytesIO(path.read_bytes())), side)


def write_neighbours(backend: Backend, index_dir: Path, queries: list[Path], out: Path, k: int) -> Path:
    """``neighbours.png``: one row per query, the query then its ``k`` nearest indexed images with scores."""
    pooling = backend.info.default_pooling
    index = IndexStore(index_dir, dim=pooled_dim(backend.info.embed_dim, pooling), pooling=pooling,
                       model_sha256=backend.info.weights_sha256)
    try:
        if index.count == 0:
            raise DataError(f"the index at {index_dir} is empty; build it with `dinoforge index build`")
        side = TILE // 2
        sheet = Image.new("RGB", ((k + 1) * side, len(queries) * (side + LABEL_H)), (255, 255, 255))
        options = PoolingOptions(pooling=pooling, normalize=True)
        for row, path in enumerate(queries):
            image = _load(path)
            vector = backend.post(backend.core(backend.pre(image)[None]), options)  # [1, D']
            hits = index.search(vector, k)[0]
            cells = [_labelled(_tile(image, side), "query: " + path.name)]
            cells += [_labelled(_thumbnail(index_dir, name, side), f"{score:.3f} {Path(name).name}")
                      for name, score, _ in hits]
            for col, cell in enumerate(cells):
                sheet.paste(cell, (col * side, row * (side + LABEL_H)))
    finally:
        index.close()
    out.mkdir(parents=True, exist_ok=True)
    sheet.save(out / "neighbours.png")
    return out / "neighbours.png"


def _check_files(paths: list[Path]) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"not a file: {', '.join(missing[:5])}")


def run_viz_pca(args: argparse.Namespace) -> int:
    _check_files(args.images)
    backend = open_backend(args.model)
    try:
        written = write_pca(backend, args.images, args.out)
    finally:
        backend.close()
    print(f"wrote {len(written)} PNGs to {args.out} (joint PCA: {written[-1].name})")
    return 0


def run_viz_neighbours(args: argparse.Namespace) -> int:
    _check_files(args.queries)
    if args.k < 1:
        raise ConfigError("--k must be positive")
    if not (args.index / DB_FILE).is_file():
        raise ConfigError(f"--index {args.index} holds no index; build one with `dinoforge index build`")
    backend = open_backend(args.model)
    try:
        path = write_neighbours(backend, args.index, args.queries, args.out, args.k)
    finally:
        backend.close()
    print(f"wrote {path}")
    return 0
