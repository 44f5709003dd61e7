"""Name -> backend registry: lazily imported backends that say whether they can run here and, if not, why.

A backend turns an exported ONNX file (or the PyTorch module itself) into an Engine: something that runs
a float32 NCHW batch and can hand out a pre-bound zero-argument runner for timing. A backend whose library
or hardware is missing still appears in `list_backends()` with available=False and the reason, so the CLI
can show it instead of failing; asking it to build raises BackendUnavailable with the same reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from dfp_deploy.core.errors import BackendUnavailable, InputError
from dfp_deploy.core.types import EngineSummary

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    version: str | None
    reason: str  # why it is unavailable, or a short note on what it runs when available
    device: str


class Engine(Protocol):
    name: str
    static_batch: int | None  # the only batch size the engine accepts, or None if any batch runs
    threads: int | None  # CPU threads the engine was built with (None where not applicable)

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 NCHW batch in, logits out (host arrays)."""
        ...

    def prepare(self, x: np.ndarray) -> Callable[[], float | None]:
        """A zero-argument runner of one inference on `x`, bound once (on GPU backends: resident on the device).

        It returns None, or the device-measured milliseconds of that call (GPU backends timing with CUDA
        events), which the latency protocol then uses instead of the host's wall time.
        """
        ...

    def inspect(self) -> EngineSummary:
        """What the engine knows about itself: its arithmetic, layer precisions, kernels, CUDA graph use."""
        ...


class Backend(Protocol):
    name: str

    def info(self) -> BackendInfo: ...

    def build(self, onnx_path: Path, *, precision: str, threads: int | None, out_dir: Path,
              torch_model=None) -> Engine: ...


# name -> "module:attribute" of a zero-argument factory; imported only when that backend is asked for
_REGISTRY: dict[str, str] = {
    "ort-cpu": "dfp_deploy.backends.ort:OrtCpuBackend",
    "ort-cuda": "dfp_deploy.backends.ort:OrtCudaBackend",
    "tensorrt": "dfp_deploy.backends.tensorrt:TensorRTBackend",
    "torch-cpu": "dfp_deploy.backends.torch_backend:TorchCpuBackend",
    "torch-cuda": "dfp_deploy.backends.torch_backend:TorchCudaBackend",
}
DEFAULT_BACKEND = "ort-cpu"

# precision -> "module:attribute" of `f(onnx_path, threads) -> Engine`: the engine that runs a graph of that
# precision as the arithmetic it stands for (int8: Q/DQ executed in float), the reference a real engine must match
_SIMULATORS: dict[str, str] = {
    "int8": "dfp_deploy.backends.ort:simulated_quantization",
}


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str, **options) -> Backend:
    """The backend called `name`; `options` go to its constructor (e.g. TensorRT's opt_level, workspace_mb)."""
    if name not in _REGISTRY:
        raise InputError(f"target.backend: unknown backend {name!r}; known: {', '.join(_REGISTRY)}")
    module_name, attribute = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), attribute)(**options)


def simulation(precision: str, onnx_path: Path, threads: int | None = None) -> Engine:
    """The simulation of `precision`'s graph at `onnx_path` (parity reference); InputError where none exists."""
    if precision not in _SIMULATORS:
        raise InputError(f"no simulation is registered for precision {precision!r} "
                         f"(registered: {', '.join(_SIMULATORS) or 'none'})")
    module_name, attribute = _SIMULATORS[precision].split(":")
    return getattr(importlib.import_module(module_name), attribute)(Path(onnx_path), threads)


def simulates(precision: str) -> bool:
    """Whether a simulation of `precision` is registered (the build then also compares the engine with it)."""
    return precision in _SIMULATORS


def list_backends() -> list[BackendInfo]:
    """Every registered backend with its availability; a backend that fails to load is reported, never raised."""
    infos = []
    for name in _REGISTRY:
        try:
            infos.append(get_backend(name).info())
        except Exception as e:
            infos.append(BackendInfo(name, False, None, f"failed to load: {type(e).__name__}: {e}", "unknown"))
    return infos


def check_precision(backend: str, precision: str, supported: tuple[str, ...], plans: dict[str, str]) -> None:
    """InputError for an unknown precision; BackendUnavailable (with the plan for it) for a known unsupported one."""
    if precision not in PRECISIONS:
        raise InputError(f"target.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision not in supported:
        # never fall back to another precision silently: the report would claim a speed-up that is not there
        raise BackendUnavailable(plans.get(precision, f"{precision} is not supported on {backend}; "
                                                      f"use {' or '.join(supported)}"))


def check_threads(threads) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"target.threads: {threads!r} must be a positive integer (or omitted for all cores)")

