"""Run a model in inference mode without changing the caller's train/eval flags."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the body (BN uses running statistics and never updates them, no dropout); every module's
    previous `training` flag is restored afterwards, even on error."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in flags.items():
            m.training = was_training
