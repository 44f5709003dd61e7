"""Count multiply-accumulates (per image) and parameters of a model.

MACs, as in BASELINES.md, are conv + linear multiply-accumulates for ONE image:
  conv:   (output elements per image) · (in_channels / groups) · prod(kernel_size)
  linear: (output elements per image) · in_features
(a transposed conv is counted from its input side: input elements · out_channels/groups · prod(kernel)).
BatchNorm, activations, pooling and adds are not counted. A module called twice is counted twice.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dfp_deploy.core.modes import eval_mode


def module_macs(module: nn.Module, in_shape, out_shape) -> int:
    """MACs of one call of a conv / Linear for ONE image, given its batched input and output shapes; 0 otherwise."""
    if in_shape is None or out_shape is None or len(out_shape) == 0:
        return 0
    batch = out_shape[0] if len(out_shape) > 1 else 1
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        if module.transposed:
            return math.prod(in_shape) // batch * (module.out_channels // module.groups) * kernel
        return math.prod(out_shape) // batch * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return math.prod(out_shape) // batch * module.in_features
    return 0


def macs_by_module(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs per image of every conv / Linear that ran (summed over its calls), by module name, measured with forward
    hooks on one run of `example_input` (eval mode, no grad; the model's train/eval flags are restored)."""
    names = {m: n for n, m in model.named_modules()}
    totals: dict[str, int] = {}

    def hook(module, inputs, output):
        if torch.is_tensor(output) and inputs and torch.is_tensor(inputs[0]):
            name = names[module]
            totals[name] = totals.get(name, 0) + module_macs(module, tuple(inputs[0].shape), tuple(output.shape))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return totals


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Conv + linear MACs per image (macs_by_module, summed)."""
    return sum(macs_by_module(model, example_input).values())


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
