"""Hessian-aware weight rounding: per-channel codes that minimise (w − q)ᵀ H (w − q) on the round-to-nearest grid.

H = E[x xᵀ] over input patches; from a data-free input model (channel covariance C, means m) and a spatial
correlation S between taps, H = C ⊗ S + (m mᵀ) ⊗ 1 1ᵀ. Columns are rounded in order and the not-yet-rounded columns
absorb each error in the H metric (OBQ/GPTQ error feedback); H = I gives round-to-nearest exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from dfp_deploy.compress.quantize.weights import quant_levels, weight_scale

def quantize_weight_hessian(w: torch.Tensor, bits: int, hessian: torch.Tensor, *, damp: float = 0.01) -> torch.Tensor:
    """Fake-quantize `w` on the same per-channel grid as quantize_weight, choosing the roundings to minimise
    (w_c − q_c)ᵀ H (w_c − q_c) per output channel instead of each element's own error (module docstring).
    `hessian`: [D, D] shared by all rows, or [C, D, D] per row (depthwise convs), D = w[0].numel()."""
    n = quant_levels(bits)
    rows = w.detach().double().reshape(w.shape[0], -1)
    scale = weight_scale(w, bits).double().reshape(-1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    if hessian.dim() == 2:
        codes = _error_feedback_codes(rows, safe, n, hessian.double(), damp)
    else:
        codes = torch.cat([_error_feedback_codes(rows[c:c + 1], safe[c:c + 1], n, hessian[c].double(), damp)
                           for c in range(rows.shape[0])])
    return (codes * safe[:, None]).reshape(w.shape).to(w.dtype)


def _error_feedback_codes(rows: torch.Tensor, scale: torch.Tensor, n: int, hessian: torch.Tensor,
                          damp: float) -> torch.Tensor:
    """Integer codes by sequential rounding with optimal error feedback (Optimal Brain Quantization order 0..D−1):
    after rounding column i, the remaining columns absorb −e_i·U[i, i+1:]/U[i, i] (U = upper Cholesky factor of
    H^{-1}), the least-squares correction of that error in the H metric."""
    d = rows.shape[1]
    h = hessian.clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    h = h + damp * h.diagonal().mean() * torch.eye(d, dtype=h.dtype)
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        # an input model that is not positive semi-definite (the pairwise-Gaussian moments of EfficientNet's
        # depthwise sites can be indefinite): its nearest PSD matrix (negative eigenvalues set to 0), damped
        values, vectors = torch.linalg.eigh(0.5 * (hessian + hessian.T))
        h = (vectors * values.clamp_min(0.0)) @ vectors.T
        h[dead, dead] = 1.0
        h = h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(d, dtype=h.dtype)
        factor = torch.linalg.cholesky(h)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    work = rows.clone()
    codes = torch.empty_like(work)
    for i in range(d):
        column = work[:, i]
        code = torch.clamp(torch.round(column / scale), -n, n)
        codes[:, i] = code
        error = (column - code * scale) / upper[i, i]
        work[:, i + 1:] -= error[:, None] * upper[i, i + 1:][None, :]
    return codes


ROUNDINGS = ("nearest", "hessian")


def spatial_correlation(kernel: tuple[int, ...], rho: float) -> torch.Tensor:
    """[T, T] correlation between the taps of a kernel: ρ^(Manhattan distance between taps)."""
    grids = torch.meshgrid(*[torch.arange(k, dtype=torch.float64) for k in kernel], indexing="ij")
    taps = torch.stack([g.reshape(-1) for g in grids], dim=1)
    return rho ** (taps[:, None, :] - taps[None, :, :]).abs().sum(dim=-1)


def kernel_size(module: nn.Module) -> tuple[int, ...]:
    return tuple(module.kernel_size) if isinstance(module, nn.modules.conv._ConvNd) else (1,)


def layer_hessian(module: nn.Module, mean: torch.Tensor, cov: torch.Tensor, rho: float) -> torch.Tensor:
    """H = E[x xᵀ] over input patches (input position-major, taps minor, as the weight is flattened):
    Cov_channels ⊗ S_spatial + (m mᵀ) ⊗ 1 1ᵀ (each channel's mean is the same at every tap). Depthwise convs get
    one [T, T] block per channel."""
    spatial = spatial_correlation(kernel_size(module), rho)
    ones = torch.ones_like(spatial)
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        return cov.diagonal()[:, None, None] * spatial + (mean * mean)[:, None, None] * ones
    return torch.kron(cov, spatial) + torch.kron(mean[:, None] * mean[None, :], ones)
