"""Classification heads: scores against brute-force references, file validation, build-head (linear)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinoforge.core.cli import main as cli_main
from dinoforge.core.errors import ArtifactError
from dinoforge.serve.heads import HeadCard, load_head, save_head
from dinoforge.serve.server import BackgroundServer
from dinoforge.serve.settings import ServeSettings


def _card(kind: str, dim: int, classes: int, **kw: object) -> HeadCard:
    return HeadCard(kind=kind, classes=[f"c{i}" for i in range(classes)], pooling="cls", feature_dim=dim,
                    model_sha256="sha", **kw)


def test_knn_scores_equal_a_brute_force_dinov2_vote(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    gallery, labels = torch.randn(200, 16, generator=gen), torch.randint(0, 5, (200,), generator=gen)
    queries = torch.randn(7, 16, generator=gen)
    head = load_head(save_head(tmp_path / "h", _card("knn", 16, 5, k=10, temperature=0.07),
                               {"gallery": gallery, "labels": labels}))
    sims = F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).T  # [7, 200]
    top, idx = sims.topk(10, dim=1)
    votes = torch.zeros(7, 5)
    for q in range(7):
        for s, i in zip(top[q], idx[q], strict=True):
            votes[q, labels[i]] += torch.exp(s / 0.07)
    torch.testing.assert_close(head.scores(queries), votes / votes.sum(1, keepdim=True), atol=1e-5, rtol=1e-4)
    ranked = head.top_k(queries, 3)
    assert [r[0][0] for r in ranked] == [f"c{int(i)}" for i in votes.argmax(1)]
    assert head.top_k(queries, 50)[0].__len__() == 5  # k capped at the number of classes


def test_linear_scores_are_softmax_of_the_probe(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    weight, bias, x = torch.randn(3, 8, generator=gen), torch.randn(3, generator=gen), torch.randn(4, 8, generator=gen)
    head = load_head(save_head(tmp_path / "h", _card("linear", 8, 3), {"weight": weight, "bias": bias}))
    torch.testing.assert_close(head.scores(x), (x @ weight.T + bias).softmax(-1))


def test_broken_heads_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="missing tensors"):
        save_head(tmp_path / "a", _card("knn", 4, 2), {"gallery": torch.zeros(3, 4)})
    with pytest.raises(ArtifactError, match="feature_dim"):
        save_head(tmp_path / "b", _card("linear", 5, 2), {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ArtifactError, match="not a classification head"):
        load_head(tmp_path)
    good = save_head(tmp_path / "c", _card("linear", 4, 2), {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)})
    card = json.loads((good / "head.json").read_text())
    (good / "head.json").write_text(json.dumps({**card, "kind": "svm"}))
    with pytest.raises(ArtifactError, match="kind"):
        load_head(good)
    (good / "head.json").write_text("{")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_head(good)
    with pytest.raises(ArtifactError, match="already exists"):
        save_head(good, _card("linear", 4, 2), {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)})


@pytest.mark.slow
def test_linear_head_from_build_head_is_served(tiny_artifact: Path, tiny_reg_artifact: Path, tmp_path: Path,
                                               tuxpaint_dir: Path, sample_files: list[Path]) -> None:
    # a real labelled folder: three tuxpaint stamp categories, 12 images each
    data = tmp_path / "stamps"
    for category in ("animals", "food", "vehicles"):
        found = sorted((tuxpaint_dir / category).rglob("*.png"))[:12]
        assert len(found) == 12, category
        (data / category).mkdir(parents=True)
        for f in found:
            (data / category / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "linear"
    assert cli_main(["serve", "build-head", "--model", str(tiny_artifact), "--data", str(data), "--out", str(out),
                     "--kind", "linear", "--epochs", "5", "--holdout", "0.25", "--no-progress"]) == 0
    head = load_head(out)
    assert head.card.kind == "linear" and head.card.classes == ["animals", "food", "vehicles"]
    assert head.card.pooling == "cls+mean" and head.card.feature_dim == 128 and head.card.num_samples == 36
    assert 0.0 <= head.card.metrics["holdout_top1"] <= 100.0 and head.card.metrics["holdout_n"] == 9
    with BackgroundServer(ServeSettings(port=0, model=tiny_artifact, head=out)) as server:
        import httpx

        from tests.serve.helpers import b64

        r = httpx.post(server.url + "/v1/classify", json={"input": [b64(p.read_bytes()) for p in sample_files[:4]],
                                                          "top_k": 2}, timeout=60)
        assert r.status_code == 200, r.text
        for item in r.json()["data"]:
            scores = [p["score"] for p in item["predictions"]]
            assert len(scores) == 2 and scores[0] >= scores[1] and 0 < sum(scores) <= 1.0 + 1e-6
    with pytest.raises(RuntimeError, match="was built for model weights"):  # head of another model
        BackgroundServer(ServeSettings(port=0, model=tiny_reg_artifact, head=out)).start()
