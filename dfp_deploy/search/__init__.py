"""AutoDFP search: an agent picks per-group keep ratios under a cost budget, rewarded by data-free fidelity.

build_space (what is searched), fidelity / proxy (score a candidate), MacCost / LatencyModel (budget cost
models), PruneEnv and run_search (the search itself). Which channels a searched count keeps is the pipeline's
plan callable (compress/select/). These names are the public API; nothing heavy loads until one is used.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

# name -> module that defines it; loaded on first use, so importing the package stays cheap and acyclic
_EXPORTS = {
    "LatencyModel": ("dfp_deploy.search.env", "LatencyModel"),
    "MacCost": ("dfp_deploy.search.env", "MacCost"),
    "PruneEnv": ("dfp_deploy.search.env", "PruneEnv"),
    "build_space": ("dfp_deploy.search.space", "build_space"),
    "fidelity": ("dfp_deploy.search.reward", "fidelity"),
    "proxy": ("dfp_deploy.search.reward", "proxy"),
    "run_search": ("dfp_deploy.search.loop", "run_search"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
