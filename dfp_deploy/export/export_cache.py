"""Content-addressed store of ONNX exports: the same module, input shape and export settings are exported once.

torch.export-based export is most of a build's time (about 10 s for EfficientNet-Lite0 on one core), and a build
exports the unchanged original model every time. The key covers everything the exporter's output depends on:
- the computation: every parameter and buffer (name, dtype, shape, bytes), every submodule's class, its plain
  attributes (strides, paddings, flags: anything a forward may read), tensors held as plain attributes (bytes:
  they become constants of the graph) and the source file that defines the class;
- the call: input shape and dtype, opset, dynamic batch, whether the onnxscript optimizer ran;
- the tools: torch, onnx and onnxscript versions and this project's exporter code.
A key that misses any of these could hand back a stale graph; a key that over-covers only costs a re-export.

Templates: the same model with other weights (another repair of the same plan, quantized weights, the BN-kept copy
int8 ranges are read from) traces to the same graph, since torch.export treats parameters and buffers as inputs and
never bakes their values in. `structure_key` is the export key without the parameter and buffer bytes; under it the
store keeps the unoptimised export, whose initializers carry the state-dict names, and onnx_export.py derives any
export of that structure from it by substituting the weights and running the optimizer (about 8 times faster than
exporting again).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from dfp_deploy.core.atomic import atomic_path

_PLAIN = (bool, int, float, str, type(None))


def _versions() -> str:
    found = []
    for dist in ("torch", "onnx", "onnxscript"):
        try:
            found.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist}=none")
    return ",".join(found)


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _source_digest(cls: type, seen: dict) -> str:
    if cls not in seen:
        try:
            seen[cls] = hashlib.sha256(Path(inspect.getsourcefile(cls)).read_bytes()).hexdigest()
        except (TypeError, OSError):
            seen[cls] = "no-source"  # a class defined interactively: keyed by its name and attributes only
    return seen[cls]


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _digest(model: nn.Module, example: torch.Tensor, settings: str, exporter_source: Path, weights: bool) -> str:
    h = hashlib.sha256()
    h.update(f"{_versions()}|{settings}|{tuple(example.shape)}|{example.dtype}".encode())
    h.update(Path(exporter_source).read_bytes())
    sources: dict = {}
    for name, module in model.named_modules():
        cls = type(module)
        attributes = sorted((k, repr(v)) for k, v in vars(module).items() if not k.startswith("_") and _plain(v))
        h.update(f"{name}|{cls.__module__}.{cls.__qualname__}|{_source_digest(cls, sources)}|{attributes}".encode())
        for k, v in sorted(vars(module).items()):  # an unregistered tensor is traced in as a constant, by value
            if isinstance(v, torch.Tensor) and not k.startswith("_"):
                h.update(f"t|{k}|{v.dtype}|{tuple(v.shape)}".encode() + _tensor_bytes(v))
    for kind, tensors in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, tensor in tensors:
            h.update(f"{kind}|{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            if weights:
                h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def export_key(model: nn.Module, example: torch.Tensor, *, opset: int, dynamic_batch: bool, optimize: bool,
               exporter_source: Path) -> str:
    """The key of one export: computation, weights, call and tools."""
    return _digest(model, example, f"{opset}|{dynamic_batch}|{optimize}", exporter_source, weights=True)


def structure_key(model: nn.Module, example: torch.Tensor, *, opset: int, dynamic_batch: bool,
                  exporter_source: Path) -> str:
    """The key of a template: the export key without the parameter and buffer values (their names, dtypes and
    shapes stay in it) and without the optimizer flag (a template is the unoptimised export)."""
    return "template-" + _digest(model, example, f"{opset}|{dynamic_batch}", exporter_source, weights=False)


def fetch(folder: Path, key: str, destination: Path) -> str | None:
    """Copy a stored export to `destination`; return the exporter that made it, or None when not stored."""
    onnx_file, meta = Path(folder) / f"{key}.onnx", Path(folder) / f"{key}.json"
    try:
        exporter = json.loads(meta.read_text())["exporter"]
        shutil.copyfile(onnx_file, destination)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or damaged: export again (the caller validates whatever it gets)
    return exporter


def store(folder: Path, key: str, exported: Path, exporter: str) -> None:
    """Keep a validated export; best effort (a full or read-only cache never fails a build)."""
    try:
        folder = Path(folder)
        with atomic_path(folder / f"{key}.onnx") as temp:
            shutil.copyfile(exported, temp)
        with atomic_path(folder / f"{key}.json") as temp:  # written last: its presence marks a complete entry
            temp.write_text(json.dumps({"exporter": exporter, "pid": os.getpid()}))
    except OSError:
        pass
