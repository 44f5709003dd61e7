"""Small onnx-graphsurgeon helpers shared by the graph passes: model <-> graph, constants, consumers, change check."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx

from dfp_deploy.core.errors import ExportError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def gs_module():
    """onnx-graphsurgeon, imported on first use so `import dfp_deploy` stays light."""
    import onnx_graphsurgeon as gs

    return gs


def to_graph(graph_or_model):
    """A gs.Graph for a ModelProto (a fresh graph; the proto is untouched) or the gs.Graph itself (edited in place)."""
    gs = gs_module()
    if isinstance(graph_or_model, gs.Graph):
        return graph_or_model
    if isinstance(graph_or_model, onnx.ModelProto):
        return gs.import_onnx(graph_or_model)
    raise TypeError(f"expected an onnx.ModelProto or onnx_graphsurgeon.Graph, got {type(graph_or_model).__name__}")


def to_model(graph) -> onnx.ModelProto:
    """Export a gs.Graph back to a ModelProto, keeping its opset imports and IR version."""
    return gs_module().export_onnx(graph)


def default_opset(graph) -> int:
    return int(graph.opset)


def is_constant(tensor) -> bool:
    return isinstance(tensor, gs_module().Constant)


def constant_array(tensor) -> np.ndarray | None:
    """The value of a gs.Constant as a numpy array, or None for a Variable (activation)."""
    return np.asarray(tensor.values) if is_constant(tensor) else None


def producer(tensor):
    """The node that writes `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if len(tensor.inputs) else None


def sole_consumer(tensor, graph):
    """The only node reading `tensor` when it is not also a graph output; otherwise None."""
    if tensor in graph.outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def unique_name(graph, base: str) -> str:
    """`base`, or `base_<n>` with the smallest n that no tensor or node in the graph uses yet (node names too: a
    weight shared by two convs gets a DequantizeLinear per conv, and ONNX refuses two nodes of one name)."""
    taken = graph.tensors().keys() | {node.name for node in graph.nodes}
    if base not in taken:
        return base
    n = 1
    while f"{base}_{n}" in taken:
        n += 1
    return f"{base}_{n}"


def _digest(values: np.ndarray) -> str:
    values = np.ascontiguousarray(values)
    return hashlib.sha1(values.tobytes() + str(values.dtype).encode() + str(values.shape).encode()).hexdigest()


def signature(graph) -> tuple:
    """An order-insensitive fingerprint of the computation: nodes (op, attrs, edges), constant values, graph I/O.

    Passes compare it before and after to report `changed`; a toposort that only reorders nodes is not a change.
    """
    nodes = []
    for node in graph.nodes:
        attrs = tuple(sorted((k, repr(v)) for k, v in node.attrs.items()))
        nodes.append((node.op, node.domain or "", attrs, tuple(t.name for t in node.inputs),
                      tuple(t.name for t in node.outputs)))
    constants = tuple(sorted((name, _digest(np.asarray(t.values)))
                             for name, t in graph.tensors().items() if is_constant(t)))
    io = (tuple(t.name for t in graph.inputs), tuple(t.name for t in graph.outputs))
    return tuple(sorted(nodes)), constants, io


def require_opset(graph, minimum: int, why: str) -> None:
    if default_opset(graph) < minimum:
        raise ExportError(f"the ONNX model has opset {default_opset(graph)}, but {why} needs opset >= {minimum}; "
                          f"re-export with advanced.export.opset >= {minimum}")
