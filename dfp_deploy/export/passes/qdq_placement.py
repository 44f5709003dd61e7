"""Where Q/DQ nodes go for each target: which activation inputs, weights and biases get quantized.

`tensorrt` (explicit quantization, placement rules of TensorRT's documentation):
- every Conv/Gemm: its data input (per-tensor) and its constant weight (per output channel); the bias stays fp32;
- every Add of two activations: its residual input, i.e. the input that is not the output of a Conv/Gemm used only
  by this Add (TensorRT fuses that Conv with the Add); both inputs when neither comes from such a Conv, the second
  input when both do;
- nothing on outputs: only the consumer slots above read the dequantized tensor, other consumers keep fp32.

`ort-cpu` (the QDQ form ONNX Runtime's CPU optimizer turns into integer kernels, e.g. DQ->Conv->Q => QLinearConv):
- every input of Conv, Gemm, Add, Concat, MaxPool, AveragePool and GlobalAveragePool (weights per output channel,
  Conv/Gemm biases as int32), and their output, so each such node sits between DQ and Q;
- an output read only by a Relu or Clip is quantized after that activation instead: with a zero point at the
  bottom of the uint8 range the Q itself clips at 0, and ORT removes the Relu/Clip and fuses the rest;
- MaxPool's output reuses its input's range (max commutes with a monotone quantizer, so ORT can drop the Q/DQ
  pair around it only if both share one scale);
- every consumer of a quantized tensor reads the dequantized copy, so the producer is followed by Q alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dfp_deploy.core.errors import InputError
from dfp_deploy.export.passes._graph import constant_array, is_constant, producer, sole_consumer

STYLES = ("tensorrt", "ort-cpu")
WEIGHTED_OPS = ("Conv", "Gemm")
ORT_QUANTIZABLE_OPS = ("Conv", "Gemm", "Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool")
REMOVABLE_ACTIVATIONS = ("Relu", "Clip")


@dataclass
class Placement:
    """Slots to rewire: activations {tensor name: [(node, input index)]}, weights [(node, index, channel axis)]."""

    activations: dict[str, list] = field(default_factory=dict)
    tensors: dict[str, object] = field(default_factory=dict)  # name -> gs tensor, for the activations above
    weights: list[tuple] = field(default_factory=list)
    biases: list = field(default_factory=list)  # Conv/Gemm nodes whose constant bias becomes int32 (ort-cpu)
    range_of: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose range it borrows

    def add_slot(self, tensor, node, index: int) -> None:
        slots = self.activations.setdefault(tensor.name, [])
        self.tensors[tensor.name] = tensor
        if (node, index) not in slots:
            slots.append((node, index))

    def add_all_consumers(self, tensor) -> None:
        self.activations.setdefault(tensor.name, [])
        for node in tensor.outputs:
            for index, inp in enumerate(node.inputs):
                if inp is tensor:
                    self.add_slot(tensor, node, index)


def check_style(style: str) -> str:
    if style not in STYLES:
        raise InputError(f"quantization style {style!r} is not one of {', '.join(STYLES)}")
    return style


def weight_axis(node) -> int | None:
    """Output-channel axis of a weighted node's constant weight (input 1), or None when it is not a constant."""
    if node.op not in WEIGHTED_OPS or len(node.inputs) < 2 or constant_array(node.inputs[1]) is None:
        return None
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 0


def is_fusable_weighted_branch(tensor, add, graph) -> bool:
    """True when `tensor` is the output of a Conv/Gemm that feeds only `add` (TensorRT fuses the two)."""
    node = producer(tensor)
    return node is not None and node.op in WEIGHTED_OPS and sole_consumer(tensor, graph) is add


def residual_input_indices(add, graph) -> list[int]:
    """Indices of an Add's inputs that TensorRT wants quantized (see module docstring); [] if not two activations."""
    if len(add.inputs) != 2 or any(is_constant(t) for t in add.inputs):
        return []
    plain = [i for i, t in enumerate(add.inputs) if not is_fusable_weighted_branch(t, add, graph)]
    return plain if plain else [1]


def _plan_tensorrt(graph) -> Placement:
    placement = Placement()
    for node in graph.nodes:
        if node.op in WEIGHTED_OPS:
            axis = weight_axis(node)
            placement.add_slot(node.inputs[0], node, 0)
            if axis is None:
                placement.add_slot(node.inputs[1], node, 1)
            else:
                placement.weights.append((node, 1, axis))
        elif node.op == "Add":
            for index in residual_input_indices(node, graph):
                placement.add_slot(node.inputs[index], node, index)
    return placement


def effective_output(tensor, graph):
    """The tensor to quantize for a node's output: after a Relu/Clip that is its only reader, else itself."""
    reader = sole_consumer(tensor, graph)
    if reader is not None and reader.op in REMOVABLE_ACTIVATIONS:
        return reader.outputs[0]
    return tensor


def _plan_ort_node(node, graph, placement: Placement) -> None:
    axis = weight_axis(node)
    for index, tensor in enumerate(node.inputs):
        if index == 1 and axis is not None:
            placement.weights.append((node, 1, axis))
        elif index == 2 and node.op in WEIGHTED_OPS and is_constant(tensor):
            placement.biases.append(node)
        elif not is_constant(tensor):
            placement.add_all_consumers(tensor)
    output = effective_output(node.outputs[0], graph)
    if output not in graph.outputs:
        placement.add_all_consumers(output)
        if node.op == "MaxPool":
            placement.range_of[output.name] = node.inputs[0].name


def _plan_ort_cpu(graph) -> Placement:
    placement = Placement()
    for node in graph.nodes:
        if node.op not in ORT_QUANTIZABLE_OPS or not node.inputs or not node.outputs:
            continue
        if node.op == "Add" and any(is_constant(t) for t in node.inputs):
            continue  # an Add of a constant is a bias-like op; ORT keeps it fp32 anyway
        if node.op in WEIGHTED_OPS and weight_axis(node) is None:
            continue  # activation x activation products have no integer path on ORT CPU
        _plan_ort_node(node, graph, placement)
    return placement


def plan(graph, style: str) -> Placement:
    """The Q/DQ placement for `style` on a BN-folded fp32 graph."""
    return _plan_tensorrt(graph) if check_style(style) == "tensorrt" else _plan_ort_cpu(graph)
