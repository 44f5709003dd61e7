"""Which channels a searched kept count keeps: the lmmse greedy-elimination path, precomputed once per group.

The search decides how MANY channels each group keeps (k_g); this module decides WHICH. With `importance` rankings
(make_plan) the kept set is the k_g highest-scoring channels. `LmmseSelector` instead keeps the set that the lmmse
reconstruction can best re-express the rest from (compress/reconstruct.py, "Channel selection"): backward greedy
elimination on the data-free error E(K) = tr(G·(C − C_{:,K} C_KK^{-1} C_{K,:})). Elimination is nested, so ONE
path per group gives the kept set for every allowed count; it is computed once (≈ 1.6 s for the 27 groups of
ResNet-56) and a candidate's plan is then a table look-up. Groups without a compensable site (reconstruct.find_site)
fall back to the `fallback` importance ranking.

The path also gives, for free, the normalised error e_g(k) = E_g(K_k) / tr(G_g C_g) ∈ [0, 1] of every group at every
count: `predicted_error(kept)` = Σ_g e_g(k_g) is a purely analytical, input-free fidelity estimate (the quantity
select_plan(budget="macs") allocates on).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import PrunePlan
from dfp_deploy.search.space import SearchSpace

SELECTIONS = ("importance", "lmmse")


class LmmseSelector:
    """kept counts (or prune ratios) → PrunePlan with lmmse-selected channels (see the module docstring)."""

    def __init__(self, model: nn.Module, analysis: Analysis, space: SearchSpace, *, fallback: str = "l2"):
        from dfp_deploy.compress.importance import channel_importance
        from dfp_deploy.compress.plan import top_channels
        from dfp_deploy.compress.reconstruct import find_site, site_error_path

        self.space = space
        self.paths: list[dict[int, tuple[int, ...]]] = []
        self.errors: list[dict[int, float]] = []
        self.fallback: list[str] = []
        for g, name in enumerate(space.groups):
            sizes = [int(k) for k in space.choices(g)]
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
        """The kept counts behind space.ratios(kept) (exact: the search hands over k/C ratios)."""
        unknown = sorted(set(ratios) - set(self.space.groups))
        if unknown:
            raise InputError(f"selection: ratios name groups outside the search space: {unknown[:3]}")
        return [int(round(c * (1.0 - ratios.get(g, 0.0)))) for g, c in zip(self.space.groups, self.space.channels)]

    def plan(self, kept: list[int] | dict[str, float]) -> PrunePlan:
        """PrunePlan for kept counts (a list, one per searched group) or prune ratios (a dict, space.ratios')."""
        counts = self.kept_from_ratios(kept) if isinstance(kept, dict) else [int(k) for k in kept]
        if len(counts) != self.space.size:
            raise InputError(f"selection: {len(counts)} kept counts for {self.space.size} groups")
        keep = {}
        for g, (name, k) in enumerate(zip(self.space.groups, counts)):
            if k >= self.space.channels[g]:
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
