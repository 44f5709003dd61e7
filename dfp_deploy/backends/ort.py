"""ONNX Runtime engines: `ort-cpu` (CPUExecutionProvider) and `ort-cuda` (CUDAExecutionProvider, timed via IOBinding).

Session settings are chosen for honest, repeatable latency rather than throughput: intra-op threads pinned to
the requested count (default: physical cores), one inter-op thread with sequential execution (a CNN is a chain,
parallel branches buy little and add scheduling noise), all graph optimisations, and spinning worker threads
(`session.intra_op.allow_spinning=1`) so a timed call does not pay thread wake-up latency.

Timing runners bind input and output once through IOBinding, so a timed call is one `run_with_iobinding`:
no feed-dict construction on CPU, and on CUDA the input stays resident on the device and the output is
left there (no host copies in the figure). ORT synchronises the CUDA stream at the end of each Run, so
the host wall time of a call covers the GPU work.

ort-cuda: fp32 only. The CUDA provider's `use_tf32` defaults to on (TF32 convolutions and GEMMs on Ampere and
later), so it is switched off: an "fp32" engine computes in IEEE fp32 like the reference. int8 is refused: the CUDA
provider has no integer convolution kernels, so a Q/DQ graph would run as DequantizeLinear + float Conv, a slower
float engine reported as int8; TensorRT is the int8 backend on NVIDIA GPUs.

onnxruntime and onnxruntime-gpu install the same `onnxruntime` module; with both installed the one written last
wins and the CUDA provider can vanish after an unrelated upgrade. `distribution_clash()` detects it and ort-cuda's
listing says so in one line (the fix: uninstall both, install onnxruntime-gpu alone; it also has the CPU provider).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dfp_deploy.backends.registry import BackendInfo, check_precision, check_threads
from dfp_deploy.core.env import cpu_model, gpu_models, physical_cores
from dfp_deploy.core.errors import BackendUnavailable, InputError
from dfp_deploy.core.types import EngineSummary, KernelCounts

_INT8_NEEDS_QDQ = ("int8 on {name} needs a Q/DQ ONNX (dfp_deploy.export.passes.prepare_int8_onnx makes one; "
                   "`dfp-deploy build` does it for target.precision: int8)")
_FP16_PLAN = "fp16 on {name} is not supported yet; use fp32"
_CUDA_INT8_PLAN = ("int8 on ort-cuda is not supported: ONNX Runtime's CUDA provider has no integer convolution "
                   "kernels, so the Q/DQ graph would run as dequantize + float conv; use target.backend: tensorrt "
                   "for int8 on an NVIDIA GPU")
CLASH = ("onnxruntime and onnxruntime-gpu are both installed and overwrite one `onnxruntime` module; run "
         "`pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`")


def distribution_clash() -> str | None:
    """CLASH when both ONNX Runtime distributions are installed (importlib.metadata; imports nothing), else None."""
    from importlib import metadata

    def installed(name: str) -> bool:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            return False
        return True

    return CLASH if installed("onnxruntime") and installed("onnxruntime-gpu") else None


def _import_ort():
    try:
        import onnxruntime
    except Exception as e:
        raise BackendUnavailable(f"onnxruntime is not importable: {type(e).__name__}: {e}") from e
    return onnxruntime


def default_threads() -> int:
    return physical_cores() or 1


def session_options(ort, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.log_severity_level = 3  # errors only: ORT's per-session warnings would flood the build output
    return options


def _static_shape(session) -> tuple:
    return tuple(d if isinstance(d, int) else None for d in session.get_inputs()[0].shape)


def simulated_quantization(onnx_path: Path, threads: int | None = None) -> OrtEngine:
    """The Q/DQ graph run as written, ONNX Runtime's graph optimizations off: every QuantizeLinear and
    DequantizeLinear executes as its own float op, so the convs see DQ(Q(x)) and DQ(W_int8) in float — the simulated
    quantization the integer engine is meant to reproduce, on the same scales and zero points (parity reference).
    Registered in backends/registry.py as the "int8" reference."""
    threads = threads or default_threads()
    session = cpu_session(Path(onnx_path), threads, optimize=False)
    return OrtEngine(session, f"{Path(onnx_path).name} (simulated quantization)", "cpu", threads,
                     precision="int8", arithmetic="fp32")


def cpu_session(model: Path | bytes, threads: int | None = None, *, optimize: bool = True):
    """An ONNX Runtime CPU session on a file or a serialized model: the one way dfp_deploy runs ONNX outside an
    engine (activation ranges, simulated quantization). `optimize=False` runs every node as written; threads None:
    ONNX Runtime's default. Any failure to create it raises BackendUnavailable with ORT's first line."""
    ort = _import_ort()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackendUnavailable(f"onnxruntime cannot run the model: {first}") from e


class OrtEngine:
    """One ORT session with a single float input; `run` returns its output, or a {name: array} dict of several."""

    def __init__(self, session, name: str, device: str, threads: int, *, precision: str = "fp32",
                 arithmetic: str | None = None, kernels: KernelCounts | None = None):
        self.session = session
        self.precision = precision
        self.arithmetic = arithmetic or precision  # TF32 is off on ort-cuda: fp32 means IEEE fp32
        self.kernels = kernels  # integer vs float kernels of ORT's optimized int8 graph
        self.name = name
        self.device = device
        self.threads = threads
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        self.output_name = self.output_names[0]
        self.input_shape = _static_shape(session)
        self.static_batch = self.input_shape[0] if self.input_shape else None

    def _checked(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        expected = self.input_shape
        if x.ndim != len(expected) or any(e is not None and e != s for e, s in zip(expected, x.shape)):
            shown = tuple("N" if e is None else e for e in expected)
            hint = (" (the ONNX file has a static batch; export with dynamic batch to feed other sizes)"
                    if self.static_batch is not None and x.shape[1:] == tuple(expected[1:]) else "")
            raise InputError(f"{self.name}: input shape {x.shape} does not match the engine's {shown}{hint}")
        return x

    def inspect(self) -> EngineSummary:
        return EngineSummary(self.name, self.precision, self.arithmetic, kernels=self.kernels)

    def run(self, x: np.ndarray) -> np.ndarray:
        outputs = self.session.run(self.output_names, {self.input_name: self._checked(x)})
        return outputs[0] if len(outputs) == 1 else dict(zip(self.output_names, outputs))

    def prepare(self, x: np.ndarray):
        # a private copy: the binding reads this memory on every call, whatever the caller does with its array
        x = self._checked(x).copy()
        binding = self.session.io_binding()
        if self.device == "cuda":
            ort = _import_ort()
            resident = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
            binding.bind_ortvalue_input(self.input_name, resident)
            for name in self.output_names:
                binding.bind_output(name, "cuda", 0)
        else:
            binding.bind_cpu_input(self.input_name, x)
            for name in self.output_names:
                binding.bind_output(name, "cpu")
        session = self.session

        def run_once() -> None:
            session.run_with_iobinding(binding)

        run_once.input, run_once.binding = x, binding  # the binding points at x's memory: keep both alive
        return run_once


class _OrtBackend:
    name = ""
    provider = ""
    device_kind = ""
    precisions = ("fp32", "int8")
    precision_plans: dict = {}

    def _device(self) -> str:
        raise NotImplementedError

    def info(self) -> BackendInfo:
        try:
            ort = _import_ort()
        except BackendUnavailable as e:
            return BackendInfo(self.name, False, None, str(e), self._device())
        providers = ort.get_available_providers()
        if self.provider not in providers:
            return BackendInfo(self.name, False, ort.__version__,
                               f"{self.provider} is not in this onnxruntime build's providers "
                               f"({', '.join(providers)}){self._hint()}", self._device())
        return BackendInfo(self.name, True, ort.__version__, f"onnxruntime {self.provider}", self._device())

    def _hint(self) -> str:
        return ""

    def _providers(self) -> list:
        raise NotImplementedError

    def build(self, onnx_path: Path, *, precision: str, threads: int | None, out_dir: Path,
              torch_model=None) -> OrtEngine:
        """A session on `onnx_path`; `out_dir` and `torch_model` are unused (ORT keeps its engine in memory)."""
        check_threads(threads)
        check_precision(self.name, precision, self.precisions,
                        {"fp16": _FP16_PLAN.format(name=self.name), **self.precision_plans})
        info = self.info()
        if not info.available:
            raise BackendUnavailable(f"{self.name}: {info.reason}")
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise InputError(f"{self.name}: ONNX file {onnx_path} does not exist")
        if (precision == "int8") != has_qdq(onnx_path):
            raise BackendUnavailable(_INT8_NEEDS_QDQ.format(name=self.name) if precision == "int8" else
                                     f"{self.name}: {onnx_path.name} contains Q/DQ nodes; build it as int8")
        ort = _import_ort()
        threads = threads or default_threads()
        options = session_options(ort, threads)
        optimized = Path(out_dir) / f".{onnx_path.stem}.ort-optimized.onnx"
        if precision == "int8":
            # ORT writes the graph it really runs: proof that Q/DQ pairs became integer kernels (never assumed)
            options.optimized_model_filepath = str(optimized)
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=self._providers())
        except Exception as e:
            raise BackendUnavailable(f"{self.name}: could not create a session on {onnx_path.name}: "
                                     f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                                     ) from e
        if self.provider not in session.get_providers():
            # ORT silently falls back to CPU when a provider fails to initialise: a result would be mislabelled
            raise BackendUnavailable(f"{self.name}: {self.provider} failed to initialise (session providers: "
                                     f"{', '.join(session.get_providers())}); check the CUDA/cuDNN libraries")
        engine = OrtEngine(session, self.name, self.device_kind, threads, precision=precision,
                           kernels=kernel_counts(optimized) if precision == "int8" else None)
        optimized.unlink(missing_ok=True)
        return engine

    def prepare_graph(self, onnx_path: Path, *, precision: str, out_dir: Path) -> Path:
        """The part of a build any host can do (measure/workers.py runs it off the target): the graph checked and
        rewritten by ONNX Runtime's basic, provider-independent optimisations (constant folding, redundant nodes).
        Fusions that follow the device's instruction set (whether a Q/DQ pair may run as an s8s8 kernel, the NCHWc
        layout) stay in build() on the target; build() of this graph runs the same graph as build() of the input
        (docs/research/measurement-fabric.md)."""
        ort = _import_ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        out = Path(out_dir) / f"{Path(onnx_path).stem}.{precision}.prepared.onnx"
        options.optimized_model_filepath = str(out)
        options.log_severity_level = 3
        try:
            ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BackendUnavailable(f"{self.name}: could not prepare {Path(onnx_path).name}: "
                                     f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                                     ) from e
        return out


def has_qdq(onnx_path: Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def kernel_counts(optimized_path: Path) -> KernelCounts | None:
    """Op counts of ORT's optimized graph: how many convolutions/gemms/adds run as integer kernels vs float."""
    import collections

    import onnx

    if not optimized_path.is_file():
        return None
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized_path)).graph.node)
    integer = sum(ops[k] for k in ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger"))
    floating = sum(ops[k] for k in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm"))
    return KernelCounts(integer, floating, tuple(sorted(ops.items())))


class OrtCpuBackend(_OrtBackend):
    name = "ort-cpu"
    provider = "CPUExecutionProvider"
    device_kind = "cpu"

    def _device(self) -> str:
        return cpu_model()

    def _providers(self) -> list:
        return [self.provider]


class OrtCudaBackend(_OrtBackend):
    name = "ort-cuda"
    provider = "CUDAExecutionProvider"
    device_kind = "cuda"

    def _device(self) -> str:
        gpus = gpu_models()
        return gpus[0] if gpus else "cuda"

    precisions = ("fp32",)
    precision_plans = {"int8": _CUDA_INT8_PLAN}

    def _hint(self) -> str:
        clash = distribution_clash()
        if clash is not None:
            return f"; {clash}"
        return "; install onnxruntime-gpu (in place of onnxruntime) on a machine with an NVIDIA GPU"

    def info(self) -> BackendInfo:
        info = super().info()
        clash = distribution_clash()
        if info.available and clash is not None:  # works today, breaks at the next reinstall of either one
            return BackendInfo(info.name, True, info.version, f"{info.reason} (warning: {clash})", info.device)
        return info

    def _providers(self) -> list:
        # CPU stays listed for the rare node CUDA has no kernel for; the check above ensures CUDA is really active.
        # use_tf32 defaults to 1 in the CUDA provider: an fp32 engine must compute in IEEE fp32
        return [(self.provider, cuda_provider_options()), "CPUExecutionProvider"]


def cuda_provider_options() -> dict:
    """CUDA provider options: device 0, TF32 off (ORT's default is on)."""
    return {"device_id": 0, "use_tf32": 0}
