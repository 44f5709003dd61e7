"""ONNX export of a PyTorch CNN and the checks every exported graph must pass.

The names below are the public API; the submodules are internal.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".calibrated_ranges": "calibration_ranges",
    ".int8": "int8_onnx",
    ".onnx_export": "export_onnx",
    ".passes": "prepare_int8_onnx",
    ".passes.prepare": "default_reduce_range",
    ".ranges": "DEFAULT_K data_free_ranges",
})
