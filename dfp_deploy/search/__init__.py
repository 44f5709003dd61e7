"""AutoDFP search: an agent picks per-group keep ratios under a cost budget, rewarded by data-free fidelity.

build_space (what is searched), fidelity / proxy (score a candidate), MacCost / LatencyModel (budget cost
models), PruneEnv and run_search (the search itself). Which channels a searched count keeps is the pipeline's
plan callable (compress/select/). These names are the public API; nothing heavy loads until one is used.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".env": "LatencyModel MacCost PruneEnv",
    ".loop": "run_search",
    ".reward": "fidelity proxy",
    ".space": "build_space",
})
