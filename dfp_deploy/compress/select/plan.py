"""Turn pruning ratios and an importance ranking into a PrunePlan: which channels of each group survive.

For a group of C channels pruned at ratio r, the number kept is
    kept = min(C, max(min_channels, snap(C·(1 − r))))
where snap rounds to the NEAREST multiple of `round_to` (halves round up), never to 0 (it becomes `round_to`, or C
if smaller) and never above C (it falls back to the largest multiple ≤ C, or C itself if round_to > C).
The kept channels are the `kept` most important ones (ties broken by lower index, so plans are deterministic),
listed in ascending index order. Groups with r = 0, and groups where nothing would be removed, are left out.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable

import numpy as np
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.compress.select.importance import IMPORTANCE, channel_importance
from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import ChannelGroup, PrunePlan


def make_plan(model: nn.Module, analysis: Analysis, *, ratio: float, ratios: dict[str, float] | None = None,
              exclude: Iterable[str] = (), round_to: int = 1, min_channels: int = 1, importance: str = "l2",
              include_residual: bool = False) -> PrunePlan:
    """Plan a uniform (`ratio`) or per-group (`ratios`: fnmatch pattern over group names -> ratio, first match wins)
    pruning. `exclude`: fnmatch patterns over group names and member module names; matching groups are untouched.
    Residual (add-coupled) groups are skipped unless `include_residual`."""
    _check_ratio("ratio", ratio)
    ratios = dict(ratios or {})
    for pattern, value in ratios.items():
        _check_ratio(f"ratios['{pattern}']", value)
    exclude = list(exclude)
    _check_int("round_to", round_to)
    _check_int("min_channels", min_channels)
    if importance not in IMPORTANCE:
        raise InputError(f"unknown importance '{importance}'; choose one of {sorted(IMPORTANCE)}")
    _check_patterns_match(analysis, ratios, exclude)

    keep: dict[str, tuple[int, ...]] = {}
    for group in analysis.groups:
        if not group.prunable or (group.residual and not include_residual):
            continue
        if _excluded(analysis, group, exclude):
            continue
        r = next((value for pattern, value in ratios.items() if fnmatch.fnmatchcase(group.name, pattern)), ratio)
        if r == 0:
            continue
        kept = kept_count(group.channels, r, round_to=round_to, min_channels=min_channels)
        if kept >= group.channels:
            continue
        scores = channel_importance(model, analysis, group.name, importance)
        keep[group.name] = top_channels(scores, kept)
    return PrunePlan(keep=keep)


def kept_count(channels: int, ratio: float, *, round_to: int = 1, min_channels: int = 1) -> int:
    """How many of `channels` survive pruning at `ratio` (see the module docstring)."""
    # the epsilon makes exact halves round up even when 1 - ratio is not exact in binary (5 * 0.7 = 3.4999...)
    snapped = math.floor(channels * (1.0 - ratio) / round_to + 0.5 + 1e-9) * round_to
    if snapped > channels:
        snapped = (channels // round_to) * round_to or channels
    if snapped == 0:
        snapped = min(round_to, channels)
    return min(channels, max(min_channels, snapped))


def top_channels(scores: np.ndarray, kept: int) -> tuple[int, ...]:
    """Indices of the `kept` highest scores (ties: lower index first), ascending."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return tuple(sorted(int(i) for i in order[:kept]))


def _check_ratio(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InputError(f"prune {what}: {value!r} is not a number in [0, 1)")


def _check_int(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"prune {what}: {value!r} must be an integer >= 1")


def _group_module_names(analysis: Analysis, group: ChannelGroup) -> list[str]:
    return [group.name, *analysis.members(group.name).modules()]


def _excluded(analysis: Analysis, group: ChannelGroup, patterns: list[str]) -> bool:
    names = _group_module_names(analysis, group)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in names)


def _check_patterns_match(analysis: Analysis, ratios: dict[str, float], exclude: list[str]) -> None:
    group_names = [g.name for g in analysis.groups]
    for pattern in ratios:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in group_names):
            raise InputError(f"prune ratios pattern '{pattern}' matches no channel group; groups are named after "
                             f"their first producer, e.g. {group_names[:3]}")
    all_names = {name for g in analysis.groups for name in _group_module_names(analysis, g)}
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in all_names):
            raise InputError(f"prune exclude pattern '{pattern}' matches no channel group or module name")
