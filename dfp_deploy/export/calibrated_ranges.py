"""Activation ranges {tensor name: (lo, hi)} for Q/DQ insertion, measured on calibration inputs.

Calibration (`calibration_ranges`): the fp32 ONNX model runs in ONNX Runtime with every float intermediate tensor
added as a graph output (on a copy). `minmax` keeps the running minimum and maximum over all batches;
`percentile` takes the (100 - p)-th and p-th percentiles of each batch and averages them over batches, weighted by
batch size, which ignores rare outliers at the price of clipping them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from dfp_deploy.backends.ort import cpu_session  # the one module that imports onnxruntime
from dfp_deploy.core.errors import BackendUnavailable, DataError, ExportError, InputError
from dfp_deploy.export.ranges import load_copy

CALIBRATION_METHODS = ("minmax", "percentile")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


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
    model = load_copy(model_or_path)
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
    try:
        return cpu_session(model.SerializeToString(), threads)
    except BackendUnavailable as e:
        raise ExportError(f"ONNX Runtime cannot run the model for calibration: {e}") from e
