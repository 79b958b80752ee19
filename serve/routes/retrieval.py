"""Retrieval: ``POST /v1/index``, ``DELETE /v1/index/{id}``, ``GET /v1/index``, ``POST /v1/search``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from dinoforge.serve.errors import InvalidInput, NotFound
from dinoforge.serve.images import check_count, decode_input
from dinoforge.serve.pooling import PoolingOptions
from dinoforge.serve.responses import ERROR_RESPONSES, json_response, timing
from dinoforge.serve.schemas import (IndexAddRequest, IndexAddResponse, IndexDeleteResponse, IndexInfo,
                                     SearchRequest, SearchResponse, as_list)
from dinoforge.serve.state import ServerState, get_state

if TYPE_CHECKING:
    from dinoforge.serve.index_store import IndexStore

router = APIRouter(tags=["retrieval"])


def _index(state: ServerState) -> IndexStore:
    state.require_ready()
    if state.index is None:
        raise NotFound("this server has no retrieval index; start it with --index-dir DIR")
    return state.index


def _index_options(index: IndexStore) -> PoolingOptions:
    return PoolingOptions(pooling=index.pooling, normalize=True)


@router.post("/v1/index", response_model=IndexAddResponse, responses=ERROR_RESPONSES,
             summary="Add images with ids and JSON metadata (an existing id is replaced)")
async def index_add(req: IndexAddRequest, request: Request, state: ServerState = Depends(get_state)) -> Response:
    start = time.perf_counter()
    index = _index(state)
    state.check_model(req.model)
    check_count(len(req.items), state.settings.max_images_per_request)
    images = [decode_input(item.image, i) for i, item in enumerate(req.items)]
    result = await state.embed(request, images)
    vectors = state.pooled(result, _index_options(index))  # [n, D]
    ids, replaced = await run_in_threadpool(index.upsert, [it.id for it in req.items], vectors,
                                            [it.metadata for it in req.items])
    return json_response({"ids": ids, "added": len(set(ids)) - replaced, "replaced": replaced,
                          "count": index.count, "timing": timing(result, start)})


@router.delete("/v1/index/{item_id:path}", response_model=IndexDeleteResponse, responses=ERROR_RESPONSES,
               summary="Remove one id from the index")
async def index_delete(item_id: str, state: ServerState = Depends(get_state)) -> Response:
    index = _index(state)
    if not await run_in_threadpool(index.delete, item_id):
        raise NotFound(f"id {item_id!r} is not in the index")
    return json_response({"deleted": item_id, "count": index.count})


@router.get("/v1/index", response_model=IndexInfo, responses=ERROR_RESPONSES, summary="Index size and binding")
async def index_info(state: ServerState = Depends(get_state)) -> Response:
    return json_response(_index(state).info())


@router.post("/v1/search", response_model=SearchResponse, responses=ERROR_RESPONSES,
             summary="Nearest indexed images (cosine) of each query image")
async def search(req: SearchRequest, request: Request, state: ServerState = Depends(get_state)) -> Response:
    start = time.perf_counter()
    index = _index(state)
    state.check_model(req.model)
    if req.top_k > state.settings.max_top_k:
        raise InvalidInput(f"top_k={req.top_k} is above this server's limit of {state.settings.max_top_k}")
    inputs = as_list(req.input)
    check_count(len(inputs), state.settings.max_images_per_request)
    images = [decode_input(item, i) for i, item in enumerate(inputs)]
    result = await state.embed(request, images)
    queries = state.pooled(result, _index_options(index))
    hits = await run_in_threadpool(index.search, queries, req.top_k)
    data = [{"index": i, "matches": [{"id": name, "score": score, "metadata": meta} for name, score, meta in row]}
            for i, row in enumerate(hits)]
    return json_response({"object": "list", "data": data, "timing": timing(result, start)})
