"""The search page: ``GET /`` (HTML), ``/static/*`` (its CSS and JS, shipped in the package) and ``GET /v1/card``
(what the page shows about the model and the index)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from dinoforge.serve.responses import ERROR_RESPONSES, json_response
from dinoforge.serve.state import ServerState, get_state

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PREFIX = "/static"
router = APIRouter(tags=["search page"])


def open_paths() -> frozenset[str]:
    """Paths served without an API key: the page and its assets (the page asks for the key itself)."""
    assets = {f"{STATIC_PREFIX}/{p.name}" for p in STATIC_DIR.iterdir() if p.is_file()}
    return frozenset({"/", *assets})


def static_files() -> StaticFiles:
    """The page's assets (mounted at :data:`STATIC_PREFIX`)."""
    return StaticFiles(directory=STATIC_DIR)


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})


@router.get("/v1/card", responses=ERROR_RESPONSES, summary="The served model's card, head and index, for the page")
async def card(state: ServerState = Depends(get_state)) -> Response:
    backend, _ = state.require_ready()
    info, settings = backend.info, state.settings
    pre = info.preprocessing
    return json_response({
        "model": {"name": info.name, "backend": backend.name, "embed_dim": info.embed_dim,
                  "patch_size": info.patch_size, "pooling": info.default_pooling,
                  "weights_sha256": info.weights_sha256, "patch_tokens": backend.has_patch_tokens,
                  "preprocessing": {"mode": pre.mode, "size": pre.size}},
        "head": state.head.describe() if state.head else None,
        "index": state.index.info() if state.index else None,
        "limits": {"max_payload_bytes": settings.max_payload_bytes, "max_pixels": settings.max_pixels,
                   "max_top_k": settings.max_top_k},
    })
