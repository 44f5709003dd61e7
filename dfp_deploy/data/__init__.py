"""Model inputs: image files read and normalised, BN-matched synthetic inputs, and the inputs a build's stages
share, loaded once. The names below are the public API; nothing heavy is imported until one is used.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".images": "load_images to_tensor",
    ".sources": "load_calibration_inputs",
    ".synthetic": "bn_matched_inputs",
})
