"""What a TensorRT build leaves on disk: the timing cache shared by every build on one GPU, and the plan files.

Tactic timings depend on the GPU, its compute capability and the TensorRT and CUDA versions, so the timing cache
file is keyed by all four (`timing_cache_path`). It is loaded before a build and saved atomically after it, merged
with whatever another process saved meanwhile (ITimingCache.combine), so hundreds of candidate builds in a search
reuse one another's timings and pick the same tactics. Plans are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dfp_deploy.core.atomic import atomic_path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dfp-deploy" / "trt-timing"


def timing_cache_key(gpu_name: str, compute_capability: tuple[int, int], trt_version: str,
                     cuda_version: str | None) -> str:
    """A filename-safe key naming everything a timing cache is specific to (lowercase, [a-z0-9.-] only)."""
    major, minor = compute_capability
    raw = f"{gpu_name}-sm{major}{minor}-trt{trt_version}-cuda{cuda_version or 'unknown'}"
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9.]", "-", raw.lower())).strip("-.")


def timing_cache_path(gpu_name: str, compute_capability: tuple[int, int], trt_version: str,
                      cuda_version: str | None, cache_dir: Path | None = None) -> Path:
    key = timing_cache_key(gpu_name, compute_capability, trt_version, cuda_version)
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.cache"


def device_timing_cache_path(trt, cache_dir: Path | None) -> Path:
    """The timing cache file of GPU 0 with this TensorRT and CUDA."""
    import torch

    return timing_cache_path(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), trt.__version__,
                             torch.version.cuda, cache_dir)


def load_timing_cache(path: Path) -> bytes:
    """The serialized cache, or b"" when there is none yet (or it cannot be read: the build then starts cold)."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def save_timing_cache(path: Path, data: bytes) -> None:
    write_bytes_durably(Path(path), data)


def save_merged_timing_cache(config, cache_path: Path, loaded: bytes) -> str | None:
    """Save the build's timing cache merged with the file's current content; a note instead of a failure."""
    cache = config.get_timing_cache()
    on_disk = load_timing_cache(cache_path)
    if on_disk and on_disk != loaded:
        # another build saved since we loaded: keep its timings too (conflicting entries keep ours)
        other = config.create_timing_cache(on_disk)
        if other is not None:
            cache.combine(other, False)
    try:
        save_timing_cache(cache_path, bytes(cache.serialize()))
    except OSError as e:
        return f"timing cache not saved to {cache_path}: {e}"
    return None


def plan_path(out_dir: Path, onnx_stem: str, precision: str) -> Path:
    """`<onnx stem>.<precision>.plan`: the pipeline's two builds (original.onnx, model.onnx) never collide."""
    return Path(out_dir) / f"{onnx_stem}.{precision}.plan"


def write_bytes_durably(path: Path, data: bytes) -> None:
    with atomic_path(path) as temp:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
