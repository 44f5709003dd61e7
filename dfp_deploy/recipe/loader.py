"""Strict recipe loading: YAML + `--set key=value` overrides → a frozen, validated `Recipe`.

Every problem is a RecipeError whose message starts with the key path and says what is allowed, e.g.
`compress.prune.ratio: 1.3 is not in [0, 1)`. Relative paths written in the recipe file resolve against the
file's folder; relative paths given with --set resolve against the current directory (where the user typed them).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from dfp_deploy.core.errors import RecipeError
from dfp_deploy.recipe.schema import Recipe

_PASSTHROUGH = ("pypi:", "synthetic")  # path-typed values that name something other than a file


def load_recipe(path: str | Path | None, overrides: list[str] = (), *, out: str | None = None) -> Recipe:
    """Read `path` (None = all defaults), apply overrides, validate. `out` overrides output.dir (relative to cwd)."""
    raw: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe: file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise RecipeError(f"recipe: {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"recipe: {path} must be a mapping of sections, got {type(raw).__name__}")
        base = path.resolve().parent
    overridden: set[str] = set()
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        overridden.add(key)
    if out is not None:
        _set_dotted(raw, "output.dir", out)
        overridden.add("output.dir")
    return _build(Recipe, raw, "", base, overridden)


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def iter_keys(cls=Recipe, prefix: str = ""):
    """Yield (dotted key, type, default, doc) for every leaf key: the recipe reference."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_keys(hints[f.name], key + ".")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            yield key, _type_name(hints[f.name]), default, f.metadata.get("doc", "")


def _parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key=value, e.g. --set compress.prune.ratio=0.5")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: take it as a plain string
    known = {k for k, *_ in iter_keys()}
    section_keys = {k.rsplit(".", 1)[0] for k in known if "." in k}
    if key not in known and key not in section_keys:
        hint = difflib.get_close_matches(key, sorted(known), n=1)
        raise RecipeError(f"{key}: unknown key" + (f" (did you mean {hint[0]}?)" if hint else ""))
    return key, value


def _set_dotted(tree: dict, key: str, value) -> None:
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"{'.'.join(parts[:i + 1])}: expected a section (mapping), got {child!r}")
        node = child
    node[parts[-1]] = value


def _build(cls, raw, prefix: str, base: Path, overridden: set[str]):
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a section (mapping of keys), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            allowed = ", ".join(fields)
            raise RecipeError(f"{prefix}{key}: unknown key" + (f" (did you mean {hint[0]}?)" if hint else "")
                              + f"; allowed here: {allowed}")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            values[name] = _build(typ, raw.get(name), key + ".", base, overridden)
            continue
        if name not in raw:
            continue  # dataclass default
        value = _check(key, typ, raw[name], f.metadata)
        if f.metadata.get("path") and isinstance(value, str):
            value = _resolve_path(value, Path.cwd() if key in overridden else base)
        values[name] = value
    return cls(**values)


def _resolve_path(value: str, base: Path) -> str:
    if value.startswith(_PASSTHROUGH):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _check(key: str, typ, value, meta):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(key, inner, value, meta)
    if value is None:
        raise RecipeError(f"{key}: must be set (expected {_type_name(typ)}), got null")
    if origin is typing.Literal:
        if value not in args:
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        _check_range(key, value, meta)
        return value
    if typ is float:
        value = _yaml11_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        _check_range(key, float(value), meta)
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        return [_check(f"{key}[{i}]", args[0], v, {}) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise RecipeError(f"{key}: keys must be strings, got {k!r}")
            out[k] = v if args[1] is object else _check(f"{key}.{k}", args[1], v, meta)
        return out
    raise TypeError(f"schema type not supported by the loader: {typ}")  # a bug in schema.py, not user input


def _yaml11_float(value):
    """YAML 1.1 (PyYAML) reads `1e-3` as a string (it wants `1.0e-3`); users mean a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_range(key: str, value, meta) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    lo_open, hi_open = meta.get("lo_open"), meta.get("hi_open")
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or \
          (hi is not None and (value > hi or (hi_open and value == hi)))
    if bad:
        left = "(" if lo_open or lo is None else "["
        right = ")" if hi_open or hi is None else "]"
        lo_s = _fmt(lo) if lo is not None else "-inf"
        hi_s = _fmt(hi) if hi is not None else "inf"
        raise RecipeError(f"{key}: {_fmt(value)} is not in {left}{lo_s}, {hi_s}{right}")


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _type_name(typ) -> str:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(map(str, args))
    if typ is type(None):
        return "null"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    return getattr(typ, "__name__", str(typ))
