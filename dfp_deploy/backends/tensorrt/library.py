"""The TensorRT library itself: importing it, asking whether CUDA is there, and the one process-wide logger.

The only module of dfp_deploy that imports `tensorrt`; the others receive the imported module as `trt`.

TensorRT keeps ONE logger per process: the first Builder/Runtime's logger is the one every later Builder, Runtime
and parser logs to (the others are ignored), and TensorRT keeps pointing at it. So the logger is created once,
lives as long as the module, and each build collects its own errors by holding _LOG_LOCK around a fresh list in
_current_errors; the builder's worker threads log to the same list because it is a lock-held global, not
thread-local state.
"""

from __future__ import annotations

import contextlib
import threading

from dfp_deploy.core.errors import BackendUnavailable

NOT_INSTALLED = "tensorrt Python package not installed (pip install tensorrt; needs an NVIDIA GPU)"
NO_GPU = "no CUDA GPU visible"


def import_tensorrt():
    """The tensorrt module, or BackendUnavailable saying why it cannot be used."""
    try:
        import tensorrt
    except ModuleNotFoundError as e:
        raise BackendUnavailable(NOT_INSTALLED) from e
    except Exception as e:  # a broken install (missing libnvinfer, CUDA mismatch) is unavailable, not a crash
        raise BackendUnavailable(f"tensorrt failed to import: {type(e).__name__}: {e}") from e
    if getattr(tensorrt, "__file__", None) is None or not hasattr(tensorrt, "Builder"):
        # tensorrt-stubs alone leaves a tensorrt/ folder of .pyi files, which imports as an empty namespace package
        raise BackendUnavailable(f"{NOT_INSTALLED}; only an empty 'tensorrt' namespace (type stubs?) is importable")
    return tensorrt


def cuda_unavailable_reason() -> str | None:
    import torch  # buffers and streams are torch CUDA objects (no pycuda); is_available() creates no context

    if torch.version.cuda is None:
        return f"{NO_GPU}: this torch build ({torch.__version__}) has no CUDA support, which the buffers need"
    if not torch.cuda.is_available():
        return NO_GPU
    return None


_PROCESS_LOGGER: tuple | None = None  # (the tensorrt module it was made for, the logger)
_LOG_LOCK = threading.RLock()
_current_errors: list[str] | None = None


def process_logger(trt):
    """The process-wide trt.ILogger: keeps ERROR/INTERNAL_ERROR messages for the build that holds the lock."""
    global _PROCESS_LOGGER
    with _LOG_LOCK:
        if _PROCESS_LOGGER is not None and _PROCESS_LOGGER[0] is trt:
            return _PROCESS_LOGGER[1]

        class CollectingLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    errors = _current_errors
                    if errors is not None:
                        errors.append(str(msg).strip())

        _PROCESS_LOGGER = (trt, CollectingLogger())
        return _PROCESS_LOGGER[1]


@contextlib.contextmanager
def collected_errors():
    """A fresh list that receives the errors TensorRT logs until the block ends (one build at a time)."""
    global _current_errors
    with _LOG_LOCK:
        previous, _current_errors = _current_errors, []
        try:
            yield _current_errors
        finally:
            _current_errors = previous
