"""The export cache hands back an earlier export only for the same computation and settings, and never a bad file;
a model of the same structure with other weights is derived from the stored template, identical to a fresh export."""

from __future__ import annotations

import shutil

import onnx
import pytest
import torch
from onnx import numpy_helper
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
        self.offset = torch.zeros(4)  # an unregistered tensor: traced in as a constant, by value

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))) * self.scale + self.offset[:, None, None]
        return self.fc(x.mean(dim=(2, 3)))


def _net(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return _Net(**kwargs).eval()


@pytest.fixture(scope="module")
def primed(tmp_path_factory):
    """One export of _net() at [2, 3, 8, 8] through a cache: the tests start from a copy of that cache."""
    folder = tmp_path_factory.mktemp("primed")
    export_onnx(_net(), torch.randn(2, 3, 8, 8), folder / "a.onnx", cache=folder / "cache")
    return folder


@pytest.fixture
def cache(primed, tmp_path):
    """A copy of the primed cache (its content entry and its template) beside a copy of the export, a.onnx."""
    shutil.copytree(primed / "cache", tmp_path / "cache")
    shutil.copyfile(primed / "a.onnx", tmp_path / "a.onnx")
    return tmp_path / "cache"


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
    assert {p.name.startswith("template-") for p in (tmp_path / "cache").glob("*.onnx")} == {True, False}


@pytest.mark.parametrize("change", ["plain attribute", "tensor attribute", "input shape", "batch mode", "opset"])
def test_any_change_to_the_computation_or_settings_exports_again(tmp_path, cache, counted, change):
    x = torch.randn(2, 3, 8, 8)
    net, kwargs = _net(), {}
    with torch.no_grad():
        if change == "plain attribute":
            net.scale = 2.0
        elif change == "tensor attribute":
            net.offset[2] = 1.0
        elif change == "input shape":
            x = torch.randn(2, 3, 10, 10)
        elif change == "batch mode":
            kwargs["dynamic_batch"] = True
        else:
            kwargs["opset"] = 19
    export_onnx(net, x, tmp_path / "b.onnx", cache=cache, **kwargs)
    assert len(counted) == 1
    assert _outputs(tmp_path / "b.onnx", x) == pytest.approx(net(x).detach().numpy().ravel().tolist(), abs=1e-5)


def _outputs(path, x) -> list[float]:
    from dfp_deploy.backends.ort import cpu_session

    session = cpu_session(path)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].ravel().tolist()


def _graph(path) -> tuple:
    """What an export computes: every node's op, attributes and tensor names in order, and every initializer's
    bytes; node names and metadata (counters and provenance notes of the exporter) left out."""
    model = onnx.load(str(path))
    nodes = [(n.op_type, n.domain, tuple(n.input), tuple(n.output), tuple(a.SerializeToString() for a in n.attribute))
             for n in model.graph.node]
    inits = {i.name: (tuple(i.dims), numpy_helper.to_array(i).tobytes()) for i in model.graph.initializer}
    return nodes, inits, [o.name for o in model.graph.output]


@pytest.mark.parametrize(("change", "optimize"), [("weight", True), ("buffer", False)])
def test_other_weights_are_derived_from_the_template_exactly_as_a_fresh_export(tmp_path, cache, counted, change,
                                                                              optimize):
    x = torch.randn(2, 3, 8, 8)
    export_onnx(_net(), x, tmp_path / "a.onnx", cache=cache, optimize=optimize)
    net = _net()
    with torch.no_grad():
        if change == "weight":
            net.conv.weight.mul_(-3.0)
        else:
            net.bn.running_var.mul_(5.0)
            net.bn.running_mean.add_(0.5)
    export_onnx(net, x, tmp_path / "b.onnx", cache=cache, optimize=optimize)
    assert len(counted) == 0  # derived from the primed cache's template: nothing traced
    export_onnx(net, x, tmp_path / "fresh.onnx", optimize=optimize)  # no cache: traced anew
    assert _graph(tmp_path / "b.onnx") == _graph(tmp_path / "fresh.onnx")
    assert _graph(tmp_path / "b.onnx")[1] != _graph(tmp_path / "a.onnx")[1]
    expected = net(x).detach().numpy().ravel().tolist()
    assert _outputs(tmp_path / "b.onnx", x) == pytest.approx(expected, abs=1e-5)


def _entries(cache, template: bool, suffix: str) -> list:
    return [p for p in cache.glob(f"*{suffix}") if p.name.startswith("template-") == template]


def test_a_damaged_entry_is_exported_again_and_a_bad_one_never_passes(tmp_path, cache, counted):
    x = torch.randn(2, 3, 8, 8)
    for entry in _entries(cache, False, ".json") + _entries(cache, True, ".json"):
        entry.write_text("{")  # metadata damaged: the entry does not count
    export_onnx(_net(), x, tmp_path / "b.onnx", cache=cache)
    assert len(counted) == 1
    (onnx_file,) = _entries(cache, False, ".onnx")
    onnx_file.write_bytes(b"not an onnx model")  # content damaged: validation refuses it, nothing is written
    with pytest.raises(Exception):
        export_onnx(_net(), x, tmp_path / "c.onnx", cache=cache)
    assert not (tmp_path / "c.onnx").exists()
    (template,) = _entries(cache, True, ".onnx")
    template.write_bytes(b"not an onnx model")  # a damaged template is a miss: traced again, right weights
    net = _net()
    with torch.no_grad():
        net.fc.weight.mul_(2.0)
    export_onnx(net, x, tmp_path / "d.onnx", cache=cache)
    assert len(counted) == 2
    assert _outputs(tmp_path / "d.onnx", x) == pytest.approx(net(x).detach().numpy().ravel().tolist(), abs=1e-5)


def test_the_torchlib_registry_is_built_once_and_a_reused_one_exports_the_same_graph(tmp_path, monkeypatch):
    from torch.onnx._internal.exporter import _registration

    monkeypatch.setattr(onnx_export, "_TORCHLIB_REGISTRIES", {})
    built = []
    real = _registration.ONNXRegistry.__dict__["from_torchlib"]

    def counting(cls, *args, **kwargs):
        built.append(1)
        return real.__func__(cls, *args, **kwargs)

    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counting))
    x = torch.randn(2, 3, 8, 8)
    export_onnx(_net(), x, tmp_path / "a.onnx")
    export_onnx(_net(scale=2.0), x, tmp_path / "b.onnx")  # after another export, with its registry
    assert len(built) == 1
    onnx_export._TORCHLIB_REGISTRIES.clear()
    export_onnx(_net(scale=2.0), x, tmp_path / "fresh.onnx")  # a registry of its own
    assert len(built) == 2 and _graph(tmp_path / "b.onnx") == _graph(tmp_path / "fresh.onnx")
