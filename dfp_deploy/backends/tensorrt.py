"""TensorRT engines: parse the ONNX, build a strongly typed plan, read its layer information, time it with CUDA events.

Written against TensorRT 10's documented Python API (and valid on 11, where strong typing is the only mode).

Precision is decided by the graph, never by builder flags. Every network is created STRONGLY_TYPED: each
tensor's type follows from the graph's inputs, constants and casts, and TensorRT may not change it. The docs
(TensorRT 10 "explicit quantization"; 10.12 deprecates weak typing; the 11.x migration guide removes
BuilderFlag.FP16/INT8) say precision flags must not be set on such a network, so:
- fp32: the exported graph as it is. TF32 is switched off (BuilderFlag.TF32 cleared) unless asked for: TF32
  convolutions keep 10 mantissa bits, which would be an "fp32" engine that is not fp32 and misses the parity bound.
- int8: the explicit-quantization (Q/DQ) graph as it is, checked first against TensorRT's placement rules
  (symmetric int8, per-channel weights on axis 0, Q/DQ on every Conv/Gemm input and on residual Add inputs;
  dfp_deploy.export.passes.validate_qdq, "tensorrt" style). Layers outside the Q/DQ islands run fp32.
- fp16: the graph is rewritten to fp16 (float initializers and constants cast, Cast nodes retargeted) with a
  Cast at each float input and output, so the engine still takes and returns fp32 and its numbers compare with
  the other backends. We chose this over the FP16 flag on a weakly typed network because (a) the flag is
  deprecated since 10.12 and gone in 11, (b) with the flag fp16 is only *allowed*: TensorRT keeps any layer in
  fp32 when that times faster, so an "fp16" report could describe an engine that mostly is not. The two Casts are
  in the timed figure (two tiny kernels), as they would be in a deployment that feeds fp32.

Timing cache: tactic timings depend on the GPU, its compute capability and the TensorRT and CUDA versions, so the
cache file is keyed by all four (`timing_cache_path`). It is loaded before a build and saved atomically after it,
merged with whatever another process saved meanwhile (ITimingCache.combine), so hundreds of candidate builds in a
search reuse one another's timings and pick the same tactics.

Layer information: the plan is built with ProfilingVerbosity.DETAILED, and IEngineInspector's JSON lists every
engine layer with its type, input/output formats ("Thirty-two wide channel vectorized row major Int8 format", ...)
and tactic. `summarize_layers` turns it into "6/7 conv/gemm layers run INT8, 4 reformats": the check that the
layers meant to run int8 really do (Q/DQ placed only before a Conv can leave it in fp32) and the count of
reformatting copies that channel counts off the vector width cause.

Timing: `prepare(x)` copies `x` to a device buffer once, binds all I/O of a private execution context, and
returns a runner that records a CUDA event, enqueues (execute_async_v3, or the replay of a CUDA graph captured from
it) on its own stream, records a second event and waits for it; the result is the elapsed time between the two
events in milliseconds: GPU time of one inference with no host<->device copy in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dfp_deploy.backends.registry import BackendInfo, check_precision, check_threads
from dfp_deploy.core.atomic import atomic_path, write_text_atomic
from dfp_deploy.core.env import gpu_models
from dfp_deploy.core.errors import BackendUnavailable, ExportError, InputError

NAME = "tensorrt"
NOT_INSTALLED = "tensorrt Python package not installed (pip install tensorrt; needs an NVIDIA GPU)"
NO_GPU = "no CUDA GPU visible"
OPT_LEVELS = range(0, 6)  # IBuilderConfig.builder_optimization_level: 0 fastest build .. 5 widest tactic search
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default
FP16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------------------------
# recipe -> builder configuration


def builder_settings(precision: str, opt_level: int = DEFAULT_OPT_LEVEL, workspace_mb: int | None = None, *,
                     allow_tf32: bool = False) -> dict:
    """The builder configuration for one precision (see the module docstring for why each is strongly typed).

    Keys: strongly_typed, builder_flags / cleared_flags (trt.BuilderFlag names to set / clear), network_dtype
    (the float type the ONNX graph is rewritten to before parsing), requires_qdq, builder_optimization_level,
    workspace_bytes (None: TensorRT's default, the device memory), profiling_verbosity.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise InputError(f"target.precision: {precision!r} is not one of fp32, fp16, int8")
    if isinstance(opt_level, bool) or not isinstance(opt_level, int) or opt_level not in OPT_LEVELS:
        raise InputError(f"tensorrt builder optimization level: {opt_level!r} is not an integer in 0..5 "
                         f"(3 is TensorRT's default; higher searches more tactics and builds slower)")
    if workspace_mb is not None and (isinstance(workspace_mb, bool) or not isinstance(workspace_mb, int)
                                     or workspace_mb < 1):
        raise InputError(f"tensorrt workspace: {workspace_mb!r} MiB must be a positive integer (or omitted)")
    return {
        "precision": precision,
        "strongly_typed": True,
        "builder_flags": (),  # precision flags are forbidden on strongly typed networks
        "cleared_flags": () if allow_tf32 or precision == "fp16" else ("TF32",),
        "network_dtype": "fp16" if precision == "fp16" else "fp32",
        "requires_qdq": precision == "int8",
        "builder_optimization_level": opt_level,
        "workspace_bytes": None if workspace_mb is None else workspace_mb << 20,
        "profiling_verbosity": "DETAILED",
    }


# ---------------------------------------------------------------------------------------------------------------
# timing cache


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dfp-deploy" / "trt-timing"


def timing_cache_key(gpu_name: str, compute_capability: tuple[int, int], trt_version: str,
                     cuda_version: str | None) -> str:
    """A filename-safe key naming everything a timing cache is specific to (lowercase, [a-z0-9.-] only)."""
    major, minor = compute_capability
    raw = f"{gpu_name}-sm{major}{minor}-trt{trt_version}-cuda{cuda_version or 'unknown'}"
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9.]", "-", raw.lower())).strip("-.")


def timing_cache_path(gpu_name: str, compute_capability: tuple[int, int], trt_version: str,
                      cuda_version: str | None, cache_dir: Path | None = None) -> Path:
    key = timing_cache_key(gpu_name, compute_capability, trt_version, cuda_version)
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.cache"


def load_timing_cache(path: Path) -> bytes:
    """The serialized cache, or b"" when there is none yet (or it cannot be read: the build then starts cold)."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def save_timing_cache(path: Path, data: bytes) -> None:
    with atomic_path(Path(path)) as temp:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------------
# the ONNX graph TensorRT gets


def _onnx():
    import onnx  # lazy: keeps `import dfp_deploy` light

    return onnx


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
INT8_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def static_input_shapes(model) -> dict[str, tuple[int, ...]]:
    """{input name: shape} of the graph's real inputs; ExportError when a dimension is not a fixed number."""
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
        if any(s <= 0 for s in shape):
            shown = tuple(d.dim_param or "?" if s <= 0 else s for d, s in zip(dims, shape))
            raise ExportError(f"tensorrt: input {value.name!r} has a dynamic shape {shown}; engines here are built "
                              "for one static shape: export with export.dynamic_batch: false")
        shapes[value.name] = shape
    return shapes


def int8_expected_nodes(model) -> set[str]:
    """Names of the Conv/Gemm/MatMul nodes whose data input is dequantized: the layers that must run int8."""
    writer = {out: node for node in model.graph.node for out in node.output}
    expected = set()
    for node in model.graph.node:
        if node.op_type in INT8_COMPUTE_OPS and node.input:
            source = writer.get(node.input[0])
            if source is not None and source.op_type == "DequantizeLinear":
                expected.add(node.name)
    return expected


def tensorrt_qdq_problems(model) -> list[str]:
    """Broken TensorRT Q/DQ placement rules, one line each, from the export passes' validator."""
    from dfp_deploy.export.passes.validate_qdq import qdq_problems

    return qdq_problems(model, "tensorrt")


def _check_qdq_graph(model, precision: str) -> None:
    has_qdq = any(node.op_type in QDQ_OPS for node in model.graph.node)
    if precision == "int8" and not has_qdq:
        raise ExportError("tensorrt int8 needs an explicitly quantized ONNX (QuantizeLinear/DequantizeLinear "
                          "nodes) and this one has none; prepare it with "
                          "dfp_deploy.export.passes.prepare_int8_onnx(..., style='tensorrt')")
    if precision != "int8" and has_qdq:
        raise ExportError(f"tensorrt {precision}: the ONNX contains Q/DQ nodes, which a strongly typed build runs "
                          "in int8; build it with target.precision: int8 (or export without quantization)")
    if precision == "int8":
        problems = tensorrt_qdq_problems(model)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ExportError(f"tensorrt int8: the Q/DQ graph breaks TensorRT's placement rules: {problems[0]}{more}")


# Inputs that ONNX types as float32 whatever the data type (Resize's roi and scales, Upsample's scales)
_FLOAT32_SLOTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def _float32_only_tensors(graph) -> set[str]:
    return {node.input[i] for node in graph.node for op, i in _FLOAT32_SLOTS
            if node.op_type == op and len(node.input) > i and node.input[i]}


def _fp16_tensor(values: np.ndarray, name: str):
    from onnx import numpy_helper

    # clamp, not overflow: an fp16 inf in a weight would poison every output it reaches
    return numpy_helper.from_array(np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16), name)


def _to_fp16_tensor(tensor):
    from onnx import numpy_helper

    return _fp16_tensor(numpy_helper.to_array(tensor), tensor.name)


def _retype_constants(graph, keep: set[str]) -> None:
    onnx = _onnx()
    FLOAT = onnx.TensorProto.FLOAT
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == FLOAT and tensor.name not in keep:
            graph.initializer[i].CopyFrom(_to_fp16_tensor(tensor))
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(f"tensorrt fp16: node {node.name!r} ({node.op_type}) has a subgraph, which the fp16 "
                              "rewrite does not handle; build this model in fp32")
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16
        elif node.op_type in ("Constant", "ConstantOfShape") and not set(node.output) & keep:
            _retype_constant_node(node)


def _retype_constant_node(node) -> None:
    onnx = _onnx()
    FLOAT = onnx.TensorProto.FLOAT
    names = {attr.name for attr in node.attribute}
    if node.op_type == "ConstantOfShape" and "value" not in names:
        # the default fill is a float32 zero, which would put one float32 tensor into the fp16 graph
        node.attribute.append(onnx.helper.make_attribute(
            "value", onnx.helper.make_tensor("value", onnx.TensorProto.FLOAT16, [1], [0.0])))
        return
    for i, attr in enumerate(node.attribute):
        if attr.name == "value" and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(_to_fp16_tensor(attr.t))
        elif attr.name in ("value_float", "value_floats"):
            values = np.array(attr.f if attr.name == "value_float" else list(attr.floats), dtype=np.float32)
            node.attribute[i].CopyFrom(onnx.helper.make_attribute("value", _fp16_tensor(values, "value")))


def _rename_input_uses(graph, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def to_fp16_graph(model):
    """A copy of `model` that computes in fp16 and still takes and returns float32 (Casts at the boundary).

    Float initializers and Constant values become fp16 (clamped to +-65504), Cast(to=float) becomes Cast(to=fp16),
    and intermediate value_info is dropped (its float types would be stale; TensorRT infers its own). Inputs that
    ONNX requires in float32 (Resize/Upsample scales) are left alone.
    """
    onnx = _onnx()
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    model16 = onnx.ModelProto()
    model16.CopyFrom(model)
    graph = model16.graph
    _retype_constants(graph, _float32_only_tensors(graph))
    del graph.value_info[:]
    initializers = {t.name for t in graph.initializer}
    casts_in, casts_out = [], []
    for value in graph.input:
        if value.name not in initializers and value.type.tensor_type.elem_type == FLOAT:
            cast_name = f"{value.name}__fp16"
            _rename_input_uses(graph, value.name, cast_name)
            casts_in.append(onnx.helper.make_node("Cast", [value.name], [cast_name], to=FLOAT16,
                                                  name=f"{value.name}__to_fp16"))
    produced = {out for node in graph.node for out in node.output}
    for value in graph.output:
        if value.type.tensor_type.elem_type != FLOAT or value.name not in produced:
            continue  # an output that is a graph input or a constant passes through untouched
        inner = f"{value.name}__fp16"
        for node in graph.node:
            for i, name in enumerate(node.output):
                if name == value.name:
                    node.output[i] = inner
        _rename_input_uses(graph, value.name, inner)
        casts_out.append(onnx.helper.make_node("Cast", [inner], [value.name], to=FLOAT,
                                               name=f"{value.name}__to_fp32"))
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    return model16


@dataclass(frozen=True)
class PreparedOnnx:
    """What the parser reads: the serialized graph, its static input shapes and the nodes that must run int8."""

    serialized: bytes
    input_shapes: dict
    int8_nodes: frozenset


def prepare_onnx(model, settings: dict) -> PreparedOnnx:
    """Check `model` for a TensorRT build with `settings` (static shapes, Q/DQ rules) and rewrite it to its dtype."""
    shapes = static_input_shapes(model)
    _check_qdq_graph(model, settings["precision"])
    expected = frozenset(int8_expected_nodes(model)) if settings["requires_qdq"] else frozenset()
    if settings["network_dtype"] == "fp16":
        model = to_fp16_graph(model)
    return PreparedOnnx(model.SerializeToString(), shapes, expected)


# ---------------------------------------------------------------------------------------------------------------
# layer information


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


def summarize_layers(layers: list[LayerInfo], expect_int8: Int8Expectation = None) -> dict:
    """Counts for the report: reformats, layers per precision, and which layers meant to run int8 do not.

    `expect_int8`: None (no int8 expectation), True (every conv/gemm layer), a set of ONNX node names (the
    Conv/Gemm nodes fed by a DequantizeLinear: int8_expected_nodes) or a predicate on LayerInfo. With a set the
    count is per ONNX node, and nodes that no layer names are listed as unmatched (not counted as int8).
    """
    reformats = [layer for layer in layers if layer.is_reformat]
    compute = [layer for layer in layers if not layer.is_reformat]
    weighted = [layer for layer in compute if layer.is_weighted]
    summary = {
        "layers": len(layers),
        "reformats": len(reformats),
        "reformat_layers": [layer.name for layer in reformats],
        "qdq_layers": sum(1 for layer in layers if layer.is_qdq),
        "by_precision": dict(sorted(Counter(layer.precision for layer in compute).items())),
        "weighted_layers": len(weighted),
        "weighted_by_precision": dict(sorted(Counter(layer.precision for layer in weighted).items())),
    }
    if expect_int8 is None or expect_int8 is False:
        counts = Counter(layer.precision for layer in weighted)
        summary["text"] = (f"{len(weighted)} conv/gemm layers ({_count_text(counts) or 'none'}), "
                           f"{len(reformats)} reformats")
        return summary
    if isinstance(expect_int8, (set, frozenset)):
        statuses = _node_statuses(layers, expect_int8)
        not_int8 = [{"onnx_node": node, "layer": layer.name, "precision": layer.precision}
                    for node, layer in statuses.items() if layer is not None and not layer.runs_int8]
        unmatched = [node for node, layer in statuses.items() if layer is None]
        expected, ok = len(statuses), sum(1 for layer in statuses.values() if layer is not None and layer.runs_int8)
    else:
        wanted = (lambda layer: True) if expect_int8 is True else expect_int8
        meant = [layer for layer in weighted if wanted(layer)]
        not_int8 = [{"onnx_node": ", ".join(layer.onnx_nodes), "layer": layer.name, "precision": layer.precision}
                    for layer in meant if not layer.runs_int8]
        unmatched, expected, ok = [], len(meant), sum(1 for layer in meant if layer.runs_int8)
    summary.update(int8_expected=expected, int8_ok=ok, not_int8=not_int8, unmatched_int8_nodes=unmatched)
    summary["text"] = f"{ok}/{expected} conv/gemm layers run INT8, {len(reformats)} reformats"
    return summary


# ---------------------------------------------------------------------------------------------------------------
# TensorRT and CUDA glue (everything below needs the library; nothing runs at import)


def _import_tensorrt():
    try:
        import tensorrt
    except ModuleNotFoundError as e:
        raise BackendUnavailable(NOT_INSTALLED) from e
    except Exception as e:  # a broken install (missing libnvinfer, CUDA mismatch) is unavailable, not a crash
        raise BackendUnavailable(f"tensorrt failed to import: {type(e).__name__}: {e}") from e
    if getattr(tensorrt, "__file__", None) is None or not hasattr(tensorrt, "Builder"):
        # tensorrt-stubs alone leaves a tensorrt/ folder of .pyi files, which imports as an empty namespace package
        raise BackendUnavailable(f"{NOT_INSTALLED}; only an empty 'tensorrt' namespace (type stubs?) is importable")
    return tensorrt


def _cuda_unavailable_reason() -> str | None:
    import torch  # buffers and streams are torch CUDA objects (no pycuda); is_available() creates no context

    if torch.version.cuda is None:
        return f"{NO_GPU}: this torch build ({torch.__version__}) has no CUDA support, which the buffers need"
    if not torch.cuda.is_available():
        return NO_GPU
    return None


# TensorRT keeps ONE logger per process: the first Builder/Runtime's logger is the one every later Builder, Runtime
# and parser logs to (the others are ignored), and TensorRT keeps pointing at it. So the logger is created once, lives
# as long as the module, and each build collects its own errors by holding _LOG_LOCK around a fresh list in
# _current_errors; the builder's worker threads log to the same list because it is a lock-held global, not
# thread-local state.
_PROCESS_LOGGER: tuple | None = None  # (the tensorrt module it was made for, the logger)
_LOG_LOCK = threading.RLock()
_current_errors: list[str] | None = None


def _process_logger(trt):
    """The process-wide trt.ILogger: keeps ERROR/INTERNAL_ERROR messages for the build that holds the lock."""
    global _PROCESS_LOGGER
    with _LOG_LOCK:
        if _PROCESS_LOGGER is not None and _PROCESS_LOGGER[0] is trt:
            return _PROCESS_LOGGER[1]

        class CollectingLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    errors = _current_errors
                    if errors is not None:
                        errors.append(str(msg).strip())

        _PROCESS_LOGGER = (trt, CollectingLogger())
        return _PROCESS_LOGGER[1]


@contextlib.contextmanager
def collected_errors():
    """A fresh list that receives the errors TensorRT logs until the block ends (one build at a time)."""
    global _current_errors
    with _LOG_LOCK:
        previous, _current_errors = _current_errors, []
        try:
            yield _current_errors
        finally:
            _current_errors = previous


def describe_parser_error(error) -> str:
    """One line for an ONNX parser error: node index, name and operator where the parser knows them."""
    parts = []
    node = error.node() if hasattr(error, "node") else -1
    name = error.node_name() if hasattr(error, "node_name") else ""
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    if node is not None and node >= 0:
        parts.append(f"node {node}")
    if op or name:
        parts.append(f"{op} {name!r}".strip() if name else op)
    where = " ".join(parts)
    desc = str(error.desc()).strip()
    return f"{where}: {desc}" if where else desc


def _parse_network(trt, builder, logger, errors: list[str], prepared: PreparedOnnx, settings: dict, source: str):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings["strongly_typed"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(prepared.serialized):
        parsed = [describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        errors = parsed or list(errors) or ["no error reported"]
        more = f" (and {len(errors) - 2} more)" if len(errors) > 2 else ""
        raise ExportError(f"tensorrt could not parse {source}: {'; '.join(errors[:2])}{more}")
    return network, parser  # the parser owns the weights until the build is over: keep it alive


def _configure(trt, builder, settings: dict, cache_bytes: bytes):
    config = builder.create_builder_config()
    config.builder_optimization_level = settings["builder_optimization_level"]
    config.profiling_verbosity = getattr(trt.ProfilingVerbosity, settings["profiling_verbosity"])
    if settings["workspace_bytes"] is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace_bytes"])
    for flag in settings["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in settings["cleared_flags"]:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    cache = None
    if cache_bytes:
        try:
            cache = config.create_timing_cache(cache_bytes)
        except Exception:  # noqa: BLE001 - TensorRT raises its own types on corrupt bytes; a cold cache is fine
            cache = None
    if cache is None:  # none yet, or unreadable (e.g. truncated): start an empty one, overwritten after the build
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    return config


def _save_merged_cache(config, cache_path: Path, loaded: bytes) -> str | None:
    """Save the build's timing cache merged with the file's current content; a warning instead of a failure."""
    cache = config.get_timing_cache()
    on_disk = load_timing_cache(cache_path)
    if on_disk and on_disk != loaded:
        # another build saved since we loaded: keep its timings too (conflicting entries keep ours)
        other = config.create_timing_cache(on_disk)
        if other is not None:
            cache.combine(other, False)
    try:
        save_timing_cache(cache_path, bytes(cache.serialize()))
    except OSError as e:
        return f"timing cache not saved to {cache_path}: {e}"
    return None


def build_plan(trt, prepared: PreparedOnnx, settings: dict, cache_path: Path, source: str) -> tuple[bytes, list[str]]:
    """Serialized engine for `prepared` with `settings`, using and updating the timing cache at `cache_path`."""
    logger = _process_logger(trt)
    with collected_errors() as errors:
        builder = trt.Builder(logger)
        network, parser = _parse_network(trt, builder, logger, errors, prepared, settings, source)
        loaded = load_timing_cache(cache_path)
        config = _configure(trt, builder, settings, loaded)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            detail = "; ".join(errors[-2:]) or "no error reported"
            raise ExportError(f"tensorrt failed to build an engine from {source}: {detail}")
    notes = [note for note in [_save_merged_cache(config, cache_path, loaded)] if note]
    return bytes(plan), notes


def _device_cache_path(trt, cache_dir: Path | None) -> Path:
    import torch

    return timing_cache_path(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), trt.__version__,
                             torch.version.cuda, cache_dir)


def _torch_dtype(trt_dtype):
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}
    name = getattr(trt_dtype, "name", str(trt_dtype).split(".")[-1])
    if name not in table:
        raise ExportError(f"tensorrt: engine I/O of type {name} is not supported here (float, half, int, bool)")
    return table[name]


class _Bindings:
    """One execution context with device buffers for all of its I/O tensors, bound once."""

    def __init__(self, trt, engine):
        import torch

        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailable("tensorrt: could not create an execution context (out of GPU memory?)")
        self.buffers, self.inputs, self.outputs = {}, [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(engine.get_tensor_shape(name))
            buffer = torch.empty(shape, dtype=_torch_dtype(engine.get_tensor_dtype(name)), device="cuda")
            self.buffers[name] = buffer
            self.context.set_tensor_address(name, buffer.data_ptr())
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)
        self.stream = torch.cuda.Stream()

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ExportError("tensorrt: execute_async_v3 failed")


def _capture_cuda_graph(bindings: _Bindings):
    """(graph, None): a CUDA graph of one enqueue on the bindings' stream; (None, why) where capture failed."""
    import torch

    bindings.enqueue()  # TensorRT may set up lazily on the first enqueue; that must not be captured
    bindings.stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=bindings.stream):
            bindings.enqueue()
    except Exception as e:  # noqa: BLE001 - eager timing then, and the report says so and why
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {e}"
    return graph, None


class TensorRTEngine:
    """A deserialized plan with device buffers; takes and returns float32 host arrays."""

    def __init__(self, trt, engine, *, precision: str, plan_path: Path, layers: list[LayerInfo], layer_summary: dict,
                 settings: dict, timing_cache: Path, notes: list[str], cuda_graph: bool,
                 keepalive=()):
        self.name = NAME
        self.threads = None
        self.precision = precision
        self.plan_path = plan_path
        self.layers = layers
        self.layer_summary = layer_summary
        self.settings = settings
        self.timing_cache = timing_cache
        self.notes = notes
        # TF32 convolutions in an fp32 plan only where the builder was allowed them (the parity rule reads this)
        self.tf32 = precision == "fp32" and "TF32" not in settings["cleared_flags"]
        self.cuda_graph = cuda_graph  # requested; graph_used / graph_error say what the last prepare() got
        self.graph_used: bool | None = None
        self.graph_error: str | None = None
        self._trt, self._engine = trt, engine
        self._keepalive = keepalive  # the runtime must outlive the engine it deserialized
        self._bindings = _Bindings(trt, engine)
        if len(self._bindings.inputs) != 1:
            raise ExportError(f"tensorrt: the engine has {len(self._bindings.inputs)} inputs; one image input expected")
        self.input_name = self._bindings.inputs[0]
        self.output_name = self._bindings.outputs[0]
        self.input_shape = tuple(self._bindings.buffers[self.input_name].shape)
        self.static_batch = self.input_shape[0]

    def _checked(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != self.input_shape:
            raise InputError(f"tensorrt: input shape {x.shape} does not match the engine's {self.input_shape} "
                             "(engines are built for one static batch: target.batch)")
        return x

    def _load(self, bindings: _Bindings, x: np.ndarray) -> None:
        import torch

        with torch.cuda.stream(bindings.stream):
            bindings.buffers[self.input_name].copy_(torch.from_numpy(x))

    def run(self, x: np.ndarray) -> np.ndarray:
        x = self._checked(x)
        bindings = self._bindings
        self._load(bindings, x)
        bindings.enqueue()
        bindings.stream.synchronize()
        return bindings.buffers[self.output_name].float().cpu().numpy()

    def prepare(self, x: np.ndarray) -> Callable[[], float]:
        import torch

        bindings = _Bindings(self._trt, self._engine)  # private: run() between timed calls cannot disturb it
        self._load(bindings, self._checked(x))
        graph, self.graph_error = _capture_cuda_graph(bindings) if self.cuda_graph else (None, None)
        self.graph_used = graph is not None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = bindings.stream

        def run_once() -> float:
            start.record(stream)
            if graph is not None:
                with torch.cuda.stream(stream):
                    graph.replay()
            else:
                bindings.enqueue()
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end)

        run_once.bindings, run_once.graph = bindings, graph  # keep buffers and graph alive with the runner
        run_once.cuda_graph = graph is not None
        return run_once


def _layer_summary(trt, engine, prepared: PreparedOnnx, settings: dict) -> tuple[list[LayerInfo], dict, str]:
    inspector = engine.create_engine_inspector()
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    layers = parse_layer_info(text)
    expectation = set(prepared.int8_nodes) if settings["requires_qdq"] else None
    return layers, summarize_layers(layers, expectation), text


# ---------------------------------------------------------------------------------------------------------------
# the backend


class TensorRTBackend:
    """`tensorrt`: strongly typed TensorRT plans (fp32, fp16 graph, int8 Q/DQ) timed with CUDA events."""

    name = NAME

    def __init__(self, *, opt_level: int = DEFAULT_OPT_LEVEL, workspace_mb: int | None = None,
                 timing_cache_dir: Path | None = None, cuda_graph: bool = True, allow_tf32: bool = False):
        self.opt_level = opt_level
        self.workspace_mb = workspace_mb
        self.timing_cache_dir = timing_cache_dir
        self.cuda_graph = cuda_graph
        self.allow_tf32 = allow_tf32

    def _unavailable(self) -> tuple[str | None, str | None]:
        """(reason or None, tensorrt version or None); CUDA is only asked about once tensorrt imports."""
        try:
            trt = _import_tensorrt()
        except BackendUnavailable as e:
            return str(e), None
        return _cuda_unavailable_reason(), getattr(trt, "__version__", None)

    def info(self) -> BackendInfo:
        reason, version = self._unavailable()
        gpus = gpu_models()
        device = gpus[0] if gpus else "cuda"
        if reason is not None:
            return BackendInfo(self.name, False, version, reason, device)
        return BackendInfo(self.name, True, version, f"TensorRT {version}: strongly typed plans (fp32, fp16, int8 "
                                                     "Q/DQ), CUDA-event timing", device)

    def build(self, onnx_path: Path, *, precision: str, threads: int | None, out_dir: Path,
              torch_model=None) -> TensorRTEngine:
        """Build `<onnx stem>.<precision>.plan` (and its `.layers.json`) in `out_dir`; threads and torch_model unused.

        The plan is named after the ONNX file so the pipeline's two builds (original.onnx, model.onnx) do not
        overwrite each other: model.onnx gives model.<precision>.plan.
        """
        check_threads(threads)
        check_precision(self.name, precision, ("fp32", "fp16", "int8"), {})
        settings = builder_settings(precision, self.opt_level, self.workspace_mb, allow_tf32=self.allow_tf32)
        reason, _ = self._unavailable()
        if reason is not None:
            raise BackendUnavailable(f"{self.name}: {reason}")
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise InputError(f"{self.name}: ONNX file {onnx_path} does not exist")
        prepared = prepare_onnx(_onnx().load(str(onnx_path)), settings)
        trt = _import_tensorrt()
        cache_path = _device_cache_path(trt, self.timing_cache_dir)
        plan, notes = build_plan(trt, prepared, settings, cache_path, onnx_path.name)
        out_dir = Path(out_dir)
        plan_path = out_dir / f"{onnx_path.stem}.{precision}.plan"
        with atomic_path(plan_path) as temp:
            temp.write_bytes(plan)
        with collected_errors() as errors:
            runtime = trt.Runtime(_process_logger(trt))
            engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            detail = "; ".join(errors[-2:]) or "no error reported"
            raise ExportError(f"tensorrt: could not deserialize the plan just built from {onnx_path.name}: {detail}")
        layers, summary, layer_json = _layer_summary(trt, engine, prepared, settings)
        write_text_atomic(out_dir / f"{onnx_path.stem}.{precision}.layers.json", layer_json)
        return TensorRTEngine(trt, engine, precision=precision, plan_path=plan_path, layers=layers,
                              layer_summary=summary, settings=settings, timing_cache=cache_path, notes=notes,
                              cuda_graph=self.cuda_graph, keepalive=(runtime,))
