"""GPU float arithmetic emulated on the CPU: a copy of a PyTorch model that rounds as an fp16 or TF32 engine would.

What is rounded (docs/methods/parity_tolerance.md derives the parity tolerance from exactly this model):
- fp16: every weight and buffer is stored in fp16 (round to nearest even, clamped to +-65504 as the fp16 export
  pass, export/passes/fp16.py, clamps), every tensor entering or leaving any module is rounded to fp16 (activations
  live in fp16 memory), and products are accumulated in fp32 (what tensor-core convolutions and GEMMs do).
- tf32: the inputs and weights of every Conv/Linear are rounded to TF32 (10 explicit mantissa bits, round to
  nearest even, fp32 exponent); accumulation and everything else stays fp32 (cuDNN/cuBLAS TF32 math mode).
Functional ops between modules (a residual add written as `a + b`) compute in fp32 and are rounded where their
result enters the next module, so the emulation is slightly kinder than a GPU for fp16 (one rounding fewer per op).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

FP16_MAX = 65504.0
ARITHMETICS = ("fp32", "tf32", "fp16")


def round_fp16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to the nearest fp16 value (ties to even) and returned as float32; clamped to the fp16 range."""
    return t.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """t (float32) with its 23-bit mantissa rounded to TF32's 10 bits, ties to even; inf and NaN pass through."""
    t = t.float().contiguous()
    bits = t.view(torch.int32)
    lsb = (bits >> 13) & 1
    rounded = ((bits + 0xFFF + lsb) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(t), rounded, t)


def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    return value


def emulated(model: nn.Module, arithmetic: str) -> nn.Module:
    """A deep copy of `model` (eval mode, float32, CPU) that computes in `arithmetic` ("fp32": unchanged)."""
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic {arithmetic!r} is not one of {', '.join(ARITHMETICS)}")
    model = copy.deepcopy(model).float().eval()
    if arithmetic == "fp32":
        return model
    with torch.no_grad():
        for module in model.modules():
            if arithmetic == "fp16":
                for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                    if tensor.is_floating_point():
                        tensor.copy_(round_fp16(tensor))
            elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                module.weight.copy_(round_tf32(module.weight))
    for module in model.modules():
        if arithmetic == "fp16":
            module.register_forward_pre_hook(lambda m, args: _map_tensors(args, round_fp16))
            module.register_forward_hook(lambda m, args, out: _map_tensors(out, round_fp16))
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            module.register_forward_pre_hook(lambda m, args: _map_tensors(args, round_tf32))
    return model


def corrupt_one_weight(model: nn.Module, factor: float = -1.0, layer: str | None = None) -> tuple[nn.Module, str]:
    """A copy of `model` whose largest-magnitude weight in one conv/linear layer is multiplied by `factor`.

    The smallest wrong engine we want parity to catch: one weight miscompiled (the default flips its sign), in
    `layer` (a module name) or, by default, the middle conv/linear layer. Returns (model, "layer.weight[index]").
    A corruption whose effect on the logits is below the precision's own rounding noise cannot be told apart from
    a correct engine by any rule that passes correct ones; docs/methods/parity_tolerance.md gives the threshold.
    """
    model = copy.deepcopy(model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ValueError("corrupt_one_weight: the model has no Conv2d or Linear layer")
    if layer is None:
        name, module = layers[len(layers) // 2]
    else:
        found = dict(layers)
        if layer not in found:
            raise ValueError(f"corrupt_one_weight: no Conv2d/Linear layer named {layer!r}")
        name, module = layer, found[layer]
    with torch.no_grad():
        flat = module.weight.view(-1)
        index = int(flat.abs().argmax())
        flat[index] *= factor
    return model, f"{name}.weight[{index}]"
