"""Import the user's code a recipe names (`package.module:attribute`), from installed packages, PYTHONPATH or the
recipe's folder.

A recipe's folder is searched after everything else on sys.path (appended, never prepended), so a file there cannot
shadow an installed package; it stays on sys.path for the whole build, because the user's code may import its own
helpers lazily (a metric called at the end of the build). Standard-library modules are refused before the import:
importing runs a module's top level, and none of them holds a model or a metric.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from dfp_deploy.core.errors import InputError

SPEC_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@contextlib.contextmanager
def importable_from(folder: str | Path | None) -> Iterator[None]:
    """`folder` (a recipe's folder) at the end of sys.path for the body; None: nothing changes."""
    entry = str(Path(folder).resolve()) if folder is not None else None
    added = entry is not None and entry not in sys.path
    if added:
        sys.path.append(entry)
        importlib.invalidate_caches()
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def resolve_function(spec: object, key: str) -> object:
    """The Python function `spec` ("package.module:function") names; InputError naming `key` when it is malformed,
    in the standard library, not importable, missing, or not a plain Python function."""
    if not isinstance(spec, str) or not SPEC_PATTERN.match(spec):
        raise InputError(f"{key}: {spec!r} is not of the form 'package.module:function'")
    module_name, attr_path = spec.split(":")
    if module_name.split(".")[0] in sys.stdlib_module_names:
        raise InputError(f"{key}: {module_name} is Python's standard library; name a function of your own module")
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"{key}: cannot import module {module_name!r} ({exc}); it must be installed, on "
                         "PYTHONPATH, or in the recipe's folder") from exc
    except Exception as exc:  # the module's own top level failed: the user's code, reported in one line
        raise InputError(f"{key}: importing {module_name!r} failed ({type(exc).__name__}: {_first_line(exc)})"
                         ) from exc
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise InputError(f"{key}: module {module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, attr)
    if not inspect.isfunction(target):
        kind = "a builtin" if inspect.isbuiltin(target) else f"a {type(target).__name__}"
        raise InputError(f"{key}: {spec} is {kind}, not a Python function")
    return target


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
