"""Build a serialized TensorRT plan from a finished ONNX graph: builder settings, graph checks, parse, configure.

Precision is decided by the graph, never by builder flags. Every network is created STRONGLY_TYPED: each tensor's
type follows from the graph's inputs, constants and casts, and TensorRT may not change it. The docs (TensorRT 10
"explicit quantization"; 10.12 deprecates weak typing; the 11.x migration guide removes BuilderFlag.FP16/INT8) say
precision flags must not be set on such a network, so the graph must already be what the precision means:
- fp32: the exported graph. TF32 is switched off (BuilderFlag.TF32 cleared) unless asked for: TF32 convolutions
  keep 10 mantissa bits, which would be an "fp32" engine that is not fp32 and misses the parity bound.
- int8: an explicit-quantization (Q/DQ) graph, placed by the export passes for the "tensorrt" style (which
  validate it: export/passes/validate_qdq.py). Layers outside the Q/DQ islands run fp32.
- fp16: a graph computing in fp16 with Casts at its float inputs and outputs (export/passes/fp16.py), so the engine
  takes and returns fp32 and compares with the other backends. The FP16 flag on a weakly typed network only
  *allows* fp16 (TensorRT keeps a layer in fp32 when that times faster) and is gone in TensorRT 11.
A graph whose weights disagree with the requested precision is refused with the pass that prepares it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dfp_deploy.backends.tensorrt.cache import (cached_plan, engine_cache_key, load_timing_cache,
                                                save_merged_timing_cache, store_plan)
from dfp_deploy.backends.tensorrt.library import collected_errors, process_logger
from dfp_deploy.core.errors import ExportError, InputError

OPT_LEVELS = range(0, 6)  # IBuilderConfig.builder_optimization_level: 0 fastest build .. 5 widest tactic search
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
INT8_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOAT, _FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16 (constants of the ONNX format)


def builder_settings(precision: str, opt_level: int = DEFAULT_OPT_LEVEL, workspace_mb: int | None = None, *,
                     allow_tf32: bool = False) -> dict:
    """The builder configuration for one precision (see the module docstring for why each is strongly typed).

    Keys: strongly_typed, builder_flags / cleared_flags (trt.BuilderFlag names to set / clear), network_dtype
    (the float type the ONNX graph computes in), requires_qdq, builder_optimization_level, workspace_bytes
    (None: TensorRT's default, the device memory), profiling_verbosity.
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
# the ONNX graph TensorRT gets


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
                              "for one static shape: export with advanced.export.dynamic_batch: false")
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


def weight_types(model) -> set[int]:
    """ONNX data types of the constant float inputs (weights, biases) of the graph's Conv/Gemm/MatMul nodes."""
    constants = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and node.output:
                    constants[node.output[0]] = attr.t.data_type
    return {constants[name] for node in model.graph.node if node.op_type in INT8_COMPUTE_OPS
            for name in node.input if constants.get(name) in (_FLOAT, _FLOAT16)}


def check_graph_precision(model, precision: str) -> None:
    """ExportError unless the graph computes in `precision` (Q/DQ for int8, fp16 weights for fp16, fp32 else)."""
    has_qdq = any(node.op_type in QDQ_OPS for node in model.graph.node)
    if precision == "int8" and not has_qdq:
        raise ExportError("tensorrt int8 needs an explicitly quantized ONNX (QuantizeLinear/DequantizeLinear "
                          "nodes) and this one has none; prepare it with "
                          "dfp_deploy.export.passes.prepare_int8_onnx(..., style='tensorrt')")
    if precision != "int8" and has_qdq:
        raise ExportError(f"tensorrt {precision}: the ONNX contains Q/DQ nodes, which a strongly typed build runs "
                          "in int8; build it with target.precision: int8 (or export without quantization)")
    types = weight_types(model)
    if precision == "fp16" and _FLOAT in types:
        raise ExportError("tensorrt fp16: the ONNX has float32 weights, which a strongly typed build runs in fp32; "
                          "convert it with dfp_deploy.export.passes.fp16.write_fp16_onnx (`dfp-deploy build` does "
                          "it for target.precision: fp16)")
    if precision != "fp16" and _FLOAT16 in types:
        raise ExportError(f"tensorrt {precision}: the ONNX has float16 weights, which a strongly typed build runs "
                          "in fp16; build it with target.precision: fp16")


@dataclass(frozen=True)
class PreparedOnnx:
    """What the parser reads: the serialized graph, its static input shapes and the nodes that must run int8."""

    serialized: bytes
    input_shapes: dict
    int8_nodes: frozenset


def prepare_onnx(model, settings: dict) -> PreparedOnnx:
    """Check `model` for a TensorRT build with `settings` (static shapes, precision of the graph) and serialize it."""
    shapes = static_input_shapes(model)
    check_graph_precision(model, settings["precision"])
    expected = frozenset(int8_expected_nodes(model)) if settings["requires_qdq"] else frozenset()
    return PreparedOnnx(model.SerializeToString(), shapes, expected)


# ---------------------------------------------------------------------------------------------------------------
# parse, configure, build


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


def build_plan(trt, prepared: PreparedOnnx, settings: dict, cache_path: Path, source: str) -> tuple[bytes, list[str]]:
    """Serialized engine for `prepared` with `settings`, using and updating the timing cache at `cache_path`."""
    logger = process_logger(trt)
    with collected_errors() as errors:
        builder = trt.Builder(logger)
        network, parser = _parse_network(trt, builder, logger, errors, prepared, settings, source)
        loaded = load_timing_cache(cache_path)
        config = _configure(trt, builder, settings, loaded)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            detail = "; ".join(errors[-2:]) or "no error reported"
            raise ExportError(f"tensorrt failed to build an engine from {source}: {detail}")
    notes = [note for note in [save_merged_timing_cache(config, cache_path, loaded)] if note]
    return bytes(plan), notes


def cached_build(trt, prepared: PreparedOnnx, settings: dict, cache_path: Path, engine_dir: Path | None,
                 source: str) -> tuple[bytes, list[str], str | None]:
    """(plan, notes, engine cache key or None): the stored plan for this graph, settings and target when
    `engine_dir` holds one, else build_plan's, stored there. The key is None where nothing was reused."""
    if engine_dir is None:
        plan, notes = build_plan(trt, prepared, settings, cache_path, source)
        return plan, notes, None
    key = engine_cache_key(prepared.serialized, settings, cache_path)
    plan = cached_plan(engine_dir, key)
    if plan is not None:
        return plan, [], key
    plan, notes = build_plan(trt, prepared, settings, cache_path, source)
    notes += [note for note in [store_plan(engine_dir, key, plan)] if note]
    return plan, notes, None
