"""Fold an inference-mode BatchNormalization into the Conv that feeds it.

For a Conv y = W * x + b followed by BN z = gamma * (y - mean) / sqrt(var + eps) + beta, per output channel k:

    s_k  = gamma_k / sqrt(var_k + eps)
    W'_k = s_k * W_k                  (W_k: the k-th output filter, axis 0 of the KCRS weight, also for groups)
    b'_k = s_k * (b_k - mean_k) + beta_k

so z = W' * x + b' exactly (up to float rounding). The Conv takes over the BN's output tensor name, so activation
ranges keyed by tensor name (ranges.py computes data-free ones from the BN before folding) still apply.

A BN is folded only when the Conv output feeds nothing but that BN, all weights and BN statistics are constants
(run `pass_cleanup(fold_constants=True)` first to resolve Identity/Constant chains), and the BN is in inference
mode; every other BN is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx

from dfp_deploy.export.passes._graph import constant_array, gs_module, producer, signature, sole_consumer, \
    to_graph, to_model, unique_name


def _foldable_conv(bn, graph):
    """The Conv whose only consumer is `bn`, if the pair can be folded; else None."""
    if bn.attrs.get("training_mode", 0) != 0 or len(bn.inputs) != 5:
        return None
    if any(len(t.outputs) for t in bn.outputs[1:]):  # running-stat outputs in use: a training graph
        return None
    conv = producer(bn.inputs[0])
    if conv is None or conv.op != "Conv" or sole_consumer(bn.inputs[0], graph) is not bn:
        return None
    if constant_array(conv.inputs[1]) is None:
        return None
    if len(conv.inputs) > 2 and constant_array(conv.inputs[2]) is None:
        return None
    if any(constant_array(t) is None for t in bn.inputs[1:]):
        return None
    return conv


def _folded_parameters(conv, bn) -> tuple[np.ndarray, np.ndarray]:
    weight = constant_array(conv.inputs[1])
    out_channels = weight.shape[0]
    bias = constant_array(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(out_channels, weight.dtype)
    gamma, beta, mean, var = (constant_array(t).astype(np.float64) for t in bn.inputs[1:])
    scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    folded_weight = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    folded_bias = scale * (bias.astype(np.float64) - mean) + beta
    return folded_weight.astype(weight.dtype), folded_bias.astype(weight.dtype)


def _fold(conv, bn, graph) -> None:
    gs = gs_module()
    weight, bias = _folded_parameters(conv, bn)
    stem = conv.name or bn.outputs[0].name
    conv.inputs = [conv.inputs[0],
                   gs.Constant(unique_name(graph, f"{stem}.weight_bn_folded"), weight),
                   gs.Constant(unique_name(graph, f"{stem}.bias_bn_folded"), bias)]
    bn_output = bn.outputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    conv.outputs = [bn_output]


def pass_fold_bn(graph_or_model) -> tuple[onnx.ModelProto, bool]:
    """Fold every foldable Conv -> BatchNormalization pair; return (model, whether any pair was folded)."""
    graph = to_graph(graph_or_model)
    before = signature(graph)
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        conv = _foldable_conv(bn, graph)
        if conv is not None:
            _fold(conv, bn, graph)
    graph.cleanup().toposort()
    return to_model(graph), signature(graph) != before
