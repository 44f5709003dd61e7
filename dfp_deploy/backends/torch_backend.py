"""PyTorch engines: `torch-cpu` (eager, inference_mode; the reference) and `torch-cuda` (timed with CUDA events).

These run the nn.Module itself, not the ONNX file, so they measure what eager PyTorch would deliver and serve
as the baseline an exported engine should beat. CUDA is touched only inside TorchCudaBackend's build and engines,
never at import or listing: `info()` asks `torch.cuda.is_available()` (a driver query that creates no context and
leaves `torch.cuda.is_initialized()` False) and takes the GPU's name from /proc/driver/nvidia (core/env.gpu_models),
never from `torch.cuda.get_device_name`, which initialises CUDA in the listing process.

fp32 means IEEE fp32: PyTorch lets cuDNN convolutions use TF32 by default (10-bit mantissa inputs on Ampere and
later), which is neither the arithmetic of the TensorRT fp32 engine it is compared with (TF32 cleared) nor within
the fp32 parity bound. fp32 engines switch cuDNN convolutions and CUDA matmuls to IEEE fp32 (`strict_fp32_math`);
these are PyTorch's process-wide flags, re-asserted before every run and timing.

GPU timing: a runner records a CUDA event before and after the forward pass on the current stream and waits
for the second; `start.elapsed_time(end)` is the time between the two events on the device, in milliseconds. It includes no
host<->device copies (the input is made resident once in `prepare`, the output stays on the device); host-side
Python overhead shows in it only where kernel launches cannot keep the GPU busy, as it would in deployment.

CUDA graphs (`cuda_graph=True`, the recipe's advanced.target.cuda_graph): `prepare` runs the model a few times on a side
stream (cuDNN's autotuning and the caching allocator settle there, outside the capture), captures one forward pass
on the resident input into a torch.cuda.CUDAGraph and times `graph.replay()` instead of the eager call: one launch
for the whole network, as a deployment that replays graphs would see it. A model that cannot be captured (host
synchronisation, data-dependent shapes) falls back to eager timing; `engine.graph_used` says which one was timed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from dfp_deploy.backends.registry import BackendInfo, check_precision, check_threads
from dfp_deploy.core.env import cpu_model, gpu_models, physical_cores
from dfp_deploy.core.errors import BackendUnavailable, InputError
from dfp_deploy.core.types import CudaGraphStatus, EngineSummary
from dfp_deploy.core.outputs import to_numpy


def _require_module(name: str, torch_model) -> torch.nn.Module:
    if not isinstance(torch_model, torch.nn.Module):
        raise InputError(f"{name}: this backend runs the PyTorch module itself; pass torch_model=<nn.Module>")
    return torch_model


class TorchCpuEngine:
    def __init__(self, model: torch.nn.Module, threads: int):
        self.name = "torch-cpu"
        self.model = model
        self.threads = threads
        self.static_batch = None

    def _threads(self) -> None:
        # torch's intra-op pool is process-wide: re-assert ours in case another engine changed it
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def inspect(self) -> EngineSummary:
        return EngineSummary(self.name, "fp32", "fp32")

    def run(self, x: np.ndarray) -> np.ndarray:
        self._threads()
        with torch.inference_mode():
            return to_numpy(self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))))

    def prepare(self, x: np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        model = self.model
        self._threads()

        def run_once() -> None:
            with torch.inference_mode():
                model(tensor)

        return run_once


_GRAPH_WARMUP = 3


def _capture(model: torch.nn.Module, resident: torch.Tensor):
    """(graph, None) replaying model(resident), or (None, why not) (module docstring)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.inference_mode():
            with torch.cuda.stream(side):
                for _ in range(_GRAPH_WARMUP):
                    model(resident)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(resident)
    except Exception as e:  # noqa: BLE001 - any capture failure means eager timing, with the reason kept
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {e}"
    return graph, None


class TorchCudaEngine:
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, cuda_graph: bool = True):
        self.name = "torch-cuda"
        self.model = model
        self.dtype = dtype
        self.threads = None
        self.static_batch = None
        self.cuda_graph = cuda_graph  # requested; graph_used says whether the last prepare() captured one
        self.graph_used: bool | None = None
        self.graph_error: str | None = None
        self.tf32 = False  # fp32 runs IEEE fp32 (strict_fp32_math); the parity rule reads this

    def inspect(self) -> EngineSummary:
        precision = "fp16" if self.dtype == torch.float16 else "fp32"
        return EngineSummary(self.name, precision, "tf32" if self.tf32 else precision,
                             cuda_graph=CudaGraphStatus(bool(self.cuda_graph), bool(self.graph_used), self.graph_error))

    def _math(self) -> None:
        if self.dtype == torch.float32:
            strict_fp32_math()

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to("cuda").to(self.dtype)

    def run(self, x: np.ndarray) -> np.ndarray:
        self._math()
        with torch.inference_mode():
            return to_numpy(self.model(self._to_device(x)))

    def prepare(self, x: np.ndarray):
        self._math()  # before capture: a graph replays the kernels (and math mode) it captured
        resident = self._to_device(x)
        model = self.model
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph, self.graph_error = _capture(model, resident) if self.cuda_graph else (None, None)
        self.graph_used = graph is not None

        def run_once() -> float:
            with torch.inference_mode():
                start.record()
                if graph is not None:
                    graph.replay()
                else:
                    model(resident)
                end.record()
            end.synchronize()
            return start.elapsed_time(end)

        run_once.graph, run_once.input = graph, resident  # the graph reads this memory on every replay
        return run_once


def strict_fp32_math() -> None:
    """cuDNN convolutions and CUDA matmuls in IEEE fp32, no TF32 (process-wide PyTorch flags)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        # the per-operator API (torch >= 2.9); mixing it with the legacy allow_tf32 flags raises on read
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def _precision_plans(name: str) -> dict[str, str]:
    return {"int8": f"int8 on {name} is not supported (eager PyTorch has no int8 conv path here); "
                    "use an ort or tensorrt backend for int8",
            "fp16": f"fp16 on {name} is not supported (CPU fp16 convolutions are slow); use fp32"}


class TorchCpuBackend:
    name = "torch-cpu"

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, True, torch.__version__, "eager PyTorch on the CPU (reference)", cpu_model())

    def build(self, onnx_path: Path | None, *, precision: str, threads: int | None, out_dir: Path | None,
              torch_model=None) -> TorchCpuEngine:
        """Wraps `torch_model` (switched to eval mode, not copied); onnx_path and out_dir are unused."""
        check_threads(threads)
        check_precision(self.name, precision, ("fp32",), _precision_plans(self.name))
        model = _require_module(self.name, torch_model).eval()
        return TorchCpuEngine(model, threads or physical_cores() or 1)


def _to_cuda(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return model.to(device="cuda", dtype=dtype)


class TorchCudaBackend:
    name = "torch-cuda"

    def __init__(self, cuda_graph: bool = True) -> None:
        self.cuda_graph = cuda_graph

    def _unavailable_reason(self) -> str | None:
        if torch.version.cuda is None:
            return f"this torch build ({torch.__version__}) has no CUDA support"
        if not torch.cuda.is_available():
            return "torch finds no CUDA device (driver missing or no GPU visible)"
        return None

    def info(self) -> BackendInfo:
        reason = self._unavailable_reason()
        gpus = gpu_models()
        device = gpus[0] if gpus else "cuda"
        if reason is not None:
            return BackendInfo(self.name, False, torch.__version__, reason, device)
        return BackendInfo(self.name, True, torch.__version__, f"eager PyTorch on CUDA {torch.version.cuda}", device)

    def build(self, onnx_path: Path | None, *, precision: str, threads: int | None, out_dir: Path | None,
              torch_model=None) -> TorchCudaEngine:
        """A device copy of `torch_model` (the caller's module stays where it is); fp32 or fp16 weights."""
        check_threads(threads)
        check_precision(self.name, precision, ("fp32", "fp16"), {"int8": _precision_plans(self.name)["int8"]})
        reason = self._unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(f"{self.name}: {reason}")
        dtype = torch.float16 if precision == "fp16" else torch.float32
        model = _to_cuda(copy.deepcopy(_require_module(self.name, torch_model)).eval(), dtype)
        # let cuDNN pick the fastest algorithm per shape, as a deployment runtime would
        torch.backends.cudnn.benchmark = True
        return TorchCudaEngine(model, dtype, cuda_graph=self.cuda_graph)
