"""ONNX export: clean graph, numerical match with torch, batch handling, atomic writes, validation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfp_deploy.core.errors import ExportError, InputError
from dfp_deploy.export import onnx_export
from dfp_deploy.export.onnx_export import export_onnx
from dfp_deploy.export.validate import validate_onnx


class PaddedConv(nn.Conv2d):
    """A Conv2d subclass that pads explicitly inside forward (as some zoo models do)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ChannelPadShortcut(nn.Module):
    """Parameter-free 'option A' shortcut: subsample spatially, zero-pad channels on both sides."""

    def __init__(self, extra: int):
        super().__init__()
        self.extra = extra

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = PaddedConv(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.shortcut = ChannelPadShortcut(8)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.conv2(F.relu6(self.conv1(x))))
        x = F.relu(self.down(x) + self.shortcut(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def tiny_model() -> TinyResNet:
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():  # non-trivial BN statistics, so folding mistakes would show
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    return model.eval()


def ort_session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory):
    model = tiny_model()
    path = tmp_path_factory.mktemp("export") / "tiny.onnx"
    return model, export_onnx(model, torch.randn(1, 3, 16, 16), path, dynamic_batch=True)


@pytest.fixture(scope="module")
def static_export(tmp_path_factory):
    model = tiny_model()
    path = tmp_path_factory.mktemp("export") / "tiny_static.onnx"
    return model, export_onnx(model, torch.randn(1, 3, 16, 16), path)


def test_static_export_is_clean_valid_and_matches_torch(static_export):
    model, result = static_export
    assert result.path.is_file() and result.opset == 18 and result.exporter == "dynamo"
    assert (result.input_name, result.output_name) == ("input", "logits")
    validate_onnx(result.path)
    ops = result.op_counts
    assert ops["Conv"] == 4 and ops["Add"] == 2 and ops["Gemm"] == 1
    # BN folded into the stem conv, no TorchScript-style shape subgraphs around the pads
    assert "BatchNormalization" not in ops and "ConstantOfShape" not in ops and "Constant" not in ops
    assert sum(ops.values()) == result.nodes
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16), dtype=np.float32)
    out = ort_session(result.path).run(None, {"input": x})[0]
    np.testing.assert_allclose(out, torch_logits(model, x), atol=1e-4, rtol=0)


def test_static_export_rejects_another_batch(static_export):
    _, result = static_export
    x5 = np.zeros((5, 3, 16, 16), np.float32)
    with pytest.raises(Exception, match="(?i)invalid dimensions|dimension"):
        ort_session(result.path).run(None, {"input": x5})


def test_dynamic_batch_runs_batch_1_and_5(dynamic_export):
    model, result = dynamic_export
    assert result.dynamic_batch
    dim0 = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch"
    session = ort_session(result.path)
    rng = np.random.default_rng(1)
    for batch in (1, 5):
        x = rng.standard_normal((batch, 3, 16, 16), dtype=np.float32)
        out = session.run(None, {"input": x})[0]
        assert out.shape == (batch, 10)
        np.testing.assert_allclose(out, torch_logits(model, x), atol=1e-4, rtol=0)


def test_export_restores_training_flags(tmp_path):
    model = tiny_model().train()
    export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", opset=17)
    assert model.training and model.bn.training


def test_opset_17_uses_torchscript_and_keeps_opset(tmp_path):
    model = tiny_model()
    result = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "m17.onnx", opset=17)
    assert result.opset == 17 and result.exporter == "torchscript"
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(ort_session(result.path).run(None, {"input": x})[0], torch_logits(model, x),
                               atol=1e-4, rtol=0)


def test_failed_validation_leaves_no_file(tmp_path, monkeypatch):
    def broken(_):
        raise ExportError("simulated validation failure")

    monkeypatch.setattr(onnx_export, "validate_onnx", broken)
    final = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="simulated"):
        export_onnx(tiny_model(), torch.randn(1, 3, 16, 16), final, opset=17)
    assert list(tmp_path.iterdir()) == []


def test_dynamo_failure_falls_back_to_torchscript(tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("torch.export could not capture this model")

    monkeypatch.setattr(onnx_export, "_export_dynamo", fails)
    result = export_onnx(tiny_model(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    assert result.exporter == "torchscript" and result.opset == 18 and result.path.is_file()


def test_export_failure_is_an_export_error_and_leaves_nothing(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("boom in forward")

    with pytest.raises(ExportError, match="Broken.*boom"):
        export_onnx(Broken(), torch.randn(1, 3, 4, 4), tmp_path / "b.onnx", opset=17)
    assert list(tmp_path.iterdir()) == []


def test_a_graph_that_lost_its_input_is_rejected(tmp_path):
    class LeavesTheGraph(nn.Module):
        def forward(self, x):
            return torch.from_numpy(x.numpy() * 2)  # tracing records the result as a constant

    with pytest.raises(ExportError, match="0 inputs"), pytest.warns(torch.jit.TracerWarning):
        export_onnx(LeavesTheGraph(), torch.randn(1, 3, 4, 4), tmp_path / "c.onnx", opset=17)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", [16, 99, "18", True])
def test_bad_opset_is_input_error(tmp_path, opset):
    with pytest.raises(InputError, match="opset"):
        export_onnx(tiny_model(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", opset=opset)


def test_validate_catches_a_node_with_a_missing_input(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("Add", ["x", "nowhere"], ["y"])  # "nowhere" is produced by nothing
    model = helper.make_model(helper.make_graph([node], "broken", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ExportError, match="checker"):
        validate_onnx(model)
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ExportError, match="broken.onnx"):
        validate_onnx(path)


def test_validate_catches_inconsistent_shapes():
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("MatMul", ["a", "b"], ["y"])  # 2x3 @ 4x5 cannot be inferred
    model = helper.make_model(helper.make_graph([node], "mismatch", [a, b], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ExportError):
        validate_onnx(model)


def test_validate_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        validate_onnx(tmp_path / "absent.onnx")
