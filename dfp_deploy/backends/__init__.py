"""Engine backends (ONNX Runtime, PyTorch, TensorRT) behind one registry; each is imported only when asked for.

The names below are the public API; none imports a runtime until an engine is built.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

# name -> module that defines it; loaded on first use, so importing the package stays cheap and acyclic
_EXPORTS = {
    "get_backend": ("dfp_deploy.backends.registry", "get_backend"),
    "list_backends": ("dfp_deploy.backends.registry", "list_backends"),
    "simulation": ("dfp_deploy.backends.registry", "simulation"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
