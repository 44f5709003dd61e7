"""Model inputs: image files read and normalised, BN-matched synthetic inputs, and the inputs a build's stages
share, loaded once. The names below are the public API; nothing heavy is imported until one is used.
"""

from __future__ import annotations

import importlib

# name -> module that defines it; loaded on first use, so importing the package stays cheap and acyclic
_EXPORTS = {
    "bn_matched_inputs": ("dfp_deploy.data.synthetic", "bn_matched_inputs"),
    "load_calibration_inputs": ("dfp_deploy.data.sources", "load_calibration_inputs"),
    "load_images": ("dfp_deploy.data.images", "load_images"),
    "to_tensor": ("dfp_deploy.data.images", "to_tensor"),
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
