"""Describe the machine and library versions a measurement was taken on, cheaply and without initialising CUDA."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path

# (module to look for, distributions that may provide it): onnxruntime-gpu installs the same module name
_VERSIONED = {
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11"),
}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_channel_block() -> int:
    """Channels per block of ONNX Runtime's (MLAS) and oneDNN's blocked NCHWc conv layout on this CPU: 16 floats
    per AVX-512 register, else 8 (AVX2, and the fallback). A conv whose channel count is not a multiple of it is
    padded up to one (ORT's optimized graph keeps 12 channels in a 16-channel NCHWc conv on AVX2), so pruning
    16 → 12 channels saves no time while 16 → 8 does (measured in docs/BENCHMARKS.md)."""
    return 16 if "avx512f" in cpu_flags() else 8


def physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo, capped by this process's CPU affinity; None if unknown."""
    cores, physical_id = set(), "0"
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical_id = value.strip()
        elif key == "core id":
            cores.add((physical_id, value.strip()))
    if not cores:
        return None
    try:
        # a container may be pinned to fewer CPUs than the host has cores
        return max(1, min(len(cores), len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):
        return len(cores)


def gpu_models() -> list[str]:
    # the NVIDIA driver's procfs names the GPUs without creating a CUDA context
    models = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            for line in info.read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    models.append(line.split(":", 1)[1].strip())
        except OSError:
            continue
    return models


def _version(module: str, distributions: tuple[str, ...]) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    for dist in distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def environment() -> dict:
    env = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "os": platform.system(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    gpus = gpu_models()
    if gpus:
        env["gpus"] = gpus
    for module, dists in _VERSIONED.items():
        version = _version(module, dists)
        if version is not None:
            env[module] = version
    return env
