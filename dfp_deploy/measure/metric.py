"""A user-supplied evaluation metric (`eval.metric: package.module:function`): its call contract and checks.

    function(run, data) -> number | {name: number}

`run(images)` maps float32 images [N, C, H, W], preprocessed as the model expects, to the engine's outputs for
exactly those N images: an array for a model with one output, else a {output name: array} dict (core/outputs.py),
every array with N rows. Any N works: batching and the zero padding of a static-batch engine happen inside.
`data` is a dict: "images" (those float32 images, the first eval.limit of the file) and every other array of the
eval.data .npz under its own key, its first eval.limit rows where its length is the file's image count.
The metric is called once with the original model's engine and once with the compressed one, on the same read-only
arrays; what it returns must be a finite number or a non-empty dict of them (a bool is not a number).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping

import numpy as np

from dfp_deploy.core.errors import DfpError, InputError

KEY = "eval.metric"
TOP1 = "top1"


def check_result(spec: str, value) -> float | dict[str, float]:
    """`value` as a float or a {str: float} dict; InputError naming the metric otherwise."""
    def number(v) -> float | None:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Real, np.floating, np.integer)):
            if isinstance(v, np.ndarray) and v.shape == () and np.issubdtype(v.dtype, np.number):
                v = v.item()
            else:
                return None
        v = float(v)
        return v if math.isfinite(v) else None

    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            f = number(v)
            if not isinstance(k, str) or f is None:
                raise InputError(f"{KEY}: {spec} returned a dict with {k!r}: {_show(v)}; every key must be a string "
                                 "and every value a finite number")
            out[k] = f
        if not out:
            raise InputError(f"{KEY}: {spec} returned an empty dict; return a number or a dict of numbers")
        return out
    f = number(value)
    if f is None:
        raise InputError(f"{KEY}: {spec} returned {_show(value)}; return a finite number or a dict of numbers")
    return f


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}" if len(text) <= 60 else f"a {type(value).__name__}"


def evaluate(spec: str, function: Callable, run: Callable, data: dict) -> float | dict[str, float]:
    """function(run, data), checked; an exception in the user's metric becomes one line naming it (exit 2)."""
    try:
        value = function(run, data)
    except DfpError:
        raise  # ours, raised through the runner (e.g. a wrong input shape): already one line
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise InputError(f"{KEY}: {spec} raised {type(exc).__name__}" + (f": {first}" if first else "")) from exc
    return check_result(spec, value)


def eval_data(images: np.ndarray, arrays: Mapping[str, np.ndarray], count: int, start: int = 0) -> dict:
    """The `data` argument: the images and the file's other arrays, cut to the evaluated images where they pair
    (file images [start, start + len(images)), advanced.eval.start)."""
    n = len(images)
    data = {name: (a[start:start + n] if a.ndim and len(a) == count else a) for name, a in arrays.items()}
    data["images"] = images
    for a in data.values():
        # both engines must see the same data: a metric that edits it in place fails instead of skewing the second
        a.setflags(write=False)
    return data


def other_arrays(path) -> tuple[dict[str, np.ndarray], int]:
    """Every array of an eval .npz except the encoded images ('x', 'jpeg', 'offsets'), and the file's image count.
    The file was checked (CRC, layout) before the build started; pickled objects are never loaded."""
    with np.load(path, allow_pickle=False) as f:
        count = len(f["x"]) if "x" in f.files else len(f["offsets"]) - 1
        arrays = {k: f[k] for k in f.files if k not in ("x", "jpeg", "offsets")}
    return arrays, count
