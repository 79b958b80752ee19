"""DINOv2-style ViT backbones on top of timm, their heads, and checkpoint conversion.

The configs (:mod:`.config`) are torch-free; the modules (:mod:`.vit`) load torch and timm only when one of
their names is first used, so reading a model card (``core.card``) works in the torch-free edge runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dinoforge.core.backbone.config import ARCHITECTURES, BackboneConfig, get_arch

if TYPE_CHECKING:
    from dinoforge.core.backbone.vit import DinoFeatures, DinoVisionTransformer, drop_path_rates

_FROM_VIT = ("DinoFeatures", "DinoVisionTransformer", "drop_path_rates")


def __getattr__(name: str) -> Any:  # PEP 562: the torch names load on first use
    if name in _FROM_VIT:
        from dinoforge.core.backbone import vit

        return getattr(vit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_backbone(arch: str | BackboneConfig, **overrides: object) -> DinoVisionTransformer:
    """Build a randomly initialised backbone from a registered name or a config.

    Args:
        arch: a name from :data:`ARCHITECTURES` (``vits14``, ``vitb14_reg4``, ``test`` ...) or a config.
        **overrides: config fields to replace (e.g. ``drop_path_rate=0.1``, ``img_size=224``).
    """
    if isinstance(arch, str):
        config = get_arch(arch, **overrides)
    else:
        config = BackboneConfig(**{**arch.model_dump(), **overrides}) if overrides else arch
    from dinoforge.core.backbone.vit import DinoVisionTransformer

    return DinoVisionTransformer(config)


__all__ = ["ARCHITECTURES", "BackboneConfig", "DinoFeatures", "DinoVisionTransformer", "build_backbone",
           "drop_path_rates", "get_arch"]
