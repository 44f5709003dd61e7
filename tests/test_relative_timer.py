"""RelativeTimer: candidates timed against the original, on the scale of the original's first measurement."""

from __future__ import annotations

import pytest

from dfp_deploy.measure.relative import RelativeTimer


def _self_timed(values):
    """A runner that reports its own time in ms (the latency protocol's device-timed path), value after value."""
    it = iter(values)
    return lambda: next(it)


def test_load_change_between_candidates_cancels_out():
    # run 1: original 10 ms, candidate A 5 ms; run 2 under double load: original 20 ms, candidate B 10 ms.
    # Both candidates are half the original: 5 ms on the reference scale, not 5 and 10.
    protocol = dict(warmup=1, runs=50, rounds=2, batch=1, threads=1)
    original = _self_timed([10.0] * 51 + [20.0] * 51)
    engines = {"original": original, "A": _self_timed([5.0] * 51), "B": _self_timed([10.0] * 51)}
    built = []

    def build(model, name):
        built.append(name)
        return engines[model]

    timer = RelativeTimer(build, "original", **protocol)
    assert timer.measure("A") == pytest.approx(5.0)
    assert timer.reference_ms == pytest.approx(10.0)
    assert timer.measure("B") == pytest.approx(5.0)
    assert timer.timed == 2 and built == ["original", "candidate", "candidate"]  # the original is built once
    with pytest.raises(ValueError, match="reference"):
        timer.measure("A", "original")
