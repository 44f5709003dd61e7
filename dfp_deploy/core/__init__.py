"""Shared vocabulary of the stages: frozen artifacts, the error tree, small helpers.

The names below are the public API; the submodules are internal.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".errors": "BackendUnavailable DataError DfpError InputError ParityError",
    ".output": "remove_stale write_marker",
    ".types": "ChannelGroup EngineSummary LatencyStats PrunePlan",
})
