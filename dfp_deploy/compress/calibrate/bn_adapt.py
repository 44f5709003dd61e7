"""Adaptive BatchNorm: re-estimate a compressed model's BatchNorm statistics on unlabeled (or synthetic) inputs.

One eval-mode pass over all inputs as one batch; just before each BN runs, its running statistics become the moments
of its current input, μ_l ← (1/M) Σ a_l, σ²_l ← (1/M) Σ (a_l − μ_l)² (M = N·H·W), so every later BN sees the earlier
ones already re-estimated and the result is a fixed point. No weight changes. A channel scaled and shifted by the
compression (a ↦ s·a + t, s > 0) gets back the original BN output for every input. self_agreement() adapts the
UNCHANGED original on the same inputs and reports how often its top-1 survives, a trust check on the inputs
(docs/methods/bn-adapt.md).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dfp_deploy.core.errors import DataError


SELF_AGREEMENT_WARN = 0.9  # ResNet-56: 0.95 with 200-step synthetic inputs (fine), 0.86 with 50-step ones (not)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics (the ones re-estimation updates)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]


def adapt_batchnorm(model: nn.Module, inputs: torch.Tensor) -> int:
    """Re-estimate every BatchNorm's running statistics of `model` on `inputs` in place (module docstring).

    `inputs`: float [N, ...], N >= 2, normalised like the model expects. Returns the number of BatchNorm layers
    updated; the model is left in eval mode."""
    if not torch.is_tensor(inputs) or not inputs.is_floating_point() or inputs.dim() < 2:
        got = f"{inputs.dtype} {tuple(inputs.shape)}" if torch.is_tensor(inputs) else type(inputs).__name__
        raise DataError(f"compress.bn_adapt: inputs must be a float tensor [N, ...], got {got}")
    if len(inputs) < 2:
        raise DataError("compress.bn_adapt: at least 2 inputs are needed to estimate a variance; raise samples")
    bns = batchnorm_layers(model)
    if not bns:
        return 0

    def set_statistics(module, args):
        a = args[0].detach()
        dims = [d for d in range(a.dim()) if d != 1]
        var, mean = torch.var_mean(a.double(), dim=dims, correction=0)
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)

    model.eval()
    handles = [m.register_forward_pre_hook(set_statistics) for m in bns]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return len(bns)


def self_agreement(model: nn.Module, inputs: torch.Tensor) -> float | None:
    """How well `inputs` describe the data the model was trained on, without any data: the fraction of `inputs` on
    which the UNCHANGED model keeps its top-1 class after its own statistics are re-estimated on them. 1.0 when its
    statistics already are the inputs' moments; low values mean re-estimation on these inputs moves even a model
    that needs no repair (e.g. synthetic inputs matched for too few steps), so a compressed model adapted on them is
    suspect. Measured for ResNet-56 (docs/BENCHMARKS.md): 0.86 with 50-step synthetic inputs, where adaptation costs
    the unchanged model 10 points, and 0.95 with 200-step ones, where it costs 0.7. `model` is left untouched.
    None for a model without one [N, classes] output (a detector's tuple or dict): it has no top-1 class."""
    adapted = copy.deepcopy(model)
    adapt_batchnorm(adapted, inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            after, before = adapted(inputs), model(inputs)
    finally:
        model.train(was_training)
    if not isinstance(before, torch.Tensor) or before.dim() != 2:
        return None
    return float((after.argmax(1) == before.argmax(1)).float().mean())
