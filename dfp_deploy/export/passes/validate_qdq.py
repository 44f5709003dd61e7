"""Check a Q/DQ graph against the rules of its target style and fail with the first broken rule.

Both styles: every Q/DQ has a constant, finite, strictly positive scale; weights (constant inputs of a DQ) are
int8, symmetric (zero point 0) and per output channel (a 1-D scale as long as that axis, `axis` = the consumer's
output-channel axis: 0 for Conv and for Gemm with transB); every Conv/Gemm reads its data input and its weight
through a DequantizeLinear.

`tensorrt`: activation Q/DQ are per-tensor (scalar scale) int8 with zero point 0; the residual input(s) of every
Add of two activations are dequantized (qdq_placement.residual_input_indices); every Q/DQ pair feeds a Conv/Gemm or
an Add (a stray pair splits TensorRT's fusions; in particular no Q/DQ on outputs).

`ort-cpu`: activation Q/DQ are per-tensor uint8; a Conv/Gemm with a bias reads it as int32 through a DQ whose
scale is s_x * s_w (ORT's integer kernels reuse the int32 values as they are, so any other scale would be a silent
error); every Conv output (after a Relu/Clip that is its only reader) goes to a QuantizeLinear unless it is a graph
output, so ORT can fuse the node into QLinearConv.
"""

from __future__ import annotations

import numpy as np
import onnx

from dfp_deploy.core.errors import ExportError
from dfp_deploy.export.passes._graph import constant_array, producer, to_graph, to_model
from dfp_deploy.export.passes.qdq_placement import WEIGHTED_OPS, check_style, effective_output, \
    residual_input_indices

BIAS_SCALE_RTOL = 1e-5


def _scale_problems(node) -> list[str]:
    scale = constant_array(node.inputs[1])
    if scale is None:
        return [f"{node.op} {node.name!r}: scale is not a constant"]
    if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        return [f"{node.op} {node.name!r}: scale must be finite and > 0, got min {float(np.min(scale)):g}"]
    return []


def _zero_point(node) -> np.ndarray | None:
    return constant_array(node.inputs[2]) if len(node.inputs) > 2 else None


def _weight_dq(tensor):
    """The DQ writing `tensor` if it dequantizes a constant (or a Q of a constant), else None."""
    dq = producer(tensor)
    if dq is None or dq.op != "DequantizeLinear":
        return None
    source = dq.inputs[0]
    q = producer(source)
    if constant_array(source) is not None or (q is not None and q.op == "QuantizeLinear"
                                              and constant_array(q.inputs[0]) is not None):
        return dq
    return None


def _check_weight(node, axis: int) -> list[str]:
    dq = _weight_dq(node.inputs[1])
    where = f"{node.op} {node.name!r}"
    if dq is None:
        return [f"{where}: weight is not read through a DequantizeLinear of an int8 constant"]
    problems = _scale_problems(dq)
    zero = _zero_point(dq)
    scale = constant_array(dq.inputs[1])
    source = constant_array(dq.inputs[0])
    source = constant_array(producer(dq.inputs[0]).inputs[0]) if source is None else source
    channels = source.shape[axis] if source.ndim > axis else None
    if zero is None or zero.dtype != np.int8 or np.any(zero != 0):
        problems.append(f"{where}: weight zero point must be int8 zeros (symmetric)")
    if scale is not None and (scale.ndim != 1 or (channels is not None and scale.shape[0] != channels)):
        problems.append(f"{where}: weight scale must be per output channel (1-D, {channels} values)")
    if int(dq.attrs.get("axis", 1)) != axis:
        problems.append(f"{where}: weight DequantizeLinear axis is {dq.attrs.get('axis', 1)}, expected {axis}")
    return problems


def _activation_dq(tensor):
    dq = producer(tensor)
    return dq if dq is not None and dq.op == "DequantizeLinear" and _weight_dq(tensor) is None else None


def _check_activation_qdq(node, style: str) -> list[str]:
    problems = _scale_problems(node)
    zero, scale = _zero_point(node), constant_array(node.inputs[1])
    where = f"{node.op} {node.name!r}"
    if scale is not None and scale.size != 1:
        problems.append(f"{where}: activations must be quantized per tensor (scalar scale), got {scale.size}")
    expected = np.int8 if style == "tensorrt" else np.uint8
    if zero is None or zero.dtype != expected:
        got = "none" if zero is None else zero.dtype
        problems.append(f"{where}: activation zero point must be {np.dtype(expected).name}, got {got}")
    elif style == "tensorrt" and np.any(zero != 0):
        problems.append(f"{where}: zero point must be 0 for TensorRT (symmetric), got {zero.reshape(-1)[0]}")
    return problems


def _check_weighted(node, graph, style: str) -> list[str]:
    where = f"{node.op} {node.name!r}"
    problems = [] if _activation_dq(node.inputs[0]) else [f"{where}: data input is not dequantized"]
    if _activation_dq(node.inputs[1]) is None:  # a weight (constant) input, the usual case
        problems += _check_weight(node, _output_channel_axis(node))
    if style == "ort-cpu":
        problems += _check_ort_bias(node) + _check_ort_output(node, graph)
    return problems


def _output_channel_axis(node) -> int:
    return 0 if node.op == "Conv" or node.attrs.get("transB", 0) else 1


def _check_ort_bias(node) -> list[str]:
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return []
    where = f"{node.op} {node.name!r}"
    bias_dq, input_dq, weight_dq = _weight_dq(node.inputs[2]), _activation_dq(node.inputs[0]), \
        _weight_dq(node.inputs[1])
    if bias_dq is None or constant_array(bias_dq.inputs[0]) is None or \
            constant_array(bias_dq.inputs[0]).dtype != np.int32:
        return [f"{where}: bias must be an int32 constant read through a DequantizeLinear"]
    if input_dq is None or weight_dq is None:
        return []
    expected = constant_array(input_dq.inputs[1]).astype(np.float64) * constant_array(weight_dq.inputs[1])
    actual = constant_array(bias_dq.inputs[1]).astype(np.float64)
    if actual.shape != expected.shape or not np.allclose(actual, expected, rtol=BIAS_SCALE_RTOL, atol=0):
        return [f"{where}: bias scale must equal input scale x weight scale"]
    return []


def _check_ort_output(node, graph) -> list[str]:
    if node.op != "Conv":
        return []  # Gemm may end the graph in fp32 (ORT's QGemm has a float-output form)
    output = effective_output(node.outputs[0], graph)
    if output in graph.outputs:
        return []
    if not output.outputs or any(c.op != "QuantizeLinear" for c in output.outputs):
        return [f"Conv {node.name!r}: output {output.name!r} must go to a QuantizeLinear only, so ORT can fuse "
                "it into QLinearConv"]
    return []


def _check_trt_add(node, graph) -> list[str]:
    # in the Q/DQ graph a dequantized input no longer comes from a Conv, so the placement rule applies as is
    wanted = residual_input_indices(node, graph)
    missing = [i for i in wanted if _activation_dq(node.inputs[i]) is None]
    return [f"Add {node.name!r}: residual input {i} ({node.inputs[i].name!r}) is not dequantized" for i in missing]


def _check_trt_stray(graph) -> list[str]:
    problems = []
    for q in (n for n in graph.nodes if n.op == "QuantizeLinear"):
        readers = [c for dq in q.outputs[0].outputs for out in dq.outputs for c in out.outputs]
        if not readers or any(c.op not in (*WEIGHTED_OPS, "Add") for c in readers):
            problems.append(f"QuantizeLinear {q.name!r} on {q.inputs[0].name!r}: its DQ feeds "
                            f"{sorted({c.op for c in readers}) or 'nothing'}, not only Conv/Gemm/Add inputs")
    return problems


def qdq_problems(graph_or_model, style: str) -> list[str]:
    """Every broken rule of `style`, one line each (empty when the graph is valid)."""
    check_style(style)
    graph = to_graph(graph_or_model)
    problems = []
    for node in graph.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear") and _weight_dq(node.outputs[0]) is None \
                and not (node.op == "QuantizeLinear" and constant_array(node.inputs[0]) is not None):
            problems += _check_activation_qdq(node, style)
        elif node.op in WEIGHTED_OPS:
            problems += _check_weighted(node, graph, style)
        elif node.op == "Add" and style == "tensorrt":
            problems += _check_trt_add(node, graph)
    if style == "tensorrt":
        problems += _check_trt_stray(graph)
    return problems


def pass_validate_qdq(graph_or_model, style: str) -> tuple[onnx.ModelProto, bool]:
    """Raise ExportError naming the first broken rule (and how many more); never changes the graph."""
    graph = to_graph(graph_or_model)
    problems = qdq_problems(graph, style)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ExportError(f"Q/DQ graph breaks the {style} rules: {problems[0]}{more}")
    return to_model(graph), False
