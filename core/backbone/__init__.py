"""DINOv2-style ViT backbones on top of timm, their heads, and checkpoint conversion."""

from dinoforge.core.backbone.config import ARCHITECTURES, BackboneConfig, get_arch
from dinoforge.core.backbone.vit import DinoFeatures, DinoVisionTransformer, drop_path_rates


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
    return DinoVisionTransformer(config)


__all__ = ["ARCHITECTURES", "BackboneConfig", "DinoFeatures", "DinoVisionTransformer", "build_backbone",
           "drop_path_rates", "get_arch"]
