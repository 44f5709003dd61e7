"""Where closed-form repair is valid: the compensable sites of a model, and their BN-folded tensors.

A site is producer conv/linear → BN → activation f → [depthwise conv → BN → f] → dense consumers, each group channel
held by exactly one row of each. Residual groups are never sites (the skip path cannot be compensated); ReLU6 merges
are approximate. `site_tensors` gives, in group channel order, the folded filters ŵ = (γ/σ)·W and biases
b̂ = (γ/σ)·b + β − γμ/σ, and Q(ŵ) when the producer is quantized (docs/methods/reconstruction.md, "Validity").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.compress.bnfold import bn_output_moments, bn_scale_shift, folded_filters
from dfp_deploy.compress.quantize.weights import quantize_weight

_PATH_OK = {"bn", "relu", "relu6", "depthwise", "pool", "flatten", "pad"}


_BN = nn.modules.batchnorm._BatchNorm


_DENSE = (nn.modules.conv._ConvNd, nn.Linear)



@dataclass(frozen=True)
class Site:
    """A compensable group (module docstring, 'Validity'). Index tuples give, for each group channel, the row /
    channel of that module holding it."""

    group: str
    producer: str
    rows: tuple[int, ...]
    bn: str
    bn_index: tuple[int, ...]
    activation: str
    consumers: dict[str, list[int]] = field(default_factory=dict)
    depthwise: str | None = None
    dw_index: tuple[int, ...] = ()
    dw_bn: str | None = None
    dw_bn_index: tuple[int, ...] = ()


def find_site(model: nn.Module, analysis: Analysis, group: str) -> tuple[Site | None, str]:
    """(Site, "") if closed-form compensation is valid for `group`, else (None, why not)."""
    g = analysis.group(group)
    members = analysis.members(group)
    modules = dict(model.named_modules())
    if not g.prunable:
        return None, f"not prunable ({g.reason})"
    if g.residual:
        return None, "tied across a residual add: the skip path cannot be compensated"
    if len(members.producers) != 1:
        return None, f"{len(members.producers)} producers"
    bad = [op for op in g.path_ops if op not in _PATH_OK]
    if bad:
        return None, f"non-compensable op(s) on the path: {', '.join(bad)}"
    if "relu" in g.path_ops and "relu6" in g.path_ops:
        return None, "mixes relu and relu6"
    activation = "relu6" if "relu6" in g.path_ops else "relu" if "relu" in g.path_ops else "identity"
    (producer, rows), = members.producers.items()
    prod = modules[producer]
    if not isinstance(prod, _DENSE) or getattr(prod, "groups", 1) != 1:
        return None, "producer is not a dense conv/linear"
    bn = analysis.bn_after.get(producer)
    if bn is None or bn not in members.passthrough:
        return None, "no BatchNorm right after the producer (no statistics to reason with)"
    if any(not isinstance(modules[c], _DENSE) or getattr(modules[c], "groups", 1) != 1 for c in members.consumers):
        return None, "a consumer is not a dense conv/linear"
    if not members.consumers:
        return None, "no consumer"
    channel_rows = channel_positions(rows, g.channels)
    bn_index = channel_positions(members.passthrough[bn], g.channels)
    if channel_rows is None or bn_index is None:
        return None, "producer/BN rows do not map one-to-one onto the group channels"
    others = [n for n in members.passthrough if n != bn]
    dw, dw_bn = _depthwise_chain(modules, others)
    if others and dw is None:
        return None, "unsupported per-channel modules on the path: " + ", ".join(others)
    site = Site(group, producer, channel_rows, bn, bn_index, activation, dict(members.consumers))
    if dw is not None:
        dw_index = channel_positions(members.passthrough[dw], g.channels)
        dw_bn_index = channel_positions(members.passthrough[dw_bn], g.channels)
        if dw_index is None or dw_bn_index is None:
            return None, "depthwise rows do not map one-to-one onto the group channels"
        site = Site(group, producer, channel_rows, bn, bn_index, activation, dict(members.consumers),
                    dw, dw_index, dw_bn, dw_bn_index)
    return site, ""


def channel_positions(mapping: list[int], channels: int) -> tuple[int, ...] | None:
    """Position of each group channel in `mapping` (None unless every channel appears exactly once)."""
    where = [-1] * channels
    for position, channel in enumerate(mapping):
        if channel >= 0:
            if where[channel] != -1:
                return None
            where[channel] = position
    return None if -1 in where else tuple(where)


def _depthwise_chain(modules: dict[str, nn.Module], others: list[str]) -> tuple[str | None, str | None]:
    """(depthwise conv, its BN) when the other passthrough modules are exactly those two, in that order."""
    if len(others) != 2:
        return None, None
    dw, bn = others
    conv = modules[dw]
    ok = (isinstance(conv, nn.modules.conv._ConvNd) and conv.groups == conv.in_channels == conv.out_channels
          and isinstance(modules[bn], _BN) and modules[bn].running_var is not None)
    return (dw, bn) if ok else (None, None)



@dataclass
class SiteTensors:
    """Everything the methods need about one site, in group channel order (float64)."""

    w: torch.Tensor            # ŵ [C, D]
    b: torch.Tensor            # b̂ [C]
    w_q: torch.Tensor | None   # Q(ŵ) [C, D] when quantizing
    mean: torch.Tensor         # BN output mean β [C]
    std: torch.Tensor          # BN output std |γ| [C]
    dw: torch.Tensor | None = None     # BN-folded dw kernels κ̂ [C, k]
    dw_q: torch.Tensor | None = None   # BN-folded quantized dw kernels
    dw_b: torch.Tensor | None = None   # dw folded bias h [C]
    dw_mean: torch.Tensor | None = None
    dw_std: torch.Tensor | None = None


def site_tensors(modules: dict[str, nn.Module], site: Site, bits_of: Callable[[str], int | None]) -> SiteTensors:
    prod = modules[site.producer]
    bn = modules[site.bn]
    rows = torch.as_tensor(site.rows, dtype=torch.long)
    bn_idx = torch.as_tensor(site.bn_index, dtype=torch.long)
    weight = prod.weight.detach()
    scale, shift = bn_scale_shift(bn)
    raw = weight.double().reshape(weight.shape[0], -1)[rows]
    bias = prod.bias.detach().double()[rows] if prod.bias is not None else torch.zeros(len(rows), dtype=torch.float64)
    w = scale[bn_idx, None] * raw
    b = scale[bn_idx] * bias + shift[bn_idx]
    w_q = None
    if (bits := bits_of(site.producer)) is not None:
        w_q = scale[bn_idx, None] * quantize_weight(weight, bits).double().reshape(weight.shape[0], -1)[rows]
    mean, std = bn_output_moments(bn)
    st = SiteTensors(w, b, w_q, mean[bn_idx], std[bn_idx])
    if site.depthwise is not None:
        conv, dbn = modules[site.depthwise], modules[site.dw_bn]
        dw_idx = torch.as_tensor(site.dw_index, dtype=torch.long)
        dbn_idx = torch.as_tensor(site.dw_bn_index, dtype=torch.long)
        kernels, kbias = folded_filters(conv.weight, conv.bias, None)
        dscale, dshift = bn_scale_shift(dbn)
        st.dw = dscale[dbn_idx, None] * kernels[dw_idx]
        st.dw_b = dscale[dbn_idx] * kbias[dw_idx] + dshift[dbn_idx]
        if (bits := bits_of(site.depthwise)) is not None:
            qk = quantize_weight(conv.weight, bits).double().reshape(conv.weight.shape[0], -1)
            st.dw_q = dscale[dbn_idx, None] * qk[dw_idx]
        st.dw_mean, st.dw_std = (t[dbn_idx] for t in bn_output_moments(dbn))
    return st


def selection_matrix(channels: int, keep: list[int]) -> torch.Tensor:
    m = torch.zeros(channels, len(keep), dtype=torch.float64)
    m[torch.as_tensor(keep, dtype=torch.long), torch.arange(len(keep))] = 1.0
    return m


def pruned_channels(channels: int, keep: list[int]) -> list[int]:
    kept = set(keep)
    return [c for c in range(channels) if c not in kept]


def position_channels(mapping: list[int]) -> list[tuple[int, int]]:
    """(input position, group channel) for the positions of a consumer that belong to the group."""
    return [(i, c) for i, c in enumerate(mapping) if c >= 0]
