"""Turn a model name (built-in, `torchvision:<name>` or `package.module:factory`) plus weights into a LoadedModel.

The factory form executes code: it imports `package.module` (running its top level) and calls `factory(**kwargs)`
with the recipe's model.kwargs, under `inspect` as under `build`. Standard-library modules are refused before the
import, and only an nn.Module subclass or a plain Python function is called, so a recipe cannot name `os:system`
or `subprocess:run`; but any other importable module can run what it likes on import, so a recipe from someone
else is code from them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import sys
import sysconfig
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dfp_deploy.core.errors import InputError
from dfp_deploy.core.outputs import flatten
from dfp_deploy.core.types import Preprocess
from dfp_deploy.models.cifar_resnet import cifar_resnet
from dfp_deploy.models.efficientnet_lite import LITE_VARIANTS, efficientnet_lite
from dfp_deploy.models.weights import load_weights

IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# torchvision's ImageNet evaluation: resize the short side to 256, centre crop 224
IMAGENET_PREPROCESS = Preprocess(size=224, mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255, resize=256)
TORCHVISION_PREFIX = "torchvision:"
FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
CIFAR_DEPTHS = (20, 32, 44, 56)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the pipeline: eval mode, CPU, float32, with how it wants its images."""

    module: nn.Module
    name: str
    input_shape: tuple[int, int, int]  # (C, H, W) of one image
    preprocess: Preprocess
    num_classes: int | None  # None: the model returns several outputs (core/outputs.py), not one [N, classes]
    weights: str | None  # the weights file actually loaded; None = random init


@dataclass(frozen=True)
class _Builtin:
    """How to build one built-in: `build(kwargs, (H, W))`, its native input and preprocessing."""

    build: Callable[[dict, tuple[int, int]], nn.Module]
    input_shape: tuple[int, int, int]
    preprocess: Preprocess
    num_classes: int
    accepted_kwargs: tuple[str, ...]


def _cifar_builtin(depth: int) -> _Builtin:
    def build(kwargs: dict, hw: tuple[int, int]) -> nn.Module:
        return cifar_resnet(depth, **kwargs)

    preprocess = Preprocess(size=32, mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255, resize=None)
    return _Builtin(build, (3, 32, 32), preprocess, 10, ("num_classes",))


def _lite_builtin(variant: int) -> _Builtin:
    def build(kwargs: dict, hw: tuple[int, int]) -> nn.Module:
        return efficientnet_lite(variant, image_size=hw, **kwargs)

    size = LITE_VARIANTS[variant][2]
    # TF Lite models were trained on (pixel - 127) / 128; validation images are centre-cropped, not resized
    preprocess = Preprocess(size=size, mean=(127.0,) * 3, std=(128.0,) * 3, resize=None)
    return _Builtin(build, (3, size, size), preprocess, 1000, ("num_classes", "dropout"))


_BUILTINS: dict[str, _Builtin] = {
    **{f"cifar_resnet{d}": _cifar_builtin(d) for d in CIFAR_DEPTHS},
    **{f"efficientnet_lite{v}": _lite_builtin(v) for v in sorted(LITE_VARIANTS)},
}


def available_models() -> list[str]:
    """Names of the built-in models (the other forms are `torchvision:<name>` and `package.module:factory`)."""
    return sorted(_BUILTINS)


def load_model(
    name: str,
    weights: str | None = None,
    *,
    kwargs: dict | None = None,
    input_shape: tuple[int, int, int] | None = None,
    preprocess: Preprocess | None = None,
    resize: int | None = None,
) -> LoadedModel:
    """Build model `name`, load `weights` strictly (None = random init), and return it in eval mode on CPU.

    `kwargs` go to the model's constructor/factory; `input_shape` (C, H, W) and `preprocess` override the defaults;
    `resize` (recipe advanced.model.resize) replaces the preprocessing's short-side resize.
    """
    kwargs = _check_kwargs(kwargs)
    input_shape = _check_input_shape(input_shape)
    if preprocess is not None and not isinstance(preprocess, Preprocess):
        raise InputError(f"preprocess must be a Preprocess, got {type(preprocess).__name__}")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
        raise InputError(f"advanced.model.resize: expected a positive number of pixels, got {resize!r}")
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"model name must be a non-empty string, got {name!r}: {_forms_hint()}")
    name = name.strip()

    if name in _BUILTINS:
        module, shape, default_pre, num_classes = _build_builtin(name, kwargs, input_shape)
    elif name.startswith(TORCHVISION_PREFIX):
        module, shape, default_pre = _build_torchvision(name[len(TORCHVISION_PREFIX):], kwargs, input_shape)
        num_classes = None
    elif ":" in name:
        module, shape, default_pre = _build_factory(name, kwargs, input_shape)
        num_classes = None
    else:
        raise InputError(f"unknown model {name!r}{_did_you_mean(name)}: {_forms_hint()}")

    loaded_from = None
    if weights is not None:
        loaded_from = str(load_weights(module, weights))
    module = module.to(device="cpu", dtype=torch.float32).eval()
    if name not in _BUILTINS:
        drop_auxiliary_heads(module)
    if num_classes is None:
        num_classes = _infer_num_classes(module, shape, name)
    if preprocess is None:
        preprocess = _adapt_preprocess(default_pre, shape)
    if resize is not None:
        preprocess = _with_resize(preprocess, resize, name)
    return LoadedModel(module, name, shape, preprocess, num_classes, loaded_from)


def drop_auxiliary_heads(module: nn.Module) -> list[str]:
    """Remove training-only auxiliary classifiers (torchvision's GoogLeNet `aux1`/`aux2`, Inception v3's
    `AuxLogits`) and return their names.

    They never run in eval mode, so the channel analysis never sees them: pruning would shrink the tensors they read
    and leave them at the old width, and the pruned model would fail in train mode. The convention is torchvision's:
    a boolean `aux_logits` attribute and children named aux*; the forward skips an aux child that is None. Called
    after the weights are loaded, so a checkpoint that holds the heads still loads strictly.
    """
    dropped = []
    for owner in module.modules():
        if getattr(owner, "aux_logits", None) is not True:
            continue
        for child, sub in list(owner.named_children()):
            if child.lower().startswith("aux") and sub is not None:
                setattr(owner, child, None)
                dropped.append(child)
        owner.aux_logits = False
    return dropped


def _forms_hint() -> str:
    return (
        f"use a built-in ({', '.join(available_models())}), 'torchvision:<name>' (e.g. torchvision:resnet18) "
        "or 'package.module:factory'"
    )


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, available_models(), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _check_kwargs(kwargs: dict | None) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise InputError(f"model kwargs must be a mapping of names to values, got {kwargs!r}")
    return dict(kwargs)


def _check_input_shape(shape) -> tuple[int, int, int] | None:
    if shape is None:
        return None
    ok = (
        isinstance(shape, (tuple, list))
        and len(shape) == 3
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    )
    if not ok:
        raise InputError(f"model.input_size: expected three positive ints [C, H, W], got {shape!r}")
    return tuple(shape)


def _with_resize(pre: Preprocess, resize: int, name: str) -> Preprocess:
    if resize < pre.size:
        raise InputError(f"advanced.model.resize: {resize} is smaller than the {pre.size}x{pre.size} input of {name}: "
                         f"the short side is resized to advanced.model.resize and the centre {pre.size}x{pre.size} cut "
                         f"from it, so it must be at least {pre.size}")
    return dataclasses.replace(pre, resize=resize)


def _adapt_preprocess(pre: Preprocess, shape: tuple[int, int, int]) -> Preprocess:
    """The default preprocessing adapted to the input size: crop = H, and a resize scaled alike."""
    if shape[1] != shape[2]:
        raise InputError(f"model.input_size: {list(shape)} is not square; images are centre-cropped to a square, so "
                         "give H = W")
    if shape[1] == pre.size:
        return pre
    resize = None if pre.resize is None else round(shape[1] * pre.resize / pre.size)
    return dataclasses.replace(pre, size=shape[1], resize=resize)


def _build_builtin(name: str, kwargs: dict, input_shape):
    spec = _BUILTINS[name]
    unknown = sorted(set(kwargs) - set(spec.accepted_kwargs))
    if unknown:
        raise InputError(
            f"model {name} does not accept kwargs {unknown}: accepted are {list(spec.accepted_kwargs)}"
        )
    shape = input_shape or spec.input_shape
    if shape[0] != 3:
        raise InputError(f"model.input_size: model {name} takes 3-channel RGB input, but {list(shape)} has "
                         f"{shape[0]} channels")
    module = spec.build(kwargs, (shape[1], shape[2]))
    return module, shape, spec.preprocess, kwargs.get("num_classes", spec.num_classes)


def _build_torchvision(arch: str, kwargs: dict, input_shape):
    try:
        import torchvision  # noqa: F401  (optional dependency, imported only when asked for)
        from torchvision import models as tv_models
    except ImportError as exc:
        raise InputError("torchvision is not installed: pip install 'dfp-deploy[torchvision]'") from exc
    available = tv_models.list_models(module=tv_models)
    if arch not in available:
        close = difflib.get_close_matches(arch, available, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise InputError(f"torchvision has no classification model {arch!r}{hint}")
    if "weights" in kwargs:
        raise InputError("torchvision weights are not downloaded: pass a checkpoint file as model.weights instead")
    try:
        module = tv_models.get_model(arch, weights=None, **kwargs)
    except TypeError as exc:
        raise InputError(f"torchvision model {arch} rejected kwargs {sorted(kwargs)}: {exc}") from exc
    shape = input_shape or (3, 224, 224)
    return module, shape, IMAGENET_PREPROCESS


def _resolve_factory(spec: str) -> Callable:
    if not FACTORY_PATTERN.match(spec):
        raise InputError(f"model {spec!r} is not of the form 'package.module:factory': {_forms_hint()}")
    module_name, attr_path = spec.split(":")
    if module_name.split(".")[0] in sys.stdlib_module_names:
        # refused before the import: importing runs a module's top level (antigravity opens a browser)
        raise InputError(f"model {spec}: {module_name} is Python's standard library, which holds no model "
                         "factories; name your own package's module")
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"model {spec}: cannot import module {module_name!r} ({exc})") from exc
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise InputError(f"model {spec}: module {module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise InputError(f"model {spec}: {attr_path!r} is not callable")
    _check_factory(spec, target)
    return target


def _check_factory(spec: str, target) -> None:
    """Refuse, before calling it, anything that is not an nn.Module subclass or a Python function defined outside
    the standard library: builtins (os.system), classes that are not models, stdlib functions (subprocess.run,
    os.popen, shutil.rmtree) are never model factories, and calling them is how a recipe would run a command."""
    if inspect.isclass(target):
        if not issubclass(target, nn.Module):
            raise InputError(f"model {spec}: {target.__qualname__} is a class but not a torch.nn.Module subclass; "
                             "name a model class or a function returning one")
        return
    if not inspect.isfunction(target):
        kind = "a builtin" if inspect.isbuiltin(target) else f"a {type(target).__name__}"
        raise InputError(f"model {spec}: {kind}, not a Python function or nn.Module class; the factory form calls "
                         "a function returning a torch.nn.Module")
    if _is_stdlib(inspect.getmodule(target)):
        raise InputError(f"model {spec}: a function of Python's standard library, not a model factory; name a "
                         "function of your own package that returns a torch.nn.Module")


def _is_stdlib(module) -> bool:
    name = getattr(module, "__name__", "") or ""
    if name.split(".")[0] in sys.stdlib_module_names:
        return True
    path = getattr(module, "__file__", None)
    if not path:
        return False
    stdlib = sysconfig.get_paths()["stdlib"]
    resolved = str(_real(path))
    return resolved.startswith(str(_real(stdlib))) and "site-packages" not in resolved


def _real(path: str):
    from pathlib import Path

    return Path(path).resolve()


def _build_factory(spec: str, kwargs: dict, input_shape):
    factory = _resolve_factory(spec)
    try:
        module = factory(**kwargs)
    except TypeError as exc:
        raise InputError(f"model {spec}: factory rejected kwargs {sorted(kwargs)} ({exc})") from exc
    except Exception as exc:  # user code: its failure is the recipe's model, not a dfp-deploy bug
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(f"model {spec}: the factory failed ({type(exc).__name__}: {first})") from exc
    if not isinstance(module, nn.Module):
        raise InputError(f"model {spec}: factory returned {type(module).__name__}, expected a torch.nn.Module")
    shape = input_shape or (3, 224, 224)
    return module, shape, IMAGENET_PREPROCESS


def _infer_num_classes(module: nn.Module, shape: tuple[int, int, int], name: str) -> int | None:
    """Run one zero image through the (eval-mode) model: the logits' last dimension is the class count; None for a
    model that returns something else (a tuple or dict of tensors: detectors, multi-head nets; a dense map), which
    only a user-supplied eval.metric can score."""
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, *shape))
    except Exception as exc:  # user code: any failure here means the declared input shape does not fit
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(
            f"model {name} fails on an input of shape (1, {', '.join(map(str, shape))}): {first}; "
            "set model.input_size [C, H, W] to what the model expects"
        ) from exc
    flatten(out, f"model {name}")  # refuses what cannot be exported (None, strings, empty containers)
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None
