"""Score the channels of one group (higher = more important), data-free, from weights only.

Methods (all return float64 numpy [C], C = the group's channel count, in the group's canonical channel order):
  "l1":       s_c = Σ_p Σ |W_p[k]|          over every producer p and every output row k of p that is channel c
  "l2":       s_c = sqrt(Σ_p Σ W_p[k]²)      (the L2 norm of the concatenated raw producer filters)
  "bn_l2":    as "l2" on BN-scaled filters (γ_k/σ_k)·W_p[k], σ_k = sqrt(running_var_k + eps), for producers whose only
              user is a BatchNorm (others keep raw filters). It ignores the folded bias β − γμ/σ, which is why it ranks
              poorly on its own (BASELINES.md): a channel with a tiny filter can still output a large constant.
  "group_l2": group magnitude in the spirit of Torch-Pruning's MagnitudeImportance(p=2): every module m touching the
              group gives a local score a_m[c] = Σ w² over its weights that belong to channel c
              (producer: output rows; consumer conv/linear: input columns; BatchNorm: γ_c²; depthwise conv: filter c),
              normalised by its mean over the channels m touches, a_m ← a_m / mean(a_m); then
              s_c = mean over the modules touching c of a_m[c]. The per-module normalisation keeps a wide consumer
              (e.g. a 1x1 conv with 1280 outputs) from drowning the producer's signal.
  "group_l2_raw": the same without the per-module normalisation, s_c = mean over modules touching c of Σ w².
              On a block-internal group this ranks exactly like Torch-Pruning 1.6.1's default
              MagnitudeImportance(p=2) (its mean-normalisation comes after the sum, so it does not change the order):
              pruning CIFAR ResNet-56 block-internal groups with it reproduces BASELINES.md column (3).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.core.errors import InputError

IMPORTANCE = {"l1", "l2", "bn_l2", "group_l2", "group_l2_raw"}


def channel_importance(model: nn.Module, analysis: Analysis, group: str, method: str) -> np.ndarray:
    """Per-channel importance of `group` by `method` (one of IMPORTANCE); float64 [C]."""
    if method not in IMPORTANCE:
        raise InputError(f"unknown importance '{method}'; choose one of {sorted(IMPORTANCE)}")
    channels = analysis.group(group).channels
    members = analysis.members(group)
    modules = dict(model.named_modules())
    if method in ("group_l2", "group_l2_raw"):
        return _group_l2(modules, members, channels, normalise=method == "group_l2")
    scores = np.zeros(channels, dtype=np.float64)
    for name, mapping in members.producers.items():
        rows = _rows(modules[name].weight)
        if method == "bn_l2" and name in analysis.bn_after:
            rows = rows * _bn_scale(modules[analysis.bn_after[name]])[:, None]
        per_row = np.abs(rows).sum(axis=1) if method == "l1" else (rows ** 2).sum(axis=1)
        _scatter_add(scores, mapping, per_row)
    return scores if method == "l1" else np.sqrt(scores)


def _rows(weight: torch.Tensor) -> np.ndarray:
    """A weight as float64 [out, everything else]."""
    return weight.detach().to(torch.float64).reshape(weight.shape[0], -1).cpu().numpy()


def _bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> np.ndarray:
    """γ/σ per channel (γ = 1 without affine, σ = 1 without running statistics)."""
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(bn.num_features, dtype=torch.float64)
    if bn.running_var is not None:
        gamma = gamma / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    return gamma.cpu().numpy()


def _scatter_add(target: np.ndarray, mapping: list[int], values: np.ndarray) -> np.ndarray:
    """target[mapping[k]] += values[k] for every position k that belongs to the group; returns the touched mask."""
    idx = np.asarray(mapping, dtype=np.int64)
    valid = idx >= 0
    np.add.at(target, idx[valid], values[valid])
    touched = np.zeros(target.shape[0], dtype=bool)
    touched[idx[valid]] = True
    return touched


def _local_scores(module: nn.Module, role: str) -> np.ndarray | None:
    """Σ w² per channel position of one module in one role; None if the module has nothing to score."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.weight is None:
            return None
        return module.weight.detach().double().cpu().numpy() ** 2
    weight = module.weight.detach().to(torch.float64)
    if role == "consumer":
        weight = weight.transpose(0, 1)
    return (weight.reshape(weight.shape[0], -1) ** 2).sum(dim=1).cpu().numpy()


def _group_l2(modules: dict[str, nn.Module], members, channels: int, normalise: bool) -> np.ndarray:
    total = np.zeros(channels, dtype=np.float64)
    count = np.zeros(channels, dtype=np.float64)
    roles = [(members.producers, "producer"), (members.passthrough, "passthrough"), (members.consumers, "consumer")]
    for table, role in roles:
        for name, mapping in table.items():
            values = _local_scores(modules[name], role)
            if values is None:
                continue
            local = np.zeros(channels, dtype=np.float64)
            touched = _scatter_add(local, mapping, values)
            mean = local[touched].mean()
            if normalise and mean > 0:
                local /= mean
            total += local
            count += touched
    return np.divide(total, count, out=np.zeros(channels), where=count > 0)
