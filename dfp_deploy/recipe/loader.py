"""Strict recipe loading: YAML + `--set key=value` overrides → a frozen, validated `Recipe`.

Every problem is a RecipeError whose message starts with the key path and says what is allowed, e.g.
`compress.prune.ratio: 1.3 is not in [0, 1)`. Relative paths written in the recipe file resolve against the
file's folder; relative paths given with --set resolve against the current directory (where the user typed them).
Recipes may come from someone else: YAML no recipe needs (aliases, deep nesting, duplicate keys, non-UTF-8, over
1 MiB) is refused before it is expanded, floats must be finite, and values inside messages are bounded reprs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from pathlib import Path

import yaml

from dfp_deploy.core.errors import RecipeError
from dfp_deploy.recipe.schema import RENAMED_KEYS, Recipe

_PASSTHROUGH = ("pypi:", "synthetic")  # path-typed values that name something other than a file
# A recipe is a few dozen keys four levels deep; these bounds are far above that and far below what exhausts
# memory or the interpreter's stack (the YAML composer recurses once per level).
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 100_000
MAX_PATH = 4095  # PATH_MAX - 1 on Linux
MAX_NAME = 255  # NAME_MAX: one path component
# the build stages into `.<name>.building-<pid>` next to the output folder: its name must leave room for that
MAX_OUTPUT_NAME = MAX_NAME - len(".") - len(".building-") - 10
_PSEUDO_FS = ("/proc", "/sys")  # /dev/shm is a real tmpfs; /dev/null/x fails as "a file"

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxlevel = 2


def _show(value) -> str:
    """A value as it appears in an error message: repr, bounded in length and depth whatever its size."""
    return _repr.repr(value)


def _name(key) -> str:
    """A key as it appears in an error message: itself if short and printable, else a bounded repr."""
    text = str(key)
    return text if text.isprintable() and len(text) <= 60 else _show(text)


class _Refused(yaml.YAMLError):
    """YAML that parses but that a recipe refuses (aliases, depth, size, duplicate keys); `mark` says where."""

    def __init__(self, message: str, mark=None):
        super().__init__(message)
        self.message, self.mark = message, mark


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses what no recipe needs: aliases (a few hundred bytes of `&a [*a, *a]` expand to
    gigabytes once anything walks the value), nesting beyond MAX_DEPTH (the composer recurses per level),
    more than MAX_NODES nodes, and duplicate keys (the later one would silently replace the earlier)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"YAML aliases (*{_name(event.anchor)}) are not accepted in recipes; write the value "
                           "out", event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES} YAML nodes; a recipe is a few dozen keys",
                           self.peek_event().start_mark)
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels; a recipe is a few levels deep",
                           self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # unhashable: the base constructor reports it
                if duplicate:
                    raise _Refused(f"duplicate key {_name(key)!r} (a second one would silently replace the first); "
                                   "merge the two", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str):
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
        raise _Refused(f"a value cannot be read ({_show(str(exc))})") from None
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "mark", None) or getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    if isinstance(exc, _Refused):
        return f": {exc.message}{where}"
    problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f" is not valid YAML{where}: {problem}"


def _read_recipe_text(path: Path) -> str:
    try:
        if not path.is_file():
            raise RecipeError(f"recipe: file not found: {_name(path)}")
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"recipe: cannot read {_name(path)} ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe: {_name(path)} is larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a few "
                          "dozen lines")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe: {_name(path)} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}); save it as UTF-8") from None


def load_recipe(path: str | Path | None, overrides: list[str] = (), *, out: str | None = None) -> Recipe:
    """Read `path` (None = all defaults), apply overrides, validate. `out` overrides output.dir (relative to cwd)."""
    raw: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        text = _read_recipe_text(path)
        try:
            raw = _parse_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe: {_name(path)}{_yaml_problem(exc)}") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"recipe: {_name(path)} must be a mapping of sections, got {type(raw).__name__}")
        base = path.resolve().parent
    overridden: set[str] = set()
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        overridden.add(key)
    if out is not None:
        _check_path_text("--out", out)  # named as the user gave it
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


ADVANCED = "advanced."


def moved_keys() -> dict[str, str]:
    """Old path -> new path of every key (and section) that moved under `advanced:`: a recipe or --set that still
    uses the old path is told where the key went, in one line."""
    moved = {}
    user = {k for k, *_ in iter_keys() if not k.startswith(ADVANCED)}
    user_sections = {k.rsplit(".", i)[0] for k in user for i in range(1, k.count(".") + 1)}
    for key, *_ in iter_keys():
        if key.startswith(ADVANCED):
            old = key[len(ADVANCED):]
            moved[old] = key
            parts = old.split(".")
            for i in range(1, len(parts)):  # a section that exists only under advanced: moved as a whole
                section = ".".join(parts[:i])
                if section not in user_sections:
                    moved.setdefault(section, ADVANCED + section)
    return moved


def _refuse_moved(key: str) -> None:
    if key in RENAMED_KEYS:
        raise RecipeError(f"{key}: {RENAMED_KEYS[key]}")
    new = moved_keys().get(key)
    if new is not None:
        raise RecipeError(f"{_name(key)}: moved to {new} (an advanced key; `dfp-deploy recipe-keys --advanced` "
                          "lists them)")


def _parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise RecipeError(f"--set {_show(item)}: expected key=value, e.g. --set compress.prune.ratio=0.5")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = _parse_yaml(text) if text.strip() else None
    except _Refused as exc:
        raise RecipeError(f"--set {_name(key)}: {exc.message}") from None
    except yaml.YAMLError:
        value = text  # not YAML: take it as a plain string
    known = {k for k, *_ in iter_keys()}
    section_keys = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    if key not in known and key not in section_keys:
        _refuse_moved(key)
        hint = difflib.get_close_matches(key, sorted(known), n=1)
        raise RecipeError(f"{_name(key)}: unknown key" + (f" (did you mean {hint[0]}?)" if hint else ""))
    return key, value


def _set_dotted(tree: dict, key: str, value) -> None:
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"{'.'.join(parts[:i + 1])}: expected a section (mapping), got {_show(child)}")
        node = child
    node[parts[-1]] = value


def _build(cls, raw, prefix: str, base: Path, overridden: set[str]):
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a section (mapping of keys), got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            _refuse_moved(f"{prefix}{key}")
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            allowed = ", ".join(fields)
            raise RecipeError(f"{prefix}{_name(key)}: unknown key" + (f" (did you mean {hint[0]}?)" if hint else "")
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
            value = _resolve_path(key, value, Path.cwd() if key in overridden else base)
        values[name] = value
    return cls(**values)


def _resolve_path(key: str, value: str, base: Path) -> str:
    if value.startswith(_PASSTHROUGH):
        return value
    _check_path_text(key, value)
    # os.path.expanduser leaves `~unknown-user` alone where Path.expanduser raises
    p = Path(os.path.expanduser(value))
    try:
        resolved = p if p.is_absolute() else (base / p).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, or a path the OS refuses
        raise RecipeError(f"{key}: cannot resolve {_show(value)} ({exc})") from None
    _check_path_text(key, str(resolved))
    return str(resolved)


def _check_path_text(key: str, value: str) -> None:
    """Refuse what no filesystem call can take, before one raises mid-build: NUL bytes and over-long names."""
    if not value:
        raise RecipeError(f"{key}: empty path; give a file or folder name")
    if "\0" in value:
        raise RecipeError(f"{key}: the path {_show(value)} contains a NUL byte")
    encoded = os.fsencode(value) if _encodable(value) else value.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_PATH:
        raise RecipeError(f"{key}: the path is {len(encoded)} bytes long ({_show(value)}); the limit is {MAX_PATH}")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > MAX_NAME:
        raise RecipeError(f"{key}: a path component is {len(longest)} bytes long ({_show(value)}); a file or folder "
                          f"name can have at most {MAX_NAME}")


def _encodable(value: str) -> bool:
    try:
        os.fsencode(value)
        return True
    except UnicodeError:
        return False


def check_output_dir(out: str | Path, key: str = "output.dir") -> None:
    """Refuse an output folder that cannot be created before any work starts: a name that leaves no room for the
    staging sibling, an ancestor that is a file, a pseudo filesystem, or a parent this user cannot write."""
    text = str(out)
    _check_path_text(key, text)
    path = Path(os.path.abspath(text))
    if len(os.fsencode(path.name)) > MAX_OUTPUT_NAME:
        raise RecipeError(f"{key}: the folder name is {len(path.name)} characters long; at most {MAX_OUTPUT_NAME} "
                          "(the build stages next to it under a longer name)")
    if path.parent == path:
        raise RecipeError(f"{key}: {path} is the filesystem root; choose a folder to write into")
    if any(path == Path(p) or Path(p) in path.parents for p in _PSEUDO_FS):
        raise RecipeError(f"{key}: {_show(str(path))} is on a system pseudo filesystem ({path.parts[1]}); choose "
                          "a real folder")
    ancestor = path.parent
    try:
        while not ancestor.exists():
            ancestor = ancestor.parent
        is_dir = ancestor.is_dir()
    except OSError as exc:
        raise RecipeError(f"{key}: cannot check {_show(str(path))} ({exc.strerror})") from None
    if not is_dir:
        raise RecipeError(f"{key}: cannot create {_show(str(path))}: {_show(str(ancestor))} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RecipeError(f"{key}: cannot create {_show(str(path))}: no write permission in "
                          f"{_show(str(ancestor))}")


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
        if not isinstance(value, typing.Hashable) or value not in args:
            raise RecipeError(f"{key}: {_show(value)} is not one of {', '.join(map(str, args))}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {_show(value)}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {_show(value)}")
        _check_range(key, value, meta)
        return value
    if typ is float:
        value = _yaml11_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {_show(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            # NaN compares false with every bound, so without this it would pass any range check
            raise RecipeError(f"{key}: {_show(value)} is not a finite number")
        _check_range(key, number, meta)
        return number
    if typ is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {_show(value)}")
        length = meta.get("length")
        if length is not None and len(value) != length:
            raise RecipeError(f"{key}: expected {length} values, got {len(value)}")
        item_meta = {"lo": meta.get("item_lo"), "hi": meta.get("item_hi")}
        return [_check(f"{key}[{i}]", args[0], v, item_meta) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {_show(value)}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise RecipeError(f"{key}: keys must be strings, got {_show(k)}")
            out[k] = v if args[1] is object else _check(f"{key}.{_name(k)}", args[1], v, meta)
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
    return f"{x:g}" if isinstance(x, float) else _show(x)


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
