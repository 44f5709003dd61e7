"""A package's public names, each imported from the module that defines it on first use (PEP 562).

Importing a package then costs nothing and cannot form an import cycle, however many stages its names come from."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, modules: Mapping[str, str]) -> tuple[Callable, Callable, list[str]]:
    """(__getattr__, __dir__, __all__) for `package`. `modules` maps a submodule (relative to the package, e.g.
    ".select.planner") to the names it gives, separated by spaces; "public=attr" exports `attr` under another name
    (where the attribute shares its name with a submodule)."""
    namespace = sys.modules[package].__dict__
    exports = {}
    for module, names in modules.items():
        for entry in names.split():
            public, _, attr = entry.partition("=")
            exports[public] = (package + module, attr or public)
    public_names = sorted(exports)

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = exports[name]
        value = getattr(importlib.import_module(module), attr)
        namespace[name] = value  # later lookups find it without calling back here
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(public_names))

    return __getattr__, __dir__, public_names
