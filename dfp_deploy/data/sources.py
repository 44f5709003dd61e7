"""The unlabeled inputs a stage asks for, from an image file or generated data-free, normalised for the model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from dfp_deploy.core.errors import DataError, InputError
from dfp_deploy.data.images import load_images, to_tensor
from dfp_deploy.data.synthetic import bn_matched_inputs

SYNTHETIC = "synthetic"


def load_calibration_inputs(data: str, samples: int, *, model: nn.Module, preprocess, input_shape: tuple[int, ...],
                            seed: int = 0, synthetic_steps: int = 200, cache_dir=None,
                            what: str = "compress.calibration", samples_key: str = "samples",
                            progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Inputs for `compress.calibration.data` (or the section named by `what`): an .npz of images (a seeded random
    subset of `samples` images, drawn without replacement; labels, if any, are ignored) or "synthetic" (BN-matched
    generated inputs, data/synthetic.py, so the mode stays data-free). Returns float32 [samples, *input_shape],
    normalised. `samples_key` names the section's key for the count in errors; `progress(done, total)` follows the
    generation of synthetic inputs."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"{what}.{samples_key}: {samples!r} must be an integer >= 1, e.g. 256")
    if data == SYNTHETIC:
        return bn_matched_inputs(model, tuple(input_shape), samples, steps=synthetic_steps, seed=seed,
                                 batch_size=min(samples, 64), cache_dir=cache_dir, progress=progress)
    images, _ = load_images(data, preprocess, limit=None, require_labels=False)
    if samples > len(images):
        raise DataError(f"{what}.{samples_key}: {samples} images asked for, but {data} has only "
                        f"{len(images)}; lower samples or give a bigger file")
    chosen = np.sort(np.random.default_rng(seed).choice(len(images), samples, replace=False))
    return torch.from_numpy(to_tensor(images[chosen], preprocess))
