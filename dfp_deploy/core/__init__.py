"""Shared vocabulary of the stages: frozen artifacts, the error tree, small helpers.

The names below are the public API; the submodules are internal.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

# name -> module that defines it; loaded on first use, so importing the package stays cheap and acyclic
_EXPORTS = {
    "BackendUnavailable": ("dfp_deploy.core.errors", "BackendUnavailable"),
    "ChannelGroup": ("dfp_deploy.core.types", "ChannelGroup"),
    "DataError": ("dfp_deploy.core.errors", "DataError"),
    "DfpError": ("dfp_deploy.core.errors", "DfpError"),
    "EngineSummary": ("dfp_deploy.core.types", "EngineSummary"),
    "InputError": ("dfp_deploy.core.errors", "InputError"),
    "LatencyStats": ("dfp_deploy.core.types", "LatencyStats"),
    "ParityError": ("dfp_deploy.core.errors", "ParityError"),
    "PrunePlan": ("dfp_deploy.core.types", "PrunePlan"),
    "remove_stale": ("dfp_deploy.core.output", "remove_stale"),
    "write_marker": ("dfp_deploy.core.output", "write_marker"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
