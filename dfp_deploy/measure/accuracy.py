"""Top-1 accuracy of an engine on labelled images, fed in batches (zero-padding the tail for static-batch engines).

top1 = 100 * |{i : argmax_k logits[i, k] == y[i]}| / n. An engine with a static batch B gets every chunk as
exactly B images: the last chunk of n mod B images is padded with zero images and their outputs are dropped,
so padding never counts towards the score.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from dfp_deploy.core.errors import DataError, InputError
from dfp_deploy.core.outputs import concat, take


def _chunks(n: int, batch: int):
    for start in range(0, n, batch):
        yield start, min(start + batch, n)


def run_batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, *, batch: int, static_batch: bool,
                progress: bool = False) -> np.ndarray:
    """`run` over `x` in chunks of `batch`; returns the concatenated outputs for exactly the len(x) inputs (an array,
    or a {name: array} dict for a model with several outputs, core/outputs.py)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"target.batch: {batch!r} must be a positive integer")
    x = np.asarray(x, dtype=np.float32)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(x), desc="evaluating", unit="img", file=sys.stderr, leave=False,
                   disable=not sys.stderr.isatty())
    outputs = []
    try:
        for start, stop in _chunks(len(x), batch):
            chunk = x[start:stop]
            if static_batch and len(chunk) < batch:
                pad = np.zeros((batch - len(chunk), *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            outputs.append(take(run(chunk), stop - start))
            if bar:
                bar.update(stop - start)
    finally:
        if bar:
            bar.close()
    return concat(outputs)


def top1(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, *, batch: int, static_batch: bool,
         progress: bool = False) -> float:
    """Top-1 accuracy in percent of `run` (float32 NCHW batch -> logits) on images `x` with integer labels `y`."""
    y = np.asarray(y)
    if len(x) == 0:
        raise DataError("eval.data: no images to evaluate")
    if len(x) != len(y):
        raise DataError(f"eval.data: {len(x)} images but {len(y)} labels; they must pair one to one")
    logits = run_batched(run, x, batch=batch, static_batch=static_batch, progress=progress)
    if len(y) and (y.min() < 0 or y.max() >= logits.shape[1]):
        # a label no logit can match scores 0 % silently: refuse rather than report a meaningless accuracy
        raise DataError(f"eval.data: labels span [{int(y.min())}, {int(y.max())}] but the model has "
                        f"{logits.shape[1]} classes [0, {logits.shape[1]})")
    return float(100.0 * np.mean(logits.argmax(axis=1) == y))
