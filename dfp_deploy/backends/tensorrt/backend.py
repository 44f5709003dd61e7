"""The `tensorrt` backend: availability without side effects, and build = check, build plan, deserialize, inspect."""

from __future__ import annotations

from pathlib import Path

from dfp_deploy.backends.registry import BackendInfo, check_precision, check_threads
from dfp_deploy.backends.tensorrt.build import DEFAULT_OPT_LEVEL, builder_settings, cached_build, prepare_onnx
from dfp_deploy.backends.tensorrt.cache import device_timing_cache_path, forget_plan, plan_path, write_bytes_durably
from dfp_deploy.backends.tensorrt.inspect import engine_layers
from dfp_deploy.backends.tensorrt.library import cuda_unavailable_reason, import_tensorrt
from dfp_deploy.backends.tensorrt.runtime import NAME, TensorRTEngine, deserialize
from dfp_deploy.core.atomic import write_text_atomic
from dfp_deploy.core.env import gpu_models
from dfp_deploy.core.errors import BackendUnavailable, ExportError, InputError


class TensorRTBackend:
    """`tensorrt`: strongly typed TensorRT plans (fp32, fp16 graph, int8 Q/DQ) timed with CUDA events."""

    name = NAME

    def __init__(self, *, opt_level: int = DEFAULT_OPT_LEVEL, workspace_mb: int | None = None,
                 timing_cache_dir: Path | None = None, cuda_graph: bool = True, allow_tf32: bool = False,
                 engine_cache_dir: Path | None = None):
        self.opt_level = opt_level
        self.workspace_mb = workspace_mb
        self.timing_cache_dir = timing_cache_dir
        self.engine_cache_dir = engine_cache_dir  # None: every build searches tactics anew (cache.py)
        self.cuda_graph = cuda_graph
        self.allow_tf32 = allow_tf32

    def _unavailable(self) -> tuple[str | None, str | None]:
        """(reason or None, tensorrt version or None); CUDA is only asked about once tensorrt imports."""
        try:
            trt = import_tensorrt()
        except BackendUnavailable as e:
            return str(e), None
        return cuda_unavailable_reason(), getattr(trt, "__version__", None)

    def info(self) -> BackendInfo:
        reason, version = self._unavailable()
        gpus = gpu_models()
        device = gpus[0] if gpus else "cuda"
        if reason is not None:
            return BackendInfo(self.name, False, version, reason, device)
        return BackendInfo(self.name, True, version, f"TensorRT {version}: strongly typed plans (fp32, fp16, int8 "
                                                     "Q/DQ), CUDA-event timing", device)

    def build(self, onnx_path: Path, *, precision: str, threads: int | None, out_dir: Path,
              torch_model=None) -> TensorRTEngine:
        """Build `<onnx stem>.<precision>.plan` (and its `.layers.json`) in `out_dir`; threads and torch_model unused.

        The ONNX must already compute in `precision` (build.py): fp16 and int8 graphs come from the export passes.
        """
        check_threads(threads)
        check_precision(self.name, precision, ("fp32", "fp16", "int8"), {})
        settings = builder_settings(precision, self.opt_level, self.workspace_mb, allow_tf32=self.allow_tf32)
        reason, _ = self._unavailable()
        if reason is not None:
            raise BackendUnavailable(f"{self.name}: {reason}")
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise InputError(f"{self.name}: ONNX file {onnx_path} does not exist")
        import onnx  # lazy: keeps `import dfp_deploy` light

        prepared = prepare_onnx(onnx.load(str(onnx_path)), settings)
        trt = import_tensorrt()
        cache_path = device_timing_cache_path(trt, self.timing_cache_dir)
        plan, notes, reused = cached_build(trt, prepared, settings, cache_path, self.engine_cache_dir, onnx_path.name)
        try:
            runtime, engine = deserialize(trt, plan, onnx_path.name)
        except ExportError:
            if reused is None:
                raise
            # a stored plan this runtime cannot read (a damaged file): build it anew
            forget_plan(self.engine_cache_dir, reused)
            plan, notes, reused = cached_build(trt, prepared, settings, cache_path, self.engine_cache_dir,
                                               onnx_path.name)
            runtime, engine = deserialize(trt, plan, onnx_path.name)
        if reused is not None:
            notes.append(f"plan reused from the engine cache ({self.engine_cache_dir}/{reused[:12]}...)")
        path = plan_path(out_dir, onnx_path.stem, precision)
        write_bytes_durably(path, plan)
        layers, summary, layer_json = engine_layers(trt, engine, prepared.int8_nodes if settings["requires_qdq"]
                                                    else None)
        write_text_atomic(path.with_suffix(".layers.json"), layer_json)
        return TensorRTEngine(trt, engine, precision=precision, plan_path=path, layers=layers,
                              layer_summary=summary, settings=settings, timing_cache=cache_path, notes=notes,
                              cuda_graph=self.cuda_graph, keepalive=(runtime,))
