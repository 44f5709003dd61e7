"""Data-free closed-form reconstruction: re-express pruned or quantized channels through the kept ones, in the next layer.

A compensable site is producer conv/linear → BN → activation f → [depthwise conv → BN → f] → consumers. If a pruned
channel's activation a_c ≈ Σ_k M[c,k]·a_k + d_c over the kept channels k, each consumer's new input column k is
Σ_c W'_c M[c,k] and Σ_c W'_c d_c goes into its bias; every method only chooses the mixing M (C × K) and d:
1. Neuron Merging: a_p = z·a_q exactly when the BN-folded filters are proportional; q by cosine and bias distance.
2. UDFC: s* = (⟨ŵ_p,ŵ_q⟩ + α b̂_p b̂_q)/(‖ŵ_q‖² + α b̂_q²) minimises the data-free bound
   ‖ŵ_p − s ŵ_q‖² + α(b̂_p − s b̂_q)²; the vector form takes s ≥ 0 over several partners by NNLS; a quantized
   kept channel gets its own rescale s'*; merges into quantized consumers are guarded against widening their
   rounding grid (`guard_merges`).
3. lmmse: M = C_{a,â_K} C_{â_K â_K}^{-1}, d = E[a] − M E[â_K] under a Gaussian model from weights and BN statistics
   (moments by 1-D quadrature); quantized convs are bias-corrected.
Channel selection (`select_plan`) eliminates greedily the channel whose loss raises the consumers' lmmse error
E(K) = tr(G·(C − C_{:,K} C_KK^{-1} C_{K,:})) least. `find_site` decides where compensation is valid (residual
groups never; ReLU6 merges approximate; depthwise sites through both stages).

The derivations, error bounds, validity conditions and the measurements that chose α, α', the merge threshold and
the grid guard are in docs/methods/reconstruction.md.
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.compress.bnfold import bn_output_moments, bn_scale_shift, folded_filters
from dfp_deploy.compress.quantize import check_bits, quantize_weight, quantize_weight_hessian
from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import PrunePlan

METHODS = ("none", "neuron_merging", "udfc", "lmmse")
DEFAULT_ALPHA = 0.01
DEFAULT_ALPHA_Q = 1.0
NM_THRESHOLD = 0.1
NM_LAMBDA = 0.85
MERGE_GRID_GROWTH = 1.0  # guard_merges: a merge may at most double a quantized consumer row's grid (docstring 2b)
SPATIAL_RHO_DEFAULT = 0.8  # input model: correlation of neighbouring pixels (natural images), chosen on train images
_PATH_OK = {"bn", "relu", "relu6", "depthwise", "pool", "flatten", "pad"}
_BN = nn.modules.batchnorm._BatchNorm
_DENSE = (nn.modules.conv._ConvNd, nn.Linear)
_QUAD_NODES = 161
_QUAD_Z = 7.0

# =================================================================================================================
# pure tensor math (float64 everywhere; filters are rows of a [C, D] matrix)
# =================================================================================================================


def nm_scale_from_raw(raw_ratio: float, gamma_p: float, sigma_p: float, gamma_q: float, sigma_q: float) -> float:
    """Neuron Merging's z for W_p = raw_ratio·W_q: z = raw_ratio·γ_p·σ_q/(γ_q·σ_p) (σ = sqrt(var + eps))."""
    return raw_ratio * gamma_p * sigma_q / (gamma_q * sigma_p)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_i, b_j) for rows of a [P, D] and b [K, D] (0 where a row is all zero)."""
    na = a.norm(dim=1).clamp_min(1e-300)
    nb = b.norm(dim=1).clamp_min(1e-300)
    return (a @ b.T) / na[:, None] / nb[None, :]


def neuron_merging_partners(w_p, b_p, w_k, b_k, *, threshold: float = NM_THRESHOLD, lam: float = NM_LAMBDA,
                            stage2: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pruned row p: (partner index into the kept rows or −1, merge scale z). `stage2` = (κ_p, h_p, κ_k,
    h_k) for depthwise sites: both cosines must pass and z becomes z·‖κ_p‖/‖κ_k‖ (module docstring)."""
    cos = cosine_matrix(w_p, w_k)
    z = w_p.norm(dim=1)[:, None] / w_k.norm(dim=1).clamp_min(1e-300)[None, :]
    bias_gap = (b_p[:, None] - z * b_k[None, :]).abs()
    eligible = cos >= threshold
    if stage2 is not None:
        kp, hp, kk, hk = stage2
        cos2 = cosine_matrix(kp, kk)
        z = z * kp.norm(dim=1)[:, None] / kk.norm(dim=1).clamp_min(1e-300)[None, :]
        bias_gap = bias_gap + (hp[:, None] - z * hk[None, :]).abs()
        eligible &= cos2 >= threshold
    low = bias_gap.min(dim=1, keepdim=True).values
    high = bias_gap.max(dim=1, keepdim=True).values
    gap = (bias_gap - low) / (high - low).clamp_min(1e-300)
    score = lam * (1.0 - cos) + (1.0 - lam) * gap
    score = torch.where(eligible & (z > 0), score, torch.full_like(score, math.inf))
    best = score.argmin(dim=1)
    ok = torch.isfinite(score.gather(1, best[:, None]).squeeze(1))
    partner = torch.where(ok, best, torch.full_like(best, -1))
    scale = torch.where(ok, z.gather(1, best[:, None]).squeeze(1), torch.zeros(len(best), dtype=z.dtype))
    return partner, scale


def udfc_vectors(w: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Rows [ŵ_c, √α·b̂_c]: ℓ_p(s) = ‖v_p − s v_q‖² in these coordinates."""
    return torch.cat([w, math.sqrt(alpha) * b[:, None]], dim=1)


def udfc_prune_partners(v_p: torch.Tensor, v_k: torch.Tensor,
                        stage2: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UDFC single-partner merge for every pruned row: (partner or −1, scale, loss). v_* from udfc_vectors.
    `stage2` = (κ_p, h_p, κ_k, h_k, α) of a depthwise site: after a_p ≈ s·a_q, the dw stage needs
    f(s κ_p⊛a_q + h_p) ≈ t·f(κ_q⊛a_q + h_q), bounded by ‖s κ_p − t κ_q‖² + α (h_p − t h_q)²; the loss adds its
    minimum and the returned scale is its minimiser t* = (s⟨κ_p,κ_q⟩ + α h_p h_q) / (‖κ_q‖² + α h_q²)."""
    dot = v_p @ v_k.T
    norm_k = (v_k * v_k).sum(dim=1).clamp_min(1e-300)
    s = dot / norm_k[None, :]
    loss = (v_p * v_p).sum(dim=1)[:, None] - dot * s
    scale = s
    if stage2 is not None:
        k_p, h_p, k_k, h_k, alpha = stage2
        num = s * (k_p @ k_k.T) + alpha * h_p[:, None] * h_k[None, :]
        den = ((k_k * k_k).sum(dim=1) + alpha * h_k * h_k).clamp_min(1e-300)
        t = num / den[None, :]
        start = s * s * (k_p * k_p).sum(dim=1)[:, None] + alpha * (h_p * h_p)[:, None]
        loss = loss + start - num * t
        scale = torch.where(s > 0, t, s)
    plain = (v_p * v_p).sum(dim=1)
    loss = torch.where((s > 0) & (scale > 0), loss, torch.full_like(loss, math.inf))
    best = loss.argmin(dim=1)
    best_loss = loss.gather(1, best[:, None]).squeeze(1)
    ok = torch.isfinite(best_loss)
    partner = torch.where(ok, best, torch.full_like(best, -1))
    return (partner, torch.where(ok, scale.gather(1, best[:, None]).squeeze(1), torch.zeros_like(plain)),
            torch.where(ok, best_loss, plain))


def udfc_quant_scales(w: torch.Tensor, w_q: torch.Tensor, b: torch.Tensor, alpha_q: float) -> torch.Tensor:
    """s'* = (⟨ŵ, Q(ŵ)⟩ + α' b̂²) / (‖Q(ŵ)‖² + α' b̂²) per row (1 for an all-zero row with zero bias)."""
    num = (w * w_q).sum(dim=1) + alpha_q * b * b
    den = (w_q * w_q).sum(dim=1) + alpha_q * b * b
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num))


def guard_merges(mixing: torch.Tensor, keep: list[int], consumers: list[torch.Tensor], priority: torch.Tensor,
                 growth: float) -> torch.Tensor:
    """Undo the merges that would coarsen a quantized consumer's rounding grid (module docstring, 2b).

    `consumers`: the quantized consumers' weights as [O, C, T] in group channel order; `priority` [C]: the order in
    which pruned rows are considered (largest first). A consumer row o is rounded on the grid max_j |W_new[o, j]|/qmax;
    the merge of pruned row p adds W[:, p]·M[p, k] to the kept columns k. It is kept only if every changed column stays
    within (1 + growth) × the row's maximum without merges, so the merges that are kept leave every grid within that
    factor and the rounding of the other weights as it was. growth = inf keeps every merge."""
    if math.isinf(growth) or not consumers:
        return mixing
    kept = set(keep)
    pruned = [c for c in range(mixing.shape[0]) if c not in kept]
    base = torch.zeros_like(mixing)
    base[torch.as_tensor(keep, dtype=torch.long)] = mixing[torch.as_tensor(keep, dtype=torch.long)]
    current = [torch.einsum("oct,ck->okt", w, base) for w in consumers]
    limits = [(1.0 + growth) * cur.abs().amax(dim=(1, 2)) for cur in current]
    guarded = base.clone()
    for p in sorted(pruned, key=lambda c: -float(priority[c])):
        cols = torch.nonzero(mixing[p]).flatten()
        if cols.numel() == 0:
            continue
        trial = [cur[:, cols] + w[:, p, None, :] * mixing[p, cols][None, :, None]
                 for cur, w in zip(current, consumers)]
        if all(bool((t.abs().amax(dim=(1, 2)) <= lim).all()) for t, lim in zip(trial, limits)):
            for cur, t in zip(current, trial):
                cur[:, cols] = t
            guarded[p] = mixing[p]
    return guarded


def nnls_rows(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """min_s ½ sᵀ A s − rᵀ s subject to s ≥ 0, for every row r of `rhs` [P, K] (A = `gram` [K, K], PSD):
    Lawson–Hanson active set on the normal equations, exact up to round-off."""
    return torch.stack([_nnls(gram, row) for row in rhs]) if len(rhs) else rhs.clone()


def _nnls(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    k = len(rhs)
    tol = 1e-12 * (float(gram.diagonal().abs().max()) + float(rhs.abs().max()) + 1e-300)
    jitter = 1e-12 * float(gram.diagonal().abs().max() + 1e-300) * torch.eye(k, dtype=gram.dtype)
    x = torch.zeros_like(rhs)
    passive = torch.zeros(k, dtype=torch.bool)
    for _ in range(3 * k + 10):
        grad = rhs - gram @ x
        candidates = torch.where(passive, torch.full_like(grad, -math.inf), grad)
        if float(candidates.max()) <= tol:
            break
        passive[int(candidates.argmax())] = True
        for _ in range(3 * k + 10):
            idx = passive.nonzero().squeeze(1)
            z = torch.zeros_like(rhs)
            z[idx] = torch.linalg.solve(gram[idx][:, idx] + jitter[:len(idx), :len(idx)], rhs[idx])
            if bool((z[idx] > 0).all()):
                x = z
                break
            bad = idx[z[idx] <= 0]
            step = torch.min(x[bad] / (x[bad] - z[bad]).clamp_min(1e-300))
            x = x + step * (z - x)
            passive &= x > tol
            x = torch.where(passive, x, torch.zeros_like(x))
    return x


# --- Gaussian activation moments ----------------------------------------------------------------------------------

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


def lmmse_mixing(cov_cross: torch.Tensor, cov_kept: torch.Tensor, mean_all: torch.Tensor,
                 mean_kept: torch.Tensor, jitter: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """M = C_{a,â} C_{ââ}^{-1} [C, K] and d = E[a] − M E[â] [C]: the best affine estimate of a from â."""
    k = cov_kept.shape[0]
    scale = cov_kept.diagonal().mean().clamp_min(1e-300)
    regular = cov_kept + jitter * scale * torch.eye(k, dtype=cov_kept.dtype)
    mixing = torch.linalg.solve(regular, cov_cross.T).T
    return mixing, mean_all - mixing @ mean_kept


def residual_error(cov: torch.Tensor, gram: torch.Tensor, keep: list[int], jitter: float = 1e-9) -> float:
    """E(K) = tr(G (C − C_{:,K} C_KK^{-1} C_{K,:})): consumer-output MSE left after lmmse reconstruction."""
    if not keep:
        return float((gram * cov).sum())
    idx = torch.as_tensor(keep, dtype=torch.long)
    ckk = cov[idx][:, idx]
    ckk = ckk + jitter * ckk.diagonal().mean().clamp_min(1e-300) * torch.eye(len(keep), dtype=cov.dtype)
    explained = cov[:, idx] @ torch.linalg.solve(ckk, cov[idx, :])
    return float((gram * (cov - explained)).sum())


# =================================================================================================================
# sites: where compensation is valid
# =================================================================================================================


@dataclass(frozen=True)
class Site:
    """A compensable group (module docstring, 'Validity'). Index tuples give, for each group channel, the row /
    channel of that module holding it."""

    group: str
    producer: str
    rows: tuple[int, ...]
    bn: str
    bn_index: tuple[int, ...]
    activation: str
    consumers: dict[str, list[int]] = field(default_factory=dict)
    depthwise: str | None = None
    dw_index: tuple[int, ...] = ()
    dw_bn: str | None = None
    dw_bn_index: tuple[int, ...] = ()


def find_site(model: nn.Module, analysis: Analysis, group: str) -> tuple[Site | None, str]:
    """(Site, "") if closed-form compensation is valid for `group`, else (None, why not)."""
    g = analysis.group(group)
    members = analysis.members(group)
    modules = dict(model.named_modules())
    if not g.prunable:
        return None, f"not prunable ({g.reason})"
    if g.residual:
        return None, "tied across a residual add: the skip path cannot be compensated"
    if len(members.producers) != 1:
        return None, f"{len(members.producers)} producers"
    bad = [op for op in g.path_ops if op not in _PATH_OK]
    if bad:
        return None, f"non-compensable op(s) on the path: {', '.join(bad)}"
    if "relu" in g.path_ops and "relu6" in g.path_ops:
        return None, "mixes relu and relu6"
    activation = "relu6" if "relu6" in g.path_ops else "relu" if "relu" in g.path_ops else "identity"
    (producer, rows), = members.producers.items()
    prod = modules[producer]
    if not isinstance(prod, _DENSE) or getattr(prod, "groups", 1) != 1:
        return None, "producer is not a dense conv/linear"
    bn = analysis.bn_after.get(producer)
    if bn is None or bn not in members.passthrough:
        return None, "no BatchNorm right after the producer (no statistics to reason with)"
    if any(not isinstance(modules[c], _DENSE) or getattr(modules[c], "groups", 1) != 1 for c in members.consumers):
        return None, "a consumer is not a dense conv/linear"
    if not members.consumers:
        return None, "no consumer"
    channel_rows = _inverse(rows, g.channels)
    bn_index = _inverse(members.passthrough[bn], g.channels)
    if channel_rows is None or bn_index is None:
        return None, "producer/BN rows do not map one-to-one onto the group channels"
    others = [n for n in members.passthrough if n != bn]
    dw, dw_bn = _depthwise_chain(modules, others)
    if others and dw is None:
        return None, "unsupported per-channel modules on the path: " + ", ".join(others)
    site = Site(group, producer, channel_rows, bn, bn_index, activation, dict(members.consumers))
    if dw is not None:
        dw_index = _inverse(members.passthrough[dw], g.channels)
        dw_bn_index = _inverse(members.passthrough[dw_bn], g.channels)
        if dw_index is None or dw_bn_index is None:
            return None, "depthwise rows do not map one-to-one onto the group channels"
        site = Site(group, producer, channel_rows, bn, bn_index, activation, dict(members.consumers),
                    dw, dw_index, dw_bn, dw_bn_index)
    return site, ""


def _inverse(mapping: list[int], channels: int) -> tuple[int, ...] | None:
    """Position of each group channel in `mapping` (None unless every channel appears exactly once)."""
    where = [-1] * channels
    for position, channel in enumerate(mapping):
        if channel >= 0:
            if where[channel] != -1:
                return None
            where[channel] = position
    return None if -1 in where else tuple(where)


def _depthwise_chain(modules: dict[str, nn.Module], others: list[str]) -> tuple[str | None, str | None]:
    """(depthwise conv, its BN) when the other passthrough modules are exactly those two, in that order."""
    if len(others) != 2:
        return None, None
    dw, bn = others
    conv = modules[dw]
    ok = (isinstance(conv, nn.modules.conv._ConvNd) and conv.groups == conv.in_channels == conv.out_channels
          and isinstance(modules[bn], _BN) and modules[bn].running_var is not None)
    return (dw, bn) if ok else (None, None)


# =================================================================================================================
# per-site quantities
# =================================================================================================================


@dataclass
class _SiteTensors:
    """Everything the methods need about one site, in group channel order (float64)."""

    w: torch.Tensor            # ŵ [C, D]
    b: torch.Tensor            # b̂ [C]
    w_q: torch.Tensor | None   # Q(ŵ) [C, D] when quantizing
    mean: torch.Tensor         # BN output mean β [C]
    std: torch.Tensor          # BN output std |γ| [C]
    dw: torch.Tensor | None = None     # BN-folded dw kernels κ̂ [C, k]
    dw_q: torch.Tensor | None = None   # BN-folded quantized dw kernels
    dw_b: torch.Tensor | None = None   # dw folded bias h [C]
    dw_mean: torch.Tensor | None = None
    dw_std: torch.Tensor | None = None


def _site_tensors(modules: dict[str, nn.Module], site: Site, bits_of: Callable[[str], int | None]) -> _SiteTensors:
    prod = modules[site.producer]
    bn = modules[site.bn]
    rows = torch.as_tensor(site.rows, dtype=torch.long)
    bn_idx = torch.as_tensor(site.bn_index, dtype=torch.long)
    weight = prod.weight.detach()
    scale, shift = bn_scale_shift(bn)
    raw = weight.double().reshape(weight.shape[0], -1)[rows]
    bias = prod.bias.detach().double()[rows] if prod.bias is not None else torch.zeros(len(rows), dtype=torch.float64)
    w = scale[bn_idx, None] * raw
    b = scale[bn_idx] * bias + shift[bn_idx]
    w_q = None
    if (bits := bits_of(site.producer)) is not None:
        w_q = scale[bn_idx, None] * quantize_weight(weight, bits).double().reshape(weight.shape[0], -1)[rows]
    mean, std = bn_output_moments(bn)
    st = _SiteTensors(w, b, w_q, mean[bn_idx], std[bn_idx])
    if site.depthwise is not None:
        conv, dbn = modules[site.depthwise], modules[site.dw_bn]
        dw_idx = torch.as_tensor(site.dw_index, dtype=torch.long)
        dbn_idx = torch.as_tensor(site.dw_bn_index, dtype=torch.long)
        kernels, kbias = folded_filters(conv.weight, conv.bias, None)
        dscale, dshift = bn_scale_shift(dbn)
        st.dw = dscale[dbn_idx, None] * kernels[dw_idx]
        st.dw_b = dscale[dbn_idx] * kbias[dw_idx] + dshift[dbn_idx]
        if (bits := bits_of(site.depthwise)) is not None:
            qk = quantize_weight(conv.weight, bits).double().reshape(conv.weight.shape[0], -1)
            st.dw_q = dscale[dbn_idx, None] * qk[dw_idx]
        st.dw_mean, st.dw_std = (t[dbn_idx] for t in bn_output_moments(dbn))
    return st


def _selection(channels: int, keep: list[int]) -> torch.Tensor:
    m = torch.zeros(channels, len(keep), dtype=torch.float64)
    m[torch.as_tensor(keep, dtype=torch.long), torch.arange(len(keep))] = 1.0
    return m


def _pruned(channels: int, keep: list[int]) -> list[int]:
    kept = set(keep)
    return [c for c in range(channels) if c not in kept]


# --- method: Neuron Merging ---------------------------------------------------------------------------------------

def _nm_site(st: _SiteTensors, keep: list[int], threshold: float, lam: float) -> torch.Tensor:
    channels = st.w.shape[0]
    mixing = _selection(channels, keep)
    pruned = _pruned(channels, keep)
    if not pruned:
        return mixing
    p, k = torch.as_tensor(pruned), torch.as_tensor(keep)
    w_k = st.w_q[k] if st.w_q is not None else st.w[k]
    stage2 = None
    if st.dw is not None:
        dw_k = st.dw_q[k] if st.dw_q is not None else st.dw[k]
        stage2 = (st.dw[p], st.dw_b[p], dw_k, st.dw_b[k])
    partner, scale = neuron_merging_partners(st.w[p], st.b[p], w_k, st.b[k], threshold=threshold, lam=lam,
                                             stage2=stage2)
    for row, (q, z) in zip(pruned, zip(partner.tolist(), scale.tolist())):
        if q >= 0:
            mixing[row, q] = z
    return mixing


# --- method: UDFC --------------------------------------------------------------------------------------------------

def _udfc_site(st: _SiteTensors, keep: list[int], alpha: float, alpha_q: float, multi: bool) -> torch.Tensor:
    channels = st.w.shape[0]
    mixing = _selection(channels, keep)
    k = torch.as_tensor(keep)
    if st.w_q is not None and st.dw is None:
        s_prime = udfc_quant_scales(st.w[k], st.w_q[k], st.b[k], alpha_q)
        mixing[k, torch.arange(len(keep))] = s_prime
    pruned = _pruned(channels, keep)
    if not pruned:
        return mixing
    p = torch.as_tensor(pruned)
    w_k = st.w_q[k] if st.w_q is not None else st.w[k]
    v_p, v_k = udfc_vectors(st.w[p], st.b[p], alpha), udfc_vectors(w_k, st.b[k], alpha)
    if multi and st.dw is None:
        coeffs = nnls_rows(v_k @ v_k.T, v_p @ v_k.T)
        mixing[p] = coeffs
        return mixing
    stage2 = None
    if st.dw is not None:
        dw_k = st.dw_q[k] if st.dw_q is not None else st.dw[k]
        stage2 = (st.dw[p], st.dw_b[p], dw_k, st.dw_b[k], alpha)
    partner, scale, _ = udfc_prune_partners(v_p, v_k, stage2)
    for row, (q, s) in zip(pruned, zip(partner.tolist(), scale.tolist())):
        if q >= 0:
            mixing[row, q] = s
    return mixing


# --- method: lmmse --------------------------------------------------------------------------------------------------

@dataclass
class _Moments:
    """Activation moments of the variables [original channels 0..C−1, deployed kept channels]."""

    mean: torch.Tensor
    cov: torch.Tensor
    channels: int
    deployed: list[int]  # variable index of each kept channel's deployed activation


def _site_moments(st: _SiteTensors, keep: list[int], activation: str, lmmse_only: bool = False) -> _Moments:
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
    corr = _cosine_gram(filters)
    deployed = list(range(channels, channels + len(keep))) if quantized else list(keep)
    active = None
    if quantized and lmmse_only:
        active = torch.ones(len(mean), dtype=torch.bool)
        active[k] = False
    expect, cov = activation_moments(mean, std, corr, activation, active=active)
    if st.dw is None:
        return _Moments(expect, cov, channels, deployed)
    # second stage: dw kernel, BN, activation (spatially white activations: cov(κ_i⊛a_i, κ_j⊛a_j) = ⟨κ_i,κ_j⟩ C_ij)
    kernels = torch.cat([st.dw, st.dw_q[k] if st.dw_q is not None else st.dw[k]]) if quantized else st.dw
    sd1 = cov.diagonal().clamp_min(1e-300).sqrt()
    corr2 = _cosine_gram(kernels) * cov / sd1[:, None] / sd1[None, :]
    corr2.diagonal().fill_(1.0)
    mean2 = torch.cat([st.dw_mean, st.dw_mean[k]]) if quantized else st.dw_mean
    std2 = st.dw_std
    if quantized:
        # deployed dw output spread relative to the original: kernel norm ratio × stage-1 spread ratio
        ratio = (kernels[channels:].norm(dim=1) / st.dw[k].norm(dim=1).clamp_min(1e-300)
                 * sd1[channels:] / sd1[k].clamp_min(1e-300))
        std2 = torch.cat([st.dw_std, st.dw_std[k] * ratio])
    expect2, cov2 = activation_moments(mean2, std2, corr2, activation, active=active)
    return _Moments(expect2, cov2, channels, deployed)


def _cosine_gram(rows: torch.Tensor) -> torch.Tensor:
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)
    gram = unit @ unit.T
    gram.diagonal().fill_(1.0)
    return gram


def _lmmse_site(st: _SiteTensors, keep: list[int], activation: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor, torch.Tensor]:
    """(M [C, K], d [C], E[â_K], Cov[â_K]): pruned rows of M are the lmmse estimate from the deployed kept activations; a kept
    channel keeps its own column (M[k,k] = 1) and only gets the mean offset d_k = E[a_k] − E[â_k]. Measured: letting
    kept channels also mix (full lmmse) or rescale themselves (s' from the model) costs accuracy at 3 bits, because
    the cosine correlations are too rough to improve on a channel that is still present (bench/bench_reconstruct.py)."""
    mom = _site_moments(st, keep, activation, lmmse_only=True)
    c = mom.channels
    dep = torch.as_tensor(mom.deployed, dtype=torch.long)
    k = torch.as_tensor(keep, dtype=torch.long)
    mixing = _selection(c, keep)
    offset = torch.zeros(c, dtype=torch.float64)
    offset[k] = mom.mean[k] - mom.mean[dep]
    pruned = torch.as_tensor(_pruned(c, keep), dtype=torch.long)
    if len(pruned):
        rows, shift = lmmse_mixing(mom.cov[pruned][:, dep], mom.cov[dep][:, dep], mom.mean[pruned], mom.mean[dep])
        mixing[pruned], offset[pruned] = rows, shift
    return mixing, offset, mom.mean[dep], mom.cov[dep][:, dep]


# =================================================================================================================
# model level
# =================================================================================================================


@dataclass
class Reconstruction:
    """Per group: the mixing M [C, K], the offsets d [C] (constant per original channel, lmmse only) and the mean and
    covariance of the kept channels' deployed activations (lmmse only; the consumers' quantization uses them)."""

    mixing: dict[str, torch.Tensor] = field(default_factory=dict)
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)
    kept_means: dict[str, torch.Tensor] = field(default_factory=dict)
    kept_covs: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # group -> why it got plain selection


def check_method(method) -> str:
    if method not in METHODS:
        raise InputError(f"compress.reconstruct: {method!r} is not one of {', '.join(METHODS)}")
    return method


def build_reconstruction(model: nn.Module, analysis: Analysis, plan: PrunePlan, *, method: str,
                         weight_bits: int | None = None, alpha: float = DEFAULT_ALPHA,
                         alpha_q: float = DEFAULT_ALPHA_Q, nm_threshold: float = NM_THRESHOLD,
                         nm_lambda: float = NM_LAMBDA, multi: bool = False,
                         merge_grid_growth: float = MERGE_GRID_GROWTH,
                         groups: list[str] | None = None, layer_bits: dict[str, int] | None = None) -> Reconstruction:
    """Mixing (and lmmse offsets) for every planned group, and, when quantizing, every compensable group.
    `layer_bits` {module: bits} overrides weight_bits per module (only when weight_bits is set).
    `merge_grid_growth`: UDFC merges into quantized consumers are guarded by guard_merges with this growth."""
    check_method(method)
    bits = check_bits(weight_bits) if weight_bits is not None else None
    bits_of = _bits_lookup(bits, layer_bits)
    _check_positive("alpha", alpha)
    _check_positive("alpha_q", alpha_q)
    if isinstance(merge_grid_growth, bool) or not isinstance(merge_grid_growth, (int, float)) \
            or not merge_grid_growth >= 0:
        raise InputError(f"reconstruction merge_grid_growth: {merge_grid_growth!r} must be a number >= 0 (inf: off)")
    result = Reconstruction()
    if method == "none":
        return result
    modules = dict(model.named_modules())
    names = groups if groups is not None else [g.name for g in analysis.groups]
    for name in names:
        planned = name in plan.keep
        if not planned and bits is None:
            continue
        if not planned and method == "neuron_merging":
            continue  # NM has nothing to say about quantization
        site, why = find_site(model, analysis, name)
        if site is None:
            if analysis.group(name).prunable:
                result.skipped[name] = why
            continue
        channels = analysis.group(name).channels
        keep = sorted(plan.keep.get(name, range(channels)))
        if not planned and method == "udfc" and site.depthwise is not None:
            continue
        st = _site_tensors(modules, site, bits_of)
        if method in ("neuron_merging", "udfc"):
            mixing = (_nm_site(st, keep, nm_threshold, nm_lambda) if method == "neuron_merging"
                      else _udfc_site(st, keep, alpha, alpha_q, multi))
            if method == "udfc" and planned and bits is not None:
                mixing = _guarded(mixing, keep, modules, site, st, bits_of, merge_grid_growth)
            result.mixing[name] = mixing
        else:
            mixing, offset, kept_mean, kept_cov = _lmmse_site(st, keep, site.activation)
            result.mixing[name], result.offsets[name] = mixing, offset
            result.kept_means[name], result.kept_covs[name] = kept_mean, kept_cov
    return result


def _guarded(mixing: torch.Tensor, keep: list[int], modules: dict[str, nn.Module], site: Site, st: _SiteTensors,
             bits_of: Callable[[str], int | None], growth: float) -> torch.Tensor:
    """guard_merges over the site's quantized consumers, pruned rows in order of the energy they fed the consumers:
    Σ_consumers ‖W'_p‖² · E[y_p²] (y_p ~ N(mean, std²) at the BN the consumers see through the activation)."""
    channels = mixing.shape[0]
    weights = []
    for name, mapping in site.consumers.items():
        position = _inverse(mapping, channels)
        if bits_of(name) is None or position is None:
            continue  # not quantized, or a channel seen at several positions: nothing to guard / no column order
        w = modules[name].weight.detach().double()
        weights.append(w.reshape(w.shape[0], w.shape[1], -1)[:, torch.as_tensor(position, dtype=torch.long)])
    if not weights:
        return mixing
    mean, std = (st.dw_mean, st.dw_std) if st.dw is not None else (st.mean, st.std)
    priority = sum((w * w).sum(dim=(0, 2)) for w in weights) * (mean * mean + std * std)
    return guard_merges(mixing, keep, weights, priority, growth)


def _bits_lookup(bits: int | None, layer_bits: dict[str, int] | None) -> Callable[[str], int | None]:
    """module name → its weight bits: None everywhere when not quantizing, else the override or `bits`."""
    overrides = {name: check_bits(b, f"bits of layer {name}") for name, b in (layer_bits or {}).items()}
    return lambda name: None if bits is None else overrides.get(name, bits)


def build_mixing(model: nn.Module, analysis: Analysis, plan: PrunePlan, *, method: str,
                 weight_bits: int | None = None, alpha: float = DEFAULT_ALPHA,
                 alpha_q: float = DEFAULT_ALPHA_Q, **options) -> dict[str, torch.Tensor]:
    """mixing[group] = M [C, K] for prune_model (module docstring). lmmse's offsets need compress_model."""
    return build_reconstruction(model, analysis, plan, method=method, weight_bits=weight_bits, alpha=alpha,
                                alpha_q=alpha_q, **options).mixing


def _check_positive(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise InputError(f"reconstruction {what}: {value!r} must be a finite number >= 0")


def compress_model(model: nn.Module, analysis: Analysis, plan: PrunePlan, *, method: str,
                   weight_bits: int | None = None, alpha: float = DEFAULT_ALPHA, alpha_q: float = DEFAULT_ALPHA_Q,
                   bias_correction: bool | None = None, rounding: str | None = None,
                   spatial_rho: float = SPATIAL_RHO_DEFAULT, layer_bits: dict[str, int] | None = None,
                   **options) -> nn.Module:
    """Prune (plan), reconstruct (method) and fake-quantize (weight_bits) jointly; returns a new model.

    Order, and why: (1) every reconstruction is computed from the ORIGINAL model, with the producers' kept filters
    quantized, so merges land on the filters that will be deployed; (2) prune_model folds the mixing into the
    consumers and lmmse's constant offsets go into their biases; (3) all conv/linear weights are quantized, the
    consumers AFTER their compensation (quantizing first would leave the compensation itself unquantized), by
    round-to-nearest or, with rounding="hessian", by Hessian-aware rounding with the data-free input model below;
    (4) with bias_correction, each quantized layer's mean output shift (Q(W) − W)·E[x] is removed using the same
    input means. Defaults: lmmse uses both (3, hessian) and (4); the other methods neither (as published).
    `layer_bits` {module name: bits} gives some layers other bits than weight_bits (quantize.edge_layers at 8 is
    the usual low-bit mixed precision); steps (1) and (3) use each module's own bits.
    A producer that is itself the consumer of another compensated group (a chain) is modelled with its original
    filters' quantization, an approximation (ResNets have no such chain; EfficientNet-Lite0 has one: stem → block 0's
    projection, whose own pruned output rows the offsets follow)."""
    from dfp_deploy.compress.prune import prune_model

    check_method(method)
    bits = check_bits(weight_bits) if weight_bits is not None else None
    if bias_correction is None:
        bias_correction = method == "lmmse"
    rounding = rounding or ("hessian" if method == "lmmse" else "nearest")
    if rounding not in ROUNDINGS:
        raise InputError(f"weight rounding: {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    recon = build_reconstruction(model, analysis, plan, method=method, weight_bits=bits, alpha=alpha,
                                 alpha_q=alpha_q, layer_bits=layer_bits, **options)
    bits_of = _bits_lookup(bits, layer_bits)
    compressed = prune_model(model, analysis, plan, recon.mixing)
    original = dict(model.named_modules())
    modules = dict(compressed.named_modules())
    for name, offset in recon.offsets.items():
        _add_consumer_offsets(original, modules, analysis, name, offset, plan)
    if bits is None:
        return compressed
    if isinstance(spatial_rho, bool) or not isinstance(spatial_rho, (int, float)) or not 0 <= spatial_rho < 1:
        raise InputError(f"spatial_rho: {spatial_rho!r} is not a correlation in [0, 1)")
    needed = bias_correction or rounding == "hessian"
    inputs = _input_models(model, analysis, plan, recon, spatial_rho) if needed else {}
    with torch.no_grad():
        for name, module in modules.items():
            if not isinstance(module, _QUANTIZABLE_TYPES):
                continue
            full = module.weight.detach().clone()
            known = inputs.get(name)
            own = bits_of(name)
            if rounding == "hessian" and known is not None:
                hessian = _layer_hessian(module, *known, spatial_rho)
                module.weight.copy_(quantize_weight_hessian(full, own, hessian))
            else:
                module.weight.copy_(quantize_weight(full, own))
            if bias_correction and known is not None:
                _remove_output_shift(module, analysis.bn_after.get(name), modules, full, known[0])
    return compressed


ROUNDINGS = ("nearest", "hessian")


def spatial_correlation(kernel: tuple[int, ...], rho: float) -> torch.Tensor:
    """[T, T] correlation between the taps of a kernel: ρ^(Manhattan distance between taps)."""
    grids = torch.meshgrid(*[torch.arange(k, dtype=torch.float64) for k in kernel], indexing="ij")
    taps = torch.stack([g.reshape(-1) for g in grids], dim=1)
    return rho ** (taps[:, None, :] - taps[None, :, :]).abs().sum(dim=-1)


def _kernel(module: nn.Module) -> tuple[int, ...]:
    return tuple(module.kernel_size) if isinstance(module, nn.modules.conv._ConvNd) else (1,)


def _layer_hessian(module: nn.Module, mean: torch.Tensor, cov: torch.Tensor, rho: float) -> torch.Tensor:
    """H = E[x xᵀ] over input patches (input position-major, taps minor, as the weight is flattened):
    Cov_channels ⊗ S_spatial + (m mᵀ) ⊗ 1 1ᵀ (each channel's mean is the same at every tap). Depthwise convs get
    one [T, T] block per channel."""
    spatial = spatial_correlation(_kernel(module), rho)
    ones = torch.ones_like(spatial)
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        return cov.diagonal()[:, None, None] * spatial + (mean * mean)[:, None, None] * ones
    return torch.kron(cov, spatial) + torch.kron(mean[:, None] * mean[None, :], ones)


_QUANTIZABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def _position_channels(mapping: list[int]) -> list[tuple[int, int]]:
    """(input position, group channel) for the positions of a consumer that belong to the group."""
    return [(i, c) for i, c in enumerate(mapping) if c >= 0]


def _shift_output(module: nn.Module, bn_name: str | None, modules: dict[str, nn.Module], delta: torch.Tensor) -> None:
    """Add `delta` [out] to the module's output: through the BN after it, its bias, or a new bias."""
    delta = delta.to(module.weight.dtype)
    with torch.no_grad():
        if bn_name is not None and isinstance(modules.get(bn_name), _BN):
            bn = modules[bn_name]
            bn.running_mean -= delta.to(bn.running_mean.dtype)
        elif module.bias is not None:
            module.bias += delta
        else:
            module.bias = nn.Parameter(delta.clone(), requires_grad=module.weight.requires_grad)


def _add_consumer_offsets(original: dict[str, nn.Module], modules: dict[str, nn.Module], analysis: Analysis,
                          group: str, offset: torch.Tensor, plan: PrunePlan | None = None) -> None:
    """Σ_c W'_c d_c (over taps; exact away from zero padding) into each consumer's output. A consumer whose own
    output channels are pruned too (EfficientNet-Lite0: stem → block 0's projection, itself a planned group) gets
    the rows it keeps."""
    for consumer, mapping in analysis.members(group).consumers.items():
        weight = original[consumer].weight.detach().double()
        per_position = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(dim=2)  # [out, in]
        delta = torch.zeros(weight.shape[0], dtype=torch.float64)
        for position, channel in _position_channels(mapping):
            delta += per_position[:, position] * offset[channel]
        delta = delta[_kept_output_rows(analysis, plan, consumer, len(delta))]
        _shift_output(modules[consumer], analysis.bn_after.get(consumer), modules, delta)


def _kept_output_rows(analysis: Analysis, plan: PrunePlan | None, module: str, rows: int) -> torch.Tensor:
    """Output rows of `module` that survive the plan (all of them unless it produces a planned group)."""
    alive = torch.ones(rows, dtype=torch.bool)
    for name, keep in (plan.keep.items() if plan is not None else ()):
        mapping = analysis.members(name).producers.get(module)
        if mapping is not None:
            kept = set(keep)
            for row, channel in enumerate(mapping):
                if channel >= 0 and channel not in kept:
                    alive[row] = False
    return alive.nonzero().squeeze(1)


def _remove_output_shift(module: nn.Module, bn_name: str | None, modules: dict[str, nn.Module],
                         full: torch.Tensor, mean: torch.Tensor) -> None:
    """Bias correction: subtract E[(Q(W) − W)·x] = Σ_{i,taps} (Q(W) − W)[o,i,taps]·E[x_i] from the output."""
    error = (module.weight.detach().double() - full.double())
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        per_channel = error.reshape(error.shape[0], -1).sum(dim=1)  # depthwise: own input channel only
        delta = per_channel * mean
    else:
        delta = error.reshape(error.shape[0], error.shape[1], -1).sum(dim=2) @ mean
    _shift_output(module, bn_name, modules, -delta)


def _input_models(model: nn.Module, analysis: Analysis, plan: PrunePlan, recon: Reconstruction,
                  rho: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per quantizable layer of the COMPRESSED model, where we know it: (mean [I], channel covariance [I, I]) of its
    input positions. A compensated site's consumers: the deployed kept activations' moments (lmmse). Any other
    layer with a BN after it: means m ≥ 0 and variances v ≥ 0 per input channel, uncorrelated, solving
    (Σ_taps W)·m = μ − bias and Σ_i v_i W_iᵀ S W_i = running_var (non-negative least squares on the original
    weights; S = spatial_correlation); a depthwise conv solves each channel exactly. Others: unknown (absent)."""
    modules = dict(model.named_modules())
    dropped = _dropped_inputs(analysis, plan)
    models: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in modules.items():
        if isinstance(module, _QUANTIZABLE_TYPES):
            fitted = _fitted_input_model(module, modules.get(analysis.bn_after.get(name, "")), rho)
            if fitted is not None:
                models[name] = fitted
    for group, kept_mean in recon.kept_means.items():
        keep = sorted(plan.keep[group]) if group in plan.keep else list(range(analysis.group(group).channels))
        column = {c: j for j, c in enumerate(keep)}
        kept_cov = recon.kept_covs[group]
        for consumer, mapping in analysis.members(group).consumers.items():
            placed = [(i, column[c]) for i, c in _position_channels(mapping) if c in column]
            if len(placed) != len(mapping) - len(dropped.get(consumer, ())):
                continue  # the consumer also reads other channels: keep the fitted model
            pos = torch.as_tensor([i for i, _ in placed], dtype=torch.long)
            col = torch.as_tensor([j for _, j in placed], dtype=torch.long)
            width = len(mapping)
            mean = torch.zeros(width, dtype=torch.float64)
            cov = torch.zeros(width, width, dtype=torch.float64)
            mean[pos] = kept_mean[col]
            cov[pos[:, None], pos[None, :]] = kept_cov[col[:, None], col[None, :]]
            models[consumer] = (mean, cov)
    result = {}
    for name, (mean, cov) in models.items():
        alive = _alive(len(mean), dropped.get(name, set()))
        result[name] = (mean[alive], cov[alive][:, alive])
    return result


def _dropped_inputs(analysis: Analysis, plan: PrunePlan) -> dict[str, set[int]]:
    """Input positions of each consumer / per-channel module that pruning removes."""
    dropped: dict[str, set[int]] = {}
    for name, kept in plan.keep.items():
        kept = set(kept)
        members = analysis.members(name)
        for table in (members.consumers, members.passthrough):
            for module, mapping in table.items():
                dropped.setdefault(module, set()).update(i for i, c in _position_channels(mapping) if c not in kept)
    return dropped


def _alive(width: int, dropped: set[int]) -> torch.Tensor:
    return torch.as_tensor([i for i in range(width) if i not in dropped], dtype=torch.long)


def _fitted_input_model(module: nn.Module, bn: nn.Module | None,
                        rho: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Input means and variances implied by the statistics of the BN after `module` (None without one)."""
    if not isinstance(bn, _BN) or bn.running_mean is None or bn.running_var is None:
        return None
    weight = module.weight.detach().double()
    target_mean = bn.running_mean.detach().double()
    if module.bias is not None:
        target_mean = target_mean - module.bias.detach().double()
    target_var = bn.running_var.detach().double()
    spatial = spatial_correlation(_kernel(module), rho)
    taps = weight.reshape(weight.shape[0], weight.shape[1], -1)  # [out, in, T]
    spread = torch.einsum("cit,ts,cis->ci", taps, spatial, taps)  # var_c = Σ_i v_i spread[c, i]
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        if not module.groups == module.in_channels == module.out_channels:
            return None
        total = taps.sum(dim=(1, 2))
        mean = torch.where(total.abs() > 1e-12, target_mean / torch.where(total.abs() > 1e-12, total, 1.0), 0.0)
        var = torch.where(spread[:, 0] > 1e-300, target_var / spread[:, 0].clamp_min(1e-300), 0.0)
        return mean, torch.diag(var)
    if getattr(module, "groups", 1) != 1:
        return None
    a = taps.sum(dim=2)  # [out, in]
    mean = nnls_rows(a.T @ a, (a.T @ target_mean)[None, :]).squeeze(0)
    var = nnls_rows(spread.T @ spread, (spread.T @ target_var)[None, :]).squeeze(0)
    return mean, torch.diag(var)


# =================================================================================================================
# channel selection by reconstruction error
# =================================================================================================================

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
        for position, channel in _position_channels(mapping):
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
    (activation_stats.py) replaces the data-free Gaussian model's covariance."""
    channels = analysis.group(site.group).channels
    if measured is not None:
        cov = measured[1]
    else:
        st = _site_tensors(dict(model.named_modules()), site, _bits_lookup(None, None))
        cov = _site_moments(st, list(range(channels)), site.activation).cov
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
    (activation_stats.py) used instead of the data-free model for the groups it has.
    Returns (plan, {group: why it was left out}) for groups not compensable."""
    from dfp_deploy.compress.plan import kept_count

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
