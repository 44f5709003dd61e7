"""One-convolution ONNX probes (3x3 conv + ReLU, c channels in and out) for timing a target's channel response.

The int8 probe goes through the same Q/DQ pass sequence as a real int8 build (passes/prepare.quantize_model), so
the target runs the kernels a pruned model would get; its ranges are fixed, since only speed is measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dfp_deploy.core.atomic import atomic_path
from dfp_deploy.core.errors import InputError

PROBE_OPSET = 17
_RANGES = {"x": (-4.0, 4.0), "conv": (-8.0, 8.0), "y": (0.0, 8.0)}  # wide enough for the random weights below


def conv_probe(channels: int, *, batch: int, size: int, seed: int = 0) -> onnx.ModelProto:
    """fp32 model x[batch, channels, size, size] -> Relu(Conv3x3(x)) with He-scaled random weights."""
    if channels < 1 or batch < 1 or size < 1:
        raise InputError(f"probe: channels, batch and size must be positive (got {channels}, {batch}, {size})")
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((channels, channels, 3, 3)) * np.sqrt(2.0 / (9 * channels))).astype(np.float32)
    bias = np.zeros(channels, dtype=np.float32)
    shape = [batch, channels, size, size]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
         helper.make_node("Relu", ["conv"], ["y"])],
        f"conv_probe_{channels}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", PROBE_OPSET)])
    model.ir_version = 8  # readable by every onnxruntime this project supports
    return model


def write_conv_probe(path: Path, channels: int, *, batch: int, size: int, precision: str,
                     qdq_style: str = "ort-cpu") -> Path:
    """Write the probe for `precision` (fp32 | fp16 | int8) to `path`, in the graph form that precision builds from."""
    model = conv_probe(channels, batch=batch, size=size)
    if precision == "int8":
        from dfp_deploy.export.passes.prepare import quantize_model

        model = quantize_model(model, style=qdq_style, ranges=_RANGES)
    elif precision == "fp16":
        from dfp_deploy.export.passes.fp16 import pass_fp16

        model, _ = pass_fp16(model)
    elif precision != "fp32":
        raise InputError(f"probe: precision {precision!r} is not one of fp32, fp16, int8")
    onnx.checker.check_model(model)
    with atomic_path(Path(path)) as temp:
        onnx.save(model, str(temp))
    return Path(path)
