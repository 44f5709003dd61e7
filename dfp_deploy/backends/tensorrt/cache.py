"""What a TensorRT build leaves on disk: the timing cache shared by every build on one GPU, the engine cache, plans.

Tactic timings depend on the GPU, its compute capability and the TensorRT and CUDA versions, so the timing cache
file is keyed by all four (`timing_cache_path`). It is loaded before a build and saved atomically after it, merged
with whatever another process saved meanwhile (ITimingCache.combine), so hundreds of candidate builds in a search
reuse one another's timings and pick the same tactics.

The engine cache keeps finished plans by content: the sha256 of the serialized graph, the builder settings and the
timing cache's key (GPU, compute capability, TensorRT, CUDA). The same graph built for the same target again (the
unchanged original of every build of a model) deserializes the stored plan instead of searching tactics anew, and
so also times the same kernels. It keeps the ENGINE_CACHE_KEEP most recently used plans. Every file is written to
a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
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


ENGINE_CACHE_KEEP = 32


def engine_cache_key(serialized_onnx: bytes, settings: dict, timing_cache_file: Path) -> str:
    """The content address of a plan: graph bytes, builder settings and the target (the timing cache's key)."""
    digest = hashlib.sha256(serialized_onnx)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(Path(timing_cache_file).stem.encode())
    return digest.hexdigest()


def cached_plan(folder: Path, key: str) -> bytes | None:
    """The stored plan for `key` (marked as just used), or None."""
    path = Path(folder) / f"{key}.plan"
    try:
        plan = path.read_bytes()
        os.utime(path)
    except OSError:
        return None
    return plan or None


def store_plan(folder: Path, key: str, plan: bytes, keep: int = ENGINE_CACHE_KEEP) -> str | None:
    """Store `plan` under `key` and drop the least recently used beyond `keep`; a note instead of a failure."""
    folder = Path(folder)
    try:
        write_bytes_durably(folder / f"{key}.plan", plan)
        stored = sorted(folder.glob("*.plan"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in stored[keep:]:
            old.unlink(missing_ok=True)
    except OSError as e:
        return f"engine not cached in {folder}: {e}"
    return None


def forget_plan(folder: Path, key: str) -> None:
    (Path(folder) / f"{key}.plan").unlink(missing_ok=True)
