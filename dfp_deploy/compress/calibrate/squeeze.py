"""Phase 1 of calibration: fade the channels a plan removes into the kept ones, on the unpruned model.

Adam on the layer-output error while every weight the plan removes is pulled by the proximal step
w ← w·(T − t)/(T − t + 1) after step t of T, so it is exactly zero at the end and cutting it changes nothing
(docs/methods/calibration.md, "Phase 1").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.compress.calibrate.objective import Teacher, batches, layer_loss


def squeeze(teacher: Teacher, model: nn.Module, analysis: Analysis, keep: dict[str, tuple[int, ...]],
            inputs: torch.Tensor, names: list[str], epochs: int, batch: int, lr: float, seed: int,
            tick: Callable[[float], None]) -> tuple[nn.Module, list[float]]:
    """(a squeezed copy of `model`, the mean loss of each epoch); `tick(loss)` after every step."""
    student = copy.deepcopy(model).eval()
    epoch_losses: list[float] = []
    if epochs == 0:
        return student, epoch_losses
    pulls = _pull_targets(student, analysis, keep)
    params = layer_parameters(student, names)
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    total = epochs * math.ceil(len(inputs) / batch)
    step = 0
    for _ in range(epochs):
        losses = []
        for x in batches(inputs, batch, generator):
            optimiser.zero_grad(set_to_none=True)
            loss = layer_loss(teacher, student, x, names, {})
            loss.backward()
            optimiser.step()
            step += 1
            _proximal_pull(pulls, factor=(total - step) / (total - step + 1))
            losses.append(loss.item())
            tick(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    return student, epoch_losses


def _pull_targets(model: nn.Module, analysis: Analysis,
                  keep: dict[str, tuple[int, ...]]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(parameter, dim, positions) of every weight that belongs to a channel the plan removes."""
    modules = dict(model.named_modules())
    removed: dict[tuple[str, int], set[int]] = {}
    for group, kept in keep.items():
        kept_set = set(kept)
        members = analysis.members(group)
        for table, dim in ((members.producers, 0), (members.passthrough, 0), (members.consumers, 1)):
            for name, mapping in table.items():
                positions = {p for p, c in enumerate(mapping) if c >= 0 and c not in kept_set}
                removed.setdefault((name, dim), set()).update(positions)
    targets = []
    for (name, dim), positions in sorted(removed.items()):
        if not positions:
            continue
        index = torch.tensor(sorted(positions), dtype=torch.long)
        module = modules[name]
        if getattr(module, "weight", None) is not None:
            targets.append((module.weight, dim, index))
        if dim == 0 and getattr(module, "bias", None) is not None:
            targets.append((module.bias, 0, index))
    return targets


@torch.no_grad()
def _proximal_pull(targets: list[tuple[torch.Tensor, int, torch.Tensor]], factor: float) -> None:
    for param, dim, index in targets:
        param.index_copy_(dim, index, param.index_select(dim, index) * factor)


def layer_parameters(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    modules = dict(model.named_modules())
    return [p for name in names for p in modules[name].parameters(recurse=False)]
