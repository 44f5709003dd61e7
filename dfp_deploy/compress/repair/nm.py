"""Neuron Merging: a pruned channel whose BN-folded filter is a positive multiple of a kept one merges into it.

ŵ_p = z·ŵ_q and b̂_p = z·b̂_q with z > 0 give a_p = z·a_q exactly through ReLU; the partner q is the kept channel that
minimises λ(1 − cos(ŵ_p, ŵ_q)) + (1 − λ)·(normalised bias gap) among those with cos ≥ threshold
(docs/methods/reconstruction.md, method 1).
"""

from __future__ import annotations

import math

import torch

from dfp_deploy.compress.repair.sites import SiteTensors, pruned_channels, selection_matrix

NM_THRESHOLD = 0.1


NM_LAMBDA = 0.85


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


def nm_site(st: SiteTensors, keep: list[int], threshold: float, lam: float) -> torch.Tensor:
    channels = st.w.shape[0]
    mixing = selection_matrix(channels, keep)
    pruned = pruned_channels(channels, keep)
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
