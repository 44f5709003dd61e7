"""ONNX export of a PyTorch CNN and the checks every exported graph must pass.

The names below are the public API; the submodules are internal.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

# name -> module that defines it; loaded on first use, so importing the package stays cheap and acyclic
_EXPORTS = {
    "DEFAULT_K": ("dfp_deploy.export.ranges", "DEFAULT_K"),
    "calibration_ranges": ("dfp_deploy.export.calibrated_ranges", "calibration_ranges"),
    "data_free_ranges": ("dfp_deploy.export.ranges", "data_free_ranges"),
    "default_reduce_range": ("dfp_deploy.export.passes.prepare", "default_reduce_range"),
    "export_onnx": ("dfp_deploy.export.onnx_export", "export_onnx"),
    "int8_onnx": ("dfp_deploy.export.int8", "int8_onnx"),
    "prepare_int8_onnx": ("dfp_deploy.export.passes", "prepare_int8_onnx"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
