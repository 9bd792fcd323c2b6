"""YAML files and `section.field=value` overrides into a typed `Config`.

A run file may name its model file (`model: tiny` or `model: {base: tiny, num_layers: 8}`,
or `model.base=tiny` on the command line); the model file is looked up next to the run file,
then in `configs/models/`. Types are checked here, so a typo, a key written twice or a string
where a number belongs fails with one line that names the field, before any process starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError
from scaletrain.resources import MODELS_DIR

MODEL_BASE_KEY = "base"


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a run file, compose its model file, apply overrides, and type-check the result."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    if isinstance(raw.get("model"), str):  # `model: tiny` is `model: {base: tiny}`
        raw["model"] = {MODEL_BASE_KEY: raw["model"]}
    for override in overrides or []:  # before composing: `model.base=...` may be one of them
        _apply_override(raw, override)
    return from_dict(_compose_model(raw, Path(path) if path is not None else None))


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from plain data; unknown keys and wrong types raise ConfigError."""
    return _build(Config, raw, "")


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error
    (PyYAML keeps the last value silently, so a second `lr:` would win unseen)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
            continue
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        except TypeError:  # an unhashable key: construct_mapping says so
            break
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _read_yaml(path: Path, field: str = "--config", holds: str = "sections") -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(field, f"file {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader
    except _DuplicateKey as dup:
        raise ConfigError(
            field,
            f"{str(path)!r}: key {dup.key!r} is given twice (lines {dup.first} and "
            f"{dup.second}); keep one",
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(field, f"{str(path)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(field, f"{str(path)!r} must hold a mapping of {holds}")
    return data


def _compose_model(raw: dict[str, Any], run_file: Path | None) -> dict[str, Any]:
    """Replace `model: {base: NAME, ...}` by the model file, then the fields given with it."""
    model = raw.get("model")
    if not isinstance(model, dict) or MODEL_BASE_KEY not in model:
        return raw
    name = model[MODEL_BASE_KEY]
    if not isinstance(name, str) or not name:
        raise ConfigError("model.base", f"expected a model name or file, got {_show(name)}")
    here = [run_file.parent] if run_file is not None else []
    if name.endswith((".yaml", ".yml")):  # a path, relative to the run file or cwd
        candidates = [*(d / name for d in here), Path(name)]
    else:  # a preset name
        candidates = [d.parent / "models" / f"{name}.yaml" for d in here]
        candidates += [Path("configs/models") / f"{name}.yaml"]
        packaged = MODELS_DIR / f"{name}.yaml"  # an installed scaletrain's own presets
        if packaged.resolve() != candidates[-1].resolve():  # not the clone's, seen from it
            candidates.append(packaged)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(
            "model.base",
            f"model file {name!r} not found (looked in {', '.join(str(c) for c in candidates)})",
        )
    base = _read_yaml(found, "model.base", "fields")
    merged = {**base, **{k: v for k, v in model.items() if k != MODEL_BASE_KEY}}
    return {**raw, "model": merged}


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(
            key.strip() or override,
            f"override {override!r} must be written section.field=value, e.g. parallel.tp=2",
        )
    section, name = parts
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(
            key.strip(), f"value {text!r} is not valid YAML; fix it or put it in quotes"
        ) from None
    if raw.get(section) is None:  # `train:` with nothing under it is an empty section
        raw[section] = {}
    target = raw[section]
    if not isinstance(target, dict):
        raise ConfigError(section, "must be a mapping of fields")
    target[name] = value


def _build(cls: type, raw: Any, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path or "config", f"expected a mapping of fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        kind = "field" if path else "section"
        raise ConfigError(where, f"unknown {kind}; known {kind}s are {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        where = f"{path}.{name}" if path else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, where)
        else:
            values[name] = _coerce(value, hint, where)
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            choices = " | ".join(str(a) for a in args)
            raise ConfigError(where, f"{_show(value)} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(where, f"expected a list, got {_show(value)}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, f"expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, f"expected an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, str):
            value = _yaml11_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, f"expected a number, got {_show(value)}")
        if not math.isfinite(value):
            raise ConfigError(where, f"expected a finite number, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(where, f"expected a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")


def _show(value: Any) -> str:
    """A bad value as the user wrote it in YAML (null, true) rather than Python (None, True)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _yaml11_float(text: str) -> float | str:
    """PyYAML reads `3e-4` (no dot) as a string; accept it where a number is expected."""
    try:
        return float(text)
    except ValueError:
        return text
