"""The export cache hands back an earlier export only for the same computation and settings, and never a bad file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfp_deploy.export import onnx_export
from dfp_deploy.export.onnx_export import export_onnx


class _Net(nn.Module):
    def __init__(self, stride: int = 1, scale: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.scale = scale  # a plain attribute forward reads: part of the computation

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))) * self.scale
        return self.fc(x.mean(dim=(2, 3)))


def _net(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return _Net(**kwargs).eval()


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = onnx_export._run_exporter

    def run(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "_run_exporter", run)
    return calls


def test_the_same_model_is_exported_once_and_the_copy_is_identical(tmp_path, counted):
    x = torch.randn(2, 3, 8, 8)
    first = export_onnx(_net(), x, tmp_path / "a.onnx", cache=tmp_path / "cache")
    second = export_onnx(_net(), x, tmp_path / "b.onnx", cache=tmp_path / "cache")
    assert len(counted) == 1
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (first.exporter, first.nodes, first.op_counts) == (second.exporter, second.nodes, second.op_counts)


@pytest.mark.parametrize("change", ["weight", "buffer", "plain attribute", "input shape", "batch mode", "opset"])
def test_any_change_to_the_computation_or_settings_exports_again(tmp_path, counted, change):
    x = torch.randn(2, 3, 8, 8)
    export_onnx(_net(), x, tmp_path / "a.onnx", cache=tmp_path / "cache")
    net, kwargs = _net(), {}
    with torch.no_grad():
        if change == "weight":
            net.conv.weight[0, 0, 0, 0] += 1e-6
        elif change == "buffer":
            net.bn.running_var[1] += 1e-6
        elif change == "plain attribute":
            net.scale = 2.0
        elif change == "input shape":
            x = torch.randn(2, 3, 10, 10)
        elif change == "batch mode":
            kwargs["dynamic_batch"] = True
        else:
            kwargs["opset"] = 19
    export_onnx(net, x, tmp_path / "b.onnx", cache=tmp_path / "cache", **kwargs)
    assert len(counted) == 2


def test_a_damaged_entry_is_exported_again_and_a_bad_one_never_passes(tmp_path, counted):
    x = torch.randn(2, 3, 8, 8)
    export_onnx(_net(), x, tmp_path / "a.onnx", cache=tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*.json")
    entry.write_text("{")  # metadata damaged: the entry does not count
    export_onnx(_net(), x, tmp_path / "b.onnx", cache=tmp_path / "cache")
    assert len(counted) == 2
    (onnx_file,) = (tmp_path / "cache").glob("*.onnx")
    onnx_file.write_bytes(b"not an onnx model")  # content damaged: validation refuses it, nothing is written
    with pytest.raises(Exception):
        export_onnx(_net(), x, tmp_path / "c.onnx", cache=tmp_path / "cache")
    assert not (tmp_path / "c.onnx").exists()
