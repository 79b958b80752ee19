"""What the search page asks for: ``POST /v1/query`` (one upload -> neighbours with thumbnails, labels and the
patch-PCA picture, in one round trip) and ``POST /v1/pca`` (patch-PCA pictures of uploads, joint across them)."""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from dinoforge.serve.engine import EngineResult
from dinoforge.serve.errors import InvalidInput, NotFound
from dinoforge.serve.images import check_count
from dinoforge.serve.patch_pca import PatchPCA, patch_pca
from dinoforge.serve.pooling import PoolingOptions
from dinoforge.serve.responses import ERROR_RESPONSES, json_response, timing
from dinoforge.serve.state import ServerState, get_state
from dinoforge.serve.thumbnails import thumbnail_data_uri

if TYPE_CHECKING:
    from dinoforge.serve.index_store import IndexStore

router = APIRouter(tags=["search page"])
NO_PATCH_TOKENS = ("this model gives no patch tokens, so there is no patch-PCA view (an ONNX graph exported "
                   "without them: re-export with `dinoforge export onnx --patch-tokens`)")
_BINARY = {"type": "string", "format": "binary"}


def _multipart(properties: dict[str, Any]) -> dict[str, Any]:
    """A closed multipart schema: the routes refuse unknown fields, so the document says so."""
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"], "additionalProperties": False, "properties": properties}}}}}


_QUERY_FORM = _multipart({"file": _BINARY, "top_k": {"type": "integer", "minimum": 1}})
_PCA_FORM = _multipart({"file": {"type": "array", "minItems": 1, "items": _BINARY}})


async def _read_form(request: Request, fields: tuple[str, ...], limit: int) -> tuple[list[bytes], dict[str, str]]:
    """Uploaded files (``file`` parts, non-empty) and the named text fields of a multipart body."""
    form = await request.form(max_files=limit + 1, max_fields=len(fields) + 1)
    files, values = [], {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.append(await value.read())
        elif key in fields:
            values[key] = str(value)
        else:
            raise InvalidInput(f"unknown form field {key!r}; expected 'file' parts and {', '.join(fields)}")
    check_count(len(files), limit)
    for i, data in enumerate(files):
        if not data:
            raise InvalidInput(f"input[{i}]: empty file")
    return files, values


def _int_field(values: dict[str, str], name: str, default: int, limit: int) -> int:
    raw = values.get(name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be an integer, got {raw!r}") from None
    if not 1 <= value <= limit:
        raise InvalidInput(f"{name}={value} must be between 1 and {limit}")
    return value


def _searchable(state: ServerState) -> IndexStore:
    index = state.index
    if index is None:
        raise NotFound("this server has no image index; build one with `dinoforge index build --model M "
                       "--input FOLDER --index DIR` and start the server with --index DIR")
    if index.count == 0:
        raise NotFound(f"the index at {state.settings.index_dir} is empty; add images with `dinoforge index "
                       "build` (or POST /v1/index) and search again")
    return index


def pca_pictures(result: EngineResult, patch_size: int) -> list[PatchPCA]:
    """Joint patch PCA of an engine result's images (422 when the model gives no patch tokens)."""
    tokens, grids = [], []
    for row, (h, w) in zip(result.rows, result.sizes, strict=True):
        if row.patch is None:
            raise InvalidInput(NO_PATCH_TOKENS)
        tokens.append(row.patch[0].astype(np.float32))  # [h*w, D]
        grids.append((h // patch_size, w // patch_size))
    return patch_pca(tokens, grids)


def pca_json(picture: PatchPCA) -> dict[str, Any]:
    """``grid [h, w]``, ``rgb`` (base64 of ``h*w*3`` bytes, row-major) and the foreground share."""
    return {"grid": list(picture.grid), "rgb": base64.b64encode(picture.rgb.tobytes()).decode("ascii"),
            "foreground": round(float(picture.mask.mean()), 4)}


def _classify(state: ServerState, result: EngineResult, k: int) -> list[dict[str, Any]] | None:
    head, backend = state.head, state.backend
    if head is None or backend is None:
        return None
    options = PoolingOptions(pooling=head.card.pooling, normalize=False)
    feats = state.pooled(result, options)  # [1, D'] raw: the head normalises as it was built
    return [{"label": label, "score": score} for label, score in head.top_k(feats, k)[0]]


@router.post("/v1/query", responses=ERROR_RESPONSES, openapi_extra=_QUERY_FORM,
             summary="One uploaded image -> nearest indexed images (with thumbnails), labels and its patch PCA")
async def query(request: Request, state: ServerState = Depends(get_state)) -> Response:
    start = time.perf_counter()
    backend, _ = state.require_ready()
    index = _searchable(state)
    files, values = await _read_form(request, ("top_k",), limit=1)
    top_k = _int_field(values, "top_k", 12, state.settings.max_top_k)
    result = await state.embed(request, files)
    vector = state.pooled(result, PoolingOptions(pooling=index.pooling, normalize=True))
    hits = (await run_in_threadpool(index.search, vector, top_k))[0]
    matches = [{"id": name, "score": score, "metadata": meta,
                "thumbnail": thumbnail_data_uri(state.settings.index_dir, name)} for name, score, meta in hits]
    body: dict[str, Any] = {"matches": matches, "classification": _classify(state, result, 5),
                            "pca": None, "pca_error": None}
    try:
        body["pca"] = pca_json((await run_in_threadpool(pca_pictures, result, backend.info.patch_size))[0])
    except InvalidInput as err:  # the search still answers; the page says why the picture is missing
        body["pca_error"] = str(err)
    body["timing"] = timing(result, start)
    return json_response(body)


@router.post("/v1/pca", responses=ERROR_RESPONSES, openapi_extra=_PCA_FORM,
             summary="Patch-PCA pictures of uploaded images (one PCA fitted on all of them)")
async def pca(request: Request, state: ServerState = Depends(get_state)) -> Response:
    start = time.perf_counter()
    backend, _ = state.require_ready()
    if not backend.has_patch_tokens:
        raise InvalidInput(NO_PATCH_TOKENS)
    files, _ = await _read_form(request, (), limit=state.settings.max_images_per_request)
    result = await state.embed(request, files)
    pictures = await run_in_threadpool(pca_pictures, result, backend.info.patch_size)
    return json_response({"data": [{"index": i, **pca_json(p)} for i, p in enumerate(pictures)],
                          "timing": timing(result, start)})


def rgb_array(item: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`pca_json`'s ``rgb``: uint8 ``[h, w, 3]``."""
    h, w = item["grid"]
    return np.frombuffer(base64.b64decode(item["rgb"]), dtype=np.uint8).reshape(h, w, 3)
