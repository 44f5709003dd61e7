"""Name what a model returns: one tensor (`logits`), or a tuple/list/dict of tensors flattened into named outputs.

One naming serves every stage, so the ONNX graph's outputs, the engines' results and the report's per-output parity
all use the same names:
  a tensor                      -> "logits"            (the single-output contract, unchanged)
  a tuple or list, element i    -> "output_<i>"
  a dict, value under key k     -> "<k>"
  nested containers             -> the names joined by "." ("output_0.boxes", "head.1")
The order is the order the exporters flatten outputs in: tuple order, dict insertion order, depth first.

An engine's `run(x)` returns an array for a single-output model and a {name: array} dict for several; `as_named`
turns either into the dict.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from dfp_deploy.core.errors import InputError

SINGLE_OUTPUT = "logits"
MAX_NAME = 200


def flatten(out, what: str = "the model") -> list[tuple[str, torch.Tensor]]:
    """[(name, tensor)] of a model's output (module docstring); InputError for anything but tensors in
    tuples/lists/dicts with string keys."""
    if isinstance(out, torch.Tensor):
        return [(SINGLE_OUTPUT, out)]
    if not isinstance(out, (tuple, list, Mapping)) or not out:
        raise InputError(f"{what} returns {_kind(out)}; dfp-deploy needs a tensor, or a tuple, list or dict of "
                         "tensors")
    pairs: list[tuple[str, torch.Tensor]] = []
    _walk(out, "", pairs, what)
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise InputError(f"{what} returns outputs whose names collide ({', '.join(names)}); use distinct dict keys")
    return pairs


def _walk(node, prefix: str, pairs: list, what: str) -> None:
    if isinstance(node, torch.Tensor):
        pairs.append((prefix, node))
        return
    if isinstance(node, Mapping):
        items = []
        for key, value in node.items():
            if not isinstance(key, str) or not key or len(key) > MAX_NAME or not key.isprintable() or "." in key:
                raise InputError(f"{what} returns a dict with key {key!r}{_at(prefix)}; output dict keys must be "
                                 f"non-empty printable strings without '.' (they name the ONNX outputs)")
            items.append((key, value))
    elif isinstance(node, (tuple, list)):
        items = [(f"output_{i}" if not prefix else str(i), value) for i, value in enumerate(node)]
    else:
        raise InputError(f"{what} returns {_kind(node)}{_at(prefix)}; every output must be a tensor "
                         "(drop non-tensor values from forward's result)")
    if not items:
        raise InputError(f"{what} returns an empty {type(node).__name__}{_at(prefix)}; every output must be a tensor")
    for name, value in items:
        _walk(value, f"{prefix}.{name}" if prefix else name, pairs, what)


def _at(prefix: str) -> str:
    return f" at output {prefix!r}" if prefix else ""


def _kind(value) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def output_names(out, what: str = "the model") -> list[str]:
    """The names `flatten` gives `out`'s tensors, in order."""
    return [name for name, _ in flatten(out, what)]


def to_numpy(out, what: str = "the model"):
    """A model's output as an engine returns it: the array for one tensor, else a {name: array} dict."""
    pairs = flatten(out, what)
    if len(pairs) == 1 and pairs[0][0] == SINGLE_OUTPUT:
        return pairs[0][1].detach().float().cpu().numpy()
    return {name: t.detach().float().cpu().numpy() for name, t in pairs}


def as_named(result) -> dict[str, np.ndarray]:
    """An engine's result as {name: array}: a single array is the "logits" output."""
    if isinstance(result, Mapping):
        return dict(result)
    return {SINGLE_OUTPUT: result}


def from_named(named: Mapping[str, np.ndarray]):
    """The inverse of as_named: a lone "logits" output back to its array."""
    if len(named) == 1 and SINGLE_OUTPUT in named:
        return named[SINGLE_OUTPUT]
    return dict(named)


def concat(results: list):
    """Concatenate engine results of consecutive batches along the batch axis, output by output."""
    named = [as_named(r) for r in results]
    names = list(named[0])
    return from_named({n: np.concatenate([np.asarray(r[n]) for r in named]) for n in names})


def take(result, stop: int):
    """The first `stop` rows of every output (drops the padding of a static-batch chunk)."""
    return from_named({n: np.asarray(a)[:stop] for n, a in as_named(result).items()})
