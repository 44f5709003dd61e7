"""A fake remote target whose latency is known: a Backend (backends/registry.py) whose engines report their own device
time, as GPU backends do with CUDA events (measure/latency.py `_time_block`), so no timing depends on the load.

Engines are built from real ONNX files: the one-conv probes of export/probe.py, whose latency here is
    t(c) = MS_PER_CHANNEL · c  (ms, c = the probe's channel count),
so a candidate's latency on the original's scale is known exactly. Importable by worker processes and Ray actors
(a module, not a test file).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from dfp_deploy.backends.registry import BackendInfo
from dfp_deploy.core.types import EngineSummary

MS_PER_CHANNEL = 0.25
RAY_RESOURCE = "target:fake"  # the Ray custom resource the tests' cluster offers for this target


def probe_channels(onnx_path: Path) -> int:
    model = onnx.load(str(onnx_path))
    return int(next(t.dims[0] for t in model.graph.initializer if len(t.dims) == 4))


class FakeEngine:
    static_batch = None
    threads = 1

    def __init__(self, name: str, ms: float):
        self.name, self.ms = name, ms

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.zeros((x.shape[0], 10), np.float32)

    def prepare(self, x: np.ndarray):
        return lambda: self.ms

    def inspect(self) -> EngineSummary:
        return EngineSummary(self.name, "fp32", "fp32")


class FakeTarget:
    """`die_marker`: a file whose presence makes the next build kill this process (and remove the file), once."""

    name = "fake"

    def __init__(self, device: str = "Fake Device", die_marker: str | None = None):
        self.device, self.die_marker = device, die_marker

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, True, "1.0", "known latency", self.device)

    def build(self, onnx_path: Path, *, precision: str, threads: int | None, out_dir: Path,
              torch_model=None) -> FakeEngine:
        if self.die_marker is not None:
            try:
                # removing the marker is the claim: of two workers that both saw it, exactly one dies (checking
                # for it first let both try, and the loser's FileNotFoundError failed the batch)
                os.remove(self.die_marker)
            except FileNotFoundError:
                pass
            else:
                os._exit(1)  # a worker lost mid-task: no exception, no clean-up, as when a node goes away
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(onnx_path)
        return FakeEngine(onnx_path.name, MS_PER_CHANNEL * probe_channels(onnx_path))

    def prepare_graph(self, onnx_path: Path, *, precision: str, out_dir: Path) -> Path:
        """As ort.py's: the device-independent part of a build, here a copy of the graph (it keeps its latency)."""
        out = Path(out_dir) / f"{Path(onnx_path).stem}.{precision}.prepared.onnx"
        out.write_bytes(Path(onnx_path).read_bytes())
        return out
