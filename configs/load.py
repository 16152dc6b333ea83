"""YAML file + `key.sub=value` overrides -> a validated, frozen `RunConfig`.

Errors are `ConfigError`s whose lines each name the field path, the value given and what is allowed, e.g.
`learner.lr: got -1 (Input should be greater than 0)`, and a misspelt key names the closest valid one.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from configs.schema import RunConfig

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem, one per line."""


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML file (or a preset name), apply `a.b=c` overrides, and validate."""
    raw = read_yaml(resolve_config_path(path))
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw)


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, or the name of a preset in configs/presets (with or without .yaml)."""
    p = Path(path)
    if p.is_file():
        return p
    preset = PRESETS_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if preset.is_file():
        return preset
    raise ConfigError(f"config file {str(path)!r} not found; presets: {', '.join(preset_names())}")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in place; the value is parsed as a YAML scalar/list (`lr=1e-5`, `stop=[a,b]`)."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(f"override {item!r}: {where} is a value ({child!r}), not a section")
        node = child
    node[leaf] = value


def validate_config(raw: Mapping[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in _drop_union_tags(loc)) or "config"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            did_you_mean = f"did you mean {'.'.join([*path.split('.')[:-1], hint[0]])!r}? " if hint else ""
            lines.append(f"{path}: unknown key. {did_you_mean}Allowed here: {', '.join(allowed)}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            lines.append(f"{path}: required field is missing")
        elif err["type"] == "union_tag_invalid":
            tag = err["input"].get("kind") if isinstance(err["input"], dict) else err["input"]
            lines.append(f"{path}.kind: got {_show(tag)} ({msg})")
        elif "input" in err and not isinstance(err["input"], dict):
            lines.append(f"{path}: got {_show(err['input'])} ({msg})")
        else:
            lines.append(f"{path}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def _walk(loc: tuple[Any, ...]) -> tuple[list[Any], list[type[BaseModel]]]:
    """Follow an error location through the schema.

    Returns the location as the user wrote it (pydantic inserts the discriminator value of a union, as in
    ('objective', 'tb', 'beta'), which users never type) and the models that could sit at its end.
    """
    path: list[Any] = []
    models: list[type[BaseModel]] = [RunConfig]
    for part in loc:
        if len(models) > 1:  # a union: this part is the tag that picked the member
            models = [m for m in models if _kind_of(m) == part]
            continue
        field = models[0].model_fields.get(str(part)) if models else None
        path.append(part)
        models = model_classes(field.annotation) if field is not None else []
    return path, models


def _kind_of(model: type[BaseModel]) -> Any:
    kind = model.model_fields.get("kind")
    return kind.default if kind is not None else None


def _drop_union_tags(loc: tuple[Any, ...]) -> list[Any]:
    return _walk(loc)[0]


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    models = _walk(loc)[1]
    return sorted({name for m in models for name in m.model_fields})


def model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes inside an annotation (plain, Optional, Annotated union)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return model_classes(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in model_classes(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def to_yaml(cfg: RunConfig) -> str:
    """The fully resolved config (every default filled in) as YAML; secrets stay masked."""
    return yaml.safe_dump(_kind_first(json.loads(cfg.model_dump_json())), sort_keys=False)


def _kind_first(node: Any) -> Any:
    """Put each section's `kind` on its first line, where a reader looks for it."""
    if not isinstance(node, dict):
        return node
    ordered = {"kind": node["kind"]} if "kind" in node else {}
    ordered.update({k: _kind_first(v) for k, v in node.items() if k != "kind"})
    return ordered
