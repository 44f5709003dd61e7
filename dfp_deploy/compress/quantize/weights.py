"""Simulated (fake-quant) weight quantization: the per-channel symmetric round-to-nearest grid.

Weights: per-output-channel symmetric round-to-nearest with b bits. For output channel c with n = 2^(b−1) − 1,

    Δ_c = max|w_c| / n,     Q(w_c) = Δ_c · clamp(round(w_c / Δ_c), −n, n)

(levels −n..n, so 2n + 1 = 2^b − 1 of them, zero exactly representable; |w − Q(w)| ≤ Δ_c / 2 elementwise). The
result is returned dequantized, in float, so the PyTorch model simulates the integer engine's weights. Because the
scale is per output channel, Q(λ·w_c) = λ·Q(w_c) for any λ ≠ 0: quantizing a conv's raw filters or its BN-folded
filters (γ/σ)·W gives the same folded result, so reconstruction may reason on folded filters while we quantize the
raw conv weights that deployment later folds.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from dfp_deploy.core.errors import InputError

QUANTIZABLE = (nn.modules.conv._ConvNd, nn.Linear)


def check_bits(bits, what: str = "compress.quantize.weight_bits") -> int:
    """`bits` as an int in 2..16, else InputError naming `what`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise InputError(f"{what}: {bits!r} is not an integer in 2..16 (8 is lossless in practice, 4 is aggressive)")
    return bits


def quant_levels(bits: int) -> int:
    """n = 2^(b−1) − 1: the largest integer level of a symmetric b-bit code."""
    return 2 ** (check_bits(bits) - 1) - 1


def weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel Δ_c = max|w_c| / n, shaped to broadcast against `w` (0 for an all-zero channel)."""
    rows = w.detach().reshape(w.shape[0], -1)
    scale = rows.abs().amax(dim=1) / quant_levels(bits)
    return scale.reshape(-1, *([1] * (w.dim() - 1)))


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric round-to-nearest fake quantization of `w` (dim 0 = output channels)."""
    n = quant_levels(bits)
    scale = weight_scale(w, bits)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero channels stay exactly zero
    codes = torch.clamp(torch.round(w / safe), -n, n)
    return (codes * safe).to(w.dtype)


def quantize_model_weights(model: nn.Module, bits: int, *,
                           skip: Callable[[str, nn.Module], bool] | None = None,
                           layer_bits: dict[str, int] | None = None) -> nn.Module:
    """A deep copy of `model` with every conv and linear weight fake-quantized (biases stay float);
    `layer_bits` {module name: bits} overrides `bits` for those modules (e.g. edge_layers at 8)."""
    check_bits(bits)
    layer_bits = layer_bits or {}
    quantized = copy.deepcopy(model)
    for name, module in quantized.named_modules():
        if isinstance(module, QUANTIZABLE) and not (skip and skip(name, module)):
            with torch.no_grad():
                module.weight.copy_(quantize_weight(module.weight, layer_bits.get(name, bits)))
    return quantized


def edge_layers(model: nn.Module, order: list[str] | None = None) -> list[str]:
    """Names of the first and the last conv/linear module (one name if they coincide), in execution order when
    `order` (Analysis.module_order, from the trace) is given, else in definition order.

    Low-bit quantization usually keeps these two at 8 bits (HAQ fixes them at w8; most low-bit papers do the same):
    the first layer sees raw pixels through very few weights per filter (27 for a 3×3 RGB stem) and nothing before it
    can compensate its error; the last one writes the logits directly. Their MACs are a small share of the network."""
    modules = dict(model.named_modules())
    names = [n for n in (order or modules) if isinstance(modules.get(n), QUANTIZABLE)]
    return list(dict.fromkeys(names[:1] + names[-1:]))


def bits_lookup(bits: int | None, layer_bits: dict[str, int] | None) -> Callable[[str], int | None]:
    """module name → its weight bits: None everywhere when not quantizing, else the override or `bits`."""
    overrides = {name: check_bits(b, f"bits of layer {name}") for name, b in (layer_bits or {}).items()}
    return lambda name: None if bits is None else overrides.get(name, bits)
