"""Model inputs: image files read and normalised, BN-matched synthetic inputs, and the inputs a build's stages
share, loaded once. The names below are the public API; nothing heavy is imported until one is used.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

# name -> module that defines it; loaded on first use, so importing the package stays cheap and acyclic
_EXPORTS = {
    "bn_matched_inputs": ("dfp_deploy.data.synthetic", "bn_matched_inputs"),
    "load_calibration_inputs": ("dfp_deploy.data.sources", "load_calibration_inputs"),
    "load_images": ("dfp_deploy.data.images", "load_images"),
    "to_tensor": ("dfp_deploy.data.images", "to_tensor"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
