"""The calibration objective: the frozen teacher's layer outputs and the normalised layer-output error.

L(θ) = Σ_l ‖Y_l(x; θ) − Y°_l(x)|_K‖² / ‖Y°_l(x)|_K‖² over every Conv, Linear and BatchNorm output l, |_K restricting
the original output to the channels the student still has (docs/methods/calibration.md, "Objective").
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from dfp_deploy.analysis import Analysis

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
EPS = 1e-12


class Recorder:
    """Forward hooks that collect every call's output of the named layers (a shared module gives several)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in names if name in modules]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.outputs[name].append(output)
        return hook

    def take(self) -> dict[str, list[torch.Tensor]]:
        taken = self.outputs
        self.outputs = {name: [] for name in taken}
        return taken

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class Teacher:
    """The frozen original: layer outputs without gradients."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, names: list[str]) -> dict[str, list[torch.Tensor]]:
        recorder = Recorder(self.model, names)
        try:
            self.model(x)
        finally:
            recorder.close()
        return recorder.take()


def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the Conv/Linear/BN layers in the order a forward pass first calls them."""
    called: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: called.append(name) if name not in called else None))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return called


def normalised_error(student: dict[str, list[torch.Tensor]], target: dict[str, list[torch.Tensor]],
                      kept_out: dict[str, torch.Tensor]) -> torch.Tensor:
    terms = []
    for name, outs in student.items():
        for out, ref in zip(outs, target[name]):
            if name in kept_out:
                ref = ref.index_select(1, kept_out[name])
            terms.append((out - ref).pow(2).sum() / (ref.pow(2).sum() + EPS))
    return torch.stack(terms).sum()


def layer_loss(teacher: Teacher, student: nn.Module, x: torch.Tensor, names: list[str],
          kept_out: dict[str, torch.Tensor]) -> torch.Tensor:
    target = teacher.outputs(x, names)
    recorder = Recorder(student, names)
    try:
        student(x)
    finally:
        recorder.close()
    return normalised_error(recorder.take(), target, kept_out)


def mean_layer_loss(teacher: Teacher, student: nn.Module, inputs: torch.Tensor, batch: int, names: list[str],
               kept_out: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        losses = [layer_loss(teacher, student, x, names, kept_out).item() for x in batches(inputs, batch)]
    return float(sum(losses) / len(losses))


def batches(inputs: torch.Tensor, batch: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    index = torch.randperm(len(inputs), generator=generator) if generator is not None else torch.arange(len(inputs))
    for start in range(0, len(inputs), batch):
        yield inputs[index[start:start + batch]]


def kept_positions(analysis: Analysis, keep: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    masks: dict[str, list[bool]] = {}
    for group, kept in keep.items():
        kept_set = set(kept)
        members = analysis.members(group)
        for table in (members.producers, members.passthrough):
            for name, mapping in table.items():
                mask = masks.setdefault(name, [True] * len(mapping))
                for position, channel in enumerate(mapping):
                    if channel >= 0 and channel not in kept_set:
                        mask[position] = False
    return {name: torch.tensor([i for i, ok in enumerate(mask) if ok], dtype=torch.long)
            for name, mask in masks.items() if not all(mask)}
