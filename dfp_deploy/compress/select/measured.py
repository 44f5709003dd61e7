"""Measured activation statistics of compensable channel groups, for choosing channels from a few real images.

For each site, the activation a ∈ R^C its consumers read is recorded at every spatial position of every image, and
m = (1/n) Σ_i a_i, C = (1/n) Σ_i a_i a_iᵀ − m mᵀ (n = N·H·W; biased and centered) replace the data-free Gaussian
model in the lmmse selection (select/lmmse.py). Why centered, and what E(K) then measures:
docs/methods/reconstruction.md, "Measured statistics".
"""

from __future__ import annotations

import torch
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.compress.repair.moments import apply_activation
from dfp_deploy.compress.repair.sites import Site, find_site


def measured_group_statistics(model: nn.Module, analysis: Analysis, inputs: torch.Tensor, *,
                              batch: int = 64) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """site_activation_moments of every group the lmmse selection can choose in (prunable, not tied across a
    residual add, closed-form compensable: repair/sites.find_site)."""
    sites = {}
    for group in analysis.groups:
        if group.prunable and not group.residual:
            site, _ = find_site(model, analysis, group.name)
            if site is not None:
                sites[group.name] = site
    return site_activation_moments(model, sites, inputs, batch=batch)


def site_activation_moments(model: nn.Module, sites: dict[str, Site], inputs: torch.Tensor, *,
                            batch: int = 64) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{group: (mean [C], centered covariance [C, C])} of the activations each site's consumers read, over every
    image and spatial position of `inputs` (module docstring), in group channel order, float64. `model` runs in
    eval mode and is left as it was."""
    if len(inputs) == 0:
        raise ValueError("site_activation_moments: no inputs")
    modules = dict(model.named_modules())
    sums: dict[str, list] = {}

    def hook_for(name: str, site: Site):
        depthwise = site.depthwise is not None
        index = torch.as_tensor(site.dw_bn_index if depthwise else site.bn_index, dtype=torch.long)

        def hook(_module, _inputs, output):
            a = apply_activation(output.detach().double().index_select(1, index), site.activation)
            a = a.transpose(0, 1).reshape(len(index), -1)  # [C, N·H·W]
            if name not in sums:  # allocated once, not per batch (C² doubles: 10 MB for Lite0's 1152 channels)
                sums[name] = [0, torch.zeros(len(index), dtype=torch.float64),
                              torch.zeros(len(index), len(index), dtype=torch.float64)]
            acc = sums[name]
            acc[0] += a.shape[1]
            acc[1] += a.sum(dim=1)
            acc[2] += a @ a.T
        return hook

    handles = [modules[site.dw_bn if site.depthwise is not None else site.bn].register_forward_hook(
        hook_for(name, site)) for name, site in sites.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(inputs), batch):
                model(inputs[start:start + batch])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    moments = {}
    for name, (count, first, second) in sums.items():
        mean = first / count
        cov = second / count - torch.outer(mean, mean)
        moments[name] = (mean, 0.5 * (cov + cov.T))
    return moments
