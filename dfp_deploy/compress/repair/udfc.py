"""UDFC: merge each pruned channel into the kept channel(s) that minimise a data-free bound on its activation error.

s* = (⟨ŵ_p,ŵ_q⟩ + α b̂_p b̂_q)/(‖ŵ_q‖² + α b̂_q²) minimises ‖ŵ_p − s ŵ_q‖² + α(b̂_p − s b̂_q)², which bounds
E|a_p − s a_q|² through ReLU for s ≥ 0; the vector form takes s ≥ 0 over several partners by NNLS; a quantized kept
channel gets its own rescale s'*; merges into quantized consumers are guarded against widening their rounding grid
(docs/methods/reconstruction.md, method 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dfp_deploy.compress.repair.sites import Site, SiteTensors, channel_positions, pruned_channels, selection_matrix

DEFAULT_ALPHA = 0.01


DEFAULT_ALPHA_Q = 1.0


MERGE_GRID_GROWTH = 1.0  # guard_merges: a merge may at most double a quantized consumer row's grid (docstring 2b)


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


def udfc_site(st: SiteTensors, keep: list[int], alpha: float, alpha_q: float, multi: bool) -> torch.Tensor:
    channels = st.w.shape[0]
    mixing = selection_matrix(channels, keep)
    k = torch.as_tensor(keep)
    if st.w_q is not None and st.dw is None:
        s_prime = udfc_quant_scales(st.w[k], st.w_q[k], st.b[k], alpha_q)
        mixing[k, torch.arange(len(keep))] = s_prime
    pruned = pruned_channels(channels, keep)
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


def guard_site_merges(mixing: torch.Tensor, keep: list[int], modules: dict[str, nn.Module], site: Site, st: SiteTensors,
             bits_of: Callable[[str], int | None], growth: float) -> torch.Tensor:
    """guard_merges over the site's quantized consumers, pruned rows in order of the energy they fed the consumers:
    Σ_consumers ‖W'_p‖² · E[y_p²] (y_p ~ N(mean, std²) at the BN the consumers see through the activation)."""
    channels = mixing.shape[0]
    weights = []
    for name, mapping in site.consumers.items():
        position = channel_positions(mapping, channels)
        if bits_of(name) is None or position is None:
            continue  # not quantized, or a channel seen at several positions: nothing to guard / no column order
        w = modules[name].weight.detach().double()
        weights.append(w.reshape(w.shape[0], w.shape[1], -1)[:, torch.as_tensor(position, dtype=torch.long)])
    if not weights:
        return mixing
    mean, std = (st.dw_mean, st.dw_std) if st.dw is not None else (st.mean, st.std)
    priority = sum((w * w).sum(dim=(0, 2)) for w in weights) * (mean * mean + std * std)
    return guard_merges(mixing, keep, weights, priority, growth)
