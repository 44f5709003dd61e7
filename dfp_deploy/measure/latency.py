"""Latency protocol: warm up, then time several engines interleaved in rotating rounds, and summarise per engine.

Protocol, for runners {A, B, ...} (zero-argument callables that run one inference on pre-bound input):
1. warm-up: each runner is called `warmup` times, untimed (lazy allocations, caches, JIT/autotuning, spinning
   thread pools settle);
2. `rounds` rounds; round r calls each runner in the order rotated by r (A B, then B A, then A B ...), each
   runner `runs / rounds` times in a row (the remainder goes to the first rounds, so each runner gets exactly
   `runs` timed calls). Interleaving makes a slow drift of the machine (thermal state, a neighbour's load) hit
   every runner alike instead of whichever ran last; consecutive calls within a block keep each engine in its
   own steady state (weights in cache) as in deployment;
3. each call is timed alone with time.perf_counter_ns; a runner that returns a float has measured itself on
   the device (CUDA events) and that value in milliseconds is used instead. The garbage collector is paused
   while timing so its pauses do not land in one engine's figures;
4. per runner: p50/p90/p99 (numpy linear-interpolated percentiles), min, mean and sample std over all `runs`
   calls, in milliseconds per batch.

Noise check: `noise(stats)` gives p90/p50 and the coefficient of variation; a p90 more than NOISY_RATIO above
the median means a long tail (a busy machine, an unstable engine, thread-pool jitter). A long tail need not move
the median, so the report judges the SPEEDUP by its rounds instead: each round times every engine under the same
load, and the ratio of two engines' round medians (`round_speedups`) is one reading of the speedup; when these
readings spread over more than UNSETTLED_SPREAD of their median, the load moved the speedup while it was measured
and the report says so (measured on 2 shared cores: the quickstart at 50 runs read 0.66x-1.34x from one build to
the next with p90/p50 up to 3.6; at 200 runs, 1.35x-1.37x although p90/p50 stayed up to 2.7).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable

import numpy as np

from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import LatencyStats

MIN_RUNS = 50
NOISY_RATIO = 1.2  # p90 / p50 above this flags a measurement as noisy
UNSETTLED_SPREAD = 0.1  # per-round speedups spread over more than 10 % of their median: the speedup is uncertain


def _require_int(key: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{key}: {value!r} must be an integer >= {low}")


def _check_protocol(runners, warmup, runs, rounds, batch) -> None:
    if not runners:
        raise InputError("latency: nothing to time (no runners given)")
    _require_int("advanced.measure.warmup", warmup, 0)
    if isinstance(runs, int) and not isinstance(runs, bool) and runs < MIN_RUNS:
        raise InputError(f"advanced.measure.runs: {runs} is below {MIN_RUNS}; percentiles from fewer runs are too "
                         f"noisy to compare engines, use runs >= {MIN_RUNS}")
    _require_int("advanced.measure.runs", runs, MIN_RUNS)
    _require_int("advanced.measure.rounds", rounds, 1)
    if rounds > runs:
        raise InputError(f"advanced.measure.rounds: {rounds} is more than advanced.measure.runs ({runs}); "
                         "use rounds <= runs")
    _require_int("target.batch", batch, 1)


def schedule(names: list[str], runs: int, rounds: int) -> list[tuple[str, int]]:
    """The timed blocks in order: (runner name, consecutive calls). Each name gets `runs` calls in total."""
    base, extra = divmod(runs, rounds)
    blocks = []
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            blocks.append((name, base + (1 if r < extra else 0)))
    return blocks


def _time_block(runner: Callable, calls: int, out: list[float]) -> None:
    clock = time.perf_counter_ns
    for _ in range(calls):
        start = clock()
        device_ms = runner()
        elapsed_ns = clock() - start
        out.append(float(device_ms) if isinstance(device_ms, float) else elapsed_ns / 1e6)


def summarise(rounds: list[list[float]], *, warmup: int, batch: int, threads: int | None) -> LatencyStats:
    """Statistics of all timed calls, from the per-round blocks of one runner (each round also gives its median)."""
    t = np.asarray([ms for block in rounds for ms in block], dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    return LatencyStats(p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), min_ms=float(t.min()),
                        mean_ms=float(t.mean()), std_ms=float(t.std(ddof=1)) if len(t) > 1 else 0.0,
                        runs=len(t), warmup=warmup, batch=batch, threads=threads,
                        round_p50_ms=tuple(float(np.median(r)) for r in rounds if len(r)))


def round_speedups(before: LatencyStats, after: LatencyStats) -> list[float]:
    """before / after p50 within each interleaved round: both engines ran in that round, under the same load, so
    the spread of these ratios is how far the load moved the speedup while it was measured."""
    return [b / a for b, a in zip(before.round_p50_ms, after.round_p50_ms) if a > 0]


def speedup_is_unsettled(speedups: list[float]) -> bool:
    """True when the per-round speedups differ by more than UNSETTLED_SPREAD of their median."""
    if len(speedups) < 2:
        return False
    return (max(speedups) - min(speedups)) / float(np.median(speedups)) > UNSETTLED_SPREAD


def unsettled_range(speedups: list[float] | None) -> tuple[float, float] | None:
    """(lowest, highest) per-round speedup when they are unsettled (the summary and the report say so), else None."""
    speedups = speedups or []
    return (min(speedups), max(speedups)) if speedup_is_unsettled(speedups) else None


def noise(stats: LatencyStats) -> dict:
    """How stable a measurement was: p90/p50, coefficient of variation, and whether it counts as noisy."""
    ratio = stats.p90_ms / stats.p50_ms if stats.p50_ms > 0 else float("inf")
    cv = stats.std_ms / stats.mean_ms if stats.mean_ms > 0 else float("inf")
    return {"p90_over_p50": ratio, "cv": cv, "noisy": bool(ratio > NOISY_RATIO)}


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="timing", unit="run", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty())


def time_interleaved(runners: dict[str, Callable[[], None]], *, warmup: int = 10, runs: int = 50, rounds: int = 5,
                     batch: int, threads: int | None, progress: bool = False) -> dict[str, LatencyStats]:
    """Time every runner under the protocol above; returns LatencyStats per runner name (same keys)."""
    _check_protocol(runners, warmup, runs, rounds, batch)
    names = list(runners)
    blocks: dict[str, list[list[float]]] = {name: [] for name in names}  # one per round
    bar = _progress_bar(progress, len(names) * (warmup + runs))
    gc_was_enabled = gc.isenabled()
    try:
        for name in names:
            for _ in range(warmup):
                runners[name]()
            if bar:
                bar.update(warmup)
        gc.collect()
        gc.disable()
        for name, calls in schedule(names, runs, rounds):
            blocks[name].append([])
            _time_block(runners[name], calls, blocks[name][-1])
            if bar:
                bar.update(calls)
    finally:
        if gc_was_enabled:
            gc.enable()
        if bar:
            bar.close()
    return {name: summarise(blocks[name], warmup=warmup, batch=batch, threads=threads) for name in names}
