"""Adaptive BatchNorm: re-estimate a compressed model's BatchNorm statistics on unlabeled (or synthetic) inputs.

Why. Pruning and quantization change what each BatchNorm sees: a BN after a pruned-and-repaired conv, and every BN
downstream of it, still normalises with the ORIGINAL model's running mean μ and variance σ², which no longer describe
its input. The data-free repairs (compress/repair/) correct the next layer's weights but can only predict the shift
from the BN statistics themselves. Re-estimating the statistics of the compressed model on inputs that look like the
data ("adaptive BN", as in EagleEye's candidate evaluation) removes the remaining shift of every channel's mean and
scale at once. With BN-matched synthetic inputs (data/synthetic.py: generated so that the ORIGINAL model's batch
statistics equal its running statistics) this stays data-free; with a few hundred real images it is the cheapest
use of them (no gradient step at all).

What is computed. All inputs x_1..x_N go through the model once, as one batch, in eval mode; just before each
BatchNorm layer l runs, its running statistics are replaced by the moments of its current input a_l over the batch
and the positions,
    μ_l ← m_l = (1/M) Σ_{n,h,w} a_l(n,·,h,w),     σ²_l ← v_l = (1/M) Σ_{n,h,w} (a_l(n,·,h,w) − m_l)²,   M = N·H·W,
and the layer then normalises with them. Because the pass goes in execution order, a_l is computed with every
earlier BN already normalising by its NEW statistics, so the stored statistics describe the compressed model as it
will be deployed (not a mix of old and new), and re-running the pass changes nothing: the result is a fixed point.
(PyTorch's train-mode estimate would store the unbiased variance while normalising by the biased one, which breaks
the fixed point by a factor M/(M − 1); one batch also makes the moments exact rather than averages over chunks.)
No weight changes and no gradient is tracked. Memory grows with N (one forward pass at batch N).

Exact cases (tests/test_bn_adapt.py): if the running statistics already equal the input moments, nothing changes;
if the original's statistics (μ, σ²) are the moments of its BN inputs over these inputs and a compression scales
channel c of that BN's input by s > 0 and shifts it by t (a ↦ s·a + t), re-estimation gives μ' = s·μ + t and
σ'² = s²·σ², so (s·a + t − μ')/σ' = (a − μ)/σ for EVERY input a, not only the ones used: the BN output is the
original one again (up to ε in √(σ² + ε)).

Trust check. self_agreement() adapts the UNCHANGED original on the same inputs and counts on how many of them it
keeps its top-1 class; builds report it and warn below SELF_AGREEMENT_WARN, since inputs that move a model that needs
no repair also mislead the repair of a compressed one (on ImageNet-scale models, synthetic inputs matched for a few
steps drive an adapted EfficientNet-Lite0 to 0 % top-1).

Limits. The re-estimated statistics are only as good as the inputs: synthetic inputs matched for too few steps
describe the original model poorly and the re-estimation then moves even an unchanged model (measured in
docs/BENCHMARKS.md, section "Adaptive BatchNorm"); that is why `compress.bn_adapt.synthetic_steps` defaults to 200
where the search's proxy inputs use 50.
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
