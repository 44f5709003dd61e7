"""Insert QuantizeLinear/DequantizeLinear nodes into a BN-folded fp32 graph, in the style the target runs fastest.

Placement comes from qdq_placement.py, the numbers from qparams.py. Activations get a Q -> DQ pair after the
tensor, with a per-tensor scale from the given range: int8 symmetric for `tensorrt`, uint8 asymmetric for
`ort-cpu`. Weights become int8 constants read through a per-channel DequantizeLinear (axis = output channel), so no
fp32 copy of a weight stays in the graph. For `ort-cpu`, Conv/Gemm biases become int32 constants through a
DequantizeLinear with scale s_x * s_w (what ORT's integer kernels expect); for `tensorrt` biases stay fp32.

Ranges are {tensor name: (lo, hi)} from export/ranges.py (data-free) or export/calibrated_ranges.py; every
activation the style quantizes must have one, otherwise the pass fails and names the missing tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from dfp_deploy.core.errors import ExportError
from dfp_deploy.export.passes import qparams
from dfp_deploy.export.passes._graph import QDQ_OPS, constant_array, gs_module, require_opset, to_graph, to_model, \
    unique_name
from dfp_deploy.export.passes.qdq_placement import Placement, check_style, plan

PER_CHANNEL_OPSET = 13  # the `axis` attribute of QuantizeLinear/DequantizeLinear


def _activation_params(placement: Placement, ranges: Mapping, style: str) -> dict[str, tuple]:
    missing = [name for name in placement.activations if placement.range_of.get(name, name) not in ranges]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ExportError(f"no activation range for {shown}; compute ranges on this graph (calibration) or on the "
                          "BN-unfolded export (data-free)")
    choose = qparams.symmetric_int8 if style == "tensorrt" else qparams.asymmetric_uint8
    params = {}
    for name in placement.activations:
        lo, hi = ranges[placement.range_of.get(name, name)]
        params[name] = choose(lo, hi, name)
    return params


def _add_qdq(graph, tensor, scale, zero_point) -> object:
    """Append Q -> DQ after `tensor`; return the dequantized fp32 tensor."""
    gs = gs_module()
    base = tensor.name
    scale_c = gs.Constant(unique_name(graph, f"{base}_scale"), np.asarray(scale, np.float32))
    zero_c = gs.Constant(unique_name(graph, f"{base}_zero_point"), np.asarray(zero_point))
    quantized = gs.Variable(unique_name(graph, f"{base}_quantized"), dtype=zero_c.values.dtype, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", unique_name(graph, f"{base}_QuantizeLinear"),
                               inputs=[tensor, scale_c, zero_c], outputs=[quantized]))
    dequantized = gs.Variable(unique_name(graph, f"{base}_dequantized"), dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(gs.Node("DequantizeLinear", unique_name(graph, f"{base}_DequantizeLinear"),
                               inputs=[quantized, scale_c, zero_c], outputs=[dequantized]))
    return dequantized


def _add_constant_dq(graph, base: str, values: np.ndarray, scales: np.ndarray, zero_points: np.ndarray,
                     axis: int) -> object:
    """An integer constant read through a per-channel DequantizeLinear; return the fp32 output tensor."""
    gs = gs_module()
    stored = gs.Constant(unique_name(graph, f"{base}_quantized"), values)
    scale_c = gs.Constant(unique_name(graph, f"{base}_scale"), scales.astype(np.float32))
    zero_c = gs.Constant(unique_name(graph, f"{base}_zero_point"), zero_points)
    dequantized = gs.Variable(unique_name(graph, f"{base}_dequantized"), dtype=np.float32, shape=list(values.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", unique_name(graph, f"{base}_DequantizeLinear"),
                               attrs={"axis": axis}, inputs=[stored, scale_c, zero_c], outputs=[dequantized]))
    return dequantized


def _quantize_weights(graph, placement: Placement, reduce_range: bool, input_scale_of: dict) -> dict:
    """Replace each planned weight by int8 + per-channel DQ; return {id(node): weight scales} for the biases."""
    scales_of = {}
    for node, index, axis in placement.weights:
        weight = node.inputs[index]
        floor = None
        if id(node) in input_scale_of:  # an int32 bias follows: keep it representable
            floor = qparams.bias_safe_scale_floor(constant_array(node.inputs[2]), input_scale_of[id(node)])
        values, scales, zero_points = qparams.per_channel_int8(constant_array(weight), axis, reduce_range, floor)
        node.inputs[index] = _add_constant_dq(graph, weight.name, values, scales, zero_points, axis)
        scales_of[id(node)] = scales
    return scales_of


def _quantize_biases(graph, placement: Placement, input_scale_of: dict, weight_scales_of: dict) -> None:
    for node in placement.biases:
        bias = node.inputs[2]
        values, scales, zero_points = qparams.int32_bias(constant_array(bias), input_scale_of[id(node)],
                                                         weight_scales_of[id(node)], bias.name)
        node.inputs[2] = _add_constant_dq(graph, bias.name, values, scales, zero_points, axis=0)


def pass_insert_qdq(graph_or_model, *, style: str, ranges: Mapping[str, tuple[float, float]],
                    reduce_range: bool = False) -> tuple[onnx.ModelProto, bool]:
    """Insert Q/DQ for `style` ("tensorrt" | "ort-cpu"); return (model, whether anything was quantized)."""
    check_style(style)
    graph = to_graph(graph_or_model)
    require_opset(graph, PER_CHANNEL_OPSET, "per-channel Q/DQ")
    if any(node.op in QDQ_OPS for node in graph.nodes):
        raise ExportError("the graph already contains QuantizeLinear/DequantizeLinear nodes; insert Q/DQ into the "
                          "fp32 graph only once")
    placement = plan(graph, style)
    activation_params = _activation_params(placement, ranges, style)
    # the bias scale needs the scale of the input each Conv/Gemm reads, captured before inputs are rewired
    input_scale_of = {id(node): activation_params[node.inputs[0].name][0] for node in placement.biases}
    weight_scales_of = _quantize_weights(graph, placement, reduce_range, input_scale_of)
    _quantize_biases(graph, placement, input_scale_of, weight_scales_of)
    for name, slots in placement.activations.items():
        dequantized = _add_qdq(graph, placement.tensors[name], *activation_params[name])
        for node, index in slots:
            node.inputs[index] = dequantized
    changed = bool(placement.activations or placement.weights)
    graph.cleanup().toposort()
    return to_model(graph), changed
