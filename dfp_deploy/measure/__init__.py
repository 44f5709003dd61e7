"""Measurement: latency protocol, parity and accuracy on an evaluation dataset.

The names below are the public API; the submodules are internal. `check_parity` is parity.parity, renamed
because `parity` is the submodule's name.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".accuracy": "top1",
    ".emulate": "corrupt_one_weight emulated",
    ".latency": "time_interleaved",
    ".parity": "INT8_MAX_REL_RMS ParityRule check_parity=parity int8_verdict network_size",
    ".workers": "Candidate CandidateTimer TargetSpec",
})
