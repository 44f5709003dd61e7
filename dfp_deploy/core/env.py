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
