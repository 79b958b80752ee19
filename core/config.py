"""Typed configs loaded from YAML recipes with ``key=value`` command-line overrides.

Every recipe is a pydantic model with ``extra="forbid"``: an unknown key anywhere (file or override) is an
error that names the full dotted key. Overrides are parsed as YAML scalars/lists (``optim.lr=1e-3``,
``data.sources=[a,b]``). The resolved config is written next to every run's outputs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dinoforge.core.errors import ConfigError
from dinoforge.core.fileio import atomic_write_text

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for all dinoforge configs: unknown keys are errors, fields are keyword-only and validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    out = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: cannot parse value: {err}") from err
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


_SECRET = re.compile(r"key|secret|token|password", re.IGNORECASE)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted key (``unknown key 'optim.lrr'``)."""
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "<root>"
        if problem["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}")
        elif problem["type"] == "missing":
            lines.append(f"missing required key {key!r}")
        elif not problem["loc"] or _SECRET.search(key):
            # a whole-model check's input is the entire config, and a secret's value must never be printed
            lines.append(f"{key}: {problem['msg']}")
        else:
            lines.append(f"{key}: {problem['msg']} (got {problem.get('input')!r})")
    return f"invalid config ({source}):\n  " + "\n  ".join(lines)


def build_config(cls: type[ConfigT], data: Mapping[str, Any], source: str = "config") -> ConfigT:
    """Validate ``data`` into ``cls``, turning pydantic errors into a :class:`ConfigError`."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(cls: type[ConfigT], path: str | Path | None = None, overrides: Sequence[str] = ()) -> ConfigT:
    """Load a recipe file (optional), apply overrides and validate.

    Args:
        cls: the config model.
        path: YAML recipe; ``None`` starts from the model defaults.
        overrides: ``key=value`` strings, applied in order.
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return build_config(cls, data, source=str(path) if path else "overrides")


def resolve_recipe_in(recipes_dir: Path, name_or_path: str | Path) -> Path:
    """A recipe file: a path, or the name of a recipe bundled in ``recipes_dir`` (``NAME.yaml``).

    Anything that is neither is returned unchanged, so that loading it reports the missing file.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    bundled = recipes_dir / f"{name_or_path}.yaml"
    return bundled if bundled.is_file() else path


def recipe_names_in(recipes_dir: Path) -> list[str]:
    """Names of the recipes bundled in ``recipes_dir``."""
    return sorted(p.stem for p in recipes_dir.glob("*.yaml"))


def config_to_yaml(config: BaseModel) -> str:
    """The resolved config as YAML (JSON-compatible values, declaration order)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: BaseModel, path: str | Path) -> Path:
    """Write the resolved config atomically (e.g. ``RUN_DIR/config.yaml``)."""
    path = Path(path)
    atomic_write_text(path, config_to_yaml(config))
    return path
