"""lmmse repair: every pruned channel re-expressed as the best affine estimate from the deployed kept channels.

M = C_{a,â_K} C_{â_K â_K}^{-1} and d = E[a] − M E[â_K], with the moments of the Gaussian model (moments.py); a kept
channel keeps its own column and only gets its mean offset (docs/methods/reconstruction.md, method 3).
"""

from __future__ import annotations

import torch

from dfp_deploy.compress.repair.moments import site_moments
from dfp_deploy.compress.repair.sites import SiteTensors, pruned_channels, selection_matrix

def lmmse_mixing(cov_cross: torch.Tensor, cov_kept: torch.Tensor, mean_all: torch.Tensor,
                 mean_kept: torch.Tensor, jitter: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """M = C_{a,â} C_{ââ}^{-1} [C, K] and d = E[a] − M E[â] [C]: the best affine estimate of a from â."""
    k = cov_kept.shape[0]
    scale = cov_kept.diagonal().mean().clamp_min(1e-300)
    regular = cov_kept + jitter * scale * torch.eye(k, dtype=cov_kept.dtype)
    mixing = torch.linalg.solve(regular, cov_cross.T).T
    return mixing, mean_all - mixing @ mean_kept


def lmmse_site(st: SiteTensors, keep: list[int], activation: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor, torch.Tensor]:
    """(M [C, K], d [C], E[â_K], Cov[â_K]): pruned rows of M are the lmmse estimate from the deployed kept activations;
    a kept channel keeps its own column (M[k,k] = 1) and only gets the mean offset d_k = E[a_k] − E[â_k]. Measured:
    letting kept channels also mix (full lmmse) or rescale themselves (s' from the model) costs accuracy at 3 bits,
    because the cosine correlations are too rough to improve on a channel that is still present
    (bench/bench_reconstruct.py)."""
    mom = site_moments(st, keep, activation, lmmse_only=True)
    c = mom.channels
    dep = torch.as_tensor(mom.deployed, dtype=torch.long)
    k = torch.as_tensor(keep, dtype=torch.long)
    mixing = selection_matrix(c, keep)
    offset = torch.zeros(c, dtype=torch.float64)
    offset[k] = mom.mean[k] - mom.mean[dep]
    pruned = torch.as_tensor(pruned_channels(c, keep), dtype=torch.long)
    if len(pruned):
        rows, shift = lmmse_mixing(mom.cov[pruned][:, dep], mom.cov[dep][:, dep], mom.mean[pruned], mom.mean[dep])
        mixing[pruned], offset[pruned] = rows, shift
    return mixing, offset, mom.mean[dep], mom.cov[dep][:, dep]
