"""The data-free Gaussian model of a site's activations: E[f(y)] and Cov[f(y)] from weights and BN statistics.

Pre-activations y are Gaussian with the BN's output mean β and std |γ|, correlated as their folded filters' cosines.
E[f(y)] is closed form for ReLU (m Φ(m/s) + s φ(m/s)) and ReLU6; E[f(y_i) f(y_j)] integrates the conditional mean
E[f(y_j) | y_i] over a fixed 1-D quadrature grid. A depthwise stage is a second Gaussian layer on top
(docs/methods/reconstruction.md, method 3).
"""

from __future__ import annotations

import collections
import hashlib
import math
from dataclasses import dataclass

import torch

from dfp_deploy.compress.repair.sites import SiteTensors

_QUAD_NODES = 161


_QUAD_Z = 7.0


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _Phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _relu_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[max(N(m, s²), 0)] = m Φ(m/s) + s φ(m/s)."""
    h = mean / std
    return mean * _Phi(h) + std * _phi(h)


def gaussian_activation_mean(mean: torch.Tensor, std: torch.Tensor, activation: str) -> torch.Tensor:
    """E[f(y)] for y ~ N(mean, std²): relu, relu6 (= relu(y) − relu(y − 6)) or identity."""
    std = std.clamp_min(1e-12)
    if activation == "relu":
        return _relu_mean(mean, std)
    if activation == "relu6":
        return _relu_mean(mean, std) - _relu_mean(mean - 6.0, std)
    return mean.clone()


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return y.clamp_min(0.0)
    if activation == "relu6":
        return y.clamp(0.0, 6.0)
    return y


def activation_moments(mean: torch.Tensor, std: torch.Tensor, corr: torch.Tensor, activation: str,
                       chunk: int = 64, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[a] [V], Cov[a] [V, V]) for a = f(y), y Gaussian with the given means, stds and correlation matrix.
    E[a_i a_j] = E_{z}[f(m_i + s_i z) · E[f(y_j) | z]] with y_j | z ~ N(m_j + s_j ρ_ij z, s_j²(1 − ρ_ij²)),
    integrated over z ~ N(0, 1) on a fixed grid (pairwise Gaussian: only bivariate marginals matter).
    Row by row, over the grid nodes where f(m_i + s_i z) ≠ 0 only (the others contribute exact zeros): the same
    sums as the dense [V, V, nodes] form up to summation order, about 5× faster at V = 300 and small enough to stay
    in cache (EfficientNet-Lite0 groups have up to 1152 channels). `chunk` is kept for compatibility (unused).
    Results are memoised on the inputs' bytes (select_plan and lmmse ask for the same moments repeatedly).
    `active` (bool [V]): only pairs of active variables get their covariance; the others get their mean and
    variance only (off-diagonal 0): the entries that are computed are the same as without it."""
    mean, std = mean.detach().double(), std.detach().double().clamp_min(1e-12)
    corr = corr.detach().double().clamp(-1.0, 1.0)
    key = _moments_key(mean, std, corr, activation, active)
    cached = _MOMENTS_CACHE.get(key)
    if cached is not None:
        _MOMENTS_CACHE.move_to_end(key)
        return cached[0].clone(), cached[1].clone()
    z = torch.linspace(-_QUAD_Z, _QUAD_Z, _QUAD_NODES, dtype=torch.float64)
    weight = _phi(z)
    weight = weight / weight.sum()
    expect = gaussian_activation_mean(mean, std, activation)
    count = len(mean)
    second = torch.empty(count, count, dtype=torch.float64)
    outer_all = apply_activation(mean[:, None] + std[:, None] * z[None, :], activation)  # [V, nodes]
    every = torch.arange(len(z))
    cols = torch.arange(count) if active is None else active.nonzero().squeeze(1)
    second.zero_()
    m_c, s_c = mean[cols], std[cols]
    for i in cols.tolist():
        outer = outer_all[i]
        nodes = every if activation == "identity" else (outer != 0).nonzero().squeeze(1)
        if len(nodes) == 0:
            continue
        rho = corr[i, cols].clamp(-1.0 + 1e-9, 1.0 - 1e-9)
        cond_mean = m_c[:, None] + (s_c * rho)[:, None] * z[nodes][None, :]
        cond_std = (s_c * torch.sqrt(1.0 - rho * rho))[:, None].expand(-1, len(nodes))
        inner = gaussian_activation_mean(cond_mean, cond_std, activation)  # [V, nodes_i]
        second[i, cols] = inner @ (outer[nodes] * weight[nodes])
    exact_square = (weight * apply_activation(mean[:, None] + std[:, None] * z, activation) ** 2).sum(dim=-1)
    second.diagonal().copy_(exact_square)
    cov = second - expect[:, None] * expect[None, :]
    cov = 0.5 * (cov + cov.T)
    if active is not None:
        pair = active[:, None] & active[None, :]
        pair.diagonal().fill_(True)
        cov = torch.where(pair, cov, torch.zeros_like(cov))
    _MOMENTS_CACHE[key] = (expect, cov)
    while len(_MOMENTS_CACHE) > _MOMENTS_CACHE_SIZE:
        _MOMENTS_CACHE.popitem(last=False)
    return expect.clone(), cov.clone()


_MOMENTS_CACHE: "collections.OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]]" = collections.OrderedDict()


_MOMENTS_CACHE_SIZE = 48


def _moments_key(mean: torch.Tensor, std: torch.Tensor, corr: torch.Tensor, activation: str,
                 active: torch.Tensor | None) -> tuple:
    digest = hashlib.blake2b(digest_size=16)
    for t in (mean, std, corr) + (() if active is None else (active,)):
        digest.update(t.detach().contiguous().numpy().tobytes())
    return activation, len(mean), digest.hexdigest()



@dataclass
class Moments:
    """Activation moments of the variables [original channels 0..C−1, deployed kept channels]."""

    mean: torch.Tensor
    cov: torch.Tensor
    channels: int
    deployed: list[int]  # variable index of each kept channel's deployed activation


def site_moments(st: SiteTensors, keep: list[int], activation: str, lmmse_only: bool = False) -> Moments:
    """Gaussian model of the site's activations (module docstring, method 3). lmmse_only: when quantizing, the
    covariances lmmse reads only (pruned originals and deployed kept channels; the original kept channels get
    means and variances), which is C instead of C + K variables."""
    channels = st.w.shape[0]
    k = torch.as_tensor(keep, dtype=torch.long)
    quantized = st.w_q is not None
    filters = torch.cat([st.w, st.w_q[k]]) if quantized else st.w
    norm = st.w.norm(dim=1).clamp_min(1e-300)
    mean = torch.cat([st.mean, st.mean[k]]) if quantized else st.mean
    std = torch.cat([st.std, st.std[k] * st.w_q[k].norm(dim=1) / norm[k]]) if quantized else st.std
    corr = cosine_gram(filters)
    deployed = list(range(channels, channels + len(keep))) if quantized else list(keep)
    active = None
    if quantized and lmmse_only:
        active = torch.ones(len(mean), dtype=torch.bool)
        active[k] = False
    expect, cov = activation_moments(mean, std, corr, activation, active=active)
    if st.dw is None:
        return Moments(expect, cov, channels, deployed)
    # second stage: dw kernel, BN, activation (spatially white activations: cov(κ_i⊛a_i, κ_j⊛a_j) = ⟨κ_i,κ_j⟩ C_ij)
    kernels = torch.cat([st.dw, st.dw_q[k] if st.dw_q is not None else st.dw[k]]) if quantized else st.dw
    sd1 = cov.diagonal().clamp_min(1e-300).sqrt()
    corr2 = cosine_gram(kernels) * cov / sd1[:, None] / sd1[None, :]
    corr2.diagonal().fill_(1.0)
    mean2 = torch.cat([st.dw_mean, st.dw_mean[k]]) if quantized else st.dw_mean
    std2 = st.dw_std
    if quantized:
        # deployed dw output spread relative to the original: kernel norm ratio × stage-1 spread ratio
        ratio = (kernels[channels:].norm(dim=1) / st.dw[k].norm(dim=1).clamp_min(1e-300)
                 * sd1[channels:] / sd1[k].clamp_min(1e-300))
        std2 = torch.cat([st.dw_std, st.dw_std[k] * ratio])
    expect2, cov2 = activation_moments(mean2, std2, corr2, activation, active=active)
    return Moments(expect2, cov2, channels, deployed)


def cosine_gram(rows: torch.Tensor) -> torch.Tensor:
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)
    gram = unit @ unit.T
    gram.diagonal().fill_(1.0)
    return gram
