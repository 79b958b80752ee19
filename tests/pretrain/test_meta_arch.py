"""SSLMetaArch beyond the fixtures: accumulation, resume, teacher handling, clipping, configs.

The official numbers of a full step (losses, every gradient, optimizer + EMA, drop path) are checked by
``test_parity.py`` against the ``train_step_*`` golden fixtures.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from dinoforge.core.backbone import BackboneConfig
from dinoforge.core.config import build_config
from dinoforge.core.errors import ConfigError
from dinoforge.pretrain.masking import MaskingGenerator, collate_masks, mask_statistics
from dinoforge.pretrain.meta_arch import HeadShape, MetaArchConfig, SSLMetaArch, build_student
from dinoforge.pretrain.optim import OptimConfig, build_optimizer, ema_update
from dinoforge.pretrain.spikes import SpikeConfig, SpikeDetector
from dinoforge.pretrain.train_loop import make_precision, train_step

B = 4


def _config(**kw) -> MetaArchConfig:
    backbone = BackboneConfig(embed_dim=32, depth=2, num_heads=2, patch_size=7, img_size=28, layerscale_init=1e-5,
                              drop_path_rate=kw.pop("drop_path_rate", 0.0), drop_path_uniform=True)
    head = HeadShape(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    return MetaArchConfig(backbone=backbone, dino_head=head, ibot_head=head.model_copy(update={"out_dim": 48}), **kw)


def _batch(seed: int = 0, n_images: int = B, n_local: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = collate_masks(2 * n_images, MaskingGenerator(4, max_num_patches=8.0), rng=random.Random(seed))
    return {"global_crops": torch.randn(2 * n_images, 3, 28, 28, generator=g),
            "local_crops": torch.randn(n_local * n_images, 3, 14, 14, generator=g), **masks}


def _split(batch: dict, k: int) -> list[dict]:
    """Micro-batches of consecutive images (every crop-major tensor sliced the same way)."""
    n = batch["global_crops"].shape[0] // 2
    n_local = batch["local_crops"].shape[0] // n
    size = n // k
    out = []
    for i in range(k):
        rows = [c * n + b for c in range(2) for b in range(i * size, (i + 1) * size)]
        local_rows = [j * n + b for j in range(n_local) for b in range(i * size, (i + 1) * size)]
        masks = batch["masks"][rows]
        out.append({"global_crops": batch["global_crops"][rows], "local_crops": batch["local_crops"][local_rows],
                    **mask_statistics(masks), "upperbound": batch["upperbound"]})
    return out


def _model(seed: int = 0, **kw) -> SSLMetaArch:
    torch.manual_seed(seed)
    return SSLMetaArch(_config(**kw)).train()


def _grads(model: SSLMetaArch) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}


def test_teacher_is_an_exact_frozen_copy_that_stays_in_eval_mode() -> None:
    model = _model(drop_path_rate=0.3)
    for (name, s), (_, t) in zip(model.student.named_parameters(), model.teacher.named_parameters(), strict=True):
        assert torch.equal(s, t), name
        assert not t.requires_grad
    model.train()
    assert model.student.training and not model.teacher.training
    assert model.teacher["backbone"].config.drop_path_rate == 0.0


def test_forward_backward_returns_the_official_terms_and_fills_student_grads() -> None:
    model = _model()
    logged = model.forward_backward([_batch()], teacher_temp=0.04)
    assert set(logged) == {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total"}
    # Logged koleo and iBOT values are half of what enters the total (official display convention).
    recomposed = (logged["dino_local_crops_loss"] + logged["dino_global_crops_loss"] + 2 * logged["koleo_loss"]
                  + 2 * logged["ibot_loss"])
    assert logged["total"] == pytest.approx(recomposed, rel=1e-6)
    assert all(p.grad is not None for p in model.student.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_accumulation_normalises_the_teacher_over_the_effective_batch(centering: str) -> None:
    big = _batch(seed=1)
    parts = _split(big, 2)
    one, two = _model(centering=centering, koleo_loss_weight=0.0), _model(centering=centering, koleo_loss_weight=0.0)
    full = one.normalize_teacher([one.teacher_logits(big)], teacher_temp=0.05)[0]
    split = two.normalize_teacher([two.teacher_logits(p) for p in parts], teacher_temp=0.05)
    for i, part in enumerate(split):  # [2, B/2, K] slices of the big batch's [2, B, K]
        torch.testing.assert_close(part.dino_probs, full.dino_probs[:, 2 * i:2 * i + 2], atol=1e-6, rtol=1e-5)
    big_tokens = torch.full(big["masks"].shape, -1, dtype=torch.long)
    big_tokens[big["masks"]] = torch.arange(big["n_masked_patches"])  # token number of each masked position
    for i, part in enumerate(split):
        rows = [c * B + b for c in range(2) for b in range(2 * i, 2 * i + 2)]
        order = big_tokens[rows][big_tokens[rows] >= 0]
        torch.testing.assert_close(part.ibot_probs, full.ibot_probs[order], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one.dino_centering.center, two.dino_centering.center)
    # Same teacher targets + equal micro-batch sizes: the accumulated gradient is the big-batch gradient.
    one.zero_grad(), two.zero_grad()
    a = one.forward_backward([big], teacher_temp=0.05)
    b = two.forward_backward(parts, teacher_temp=0.05)
    assert a["total"] == pytest.approx(b["total"], rel=1e-5)
    for name, grad in _grads(one).items():
        torch.testing.assert_close(_grads(two)[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def _train_step(model: SSLMetaArch, optimizer: torch.optim.Optimizer, batch: dict) -> dict[str, float]:
    """The training step of ``dinoforge pretrain`` (train_loop.train_step) on one process."""
    values = {"lr": 1e-3, "wd": 0.04, "last_layer_lr": 1e-3, "momentum": 0.99, "teacher_temp": 0.05}
    result = train_step(model, [batch], values=values, optimizer=optimizer,
                        precision=make_precision("fp32", torch.device("cpu")), clip_grad=3.0,
                        detector=SpikeDetector(SpikeConfig(policy="off")), student=model.student,
                        teacher=model.teacher, device=torch.device("cpu"))
    return result.losses


def test_state_dict_round_trip_continues_bit_exactly() -> None:
    model = _model(seed=0, drop_path_rate=0.2)
    optimizer = build_optimizer(model.student, OptimConfig())
    for step in range(2):
        _train_step(model, optimizer, _batch(seed=10 + step))
    assert {"dino_centering.center", "ibot_centering.center"} <= set(model.state_dict())
    assert model.dino_centering.center.abs().sum() > 0
    # Deep copies: state dicts reference live tensors that the next step updates in place.
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), torch.get_rng_state()))
    expected = _train_step(model, optimizer, _batch(seed=12))

    resumed = _model(seed=99, drop_path_rate=0.2)  # different init: everything must come from the state
    resumed.load_state_dict(saved[0])
    resumed_opt = build_optimizer(resumed.student, OptimConfig())
    resumed_opt.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])  # drop-path draws
    assert _train_step(resumed, resumed_opt, _batch(seed=12)) == expected
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_no_local_crops_uses_the_official_normaliser() -> None:
    model = _model()
    batch = _batch(n_local=0)
    teacher = model.get_teacher_output(batch, teacher_temp=0.04)
    student = model.get_student_output(batch)
    losses = model.compute_losses(teacher, student, batch)
    assert "dino_local_crops_loss" not in losses and student.local_cls_logits.shape == (0, 64)
    from dinoforge.pretrain.losses import dino_global_loss

    expected = dino_global_loss(student.global_cls_logits, teacher.dino_probs, n_local_crops=0)
    assert losses["dino_global_crops_loss"].item() == pytest.approx(expected.item())  # / 3 (official quirk)


def test_a_frozen_external_teacher_can_drive_the_student() -> None:
    torch.manual_seed(5)
    teacher = build_student(_config())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = SSLMetaArch(_config(), teacher=teacher).train()
    model.forward_backward([_batch()], teacher_temp=0.04)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    deeper_backbone = _config().backbone.model_copy(update={"depth": 3})
    deeper = build_student(_config().model_copy(update={"backbone": deeper_backbone}))
    with pytest.raises(ValueError, match="do not match"):
        ema_update(deeper, SSLMetaArch(_config()).student, 0.9)


def test_ema_update_covers_backbone_and_heads() -> None:
    model = _model(ibot_separate_head=True)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    ema_update(model.teacher, model.student, 0.75)
    for t0, t, s in zip(teacher_before, model.teacher.parameters(), model.student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.75 * t0 + 0.25 * s)
    ema_update(model.teacher, model.student, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(model.teacher.parameters(), model.student.parameters(), strict=True))


def _norm(module: torch.nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()])).item()


def test_clip_gradients_is_per_submodule() -> None:
    model = _model(ibot_separate_head=True)
    model.forward_backward([_batch()], teacher_temp=0.04)
    norms_before = {k: _norm(m) for k, m in model.student.items()}
    bound = min(norms_before.values()) / 2
    assert model.clip_gradients(None) == pytest.approx(norms_before, rel=1e-6)  # measures only
    reported = model.clip_gradients(bound)
    assert set(reported) == {"backbone", "dino_head", "ibot_head"}
    for key, module in model.student.items():
        assert reported[key] == pytest.approx(norms_before[key], rel=1e-6)
        after = _norm(module)
        assert after == pytest.approx(bound, rel=1e-4)  # each sub-module clipped to the bound on its own


def test_koleo_first_crop_only_flag() -> None:
    both, first = _model(), _model(koleo_first_crop_only=True)
    batch = _batch()
    a = both.forward_backward([batch], teacher_temp=0.04)
    b = first.forward_backward([batch], teacher_temp=0.04)
    from dinoforge.pretrain.losses import koleo_loss

    crop0 = both.get_student_output(batch).global_cls_tokens.chunk(2)[0]
    assert b["koleo_loss"] == pytest.approx(0.1 * koleo_loss(crop0).item(), rel=1e-5)
    assert a["koleo_loss"] != pytest.approx(b["koleo_loss"])


def test_config_errors_are_clear() -> None:
    base = _config().model_dump()
    with pytest.raises(ConfigError, match="nothing to train"):
        build_config(MetaArchConfig, {**base, "dino_loss_weight": 0.0, "ibot_loss_weight": 0.0})
    with pytest.raises(ConfigError, match="unknown key 'centring'"):
        build_config(MetaArchConfig, {**base, "centring": "centering"})
    with pytest.raises(ConfigError, match="centering"):
        build_config(MetaArchConfig, {**base, "centering": "softmax"})


def test_a_malformed_batch_is_a_clear_error() -> None:
    from dinoforge.core.errors import DataError

    model = _model()
    batch = _batch()
    with pytest.raises(DataError, match=r"masks is \[8, 9\], expected \[8, 16\]"):
        model.forward_backward([{**batch, "masks": batch["masks"][:, :9]}], teacher_temp=0.04)
    with pytest.raises(DataError, match="lacks"):
        model.forward_backward([{k: v for k, v in batch.items() if k != "mask_indices"}], teacher_temp=0.04)
    with pytest.raises(DataError, match="not a multiple"):
        model.forward_backward([{**batch, "local_crops": batch["local_crops"][:3]}], teacher_temp=0.04)


def test_a_hybrid_stem_starts_from_mobilenet_weights_and_the_ema_leaves_it_exact(tmp_path) -> None:
    """model.stem_weights loads MobileNetV2's features[:N] into student and teacher, frozen; training and the
    EMA update leave it bit-equal (m * t + (1 - m) * t would drift by rounding)."""
    import torchvision

    reference = torchvision.models.mobilenet_v2()
    torch.save(reference.state_dict(), tmp_path / "mnv2.pth")
    backbone = BackboneConfig(embed_dim=32, depth=1, num_heads=2, patch_size=16, img_size=32, layerscale_init=0.1,
                              mobilenet_stem_blocks=4)
    head = HeadShape(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    config = MetaArchConfig(backbone=backbone, dino_head=head, stem_weights=str(tmp_path / "mnv2.pth"))
    model = SSLMetaArch(config).train()
    expected = reference.features[:4].state_dict()
    for tree in (model.student, model.teacher):
        stem = tree["backbone"].patch_embed.stem
        for name, value in stem.state_dict().items():
            assert torch.equal(value, expected[name]), name
        assert not any(p.requires_grad for p in stem.parameters())
    g = torch.Generator().manual_seed(0)
    masks = collate_masks(4, MaskingGenerator(2, max_num_patches=2.0), rng=random.Random(0))
    batch = {"global_crops": torch.randn(4, 3, 32, 32, generator=g), "local_crops": torch.randn(4, 3, 16, 16,
             generator=g), **masks}
    optimizer = build_optimizer(model.student, OptimConfig())
    for group in optimizer.param_groups:  # placeholders until the schedule sets them
        group["lr"] = 0.1
    model.forward_backward([batch], teacher_temp=0.04)
    optimizer.step()
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    ema_update(model.teacher, model.student, 0.9)
    after = model.teacher.state_dict()
    stem_keys = [k for k in after if ".stem." in k]
    assert stem_keys and all(torch.equal(after[k], expected[k.split(".stem.")[1]]) for k in stem_keys)
    assert not torch.equal(after["backbone.blocks.0.mlp.fc1.weight"], teacher_before["backbone.blocks.0.mlp.fc1.weight"])
    with pytest.raises(ConfigError, match="stem_weights needs a hybrid"):
        build_config(MetaArchConfig, {**_config().model_dump(), "stem_weights": str(tmp_path / "mnv2.pth")})
    from dinoforge.core.errors import CheckpointError

    torch.save({"features.0.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="stem_weights .*bad.pth lack or reshape"):
        build_student(config.model_copy(update={"stem_weights": str(tmp_path / "bad.pth")}))
