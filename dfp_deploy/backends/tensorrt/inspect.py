"""Read a TensorRT engine's layer information: which layers run in which precision, and the reformatting copies.

The plan is built with ProfilingVerbosity.DETAILED, and IEngineInspector's JSON lists every engine layer with its
type, input/output formats ("Thirty-two wide channel vectorized row major Int8 format", ...), tactic and Origin
(why the layer exists: "REFORMAT" for a copy TensorRT inserted, "QDQ" for the graph's own Q/DQ nodes).
`summarize_layers` turns it into "6/7 conv/gemm layers run INT8, 4 reformats": the check that the layers meant to
run int8 really do (Q/DQ placed only before a Conv can leave it in fp32) and the count of reformatting copies that
channel counts off the vector width cause.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import LayerPrecision, LayerSummary

_PRECISION_TOKENS = {
    "int8": "INT8", "uint8": "UINT8", "fp8": "FP8", "int4": "INT4", "fp4": "FP4",
    "bf16": "BF16", "bfloat16": "BF16", "fp16": "FP16", "half": "FP16", "float16": "FP16",
    "fp32": "FP32", "float": "FP32", "float32": "FP32", "int32": "INT32", "int64": "INT64", "bool": "BOOL",
}
UNKNOWN = "UNKNOWN"
_NUMERIC = ("INT8", "UINT8", "FP8", "INT4", "FP4", "BF16", "FP16", "FP32")
# ConvActPool: a convolution fused with its activation and pooling (its weights sit under "ConvWeights")
_WEIGHTED_PARAMETER_TYPES = ("Convolution", "Deconvolution", "FullyConnected", "MatrixMultiply", "Gemm", "ConvActPool")
_WEIGHTED_TYPE_WORDS = ("convolution", "gemm", "matrixmultiply")
_FUSED_TYPES = ("fusion", "kgen", "myelin")  # Myelin regions: only the tactic tells what they compute
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def format_precision(text: str | None) -> str:
    """The data type named in a layer-information format string ("... row major Int8 format" -> "INT8")."""
    for token in re.split(r"[^a-z0-9]+", (text or "").lower()):
        if token in _PRECISION_TOKENS:
            return _PRECISION_TOKENS[token]
    return UNKNOWN


@dataclass(frozen=True)
class LayerInfo:
    """One engine layer as IEngineInspector describes it (fields absent at lower verbosity stay empty)."""

    name: str
    type: str
    precision: str  # of the data the kernel reads: its first numeric input, else its first output
    input_formats: tuple[str, ...] = ()
    output_formats: tuple[str, ...] = ()
    input_precisions: tuple[str, ...] = ()
    output_precisions: tuple[str, ...] = ()
    tactic: str | None = None
    weights_type: str | None = None
    parameter_type: str | None = None
    onnx_nodes: tuple[str, ...] = ()  # the ONNX nodes fused into this layer
    origin: str | None = None  # why the layer exists: "REFORMAT" (a copy TensorRT inserted), "QDQ", ...

    @property
    def is_reformat(self) -> bool:
        """A format-conversion copy TensorRT inserted between two layers (the cost of mismatched layouts).

        Quantize/Dequantize layers also have LayerType "Reformat" but Origin "QDQ": they are the graph's own
        Q/DQ nodes, not copies. Without an Origin (names-only verbosity) the name is the only evidence.
        """
        if self.origin is not None:
            return self.origin == "REFORMAT"
        return "reformatting copynode" in self.name.lower()

    @property
    def is_qdq(self) -> bool:
        return self.origin == "QDQ"

    @property
    def is_weighted(self) -> bool:
        if self.is_reformat or self.is_qdq:
            return False
        if self.parameter_type in _WEIGHTED_PARAMETER_TYPES:
            return True
        kind = self.type.lower()
        if any(word in kind for word in _WEIGHTED_TYPE_WORDS):
            return True
        return kind in _FUSED_TYPES and bool(re.search(r"gemm|fprop|conv", (self.tactic or "").lower()))

    @property
    def runs_int8(self) -> bool:
        if self.precision != UNKNOWN:
            return self.precision == "INT8"
        # names-only verbosity or "N/A" formats: fall back to the weights and the kernel name (i8i8 = int8 x int8)
        return self.weights_type == "INT8" or bool(re.search(r"i8i8", (self.tactic or "").lower()))


def _onnx_nodes_of(name: str, metadata: str | None) -> tuple[str, ...]:
    if metadata:
        found = tuple(m.strip() for m in _ONNX_LAYER.findall(metadata))
        if found:
            return found
    if "reformatting copy" in name.lower():
        return ()
    # TensorRT names a fused layer by joining its members' names with " + "
    return tuple(part.strip() for part in name.split(" + ") if part.strip())


def _tensor_formats(tensors) -> tuple[tuple[str, ...], tuple[str, ...]]:
    formats = tuple(str(t.get("Format/Datatype", "")) if isinstance(t, dict) else str(t) for t in tensors or ())
    return formats, tuple(format_precision(f) for f in formats)


def _layer_from_json(entry) -> LayerInfo:
    if isinstance(entry, str):  # ProfilingVerbosity.LAYER_NAMES_ONLY
        return LayerInfo(name=entry, type=UNKNOWN, precision=UNKNOWN, onnx_nodes=_onnx_nodes_of(entry, None))
    if not isinstance(entry, dict):
        raise InputError(f"layer information: a layer entry is a {type(entry).__name__}, expected an object")
    name = str(entry.get("Name", ""))
    in_formats, in_precisions = _tensor_formats(entry.get("Inputs"))
    out_formats, out_precisions = _tensor_formats(entry.get("Outputs"))
    numeric_in = [p for p in in_precisions if p in _NUMERIC]
    numeric_out = [p for p in out_precisions if p in _NUMERIC]
    precision = numeric_in[0] if numeric_in else numeric_out[0] if numeric_out else UNKNOWN
    weights = entry.get("Weights", entry.get("ConvWeights"))  # ConvActPool keeps its conv's weights apart
    weights_type = format_precision(str(weights.get("Type"))) if isinstance(weights, dict) else None
    return LayerInfo(
        name=name, type=str(entry.get("LayerType", UNKNOWN)), precision=precision,
        input_formats=in_formats, output_formats=out_formats,
        input_precisions=in_precisions, output_precisions=out_precisions,
        tactic=entry.get("TacticName") or entry.get("TacticValue"),
        weights_type=weights_type if weights_type != UNKNOWN else None,
        parameter_type=entry.get("ParameterType"),
        onnx_nodes=_onnx_nodes_of(name, entry.get("Metadata")),
        origin=str(entry["Origin"]) if entry.get("Origin") is not None else None,
    )


def parse_layer_info(json_text: str) -> list[LayerInfo]:
    """The layers of IEngineInspector.get_engine_information(LayerInformationFormat.JSON), in engine order."""
    try:
        data = json.loads(json_text)
    except (TypeError, ValueError) as e:
        raise InputError(f"layer information is not valid JSON ({e}); pass the text of "
                         "get_engine_information(LayerInformationFormat.JSON)") from e
    layers = data.get("Layers") if isinstance(data, dict) else data
    if not isinstance(layers, list):
        raise InputError("layer information has no \"Layers\" list; pass the text of "
                         "get_engine_information(LayerInformationFormat.JSON)")
    return [_layer_from_json(entry) for entry in layers]


Int8Expectation = set | frozenset | Callable[[LayerInfo], bool] | bool | None


def _node_statuses(layers: list[LayerInfo], nodes: Iterable[str]) -> dict[str, LayerInfo | None]:
    """ONNX node name -> the (non-reformat) layer it was fused into, or None when no layer names it."""
    owner = {}
    for layer in layers:
        if layer.is_reformat:
            continue
        for node in layer.onnx_nodes:
            # a weighted layer wins over a Q/DQ or pointwise layer that also lists the node
            if node not in owner or (layer.is_weighted and not owner[node].is_weighted):
                owner[node] = layer
    return {node: owner.get(node) for node in sorted(nodes)}


def _count_text(counter: Counter) -> str:
    return ", ".join(f"{n} {p}" for p, n in sorted(counter.items(), key=lambda item: (-item[1], item[0])))


def summarize_layers(layers: list[LayerInfo], expect_int8: Int8Expectation = None) -> LayerSummary:
    """Counts for the report: reformats, layers per precision, and which layers meant to run int8 do not.

    `expect_int8`: None (no int8 expectation), True (every conv/gemm layer), a set of ONNX node names (the
    Conv/Gemm nodes fed by a DequantizeLinear: build.int8_expected_nodes) or a predicate on LayerInfo. With a set
    the count is per ONNX node, and nodes that no layer names are listed as unmatched (not counted as int8).
    """
    reformats = [layer for layer in layers if layer.is_reformat]
    compute = [layer for layer in layers if not layer.is_reformat]
    weighted = [layer for layer in compute if layer.is_weighted]
    weighted_counts = Counter(layer.precision for layer in weighted)
    counts = dict(
        layers=len(layers), reformats=len(reformats), reformat_layers=tuple(layer.name for layer in reformats),
        qdq_layers=sum(1 for layer in layers if layer.is_qdq),
        by_precision=tuple(sorted(Counter(layer.precision for layer in compute).items())),
        weighted_layers=len(weighted), weighted_by_precision=tuple(sorted(weighted_counts.items())))
    if expect_int8 is None or expect_int8 is False:
        return LayerSummary(**counts, text=f"{len(weighted)} conv/gemm layers "
                                           f"({_count_text(weighted_counts) or 'none'}), {len(reformats)} reformats")
    if isinstance(expect_int8, (set, frozenset)):
        statuses = _node_statuses(layers, expect_int8)
        not_int8 = [LayerPrecision(node, layer.name, layer.precision)
                    for node, layer in statuses.items() if layer is not None and not layer.runs_int8]
        unmatched = [node for node, layer in statuses.items() if layer is None]
        expected, ok = len(statuses), sum(1 for layer in statuses.values() if layer is not None and layer.runs_int8)
    else:
        wanted = (lambda layer: True) if expect_int8 is True else expect_int8
        meant = [layer for layer in weighted if wanted(layer)]
        not_int8 = [LayerPrecision(", ".join(layer.onnx_nodes), layer.name, layer.precision)
                    for layer in meant if not layer.runs_int8]
        unmatched, expected, ok = [], len(meant), sum(1 for layer in meant if layer.runs_int8)
    return LayerSummary(**counts, text=f"{ok}/{expected} conv/gemm layers run INT8, {len(reformats)} reformats",
                        int8_expected=expected, int8_ok=ok, not_int8=tuple(not_int8),
                        unmatched_int8_nodes=tuple(unmatched))


def engine_layers(trt, engine, int8_nodes: frozenset | None) -> tuple[list[LayerInfo], LayerSummary, str]:
    """(layers, summary, the inspector's JSON text) of a deserialized engine; int8_nodes: None unless int8."""
    inspector = engine.create_engine_inspector()
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    layers = parse_layer_info(text)
    return layers, summarize_layers(layers, set(int8_nodes) if int8_nodes is not None else None), text
