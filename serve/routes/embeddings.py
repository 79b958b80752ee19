"""``POST /v1/embeddings`` (JSON, OpenAI-shaped) and ``POST /v1/embeddings/upload`` (multipart files)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from dinoforge.core.pooling import Pooling, pooled_dim
from dinoforge.serve.backends.base import Backend
from dinoforge.serve.engine import EngineResult
from dinoforge.serve.errors import InvalidInput, PayloadTooLarge
from dinoforge.serve.images import check_count, decode_input
from dinoforge.serve.pooling import PoolingOptions
from dinoforge.serve.wire import encode_vector, encoded_bytes
from dinoforge.serve.responses import ERROR_RESPONSES, json_response, timing, validation_message
from dinoforge.serve.schemas import EmbeddingOptions, EmbeddingsRequest, EmbeddingsResponse, as_list
from dinoforge.serve.state import ServerState, get_state

router = APIRouter(tags=["embeddings"])
#: form fields accepted by the upload route besides the files
UPLOAD_OPTIONS = ("model", "encoding_format", "dimensions", "pooling", "normalize", "return_patch_tokens",
                  "patch_tokens_dtype")
#: JSON around each item and the envelope, generously (keys, index, grid, timing)
_ITEM_OVERHEAD, _BODY_OVERHEAD = 160, 1024


def pooling_options(backend: Backend, pooling: Pooling | None, normalize: bool,
                    dimensions: int | None) -> PoolingOptions:
    """Validate request options against the served model (422 with a reason)."""
    pooling = pooling or backend.info.default_pooling
    full = pooled_dim(backend.info.embed_dim, pooling)
    if dimensions is not None and dimensions > full:
        raise InvalidInput(f"dimensions={dimensions} is larger than the {pooling} embedding ({full})")
    return PoolingOptions(pooling=pooling, normalize=normalize, dimensions=dimensions)


def _patch_item(row_patch: np.ndarray, size: tuple[int, int], patch_size: int,
                req: EmbeddingOptions) -> dict[str, Any]:
    """``row_patch``: ``[N, D]`` float32 tokens of one image."""
    grid = [size[0] // patch_size, size[1] // patch_size]
    if req.encoding_format == "float" and req.patch_tokens_dtype == "float32":
        return {"patch_tokens": row_patch.tolist(), "patch_grid": grid}
    return {"patch_tokens": encode_vector(row_patch.reshape(-1), "base64", req.patch_tokens_dtype),
            "patch_grid": grid, "patch_shape": list(row_patch.shape), "patch_tokens_dtype": req.patch_tokens_dtype}


def check_response_size(n_images: int, dim: int, patch_floats: list[int], req: EmbeddingOptions,
                        limit: int) -> None:
    """413 when a response would be larger than ``limit`` bytes (estimated from shapes, before it is built).

    Args:
        n_images: images answered.
        dim: embedding width.
        patch_floats: values of each image's patch tokens (``N_i * D``); ignored without ``return_patch_tokens``.
        req: the request options (encodings decide bytes per value).
        limit: the server's ``max_response_bytes``.
    """
    size = _BODY_OVERHEAD + n_images * (_ITEM_OVERHEAD + encoded_bytes(dim, req.encoding_format))
    if req.return_patch_tokens:
        patch_fmt = "float" if req.encoding_format == "float" and req.patch_tokens_dtype == "float32" else "base64"
        size += sum(encoded_bytes(n, patch_fmt, req.patch_tokens_dtype) for n in patch_floats)
    if size > limit:
        raise PayloadTooLarge(f"the response would be about {size} bytes, over this server's limit of {limit}: "
                              "send fewer images per request, or use encoding_format=base64 and "
                              "patch_tokens_dtype=float16, or drop return_patch_tokens")


def _fixed_patch_floats(backend: Backend) -> int | None:
    """Patch-token values per image when the contract fixes the input size (known before inference)."""
    cfg = backend.info.preprocessing
    if cfg.mode == "patch_multiple":
        return None  # depends on each image's aspect ratio
    return (cfg.size // backend.info.patch_size) ** 2 * backend.info.embed_dim


async def embed_images(state: ServerState, request: Request, images: list[bytes], req: EmbeddingOptions,
                       start: float) -> Response:
    """Shared body of both embedding routes."""
    backend, _ = state.require_ready()
    state.check_model(req.model)
    options = pooling_options(backend, req.pooling, req.normalize, req.dimensions)
    if req.return_patch_tokens and not backend.has_patch_tokens:
        raise InvalidInput("return_patch_tokens: this model was exported without patch tokens "
                           "(re-export with `dinoforge export onnx --patch-tokens`)")
    limit, per_image = state.settings.max_response_bytes, _fixed_patch_floats(backend)
    if per_image is not None:  # refuse before any inference when the size is known from the request alone
        dim = options.dimensions or pooled_dim(backend.info.embed_dim, options.pooling)
        check_response_size(len(images), dim, [per_image] * len(images), req, limit)
    result: EngineResult = await state.embed(request, images)
    vectors = state.pooled(result, options)  # [n, D']
    patch_floats = [0 if row.patch is None else row.patch[0].size for row in result.rows]
    check_response_size(len(result.rows), vectors.shape[1], patch_floats, req, limit)
    data = []
    for i, vec in enumerate(vectors):
        item: dict[str, Any] = {"object": "embedding", "index": i, "embedding": encode_vector(vec, req.encoding_format)}
        patch = result.rows[i].patch
        if req.return_patch_tokens and patch is not None:
            item.update(_patch_item(patch[0], result.sizes[i], backend.info.patch_size, req))
        data.append(item)
    p = backend.info.patch_size
    tokens = sum(1 + (h // p) * (w // p) for h, w in result.sizes)
    return json_response({"object": "list", "data": data, "model": state.model_name,
                          "usage": {"images": len(images), "prompt_tokens": tokens, "total_tokens": tokens},
                          "timing": timing(result, start)})


@router.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=ERROR_RESPONSES,
             summary="Embed images (OpenAI-shaped request and response)")
async def embeddings(req: EmbeddingsRequest, request: Request,
                     state: ServerState = Depends(get_state)) -> Response:
    start = time.perf_counter()
    state.require_ready()
    inputs = as_list(req.input)
    check_count(len(inputs), state.settings.max_images_per_request)
    images = [decode_input(item, i) for i, item in enumerate(inputs)]
    return await embed_images(state, request, images, req, start)


def _upload_schema() -> dict[str, Any]:
    """The upload form: ``file`` parts and the options typed as the JSON route types them (not "any string")."""
    options = EmbeddingOptions.model_json_schema()["properties"]

    def field(name: str) -> dict[str, Any]:  # a form field is absent rather than null
        spec = options[name]
        return next(v for v in spec["anyOf"] if v.get("type") != "null") if "anyOf" in spec else spec

    return {"type": "object", "required": ["file"], "additionalProperties": False, "properties": {
        "file": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}},
        **{k: field(k) for k in UPLOAD_OPTIONS}}}


async def _read_upload(request: Request, limit: int) -> tuple[list[bytes], EmbeddingOptions]:
    """The uploaded files and the options; options are checked first (a bad option is a 422 naming it)."""
    # Files are only bounded by the body-size guard; the image count gets its own 413 below.
    form = await request.form(max_files=10_000, max_fields=len(UPLOAD_OPTIONS) + 1)
    files, fields = [], {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.append(await value.read())
        elif key in UPLOAD_OPTIONS:
            fields[key] = value
        else:
            raise InvalidInput(f"unknown form field {key!r}; options are {', '.join(UPLOAD_OPTIONS)}")
    try:  # form fields are text: lax parsing turns "true" / "5" into a bool / an int
        options = EmbeddingOptions.model_validate(fields, strict=False)
    except ValidationError as err:
        raise InvalidInput(validation_message(err)) from None
    check_count(len(files), limit)
    for i, data in enumerate(files):
        if not data:
            raise InvalidInput(f"input[{i}]: empty file")
    return files, options


@router.post("/v1/embeddings/upload", response_model=EmbeddingsResponse, responses=ERROR_RESPONSES,
             summary="Embed uploaded image files (multipart/form-data; options as form fields)",
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": _upload_schema()}},
                                                "required": True}})
async def embeddings_upload(request: Request, state: ServerState = Depends(get_state)) -> Response:
    start = time.perf_counter()
    state.require_ready()
    files, options = await _read_upload(request, state.settings.max_images_per_request)
    return await embed_images(state, request, files, options, start)
