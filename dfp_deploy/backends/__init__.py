"""Engine backends (ONNX Runtime, PyTorch, TensorRT) behind one registry; each is imported only when asked for.

The names below are the public API; none imports a runtime until an engine is built.
"""

from __future__ import annotations

import importlib

# name -> module that defines it; loaded on first use, so importing the package stays cheap and acyclic
_EXPORTS = {
    "get_backend": ("dfp_deploy.backends.registry", "get_backend"),
    "list_backends": ("dfp_deploy.backends.registry", "list_backends"),
    "simulation": ("dfp_deploy.backends.registry", "simulation"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
