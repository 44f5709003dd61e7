"""Trace a model with torch.fx and say, for every graph node, what it does to the channel dimension (dim 1).

The tracer keeps every convolution (including user subclasses such as a TF-"SAME" `Conv2dSame`), Linear,
BatchNorm and the option-A `ChannelPadShortcut` as single leaf nodes, so the graph speaks in modules that the
pruner can resize. `ShapeProp` then records every tensor's shape for one example input.

`describe_node` maps a node to a `NodeOp`: a small verdict that `groups.py` turns into channel-slot algebra.
The verdict is decided from the op's identity AND the recorded shapes, and it is conservative: whatever is not
understood, or would stop being valid once the channel count changes (a hard-coded channel size in `view`, a
functional channel pad, a module with weights called twice, ...), is a BOUNDARY with a reason.

Path-op labels recorded for reconstruction (which needs to know what lies between producer and consumer):
"bn", "relu", "relu6", "leaky_relu", "depthwise", "pool" (max/avg/adaptive pooling, spatial mean/sum/amax/amin),
"flatten" (view/reshape/flatten/squeeze/unsqueeze that keep dims 0 and 1), "pad" (spatial or zero channel
padding), "add"/"sub"/"mul"/"div" (two channel-carrying tensors coupled position by position), "add_const"/"sub_const"
(a scalar or channel-broadcast tensor added), "scale" (multiplied/divided by a scalar or channel-broadcast tensor),
"cat", "resize" (interpolate/upsample), "other-elementwise:<name>" (any other per-element function).
Layout-only ops with no effect on values (dropout, identity, contiguous, clone, dtype casts, spatial permutes) record
nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from dfp_deploy.core.modes import eval_mode

# --- module tables -------------------------------------------------------------------------------------------

# ReLU6 subclasses Hardtanh, so order matters: the first matching entry wins.
_ELEMENTWISE_MODULES: tuple[tuple[type, str], ...] = (
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu6"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.Hardtanh, "other-elementwise:hardtanh"),
    (nn.Hardswish, "other-elementwise:hardswish"),
    (nn.Hardsigmoid, "other-elementwise:hardsigmoid"),
    (nn.SiLU, "other-elementwise:silu"),
    (nn.Sigmoid, "other-elementwise:sigmoid"),
    (nn.Tanh, "other-elementwise:tanh"),
    (nn.GELU, "other-elementwise:gelu"),
    (nn.ELU, "other-elementwise:elu"),
    (nn.Mish, "other-elementwise:mish"),
    (nn.Softplus, "other-elementwise:softplus"),
    (nn.Dropout, ""),
    (nn.Dropout1d, ""),
    (nn.Dropout2d, ""),
    (nn.Dropout3d, ""),
    (nn.AlphaDropout, ""),
    (nn.Identity, ""),
)
_POOL_MODULES: tuple[tuple[type, int], ...] = (  # (type, number of spatial dims)
    (nn.MaxPool1d, 1), (nn.MaxPool2d, 2), (nn.MaxPool3d, 3),
    (nn.AvgPool1d, 1), (nn.AvgPool2d, 2), (nn.AvgPool3d, 3),
    (nn.AdaptiveAvgPool1d, 1), (nn.AdaptiveAvgPool2d, 2), (nn.AdaptiveAvgPool3d, 3),
    (nn.AdaptiveMaxPool1d, 1), (nn.AdaptiveMaxPool2d, 2), (nn.AdaptiveMaxPool3d, 3),
)
_SPATIAL_MODULES: tuple[tuple[type, str], ...] = (
    (nn.ZeroPad2d, "pad"), (nn.ConstantPad1d, "pad"), (nn.ConstantPad2d, "pad"), (nn.ConstantPad3d, "pad"),
    (nn.ReflectionPad1d, "pad"), (nn.ReflectionPad2d, "pad"), (nn.ReplicationPad1d, "pad"),
    (nn.ReplicationPad2d, "pad"), (nn.Upsample, "resize"),
)
SHORTCUT_CLASS_NAME = "ChannelPadShortcut"

# --- function / method tables (keyed by normalised name, see _function_key) ----------------------------------

_UNARY_FUNCTIONS: dict[str, str] = {
    "relu": "relu", "relu6": "relu6", "leaky_relu": "leaky_relu",
    "hardtanh": "other-elementwise:hardtanh", "hardswish": "other-elementwise:hardswish",
    "hardsigmoid": "other-elementwise:hardsigmoid", "silu": "other-elementwise:silu",
    "sigmoid": "other-elementwise:sigmoid", "tanh": "other-elementwise:tanh", "gelu": "other-elementwise:gelu",
    "elu": "other-elementwise:elu", "mish": "other-elementwise:mish", "softplus": "other-elementwise:softplus",
    "clamp": "other-elementwise:clamp", "clip": "other-elementwise:clamp", "abs": "other-elementwise:abs",
    "exp": "other-elementwise:exp", "neg": "other-elementwise:neg", "sqrt": "other-elementwise:sqrt",
    "square": "other-elementwise:square",
    "dropout": "", "dropout1d": "", "dropout2d": "", "dropout3d": "", "alpha_dropout": "",
    "contiguous": "", "clone": "", "detach": "", "float": "", "to": "", "type": "",
}
_POOL_FUNCTIONS: dict[str, int] = {
    "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3,
    "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3,
    "adaptive_max_pool1d": 1, "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3,
}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_RESHAPES = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
_BINARY = {"add": "add", "iadd": "add", "sub": "sub", "isub": "sub", "mul": "mul", "imul": "mul",
           "div": "div", "truediv": "div", "itruediv": "div"}
_CONCATS = {"cat", "concat", "concatenate"}
# reading a tensor's shape is fine; the channel count it returns is read again at run time after pruning
_STRUCTURAL_READS = {"size", "dim", "numel", "getattr", "ndimension", "len"}
_TORCH_MODULES = ("torch", "_operator", "operator", "builtins")


@dataclass(frozen=True)
class NodeOp:
    """What one graph node does to channel slots.

    action: "input" | "output" | "ignore" (no channel tensor involved) | "constant" (a tensor whose channels are
    not derived from the input: fresh frozen slots) | "producer" (conv with groups=1 or Linear on 2-D input) |
    "depthwise" | "bn" | "pass" (same slots out as in) | "elementwise" (union of `operands`, freeze `freeze`) |
    "cat" (concatenate the slots of `operands` on dim 1) | "pad" (zero channels before/after, fixed by code) |
    "shortcut" (ChannelPadShortcut: zero channels before/after that pruning recomputes) | "boundary".
    """

    action: str
    label: str = ""
    reason: str = ""
    operands: tuple[fx.Node, ...] = ()
    freeze: tuple[fx.Node, ...] = ()
    pad: tuple[int, int] = (0, 0)
    residual: bool = False
    extra: dict = field(default_factory=dict)


class TraceFailure(Exception):
    """The model could not be traced or shape-propagated; the message says why."""


class _LeafTracer(fx.Tracer):
    """Keeps convs (and subclasses), Linear, BatchNorm and ChannelPadShortcut as leaves so they stay resizable."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            return True
        if type(m).__name__ == SHORTCUT_CLASS_NAME:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace_with_shapes(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """Symbolically trace `model` and record every node's output shape; raises TraceFailure."""
    try:
        tracer = _LeafTracer()
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        raise TraceFailure(f"torch.fx could not trace the model ({type(exc).__name__}: {exc})") from exc
    try:
        with eval_mode(model), torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        raise TraceFailure(f"the traced model failed on the example input ({type(exc).__name__}: {exc})") from exc
    return gm


# --- shape helpers ---------------------------------------------------------------------------------------------

def shape_of(node) -> tuple[int, ...] | None:
    """The recorded shape of a tensor-valued node, or None for non-tensors (ints, tuples, modules)."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return tuple(int(d) for d in meta.shape)
    return None


def has_channels(node) -> bool:
    """True for tensors with a dim 1 (batched activations); their dim 1 carries channel slots."""
    shape = shape_of(node)
    return shape is not None and len(shape) >= 2


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _keeps_batch_and_channel(in_shape, out_shape) -> bool:
    """dims 0 and 1 unchanged and the remaining elements just regrouped (row-major layout keeps channel k at k)."""
    return (in_shape is not None and out_shape is not None and len(in_shape) >= 2 and len(out_shape) >= 2
            and in_shape[:2] == out_shape[:2] and math.prod(in_shape[2:]) == math.prod(out_shape[2:]))


def _function_key(node: fx.Node) -> str | None:
    """Normalised name of a torch / operator function or a tensor method ("relu_" -> "relu"); None for user code."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        name = getattr(node.target, "__name__", None)
        if name is None or not module.startswith(_TORCH_MODULES):
            return None
    else:
        return None
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# --- the verdict -----------------------------------------------------------------------------------------------

def describe_node(node: fx.Node, modules: dict[str, nn.Module], call_counts: dict[str, int]) -> NodeOp:
    """Classify one node (see NodeOp). Never raises for odd graphs: anything unexpected is a boundary."""
    try:
        if node.op == "placeholder":
            return NodeOp("input")
        if node.op == "output":
            return NodeOp("output")
        if node.op == "get_attr":
            if shape_of(node) is None:
                return NodeOp("ignore")
            return NodeOp("constant", reason=f"constant tensor '{node.target}' is not resized by pruning")
        if node.op == "call_module":
            return _describe_module(node, modules[str(node.target)], call_counts.get(str(node.target), 1))
        return _describe_call(node)
    except Exception as exc:  # a bug in a rule must cost a boundary, never a crash or a wrong prune
        return NodeOp("boundary", reason=f"analysis rule failed ({type(exc).__name__}: {exc})")


def _describe_module(node: fx.Node, module: nn.Module, calls: int) -> NodeOp:
    x = node.args[0] if node.args else None
    in_shape, out_shape = shape_of(x), shape_of(node)
    kind = type(module).__name__
    resizable = isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)) \
        or kind == SHORTCUT_CLASS_NAME
    if len(node.args) != 1 or node.kwargs:
        return NodeOp("boundary", reason=f"{kind} called with {len(node.args)} positional args and kwargs "
                                         f"{sorted(node.kwargs)}")
    if in_shape is None or out_shape is None:
        return NodeOp("boundary", reason=f"{kind} does not map one tensor to one tensor")
    if resizable and calls > 1:
        return NodeOp("boundary", reason=f"{kind} is called {calls} times; its weights cannot be resized for "
                                         "two call sites")
    if isinstance(module, nn.modules.conv._ConvNd):
        return _describe_conv(module, in_shape, out_shape)
    if isinstance(module, nn.Linear):
        if len(in_shape) != 2:
            return NodeOp("boundary", reason=f"Linear on a {len(in_shape)}-D input acts on the last dim, "
                                             "not the channel dim")
        return NodeOp("producer")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if in_shape != out_shape or in_shape[1] != module.num_features:
            return NodeOp("boundary", reason="BatchNorm input is not [N, C, ...] with C = num_features")
        return NodeOp("bn", label="bn")
    if kind == SHORTCUT_CLASS_NAME:
        return _describe_shortcut(module, in_shape, out_shape)
    for cls, label in _ELEMENTWISE_MODULES:
        if isinstance(module, cls):
            if in_shape != out_shape:
                return NodeOp("boundary", reason=f"{kind} changed the tensor shape")
            return NodeOp("pass", label=label)
    for cls, spatial_dims in _POOL_MODULES:
        if isinstance(module, cls):
            return _spatial_pass("pool", in_shape, out_shape, spatial_dims)
    for cls, label in _SPATIAL_MODULES:
        if isinstance(module, cls):
            return _spatial_pass(label, in_shape, out_shape)
    if isinstance(module, nn.Flatten):
        if _keeps_batch_and_channel(in_shape, out_shape):
            return NodeOp("pass", label="flatten")
        return NodeOp("boundary", reason="Flatten merges the channel dim with other non-unit dims")
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)) and module.dim is not None \
            and _norm_dim(module.dim, len(in_shape)) >= 2 and in_shape == out_shape:
        return NodeOp("pass", label=f"other-elementwise:{kind.lower()}")
    return NodeOp("boundary", reason=f"module type {kind} is not understood by channel analysis")


def _describe_conv(conv: nn.modules.conv._ConvNd, in_shape, out_shape) -> NodeOp:
    if conv.transposed:
        return NodeOp("boundary", reason="transposed convolutions are not pruned")
    if len(in_shape) != len(conv.kernel_size) + 2 or in_shape[1] != conv.in_channels \
            or out_shape[1] != conv.out_channels:
        return NodeOp("boundary", reason="convolution input is not a batched [N, C, ...] tensor")
    if conv.groups == 1:
        return NodeOp("producer")
    if conv.groups == conv.in_channels == conv.out_channels:
        return NodeOp("depthwise", label="depthwise")
    return NodeOp("boundary", reason=f"grouped convolution (groups={conv.groups}, in={conv.in_channels}, "
                                     f"out={conv.out_channels}) ties channels in blocks")


def _describe_shortcut(module: nn.Module, in_shape, out_shape) -> NodeOp:
    before, after = getattr(module, "pad_before", None), getattr(module, "pad_after", None)
    if not (isinstance(before, int) and isinstance(after, int) and before >= 0 and after >= 0):
        return NodeOp("boundary", reason="ChannelPadShortcut without non-negative int pad_before/pad_after")
    if len(in_shape) < 2 or len(out_shape) != len(in_shape) or out_shape[0] != in_shape[0] \
            or out_shape[1] != in_shape[1] + before + after:
        return NodeOp("boundary", reason="ChannelPadShortcut output channels != input + pad_before + pad_after")
    return NodeOp("shortcut", label="pad", pad=(before, after))


def _spatial_pass(label: str, in_shape, out_shape, spatial_dims: int | None = None) -> NodeOp:
    batched = spatial_dims is None or len(in_shape) == spatial_dims + 2
    if batched and len(in_shape) >= 2 and len(out_shape) == len(in_shape) and in_shape[:2] == out_shape[:2]:
        return NodeOp("pass", label=label)
    return NodeOp("boundary", reason=f"{label} op does not keep dims 0 and 1 (batch, channel)")


def _describe_call(node: fx.Node) -> NodeOp:
    key = _function_key(node)
    out_shape = shape_of(node)
    channel_inputs = [n for n in node.all_input_nodes if has_channels(n)]
    if out_shape is None:
        if not channel_inputs or key in _STRUCTURAL_READS:
            return NodeOp("ignore")
        if key == "getitem" and shape_of(node.args[0]) is None:
            return NodeOp("ignore")
        return NodeOp("boundary", reason="turns channel data into a non-tensor value")
    if key is None:
        return NodeOp("boundary", reason=f"unknown function '{_target_name(node)}'")
    if key == "getitem":
        return _describe_getitem(node)
    if not channel_inputs:
        # e.g. torch.zeros(...) or arithmetic on 1-D tensors: nothing flows from the model's channels
        return NodeOp("constant", reason=f"tensor created by '{_target_name(node)}'")
    x = node.args[0] if node.args else None
    in_shape = shape_of(x)
    if key in _BINARY:
        return _describe_binary(node, _BINARY[key], out_shape)
    if key in _CONCATS:
        return _describe_cat(node, out_shape)
    if len(out_shape) < 2:
        return NodeOp("boundary", reason=f"'{key}' removes the channel dim")
    if in_shape is None or not isinstance(x, fx.Node):
        return NodeOp("boundary", reason=f"'{key}' with a non-tensor first argument")
    if key in _UNARY_FUNCTIONS:
        if key == "clamp" and any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
            return NodeOp("boundary", reason="clamp with tensor bounds")
        if in_shape != out_shape:
            return NodeOp("boundary", reason=f"'{key}' changed the tensor shape")
        return NodeOp("pass", label=_UNARY_FUNCTIONS[key])
    if key in _POOL_FUNCTIONS:
        return _spatial_pass("pool", in_shape, out_shape, _POOL_FUNCTIONS[key])
    if key in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
        return _spatial_pass("resize", in_shape, out_shape)
    if key in ("softmax", "log_softmax"):
        dim = _arg(node, 1, "dim")
        if isinstance(dim, int) and _norm_dim(dim, len(in_shape)) >= 2 and in_shape == out_shape:
            return NodeOp("pass", label=f"other-elementwise:{key}")
        return NodeOp("boundary", reason=f"{key} over the batch or channel dim")
    if key in _REDUCTIONS:
        return _describe_reduction(node, key, in_shape, out_shape)
    if key in _RESHAPES:
        return _describe_reshape(node, key, in_shape, out_shape)
    if key in ("permute", "transpose"):
        return _describe_permute(node, key, in_shape, out_shape)
    if key == "pad":
        return _describe_pad(node, in_shape, out_shape)
    return NodeOp("boundary", reason=f"unknown function '{_target_name(node)}'")


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    module = getattr(node.target, "__module__", "") or ""
    return f"{module}.{getattr(node.target, '__name__', node.target)}".lstrip(".")


def _describe_binary(node: fx.Node, op: str, out_shape) -> NodeOp:
    operands = [_arg(node, 0, "input"), _arg(node, 1, "other")]
    n = len(out_shape)
    if n < 2:
        return NodeOp("ignore")
    contributors, frozen = [], []
    for operand in operands:
        shape = shape_of(operand)
        if shape is None or len(shape) == 0:
            continue  # Python scalar or 0-d tensor: same for every channel
        aligned = 1 - (n - len(shape))  # which of the operand's dims lines up with the output channel dim
        if aligned == 1 and shape[1] == out_shape[1]:
            if operand.op == "get_attr" and out_shape[1] > 1:
                return NodeOp("boundary", reason=f"per-channel constant tensor '{operand.target}' is not resized "
                                                 "by pruning")
            contributors.append(operand)
            continue
        if aligned >= 0 and shape[aligned] != 1:
            return NodeOp("boundary", reason=f"'{op}' with a per-channel operand of shape {list(shape)} whose "
                                             "channels are not tracked")
        if len(shape) >= 2:
            frozen.append(operand)  # its own channels are broadcast; pruning them would break the broadcast
    if not contributors:
        return NodeOp("constant", reason=f"'{op}' of tensors broadcast over channels")
    if len(contributors) >= 2:
        return NodeOp("elementwise", label=op, operands=tuple(contributors), freeze=tuple(frozen),
                      residual=op in ("add", "sub"))
    label = {"add": "add_const", "sub": "sub_const"}.get(op, "scale")
    if op == "div" and contributors[0] is operands[1]:
        label = "other-elementwise:reciprocal"
    return NodeOp("elementwise", label=label, operands=tuple(contributors), freeze=tuple(frozen))


def _describe_cat(node: fx.Node, out_shape) -> NodeOp:
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or len(out_shape) < 2:
        return NodeOp("boundary", reason="cat with a dynamic tensor list or dim")
    shapes = [shape_of(t) for t in tensors]
    if any(s is None or len(s) != len(out_shape) for s in shapes):
        return NodeOp("boundary", reason="cat of tensors with different ranks or non-tensors")
    if _norm_dim(dim, len(out_shape)) == 1:
        return NodeOp("cat", label="cat", operands=tuple(tensors))
    if any(s[1] != out_shape[1] for s in shapes):
        return NodeOp("boundary", reason="cat along a non-channel dim of tensors with different channel counts")
    return NodeOp("elementwise", label="cat", operands=tuple(tensors))


def _describe_getitem(node: fx.Node) -> NodeOp:
    source = node.args[0]
    in_shape, out_shape = shape_of(source), shape_of(node)
    if in_shape is None:
        # an element of a tuple returned by a boundary op (split, chunk, ...): its channels are not tracked
        return NodeOp("constant", reason=f"element of the non-tensor value '{getattr(source, 'name', source)}'")
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if len(in_shape) < 2 or not _index_keeps_batch_and_channel(index, len(in_shape)):
        return NodeOp("boundary", reason="indexing on the batch or channel dim")
    if out_shape is None or len(out_shape) < 2 or out_shape[:2] != in_shape[:2]:
        return NodeOp("boundary", reason="indexing changed the batch or channel dim")
    return NodeOp("pass", label="")


def _index_keeps_batch_and_channel(index: tuple, ndim: int) -> bool:
    """True if dims 0 and 1 are untouched: full slices or covered by an Ellipsis; no None / tensor indices."""
    full = slice(None, None, None)
    if any(item is None or isinstance(item, fx.Node) for item in index) or index.count(Ellipsis) > 1:
        return False
    if Ellipsis in index:
        cut = index.index(Ellipsis)
        explicit = len(index) - 1
        per_dim = list(index[:cut]) + [full] * (ndim - explicit) + list(index[cut + 1:])
    else:
        per_dim = list(index) + [full] * (ndim - len(index))
    return len(per_dim) == ndim and all(isinstance(item, slice) and item == full for item in per_dim[:2])


def _describe_reduction(node: fx.Node, key: str, in_shape, out_shape) -> NodeOp:
    dims = _arg(node, 1, "dim")
    if dims is None:
        return NodeOp("boundary", reason=f"'{key}' over all dims mixes channels")
    dims = dims if isinstance(dims, (list, tuple)) else (dims,)
    if not all(isinstance(d, int) for d in dims) or any(_norm_dim(d, len(in_shape)) < 2 for d in dims):
        return NodeOp("boundary", reason=f"'{key}' over the batch or channel dim")
    if len(out_shape) < 2 or out_shape[:2] != in_shape[:2]:
        return NodeOp("boundary", reason=f"'{key}' moved the channel dim")
    return NodeOp("pass", label="pool")


def _describe_reshape(node: fx.Node, key: str, in_shape, out_shape) -> NodeOp:
    if not _keeps_batch_and_channel(in_shape, out_shape):
        return NodeOp("boundary", reason=f"'{key}' from {list(in_shape)} to {list(out_shape)} moves or merges "
                                         "the channel dim")
    if key in ("view", "reshape"):
        sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = tuple(sizes[0])
        if len(sizes) < 2 or (isinstance(sizes[1], int) and sizes[1] != -1):
            return NodeOp("boundary", reason=f"'{key}' with a hard-coded channel size would break after pruning")
    if key == "squeeze" and _arg(node, 1, "dim") is None:
        return NodeOp("boundary", reason="squeeze() without a dim would drop a channel dim pruned to 1")
    return NodeOp("pass", label="flatten")


def _describe_permute(node: fx.Node, key: str, in_shape, out_shape) -> NodeOp:
    ndim = len(in_shape)
    if key == "permute":
        dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        ok = len(dims) == ndim and all(isinstance(d, int) for d in dims) \
            and _norm_dim(dims[0], ndim) == 0 and _norm_dim(dims[1], ndim) == 1
    else:
        a, b = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        ok = isinstance(a, int) and isinstance(b, int) and min(_norm_dim(a, ndim), _norm_dim(b, ndim)) >= 2
    if ok and out_shape[:2] == in_shape[:2]:
        return NodeOp("pass", label="")
    return NodeOp("boundary", reason=f"'{key}' moves the channel dim")


def _describe_pad(node: fx.Node, in_shape, out_shape) -> NodeOp:
    pads = _arg(node, 1, "pad")
    mode = _arg(node, 2, "mode", "constant")
    value = _arg(node, 3, "value", None)
    if not isinstance(pads, (list, tuple)) or not all(isinstance(p, int) for p in pads) or len(pads) % 2:
        return NodeOp("boundary", reason="F.pad with non-constant pad sizes")
    ndim = len(in_shape)
    per_dim = {ndim - 1 - i: (pads[2 * i], pads[2 * i + 1]) for i in range(len(pads) // 2)}
    if per_dim.get(0, (0, 0)) != (0, 0):
        return NodeOp("boundary", reason="F.pad on the batch dim")
    before, after = per_dim.get(1, (0, 0))
    if (before, after) == (0, 0):
        return _spatial_pass("pad", in_shape, out_shape)
    if before < 0 or after < 0:
        return NodeOp("boundary", reason="F.pad crops the channel dim")
    if mode != "constant" or value not in (None, 0, 0.0):
        return NodeOp("boundary", reason="F.pad fills channels with something other than zeros")
    if out_shape[1] != in_shape[1] + before + after:
        return NodeOp("boundary", reason="F.pad output channel count does not match its pads")
    return NodeOp("pad", label="pad", pad=(before, after))


def call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many times each submodule is called in the graph."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


__all__ = ["NodeOp", "TraceFailure", "trace_with_shapes", "describe_node", "call_counts", "shape_of",
           "has_channels", "SHORTCUT_CLASS_NAME"]
