"""Physically remove channels: return a copy of the model whose tensors are smaller, as a PrunePlan says.

Every module touching a planned group is resized position by position from the group's member mappings
(analysis.members): producers lose output rows (weight, bias), BatchNorm and depthwise convs lose channels
(weight, bias, running statistics; a depthwise conv's `groups` follows), consumers lose input columns, and each
ChannelPadShortcut keeps exactly the pad positions whose channel survives (pad_before/pad_after recounted).
A module shared by several groups (e.g. a BatchNorm after a concat) gets the intersection of their keep masks.

Mixing. `mixing[g]` = M ∈ R^{C×K} states "activation of original channel c ≈ Σ_k M[c,k] · activation of kept channel
keep[k]". A consumer computes Σ_c W[:, c]·a_c ≈ Σ_k (Σ_c W[:, c] M[c,k]) · a_keep[k], so its new input column for
kept channel k is W_new[:, k] = Σ_c W_old[:, c] M[c,k], taken over this group's input positions only (positions of
other groups are untouched). Plain pruning is M = the selection matrix (M[keep[k], k] = 1), which we apply as an
exact index selection. If a consumer sees a group channel at several input positions (e.g. after cat([x, x])),
the j-th occurrence of every channel is mixed with the j-th occurrences only.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.analysis.trace import SHORTCUT_CLASS_NAME
from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import PrunePlan


def prune_model(model: nn.Module, analysis: Analysis, plan: PrunePlan,
                mixing: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A deep copy of `model` with the channels not in `plan.keep` removed (the original is untouched)."""
    keep = validate_plan(analysis, plan)
    mixing = _validate_mixing(analysis, keep, mixing or {})
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    masks = _Masks(modules)
    for name, kept in keep.items():
        masks.remove(analysis, name, set(kept))
    masks.check_nothing_emptied()
    mixers = _consumer_mixers(analysis, keep, mixing)
    for name in masks.touched() | set(mixers):
        _resize_module(name, modules[name], masks, mixers.get(name, []))
    return pruned


def validate_plan(analysis: Analysis, plan: PrunePlan) -> dict[str, tuple[int, ...]]:
    """Check `plan` against `analysis` (InputError naming the problem); return its keep lists sorted."""
    checked = {}
    for name, kept in plan.keep.items():
        group = analysis.group(name)
        if not group.prunable:
            raise InputError(f"prune plan touches group '{name}', which cannot be pruned: {group.reason}")
        values = list(kept)
        if not values:
            raise InputError(f"prune plan keeps no channel of group '{name}'; keep at least one")
        if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in values):
            raise InputError(f"prune plan for group '{name}' has non-integer channel indices")
        if len(set(values)) != len(values):
            raise InputError(f"prune plan for group '{name}' lists a channel twice")
        bad = [int(v) for v in values if not 0 <= v < group.channels]
        if bad:
            raise InputError(f"prune plan for group '{name}' keeps channel {bad[0]}, outside 0..{group.channels - 1}")
        checked[name] = tuple(sorted(int(v) for v in values))
    return checked


def _validate_mixing(analysis: Analysis, keep: dict[str, tuple[int, ...]],
                     mixing: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixing matrices come from code (reconstruction), so problems are bugs: ValueError."""
    checked = {}
    for name, matrix in mixing.items():
        if name not in {g.name for g in analysis.groups}:
            raise ValueError(f"mixing given for unknown group '{name}'")
        group = analysis.group(name)
        if not group.prunable:
            raise ValueError(f"mixing given for group '{name}', which is not prunable ({group.reason})")
        kept = len(keep.get(name, range(group.channels)))
        if not torch.is_tensor(matrix) or tuple(matrix.shape) != (group.channels, kept):
            shape = tuple(matrix.shape) if torch.is_tensor(matrix) else type(matrix).__name__
            raise ValueError(f"mixing for group '{name}' must have shape ({group.channels}, {kept}), got {shape}")
        checked[name] = matrix.detach().to(torch.float64).cpu()
    return checked


class _Masks:
    """Boolean keep masks per module dimension: 'out' (producer rows / BN / depthwise channels), 'in' (consumer
    columns), 'before'/'after' (shortcut pad positions). Absent = keep everything."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.masks: dict[tuple[str, str], np.ndarray] = {}

    def remove(self, analysis: Analysis, group: str, kept: set[int]) -> None:
        members = analysis.members(group)
        for table, dim in ((members.producers, "out"), (members.passthrough, "out"), (members.consumers, "in")):
            for name, mapping in table.items():
                self._drop(name, dim, mapping, kept)
        for name, (before, after) in members.shortcuts.items():
            self._drop(name, "before", before, kept)
            self._drop(name, "after", after, kept)

    def _drop(self, name: str, dim: str, mapping, kept: set[int]) -> None:
        size = _dim_size(self.modules[name], dim)
        if len(mapping) != size:
            raise ValueError(f"analysis does not match the model: '{name}' has {size} {dim} channels, "
                             f"the analysis maps {len(mapping)}")
        mask = self.masks.setdefault((name, dim), np.ones(size, dtype=bool))
        for position, channel in enumerate(mapping):
            if channel >= 0 and channel not in kept:
                mask[position] = False

    def get(self, name: str, dim: str) -> np.ndarray | None:
        return self.masks.get((name, dim))

    def touched(self) -> set[str]:
        return {name for name, _ in self.masks}

    def check_nothing_emptied(self) -> None:
        for (name, dim), mask in self.masks.items():
            if dim in ("out", "in") and mask.size and not mask.any():
                raise InputError(f"prune plan removes every {dim}put channel of module '{name}'; keep at least one "
                                 "of the group channels it uses")


def _dim_size(module: nn.Module, dim: str) -> int:
    if dim == "before":
        return module.pad_before
    if dim == "after":
        return module.pad_after
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.Linear):
        return module.out_features if dim == "out" else module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if dim == "out" else module.in_channels
    raise ValueError(f"module of type {type(module).__name__} cannot be resized")


def _consumer_mixers(analysis: Analysis, keep: dict[str, tuple[int, ...]], mixing: dict[str, torch.Tensor]):
    """consumer module -> [(its input mapping for group g, M_g, keep_g)] for every group with a mixing matrix."""
    mixers: dict[str, list] = {}
    for name, matrix in mixing.items():
        kept = keep.get(name, tuple(range(analysis.group(name).channels)))
        for consumer, mapping in analysis.members(name).consumers.items():
            mixers.setdefault(consumer, []).append((mapping, matrix, kept))
    return mixers


def _resize_module(name: str, module: nn.Module, masks: _Masks, mixers: list) -> None:
    if type(module).__name__ == SHORTCUT_CLASS_NAME:
        for dim in ("before", "after"):
            mask = masks.get(name, dim)
            if mask is not None:
                setattr(module, f"pad_{dim}", int(mask.sum()))
        return
    out_mask, in_mask = masks.get(name, "out"), masks.get(name, "in")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        _resize_batchnorm(module, out_mask)
    elif isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        _resize_depthwise(module, out_mask)
    elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        _resize_dense(module, out_mask, in_mask, mixers)
    else:
        raise ValueError(f"module '{name}' of type {type(module).__name__} cannot be resized")


def _index(mask: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(np.flatnonzero(mask), dtype=torch.long, device=device)


def _set_param(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    # Standard strides, not just `.contiguous()`: an einsum can return a 1×1 conv weight with channels-last strides
    # (e.g. (32, 1, 32, 32) for [16, 32, 1, 1]) that still counts as contiguous; the conv then emits channels-last
    # activations and torch.export pins the batch size (EfficientNet-Lite0 after lmmse: no dynamic-batch export).
    old = getattr(module, attr)
    setattr(module, attr, nn.Parameter(value.clone(memory_format=torch.contiguous_format),
                                       requires_grad=old.requires_grad))


def _resize_batchnorm(bn: nn.modules.batchnorm._BatchNorm, mask: np.ndarray | None) -> None:
    if mask is None:
        return
    idx = _index(mask, bn.running_mean.device if bn.running_mean is not None else "cpu")
    for attr in ("weight", "bias"):
        if getattr(bn, attr) is not None:
            _set_param(bn, attr, getattr(bn, attr).data.index_select(0, idx))
    for attr in ("running_mean", "running_var"):
        if getattr(bn, attr) is not None:
            setattr(bn, attr, getattr(bn, attr).index_select(0, idx).contiguous())
    bn.num_features = int(mask.sum())


def _resize_depthwise(conv: nn.modules.conv._ConvNd, mask: np.ndarray | None) -> None:
    if mask is None:
        return
    idx = _index(mask, conv.weight.device)
    _set_param(conv, "weight", conv.weight.data.index_select(0, idx))
    if conv.bias is not None:
        _set_param(conv, "bias", conv.bias.data.index_select(0, idx))
    conv.in_channels = conv.out_channels = conv.groups = int(mask.sum())


def _resize_dense(module: nn.Module, out_mask, in_mask, mixers: list) -> None:
    weight = module.weight.data
    if out_mask is not None:
        idx = _index(out_mask, weight.device)
        weight = weight.index_select(0, idx)
        if module.bias is not None:
            _set_param(module, "bias", module.bias.data.index_select(0, idx))
    in_size = weight.shape[1]
    in_keep = in_mask if in_mask is not None else np.ones(in_size, dtype=bool)
    if mixers:
        transform = _input_transform(in_keep, mixers).to(weight.device)
        weight = torch.einsum("oi...,ij->oj...", weight.to(torch.float64), transform).to(module.weight.dtype)
    elif in_mask is not None:
        weight = weight.index_select(1, _index(in_mask, weight.device))
    _set_param(module, "weight", weight)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape[0], weight.shape[1]
    else:
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1]


def _input_transform(in_keep: np.ndarray, mixers: list) -> torch.Tensor:
    """T ∈ R^{in_old × in_new} with W_new = W_old · T over the input dim (see the module docstring)."""
    kept_positions = np.flatnonzero(in_keep)
    new_position = {int(p): j for j, p in enumerate(kept_positions)}
    transform = torch.zeros(in_keep.size, kept_positions.size, dtype=torch.float64)
    for p, j in new_position.items():
        transform[p, j] = 1.0
    for mapping, matrix, kept in mixers:
        column_of = {channel: k for k, channel in enumerate(kept)}
        channels = np.asarray(mapping, dtype=np.int64)
        occurrence = np.asarray(_occurrences(mapping), dtype=np.int64)
        for level in np.unique(occurrence[channels >= 0]):
            rows = np.flatnonzero((channels >= 0) & (occurrence == level))
            targets = [q for q in rows if int(channels[q]) in column_of]
            if not targets:
                continue
            cols = torch.as_tensor([new_position[int(q)] for q in targets], dtype=torch.long)
            ks = torch.as_tensor([column_of[int(channels[q])] for q in targets], dtype=torch.long)
            transform[:, cols] = 0.0
            block = matrix[torch.as_tensor(channels[rows], dtype=torch.long)][:, ks]
            transform[torch.as_tensor(rows, dtype=torch.long)[:, None], cols[None, :]] = block
    return transform


def _occurrences(mapping: list[int]) -> list[int]:
    """For each position, how many earlier positions carry the same group channel."""
    seen: dict[int, int] = {}
    result = []
    for channel in mapping:
        result.append(seen.get(channel, 0))
        seen[channel] = seen.get(channel, 0) + 1
    return result
