"""Latency of a sequence of candidate models on one target, each timed against the original in the same run.

A search measures candidates minutes apart on a shared machine, where load changes slowly by tens of percent
(docs/BENCHMARKS.md: the same engine moved by up to 25% between runs). Timing each candidate c alone would compare
candidates across those drifts. Instead each candidate is timed interleaved with the original's engine (the latency
protocol of measure/latency.py) and reported on the scale of the original's first measurement:
    ℓ(c) = ℓ_ref · p50(c) / p50(original, in c's run),   ℓ_ref = p50(original) in the first run,
so a load change between runs cancels out of the ratio, while the figures stay in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable

from dfp_deploy.measure.latency import time_interleaved

Runner = Callable[[], object]


class RelativeTimer:
    """`build(model, name) -> runner` makes a prepared engine; `measure(model)` returns ℓ(c) in ms (docstring)."""

    def __init__(self, build: Callable[[object, str], Runner], original, *, warmup: int, runs: int, rounds: int,
                 batch: int, threads: int | None) -> None:
        self._build = build
        self._protocol = {"warmup": warmup, "runs": runs, "rounds": rounds, "batch": batch, "threads": threads}
        self._original = build(original, "original")
        self.reference_ms: float | None = None
        self.timed = 0  # candidate engines built and timed

    def measure(self, model, name: str = "candidate") -> float:
        if name == "original":
            raise ValueError("'original' names the reference engine")
        stats = time_interleaved({"original": self._original, name: self._build(model, name)}, **self._protocol)
        if self.reference_ms is None:
            self.reference_ms = stats["original"].p50_ms
        self.timed += 1
        return self.reference_ms * stats[name].p50_ms / stats["original"].p50_ms
