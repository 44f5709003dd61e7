"""Compression on nn.Modules, split by job: select (which channels), prune, repair, quantize, calibrate.

The names below are the public API; the submodules are internal. `calibrate_model` is
calibrate/two_phase.calibrate, renamed because `calibrate` is the subpackage's name.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".calibrate.bn_adapt": "adapt_batchnorm self_agreement",
    ".calibrate.two_phase": "CalibrationLog auto_batch calibrate_model=calibrate",
    ".prune": "prune_model",
    ".quantize.weights": "edge_layers",
    ".repair.apply": "METHODS RepairOptions compress_model",
    ".select.lmmse": "select_plan",
    ".select.measured": "measured_group_statistics",
    ".select.paths": "LmmseSelector",
    ".select.plan": "make_plan",
    ".select.planner": "ALLOCATIONS ChannelPlanner RANKINGS",
})
