"""Compression on nn.Modules, split by job: select (which channels), prune, repair, quantize, calibrate.

The names below are the public API; the submodules are internal. `calibrate_model` is
calibrate/two_phase.calibrate, renamed because `calibrate` is the subpackage's name.
"""

from __future__ import annotations

from dfp_deploy.core.lazy import lazy_exports

# name -> module that defines it; loaded on first use, so importing the package stays cheap and acyclic
_EXPORTS = {
    "ALLOCATIONS": ("dfp_deploy.compress.select.planner", "ALLOCATIONS"),
    "CalibrationLog": ("dfp_deploy.compress.calibrate.two_phase", "CalibrationLog"),
    "ChannelPlanner": ("dfp_deploy.compress.select.planner", "ChannelPlanner"),
    "LmmseSelector": ("dfp_deploy.compress.select.paths", "LmmseSelector"),
    "METHODS": ("dfp_deploy.compress.repair.apply", "METHODS"),
    "RANKINGS": ("dfp_deploy.compress.select.planner", "RANKINGS"),
    "RepairOptions": ("dfp_deploy.compress.repair.apply", "RepairOptions"),
    "adapt_batchnorm": ("dfp_deploy.compress.calibrate.bn_adapt", "adapt_batchnorm"),
    "auto_batch": ("dfp_deploy.compress.calibrate.two_phase", "auto_batch"),
    "calibrate_model": ("dfp_deploy.compress.calibrate.two_phase", "calibrate"),
    "compress_model": ("dfp_deploy.compress.repair.apply", "compress_model"),
    "edge_layers": ("dfp_deploy.compress.quantize.weights", "edge_layers"),
    "make_plan": ("dfp_deploy.compress.select.plan", "make_plan"),
    "measured_group_statistics": ("dfp_deploy.compress.select.measured", "measured_group_statistics"),
    "prune_model": ("dfp_deploy.compress.prune", "prune_model"),
    "select_plan": ("dfp_deploy.compress.select.lmmse", "select_plan"),
    "self_agreement": ("dfp_deploy.compress.calibrate.bn_adapt", "self_agreement"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
