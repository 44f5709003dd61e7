"""Synthetic inputs whose BatchNorm statistics match the model's own (ZeroQ-style distilled data), cached on disk.

Start from x ~ N(0, 1) (seeded) of shape [n, *shape] and minimise, with Adam on x only (weights frozen, model in
eval mode),
    L(x) = Σ_l ‖μ̂_l(x) − μ_l‖² + ‖σ̂_l(x) − σ_l‖²
over every BatchNorm layer l, where μ̂_l and σ̂_l² are the per-channel mean and (biased) variance of the layer's INPUT
over the batch and spatial positions, μ_l = running_mean and σ_l = sqrt(running_var + eps). With `batch_size` < n
the inputs are optimised in independent chunks (the statistics are matched per chunk), each with its own seed
derived from `seed`, so the result does not depend on anything but the arguments.

The result is cached as `<cache_dir>/bn_inputs-<key>.pt`, key = SHA-256 of every state_dict entry (name, dtype,
shape, bytes) and of (shape, n, steps, seed, lr, batch_size, version), written atomically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dfp_deploy.core.atomic import atomic_path
from dfp_deploy.core.errors import InputError

_VERSION = 1


def bn_matched_inputs(model: nn.Module, shape: tuple[int, ...], n: int, *, steps: int = 200, seed: int = 0,
                      lr: float = 0.1, batch_size: int | None = None, cache_dir: Path | None = None,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """[n, *shape] float32 inputs whose BN input statistics match the running statistics (see module docstring).
    Generation takes minutes on a CPU: `progress(done, total)` is called after every optimiser step (none when the
    inputs come from the cache)."""
    shape = tuple(int(s) for s in shape)
    _check(shape, n, steps, lr, batch_size)
    batch_size = min(batch_size or n, n)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"bn_inputs-{cache_key(model, shape, n, steps, seed, lr, batch_size)}.pt"
        if path.exists():
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if tuple(cached.shape) == (n, *shape):
                return cached
    x = _optimise_all(model, shape, n, steps=steps, seed=seed, lr=lr, batch_size=batch_size, progress=progress)
    if path is not None:
        with atomic_path(path) as temp:
            torch.save(x, temp)
    return x


def cache_key(model: nn.Module, shape: tuple[int, ...], n: int, steps: int, seed: int, lr: float,
              batch_size: int) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest.update(repr((shape, n, steps, seed, float(lr), batch_size, _VERSION)).encode())
    return digest.hexdigest()[:24]


def bn_statistic_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """L(x) of the module docstring for one batch (differentiable in x)."""
    terms: list[torch.Tensor] = []

    def hook(module, inputs, output):
        inp = inputs[0]
        dims = [d for d in range(inp.dim()) if d != 1]
        mean = inp.mean(dim=dims)
        std = torch.sqrt(inp.var(dim=dims, unbiased=False) + module.eps)
        terms.append(((mean - module.running_mean) ** 2).sum()
                     + ((std - torch.sqrt(module.running_var + module.eps)) ** 2).sum())

    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not bns:
        raise InputError("synthetic inputs need BatchNorm layers with running statistics; this model has none, "
                         "so give the search real calibration images instead")
    handles = [m.register_forward_hook(hook) for m in bns]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(terms).sum()


def _check(shape: tuple[int, ...], n: int, steps: int, lr: float, batch_size: int | None) -> None:
    if not shape or any(s < 1 for s in shape):
        raise InputError(f"synthetic input shape {shape} must be positive sizes per sample, e.g. (3, 32, 32)")
    for what, value in (("n", n), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if what == "n" else 0):
            raise InputError(f"synthetic inputs {what}: {value!r} must be a non-negative integer (n >= 1)")
    if not lr > 0:
        raise InputError(f"synthetic inputs lr: {lr!r} must be positive")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 2):
        raise InputError(f"synthetic inputs batch_size: {batch_size!r} must be an integer >= 2 (statistics need "
                         "more than one sample)")


def _optimise_all(model: nn.Module, shape: tuple[int, ...], n: int, *, steps: int, seed: int, lr: float,
                  batch_size: int, progress: Callable[[int, int], None] | None) -> torch.Tensor:
    flags = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    chunks = [(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]
    total, done = len(chunks) * steps, 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)  # only x is optimised; no gradient buffers on the caller's weights
        out = [_optimise_chunk(model, (stop - start, *shape), steps, seed * 1_000_003 + i, lr, step)
               for i, (start, stop) in enumerate(chunks)]
    finally:
        for m, was_training in flags.items():
            m.training = was_training
        for p, wanted in grads.items():
            p.requires_grad_(wanted)
    return torch.cat(out).contiguous()


def _optimise_chunk(model: nn.Module, shape: tuple[int, ...], steps: int, seed: int, lr: float,
                    step: Callable[[], None]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        loss = bn_statistic_loss(model, x)
        loss.backward()
        optimiser.step()
        step()
    return x.detach().float()

