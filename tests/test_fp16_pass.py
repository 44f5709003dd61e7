"""The fp16 export pass: fp16 inside, float32 at the boundary, the same function up to fp16 rounding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfp_deploy.core.errors import ExportError
from dfp_deploy.export.passes.fp16 import FP16_MAX, pass_fp16, write_fp16_onnx
from tests.test_tensorrt import _ort_run, tiny_fp32_model


def test_fp16_graph_is_valid_fp16_inside_fp32_at_the_boundary():
    model = tiny_fp32_model()
    before = model.SerializeToString()
    half, changed = pass_fp16(model)
    assert changed and model.SerializeToString() == before  # the input model is not modified
    onnx.checker.check_model(half, full_check=True)  # full type inference: no fp32/fp16 mix anywhere
    assert {t.data_type for t in half.graph.initializer} == {TensorProto.FLOAT16}
    assert [(v.name, v.type.tensor_type.elem_type) for v in half.graph.input] == [("input", TensorProto.FLOAT)]
    assert [(v.name, v.type.tensor_type.elem_type) for v in half.graph.output] == [("logits", TensorProto.FLOAT)]
    assert [n.op_type for n in half.graph.node][0] == "Cast" and half.graph.node[-1].op_type == "Cast"
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    ref, out = _ort_run(model, x), _ort_run(half, x)
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() <= 2e-3 * max(1.0, np.abs(ref).max())  # fp16 rounding, not a different function
    assert np.abs(out - ref).max() > 0  # it really computed in fp16


def test_fp16_pass_is_idempotent():
    half, _ = pass_fp16(tiny_fp32_model())
    again, changed = pass_fp16(half)
    assert not changed and again.SerializeToString() == half.SerializeToString()


def test_fp16_clamps_weights_beyond_the_fp16_range():
    model = tiny_fp32_model()
    big = numpy_helper.to_array(model.graph.initializer[0]).copy()
    big[0, 0, 0, 0] = 1e6
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(big, model.graph.initializer[0].name))
    values = numpy_helper.to_array(pass_fp16(model)[0].graph.initializer[0])
    assert np.isfinite(values).all() and values[0, 0, 0, 0] == np.float16(FP16_MAX)


def test_fp16_keeps_the_float32_only_inputs_of_resize():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    graph = helper.make_graph([helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")],
                              "resize", [x], [y], initializer=[scales])
    half, _ = pass_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.checker.check_model(half, full_check=True)
    assert half.graph.initializer[0].data_type == TensorProto.FLOAT


def test_fp16_refuses_subgraphs_and_missing_files(tmp_path):
    branch = helper.make_graph([], "b", [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])
    node = helper.make_node("If", ["c"], ["o"], then_branch=branch, else_branch=branch, name="branch")
    model = helper.make_model(helper.make_graph([node], "g", [cond], [out]))
    with pytest.raises(ExportError, match="subgraph.*fp32"):
        pass_fp16(model)
    with pytest.raises(Exception, match="does not exist"):
        write_fp16_onnx(tmp_path / "missing.onnx", tmp_path / "out.onnx")


def test_write_fp16_onnx_writes_the_pass_result(tmp_path):
    src = tmp_path / "model.onnx"
    tiny_fp32_model(src)
    out = write_fp16_onnx(src, tmp_path / "model.fp16.onnx")
    assert onnx.load(str(out)).graph.initializer[0].data_type == TensorProto.FLOAT16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fp16.onnx", "model.onnx"]


def test_fp16_latency_probes_are_built_from_the_fp16_graph(tmp_path):
    from dfp_deploy.backends.tensorrt import check_graph_precision
    from dfp_deploy.export.probe import write_conv_probe

    probe = onnx.load(str(write_conv_probe(tmp_path / "p.onnx", 8, batch=1, size=6, precision="fp16")))
    check_graph_precision(probe, "fp16")  # what the tensorrt backend accepts for an fp16 build
    with pytest.raises(ExportError, match="float16 weights"):
        check_graph_precision(probe, "fp32")
