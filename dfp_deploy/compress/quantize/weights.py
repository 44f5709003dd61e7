"""Simulated (fake-quant) weight quantization and data-free activation ranges from BatchNorm statistics.

Weights: per-output-channel symmetric round-to-nearest with b bits. For output channel c with n = 2^(b−1) − 1,

    Δ_c = max|w_c| / n,     Q(w_c) = Δ_c · clamp(round(w_c / Δ_c), −n, n)

(levels −n..n, so 2n + 1 = 2^b − 1 of them, zero exactly representable; |w − Q(w)| ≤ Δ_c / 2 elementwise). The
result is returned dequantized, in float, so the PyTorch model simulates the integer engine's weights. Because the
scale is per output channel, Q(λ·w_c) = λ·Q(w_c) for any λ ≠ 0: quantizing a conv's raw filters or its BN-folded
filters (γ/σ)·W gives the same folded result, so reconstruction may reason on folded filters while we quantize the
raw conv weights that deployment later folds.

Activations (data-free, DFQ-style): an inference-mode BN output channel has mean β_c and standard deviation |γ_c|
over the training data (bnfold.py). Modelling it as a Gaussian, its range is β_c ± k·|γ_c|; an activation after the
BN clips that range: ReLU to [max(lo, 0), max(hi, 0)], ReLU6 to [clip(lo, 0, 6), clip(hi, 0, 6)]. Activations are
heavier-tailed than a Gaussian, which is why k is larger than a Gaussian's 3 (the ONNX pass in export/ranges.py
measured k = 6 on held-out training images; we use the same default).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from dfp_deploy.core.errors import InputError

DEFAULT_RANGE_K = 6.0
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


def activation_ranges_from_bn(model: nn.Module, example_input: torch.Tensor, *,
                              k: float = DEFAULT_RANGE_K) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{BN module name: (lo, hi)} per channel, for the tensor that follows the BN's activation (or the BN output
    itself when no ReLU/ReLU6 is its only user). See the module docstring for the formula."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0:
        raise InputError(f"activation range k: {k!r} must be a positive number of standard deviations")
    ranges = {}
    for name, act in bn_activations(model, example_input).items():
        bn = dict(model.named_modules())[name]
        ranges[name] = bn_range(bn, act, k)
    return ranges


def bn_range(bn: nn.modules.batchnorm._BatchNorm, activation: str, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) = β ± k|γ| clipped by `activation` ("relu", "relu6" or "none")."""
    count = bn.num_features
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones(count)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros(count)
    lo, hi = beta - k * gamma.abs(), beta + k * gamma.abs()
    if activation == "relu":
        lo, hi = lo.clamp_min(0), hi.clamp_min(0)
    elif activation == "relu6":
        lo, hi = lo.clamp(0, 6), hi.clamp(0, 6)
    return lo, hi


def bn_activations(model: nn.Module, example_input: torch.Tensor) -> dict[str, str]:
    """{BN module name: "relu" | "relu6" | "none"}: the activation that is the BN output's only user."""
    from dfp_deploy.analysis.trace import TraceFailure, call_counts, describe_node, trace_with_shapes

    try:
        gm = trace_with_shapes(model, example_input)
    except TraceFailure as exc:
        raise InputError(f"cannot find the activations after BatchNorm layers: {exc}") from exc
    modules = dict(gm.named_modules())
    counts = call_counts(gm)
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], nn.modules.batchnorm._BatchNorm):
            continue
        users = list(node.users)
        label = describe_node(users[0], modules, counts).label if len(users) == 1 else ""
        found[str(node.target)] = label if label in ("relu", "relu6") else "none"
    return found


def bits_lookup(bits: int | None, layer_bits: dict[str, int] | None) -> Callable[[str], int | None]:
    """module name → its weight bits: None everywhere when not quantizing, else the override or `bits`."""
    overrides = {name: check_bits(b, f"bits of layer {name}") for name, b in (layer_bits or {}).items()}
    return lambda name: None if bits is None else overrides.get(name, bits)
