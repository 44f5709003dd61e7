"""Choose channels by lmmse reconstruction error: keep the set from which the rest are best re-expressed.

E(K) = tr(G·(C − C_{:,K} C_KK^{-1} C_{K,:})), G = Σ_consumers Σ_taps W'ᵀW' (consumer-output error after lmmse
repair, C the activations' covariance: data-free from the Gaussian model, or measured). Greedy backward elimination
minimises it; nested kept sets make one path serve every count (docs/methods/reconstruction.md, "Channel selection").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.compress.bnfold import bn_scale_shift
from dfp_deploy.compress.quantize.weights import bits_lookup
from dfp_deploy.compress.repair.moments import site_moments
from dfp_deploy.compress.repair.sites import Site, find_site, position_channels, site_tensors
from dfp_deploy.compress.select.plan import kept_count
from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import PrunePlan

_BN = nn.modules.batchnorm._BatchNorm

BUDGETS = ("uniform", "macs")


def consumer_gram(model: nn.Module, analysis: Analysis, site: Site, channels: int) -> torch.Tensor:
    """G [C, C] = Σ_consumers Σ_taps W'_tᵀ W'_t over the group's input positions, rows scaled by the consumer's
    BN γ/σ when one follows (errors are then measured in the units the next block adds to its stream)."""
    modules = dict(model.named_modules())
    gram = torch.zeros(channels, channels, dtype=torch.float64)
    for consumer, mapping in site.consumers.items():
        weight = modules[consumer].weight.detach().double()
        weight = weight.reshape(weight.shape[0], weight.shape[1], -1)
        bn = modules.get(analysis.bn_after.get(consumer, ""))
        if isinstance(bn, _BN) and bn.running_var is not None:
            weight = weight * bn_scale_shift(bn)[0].abs()[:, None, None]
        occurrence: dict[int, int] = {}
        columns: dict[tuple[int, int], int] = {}
        for position, channel in position_channels(mapping):
            level = occurrence.get(channel, 0)
            occurrence[channel] = level + 1
            columns[(channel, level)] = position
        levels = max(occurrence.values(), default=0)
        for level in range(levels):
            idx = [(c, columns[(c, level)]) for c in range(channels) if (c, level) in columns]
            ch = torch.as_tensor([c for c, _ in idx], dtype=torch.long)
            pos = torch.as_tensor([p for _, p in idx], dtype=torch.long)
            block = weight[:, pos, :]  # [out, n, taps]
            gram[ch[:, None], ch[None, :]] += torch.einsum("oit,ojt->ij", block, block)
    return gram


def site_error_path(model: nn.Module, analysis: Analysis, site: Site, sizes: list[int],
                    normalise: bool = True, measured: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> dict[int, tuple]:
    """{kept count: (kept channels, E / tr(GC))} along the greedy lmmse elimination path, for the given sizes
    (E itself with normalise=False). `measured` = (mean, covariance) of the site's activations measured on images
    (select/measured.py) replaces the data-free Gaussian model's covariance."""
    channels = analysis.group(site.group).channels
    if measured is not None:
        cov = measured[1]
    else:
        st = site_tensors(dict(model.named_modules()), site, bits_lookup(None, None))
        cov = site_moments(st, list(range(channels)), site.activation).cov
    gram = consumer_gram(model, analysis, site, channels)
    total = float((gram * cov).sum())
    path = greedy_elimination(cov, gram, sizes)
    if not normalise:
        return {len(k): (k, err) for k, err in path}
    return {len(k): (k, err / total if total > 0 else 0.0) for k, err in path}


def greedy_elimination(cov: torch.Tensor, gram: torch.Tensor, sizes: list[int],
                       step_fraction: float = 0.02, refresh: int = 64) -> list[tuple[list[int], float]]:
    """Backward elimination: [(kept channels, E(kept))] for each kept count in `sizes` (largest first).
    Maximises F(K) = tr(C_KK^{-1} H_KK), H = C G C (E = tr(GC) − F). With B = C_KK^{-1} and P = B H_KK, removing j
    lowers F by (P B)_jj / B_jj (the block inverse of C_KK without j is B' = B_{−j,−j} − B_{−j,j} B_{j,−j} / B_jj,
    so P' = P_{−j,−j} − B_{−j,j} P_{j,−j} / B_jj and tr P' = tr P − (PB)_jj / B_jj). B and P are downdated in
    O(K²) per removal and recomputed from scratch every `refresh` removals (round-off); E = tr(GC) − tr P.
    Each step removes the channel with the smallest drop; large groups remove up to `step_fraction` of their
    channels per step (smallest drops first) to bound the cost, never stepping over a requested size."""
    stops = sorted(set(sizes), reverse=True)
    c = cov.shape[0]
    keep = list(range(c))
    out = [(list(keep), 0.0)] if c in stops else []
    h = cov @ gram @ cov
    total = float((gram * cov).sum())
    b = p = None
    since = refresh
    for stop in [s for s in stops if s < c]:
        while len(keep) > stop:
            if since >= refresh:
                idx = torch.as_tensor(keep, dtype=torch.long)
                ckk = cov[idx][:, idx]
                ckk = ckk + 1e-9 * ckk.diagonal().mean().clamp_min(1e-300) * torch.eye(len(keep), dtype=cov.dtype)
                b = torch.linalg.inv(ckk)
                b = 0.5 * (b + b.T)
                p = b @ h[idx][:, idx]
                since = 0
            bjj = b.diagonal().clamp_min(1e-300)
            drop = (p * b).sum(dim=1) / bjj
            count = max(1, min(len(keep) - stop, int(len(keep) * step_fraction)))
            order = torch.argsort(drop, stable=True)[:count]
            for j in sorted((int(i) for i in order), reverse=True):
                rest = torch.cat([torch.arange(j), torch.arange(j + 1, len(keep))])
                u = b[rest, j]
                beta = b[j, j] if float(b[j, j]) != 0.0 else torch.tensor(1e-300, dtype=b.dtype)
                p = p[rest][:, rest] - torch.outer(u, p[j, rest]) / beta
                b = b[rest][:, rest] - torch.outer(u, u) / beta
                del keep[j]
                since += 1
        out.append((list(keep), total - float(p.diagonal().sum())))
    return out


def select_plan(model: nn.Module, analysis: Analysis, *, ratio: float, budget: str = "uniform",
                round_to: int = 1, min_channels: int = 1, max_ratio: float = 0.8,
                groups: list[str] | None = None, normalise: bool = True,
                measured: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                ) -> tuple[PrunePlan, dict[str, str]]:
    """Choose the kept channels of every compensable group by lmmse reconstruction error (module docstring).
    budget="uniform": each group keeps kept_count(C, ratio) channels. budget="macs": the same total MACs are
    removed, allocated across groups greedily by (normalised error increase) / (MACs saved), each group keeping at
    least C·(1 − max_ratio) channels; normalise=False compares the groups on ΔE itself (consumer-BN units) instead
    of ΔE / tr(GC). `measured` {group: (mean, covariance)}: activation statistics measured on images
    (select/measured.py) used instead of the data-free model for the groups it has.
    Returns (plan, {group: why it was left out}) for groups not compensable."""
    if budget not in BUDGETS:
        raise InputError(f"selection budget: {budget!r} is not one of {', '.join(BUDGETS)}")
    for what, value in (("ratio", ratio), ("max_ratio", max_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise InputError(f"prune {what}: {value!r} is not a number in [0, 1)")
    names = groups if groups is not None else [g.name for g in analysis.groups if g.prunable and not g.residual]
    sites, skipped = {}, {}
    for name in names:
        site, why = find_site(model, analysis, name)
        if site is None:
            skipped[name] = why
        else:
            sites[name] = site
    if ratio == 0 or not sites:
        return PrunePlan(), skipped
    measured = measured or {}
    targets = {n: kept_count(analysis.group(n).channels, ratio, round_to=round_to, min_channels=min_channels)
               for n in sites}
    if budget == "uniform":
        keep = {}
        for name, site in sites.items():
            channels = analysis.group(name).channels
            if targets[name] < channels:
                path = site_error_path(model, analysis, site, [targets[name]], measured=measured.get(name))
                keep[name] = tuple(sorted(path[targets[name]][0]))
        return PrunePlan(keep=keep), skipped
    return _macs_plan(model, analysis, sites, targets, round_to, min_channels, max_ratio, normalise,
                      measured), skipped


def _macs_plan(model, analysis, sites, targets, round_to, min_channels, max_ratio, normalise,
               measured) -> PrunePlan:
    paths, per_channel = {}, {}
    budget = 0.0
    for name, site in sites.items():
        group = analysis.group(name)
        c = group.channels
        floor = max(min_channels, math.ceil(c * (1.0 - max_ratio)))
        sizes = [c] + [k for k in range(c - 1, floor - 1, -1) if k % round_to == 0]
        paths[name] = site_error_path(model, analysis, site, sizes, normalise, measured.get(name))
        per_channel[name] = group.macs / c
        budget += (c - targets[name]) * per_channel[name]
    current = {name: analysis.group(name).channels for name in sites}
    saved = 0.0
    while saved < budget - 1e-6:
        best = None
        for name, path in paths.items():
            smaller = [k for k in path if k < current[name]]
            if not smaller:
                continue
            nxt = max(smaller)
            gain = (current[name] - nxt) * per_channel[name]
            cost = (path[nxt][1] - path[current[name]][1]) / gain
            if best is None or cost < best[0]:
                best = (cost, name, nxt, gain)
        if best is None:
            break
        _, name, nxt, gain = best
        current[name] = nxt
        saved += gain
    keep = {name: tuple(sorted(paths[name][k][0])) for name, k in current.items()
            if k < analysis.group(name).channels}
    return PrunePlan(keep=keep)
