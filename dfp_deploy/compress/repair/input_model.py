"""What each layer of the repaired model sees, data-free: the mean and channel covariance of its inputs.

Used by Hessian rounding and bias correction. A compensated site's consumers read the deployed kept activations
(lmmse's moments); any other layer followed by a BN gets non-negative, uncorrelated input means and variances that
reproduce that BN's running statistics through its weights (non-negative least squares).
"""

from __future__ import annotations

import torch
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.compress.quantize.rounding import kernel_size, spatial_correlation
from dfp_deploy.compress.quantize.weights import QUANTIZABLE
from dfp_deploy.compress.repair.sites import position_channels
from dfp_deploy.compress.repair.udfc import nnls_rows
from dfp_deploy.core.types import PrunePlan

_BN = nn.modules.batchnorm._BatchNorm

def input_models(model: nn.Module, analysis: Analysis, plan: PrunePlan,
                 kept_moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 rho: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per quantizable layer of the COMPRESSED model, where we know it: (mean [I], channel covariance [I, I]) of its
    input positions. A compensated site's consumers: `kept_moments` {group: (mean, covariance) of the deployed kept
    activations} (lmmse). Any other
    layer with a BN after it: means m ≥ 0 and variances v ≥ 0 per input channel, uncorrelated, solving
    (Σ_taps W)·m = μ − bias and Σ_i v_i W_iᵀ S W_i = running_var (non-negative least squares on the original
    weights; S = spatial_correlation); a depthwise conv solves each channel exactly. Others: unknown (absent)."""
    modules = dict(model.named_modules())
    dropped = _dropped_inputs(analysis, plan)
    models: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in modules.items():
        if isinstance(module, QUANTIZABLE):
            fitted = _fitted_input_model(module, modules.get(analysis.bn_after.get(name, "")), rho)
            if fitted is not None:
                models[name] = fitted
    for group, (kept_mean, kept_cov) in kept_moments.items():
        keep = sorted(plan.keep[group]) if group in plan.keep else list(range(analysis.group(group).channels))
        column = {c: j for j, c in enumerate(keep)}
        for consumer, mapping in analysis.members(group).consumers.items():
            placed = [(i, column[c]) for i, c in position_channels(mapping) if c in column]
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
                dropped.setdefault(module, set()).update(i for i, c in position_channels(mapping) if c not in kept)
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
    spatial = spatial_correlation(kernel_size(module), rho)
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
