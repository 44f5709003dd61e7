"""Parity of an engine against a reference (the PyTorch model): how far apart their logits are on the same inputs.

With reference logits R and engine logits E (n x k):
  max_abs_err  = max_ij |E_ij - R_ij|      (infinite if either side produced NaN/inf)
  mean_abs_err = mean_ij |E_ij - R_ij|
  top1_agreement = (1/n) * |{i : argmax_j E_ij == argmax_j R_ij}|   (a fraction in [0, 1])
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dfp_deploy.core.errors import ParityError


def parity(reference: Callable[[np.ndarray], np.ndarray], engine, inputs: np.ndarray) -> dict:
    """Compare `engine.run(inputs)` with `reference(inputs)`: {"max_abs_err", "mean_abs_err", "top1_agreement", "n"}.

    Also "nonfinite": how many engine or reference outputs were NaN or infinite (the errors are then infinite).
    """
    inputs = np.asarray(inputs, dtype=np.float32)
    expected = np.asarray(reference(inputs), dtype=np.float64)
    actual = np.asarray(engine.run(inputs), dtype=np.float64)
    if expected.shape != actual.shape:
        raise ParityError(f"parity: {getattr(engine, 'name', 'engine')} returned shape {actual.shape}, "
                          f"the reference {expected.shape}")
    nonfinite = int((~np.isfinite(expected)).sum() + (~np.isfinite(actual)).sum())
    diff = np.abs(actual - expected)
    if nonfinite:
        max_err = mean_err = float("inf")
    elif diff.size == 0:
        max_err = mean_err = 0.0
    else:
        max_err, mean_err = float(diff.max()), float(diff.mean())
    flat_e, flat_a = expected.reshape(len(expected), -1), actual.reshape(len(actual), -1)
    agreement = float(np.mean(flat_e.argmax(axis=1) == flat_a.argmax(axis=1))) if len(expected) else 1.0
    return {"max_abs_err": max_err, "mean_abs_err": mean_err, "top1_agreement": agreement, "n": int(len(inputs)),
            "nonfinite": nonfinite}
