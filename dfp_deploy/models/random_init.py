"""Random weights that make a model's activations and outputs unit-scale, for checks without pretrained weights.

A framework's default initialisation is made for training, not for checking: with BatchNorm statistics left at
(0, 1) the activations of a deep net shrink or blow up layer after layer (torchvision's MobileNetV2 gives logits of
~1e-9), ConvNeXt's layer scales start at 1e-6 so its blocks vanish, and a parity check on such outputs passes for
any engine. `non_degenerate_` fixes that in ONE forward pass over random inputs:

* every conv / Linear output is divided by its RMS on the way (weights and bias divided alike, so the module stays
  what it computes): each layer hands the next one a unit-scale input;
* BatchNorm affine parameters are drawn at random (gamma in [0.5, 1.5], beta ~ N(0, 0.2²)) and its running
  statistics are those of this pass (cumulative average over one batch), so eval mode normalises as train would;
  LayerNorm / GroupNorm affine parameters are drawn the same way;
* an all-zero conv / Linear weight (a zero-initialised classifier) is drawn from N(0, 1) first;
* a parameter owned by any other module (ConvNeXt's layer scale, a ViT class token or position embedding) is drawn
  from N(0, 1): a constant 1e-6 would hide every block behind it.
Everything but BatchNorm runs in eval mode during the pass (dropout and training-only heads stay off).
"""

from __future__ import annotations

import torch
from torch import nn

_LINEAR_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_OWN_WEIGHTS = (*_LINEAR_TYPES, nn.modules.batchnorm._BatchNorm, *_NORM_TYPES, nn.MultiheadAttention)


def non_degenerate_(model: nn.Module, input_shape: tuple[int, ...], *, seed: int = 0, batch: int = 8) -> nn.Module:
    """Re-draw `model`'s weights in place as described in the module docstring and return it in eval mode.

    `input_shape` is one image's (C, H, W); `batch` random N(0, 1) images drive the pass.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, *_NORM_TYPES)) and \
                    getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.2)
            elif isinstance(module, _LINEAR_TYPES) and not module.weight.any():
                # a zero-initialised classifier (ViT's head) would give all-zero logits whatever the input
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
            elif not isinstance(module, _OWN_WEIGHTS):
                for param in module.parameters(recurse=False):
                    param.copy_(torch.randn(param.shape, generator=gen))
        x = torch.randn((batch, *input_shape), generator=gen)
        _normalising_pass(model, x)
    return model.eval()


def _normalising_pass(model: nn.Module, x: torch.Tensor) -> None:
    seen: set[int] = set()

    def rescale(module, inputs, output):
        if not torch.is_tensor(output) or id(module) in seen:
            return None  # a module called twice is scaled once, on its first call
        seen.add(id(module))
        rms = float(output.float().pow(2).mean().sqrt())
        if not rms > 0 or rms != rms:
            return None
        module.weight.div_(rms)
        if module.bias is not None:
            module.bias.div_(rms)
        return output / rms

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_hook(rescale) for m in model.modules() if isinstance(m, _LINEAR_TYPES)]
    was_training = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    try:
        model.eval()
        for bn in norms:
            if bn.track_running_stats:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average: after one batch, exactly its statistics
                bn.train()
        model(x)
    finally:
        for handle in handles:
            handle.remove()
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for module, training in was_training.items():
            module.training = training
