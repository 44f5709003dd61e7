"""Bias correction: remove a quantized layer's mean output shift E[(Q(W) − W)·x] using its input means.

For a dense layer the shift is Σ_{i,taps} (Q(W) − W)[o, i, taps]·E[x_i]; a depthwise conv sees its own channel only.
The shift goes into the BN that follows (its running mean), else the layer's bias.
"""

from __future__ import annotations

import torch
from torch import nn

_BN = nn.modules.batchnorm._BatchNorm

def shift_output(module: nn.Module, bn_name: str | None, modules: dict[str, nn.Module], delta: torch.Tensor) -> None:
    """Add `delta` [out] to the module's output: through the BN after it, its bias, or a new bias."""
    delta = delta.to(module.weight.dtype)
    with torch.no_grad():
        if bn_name is not None and isinstance(modules.get(bn_name), _BN):
            bn = modules[bn_name]
            bn.running_mean -= delta.to(bn.running_mean.dtype)
        elif module.bias is not None:
            module.bias += delta
        else:
            module.bias = nn.Parameter(delta.clone(), requires_grad=module.weight.requires_grad)


def remove_output_shift(module: nn.Module, bn_name: str | None, modules: dict[str, nn.Module],
                         full: torch.Tensor, mean: torch.Tensor) -> None:
    """Bias correction: subtract E[(Q(W) − W)·x] = Σ_{i,taps} (Q(W) − W)[o,i,taps]·E[x_i] from the output."""
    error = (module.weight.detach().double() - full.double())
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        per_channel = error.reshape(error.shape[0], -1).sum(dim=1)  # depthwise: own input channel only
        delta = per_channel * mean
    else:
        delta = error.reshape(error.shape[0], error.shape[1], -1).sum(dim=2) @ mean
    shift_output(module, bn_name, modules, -delta)
