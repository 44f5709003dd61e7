"""Activation ranges {tensor name: (lo, hi)} for Q/DQ insertion: calibrated on inputs, or data-free from BatchNorm.

Calibration (`calibration_ranges`): the fp32 ONNX model runs in ONNX Runtime with every float intermediate tensor
added as a graph output (on a copy). `minmax` keeps the running minimum and maximum over all batches;
`percentile` takes the (100 - p)-th and p-th percentiles of each batch and averages them over batches, weighted by
batch size, which ignores rare outliers at the price of clipping them.

Data-free (`data_free_ranges`), from the parameters of the fp32 graph with its BatchNormalization nodes still in
place (compute before BN folding, then look the ranges up by name: pass_fold_bn keeps the BN's output name). Each
channel c of a tensor is modelled as a clipped Gaussian X_c = clip(N(mu_c, sigma_c^2), a_c, b_c), whose range is

    [clip(mu_c - k sigma_c, a_c, b_c), clip(mu_c + k sigma_c, a_c, b_c)],   k = DEFAULT_K unless given,

and the tensor's range is the union over channels. The model is propagated through the graph:
- BatchNormalization in inference mode standardises its input per channel, so its output is N(beta_c, gamma_c^2)
  with no clip (a = -inf, b = inf);
- Relu raises the clip floor to 0 (a -> max(a, 0), b -> max(b, 0)); Clip(lo, hi) (ReLU6) clips the bounds;
- Add of two tensors: the Gaussian of the sum gets mean m1 + m2 and standard deviation s1 + s2, where m, s are
  the true mean and standard deviation of each clipped input (closed form below). s1 + s2 is the largest value
  std(X + Y) can take (Cauchy-Schwarz; perfectly correlated inputs), so no independence is assumed; along a
  residual stream the branches are indeed correlated, and the independent sqrt(s1^2 + s2^2) made deep nets'
  ranges too narrow (needing k ~ 12 on ResNet-56 against k ~ 8 on ResNet-20). The hard bounds add: a = a1 + a2,
  b = b1 + b2, so a sum of two ReLU outputs stays >= 0;
- max/average pooling, ReduceMean over spatial axes, Identity, Flatten/Reshape that keep the channels: unchanged
  (the output stays within the input's range; averaging shrinks the spread, which we do not count on);
- Pad with zeros adds all-zero channels on the channel axis and the value 0 elsewhere; Slice/Concat on the
  channel axis select/concatenate channels;
- Conv/Gemm without a BN after them (e.g. the classifier head): mean W.m + b and variance (W^2).v of the clipped
  inputs' moments, inputs treated as independent (a rough estimate; with a BN after the Conv the BN decides);
- the model input: the preprocessing range (lo, hi), per channel or scalar, as a uniform distribution.
Tensors behind any other op get no range; the Q/DQ pass then names them, and calibration is the way out.

Moments of a clipped normal, alpha = (a - mu) / sigma, beta = (b - mu) / sigma, phi / Phi the standard normal
density / distribution function:
    E[X]   = a Phi(alpha) + b (1 - Phi(beta)) + mu (Phi(beta) - Phi(alpha)) + sigma (phi(alpha) - phi(beta))
    E[X^2] = a^2 Phi(alpha) + b^2 (1 - Phi(beta)) + (mu^2 + sigma^2)(Phi(beta) - Phi(alpha))
             + 2 mu sigma (phi(alpha) - phi(beta)) + sigma^2 (alpha phi(alpha) - beta phi(beta)).

k: a BN output channel is N(beta, gamma^2) only on average over the data, and real activations are heavier-tailed
than a Gaussian, so k is larger than a Gaussian's 3-4. DEFAULT_K = 6 minimised the int8 engine's logit error
(mean squared error relative to the fp32 logits' variance) on held-out CIFAR-10 training images for both ResNet-20
and ResNet-56 (0.0020 each, against 0.0016-0.0017 with min/max calibration on 512 images; k = 4: 0.0047 / 0.0042,
k = 10: 0.0034 / 0.0035); no test images were used to choose it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from dfp_deploy.core.errors import DataError, ExportError, InputError

DEFAULT_K = 6.0
CALIBRATION_METHODS = ("minmax", "percentile")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def _load(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model_or_path)
        return copy
    path = Path(model_or_path)
    if not path.is_file():
        raise InputError(f"ONNX file {path} does not exist; check the path")
    return onnx.load(str(path))


# ---------------------------------------------------------------- calibration


def _float_intermediates(model: onnx.ModelProto) -> list[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    return [out for node in model.graph.node for out in node.output if out and types.get(out) in _FLOAT_TYPES]


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model


def _as_feeds(inputs, input_names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(inputs, np.ndarray):
        if len(input_names) != 1:
            raise InputError(f"the model has inputs {input_names}; pass calibration inputs as a dict by name")
        inputs = {input_names[0]: inputs}
    if not isinstance(inputs, Mapping) or set(inputs) != set(input_names):
        raise InputError(f"calibration inputs must be an array or a dict with exactly the keys {input_names}")
    sizes = {len(np.asarray(v)) for v in inputs.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise DataError("calibration inputs must be non-empty and have the same number of samples")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}


class _RangeAccumulator:
    """Running min/max, or batch-size-weighted mean of per-batch percentiles, per tensor."""

    def __init__(self, method: str, percentile: float):
        self.method, self.percentile = method, percentile
        self.lo, self.hi, self.weight = {}, {}, {}

    def add(self, name: str, values: np.ndarray, batch: int) -> None:
        if self.method == "minmax":
            lo, hi = float(values.min()), float(values.max())
            self.lo[name] = min(lo, self.lo.get(name, lo))
            self.hi[name] = max(hi, self.hi.get(name, hi))
            return
        lo, hi = np.percentile(values, [100.0 - self.percentile, self.percentile])
        self.lo[name] = self.lo.get(name, 0.0) + batch * float(lo)
        self.hi[name] = self.hi.get(name, 0.0) + batch * float(hi)
        self.weight[name] = self.weight.get(name, 0) + batch

    def result(self) -> dict[str, tuple[float, float]]:
        if self.method == "minmax":
            return {n: (self.lo[n], self.hi[n]) for n in self.lo}
        return {n: (self.lo[n] / self.weight[n], self.hi[n] / self.weight[n]) for n in self.lo}


def calibration_ranges(model_or_path, inputs, *, tensors: list[str] | None = None, method: str = "minmax",
                       percentile: float = 99.99, batch_size: int = 64, threads: int | None = None
                       ) -> dict[str, tuple[float, float]]:
    """Ranges of the model inputs and of `tensors` (default: every float intermediate) over `inputs`.

    `inputs`: an array (single-input model) or {input name: array}, samples along axis 0, already preprocessed.
    """
    if method not in CALIBRATION_METHODS:
        raise InputError(f"calibration method {method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
    if not 50.0 < percentile <= 100.0:
        raise InputError(f"calibration percentile {percentile} is not in (50, 100]")
    model = _load(model_or_path)
    input_names = [i.name for i in model.graph.input]
    feeds = _as_feeds(inputs, input_names)
    wanted = _float_intermediates(model) if tensors is None else list(tensors)
    session = _session(_with_outputs(model, wanted), threads)
    fetched = [o.name for o in session.get_outputs() if o.name in set(wanted)]
    batch_size = _fixed_batch(session) or batch_size
    accumulator = _RangeAccumulator(method, percentile)
    count = len(next(iter(feeds.values())))
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        # a model exported with a fixed batch gets full batches: the last one wraps around to earlier samples,
        # which cannot move a min/max and only re-weights percentiles slightly
        rows = np.arange(start, start + batch_size) % count
        batch = {k: v[rows] for k, v in feeds.items()}
        for name, values in batch.items():
            accumulator.add(name, values[:size], size)
        for name, values in zip(fetched, session.run(fetched, batch)):
            accumulator.add(name, values, size)
    return accumulator.result()


def _fixed_batch(session) -> int | None:
    dims = {i.shape[0] if i.shape else None for i in session.get_inputs()}
    fixed = [d for d in dims if isinstance(d, int) and d > 0]
    return fixed[0] if fixed else None


def _session(model: onnx.ModelProto, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        raise ExportError(f"ONNX Runtime cannot run the model for calibration: {str(e).splitlines()[0]}") from e


# ---------------------------------------------------------------- data-free


@dataclass
class ChannelStats:
    """Per channel: X_c = clip(N(mean_c, std_c^2), lo_c, hi_c). Arrays of equal length (the channel count)."""

    mean: np.ndarray
    std: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def range(self, k: float) -> tuple[float, float]:
        low = np.clip(self.mean - k * self.std, self.lo, self.hi)
        high = np.clip(self.mean + k * self.std, self.lo, self.hi)
        return float(low.min()), float(high.max())

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """True (mean, variance) of each clipped channel, from the closed form in the module docstring."""
        return clipped_normal_moments(self.mean, self.std, self.lo, self.hi)

    def take(self, index) -> ChannelStats:
        return ChannelStats(self.mean[index], self.std[index], self.lo[index], self.hi[index])


_erf = np.vectorize(math.erf, otypes=[float])


def _cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))


def _pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * np.square(z)) / math.sqrt(2.0 * math.pi)


def clipped_normal_moments(mu, sigma, a, b) -> tuple[np.ndarray, np.ndarray]:
    """(E[X], Var[X]) of X = clip(N(mu, sigma^2), a, b), elementwise; a, b may be infinite, sigma may be 0."""
    mu, sigma, a, b = (np.asarray(v, dtype=np.float64) for v in (mu, sigma, a, b))
    safe_sigma = np.where(sigma > 0, sigma, 1.0)
    alpha, beta = (a - mu) / safe_sigma, (b - mu) / safe_sigma
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    # an infinite bound contributes nothing (a Phi(alpha) -> 0 and alpha phi(alpha) -> 0 as a -> -inf): zero it
    # before multiplying, so no inf * 0 appears
    a0, b0 = np.where(finite_a, a, 0.0), np.where(finite_b, b, 0.0)
    alpha0, beta0 = np.where(finite_a, alpha, 0.0), np.where(finite_b, beta, 0.0)
    cdf_a, cdf_b = _cdf(alpha), _cdf(beta)
    pdf_a, pdf_b = _pdf(alpha), _pdf(beta)
    tail_a, tail_b = a0 * cdf_a, b0 * (1.0 - cdf_b)
    tail_a2, tail_b2 = a0 * a0 * cdf_a, b0 * b0 * (1.0 - cdf_b)
    edge = alpha0 * pdf_a - beta0 * pdf_b
    inside = cdf_b - cdf_a
    mean = tail_a + tail_b + mu * inside + sigma * (pdf_a - pdf_b)
    second = tail_a2 + tail_b2 + (mu**2 + sigma**2) * inside + 2 * mu * sigma * (pdf_a - pdf_b) + sigma**2 * edge
    deterministic = np.clip(mu, a, b)
    mean = np.where(sigma > 0, mean, deterministic)
    variance = np.where(sigma > 0, np.maximum(second - mean**2, 0.0), 0.0)
    return mean, variance


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
    return ChannelStats(*(np.repeat(v, channels) for v in (stats.mean, stats.std, stats.lo, stats.hi)))


def _merge(stats: ChannelStats) -> ChannelStats:
    """One channel summarising all (a mixture): used when an op loses the channel axis."""
    mean, var = stats.moments()
    m = mean.mean()
    v = (var + mean**2).mean() - m**2
    return _gaussian([m], v, stats.lo.min(), stats.hi.max())


def _bn(node, _stats) -> ChannelStats | None:
    gamma, beta = _const(node.inputs[1]), _const(node.inputs[2])
    if gamma is None or beta is None:
        return None
    beta = beta.astype(np.float64)
    inf = np.full_like(beta, np.inf)
    return ChannelStats(beta, np.abs(gamma.astype(np.float64)), -inf, inf)


def _relu(_node, stats) -> ChannelStats:
    s = stats[0]
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
    lo = np.clip(s.lo, low, high)
    return ChannelStats(s.mean, s.std, lo, np.maximum(np.clip(s.hi, low, high), lo))


def _add(node, stats) -> ChannelStats | None:
    if any(s is None for s in stats):
        constants = [_const(t) for t in node.inputs]
        known = [s for s in stats if s is not None]
        shift = [c for c in constants if c is not None]
        if len(known) == 1 and len(shift) == 1 and shift[0].size == 1:
            s, c = known[0], float(shift[0].reshape(()))
            return ChannelStats(s.mean + c, s.std, s.lo + c, s.hi + c)
        return None
    channels = max(len(s.mean) for s in stats)
    first, second = (_broadcast(s, channels) for s in stats)
    (m1, v1), (m2, v2) = first.moments(), second.moments()
    inf = np.full(channels, np.inf)
    return ChannelStats(m1 + m2, np.sqrt(v1) + np.sqrt(v2), np.maximum(first.lo + second.lo, -inf),
                        np.minimum(first.hi + second.hi, inf))


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
    s = stats[0]
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
    s = stats[0]
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
    joined = ChannelStats(*(np.concatenate(v) for v in zip(*[(s.mean, s.std, s.lo, s.hi) for s in stats])))
    return joined if int(node.attrs.get("axis", 1)) == 1 else _merge(joined)


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
    "BatchNormalization": _bn, "Relu": _relu, "Clip": _clip, "Add": _add, "MaxPool": _keep, "AveragePool": _keep,
    "GlobalAveragePool": _keep, "GlobalMaxPool": _keep, "Identity": _keep, "Dropout": _keep,
    "ReduceMean": _reduce_mean, "Flatten": _channel_preserving_reshape, "Reshape": _channel_preserving_reshape,
    "Squeeze": _channel_preserving_reshape, "Pad": _pad, "Slice": _slice, "Concat": _concat, "Conv": _conv,
    "Gemm": _gemm,
}


def _propagate(graph, input_stats: ChannelStats) -> dict[str, ChannelStats]:
    known = {t.name: input_stats for t in graph.inputs}
    for node in graph.nodes:
        rule = _RULES.get(node.op)
        if rule is None or not node.outputs:
            continue
        stats = [known.get(t.name) for t in node.inputs]
        # BN restarts from its own parameters; Add/Concat may have a constant operand; others need their data input
        if node.op not in ("BatchNormalization", "Add", "Concat") and stats[0] is None:
            continue
        if all(s is None for s in stats) and node.op != "BatchNormalization":
            continue
        try:
            result = rule(node, stats)
        except (ValueError, IndexError, TypeError):
            result = None  # shapes we cannot reason about: no range, and the Q/DQ pass will say so
        if result is not None:
            known[node.outputs[0].name] = result
    return known


def data_free_ranges(model_or_path, input_range, *, k: float = DEFAULT_K) -> dict[str, tuple[float, float]]:
    """Ranges from the BN statistics of an fp32 graph (BN not yet folded); see the module docstring.

    `input_range`: (lo, hi) of the preprocessed model input, scalars or one per input channel.
    """
    from dfp_deploy.export.passes._graph import to_graph
    from dfp_deploy.export.passes.cleanup import pass_cleanup

    if not k > 0:
        raise InputError(f"data-free range width k={k} must be positive")
    if not isinstance(input_range, (tuple, list)) or len(input_range) != 2:
        raise InputError("input_range must be a pair (lo, hi)")
    # shapes and types first: folding CastLike needs the type of its second input, Flatten/Reshape need shapes
    model = onnx.shape_inference.infer_shapes(_load(model_or_path))
    model, _ = pass_cleanup(model, fold_constants=True)
    graph = to_graph(onnx.shape_inference.infer_shapes(model))
    if len(graph.inputs) != 1:
        raise InputError(f"data-free ranges need a single-input model; this one has {len(graph.inputs)} inputs")
    if not any(node.op == "BatchNormalization" for node in graph.nodes):
        raise ExportError("data-free ranges need the BatchNormalization nodes, but this graph has none (BN was "
                          "folded at export); export with BN kept or use calibration ranges")
    stats = _propagate(graph, _input_stats(*input_range))
    return {name: s.range(k) for name, s in stats.items()}
