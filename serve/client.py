"""Python client of ``dinoforge serve`` (sync and async): embed / classify / index / search.

Images may be files, folders (recursive, sorted), PIL images or bytes; they are read lazily, sent in batches
of ``batch_size`` and shown with a progress bar on request. 429 / 503 answers and dropped connections are
retried with jittered backoff (never sooner than the server's ``Retry-After``); any other error raises
:class:`ClientError` with the server's reason.

Example::

    with DinoforgeClient("http://127.0.0.1:8000", api_key="...") as client:
        emb = client.embed("photos/", progress=True)      # Embeddings: .vectors [N, D], .names
        hits = client.search("query.jpg", top_k=5)
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from dinoforge.core.errors import DinoforgeError
from dinoforge.serve.client_inputs import ImageLike, ImageRef, expand_images
from dinoforge.serve.wire import decode_vector

RETRY_STATUSES = frozenset({429, 503})
#: a connection dropped mid-request (a restarting server, the connection cap): retried like a 503; a refused
#: connection or a timeout is not (a wrong URL should fail at once)
_DROPPED = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


class ClientError(DinoforgeError):
    """The server refused a request (``status`` is the HTTP code) or could not be reached (``status`` 0)."""

    def __init__(self, message: str, *, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass
class Embeddings:
    """Embeddings of many images, in input order.

    Attributes:
        vectors: float32 ``[N, D]``.
        names: path or label of each image.
        patch_tokens: ``[N_i, D]`` per image when requested.
        timings: the server's ``timing`` block of each batch.
    """

    vectors: np.ndarray
    names: list[str]
    patch_tokens: list[np.ndarray] | None = None
    timings: list[dict[str, float]] = field(default_factory=list)


class _Collector:
    """Accumulates embedding responses batch by batch, then builds :class:`Embeddings`."""

    def __init__(self, with_patches: bool) -> None:
        self.rows: list[np.ndarray] = []
        self.patches: list[np.ndarray] | None = [] if with_patches else None
        self.timings: list[dict[str, float]] = []

    def add(self, body: dict[str, Any]) -> None:
        for item in body["data"]:
            self.rows.append(decode_vector(item["embedding"]))
            if self.patches is not None:
                h, w = item.get("patch_grid") or (0, 0)
                dtype = item.get("patch_tokens_dtype") or "float32"
                self.patches.append(decode_vector(item["patch_tokens"], dtype=dtype).reshape(h * w, -1))
        self.timings.append(body.get("timing", {}))

    def build(self, names: list[str]) -> Embeddings:
        vectors = np.stack(self.rows).astype(np.float32) if self.rows else np.zeros((0, 0), np.float32)
        return Embeddings(vectors, names, self.patches, self.timings)


def _quote(item_id: str) -> str:
    return urllib.parse.quote(item_id, safe="")


def _batches(refs: Sequence[ImageRef], size: int) -> Iterator[Sequence[ImageRef]]:
    for start in range(0, len(refs), size):
        yield refs[start:start + size]


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500] or response.reason_phrase
    retry = response.headers.get("retry-after")
    raise ClientError(f"server answered {response.status_code}: {message}", status=response.status_code,
                      retry_after=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)


def _as_client_error(exc: Exception, url: str) -> tuple[ClientError, bool]:
    """The error to raise, and whether the request is worth retrying."""
    if isinstance(exc, ClientError):
        return exc, exc.status in RETRY_STATUSES
    return ClientError(f"cannot reach {url}: {exc}"), isinstance(exc, _DROPPED)


class _Base:
    """Request building and response parsing shared by both clients."""

    def __init__(self, url: str, *, api_key: str | None, timeout: float, batch_size: int, retries: int) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout, self.batch_size, self.retries = timeout, batch_size, retries

    @staticmethod
    def _embed_payload(batch: Sequence[ImageRef], options: dict[str, Any]) -> dict[str, Any]:
        return {"input": [ref.b64() for ref in batch], "encoding_format": "base64",
                **{k: v for k, v in options.items() if v is not None}}

    @staticmethod
    def _wait_s(err: ClientError, attempt: int) -> float:
        """Seconds before retry ``attempt`` (0-based): jittered so that many clients refused together do not
        come back together; never sooner than ``Retry-After``."""
        if err.retry_after is not None:
            return min(60.0, err.retry_after) * (1.0 + 0.5 * random.random())
        return random.uniform(0.1, min(30.0, 0.5 * 2**attempt))  # "full jitter" exponential backoff


class DinoforgeClient(_Base):
    """Synchronous client.

    Args:
        url: server base URL.
        api_key: Bearer key when the server requires one.
        timeout: seconds per HTTP request.
        batch_size: images per request.
        retries: attempts after a 429 / 503 before giving up.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 120.0,
                 batch_size: int = 32, retries: int = 5) -> None:
        super().__init__(url, api_key=api_key, timeout=timeout, batch_size=batch_size, retries=retries)
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def __enter__(self) -> DinoforgeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One API call with retries on 429/503; returns the JSON body."""
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, **kwargs)
                _raise_for(response)
                return response.json()
            except (ClientError, httpx.TransportError) as exc:
                err, retry = _as_client_error(exc, self.url + path)
                if not retry or attempt == self.retries:
                    raise err from (None if err is exc else exc)
                time.sleep(self._wait_s(err, attempt))
        raise AssertionError("unreachable")

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")

    def ready(self) -> dict[str, Any]:
        return self.request("GET", "/ready")

    def embed(self, images: ImageLike | Iterable[ImageLike], *, pooling: str | None = None, normalize: bool = True,
              dimensions: int | None = None, return_patch_tokens: bool = False, progress: bool = False) -> Embeddings:
        """Embed every image; ``vectors`` rows follow the input order (folders expanded in sorted order)."""
        refs = expand_images(images)
        out = _Collector(return_patch_tokens)
        options = {"pooling": pooling, "normalize": normalize, "dimensions": dimensions,
                   "return_patch_tokens": return_patch_tokens or None}
        with tqdm(total=len(refs), disable=not progress, unit="img", desc="embed") as bar:
            for batch in _batches(refs, self.batch_size):
                out.add(self.request("POST", "/v1/embeddings", json=self._embed_payload(batch, options)))
                bar.update(len(batch))
        return out.build([r.name for r in refs])

    def classify(self, images: ImageLike | Iterable[ImageLike], *, top_k: int = 5,
                 progress: bool = False) -> list[list[dict[str, Any]]]:
        """Top-``k`` ``{"label", "score"}`` per image."""
        refs, out = expand_images(images), []
        with tqdm(total=len(refs), disable=not progress, unit="img", desc="classify") as bar:
            for batch in _batches(refs, self.batch_size):
                body = self.request("POST", "/v1/classify", json={"input": [r.b64() for r in batch], "top_k": top_k})
                out.extend(item["predictions"] for item in body["data"])
                bar.update(len(batch))
        return out

    def index(self, images: ImageLike | Iterable[ImageLike], *, ids: Sequence[str] | None = None,
              metadata: Sequence[dict[str, Any]] | None = None, progress: bool = False) -> list[str]:
        """Add images to the server's index; returns their ids (file paths by default)."""
        refs = expand_images(images)
        ids = list(ids) if ids is not None else [r.name for r in refs]
        metadata = list(metadata) if metadata is not None else [{"name": r.name} for r in refs]
        if not len(ids) == len(metadata) == len(refs):
            raise ValueError(f"{len(refs)} images, {len(ids)} ids and {len(metadata)} metadata objects")
        out: list[str] = []
        with tqdm(total=len(refs), disable=not progress, unit="img", desc="index") as bar:
            for start in range(0, len(refs), self.batch_size):
                part = range(start, min(start + self.batch_size, len(refs)))
                items = [{"id": ids[i], "image": refs[i].b64(), "metadata": metadata[i]} for i in part]
                out.extend(self.request("POST", "/v1/index", json={"items": items})["ids"])
                bar.update(len(part))
        return out

    def delete(self, item_id: str) -> int:
        """Remove an id from the index; returns the new count (ClientError 404 when absent)."""
        return int(self.request("DELETE", f"/v1/index/{_quote(item_id)}")["count"])

    def search(self, images: ImageLike | Iterable[ImageLike], *, top_k: int = 10) -> list[list[dict[str, Any]]]:
        """``[{"id", "score", "metadata"}, ...]`` best first, per query image."""
        refs, out = expand_images(images), []
        for batch in _batches(refs, self.batch_size):
            body = self.request("POST", "/v1/search", json={"input": [r.b64() for r in batch], "top_k": top_k})
            out.extend(item["matches"] for item in body["data"])
        return out


class AsyncDinoforgeClient(_Base):
    """Asynchronous client; ``concurrency`` batches are in flight at once (order is kept).

    Args:
        url, api_key, timeout, batch_size, retries: as :class:`DinoforgeClient`.
        concurrency: batches sent in parallel by :meth:`embed`.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 120.0,
                 batch_size: int = 32, retries: int = 5, concurrency: int = 4) -> None:
        super().__init__(url, api_key=api_key, timeout=timeout, batch_size=batch_size, retries=retries)
        self.concurrency = concurrency
        limits = httpx.Limits(max_connections=max(concurrency, 1) * 2)
        self.http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout, limits=limits)

    async def __aenter__(self) -> AsyncDinoforgeClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One API call with retries on 429/503; returns the JSON body."""
        for attempt in range(self.retries + 1):
            try:
                response = await self.http.request(method, path, **kwargs)
                _raise_for(response)
                return response.json()
            except (ClientError, httpx.TransportError) as exc:
                err, retry = _as_client_error(exc, self.url + path)
                if not retry or attempt == self.retries:
                    raise err from (None if err is exc else exc)
                await asyncio.sleep(self._wait_s(err, attempt))
        raise AssertionError("unreachable")

    async def health(self) -> dict[str, Any]:
        return await self.request("GET", "/health")

    async def embed(self, images: ImageLike | Iterable[ImageLike], *, pooling: str | None = None,
                    normalize: bool = True, dimensions: int | None = None, return_patch_tokens: bool = False,
                    progress: bool = False) -> Embeddings:
        """Like :meth:`DinoforgeClient.embed`, with ``concurrency`` requests in flight."""
        refs = expand_images(images)
        options = {"pooling": pooling, "normalize": normalize, "dimensions": dimensions,
                   "return_patch_tokens": return_patch_tokens or None}
        gate = asyncio.Semaphore(self.concurrency)
        bar = tqdm(total=len(refs), disable=not progress, unit="img", desc="embed")

        async def one(batch: Sequence[ImageRef]) -> dict[str, Any]:
            async with gate:
                payload = await asyncio.to_thread(self._embed_payload, batch, options)  # file reads off the loop
                body = await self.request("POST", "/v1/embeddings", json=payload)
                bar.update(len(batch))
                return body

        try:
            bodies = await asyncio.gather(*(one(b) for b in _batches(refs, self.batch_size)))
        finally:
            bar.close()
        out = _Collector(return_patch_tokens)
        for body in bodies:
            out.add(body)
        return out.build([r.name for r in refs])

    async def classify(self, images: ImageLike | Iterable[ImageLike], *, top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-``k`` ``{"label", "score"}`` per image."""
        out = []
        for batch in _batches(expand_images(images), self.batch_size):
            body = await self.request("POST", "/v1/classify", json={"input": [r.b64() for r in batch], "top_k": top_k})
            out.extend(item["predictions"] for item in body["data"])
        return out

    async def index(self, images: ImageLike | Iterable[ImageLike], *, ids: Sequence[str] | None = None,
                    metadata: Sequence[dict[str, Any]] | None = None) -> list[str]:
        """Add images to the index; returns their ids."""
        refs = expand_images(images)
        ids = list(ids) if ids is not None else [r.name for r in refs]
        metadata = list(metadata) if metadata is not None else [{"name": r.name} for r in refs]
        out: list[str] = []
        for start in range(0, len(refs), self.batch_size):
            part = range(start, min(start + self.batch_size, len(refs)))
            items = [{"id": ids[i], "image": refs[i].b64(), "metadata": metadata[i]} for i in part]
            out.extend((await self.request("POST", "/v1/index", json={"items": items}))["ids"])
        return out

    async def delete(self, item_id: str) -> int:
        """Remove an id from the index; returns the new count."""
        return int((await self.request("DELETE", f"/v1/index/{_quote(item_id)}"))["count"])

    async def search(self, images: ImageLike | Iterable[ImageLike], *, top_k: int = 10) -> list[list[dict[str, Any]]]:
        """``[{"id", "score", "metadata"}, ...]`` best first, per query image."""
        out = []
        for batch in _batches(expand_images(images), self.batch_size):
            body = await self.request("POST", "/v1/search", json={"input": [r.b64() for r in batch], "top_k": top_k})
            out.extend(item["matches"] for item in body["data"])
        return out
