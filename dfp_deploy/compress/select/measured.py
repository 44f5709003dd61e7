"""Measured activation statistics of compensable channel groups, for choosing channels from a few real images.

The lmmse channel selection (select/lmmse.py) keeps, in every compensable group, the channels that best explain
all of the group's channels in the consumers' outputs. Without data it MODELS the activations'
mean m and covariance C from weights and BatchNorm statistics (Gaussian pre-activations with cosine correlations).
When the recipe has calibration images (compress.calibration.data), this module MEASURES them instead.

What is measured. For a site (a group whose consumers read a = f(BN(producer)) — or, through a depthwise stage,
f(BN_dw(dw ⊛ f(BN(producer))))) we record the activation a ∈ R^C at every spatial position of every image
(N·H·W samples x_i) and return, in float64,
    m = (1/n) Σ_i a_i,     C = (1/n) Σ_i a_i a_iᵀ − m mᵀ      (n = N·H·W; the biased, centered covariance).

Why centered. Reconstructing every channel from the kept set K by an affine map, a ≈ M a_K + d, the least-squares
optimum over the samples is d = m − M m_K and M = C_{·K} C_KK⁻¹ (the normal equations of ordinary least squares with
an intercept), with residual covariance R = C − C_{·K} C_KK⁻¹ C_{K·}. A consumer with weights W' (taps t) adds
‖Σ_t W'_t r‖² per position, so with G = Σ_t W'_tᵀ W'_t (select/lmmse.consumer_gram; spatial taps treated as
independent) the expected consumer-output error is E(K) = tr(G R) = tr(G C) − tr(C_KK⁻¹ (C G C)_KK), exactly the
quantity select/lmmse.greedy_elimination minimises. With measured m, C it is the error the calibration's least-squares
step (calibrate/two_phase.py, phase 2a) starts from when only the input channels of the consumers change; the
constant d is what a bias absorbs, which is why the covariance is centered. The plan is chosen from the ORIGINAL model's
activations, before any phase of calibration touches the weights.

Cost: one forward pass over the inputs with a hook per site; memory C² float64 per site.
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
