"""The real torch backend behind a real uvicorn server, checked against direct model calls.

References are computed independently of the serving stack: ``decode_image`` + ``preprocess_image`` (the
shared contract) + ``backbone.forward_dino`` + explicit pooling/normalisation in the test.
"""

from __future__ import annotations

import base64
import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoforge.core.artifact import load_artifact
from dinoforge.core.cli import main as cli_main
from dinoforge.core.eval import knn_class_scores
from dinoforge.core.preprocess import decode_image, preprocess_image
from dinoforge.serve.server import BackgroundServer
from dinoforge.serve.settings import ServeSettings
from tests.serve.helpers import b64, fmnist_images

FMNIST_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


@pytest.fixture(scope="module")
def reference(tiny_artifact: Path):
    """``bytes -> {"cls": [D], "mean": [D], "patch": [N, D]}`` computed directly with the backbone."""
    art = load_artifact(tiny_artifact)

    def features(data: bytes) -> dict[str, torch.Tensor]:
        x = preprocess_image(decode_image(data), art.card.preprocessing).unsqueeze(0)
        with torch.inference_mode():
            out = art.backbone.forward_dino(x)
        patch = out["x_norm_patchtokens"][0]
        return {"cls": out["x_norm_clstoken"][0], "mean": patch.mean(0), "patch": patch}

    return features


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: Path) -> Path:
    """120 real Fashion-MNIST test images as PNG files in one sub-folder per class."""
    root = tmp_path_factory.mktemp("fmnist_labelled")
    files, labels = fmnist_images(fmnist_dir, 120, fmt="PNG")
    for i, (data, label) in enumerate(zip(files, labels, strict=True)):
        folder = root / FMNIST_CLASSES[int(label)]
        folder.mkdir(exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(data)
    return root


@pytest.fixture(scope="module")
def knn_head(tiny_artifact: Path, labelled_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("heads") / "knn"
    status = cli_main(["serve", "build-head", "--model", str(tiny_artifact), "--data", str(labelled_dir),
                       "--out", str(out), "--k", "10", "--no-progress"])
    assert status == 0
    return out


@pytest.fixture(scope="module")
def torch_server(tiny_artifact: Path, knn_head: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[BackgroundServer]:
    settings = ServeSettings(port=0, model=tiny_artifact, head=knn_head, max_batch_size=16,
                             index_dir=tmp_path_factory.mktemp("index"))
    with BackgroundServer(settings) as server:
        yield server


@pytest.fixture()
def client(torch_server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=torch_server.url, timeout=60) as c:
        yield c


def _vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    rows = []
    for item in response.json()["data"]:
        emb = item["embedding"]
        rows.append(np.frombuffer(base64.b64decode(emb), "<f4") if isinstance(emb, str) else np.asarray(emb))
    return np.stack(rows)


def test_embeddings_match_the_backbone_for_every_pooling(client: httpx.Client, sample_bytes: list[bytes],
                                                         reference) -> None:
    images = sample_bytes[::7]  # CIFAR RGB 32 px, MNIST grey 28 px, ImageNet 512 px
    refs = [reference(b) for b in images]
    for pooling in ("cls", "mean", "cls+mean"):
        want = torch.stack([torch.cat([r["cls"], r["mean"]]) if pooling == "cls+mean" else r[pooling] for r in refs])
        got = _vectors(client.post("/v1/embeddings", json={"input": [b64(b) for b in images], "pooling": pooling,
                                                           "normalize": False}))
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
        got_norm = _vectors(client.post("/v1/embeddings", json={"input": [b64(b) for b in images],
                                                                "pooling": pooling, "encoding_format": "base64"}))
        np.testing.assert_allclose(got_norm, F.normalize(want, dim=-1).numpy(), atol=1e-5)
    truncated = _vectors(client.post("/v1/embeddings", json={"input": b64(images[0]), "dimensions": 8}))
    np.testing.assert_allclose(truncated[0], F.normalize(refs[0]["cls"][:8], dim=0).numpy(), atol=1e-5)


def test_response_shape_usage_timing_and_patch_tokens(client: httpx.Client, sample_bytes: list[bytes],
                                                      reference) -> None:
    r = client.post("/v1/embeddings", json={"input": f"data:image/png;base64,{b64(sample_bytes[3])}",
                                            "return_patch_tokens": True, "model": "tiny-test"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "tiny-test"
    item = body["data"][0]
    assert item["object"] == "embedding" and item["index"] == 0 and item["patch_grid"] == [4, 4]
    np.testing.assert_allclose(np.asarray(item["patch_tokens"]), reference(sample_bytes[3])["patch"].numpy(),
                               atol=1e-4)
    assert body["usage"] == {"images": 1, "prompt_tokens": 17, "total_tokens": 17}
    timing = body["timing"]
    assert set(timing) == {"queue_ms", "preprocess_ms", "inference_ms", "total_ms"}
    assert timing["total_ms"] >= timing["inference_ms"] > 0


def test_upload_of_jpegs_equals_the_json_route(client: httpx.Client, fmnist_dir: Path, reference) -> None:
    jpegs, _ = fmnist_images(fmnist_dir, 12, fmt="JPEG")
    files = [("file", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(jpegs)]
    uploaded = _vectors(client.post("/v1/embeddings/upload", files=files, data={"pooling": "mean"}))
    posted = _vectors(client.post("/v1/embeddings", json={"input": [b64(j) for j in jpegs], "pooling": "mean"}))
    np.testing.assert_allclose(uploaded, posted, atol=1e-6)
    want = F.normalize(torch.stack([reference(j)["mean"] for j in jpegs]), dim=-1).numpy()
    np.testing.assert_allclose(uploaded, want, atol=1e-5)


def test_concurrent_requests_are_batched_without_changing_results(client: httpx.Client, torch_server: BackgroundServer,
                                                                  sample_bytes: list[bytes]) -> None:
    images = sample_bytes[:24]
    alone = [_vectors(client.post("/v1/embeddings", json={"input": b64(b)}))[0] for b in images]

    def one(data: bytes) -> np.ndarray:
        with httpx.Client(base_url=torch_server.url, timeout=60) as c:
            return _vectors(c.post("/v1/embeddings", json={"input": b64(data)}))[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, images))
    np.testing.assert_allclose(np.stack(together), np.stack(alone), atol=1e-5)
    metrics = client.get("/metrics").text
    assert "dinoforge_batch_size_bucket" in metrics and "dinoforge_inference_seconds_count" in metrics


def test_classify_matches_the_dinov2_knn_protocol(client: httpx.Client, knn_head: Path, labelled_dir: Path,
                                                  fmnist_dir: Path, reference) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(knn_head / "head.safetensors"))
    queries, labels = fmnist_images(fmnist_dir, 140, fmt="PNG")
    queries = queries[120:]  # not in the gallery
    r = client.post("/v1/classify", json={"input": [b64(q) for q in queries], "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["head"]["kind"] == "knn" and body["head"]["k"] == 10 and body["head"]["classes"] == 10
    feats = torch.stack([reference(q)["cls"] for q in queries])
    votes = knn_class_scores(tensors["gallery"], tensors["labels"], feats, ks=(10,), temperature=0.07,
                             num_classes=10)[10]
    shares = votes / votes.sum(-1, keepdim=True)
    classes = sorted(FMNIST_CLASSES)
    for item, row in zip(body["data"], shares, strict=True):
        preds = item["predictions"]
        assert len(preds) == 3 and preds[0]["score"] >= preds[1]["score"] >= preds[2]["score"]
        assert preds[0]["label"] == classes[int(row.argmax())]
        assert preds[0]["score"] == pytest.approx(float(row.max()), abs=1e-5)


def test_index_search_replace_delete(client: httpx.Client, sample_bytes: list[bytes], reference) -> None:
    images = sample_bytes[:30]
    items = [{"id": f"img/{i}", "image": b64(b), "metadata": {"n": i}} for i, b in enumerate(images)]
    r = client.post("/v1/index", json={"items": items})
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 30 and r.json()["count"] == 30
    gallery = F.normalize(torch.stack([reference(b)["cls"] for b in images]), dim=-1)
    queries = images[:5]
    r = client.post("/v1/search", json={"input": [b64(q) for q in queries], "top_k": 4})
    assert r.status_code == 200, r.text
    for q, item in zip(range(5), r.json()["data"], strict=True):
        sims = gallery @ gallery[q]
        want = [f"img/{int(i)}" for i in sims.argsort(descending=True)[:4]]
        got = [m["id"] for m in item["matches"]]
        assert got[0] == f"img/{q}" and item["matches"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert got == want
        assert item["matches"][0]["metadata"] == {"n": q}
    replaced = client.post("/v1/index", json={"items": [{"id": "img/0", "image": b64(images[1]),
                                                         "metadata": {"n": "replaced"}}]})
    assert replaced.json()["replaced"] == 1 and replaced.json()["count"] == 30
    hit = client.post("/v1/search", json={"input": b64(images[1]), "top_k": 2}).json()["data"][0]["matches"]
    assert {m["id"] for m in hit} == {"img/0", "img/1"}
    assert client.delete("/v1/index/img/0").json() == {"deleted": "img/0", "count": 29}
    r = client.delete("/v1/index/img/0")
    assert r.status_code == 404 and "not in the index" in r.json()["error"]["message"]
    assert client.get("/v1/index").json()["count"] == 29
    bad = client.post("/v1/index", json={"items": [{"id": "x", "image": "%%%", "metadata": {}}]})
    assert bad.status_code == 422
    assert client.get("/v1/index").json()["count"] == 29  # nothing half-added
