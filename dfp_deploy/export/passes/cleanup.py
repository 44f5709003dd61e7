"""Remove dead nodes and tensors, topologically sort, and (only when asked) fold constant subgraphs.

Constant folding evaluates nodes whose inputs are all constants and replaces them by their values. It is meant
for the fp32 graph before Q/DQ insertion (shape arithmetic, Identity chains left by exporters). QuantizeLinear
and DequantizeLinear nodes are always excluded from folding: a weight DequantizeLinear has only constant inputs,
and folding it would turn the int8 weight back into fp32, which TensorRT then rejects ("Could not fuse 2nd input
(kernel weights)") and ONNX Runtime can no longer fuse into an integer kernel. onnx-graphsurgeon 0.6 already skips
Q/DQ when folding; the explicit exclusion keeps the guarantee with other versions.
"""

from __future__ import annotations

import numpy as np
import onnx

from dfp_deploy.export.passes._graph import QDQ_OPS, is_constant, signature, to_graph, to_model


def _is_qdq(node) -> bool:
    return node.op in QDQ_OPS


def _castlike_to_cast(graph) -> bool:
    """CastLike(constant, x) -> Cast(constant, to=dtype of x), so folding can evaluate it.

    The dynamo exporter writes Clip bounds and zero biases as CastLike(constant, activation); the activation is
    there only for its type, but it makes the node look non-constant to the folder.
    """
    rewritten = False
    for node in graph.nodes:
        if node.op != "CastLike" or len(node.inputs) != 2 or not is_constant(node.inputs[0]):
            continue
        dtype = node.inputs[1].dtype
        if dtype is None:
            continue
        node.op = "Cast"
        node.attrs = {"to": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}
        node.inputs = [node.inputs[0]]
        rewritten = True
    return rewritten


def pass_cleanup(graph_or_model, *, fold_constants: bool = False) -> tuple[onnx.ModelProto, bool]:
    """Clean up (and optionally constant-fold) the graph; return (model, whether the computation graph changed)."""
    graph = to_graph(graph_or_model)
    before = signature(graph)
    if fold_constants:
        # onnx-graphsurgeon folds with ONNX Runtime; QDQ nodes are never candidates, see the module docstring.
        # A second round evaluates the CastLike nodes whose constant input the first round produced.
        graph.fold_constants(should_exclude_node=_is_qdq)
        if _castlike_to_cast(graph):
            graph.fold_constants(should_exclude_node=_is_qdq)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return to_model(graph), signature(graph) != before
