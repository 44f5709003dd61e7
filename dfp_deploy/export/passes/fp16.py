"""Rewrite a float32 ONNX graph to compute in fp16 while still taking and returning float32.

What changes, for a graph G with float inputs x and float outputs y:
- every float32 initializer and Constant value W becomes fp16(clip(W, -65504, 65504)) (round to nearest even;
  clamped, not overflowed: an fp16 inf in a weight would poison every output it reaches);
- Cast(to=float) becomes Cast(to=float16); ConstantOfShape without a value gets an fp16 zero;
- a Cast(to=float16) is inserted after each float input and a Cast(to=float) before each float output;
- intermediate value_info is dropped (its float types would be stale; runtimes infer their own).
Inputs that ONNX types as float32 whatever the data type (Resize's roi and scales, Upsample's scales) stay float32.

Invariant: the result type-checks (no float32/fp16 mix anywhere), has the input and output names, shapes and
float32 types of G, and computes G up to fp16 rounding (tests/test_fp16_pass.py). A strongly typed TensorRT
network built from it runs every layer in fp16, which is what target.precision: fp16 promises.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dfp_deploy.core.atomic import atomic_path
from dfp_deploy.core.errors import ExportError, InputError

FP16_MAX = 65504.0
# Inputs that ONNX types as float32 whatever the data type
_FLOAT32_SLOTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def _float32_only_tensors(graph) -> set[str]:
    return {node.input[i] for node in graph.node for op, i in _FLOAT32_SLOTS
            if node.op_type == op and len(node.input) > i and node.input[i]}


def _fp16_tensor(values: np.ndarray, name: str):
    return numpy_helper.from_array(np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16), name)


def _to_fp16_tensor(tensor):
    return _fp16_tensor(numpy_helper.to_array(tensor), tensor.name)


def _retype_constant_node(node) -> bool:
    FLOAT = onnx.TensorProto.FLOAT
    names = {attr.name for attr in node.attribute}
    if node.op_type == "ConstantOfShape" and "value" not in names:
        # the default fill is a float32 zero, which would put one float32 tensor into the fp16 graph
        node.attribute.append(onnx.helper.make_attribute(
            "value", onnx.helper.make_tensor("value", onnx.TensorProto.FLOAT16, [1], [0.0])))
        return True
    changed = False
    for i, attr in enumerate(node.attribute):
        if attr.name == "value" and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(_to_fp16_tensor(attr.t))
            changed = True
        elif attr.name in ("value_float", "value_floats"):
            values = np.array(attr.f if attr.name == "value_float" else list(attr.floats), dtype=np.float32)
            node.attribute[i].CopyFrom(onnx.helper.make_attribute("value", _fp16_tensor(values, "value")))
            changed = True
    return changed


def _retype_constants(graph, keep: set[str]) -> bool:
    FLOAT = onnx.TensorProto.FLOAT
    outputs = {value.name for value in graph.output}
    # the output Casts a previous run of this pass inserted: float32 on purpose
    boundary = {node.name for node in graph.node
                if node.op_type == "Cast" and node.name.endswith("__to_fp32") and set(node.output) & outputs}
    changed = False
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == FLOAT and tensor.name not in keep:
            graph.initializer[i].CopyFrom(_to_fp16_tensor(tensor))
            changed = True
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(f"fp16: node {node.name!r} ({node.op_type}) has a subgraph, which the fp16 "
                              "rewrite does not handle; build this model in fp32")
        if node.op_type == "Cast" and node.name not in boundary:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16
                    changed = True
        elif node.op_type in ("Constant", "ConstantOfShape") and not set(node.output) & keep:
            changed = _retype_constant_node(node) or changed
    return changed


def _rename_input_uses(graph, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def pass_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """(a copy of `model` computing in fp16 with float32 at the boundary, whether anything changed).

    A graph that already computes in fp16 (no float32 constant left, no float32 input feeding a node other than
    a Cast) comes back unchanged: the pass is idempotent.
    """
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    model16 = onnx.ModelProto()
    model16.CopyFrom(model)
    graph = model16.graph
    changed = _retype_constants(graph, _float32_only_tensors(graph))
    initializers = {t.name for t in graph.initializer}
    casts_in, casts_out = [], []
    for value in graph.input:
        if value.name in initializers or value.type.tensor_type.elem_type != FLOAT:
            continue
        readers = [node for node in graph.node if value.name in node.input]
        if all(node.op_type == "Cast" and _cast_to(node) == FLOAT16 for node in readers):
            continue  # already cast at the boundary
        cast_name = f"{value.name}__fp16"
        _rename_input_uses(graph, value.name, cast_name)
        casts_in.append(onnx.helper.make_node("Cast", [value.name], [cast_name], to=FLOAT16,
                                              name=f"{value.name}__to_fp16"))
    writers = {out: node for node in graph.node for out in node.output}
    for value in graph.output:
        writer = writers.get(value.name)
        if value.type.tensor_type.elem_type != FLOAT or writer is None:
            continue  # an output that is a graph input or a constant passes through untouched
        if writer.op_type == "Cast" and _cast_to(writer) == FLOAT and writer.name.endswith("__to_fp32"):
            continue  # the boundary Cast this pass inserted before
        inner = f"{value.name}__fp16"
        for i, name in enumerate(writer.output):
            if name == value.name:
                writer.output[i] = inner
        _rename_input_uses(graph, value.name, inner)
        casts_out.append(onnx.helper.make_node("Cast", [inner], [value.name], to=FLOAT,
                                               name=f"{value.name}__to_fp32"))
    changed = changed or bool(casts_in or casts_out)
    if not changed:
        return model, False
    del graph.value_info[:]
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    return model16, True


def _cast_to(node) -> int | None:
    return next((attr.i for attr in node.attribute if attr.name == "to"), None)


def write_fp16_onnx(fp32_onnx_path: Path, out_path: Path) -> Path:
    """Write the fp16 rewrite of `fp32_onnx_path` to `out_path` atomically; return `out_path`."""
    fp32_onnx_path, out_path = Path(fp32_onnx_path), Path(out_path)
    if not fp32_onnx_path.is_file():
        raise InputError(f"ONNX file {fp32_onnx_path} does not exist; check the path")
    model, _ = pass_fp16(onnx.load(str(fp32_onnx_path)))
    onnx.checker.check_model(model)
    with atomic_path(out_path) as temp:
        onnx.save(model, str(temp))
    return out_path
