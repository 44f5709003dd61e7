"""Check that an ONNX model is well formed: the ONNX checker (full) and strict shape inference with data propagation.

Two independent checks, in this order, each reported by name when it fails:
1. `onnx.checker.check_model(full_check=True)`: graph structure (every node input is produced somewhere,
   topological order, known ops at the declared opset, attribute types) plus the checker's own shape pass;
2. `onnx.shape_inference.infer_shapes(strict_mode=True, data_prop=True)`: every node's output shape must be
   inferable from its inputs; data propagation also follows small shape tensors (Shape -> Slice -> Reshape), so a
   Reshape fed by a computed shape is checked too.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from dfp_deploy.core.errors import ExportError, InputError


def one_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's text, shortened: DfpError messages are one line."""
    for line in str(error).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(error).__name__


def _load(path_or_model) -> tuple[onnx.ModelProto, str]:
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model, "model"
    path = Path(path_or_model)
    if not path.is_file():
        raise InputError(f"ONNX file {path} does not exist; check the path")
    try:
        return onnx.load(str(path)), str(path)
    except Exception as e:  # protobuf raises its own DecodeError family
        raise ExportError(f"{path}: not a readable ONNX model ({one_line(e)})") from e


def validate_onnx(path_or_model) -> None:
    """Raise ExportError naming the failing check if the model (a path or a ModelProto) is not valid ONNX."""
    model, where = _load(path_or_model)
    try:
        # a path lets the checker handle models with external data; in-memory protos are checked directly
        onnx.checker.check_model(where if where != "model" else model, full_check=True)
    except Exception as e:
        raise ExportError(f"{where}: ONNX checker failed: {one_line(e)}") from e
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise ExportError(f"{where}: ONNX shape inference (strict, data_prop) failed: {one_line(e)}") from e
