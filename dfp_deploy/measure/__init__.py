"""Measurement: latency protocol, parity and accuracy on an evaluation dataset.

The names below are the public API; the submodules are internal. `check_parity` is parity.parity, renamed
because `parity` is the submodule's name.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

# name -> module that defines it; loaded on first use, so importing the package stays cheap and acyclic
_EXPORTS = {
    "Candidate": ("dfp_deploy.measure.workers", "Candidate"),
    "CandidateTimer": ("dfp_deploy.measure.workers", "CandidateTimer"),
    "INT8_MAX_REL_RMS": ("dfp_deploy.measure.parity", "INT8_MAX_REL_RMS"),
    "ParityRule": ("dfp_deploy.measure.parity", "ParityRule"),
    "TargetSpec": ("dfp_deploy.measure.workers", "TargetSpec"),
    "check_parity": ("dfp_deploy.measure.parity", "parity"),
    "corrupt_one_weight": ("dfp_deploy.measure.emulate", "corrupt_one_weight"),
    "emulated": ("dfp_deploy.measure.emulate", "emulated"),
    "int8_verdict": ("dfp_deploy.measure.parity", "int8_verdict"),
    "network_size": ("dfp_deploy.measure.parity", "network_size"),
    "time_interleaved": ("dfp_deploy.measure.latency", "time_interleaved"),
    "top1": ("dfp_deploy.measure.accuracy", "top1"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
