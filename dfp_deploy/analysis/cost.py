"""Count multiply-accumulates (per image) and parameters of a model.

MACs are the multiply-accumulates of conv, linear and attention for ONE image:
  conv:   (output elements per image) · (in_channels / groups) · prod(kernel_size)
  linear: (output elements per image) · in_features
  matmul of two tensors (q @ kᵀ, attn @ v, bmm, mm, ...): (output elements per image) · (shared dim)
  scaled_dot_product_attention(q, k, v): per image, heads · L · S · (E + Ev)   (q kᵀ, then the weights times v)
  nn.MultiheadAttention: the q, k, v and output projections (as linear) + L · S · 2E for the two products
(a transposed conv is counted from its input side: input elements · out_channels/groups · prod(kernel)).
BatchNorm, LayerNorm, softmax, activations, pooling and adds are not counted. A module called twice is counted
twice. Convs and Linears are counted by module hooks; the attention products, which are functions rather than
modules (nn.MultiheadAttention calls its projections as functions too), by a torch-function mode during the same
forward, charged to the innermost module running. Derivation and a known-answer case: docs/methods/macs.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dfp_deploy.core.modes import eval_mode


def module_macs(module: nn.Module, in_shape, out_shape) -> int:
    """MACs of one call of a conv / Linear for ONE image, given its batched input and output shapes; 0 otherwise."""
    if in_shape is None or out_shape is None or len(out_shape) == 0:
        return 0
    batch = out_shape[0] if len(out_shape) > 1 else 1
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        if module.transposed:
            return math.prod(in_shape) // batch * (module.out_channels // module.groups) * kernel
        return math.prod(out_shape) // batch * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return math.prod(out_shape) // batch * module.in_features
    return 0


def macs_by_module(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs per image of every conv / Linear that ran (summed over its calls), by module name, measured with forward
    hooks on one run of `example_input` (eval mode, no grad; the model's train/eval flags are restored); attention
    products are charged to the innermost module that ran them."""
    names = {m: n for n, m in model.named_modules()}
    totals: dict[str, int] = {}
    running: list[str] = [""]

    def enter(module, inputs):
        running.append(names[module])

    def hook(module, inputs, output):
        running.pop()
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and torch.is_tensor(output) and inputs \
                and torch.is_tensor(inputs[0]):
            name = names[module]
            totals[name] = totals.get(name, 0) + module_macs(module, tuple(inputs[0].shape), tuple(output.shape))

    def charge(macs: int) -> None:
        totals[running[-1]] = totals.get(running[-1], 0) + macs

    batch = int(example_input.shape[0]) if example_input.dim() > 0 else 1
    handles = [h for m in model.modules()
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(hook))]
    try:
        with eval_mode(model), torch.no_grad(), _AttentionCounter(charge, batch):
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return {name: macs for name, macs in totals.items() if macs}


class _AttentionCounter(TorchFunctionMode):
    """Counts the products of two tensors that no conv / Linear hook sees (see the module docstring)."""

    def __init__(self, charge, batch: int) -> None:
        super().__init__()
        self.charge, self.batch = charge, max(batch, 1)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            macs = _function_macs(getattr(func, "__name__", ""), args, kwargs, out)
        except Exception:  # an odd call (unbatched, sparse, ...) is left uncounted rather than failing the count
            macs = 0
        if macs:
            self.charge(macs // self.batch)
        return out


_PRODUCTS = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm"}


def _function_macs(name: str, args: tuple, kwargs: dict, out) -> int:
    """MACs of one call, all images together; 0 for anything that is not a product counted here."""
    if name in _PRODUCTS:
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm", "addbmm") else (args[0], args[1])
        if name == "__rmatmul__":
            a, b = b, a
        if not (torch.is_tensor(a) and torch.is_tensor(b) and torch.is_tensor(out)) or a.dim() == 0:
            return 0
        return out.numel() * int(a.shape[-1])
    if name == "scaled_dot_product_attention":
        q, k, v = (kwargs.get(key, args[i] if len(args) > i else None) for i, key in enumerate(("query", "key",
                                                                                                 "value")))
        return math.prod(q.shape[:-1]) * int(k.shape[-2]) * (int(q.shape[-1]) + int(v.shape[-1]))
    if name == "multi_head_attention_forward":
        return _mha_macs(args, kwargs)
    return 0


def _mha_macs(args: tuple, kwargs: dict) -> int:
    """F.multi_head_attention_forward(query, key, value, embed_dim, num_heads, ...): query [L, N, E] (or [L, E])."""
    query, key, value = args[0], args[1], args[2]
    embed = int(args[3]) if len(args) > 3 else int(kwargs["embed_dim_to_check"])
    lq, lk = int(query.shape[0]), int(key.shape[0])
    n = int(query.shape[1]) if query.dim() == 3 else 1
    kdim, vdim = int(key.shape[-1]), int(value.shape[-1])
    projections = lq * embed * int(query.shape[-1]) + lk * embed * kdim + lk * embed * vdim + lq * embed * embed
    return n * (projections + 2 * lq * lk * embed)


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Conv + linear MACs per image (macs_by_module, summed)."""
    return sum(macs_by_module(model, example_input).values())


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
