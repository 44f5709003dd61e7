"""BatchNorm arithmetic for data-free reconstruction: BN-folded filters, folded biases and BN output moments.

A producer (conv or linear, weight W with output rows W_c, optional bias c_c) followed by an inference-mode
BatchNorm (γ, β, running mean μ, running var v, eps) computes, per output channel c,

    y_c = γ_c (W_c·x + c_c − μ_c) / σ_c + β_c,        σ_c = sqrt(v_c + eps)
        = ŵ_c·x + b̂_c,   with   ŵ_c = (γ_c/σ_c) W_c,   b̂_c = β_c + γ_c (c_c − μ_c) / σ_c.

(σ, never the variance v itself, is the divisor: PAPERS.md §4 pitfall 1 is a v-for-σ slip.)

The running statistics are the mean and variance of W_c·x + c_c over the training data, so over that data the BN
output y_c has mean β_c and standard deviation |γ_c|. That is all the data-free methods know about activations.
"""

from __future__ import annotations

import torch
from torch import nn


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ/σ, β − γμ/σ) as float64: the BN is y = scale·z + shift in inference mode."""
    count = bn.num_features
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(count, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(count, dtype=torch.float64)
    if bn.running_var is None:  # no running statistics: the BN normalises with batch statistics we do not know
        raise ValueError("BatchNorm without running statistics cannot be folded")
    sigma = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    scale = gamma / sigma
    return scale, beta - scale * bn.running_mean.detach().double()


def folded_filters(weight: torch.Tensor, bias: torch.Tensor | None,
                   bn: nn.modules.batchnorm._BatchNorm | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŵ [C, D], b̂ [C]) in float64 for a producer weight [C, ...] (rows flattened) and the BN after it (or None)."""
    rows = weight.detach().double().reshape(weight.shape[0], -1)
    b = bias.detach().double() if bias is not None else torch.zeros(rows.shape[0], dtype=torch.float64)
    if bn is None:
        return rows, b
    scale, shift = bn_scale_shift(bn)
    return scale[:, None] * rows, scale * b + shift


def bn_output_moments(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the BN output per channel over the training data: (β, |γ|), float64."""
    count = bn.num_features
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(count, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(count, dtype=torch.float64)
    return beta, gamma.abs()
