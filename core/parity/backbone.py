"""Parity of the backbone against official ``DinoVisionTransformer`` outputs (``backbone_*`` fixtures).

The model is built from the fixture's ``config/*`` and loaded from its official-named ``state_dict/*``, so
any width, depth, head count, register count or image size works.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dinoforge.core.backbone import BackboneConfig, DinoVisionTransformer
from dinoforge.core.backbone.convert import check_state_dict, to_dinoforge
from dinoforge.core.parity.compare import Check, Tolerances, check_abs

_FEATURE_KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")


def backbone_config_from_fixture(fixture: Mapping[str, Any], prefix: str = "config/") -> BackboneConfig:
    """Translate official constructor arguments stored under ``prefix`` into a :class:`BackboneConfig`."""
    c = {k[len(prefix):]: v for k, v in fixture.items() if k.startswith(prefix)}
    ffn = str(c.get("ffn_layer", "mlp"))
    return BackboneConfig(
        embed_dim=int(c["embed_dim"]), depth=int(c["depth"]), num_heads=int(c["num_heads"]),
        patch_size=int(c["patch_size"]), img_size=int(c.get("img_size", 224)),
        mlp_ratio=float(c.get("mlp_ratio", 4.0)), ffn="swiglu" if ffn.startswith("swiglu") else "mlp",
        num_register_tokens=int(c.get("num_register_tokens", 0)),
        layerscale_init=float(c["init_values"]) if c.get("init_values") else None,
        interpolate_offset=float(c.get("interpolate_offset", 0.1)),
        interpolate_antialias=bool(c.get("interpolate_antialias", False)),
        qkv_bias=bool(c.get("qkv_bias", True)), proj_bias=bool(c.get("proj_bias", True)),
        ffn_bias=bool(c.get("ffn_bias", True)), layernorm_eps=float(c.get("layernorm_eps", 1e-6)),
    )


def official_state_from_fixture(fixture: Mapping[str, Any], prefix: str = "state_dict/") -> dict[str, torch.Tensor]:
    """The ``state_dict/<official key>`` tensors as an official state dict."""
    return {k[len(prefix):]: v for k, v in fixture.items() if k.startswith(prefix)}


def build_from_fixture(fixture: Mapping[str, Any]) -> DinoVisionTransformer:
    """Build a dinoforge backbone with the fixture's architecture and (official-named) weights, eval mode."""
    model = DinoVisionTransformer(backbone_config_from_fixture(fixture))
    state = to_dinoforge(official_state_from_fixture(fixture), source="official")
    check_state_dict(state, model.state_dict())
    model.load_state_dict(state)
    return model.eval()


class BackboneHandler:
    """Checks tokens, interpolated position embeddings, intermediate layers and the masked forward."""

    name = "backbone"

    def matches(self, fixture: Mapping[str, Any]) -> bool:
        return "state_dict_keys" in fixture and "res0/input" in fixture and "config/embed_dim" in fixture

    def run(self, fixture: Mapping[str, Any], source: str, tol: Tolerances) -> list[Check]:
        model = build_from_fixture(fixture)
        t = tol.get("tokens_abs")
        checks: list[Check] = []
        with torch.no_grad():
            for j in range(int(fixture["num_resolutions"])):
                checks += self._resolution(model, fixture, f"res{j}", source, t)
            for m in range(int(fixture.get("num_masked_cases", 0))):
                key = f"masked{m}"
                out = model.forward_dino(fixture[f"{key}/input"], masks=fixture[f"{key}/masks"])
                checks += [check_abs(f"{source}:{key}/{k}", out[k], fixture[f"{key}/{k}"], t) for k in _FEATURE_KEYS]
        return checks

    def _resolution(self, model: DinoVisionTransformer, fx: Mapping[str, Any], key: str, source: str,
                    t: float) -> list[Check]:
        x = fx[f"{key}/input"]
        out = model.forward_dino(x)
        checks = [check_abs(f"{source}:{key}/{k}", out[k], fx[f"{key}/{k}"], t) for k in _FEATURE_KEYS]
        grid = (x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size)
        checks.append(check_abs(f"{source}:{key}/pos_embed_interpolated", model.interpolate_pos_encoding(grid),
                                fx[f"{key}/pos_embed_interpolated"], t))
        n_inter = sum(1 for k in fx if k.startswith(f"{key}/intermediate") and k.endswith("/patch_tokens"))
        if n_inter:
            layers = model.get_intermediate_layers(x, n_inter, return_class_token=True)
            for i, (patches, cls) in enumerate(layers):
                checks.append(check_abs(f"{source}:{key}/intermediate{i}/patch_tokens", patches,
                                        fx[f"{key}/intermediate{i}/patch_tokens"], t))
                checks.append(check_abs(f"{source}:{key}/intermediate{i}/class_token", cls,
                                        fx[f"{key}/intermediate{i}/class_token"], t))
        raw_key = f"{key}/intermediate_block0_reshape_nonorm"
        if raw_key in fx:
            (raw,) = model.get_intermediate_layers(x, [0], reshape=True, norm=False)
            checks.append(check_abs(f"{source}:{raw_key}", raw, fx[raw_key], t))
        return checks


HANDLERS = [BackboneHandler()]
