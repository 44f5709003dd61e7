"""Engine backends (ONNX Runtime, PyTorch, TensorRT) behind one registry; each is imported only when asked for.

The names below are the public API; none imports a runtime until an engine is built.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".registry": "get_backend list_backends simulation",
})
