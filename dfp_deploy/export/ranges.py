"""Data-free activation ranges {tensor name: (lo, hi)} for Q/DQ insertion, from the BatchNorm parameters.

Calibrated ranges (measured on inputs): export/calibrated_ranges.py.

Data-free (`data_free_ranges`), from the parameters of the fp32 graph with its BatchNormalization nodes still in
place (compute before BN folding, then look the ranges up by name: pass_fold_bn keeps the BN's output name; with
`target=`, the BN-folded graph is propagated too, so tensors its exporter renamed get ranges as well). Each
channel c of a tensor is modelled as a clipped Gaussian X_c = clip(N(mu_c, sigma_c^2), a_c, b_c), whose range is

    [clip(mu_c - k sigma_c, a_c, b_c), clip(mu_c + k sigma_c, a_c, b_c)],   k = DEFAULT_K unless given,

and the tensor's range is the union over channels. The model is propagated through the graph:
- BatchNormalization in inference mode standardises its input per channel, so its output is N(beta_c, gamma_c^2)
  with no clip (a = -inf, b = inf);
- Relu raises the clip floor to 0 (a -> max(a, 0), b -> max(b, 0)); Clip(lo, hi) (ReLU6) clips the bounds;
- any other elementwise function of one variable (Sigmoid, HardSigmoid, HardSwish, Tanh, Erf, Softplus, Mish,
  LeakyRelu, Elu, Gelu, and arithmetic with per-channel constants, which is how SiLU = x * Sigmoid(x) and GELU
  = x * (1 + Erf(x / sqrt 2)) / 2 reach the graph) is tabulated on a fixed grid of the variable's standardised
  values z (ChannelStats.values); its range is the image of the k-sigma interval [mu - k sigma, mu + k sigma]
  (for ReLU exactly the rule above), its moments the trapezoid rule against the normal density (closed forms for
  Hardswish and Hardsigmoid of a Gaussian). A binary op whose two inputs derive from one variable combines the
  tabulated functions, so x * Sigmoid(x) is SiLU of x, not a product of two tensors;
- Add of two tensors: the Gaussian of the sum gets mean m1 + m2 and standard deviation s1 + s2, where m, s are
  the true mean and standard deviation of each input (closed form below, or the quadrature). s1 + s2 is the
  largest value std(X + Y) can take (Cauchy-Schwarz; perfectly correlated inputs), so no independence is
  assumed; along a residual stream the branches are indeed correlated, and the independent sqrt(s1^2 + s2^2)
  made deep nets' ranges too narrow (needing k ~ 12 on ResNet-56 against k ~ 8 on ResNet-20). The hard bounds
  add: a = a1 + a2, b = b1 + b2, so a sum of two ReLU outputs stays >= 0 (Sub likewise, with m1 - m2);
- Mul of two tensors of different variables (a squeeze-excitation gate times the features): independent
  factors, mean m1 m2, variance (v1 + m1^2)(v2 + m2^2) - m1^2 m2^2, hard bounds the product of the intervals;
- max/average pooling, ReduceMean over spatial axes, Identity, Flatten/Reshape that keep the channels, nearest or
  linear Resize (a detector neck's upsampling): unchanged
  (the output stays within the input's range; averaging shrinks the spread, which we do not count on);
- Pad with zeros adds all-zero channels on the channel axis and the value 0 elsewhere; Slice/Split/Concat on the
  channel axis select/concatenate channels; a Transpose or Reshape that moves the channel axis (a channel
  shuffle) leaves one channel, the mixture of all, which holds the same values;
- Conv/Gemm without a BN after them (e.g. the classifier head): mean W.m + b and variance (W^2).v of the clipped
  inputs' moments, inputs treated as independent (a rough estimate; with a BN after the Conv the BN decides);
- the model input: the preprocessing range (lo, hi), per channel or scalar, as a uniform distribution.
Tensors behind any other op get no range; the Q/DQ pass then names them, and calibration is the way out.
Derivations and their tests: docs/methods/data_free_ranges.md, tests/test_ranges.py.

The moments of the Gaussian model: export/gaussian_moments.py.

k: a BN output channel is N(beta, gamma^2) only on average over the data, and real activations are heavier-tailed
than a Gaussian, so k is larger than a Gaussian's 3-4. DEFAULT_K = 6 minimised the int8 engine's logit error
(mean squared error relative to the fp32 logits' variance) on held-out CIFAR-10 training images for both ResNet-20
and ResNet-56 (0.0020 each, against 0.0016-0.0017 with min/max calibration on 512 images; k = 4: 0.0047 / 0.0042,
k = 10: 0.0034 / 0.0035); no test images were used to choose it.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from dfp_deploy.core.errors import ExportError, InputError
from dfp_deploy.export.gaussian_moments import ChannelStats, hardsigmoid_moments, hardswish_moments

DEFAULT_K = 6.0


def load_copy(model_or_path) -> onnx.ModelProto:
    """A copy of an ONNX model (the caller may change it), or the model in an ONNX file."""
    if isinstance(model_or_path, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model_or_path)
        return copy
    path = Path(model_or_path)
    if not path.is_file():
        raise InputError(f"ONNX file {path} does not exist; check the path")
    return onnx.load(str(path))


# ---------------------------------------------------------------- data-free


def _gaussian(mean, variance, lo, hi) -> ChannelStats:
    mean = np.asarray(mean, np.float64)
    full = np.full_like(mean, 1.0)
    return ChannelStats(mean, np.sqrt(np.maximum(variance, 0.0)) * full, lo * full, hi * full)


def _input_stats(lo, hi) -> ChannelStats:
    lo, hi = np.atleast_1d(np.asarray(lo, np.float64)), np.atleast_1d(np.asarray(hi, np.float64))
    if lo.shape != hi.shape or np.any(lo > hi) or not np.all(np.isfinite(lo) & np.isfinite(hi)):
        raise InputError(f"input_range ({lo}, {hi}) must be finite with lo <= hi (scalars or one per channel)")
    # a uniform distribution on [lo, hi]: mean (lo + hi) / 2, variance (hi - lo)^2 / 12
    return ChannelStats((lo + hi) / 2, (hi - lo) / math.sqrt(12.0), lo, hi)


def _const(tensor):
    from dfp_deploy.export.passes._graph import constant_array

    return constant_array(tensor)


def _broadcast(stats: ChannelStats, channels: int) -> ChannelStats:
    if len(stats.mean) == channels:
        return stats
    if len(stats.mean) != 1:
        raise ValueError("channel count mismatch")
    values = None if stats.values is None else np.repeat(stats.values, channels, axis=0)
    return ChannelStats(*(np.repeat(v, channels) for v in (stats.mean, stats.std, stats.lo, stats.hi)), values)


def _merge(stats: ChannelStats) -> ChannelStats:
    """One channel summarising all (a mixture): used when an op loses the channel axis."""
    mean, var = stats.moments()
    lo, hi = stats.support()
    m = mean.mean()
    v = (var + mean**2).mean() - m**2
    return _gaussian([m], v, lo.min(), hi.max())


def _bn(node, _stats) -> ChannelStats | None:
    gamma, beta = _const(node.inputs[1]), _const(node.inputs[2])
    if gamma is None or beta is None:
        return None
    beta = beta.astype(np.float64)
    inf = np.full_like(beta, np.inf)
    return ChannelStats(beta, np.abs(gamma.astype(np.float64)), -inf, inf)


def _relu(_node, stats) -> ChannelStats:
    s = stats[0]
    if s.values is not None:
        return s.mapped(np.maximum(s.values, 0.0))
    return ChannelStats(s.mean, s.std, np.maximum(s.lo, 0.0), np.maximum(s.hi, 0.0))


def _clip(node, stats) -> ChannelStats | None:
    s = stats[0]
    if len(node.inputs) > 1:  # opset >= 11: bounds are optional inputs
        bounds = [_const(t) if t.name else None for t in node.inputs[1:3]]
        if any(b is None for b, t in zip(bounds, node.inputs[1:3]) if t.name):
            return None
        low = float(bounds[0]) if len(bounds) > 0 and bounds[0] is not None else -np.inf
        high = float(bounds[1]) if len(bounds) > 1 and bounds[1] is not None else np.inf
    else:
        low, high = float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    if s.values is not None:
        return s.mapped(np.clip(s.values, low, high))
    lo = np.clip(s.lo, low, high)
    return ChannelStats(s.mean, s.std, lo, np.maximum(np.clip(s.hi, low, high), lo))


def _sigmoid(v):
    return 0.5 * (1.0 + np.tanh(0.5 * v))  # no overflow for large |v|


def _erf_array(v):
    import torch  # vectorised erf (numpy has none); torch is a dependency of the project anyway

    return torch.special.erf(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))).numpy()


def _gelu(v, attrs):
    if _attr_text(attrs.get("approximate", "none")) == "tanh":
        return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    return 0.5 * v * (1.0 + _erf_array(v / math.sqrt(2.0)))


def _attr_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# elementwise activations g(v, attrs), applied to the tabulated function (ONNX defaults for the attributes)
_UNARY = {
    "Sigmoid": lambda v, a: _sigmoid(v),
    "HardSigmoid": lambda v, a: np.clip(float(a.get("alpha", 0.2)) * v + float(a.get("beta", 0.5)), 0.0, 1.0),
    "HardSwish": lambda v, a: v * np.clip(v / 6.0 + 0.5, 0.0, 1.0),
    "Tanh": lambda v, a: np.tanh(v),
    "Erf": lambda v, a: _erf_array(v),
    "Softplus": lambda v, a: np.logaddexp(0.0, v),
    "Mish": lambda v, a: v * np.tanh(np.logaddexp(0.0, v)),
    "LeakyRelu": lambda v, a: np.where(v >= 0, v, float(a.get("alpha", 0.01)) * v),
    "Elu": lambda v, a: np.where(v > 0, v, float(a.get("alpha", 1.0)) * np.expm1(np.minimum(v, 0.0))),
    "Gelu": _gelu,
    "Neg": lambda v, a: -v,
}


def _unary(node, stats) -> ChannelStats:
    s = stats[0]
    values = _UNARY[node.op](s.as_function().values, node.attrs)
    return s.mapped(values, exact=_closed_form(node, s))


def _closed_form(node, s: ChannelStats):
    """(mean, variance) in closed form for Hardsigmoid / Hardswish of an unclipped Gaussian (None otherwise)."""
    if s.values is not None or np.isfinite(s.lo).any() or np.isfinite(s.hi).any():
        return None
    if node.op == "HardSwish":
        return hardswish_moments(s.mean, s.std)
    if node.op == "HardSigmoid" and float(node.attrs.get("alpha", 0.2)) > 0:
        return hardsigmoid_moments(s.mean, s.std, float(node.attrs.get("alpha", 0.2)),
                                   float(node.attrs.get("beta", 0.5)))
    return None


_APPLY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power}


def _per_channel(const: np.ndarray, tensor, channels: int) -> np.ndarray | None:
    """A constant operand as a column (channels x 1, or 1 x 1) when it varies at most along the channel axis."""
    c = np.asarray(const, np.float64)
    if c.size == 1:
        return c.reshape(1, 1)
    rank = len(tensor.shape) if tensor.shape is not None else None
    if rank is None or rank < 2 or c.ndim > rank:
        return None
    c = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if any(d != 1 for axis, d in enumerate(c.shape) if axis != 1) or c.shape[1] != channels:
        return None
    return c.reshape(-1, 1)


def _interval_product(l1, h1, l2, h2) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore"):
        corners = np.stack([l1 * l2, l1 * h2, h1 * l2, h1 * h2])
    corners = np.where(np.isnan(corners), 0.0, corners)  # 0 * inf: the bound 0 is attained, the product is 0
    return corners.min(axis=0), corners.max(axis=0)


def _binary(node, stats) -> ChannelStats | None:
    """Add/Sub/Mul/Div/Pow: with a constant (per tensor or per channel), of one variable, or of two variables."""
    op = node.op
    if len(stats) != 2 or all(s is None for s in stats):
        return None
    if any(s is None for s in stats):
        side = 0 if stats[0] is None else 1  # the constant operand
        known, const = stats[1 - side], _const(node.inputs[side])
        if const is None or (side == 0 and op in ("Div", "Pow")):
            return None
        if op == "Add" and known.values is None and const.size == 1:
            c = float(const.reshape(()))
            return ChannelStats(known.mean + c, known.std, known.lo + c, known.hi + c)
        column = _per_channel(const, node.inputs[1 - side], len(known.mean))
        if column is None:
            return None
        f = known.as_function().values
        return known.mapped(_APPLY[op](*((column, f) if side == 0 else (f, column))))
    channels = max(len(s.mean) for s in stats)
    first, second = (_broadcast(s, channels) for s in stats)
    if first.root() is second.root():  # x * sigmoid(x), x + f(x): one variable, the function of it is tabulated
        if op in ("Div", "Pow"):
            return None
        return first.mapped(_APPLY[op](first.as_function().values, second.as_function().values))
    (m1, v1), (m2, v2) = first.moments(), second.moments()
    (l1, h1), (l2, h2) = first.support(), second.support()
    inf = np.full(channels, np.inf)
    if op == "Add":
        return ChannelStats(m1 + m2, np.sqrt(v1) + np.sqrt(v2), np.maximum(l1 + l2, -inf), np.minimum(h1 + h2, inf))
    if op == "Sub":
        return ChannelStats(m1 - m2, np.sqrt(v1) + np.sqrt(v2), np.maximum(l1 - h2, -inf), np.minimum(h1 - l2, inf))
    if op == "Mul":
        # independent factors (a squeeze-excitation gate and the features it scales):
        # E[XY] = m1 m2, Var[XY] = (v1 + m1^2)(v2 + m2^2) - m1^2 m2^2
        lo, hi = _interval_product(l1, h1, l2, h2)
        variance = (v1 + m1**2) * (v2 + m2**2) - (m1 * m2) ** 2
        return ChannelStats(m1 * m2, np.sqrt(np.maximum(variance, 0.0)), lo, hi)
    return None


def _keep(_node, stats) -> ChannelStats:
    return stats[0]


def _reduce_mean(node, stats) -> ChannelStats | None:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = _const(node.inputs[1])
    if axes is None:
        return None
    return _merge(stats[0]) if 1 in [int(a) for a in np.atleast_1d(axes)] else stats[0]


def _channel_preserving_reshape(node, stats) -> ChannelStats:
    out_shape = node.outputs[0].shape
    s = stats[0]
    if out_shape is not None and len(out_shape) >= 2 and out_shape[1] == len(s.mean) \
            and all(isinstance(d, int) and d == 1 for d in out_shape[2:]):
        return s
    return _merge(s)


def _pad(node, stats) -> ChannelStats | None:
    s = stats[0].gaussian()  # padded zeros are not a function of the base variable: keep the moments and bounds
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = _const(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(node.attrs.get("pads"))
    value = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(())
    axes = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    if mode != "constant" or pads is None or value is None or float(np.asarray(value).reshape(-1)[0]) != 0.0:
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    half = len(pads) // 2
    axes = list(range(half)) if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    axes = [a + rank if a < 0 and rank else a for a in axes]
    before = dict(zip(axes, pads[:half]))
    after = dict(zip(axes, pads[half:]))
    if any(before.get(a, 0) or after.get(a, 0) for a in axes if a >= 2):
        s = ChannelStats(s.mean, s.std, np.minimum(s.lo, 0.0), np.maximum(s.hi, 0.0))
    front, back = before.get(1, 0), after.get(1, 0)
    if front < 0 or back < 0:
        return None
    zeros_front, zeros_back = np.zeros(front), np.zeros(back)
    return ChannelStats(*(np.concatenate([zeros_front, v, zeros_back]) for v in (s.mean, s.std, s.lo, s.hi)))


def _slice(node, stats) -> ChannelStats | None:
    s = _every_channel(stats[0], node.inputs[0])
    starts, ends = _const(node.inputs[1]), _const(node.inputs[2])
    axes = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    steps = _const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else None
    if starts is None or ends is None:
        return None
    axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
    steps = [1] * len(starts) if steps is None else [int(t) for t in steps]
    if 1 not in axes:
        return s
    i = axes.index(1)
    channels = np.arange(len(s.mean))[slice(int(starts[i]), int(ends[i]), steps[i])]
    return s.take(channels)


def _concat(node, stats) -> ChannelStats | None:
    if any(s is None for s in stats):
        return None
    if int(node.attrs.get("axis", 1)) == 1:  # an input summarised as one channel stands for all of its channels
        stats = [_broadcast(s, t.shape[1]) if len(s.mean) == 1 and t.shape is not None and len(t.shape) > 1
                 and isinstance(t.shape[1], int) else s for s, t in zip(stats, node.inputs)]
    if any(s.values is not None for s in stats):
        parts = [s.as_function() for s in stats]
        joined = ChannelStats(*(np.concatenate(v) for v in zip(*[(s.mean, s.std, s.lo, s.hi) for s in parts])),
                              np.concatenate([s.values for s in parts]))
    else:
        joined = ChannelStats(*(np.concatenate(v) for v in zip(*[(s.mean, s.std, s.lo, s.hi) for s in stats])))
    return joined if int(node.attrs.get("axis", 1)) == 1 else _merge(joined)


def _every_channel(s: ChannelStats, tensor) -> ChannelStats:
    """An input summarised as one channel (after a channel-mixing reshape, e.g. ShuffleNet's shuffle) stands for
    all of its channels: repeated, so that slicing the channel axis keeps one entry per channel."""
    shape = tensor.shape
    if len(s.mean) == 1 and shape is not None and len(shape) > 1 and isinstance(shape[1], int) and shape[1] > 1:
        return _broadcast(s, shape[1])
    return s


def _split(node, stats) -> list[ChannelStats] | None:
    """One ChannelStats per output: the channel slices when splitting the channel axis, else the input's."""
    s, outputs = _every_channel(stats[0], node.inputs[0]), node.outputs
    axis = int(node.attrs.get("axis", 0))
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if axis < 0 and rank:
        axis += rank
    if axis != 1:
        return [s] * len(outputs)
    channels = len(s.mean)
    if len(node.inputs) > 1 and node.inputs[1].name:
        sizes = _const(node.inputs[1])
    else:
        sizes = node.attrs.get("split")
    if sizes is None:  # opset 18 num_outputs: equal parts of ceil(C / n), the last one smaller
        part = -(-channels // len(outputs))
        sizes = [min(part, channels - i * part) for i in range(len(outputs))]
    ends = np.cumsum([int(v) for v in np.asarray(sizes).reshape(-1)])
    if len(ends) != len(outputs) or ends[-1] != channels:
        return None
    return [s.take(np.arange(end - size, end)) for end, size in zip(ends, np.diff(ends, prepend=0))]


def _resize(node, stats) -> ChannelStats | None:
    """Nearest-neighbour upsampling copies values, linear interpolation averages neighbours of one channel: both
    keep every channel within its range (cubic can overshoot it: no range)."""
    mode = node.attrs.get("mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    return stats[0] if mode in ("nearest", "linear") else None


def _transpose(node, stats) -> ChannelStats:
    perm = node.attrs.get("perm")
    return stats[0] if perm is not None and len(perm) > 1 and int(perm[1]) == 1 else _merge(stats[0])


def _linear(weight_kc: np.ndarray, bias: np.ndarray, stats: ChannelStats) -> ChannelStats:
    mean, var = stats.moments()
    out_mean = weight_kc @ mean + bias
    out_var = np.square(weight_kc) @ var
    inf = np.full_like(out_mean, np.inf)
    return ChannelStats(out_mean, np.sqrt(out_var), -inf, inf)


def _conv(node, stats) -> ChannelStats | None:
    weight = _const(node.inputs[1])
    if weight is None:
        return None
    weight = weight.astype(np.float64)
    bias = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(weight.shape[0])
    if bias is None:
        return None
    bias = bias.astype(np.float64)
    groups = int(node.attrs.get("group", 1))
    out_c, in_per_group = weight.shape[0], weight.shape[1]
    s = _broadcast(stats[0], in_per_group * groups)
    summed = weight.reshape(out_c, in_per_group, -1).sum(axis=2)
    squared = np.square(weight).reshape(out_c, in_per_group, -1).sum(axis=2)
    mean_in, var_in = s.moments()
    per_out = out_c // groups
    group_of = np.arange(out_c) // per_out
    in_index = group_of[:, None] * in_per_group + np.arange(in_per_group)[None, :]
    out_mean = (summed * mean_in[in_index]).sum(axis=1) + bias
    out_var = (squared * var_in[in_index]).sum(axis=1)
    inf = np.full(out_c, np.inf)
    return ChannelStats(out_mean, np.sqrt(out_var), -inf, inf)


def _gemm(node, stats) -> ChannelStats | None:
    weight = _const(node.inputs[1])
    if weight is None or node.attrs.get("transA", 0):
        return None
    weight = weight.astype(np.float64)
    weight_kc = weight if node.attrs.get("transB", 0) else weight.T
    bias = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(weight_kc.shape[0])
    if bias is None:
        return None
    bias = bias.astype(np.float64)
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    return _linear(alpha * weight_kc, beta * np.broadcast_to(bias, weight_kc.shape[:1]),
                   _broadcast(stats[0], weight_kc.shape[1]))


_RULES = {
    "BatchNormalization": _bn, "Relu": _relu, "Clip": _clip, "MaxPool": _keep, "AveragePool": _keep,
    "GlobalAveragePool": _keep, "GlobalMaxPool": _keep, "Identity": _keep, "Dropout": _keep,
    "ReduceMean": _reduce_mean, "Flatten": _channel_preserving_reshape, "Reshape": _channel_preserving_reshape,
    "Squeeze": _channel_preserving_reshape, "Pad": _pad, "Slice": _slice, "Concat": _concat, "Conv": _conv,
    "Gemm": _gemm, "Split": _split, "Transpose": _transpose, "Resize": _resize, **{op: _binary for op in _APPLY},
    **{op: _unary for op in _UNARY},
}
_CONSTANT_FIRST = ("BatchNormalization", "Concat", *_APPLY)  # ops whose first input may be a constant


_SEEDED_OPS = ("Conv", "Gemm")  # their outputs' statistics come from the BN that the target graph folded into them


def _propagate(graph, input_stats: ChannelStats, k: float, seeds: Mapping[str, ChannelStats] | None = None
               ) -> tuple[dict[str, tuple[float, float]], dict[str, ChannelStats]]:
    """(range, statistics) of every tensor the rules reach. A tabulated function's table (channels x 801 floats) is
    dropped once its last reader has run, so a wide SiLU network does not hold hundreds of megabytes."""
    known = {t.name: input_stats for t in graph.inputs}
    ranges = {name: s.range(k) for name, s in known.items()}
    readers = collections.Counter(t.name for node in graph.nodes for t in node.inputs)
    for node in graph.nodes:
        produced = _apply_rule(node, known, seeds)
        for name, result in produced.items():
            known[name] = result
            ranges[name] = result.range(k)
        for t in node.inputs:
            readers[t.name] -= 1
            if readers[t.name] == 0 and t.name in known and known[t.name].values is not None:
                del known[t.name]
    return ranges, known


def _apply_rule(node, known: Mapping[str, ChannelStats], seeds) -> dict[str, ChannelStats]:
    if not node.outputs:
        return {}
    if seeds and node.op in _SEEDED_OPS and node.outputs[0].name in seeds:
        return {node.outputs[0].name: seeds[node.outputs[0].name]}
    rule = _RULES.get(node.op)
    if rule is None:
        return {}
    stats = [known.get(t.name) for t in node.inputs]
    # BN restarts from its own parameters; Add/Mul/Concat/... may have a constant operand; others need their
    # data input
    if node.op not in _CONSTANT_FIRST and stats[0] is None:
        return {}
    if all(s is None for s in stats) and node.op != "BatchNormalization":
        return {}
    try:
        result = rule(node, stats)
    except (ValueError, IndexError, TypeError):
        return {}  # shapes we cannot reason about: no range, and the Q/DQ pass will say so
    if isinstance(result, list):  # one per output (Split)
        return {t.name: r for t, r in zip(node.outputs, result) if r is not None}
    return {} if result is None else {node.outputs[0].name: result}


def _prepared_graph(model_or_path):
    from dfp_deploy.export.passes._graph import to_graph
    from dfp_deploy.export.passes.cleanup import pass_cleanup

    # shapes and types first: folding CastLike needs the type of its second input, Flatten/Reshape need shapes
    model = onnx.shape_inference.infer_shapes(load_copy(model_or_path))
    model, _ = pass_cleanup(model, fold_constants=True)
    graph = to_graph(onnx.shape_inference.infer_shapes(model))
    if len(graph.inputs) != 1:
        raise InputError(f"data-free ranges need a single-input model; this one has {len(graph.inputs)} inputs")
    return graph


def data_free_ranges(model_or_path, input_range, *, k: float = DEFAULT_K, target=None
                     ) -> dict[str, tuple[float, float]]:
    """Ranges from the BN statistics of an fp32 graph (BN not yet folded); see the module docstring.

    `input_range`: (lo, hi) of the preprocessed model input, scalars or one per input channel.
    `target`: the graph the ranges are for (an export of the same model with BN folded), when the exporter's
    optimizer may have renamed some of its tensors (it turns SplitToSequence + SequenceAt into a Split with new
    output names). Its graph is propagated again, each Conv/Gemm output taking the statistics of the tensor of the
    same name in `model_or_path` (which knows the BN folded into it), every other tensor recomputed from its
    inputs; the result holds the ranges of both graphs.
    """
    if not k > 0:
        raise InputError(f"data-free range width k={k} must be positive")
    if not isinstance(input_range, (tuple, list)) or len(input_range) != 2:
        raise InputError("input_range must be a pair (lo, hi)")
    graph = _prepared_graph(model_or_path)
    if not any(node.op == "BatchNormalization" for node in graph.nodes):
        raise ExportError("data-free ranges need BatchNormalization nodes, but this graph has none (a model "
                          "without BatchNorm, e.g. LayerNorm-only, or BN folded at export); export with BN kept, or "
                          "use calibration ranges (advanced.compress.quantize.activations=calibration with "
                          "compress.calibration.data)")
    inputs = _input_stats(*input_range)
    ranges, stats = _propagate(graph, inputs, k)
    if target is not None:
        ranges.update(_propagate(_prepared_graph(target), inputs, k, seeds=stats)[0])
    return ranges
