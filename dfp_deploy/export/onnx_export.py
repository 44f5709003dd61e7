"""Export a PyTorch CNN to one validated ONNX file (one input; one output, or several named by core/outputs.py).

Exporter choice (torch 2.13). Both exporters were tried on the CNN patterns this project meets: a Conv2d
subclass calling F.pad inside forward, a parameter-free channel-padding shortcut (x[:, :, ::2, ::2] then F.pad
on the channel axis), residual adds, ReLU/ReLU6, BatchNorm, adaptive average pooling and a Linear head.

- The default torch.export-based exporter ("dynamo") traces through ordinary Python, then runs the onnxscript
  optimizer. Its graph is clean: BatchNorm folded into the preceding Conv, F.pad before a Conv merged into
  the Conv's `pads`, one Pad for the channel shortcut, Relu/Clip/Add/Slice/ReduceMean/Reshape/Gemm, all
  constants as initializers. Dynamic batch is a named symbolic dim (torch.export.Dim("batch")).
- The legacy TorchScript exporter (dynamo=False) still works in 2.13 (deprecated, warns) but turns every
  F.pad into a ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast subgraph feeding a Pad, with ~25 Constant
  nodes on a four-conv model; later graph passes and TensorRT would have to clean that up.

So the dynamo exporter is used. Two cases fall back to the TorchScript exporter, recorded in
`ExportResult.exporter`: opset 17, which the dynamo exporter cannot produce (its translations start at opset
18 and the down-converter has no Pad adapter, in which case it silently keeps opset 18), and a model that
torch.export cannot capture (data-dependent control flow), where tracing is the more forgiving of the two.

A dynamo export is made in two steps: the unoptimised graph (its initializers named like the state dict), then
the weights substituted and the onnxscript optimizer run, as torch itself does after capture. With a cache folder
the unoptimised graph is kept as a template (export_cache.py), so a model of the same structure with other weights
is derived from it without tracing again; without one the two steps run back to back. Either way one path makes
every dynamo export, and the BN-kept copy the int8 ranges read names its tensors exactly as the fp32 graph does.

The file is exported to a hidden temp name, validated (checker + strict shape inference), checked for
a single input, outputs named as core/outputs.py names the model's tensor/tuple/dict result, and the requested
opset, and only then renamed into place. An interrupt is never
mistaken for a capture failure (core/interrupts.py): it stops the export instead of triggering the fallback.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from dfp_deploy.core import interrupts
from dfp_deploy.core.atomic import atomic_path
from dfp_deploy.core.errors import ExportError, InputError
from dfp_deploy.core.modes import eval_mode
from dfp_deploy.core.outputs import SINGLE_OUTPUT, output_names
from dfp_deploy.export import export_cache
from dfp_deploy.export.validate import one_line, validate_onnx

MIN_OPSET = 17  # project floor; per-channel Q/DQ (the axis attribute) itself needs only 13
DYNAMO_MIN_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = SINGLE_OUTPUT
BATCH_DIM = "batch"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    opset: int
    dynamic_batch: bool
    input_name: str
    output_name: str
    nodes: int
    op_counts: dict[str, int] = field(hash=False)
    exporter: str = "dynamo"  # "dynamo" or "torchscript" (see module docstring for when)
    output_names: tuple[str, ...] = ()  # every output, in order; output_name is the first


def max_opset() -> int:
    torch_max = getattr(getattr(torch.onnx, "_constants", None), "ONNX_MAX_OPSET", 23)
    return min(torch_max, onnx.defs.onnx_opset_version())


def _check_arguments(model, example_input, opset) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(f"export: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise InputError("export: example_input must be a batched torch.Tensor (N, C, H, W)")
    top = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise InputError(f"advanced.export.opset: {opset!r} is not an integer in [{MIN_OPSET}, {top}]")


@contextlib.contextmanager
def _quiet_exporter():
    # the exporters' deprecation notices and "torchvision is not installed" log lines are noise for our users;
    # UserWarnings (e.g. TracerWarning about specialised shapes) stay visible because they can matter
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            # the TorchScript exporter's note that strided Slices are not constant-folded (they run fine)
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            yield
    finally:
        registration.setLevel(level)


_TORCHLIB_REGISTRIES: dict = {}  # opset -> the registry torch built for it, reused by later exports


@contextlib.contextmanager
def _reused_torchlib_registry():
    """torch builds its ATen-to-ONNX registry from torchlib anew on every export (about 0.3 s, a quarter of a small
    model's export, the same for every model). Only custom translation tables change a registry, and this project
    passes none, so within this context one registry per opset serves every export. Where torch no longer has the
    hook, exports build their own as before."""
    try:
        from torch.onnx._internal.exporter import _registration

        registry_class = _registration.ONNXRegistry
        build = registry_class.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def reused(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _TORCHLIB_REGISTRIES:
            _TORCHLIB_REGISTRIES[key] = build.__func__(cls, *args, **kwargs)
        return _TORCHLIB_REGISTRIES[key]

    registry_class.from_torchlib = classmethod(reused)
    try:
        yield
    finally:
        registry_class.from_torchlib = build


def _export_dynamo(model, x, temp: Path, dynamic_batch: bool, opset: int, optimize: bool = True,
                   names: list[str] = (OUTPUT_NAME,)) -> None:
    shapes = ({0: torch.export.Dim(BATCH_DIM)},) if dynamic_batch else None
    with _reused_torchlib_registry():
        torch.onnx.export(model, (x,), str(temp), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=list(names), dynamic_shapes=shapes, external_data=False, optimize=optimize,
                          verbose=False, report=False)


def _export_torchscript(model, x, temp: Path, dynamic_batch: bool, opset: int,
                        names: list[str] = (OUTPUT_NAME,)) -> None:
    axes = {name: {0: BATCH_DIM} for name in (INPUT_NAME, *names)} if dynamic_batch else None
    torch.onnx.export(model, (x,), str(temp), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                      output_names=list(names), dynamic_axes=axes, do_constant_folding=True, verbose=False)


def _run_exporter(model, x, temp: Path, dynamic_batch: bool, opset: int, optimize: bool = True,
                  names: list[str] = (OUTPUT_NAME,)) -> str:
    """Export to `temp` with outputs `names`; return the name of the exporter that succeeded."""
    name = type(model).__name__
    torchscript_max = getattr(getattr(torch.onnx, "_constants", None), "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
    with _quiet_exporter(), torch.no_grad():
        if opset < DYNAMO_MIN_OPSET:
            try:
                _export_torchscript(model, x, temp, dynamic_batch, opset, names)
            except Exception as e:
                interrupts.raise_if_received(e)
                raise ExportError(f"ONNX export of {name} at opset {opset} failed: {one_line(e)}") from e
            return "torchscript"
        try:
            _export_dynamo(model, x, temp, dynamic_batch, opset, optimize, names)
            return "dynamo"
        except Exception as dynamo_error:
            # torch can turn a Ctrl-C during capture into a capture error: that is the user stopping the build,
            # not a model the TorchScript exporter should retry
            interrupts.raise_if_received(dynamo_error)
            if opset > torchscript_max:
                raise ExportError(f"ONNX export of {name} failed: {one_line(dynamo_error)}") from dynamo_error
            logging.getLogger(__name__).warning("torch.export could not capture %s (%s); falling back to the "
                                                "TorchScript exporter", name, one_line(dynamo_error))
            temp.unlink(missing_ok=True)
            try:
                _export_torchscript(model, x, temp, dynamic_batch, opset, names)
            except Exception as e:
                interrupts.raise_if_received(e)
                raise ExportError(f"ONNX export of {name} failed: dynamo: {one_line(dynamo_error, 150)}; "
                                  f"torchscript: {one_line(e, 150)}") from e
            return "torchscript"


def _optimizer():
    """torch's own post-capture optimizer (the onnxscript API its exporter calls), or None where this torch does not
    expose it: then every export runs the exporter with the optimize flag, as a plain torch.onnx.export does."""
    try:
        from torch.onnx._internal._lazy_import import onnxscript_apis

        return onnxscript_apis.optimize
    except (ImportError, AttributeError):
        return None


def _substitute_weights(graph_model: onnx.ModelProto, model: nn.Module) -> bool:
    """Put `model`'s parameter and buffer values into the initializers named like them; False (nothing trusted)
    when a name's shape or dtype differs from the template's."""
    from onnx import numpy_helper

    state = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    for init in graph_model.graph.initializer:
        tensor = state.get(init.name)
        if tensor is None:
            continue  # a constant of the computation itself (the structure key holds it)
        new = numpy_helper.from_array(tensor.detach().cpu().contiguous().numpy(), init.name)
        if list(new.dims) != list(init.dims) or new.data_type != init.data_type:
            return False
        for typed in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            init.ClearField(typed)
        init.raw_data = new.raw_data
    return True


def _export_through_template(model, x, temp: Path, dynamic_batch: bool, opset: int, optimize: bool,
                             names: list[str], cache: Path | None) -> str:
    """Export to `temp` (see the module docstring: template, substitute, optimize); return the exporter's name."""
    optimizer = _optimizer()
    if opset < DYNAMO_MIN_OPSET or optimizer is None:
        return _run_exporter(model, x, temp, dynamic_batch, opset, optimize, names)
    key = template = None
    if cache is not None:
        key = export_cache.structure_key(model, x, opset=opset, dynamic_batch=dynamic_batch,
                                         exporter_source=Path(__file__))
        if export_cache.fetch(cache, key, temp) == "dynamo":
            with contextlib.suppress(Exception):  # a damaged template is only a miss
                template = onnx.load(str(temp))
            if template is not None and not _substitute_weights(template, model):
                template = None
    if template is None:
        exporter = _run_exporter(model, x, temp, dynamic_batch, opset, False, names)
        interrupts.raise_if_received()
        if exporter != "dynamo":
            return exporter  # the TorchScript fallback traces values in: no template, and it folds constants itself
        template = onnx.load(str(temp))
        if key is not None:
            export_cache.store(cache, key, temp, exporter)
    if optimize:
        import onnx_ir

        with _quiet_exporter():
            template = onnx_ir.to_proto(optimizer(onnx_ir.from_proto(template)))
        interrupts.raise_if_received()
    onnx.save(template, str(temp))
    return "dynamo"


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)


def _summarise(temp: Path, final: Path, opset: int, dynamic_batch: bool, exporter: str,
               names: list[str] = (OUTPUT_NAME,)) -> ExportResult:
    model = onnx.load(str(temp))
    graph = model.graph
    if len(graph.input) != 1:
        raise ExportError(f"export: the model has {len(graph.input)} inputs; dfp-deploy expects one image tensor in")
    got = [o.name for o in graph.output]
    if got != list(names):
        # parity and the engines pair outputs by name: an exporter that reordered or merged them must not pass
        raise ExportError(f"export: the ONNX outputs are {got}, expected {list(names)} (the model's outputs in "
                          "order)")
    produced = _default_opset(model)
    if produced != opset:
        raise ExportError(f"export: asked for opset {opset} but the {exporter} exporter produced opset {produced}")
    ops = collections.Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                              for n in graph.node)
    return ExportResult(path=final, opset=produced, dynamic_batch=dynamic_batch, input_name=graph.input[0].name,
                        output_name=graph.output[0].name, nodes=len(graph.node), op_counts=dict(ops),
                        exporter=exporter, output_names=tuple(got))


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path, *, dynamic_batch: bool = False,
                opset: int = 18, optimize: bool = True, cache: Path | None = None) -> ExportResult:
    """Export `model` at `example_input`'s shape (batch fixed unless dynamic_batch) to `path`, validated.

    optimize=False skips the onnxscript optimizer, so BatchNormalization nodes stay in the graph (with the same
    tensor names as the optimized export): the data-free activation ranges are read from them. With `cache` (a
    folder), an export of the same computation and settings is reused (export_cache.py); it is validated anew.
    """
    _check_arguments(model, example_input, opset)
    path = Path(path)
    with eval_mode(model), atomic_path(path) as temp:
        names = _output_names(model, example_input)
        key = exporter = None
        if cache is not None:
            key = export_cache.export_key(model, example_input, opset=opset, dynamic_batch=dynamic_batch,
                                          optimize=optimize, exporter_source=Path(__file__))
            exporter = export_cache.fetch(cache, key, temp)
        if exporter is None:
            exporter = _export_through_template(model, example_input, temp, dynamic_batch, opset, optimize, names,
                                                cache)
            # an interrupt lost inside the exporter (raised in a destructor, so only printed) still stops here
            interrupts.raise_if_received()
            if not temp.is_file():
                raise ExportError(f"ONNX export of {type(model).__name__} wrote no file")
            validate_onnx(temp)
            if key is not None:
                export_cache.store(cache, key, temp, exporter)
        else:
            validate_onnx(temp)
        result = _summarise(temp, path, opset, dynamic_batch, exporter, names)
    return result


def _output_names(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The ONNX output names: "logits" for one tensor, else tuple index / dict key (core/outputs.py)."""
    name = type(model).__name__
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        interrupts.raise_if_received(e)
        raise ExportError(f"ONNX export of {name} failed: {one_line(e)}") from e
    return output_names(out, f"model {name}")
