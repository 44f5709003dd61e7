"""TensorRT backend: builder settings, timing-cache keys, layer-information parsing, ONNX preparation, availability.

Everything here runs on a CPU without TensorRT except the tests marked `tensorrt` + `gpu`, which skip with a reason.
tests/data/trt_layer_info_sample.json is HAND-WRITTEN in the layout of TensorRT's DETAILED IEngineInspector JSON
(tests/data/README.md says where each format fact comes from), not captured from an engine: a 7-conv/gemm int8 net
whose /block2/down/Conv runs FP32 on purpose. `build_plan` is exercised against a small fake of the tensorrt API,
which checks our orchestration (parser errors, logger, config, timing cache merge), not TensorRT itself; the fake's
names and enum values are held to the tensorrt-stubs package (tests/test_trt_stubs.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dfp_deploy.backends.registry import get_backend
from dfp_deploy.backends.tensorrt import (NO_GPU, NOT_INSTALLED, TensorRTBackend, build_plan,
                                          builder_settings, format_precision, int8_expected_nodes,
                                          load_timing_cache, parse_layer_info, prepare_onnx, save_timing_cache,
                                          static_input_shapes, summarize_layers, timing_cache_key,
                                          timing_cache_path)
from dfp_deploy.core.errors import BackendUnavailable, ExportError, InputError
from dfp_deploy.core.types import LayerPrecision
from dfp_deploy.export.passes.fp16 import pass_fp16
from dfp_deploy.export.passes.validate_qdq import pass_validate_qdq, qdq_problems

SAMPLE = Path(__file__).parent / "data" / "trt_layer_info_sample.json"
SAMPLE_INT8_NODES = {"/stem/conv/Conv", "/block1/conv1/Conv", "/block1/conv2/Conv", "/block2/conv1/Conv",
                     "/block2/conv2/Conv", "/block2/down/Conv", "/fc/Gemm"}


# ------------------------------------------------------------------------------------------------ tiny ONNX graphs

def _rng():
    return np.random.default_rng(0)


def _weights():
    rng = _rng()
    return {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "b1": rng.normal(0, 0.1, 8).astype(np.float32),
            "w2": rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "b2": rng.normal(0, 0.1, 8).astype(np.float32),
            "wf": rng.normal(0, 0.3, (10, 8)).astype(np.float32), "bf": rng.normal(0, 0.1, 10).astype(np.float32)}


def _save(nodes, inits, path, batch=2, extra_nodes=()):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])
    graph = helper.make_graph([*nodes, *extra_nodes], "tiny", [x], [y],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, str(path))
    return model


def tiny_fp32_model(path=None, batch=2):
    """conv-relu-conv-add(residual)-relu-gap-flatten-gemm, plus a Constant scale and a Cast to exercise fp16."""
    w = _weights()
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Constant", [], ["half"], name="half_const",
                         value=numpy_helper.from_array(np.array(0.5, np.float32))),
        helper.make_node("Mul", ["f", "half"], ["fs"], name="scale"),
        helper.make_node("Cast", ["fs"], ["fc_in"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["fc_in", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    return _save(nodes, w, path, batch)


def _qdq(tensor, scale_name, out):
    return [helper.make_node("QuantizeLinear", [tensor, scale_name, "zp"], [f"{out}_q"], name=f"{out}_Q"),
            helper.make_node("DequantizeLinear", [f"{out}_q", scale_name, "zp"], [out], name=f"{out}_DQ")]


def _weight_dq(name, w, inits):
    scale = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) / 127.0
    q = np.clip(np.round(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
    inits[f"{name}_int8"], inits[f"{name}_scale"] = q, scale.astype(np.float32)
    inits[f"{name}_zp"] = np.zeros(w.shape[0], np.int8)
    return helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zp"], [f"{name}_dq"],
                            name=f"{name}_DQ", axis=0)


def tiny_qdq_model(path=None, batch=2, activation_zero_point=0):
    """The net above (without the fp16 extras) in TensorRT's explicit-quantization form."""
    w = _weights()
    inits = {"b1": w["b1"], "b2": w["b2"], "bf": w["bf"], "s_in": np.array(4 / 127, np.float32),
             "s_r1": np.array(0.03, np.float32), "s_f": np.array(0.02, np.float32),
             "zp": np.array(activation_zero_point, np.int8)}
    nodes = [*_qdq("input", "s_in", "input_dq"), _weight_dq("w1", w["w1"], inits),
             helper.make_node("Conv", ["input_dq", "w1_dq", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             *_qdq("r1", "s_r1", "r1_dq"), _weight_dq("w2", w["w2"], inits),
             helper.make_node("Conv", ["r1_dq", "w2_dq", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1_dq"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             *_qdq("f", "s_f", "f_dq"), _weight_dq("wf", w["wf"], inits),
             helper.make_node("Gemm", ["f_dq", "wf_dq", "bf"], ["logits"], name="fc", transB=1)]
    return _save(nodes, inits, path, batch)


def _ort_run(model, x):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


# ------------------------------------------------------------------------------------------------ builder settings

def test_builder_settings_are_strongly_typed_without_precision_flags():
    for precision in ("fp32", "fp16", "int8"):
        s = builder_settings(precision)
        assert s["strongly_typed"] is True and s["builder_flags"] == ()  # TRT 10: no FP16/INT8 flag when strong
        assert s["builder_optimization_level"] == 3 and s["workspace_bytes"] is None
        assert s["profiling_verbosity"] == "DETAILED"
    assert builder_settings("fp32")["network_dtype"] == "fp32" and not builder_settings("fp32")["requires_qdq"]
    assert builder_settings("fp16")["network_dtype"] == "fp16" and not builder_settings("fp16")["requires_qdq"]
    assert builder_settings("int8")["network_dtype"] == "fp32" and builder_settings("int8")["requires_qdq"]


def test_builder_settings_map_opt_level_workspace_and_tf32():
    s = builder_settings("fp32", opt_level=5, workspace_mb=256)
    assert s["builder_optimization_level"] == 5 and s["workspace_bytes"] == 256 * 1024 * 1024
    assert s["cleared_flags"] == ("TF32",)  # an fp32 engine must not silently run TF32 convolutions
    assert builder_settings("fp32", allow_tf32=True)["cleared_flags"] == ()
    assert builder_settings("int8")["cleared_flags"] == ("TF32",)
    assert builder_settings("fp16")["cleared_flags"] == ()


@pytest.mark.parametrize("kwargs, match", [
    (dict(precision="fp64"), "target.precision"),
    (dict(precision="fp32", opt_level=6), "optimization level"),
    (dict(precision="fp32", opt_level=-1), "optimization level"),
    (dict(precision="fp32", opt_level=True), "optimization level"),
    (dict(precision="fp32", opt_level=2.0), "optimization level"),
    (dict(precision="fp32", workspace_mb=0), "workspace"),
])
def test_builder_settings_reject_bad_values_with_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        builder_settings(**kwargs)


# ------------------------------------------------------------------------------------------------ timing cache

H100 = ("NVIDIA H100 80GB HBM3", (9, 0), "10.9.0.34", "12.8")


def test_timing_cache_key_is_stable_and_filename_safe():
    key = timing_cache_key(*H100)
    assert key == "nvidia-h100-80gb-hbm3-sm90-trt10.9.0.34-cuda12.8"
    assert key == timing_cache_key(*H100)
    assert re.fullmatch(r"[a-z0-9.-]+", timing_cache_key("GeForce RTX/4090 (x)", (8, 9), "10.0", None))


def test_timing_cache_key_changes_with_every_component():
    base = timing_cache_key(*H100)
    variants = [("NVIDIA A100-SXM4-40GB",) + H100[1:], (H100[0], (8, 0)) + H100[2:],
                H100[:2] + ("10.10.0.31", H100[3]), H100[:3] + ("13.0",)]
    keys = {timing_cache_key(*v) for v in variants}
    assert base not in keys and len(keys) == 4


def test_timing_cache_path_under_cache_dir(tmp_path, monkeypatch):
    assert timing_cache_path(*H100, cache_dir=tmp_path) == tmp_path / f"{timing_cache_key(*H100)}.cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert timing_cache_path(*H100).parent == tmp_path / "xdg" / "dfp-deploy" / "trt-timing"


def test_timing_cache_round_trip_is_atomic(tmp_path):
    path = tmp_path / "nested" / "gpu.cache"
    assert load_timing_cache(path) == b""
    save_timing_cache(path, b"\x00\x01timings")
    save_timing_cache(path, b"newer")
    assert load_timing_cache(path) == b"newer"
    assert sorted(p.name for p in path.parent.iterdir()) == ["gpu.cache"]  # no temp file left behind


# ------------------------------------------------------------------------------------------------ layer information

@pytest.fixture(scope="module")
def sample_layers():
    return parse_layer_info(SAMPLE.read_text())


def test_parse_layer_info_reads_every_documented_field(sample_layers):
    assert len(sample_layers) == 15
    stem = next(layer for layer in sample_layers if layer.name.startswith("/block1/conv1/Conv"))
    assert stem.type == "CaskConvolution" and stem.parameter_type == "Convolution"
    assert stem.precision == "INT8" and stem.weights_type == "INT8" and stem.runs_int8 and stem.is_weighted
    assert stem.input_formats == ("Thirty-two wide channel vectorized row major Int8 format",)
    assert stem.onnx_nodes == ("/block1/conv1/Conv", "/block1/relu1/Relu")
    assert "i8i8" in stem.tactic
    residual = next(layer for layer in sample_layers if layer.name.startswith("/block1/conv2/Conv"))
    assert residual.input_precisions == ("INT8", "INT8") and "/block1/add/Add" in residual.onnx_nodes
    down = next(layer for layer in sample_layers if layer.name == "/block2/down/Conv")
    assert down.precision == "FP32" and not down.runs_int8 and down.weights_type == "FP32"
    first_reformat = sample_layers[1]
    assert first_reformat.is_reformat and first_reformat.onnx_nodes == () and not first_reformat.is_weighted
    quantize = sample_layers[0]  # LayerType Reformat, Origin QDQ: the graph's own QuantizeLinear, not a copy
    assert quantize.type == "Reformat" and quantize.origin == "QDQ" and quantize.is_qdq
    assert not quantize.is_reformat and not quantize.is_weighted
    stem_pool = sample_layers[2]  # conv + relu + maxpool fused into one kernel: still a weighted int8 layer
    assert stem_pool.type == "ConvActPool" and stem_pool.is_weighted and stem_pool.weights_type == "INT8"
    pool = next(layer for layer in sample_layers if layer.type == "CaskPooling")
    assert not pool.is_weighted and not pool.is_reformat


def test_summarize_layers_counts_the_sample_exactly(sample_layers):
    typed = summarize_layers(sample_layers, SAMPLE_INT8_NODES)
    assert typed.not_int8 == (LayerPrecision("/block2/down/Conv", "/block2/down/Conv", "FP32"),)
    assert dict(typed.weighted_by_precision) == {"FP32": 1, "INT8": 6}
    s = typed.as_dict()  # the report.json form
    assert s["layers"] == 15 and s["reformats"] == 4 and s["qdq_layers"] == 2
    assert s["reformat_layers"][0] == ("Reformatting CopyNode for Input Tensor 0 to /stem/conv/Conv + /stem/relu/Relu"
                                       " + /stem/pool/MaxPool")
    assert s["by_precision"] == {"FP32": 5, "INT8": 6}
    assert s["weighted_layers"] == 7 and s["weighted_by_precision"] == {"FP32": 1, "INT8": 6}
    assert (s["int8_expected"], s["int8_ok"]) == (7, 6)
    assert s["not_int8"] == [{"onnx_node": "/block2/down/Conv", "layer": "/block2/down/Conv", "precision": "FP32"}]
    assert s["unmatched_int8_nodes"] == []
    assert s["text"] == "6/7 conv/gemm layers run INT8, 4 reformats"


def test_summarize_layers_lists_nodes_no_layer_names(sample_layers):
    s = summarize_layers(sample_layers, SAMPLE_INT8_NODES | {"/head/extra/Conv"})
    assert (s.int8_expected, s.int8_ok) == (8, 6) and s.unmatched_int8_nodes == ("/head/extra/Conv",)


def test_layers_that_miss_int8_become_build_warnings(sample_layers):
    from dfp_deploy.report.assemble import engine_warnings as _engine_warnings

    s = summarize_layers(sample_layers, SAMPLE_INT8_NODES | {"/head/extra/Conv"}).as_dict()
    warnings = _engine_warnings(s)
    assert warnings[0].startswith("1 conv/gemm layer(s) meant to run int8 do not: /block2/down/Conv (FP32)")
    assert warnings[1].startswith("1 Q/DQ-fed node(s) were found in no engine layer")
    assert _engine_warnings(summarize_layers(sample_layers, lambda layer: "down" not in layer.name).as_dict()) == []
    assert _engine_warnings(None) == []


def test_summarize_layers_with_predicate_all_and_none(sample_layers):
    not_down = summarize_layers(sample_layers, lambda layer: "down" not in layer.name)
    assert not_down.text == "6/6 conv/gemm layers run INT8, 4 reformats" and not_down.not_int8 == ()
    every = summarize_layers(sample_layers, True)
    assert (every.int8_expected, every.int8_ok) == (7, 6)
    plain = summarize_layers(sample_layers)
    assert plain.text == "7 conv/gemm layers (6 INT8, 1 FP32), 4 reformats" and plain.int8_ok is None
    assert "int8_ok" not in plain.as_dict()  # the report carries int8 counts only where int8 was expected


@pytest.mark.parametrize("text, expected", [
    ("Row major linear FP32", "FP32"), ("Float", "FP32"), ("Half", "FP16"), ("Int8", "INT8"),
    ("Channel major FP16 format where channel % 8 == 0", "FP16"), ("Row major linear UInt8 format", "UINT8"),
    ("Thirty-two wide channel vectorized row major Int8 format.", "INT8"), ("Row major linear BF16 format", "BF16"),
    ("N/A due to dynamic shapes", "UNKNOWN"), ("", "UNKNOWN"),
])
def test_format_precision(text, expected):
    assert format_precision(text) == expected


def test_parse_short_formats_fused_myelin_and_names_only():
    short = parse_layer_info('{"Layers": [{"Name": "fused", "LayerType": "kgen", "Metadata": '
                             '"[ONNX Layer: /a/MatMul]\\u001e[ONNX Layer: /a/Relu]", "TacticName": '
                             '"sm90_xmma_gemm_i8i8_i8i32_f32_tn", "Inputs": [{"Format/Datatype": "Int8"}], '
                             '"Outputs": [{"Format/Datatype": "Half"}]}]}')
    assert short[0].onnx_nodes == ("/a/MatMul", "/a/Relu") and short[0].is_weighted and short[0].runs_int8
    names = parse_layer_info('{"Layers": ["/c/Conv + /c/Relu", "Reformatting CopyNode for Input Tensor 0 to x"], '
                             '"Bindings": ["in", "out"]}')
    assert names[0].onnx_nodes == ("/c/Conv", "/c/Relu") and names[0].precision == "UNKNOWN"
    assert names[1].is_reformat
    assert summarize_layers(names).reformats == 1


@pytest.mark.parametrize("text", ["not json", '{"Bindings": []}', '{"Layers": [3]}'])
def test_parse_layer_info_rejects_malformed_text(text):
    with pytest.raises(InputError, match="layer"):
        parse_layer_info(text)


# ------------------------------------------------------------------------------------------------ ONNX preparation

def test_int8_expected_nodes_and_placement_check_on_a_valid_qdq_graph():
    model = tiny_qdq_model()
    assert int8_expected_nodes(model) == {"conv1", "conv2", "fc"}
    assert qdq_problems(model, "tensorrt") == []
    prepared = prepare_onnx(model, builder_settings("int8"))
    assert prepared.int8_nodes == {"conv1", "conv2", "fc"} and prepared.input_shapes == {"input": (2, 3, 8, 8)}
    assert onnx.load_from_string(prepared.serialized).graph.node[0].op_type == "QuantizeLinear"


def test_the_export_passes_reject_a_graph_that_breaks_tensorrt_rules():
    # the Q/DQ pass sequence validates its own product for the tensorrt style; the backend reads finished graphs
    with pytest.raises(ExportError, match="tensorrt rules.*zero point"):
        pass_validate_qdq(tiny_qdq_model(activation_zero_point=3), "tensorrt")


def test_precision_and_qdq_presence_must_agree():
    with pytest.raises(ExportError, match="has none.*prepare_int8_onnx"):
        prepare_onnx(tiny_fp32_model(), builder_settings("int8"))
    with pytest.raises(ExportError, match="target.precision: int8"):
        prepare_onnx(tiny_qdq_model(), builder_settings("fp16"))


def test_dynamic_batch_is_rejected_with_the_recipe_key():
    model = tiny_fp32_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(ExportError, match="dynamic_batch: false"):
        static_input_shapes(model)
    assert static_input_shapes(tiny_fp32_model()) == {"input": (2, 3, 8, 8)}


def test_prepare_onnx_checks_that_the_graph_computes_in_the_precision():
    model = tiny_fp32_model()
    half, _ = pass_fp16(model)
    assert prepare_onnx(model, builder_settings("fp32")).serialized == model.SerializeToString()
    assert prepare_onnx(half, builder_settings("fp16")).serialized == half.SerializeToString()  # no rewrite here
    with pytest.raises(ExportError, match="float32 weights.*write_fp16_onnx"):
        prepare_onnx(model, builder_settings("fp16"))
    with pytest.raises(ExportError, match="float16 weights.*target.precision: fp16"):
        prepare_onnx(half, builder_settings("fp32"))


# ------------------------------------------------------------------------------------------------ availability

def test_registry_points_at_the_tensorrt_backend():
    assert isinstance(get_backend("tensorrt"), TensorRTBackend)


def test_info_reports_the_package_reason_without_touching_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ModuleNotFoundError, here or anywhere

    def no_cuda_query():
        raise AssertionError("CUDA must not be queried when tensorrt is missing")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda_query)
    info = TensorRTBackend().info()
    assert not info.available and info.reason == NOT_INSTALLED and info.version is None


def test_info_reports_no_gpu_when_tensorrt_imports(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.9.0.34", Builder=object,
                                                                       __file__="/site-packages/tensorrt/__init__.py"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = TensorRTBackend().info()
    assert not info.available and info.reason.startswith(NO_GPU) and info.version == "10.9.0.34"


def test_type_stubs_alone_do_not_count_as_tensorrt(monkeypatch):
    # what `import tensorrt` gives when only tensorrt-stubs is installed: a namespace package with no bindings
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    info = TensorRTBackend().info()
    assert not info.available and info.reason.startswith(NOT_INSTALLED) and "stubs" in info.reason


def test_build_raises_backend_unavailable_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    path = tmp_path / "m.onnx"
    tiny_fp32_model(path)
    backend = get_backend("tensorrt")
    with pytest.raises(BackendUnavailable, match=re.escape(f"tensorrt: {NOT_INSTALLED}")):
        backend.build(path, precision="fp32", threads=None, out_dir=tmp_path)
    with pytest.raises(InputError, match="target.precision"):
        backend.build(path, precision="fp64", threads=None, out_dir=tmp_path)
    with pytest.raises(InputError, match="optimization level"):
        TensorRTBackend(opt_level=9).build(path, precision="fp32", threads=None, out_dir=tmp_path)
    assert not list(tmp_path.glob("*.plan"))


def test_importing_the_backend_module_stays_light():
    code = ("import sys, dfp_deploy.backends.tensorrt; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'tensorrt', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------ build_plan (fake)

class _FakeCache:
    def __init__(self, data: bytes):
        self.entries = set(data.decode().split(",")[1:]) if data else set()

    def serialize(self):
        return ("cache," + ",".join(sorted(self.entries))).encode()

    def combine(self, other, ignore_mismatch):
        self.entries |= other.entries
        return True


class _FakeConfig:
    def __init__(self):
        self.flags_set, self.flags_cleared, self.pools, self.cache_inputs = [], [], {}, []
        self.builder_optimization_level = 3
        self.profiling_verbosity = None
        self.cache = None

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def set_flag(self, flag):
        self.flags_set.append(flag)

    def clear_flag(self, flag):
        self.flags_cleared.append(flag)

    def create_timing_cache(self, data):
        self.cache_inputs.append(bytes(data))
        return _FakeCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache

    def get_timing_cache(self):
        return self.cache


class _ParserError:
    def __init__(self, node, name, op, desc):
        self._v = (node, name, op, desc)

    def node(self):
        return self._v[0]

    def node_name(self):
        return self._v[1]

    def node_operator(self):
        return self._v[2]

    def desc(self):
        return self._v[3]


def fake_tensorrt(parse_errors=(), on_build=None, build_error=None):
    """The tensorrt names build_plan uses; a "build" records one cache entry per serialized model.

    Like TensorRT, the fake keeps the first logger it is given for the whole process (trt.first_logger) and sends
    every later message there, whatever logger a later Builder or parser was constructed with. `build_error`: a
    message the build logs at ERROR before failing (build_serialized_network returns None).
    """
    trt = types.SimpleNamespace(__version__="10.9.0.34", first_logger=None, build_error=build_error)

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self):
            pass

    def _register(logger):
        if trt.first_logger is None:
            trt.first_logger = logger

    class Builder:
        def __init__(self, logger):
            _register(logger)
            self.config = _FakeConfig()

        def create_network(self, flags):
            return types.SimpleNamespace(flags=flags, model=None)

        def create_builder_config(self):
            return self.config

        def build_serialized_network(self, network, config):
            if on_build:
                on_build()
            if trt.build_error is not None:
                trt.first_logger.log(ILogger.Severity.ERROR, trt.build_error)
                return None
            config.cache.entries.add(f"timing-{len(network.model)}")
            trt.last = types.SimpleNamespace(network=network, config=config)
            return b"PLAN" + network.model[:4]

    class OnnxParser:
        def __init__(self, network, logger):
            _register(logger)
            self.network, self.errors = network, list(parse_errors)

        def parse(self, data):
            self.network.model = bytes(data)
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return _ParserError(*self.errors[i])

    trt.ILogger, trt.Builder, trt.OnnxParser = ILogger, Builder, OnnxParser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", FP16="FP16", INT8="INT8")
    return trt


def test_build_plan_configures_builds_and_saves_the_timing_cache(tmp_path):
    trt, cache = fake_tensorrt(), tmp_path / "tc" / "gpu.cache"
    prepared = prepare_onnx(tiny_fp32_model(), builder_settings("fp32", opt_level=4, workspace_mb=64))
    plan, notes = build_plan(trt, prepared, builder_settings("fp32", opt_level=4, workspace_mb=64), cache, "m.onnx")
    assert plan.startswith(b"PLAN") and notes == []
    assert trt.last.network.flags == 1 << 1  # 1 << STRONGLY_TYPED (1; 0 is the ignored EXPLICIT_BATCH)
    config = trt.last.config
    assert config.builder_optimization_level == 4 and config.profiling_verbosity == "DETAILED"
    assert config.pools == {"WORKSPACE": 64 << 20} and config.flags_set == [] and config.flags_cleared == ["TF32"]
    first = load_timing_cache(cache)
    assert first.startswith(b"cache,timing-")
    # a second build starts from the saved cache and adds to it
    trt2 = fake_tensorrt()
    build_plan(trt2, prepare_onnx(tiny_qdq_model(), builder_settings("int8")), builder_settings("int8"), cache, "q")
    assert trt2.last.config.cache_inputs[0] == first
    assert len(load_timing_cache(cache).split(b",")) == 3


def test_build_plan_merges_timings_saved_by_another_build_meanwhile(tmp_path):
    cache = tmp_path / "gpu.cache"
    save_timing_cache(cache, b"cache,old")
    trt = fake_tensorrt(on_build=lambda: save_timing_cache(cache, b"cache,old,other-process"))
    build_plan(trt, prepare_onnx(tiny_fp32_model(), builder_settings("fp32")), builder_settings("fp32"), cache, "m")
    assert set(load_timing_cache(cache).decode().split(",")[1:]) >= {"old", "other-process"}
    assert len(load_timing_cache(cache).decode().split(",")) == 4  # + this build's own entry


def test_build_plan_starts_a_cold_cache_when_the_saved_one_is_rejected(tmp_path):
    cache = tmp_path / "gpu.cache"
    save_timing_cache(cache, b"garbage")
    trt = fake_tensorrt()
    builder_create = _FakeConfig.create_timing_cache

    def picky(self, data):  # TensorRT raises on bytes it cannot read
        if bytes(data) == b"garbage":
            raise RuntimeError("invalid timing cache")
        return builder_create(self, data)

    _FakeConfig.create_timing_cache = picky
    try:
        plan, notes = build_plan(trt, prepare_onnx(tiny_fp32_model(), builder_settings("fp32")),
                                 builder_settings("fp32"), cache, "m.onnx")
    finally:
        _FakeConfig.create_timing_cache = builder_create
    assert plan.startswith(b"PLAN")
    assert load_timing_cache(cache).startswith(b"cache,timing-")  # the cold cache, filled by this build, replaced it


def test_build_plan_collects_parser_errors_into_one_export_error(tmp_path):
    trt = fake_tensorrt(parse_errors=[(3, "/conv1/Conv", "Conv", "weights must be constant"),
                                      (-1, "", "", "second problem"), (7, "x", "Add", "third")])
    with pytest.raises(ExportError, match=r"could not parse m\.onnx: node 3 Conv '/conv1/Conv': weights must be "
                                          r"constant; second problem \(and 1 more\)"):
        build_plan(trt, prepare_onnx(tiny_fp32_model(), builder_settings("fp32")), builder_settings("fp32"),
                   tmp_path / "c.cache", "m.onnx")
    assert not (tmp_path / "c.cache").exists()


def test_every_build_reports_its_own_errors_through_the_one_process_logger(tmp_path, monkeypatch):
    import dfp_deploy.backends.tensorrt.library as backend_module

    monkeypatch.setattr(backend_module, "_PROCESS_LOGGER", None)
    trt = fake_tensorrt(build_error="first: out of memory")
    prepared = prepare_onnx(tiny_fp32_model(), builder_settings("fp32"))
    with pytest.raises(ExportError, match="first: out of memory"):
        build_plan(trt, prepared, builder_settings("fp32"), tmp_path / "c.cache", "a.onnx")
    trt.build_error = "second: unsupported layer"  # logged to the first logger TensorRT was given, as TensorRT does
    with pytest.raises(ExportError, match=r"b\.onnx: second: unsupported layer$"):
        build_plan(trt, prepared, builder_settings("fp32"), tmp_path / "c.cache", "b.onnx")
    assert backend_module._current_errors is None  # nothing collects between builds


def test_the_engine_cache_reuses_a_plan_only_for_the_same_graph_settings_and_target(tmp_path):
    from dfp_deploy.backends.tensorrt.build import cached_build
    from dfp_deploy.backends.tensorrt.cache import store_plan

    engines, fp32 = tmp_path / "engines", builder_settings("fp32")
    prepared = prepare_onnx(tiny_fp32_model(), fp32)
    trt = fake_tensorrt()
    plan, _, reused = cached_build(trt, prepared, fp32, tmp_path / "gpu-a.cache", engines, "m.onnx")
    assert reused is None and len(list(engines.glob("*.plan"))) == 1
    trt.last = None
    again, notes, reused = cached_build(trt, prepared, fp32, tmp_path / "gpu-a.cache", engines, "m.onnx")
    assert again == plan and reused is not None and notes == [] and trt.last is None  # nothing was built
    for settings, cache in ((builder_settings("fp32", opt_level=5), "gpu-a.cache"), (fp32, "gpu-b.cache")):
        assert cached_build(trt, prepared, settings, tmp_path / cache, engines, "m.onnx")[2] is None
    assert len(list(engines.glob("*.plan"))) == 3
    assert cached_build(trt, prepared, fp32, tmp_path / "gpu-a.cache", None, "m.onnx")[2] is None  # cache off
    for i in range(4):
        store_plan(engines, f"{i:064x}", b"PLAN", keep=2)
    assert len(list(engines.glob("*.plan"))) == 2  # only the most recently used are kept


def test_backend_build_reuses_a_stored_plan_and_rebuilds_a_damaged_one(tmp_path, monkeypatch):
    """TensorRTBackend.build's orchestration with the fake library: CUDA, deserialization and the engine stubbed."""
    from dfp_deploy.backends.tensorrt import backend as backend_module
    from dfp_deploy.core.types import LayerSummary

    trt, loaded = fake_tensorrt(), []

    def deserialize(trt_module, plan, source):
        loaded.append(plan)
        if plan == b"DAMAGED":
            raise ExportError(f"tensorrt: could not deserialize the plan just built from {source}: bad magic")
        return "runtime", "engine"

    summary = LayerSummary(0, 0, (), 0, (), 0, (), "0 conv/gemm layers (none), 0 reformats")
    monkeypatch.setattr(backend_module, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(backend_module, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(backend_module, "device_timing_cache_path", lambda trt, folder: tmp_path / "gpu.cache")
    monkeypatch.setattr(backend_module, "deserialize", deserialize)
    monkeypatch.setattr(backend_module, "engine_layers", lambda trt, engine, nodes: ([], summary, "{}"))
    monkeypatch.setattr(backend_module, "TensorRTEngine", lambda *args, **kwargs: kwargs)
    onnx_path, engines = tmp_path / "model.onnx", tmp_path / "engines"
    tiny_fp32_model(onnx_path)
    backend = TensorRTBackend(engine_cache_dir=engines)
    first = backend.build(onnx_path, precision="fp32", threads=None, out_dir=tmp_path)
    assert first["notes"] == [] and first["plan_path"].read_bytes() == loaded[-1]
    assert (tmp_path / "model.fp32.layers.json").read_text() == "{}"
    second = backend.build(onnx_path, precision="fp32", threads=None, out_dir=tmp_path)
    assert loaded[-1] == loaded[0] and "reused from the engine cache" in second["notes"][0]
    (stored,) = engines.glob("*.plan")
    stored.write_bytes(b"DAMAGED")
    third = backend.build(onnx_path, precision="fp32", threads=None, out_dir=tmp_path)
    assert loaded[-2:] == [b"DAMAGED", loaded[0]] and third["notes"] == []  # built anew, stored again
    assert stored.read_bytes() == loaded[0]


# ------------------------------------------------------------------------------------------------ real GPU builds

@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_builds_and_runs_a_tiny_model(precision, tmp_path):
    pytest.importorskip("tensorrt", reason="needs the TensorRT Python package (pip install tensorrt)")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU visible to torch")
    path = tmp_path / "model.onnx"
    model = tiny_qdq_model(path) if precision == "int8" else tiny_fp32_model(path)
    if precision == "fp16":  # the pipeline's export pass: the engine builds from the fp16 graph
        onnx.save(pass_fp16(model)[0], str(path))
    backend = TensorRTBackend(timing_cache_dir=tmp_path / "cache", engine_cache_dir=tmp_path / "engines")
    engine = backend.build(path, precision=precision, threads=None, out_dir=tmp_path)
    assert (tmp_path / f"model.{precision}.plan").stat().st_size > 0
    assert (tmp_path / f"model.{precision}.layers.json").is_file() and engine.timing_cache.is_file()
    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    ref = _ort_run(model, x)  # ORT runs the same graph (Q/DQ included; fp16: the fp32 original) on the CPU
    tolerance = {"fp32": 1e-4, "fp16": 2e-2, "int8": 5e-2}[precision] * max(1.0, np.abs(ref).max())
    assert np.abs(engine.run(x) - ref).max() <= tolerance
    runner = engine.prepare(x)
    times = [runner() for _ in range(20)]
    assert all(t > 0 for t in times)
    summary = engine.inspect().layers
    assert summary.weighted_layers >= 2
    if precision == "int8":
        assert summary.int8_expected == 3 and summary.int8_ok == 3, summary.text
    else:
        assert "INT8" not in dict(summary.weighted_by_precision)
    if precision == "fp16":
        assert "FP16" in dict(summary.weighted_by_precision), summary
    reused = backend.build(path, precision=precision, threads=None, out_dir=tmp_path / "again")
    assert any("engine cache" in note for note in reused.inspect().notes)
    np.testing.assert_array_equal(reused.run(x), engine.run(x))  # the same plan: the same kernels


def test_recipe_target_keys_reach_the_tensorrt_builder_settings():
    from dfp_deploy.backends.registry import get_backend
    from dfp_deploy.recipe import load_recipe
    from dfp_deploy.recipe.resolve import resolve

    def _backend_options(recipe):
        return dict(resolve(recipe).target.options)

    recipe = load_recipe(None, ["target.backend=tensorrt", "advanced.target.opt_level=5",
                                "advanced.target.workspace_mb=512",
                                "advanced.target.cuda_graph=false"])
    backend = get_backend("tensorrt", **_backend_options(recipe))
    assert (backend.opt_level, backend.workspace_mb, backend.cuda_graph) == (5, 512, False)
    assert str(backend.timing_cache_dir).endswith("trt-timing")
    assert str(backend.engine_cache_dir).endswith("trt-engines")  # builds reuse the plans of identical graphs
    assert _backend_options(load_recipe(None)) == {}  # ORT backends take no builder options
    torch_cuda = load_recipe(None, ["target.backend=torch-cuda", "advanced.target.cuda_graph=false"])
    assert get_backend("torch-cuda", **_backend_options(torch_cuda)).cuda_graph is False
    assert get_backend("torch-cuda").cuda_graph is True
