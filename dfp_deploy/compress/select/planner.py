"""Which channels a build removes: the recipe's prune section (ratios, exclusions, rounding) turned into a PrunePlan.

Two rankings:
- a per-channel importance score (l1, l2, bn_l2, group_l2, group_l2_raw; select/importance.py): the top `kept` channels
  of each group survive (plan.make_plan);
- "lmmse": the kept set that leaves the smallest data-free reconstruction error in the consumers' outputs, found by
  greedy backward elimination (select/lmmse.select_plan; the error model is repair/moments.py). Groups where
  closed-form reconstruction is not valid (residual streams, no BatchNorm, ...) fall back to the l2 ranking.

Allocation (lmmse only): "uniform" keeps the same fraction of every group (the counts make_plan would keep);
"macs" removes the same total MACs as the uniform plan but lets groups compete for it, each step cutting where the
normalised reconstruction error grows least per MAC saved (select/lmmse.select_plan, budget="macs"); "macs-abs" the
same on the error itself (in the units the next BatchNorm sees), not relative to the group's total, so groups whose
channels matter little in absolute terms are cut deeper (each group keeps at least 20 % of its channels).

Statistics (lmmse only): the reconstruction error is computed from the data-free Gaussian model of the activations
(repair/moments.py), or, given `measured` activation statistics (select/measured.py, from calibration
images), from those.

The same count rule (plan.kept_count) applies to every ranking, so switching the ranking never changes the MACs of a
uniform plan. Selections are cached per (group, kept count) for repeated plans; the search, which asks for every
count of every group, uses the precomputed elimination paths of select/paths.py instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.compress.repair.sites import find_site
from dfp_deploy.compress.select.importance import IMPORTANCE
from dfp_deploy.compress.select.lmmse import select_plan, site_error_path
from dfp_deploy.compress.select.plan import make_plan
from dfp_deploy.core.errors import InputError
from dfp_deploy.core.threads import torch_threads
from dfp_deploy.core.types import PrunePlan

RANKINGS = (*sorted(IMPORTANCE), "lmmse")
ALLOCATIONS = ("uniform", "macs", "macs-abs")


class ChannelPlanner:
    """Plans for one model and one prune configuration; `plan(ratio, ratios)` may be called many times."""

    def __init__(self, model: nn.Module, analysis: Analysis, *, importance: str = "l2", allocation: str = "uniform",
                 exclude: Iterable[str] = (), round_to: int = 1, min_channels: int = 1,
                 include_residual: bool = False, progress: bool = False,
                 measured: dict[str, tuple] | None = None):
        if importance not in RANKINGS:
            raise InputError(f"prune importance: {importance!r} is not one of {', '.join(RANKINGS)}")
        if allocation not in ALLOCATIONS:
            raise InputError(f"prune allocation: {allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        if allocation != "uniform" and importance != "lmmse":
            raise InputError(f"compress.prune.allocation: {allocation} needs compress.prune.importance: lmmse "
                             "(only the reconstruction error compares groups with each other)")
        if measured is not None and importance != "lmmse":
            raise InputError("advanced.compress.prune.statistics: calibration needs compress.prune.importance: lmmse "
                             "(only the lmmse selection reads activation statistics)")
        self.model, self.analysis, self.progress = model, analysis, progress
        self.measured = measured or {}
        self.importance, self.allocation = importance, allocation
        self.options = dict(exclude=list(exclude), round_to=round_to, min_channels=min_channels,
                            include_residual=include_residual)
        self._sites: dict[str, object] = {}
        self._kept: dict[tuple[str, int], tuple[int, ...]] = {}

    def plan(self, ratio: float = 0.0, ratios: dict[str, float] | None = None) -> PrunePlan:
        with torch_threads(1):  # small matrices: threads only add waiting (core/threads.py)
            return self._plan(ratio, ratios)

    def _plan(self, ratio: float, ratios: dict[str, float] | None) -> PrunePlan:
        ranking = "l2" if self.importance == "lmmse" else self.importance
        base = make_plan(self.model, self.analysis, ratio=ratio, ratios=ratios, importance=ranking, **self.options)
        if self.importance != "lmmse":
            return base
        compensable = [name for name in base.keep if self._site(name) is not None]
        if self.allocation != "uniform":
            if ratios:
                raise InputError(f"compress.prune.allocation: {self.allocation} shares one budget across groups; it "
                                 "cannot be combined with per-group advanced.compress.prune.ratios")
            return self._macs(base, ratio, compensable)
        from tqdm import tqdm

        keep = dict(base.keep)
        # large groups take a while (EfficientNet-Lite0: minutes on 2 cores), so show where we are
        for name in tqdm(compensable, desc="lmmse selection", unit="group", file=sys.stderr, leave=False,
                         disable=not (self.progress and sys.stderr.isatty())):
            keep[name] = self._lmmse_keep(name, len(base.keep[name]))
        return PrunePlan(keep=keep)

    def _site(self, name: str):
        if name not in self._sites:
            self._sites[name] = find_site(self.model, self.analysis, name)[0]
        return self._sites[name]

    def _lmmse_keep(self, name: str, kept: int) -> tuple[int, ...]:
        if (name, kept) not in self._kept:
            path = site_error_path(self.model, self.analysis, self._site(name), [kept],
                                   measured=self.measured.get(name))
            self._kept[(name, kept)] = tuple(sorted(path[kept][0]))
        return self._kept[(name, kept)]

    def _macs(self, base: PrunePlan, ratio: float, compensable: list[str]) -> PrunePlan:
        keep = {name: kept for name, kept in base.keep.items() if name not in compensable}
        if compensable:
            chosen, _ = select_plan(self.model, self.analysis, ratio=ratio, budget="macs", groups=compensable,
                                    round_to=self.options["round_to"], min_channels=self.options["min_channels"],
                                    normalise=self.allocation == "macs", measured=self.measured)
            keep.update(chosen.keep)
        return PrunePlan(keep=keep)
