"""The OpenAPI document says exactly what the server accepts: no schema-valid request gets a 422 it could not
expect, no schema-invalid one is silently coerced, and documented media types and methods are the real ones."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from PIL import Image

from dinoforge.serve.server import BackgroundServer
from tests.serve.helpers import b64, encode


@pytest.fixture(scope="module")
def spec(fake_server: BackgroundServer) -> dict[str, Any]:
    return httpx.get(fake_server.url + "/openapi.json").json()


def _schema(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return spec["components"]["schemas"][name]


def test_empty_inputs_are_outside_the_schema(spec: dict[str, Any], fake_client: httpx.Client) -> None:
    variants = _schema(spec, "EmbeddingsRequest")["properties"]["input"]["anyOf"]
    assert {"type": "string", "minLength": 1} in variants
    assert any(v.get("type") == "array" and v.get("minItems") == 1 and v["items"].get("minLength") == 1
               for v in variants)
    assert _schema(spec, "IndexAddRequest")["properties"]["items"]["minItems"] == 1
    for body in ({"input": []}, {"input": ""}, {"input": [""]}):
        assert fake_client.post("/v1/embeddings", json=body).status_code == 422


@pytest.mark.parametrize("field,value", [("normalize", "yes"), ("normalize", 1), ("return_patch_tokens", "true"),
                                         ("dimensions", "4"), ("dimensions", 4.0), ("encoding_format", None)])
def test_wrong_types_are_rejected_not_coerced(fake_client: httpx.Client, field: str, value: Any) -> None:
    body = {"input": b64(encode(Image.new("RGB", (9, 9)))), field: value}
    r = fake_client.post("/v1/embeddings", json=body)
    assert r.status_code == 422 and field in r.json()["error"]["message"], r.text


def test_upload_form_fields_are_still_parsed_from_text(fake_client: httpx.Client) -> None:
    files = [("file", ("a.png", encode(Image.new("RGB", (9, 9), (5, 6, 7))), "image/png"))]
    r = fake_client.post("/v1/embeddings/upload", files=files, data={"normalize": "false", "dimensions": "4"})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["embedding"]) == 4
    bad = fake_client.post("/v1/embeddings/upload", files=files, data={"normalize": "maybe"})
    assert bad.status_code == 422


def test_metrics_is_documented_as_text(spec: dict[str, Any], fake_client: httpx.Client) -> None:
    content = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["text/plain"]
    assert fake_client.get("/metrics").headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("method", ["OPTIONS", "PUT", "PATCH", "TRACE"])
def test_405_allow_lists_every_method_of_the_path(fake_client: httpx.Client, method: str) -> None:
    r = fake_client.request(method, "/v1/index")
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "POST"}
    r = fake_client.request(method, "/v1/embeddings")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
