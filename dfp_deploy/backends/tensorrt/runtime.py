"""Run a TensorRT plan: deserialize it, bind device buffers, execute, and time with CUDA events (or CUDA graphs).

`prepare(x)` copies `x` to a device buffer once, binds all I/O of a private execution context, and returns a
runner that records a CUDA event, enqueues (execute_async_v3, or the replay of a CUDA graph captured from it) on
its own stream, records a second event and waits for it; the result is the elapsed time between the two events in
milliseconds: GPU time of one inference with no host<->device copy in it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from dfp_deploy.backends.tensorrt.inspect import LayerInfo
from dfp_deploy.backends.tensorrt.library import collected_errors, process_logger
from dfp_deploy.core.errors import BackendUnavailable, ExportError, InputError
from dfp_deploy.core.types import CudaGraphStatus, EngineSummary, LayerSummary

NAME = "tensorrt"


def deserialize(trt, plan: bytes, source: str):
    """(runtime, engine) for a serialized plan; the runtime must outlive the engine."""
    with collected_errors() as errors:
        runtime = trt.Runtime(process_logger(trt))
        engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        detail = "; ".join(errors[-2:]) or "no error reported"
        raise ExportError(f"tensorrt: could not deserialize the plan just built from {source}: {detail}")
    return runtime, engine


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

    def __init__(self, trt, engine, *, precision: str, plan_path: Path, layers: list[LayerInfo],
                 layer_summary: LayerSummary, settings: dict, timing_cache: Path, notes: list[str], cuda_graph: bool,
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

    def inspect(self) -> EngineSummary:
        arithmetic = "tf32" if self.tf32 else self.precision
        return EngineSummary(NAME, self.precision, arithmetic, layers=self.layer_summary,
                             cuda_graph=CudaGraphStatus(bool(self.cuda_graph), bool(self.graph_used),
                                                        self.graph_error),
                             notes=tuple(self.notes))

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
        outputs = {name: bindings.buffers[name].float().cpu().numpy() for name in bindings.outputs}
        return outputs[self.output_name] if len(outputs) == 1 else outputs  # several: by name (core/outputs.py)

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
