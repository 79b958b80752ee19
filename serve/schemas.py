"""Request and response models of the HTTP API (OpenAI-shaped embeddings, TEI/infinity conventions).

Requests forbid unknown keys, so a misspelt option is a 422 naming it instead of being silently ignored.
Responses are documented here (OpenAPI under ``/docs``) but serialised directly with ``json`` for speed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from dinoforge.core.pooling import Pooling


class _Request(BaseModel):
    # strict: a JSON body must carry the types the schema gives ("yes" is no boolean, "5" no integer)
    model_config = ConfigDict(extra="forbid", strict=True)


# The schema says what the server accepts: no empty image, no empty list (a client generating requests from the
# OpenAPI document must not be able to build a "valid" request that gets a 422). One image or a list is
# validated as a list (errors name ``input[i]``, not a union branch) and documented as either.
ImageInput = Annotated[str, Field(min_length=1)]
_IMAGE_SCHEMA = {"type": "string", "minLength": 1}
Inputs = Annotated[list[ImageInput], Field(min_length=1),
                   BeforeValidator(lambda value: [value] if isinstance(value, str) else value),
                   WithJsonSchema({"anyOf": [_IMAGE_SCHEMA, {"type": "array", "items": _IMAGE_SCHEMA, "minItems": 1}]})]


class EmbeddingOptions(_Request):
    """Options of both embedding routes (JSON body fields, or form fields of the upload route)."""

    model: str | None = Field(None, description="must name the served model when given")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0, description="keep the first N dimensions (before normalising)")
    pooling: Pooling | None = Field(None, description="cls, mean (patch tokens) or cls+mean; default: card's")
    normalize: bool = True
    return_patch_tokens: bool = False
    patch_tokens_dtype: Literal["float32", "float16"] = Field(
        "float32", description="float16: patch tokens as base64 of little-endian float16 (whatever "
                               "encoding_format says), a quarter of float32 base64 size and ~1/9 of a JSON list")
    user: str | None = Field(None, description="accepted for OpenAI compatibility; ignored")


class EmbeddingsRequest(EmbeddingOptions):
    """``POST /v1/embeddings``: images as base64 strings or ``data:image/...;base64,`` URIs."""

    input: Inputs = Field(..., description="one image or a list of images (base64 or data URI; no URLs)")


class Timing(BaseModel):
    """Where a request's time went, in milliseconds."""

    queue_ms: float
    preprocess_ms: float
    inference_ms: float
    total_ms: float


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str
    patch_tokens: list[list[float]] | str | None = Field(None, description="[N, D] (base64: flattened, "
                                                                     "row-major, little-endian)")
    patch_grid: list[int] | None = Field(None, description="[h, w] of the patch tokens")
    patch_shape: list[int] | None = Field(None, description="[N, D] of the patch tokens")
    patch_tokens_dtype: Literal["float32", "float16"] | None = Field(None, description="dtype of base64 tokens")


class Usage(BaseModel):
    images: int
    prompt_tokens: int = Field(..., description="tokens the backbone processed (CLS + patches) per request")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage
    timing: Timing


class ClassifyRequest(_Request):
    """``POST /v1/classify``: top-k labels from the server's classification head."""

    input: Inputs
    model: str | None = None
    top_k: int = Field(5, gt=0)


class Prediction(BaseModel):
    label: str
    score: float


class ClassifyItem(BaseModel):
    index: int
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ClassifyItem]
    model: str
    head: dict[str, Any]
    timing: Timing


class IndexItem(_Request):
    id: str | None = Field(None, min_length=1, max_length=512, description="default: a new UUID")
    image: ImageInput
    metadata: dict[str, Any] = Field(default_factory=dict, description="any JSON object, returned by search")


class IndexAddRequest(_Request):
    """``POST /v1/index``: add (or replace, for an existing id) images in the retrieval index."""

    items: list[IndexItem] = Field(..., min_length=1)
    model: str | None = None


class IndexAddResponse(BaseModel):
    ids: list[str]
    added: int
    replaced: int
    count: int
    timing: Timing


class IndexDeleteResponse(BaseModel):
    deleted: str
    count: int


class IndexInfo(BaseModel):
    count: int
    dim: int
    kind: str
    pooling: str
    model_sha256: str


class SearchRequest(_Request):
    """``POST /v1/search``: nearest indexed images of each query image."""

    input: Inputs
    model: str | None = None
    top_k: int = Field(10, gt=0)


class Match(BaseModel):
    id: str
    score: float = Field(..., description="cosine similarity")
    metadata: dict[str, Any]


class SearchItem(BaseModel):
    index: int
    matches: list[Match]


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchItem]
    timing: Timing


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


def as_list(inputs: Inputs) -> list[str]:
    """One image or a list of images -> a list."""
    return [inputs] if isinstance(inputs, str) else list(inputs)
