"""``POST /v1/classify``: top-k labels from the server's classification head."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from dinoforge.serve.errors import InvalidInput, NotFound
from dinoforge.serve.images import check_count, decode_input
from dinoforge.serve.pooling import PoolingOptions
from dinoforge.serve.responses import ERROR_RESPONSES, json_response, timing
from dinoforge.serve.schemas import ClassifyRequest, ClassifyResponse, as_list
from dinoforge.serve.state import ServerState, get_state

router = APIRouter(tags=["classification"])


@router.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES,
             summary="Top-k labels per image from the k-NN or linear-probe head")
async def classify(req: ClassifyRequest, request: Request, state: ServerState = Depends(get_state)) -> Response:
    start = time.perf_counter()
    state.require_ready()
    head = state.head
    if head is None:
        raise NotFound("this server has no classification head; start it with --head DIR "
                       "(built by `dinoforge serve build-head`)")
    state.check_model(req.model)
    if req.top_k > state.settings.max_top_k:
        raise InvalidInput(f"top_k={req.top_k} is above this server's limit of {state.settings.max_top_k}")
    inputs = as_list(req.input)
    check_count(len(inputs), state.settings.max_images_per_request)
    images = [decode_input(item, i) for i, item in enumerate(inputs)]
    result = await state.embed(request, images)
    # heads work on raw pooled features (the k-NN protocol normalises them itself)
    feats = state.pooled(result, PoolingOptions(pooling=head.card.pooling, normalize=False))  # [n, D']
    ranked = head.top_k(feats, req.top_k)
    data = [{"index": i, "predictions": [{"label": label, "score": score} for label, score in preds]}
            for i, preds in enumerate(ranked)]
    return json_response({"object": "list", "data": data, "model": state.model_name, "head": head.describe(),
                          "timing": timing(result, start)})
