"""Which channels every allowed kept count keeps: the lmmse greedy-elimination path, precomputed once per group.

A caller that decides how MANY channels each group keeps (the search) hands this module the counts it may pick;
`LmmseSelector` then says WHICH: the set that the lmmse repair can best re-express the rest from, by backward greedy
elimination on the data-free error E(K) = tr(G·(C − C_{:,K} C_KK^{-1} C_{K,:})) (select/lmmse.py). Elimination is
nested, so ONE path per group gives the kept set for every count; a candidate's plan is then a table look-up.
Groups without a compensable site (repair/sites.find_site) fall back to the `fallback` importance ranking.

The path also gives the normalised error e_g(k) = E_g(K_k) / tr(G_g C_g) ∈ [0, 1] of every group at every count:
`predicted_error(kept)` = Σ_g e_g(k_g), an analytical, input-free fidelity estimate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.compress.repair.sites import find_site
from dfp_deploy.compress.select.importance import channel_importance
from dfp_deploy.compress.select.lmmse import site_error_path
from dfp_deploy.compress.select.plan import top_channels
from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import PrunePlan


class LmmseSelector:
    """kept counts (or prune ratios) → PrunePlan with lmmse-selected channels (see the module docstring).
    `choices` {group: the kept counts it may take}, in the order `plan` receives lists of counts."""

    def __init__(self, model: nn.Module, analysis: Analysis, choices: Mapping[str, Sequence[int]], *,
                 fallback: str = "l2"):
        self.groups = list(choices)
        self.channels = [analysis.group(name).channels for name in self.groups]
        self.paths: list[dict[int, tuple[int, ...]]] = []
        self.errors: list[dict[int, float]] = []
        self.fallback: list[str] = []
        for name in self.groups:
            sizes = [int(k) for k in choices[name]]
            site, _why = find_site(model, analysis, name)
            if site is not None:
                path = site_error_path(model, analysis, site, sizes)
                self.paths.append({k: tuple(sorted(int(c) for c in path[k][0])) for k in sizes})
                self.errors.append({k: float(path[k][1]) for k in sizes})
            else:
                scores = channel_importance(model, analysis, name, fallback)
                self.paths.append({k: top_channels(scores, k) for k in sizes})
                self.errors.append({k: float("nan") for k in sizes})
                self.fallback.append(name)

    def kept_from_ratios(self, ratios: dict[str, float]) -> list[int]:
        """The kept counts behind prune ratios 1 − k/C (exact for ratios made from counts)."""
        unknown = sorted(set(ratios) - set(self.groups))
        if unknown:
            raise InputError(f"selection: ratios name groups outside the search space: {unknown[:3]}")
        return [int(round(c * (1.0 - ratios.get(g, 0.0)))) for g, c in zip(self.groups, self.channels)]

    def plan(self, kept: list[int] | dict[str, float]) -> PrunePlan:
        """PrunePlan for kept counts (a list, one per group) or prune ratios (a dict {group: ratio})."""
        counts = self.kept_from_ratios(kept) if isinstance(kept, dict) else [int(k) for k in kept]
        if len(counts) != len(self.groups):
            raise InputError(f"selection: {len(counts)} kept counts for {len(self.groups)} groups")
        keep = {}
        for g, (name, k) in enumerate(zip(self.groups, counts)):
            if k >= self.channels[g]:
                continue
            if k not in self.paths[g]:
                raise InputError(f"selection: group {name} cannot keep {k} channels (allowed: "
                                 f"{sorted(self.paths[g])[:4]}...)")
            keep[name] = self.paths[g][k]
        return PrunePlan(keep=keep)

    def predicted_error(self, kept: list[int] | dict[str, float]) -> float:
        """Σ_g e_g(k_g) over the compensable groups (module docstring); 0 for the original."""
        counts = self.kept_from_ratios(kept) if isinstance(kept, dict) else [int(k) for k in kept]
        total = 0.0
        for g, k in enumerate(counts):
            e = self.errors[g].get(int(k), float("nan"))
            if np.isfinite(e):
                total += e
        return total
