"""Backend registry and the CPU engines: availability reporting, precision/threads checks, running and binding."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dfp_deploy.backends import registry
from dfp_deploy.backends.registry import get_backend, list_backends
from dfp_deploy.core.errors import BackendUnavailable, InputError
from dfp_deploy.measure.parity import parity

ALL_NAMES = {"ort-cpu", "ort-cuda", "tensorrt", "torch-cpu", "torch-cuda"}


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 10)).eval()


def write_linear_onnx(model: nn.Module, path, batch: int | str) -> None:
    """The same function as `linear_model` written by hand: Flatten -> Gemm(transB=1)."""
    fc = model[1]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 4, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(fc.weight.detach().numpy(), "w"),
             numpy_helper.from_array(fc.bias.detach().numpy(), "b")]
    graph = helper.make_graph(nodes, "linear", [x], [y], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    model = linear_model()
    folder = tmp_path_factory.mktemp("onnx")
    write_linear_onnx(model, folder / "static.onnx", 2)
    write_linear_onnx(model, folder / "dynamic.onnx", "batch")
    return model, folder


def build_ort_cpu(path, **kwargs):
    options = dict(precision="fp32", threads=1, out_dir=path.parent)
    options.update(kwargs)
    return get_backend("ort-cpu").build(path, **options)


def test_list_backends_names_every_backend_with_a_reason():
    infos = list_backends()
    assert {i.name for i in infos} == ALL_NAMES
    for info in infos:
        assert info.reason, info
    by_name = {i.name: i for i in infos}
    assert by_name["ort-cpu"].available and by_name["torch-cpu"].available


def test_list_backends_reports_a_backend_that_fails_to_load(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "ort-cpu", "dfp_deploy.no_such_module:Nothing")
    infos = {i.name: i for i in list_backends()}
    assert not infos["ort-cpu"].available and "failed to load" in infos["ort-cpu"].reason


def test_unknown_backend_is_input_error_listing_known_names():
    with pytest.raises(InputError, match="nope.*ort-cpu.*torch-cuda"):
        get_backend("nope")


def test_gpu_backends_report_availability_truthfully():
    import onnxruntime as ort

    infos = {i.name: i for i in list_backends()}
    assert infos["ort-cuda"].available == ("CUDAExecutionProvider" in ort.get_available_providers())
    assert infos["torch-cuda"].available == torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert not infos["tensorrt"].available
    for name in ("ort-cuda", "torch-cuda", "tensorrt"):
        if not infos[name].available:
            assert len(infos[name].reason) > 10


@pytest.mark.parametrize("name", ["ort-cuda", "torch-cuda", "tensorrt"])
def test_unavailable_backend_build_raises_backend_unavailable(name, onnx_files):
    model, folder = onnx_files
    backend = get_backend(name)
    if backend.info().available:
        pytest.skip(f"{name} is available on this machine")
    with pytest.raises(BackendUnavailable):
        backend.build(folder / "static.onnx", precision="fp32", threads=1, out_dir=folder, torch_model=model)


def test_listing_backends_does_not_initialise_cuda():
    list_backends()
    assert not torch.cuda.is_initialized()


def test_importing_the_registry_stays_light():
    code = ("import sys, dfp_deploy, dfp_deploy.backends.registry; "
            "print(sorted(m for m in ('onnxruntime', 'tensorrt', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ort_cpu_int8_is_unavailable_not_silently_fp32(onnx_files):
    _, folder = onnx_files
    with pytest.raises(BackendUnavailable, match="int8 on ort-cpu needs a Q/DQ ONNX"):
        build_ort_cpu(folder / "static.onnx", precision="int8")


@pytest.mark.parametrize("kwargs, message", [(dict(precision="fp64"), "precision"), (dict(threads=0), "threads"),
                                             (dict(threads=True), "threads")])
def test_ort_cpu_bad_arguments_are_input_errors(onnx_files, kwargs, message):
    _, folder = onnx_files
    with pytest.raises(InputError, match=message):
        build_ort_cpu(folder / "static.onnx", **kwargs)


def test_ort_cpu_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        build_ort_cpu(tmp_path / "absent.onnx")


def test_ort_cpu_session_settings(onnx_files):
    _, folder = onnx_files
    engine = build_ort_cpu(folder / "static.onnx", threads=1)
    options = engine.session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert engine.threads == 1 and engine.session.get_providers() == ["CPUExecutionProvider"]


def test_ort_cpu_static_engine_runs_and_rejects_other_batches(onnx_files):
    model, folder = onnx_files
    engine = build_ort_cpu(folder / "static.onnx")
    assert engine.static_batch == 2
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(engine.run(x), expected, atol=1e-5)
    with pytest.raises(InputError, match="static batch"):
        engine.run(np.zeros((5, 3, 4, 4), np.float32))


def test_ort_cpu_prepared_runner_uses_its_own_bound_copy(onnx_files):
    _, folder = onnx_files
    engine = build_ort_cpu(folder / "dynamic.onnx")
    assert engine.static_batch is None
    x = np.random.default_rng(2).standard_normal((3, 3, 4, 4), dtype=np.float32)
    expected = engine.run(x)
    runner = engine.prepare(x)
    x[:] = 0  # the runner must keep timing the input it was prepared with
    assert runner() is None
    np.testing.assert_array_equal(runner.binding.copy_outputs_to_cpu()[0], expected)


def test_torch_cpu_engine_matches_ort_cpu_engine(onnx_files):
    model, folder = onnx_files
    torch_engine = get_backend("torch-cpu").build(None, precision="fp32", threads=1, out_dir=folder,
                                                  torch_model=model)
    ort_engine = build_ort_cpu(folder / "dynamic.onnx")
    x = np.random.default_rng(1).standard_normal((7, 3, 4, 4), dtype=np.float32)
    result = parity(torch_engine.run, ort_engine, x)
    assert result["n"] == 7 and result["top1_agreement"] == 1.0 and result["max_abs_err"] < 1e-5
    assert torch_engine.prepare(x)() is None


def test_torch_cpu_needs_the_module(onnx_files):
    _, folder = onnx_files
    with pytest.raises(InputError, match="torch_model"):
        get_backend("torch-cpu").build(None, precision="fp32", threads=1, out_dir=folder)
    with pytest.raises(BackendUnavailable, match="int8"):
        get_backend("torch-cpu").build(None, precision="int8", threads=1, out_dir=folder, torch_model=linear_model())


@pytest.mark.gpu
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_torch_cuda_engine_matches_cpu_and_times_on_device(onnx_files, precision, tolerance):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, folder = onnx_files
    engine = get_backend("torch-cuda").build(None, precision=precision, threads=None, out_dir=folder,
                                             torch_model=model)
    assert next(model.parameters()).device.type == "cpu"  # the caller's module is not moved
    x = np.random.default_rng(3).standard_normal((4, 3, 4, 4), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(engine.run(x), expected, atol=tolerance, rtol=tolerance)
    elapsed_ms = engine.prepare(x)()
    assert isinstance(elapsed_ms, float) and elapsed_ms > 0
    assert engine.graph_used, engine.graph_error  # a plain conv net captures into a CUDA graph
    eager = get_backend("torch-cuda", cuda_graph=False).build(None, precision=precision, threads=None,
                                                              out_dir=folder, torch_model=model)
    assert eager.prepare(x)() > 0 and eager.graph_used is False


@pytest.mark.gpu
def test_ort_cuda_engine_runs_on_the_device(onnx_files):
    backend = get_backend("ort-cuda")
    if not backend.info().available:
        pytest.skip(backend.info().reason)
    model, folder = onnx_files
    engine = backend.build(folder / "dynamic.onnx", precision="fp32", threads=1, out_dir=folder)
    assert engine.session.get_providers()[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(4).standard_normal((4, 3, 4, 4), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(engine.run(x), expected, atol=1e-4)
    runner = engine.prepare(x)
    assert runner() is None
    np.testing.assert_allclose(runner.binding.copy_outputs_to_cpu()[0], expected, atol=1e-4)


# ------------------------------------------------------------------------------------------------ GPU backends, read
# These run on any machine: they fake what a GPU host would answer and check what the backends do with it.

def test_torch_cuda_listing_on_a_gpu_host_never_initialises_cuda(monkeypatch):
    from dfp_deploy.backends import torch_backend

    def initialises_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda.get_device_name initialises CUDA in the listing process")

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", initialises_cuda)
    monkeypatch.setattr(torch_backend, "gpu_models", lambda: ["NVIDIA H100 80GB HBM3"])
    info = get_backend("torch-cuda").info()
    assert info.available and info.device == "NVIDIA H100 80GB HBM3"
    assert not torch.cuda.is_initialized()


def test_torch_cuda_fp32_engine_switches_tf32_off(monkeypatch):
    from dfp_deploy.backends import torch_backend

    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision  # process-wide flags: restored by hand below
    monkeypatch.setattr(torch_backend.TorchCudaBackend, "_unavailable_reason", lambda self: None)
    monkeypatch.setattr(torch_backend, "_to_cuda", lambda model, dtype: model.to(dtype=dtype))  # no device here
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    try:
        conv.fp32_precision = matmul.fp32_precision = "tf32"  # PyTorch's default for cuDNN convolutions
        engine = get_backend("torch-cuda").build(None, precision="fp32", threads=None, out_dir=None,
                                                 torch_model=linear_model())
        engine._math()  # what run() and prepare() do first
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee") and engine.tf32 is False
        conv.fp32_precision = "tf32"
        get_backend("torch-cuda").build(None, precision="fp16", threads=None, out_dir=None,
                                        torch_model=linear_model())._math()
        assert conv.fp32_precision == "tf32"  # fp16 engines leave the user's fp32 setting alone
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def test_ort_cuda_refuses_int8_and_names_tensorrt(onnx_files):
    model, folder = onnx_files
    with pytest.raises(BackendUnavailable, match="no integer convolution kernels.*target.backend: tensorrt"):
        get_backend("ort-cuda").build(folder / "static.onnx", precision="int8", threads=None, out_dir=folder)


def test_ort_cuda_provider_options_switch_tf32_off():
    from dfp_deploy.backends.ort import OrtCudaBackend, cuda_provider_options

    assert cuda_provider_options()["use_tf32"] == 0
    assert OrtCudaBackend()._providers()[0] == ("CUDAExecutionProvider", cuda_provider_options())


def test_two_onnxruntime_distributions_are_reported_in_one_line(monkeypatch):
    from importlib import metadata

    from dfp_deploy.backends import ort

    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "1.22.0" if name == "onnxruntime-gpu" else real_version(name))
    assert ort.distribution_clash() == ort.CLASH
    info = get_backend("ort-cuda").info()
    assert ort.CLASH in info.reason and "\n" not in info.reason
    monkeypatch.setattr(metadata, "version", real_version)
    if "onnxruntime-gpu" not in {d.metadata["Name"] for d in metadata.distributions()}:
        assert ort.distribution_clash() is None


def test_no_extra_installs_a_second_onnxruntime_and_tensorrt_is_pinned_to_the_checked_major():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("onnxruntime") for dep in project["dependencies"])
    for extra, deps in project["optional-dependencies"].items():
        assert not any(dep.startswith("onnxruntime-gpu") for dep in deps), extra  # pip would install both
    trt = [dep for deps in project["optional-dependencies"].values() for dep in deps if dep.startswith("tensorrt")]
    assert trt and all("<11" in dep.replace(" ", "") for dep in trt if not dep.startswith("tensorrt-stubs")), trt


# ------------------------------------------------------------------------------------------------ inspect, simulation

def test_every_cpu_engine_describes_itself_with_a_typed_summary(onnx_files, tmp_path):
    from tests.test_tensorrt import tiny_qdq_model

    model, folder = onnx_files
    fp32 = build_ort_cpu(folder / "static.onnx").inspect()
    assert (fp32.backend, fp32.precision, fp32.arithmetic) == ("ort-cpu", "fp32", "fp32")
    assert fp32.kernels is None and fp32.layers is None and fp32.cuda_graph is None and fp32.report() == {}
    tiny_qdq_model(tmp_path / "q.onnx")
    int8 = build_ort_cpu(tmp_path / "q.onnx", precision="int8").inspect()
    assert int8.precision == "int8" and int8.kernels is not None
    assert int8.kernels.integer_conv_gemm + int8.kernels.float_conv_gemm == 3  # two convs and a gemm
    assert int8.report() == {"kernels": int8.kernels.as_dict()}  # report.json's engine section
    torch_summary = get_backend("torch-cpu").build(None, precision="fp32", threads=1, out_dir=folder,
                                                   torch_model=model).inspect()
    assert (torch_summary.backend, torch_summary.arithmetic, torch_summary.cuda_graph) == ("torch-cpu", "fp32", None)


def test_simulated_quantization_comes_from_the_registry(tmp_path):
    from tests.test_tensorrt import _ort_run, tiny_qdq_model

    model = tiny_qdq_model(tmp_path / "q.onnx")
    assert registry.simulates("int8") and not registry.simulates("fp32")
    engine = registry.simulation("int8", tmp_path / "q.onnx", threads=1)
    assert engine.inspect().precision == "int8" and engine.inspect().arithmetic == "fp32"
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(engine.run(x), _ort_run(model, x), atol=1e-5)  # Q/DQ executed as float ops
    with pytest.raises(InputError, match="no simulation is registered for precision 'fp16'"):
        registry.simulation("fp16", tmp_path / "q.onnx")


def test_cpu_session_names_what_onnxruntime_could_not_run():
    from dfp_deploy.backends.ort import cpu_session

    with pytest.raises(BackendUnavailable, match="onnxruntime cannot run the model"):
        cpu_session(b"not an onnx model", threads=1)
