"""Named unlabeled inputs (an image file or generated data-free), loaded once and shared by the stages naming them.

A build names at most three sets: "calibration" (two-phase calibration, channel statistics, int8 activation
ranges), "bn_adapt" (BatchNorm re-estimation) and "search" (the search's fidelity proxy). Each is an InputSpec;
InputSources loads each spec once, so stages that name the same set get the same tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dfp_deploy.core.errors import DataError, InputError
from dfp_deploy.data.images import load_images, to_tensor
from dfp_deploy.data.synthetic import bn_matched_inputs

SYNTHETIC = "synthetic"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class InputSpec:
    """One set of unlabeled inputs: where they come from, how many, and how they are drawn or generated."""

    source: str  # "synthetic" (BN-matched generated inputs, data-free) or an .npz of images
    samples: int
    steps: int  # optimisation steps when synthetic
    seed: int  # the subset drawn from a file, or the generator's start
    chunk: int | None  # synthetic: statistics matched per chunk of this many inputs (None: all at once)
    key: str  # the recipe section that names them (its `data` and `samples`), for error messages

    @property
    def synthetic(self) -> bool:
        return self.source == SYNTHETIC


class InputSources:
    """Loads each InputSpec once for one model. `progress(key)` gives the progress callback for generating the
    inputs named by a recipe section (None: silent)."""

    def __init__(self, model: nn.Module, preprocess, input_shape: tuple[int, ...], *, cache_dir: Path | None = None,
                 progress: Callable[[str], Progress | None] | None = None):
        self.model, self.preprocess, self.input_shape = model, preprocess, tuple(input_shape)
        self.cache_dir, self.progress = cache_dir, progress
        self._loaded: dict[InputSpec, torch.Tensor] = {}

    def load(self, spec: InputSpec) -> torch.Tensor:
        if spec not in self._loaded:
            self._loaded[spec] = load_inputs(spec, model=self.model, preprocess=self.preprocess,
                                             input_shape=self.input_shape, cache_dir=self.cache_dir,
                                             progress=self.progress(spec.key) if self.progress else None)
        return self._loaded[spec]


def load_inputs(spec: InputSpec, *, model: nn.Module, preprocess, input_shape: tuple[int, ...], cache_dir=None,
                progress: Progress | None = None) -> torch.Tensor:
    """The inputs `spec` names, float32 [samples, *input_shape], normalised for the model."""
    if spec.synthetic and spec.chunk is None:
        _check_samples(spec.samples, spec.key)
        return bn_matched_inputs(model, tuple(input_shape), spec.samples, steps=spec.steps, seed=spec.seed,
                                 cache_dir=cache_dir, progress=progress)
    return load_calibration_inputs(spec.source, spec.samples, model=model, preprocess=preprocess,
                                   input_shape=input_shape, seed=spec.seed, synthetic_steps=spec.steps,
                                   cache_dir=cache_dir, what=spec.key, progress=progress, chunk=spec.chunk or 64)


def _check_samples(samples: int, what: str) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"{what}.samples: {samples!r} must be an integer >= 1, e.g. 256")


def load_calibration_inputs(data: str, samples: int, *, model: nn.Module, preprocess, input_shape: tuple[int, ...],
                            seed: int = 0, synthetic_steps: int = 200, cache_dir=None, what: str = "compress.calibration",
                            progress: Progress | None = None, chunk: int = 64) -> torch.Tensor:
    """Inputs for `compress.calibration.data` (or the section named by `what`): an .npz of images (a seeded random
    subset of `samples` images, drawn without replacement; labels, if any, are ignored) or "synthetic" (BN-matched
    generated inputs, data/synthetic.py, so the mode stays data-free). Returns float32 [samples, *input_shape],
    normalised. `what` names the section (its `.samples` in errors); `progress(done, total)` follows the
    generation of synthetic inputs, whose BatchNorm statistics are matched per `chunk` inputs."""
    _check_samples(samples, what)
    if data == SYNTHETIC:
        return bn_matched_inputs(model, tuple(input_shape), samples, steps=synthetic_steps, seed=seed,
                                 batch_size=min(samples, chunk), cache_dir=cache_dir, progress=progress)
    images, _ = load_images(data, preprocess, limit=None, require_labels=False)
    if samples > len(images):
        raise DataError(f"{what}.samples: {samples} images asked for, but {data} has only "
                        f"{len(images)}; lower samples or give a bigger file")
    chosen = np.sort(np.random.default_rng(seed).choice(len(images), samples, replace=False))
    return torch.from_numpy(to_tensor(images[chosen], preprocess))
