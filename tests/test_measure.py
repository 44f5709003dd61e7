"""Latency protocol (ratios, rotation, validation), parity and top-1 on arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from dfp_deploy.core.errors import DataError, InputError, ParityError
from dfp_deploy.core.types import LatencyStats
from dfp_deploy.measure.accuracy import run_batched, top1
from dfp_deploy.measure.latency import (noise, round_speedups, schedule, speedup_is_unsettled,
                                        time_interleaved)
from dfp_deploy.measure.parity import parity


class FakeClock:
    """Stands in for the `time` module the protocol reads (`perf_counter_ns` only): time moves only when a runner
    "works", so the measured milliseconds are known exactly whatever the machine's load (a real sleep read 1.999x
    instead of 3x once on a loaded shared machine)."""

    def __init__(self):
        self.ns = 0

    def perf_counter_ns(self) -> int:
        return self.ns

    def runner(self, ms: float):
        def run():
            self.ns += int(ms * 1e6)
        return run


def test_latency_ratio_of_known_runners(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("dfp_deploy.measure.latency.time", clock)
    stats = time_interleaved({"fast": clock.runner(4.0), "slow": clock.runner(12.0)}, warmup=2, runs=50, rounds=5,
                             batch=4, threads=1)
    assert stats["slow"].p50_ms / stats["fast"].p50_ms == pytest.approx(3.0)
    fast = stats["fast"]
    assert isinstance(fast, LatencyStats)
    assert (fast.runs, fast.warmup, fast.batch, fast.threads) == (50, 2, 4, 1)
    assert fast.min_ms == fast.p50_ms == fast.p90_ms == fast.p99_ms == pytest.approx(4.0)
    assert fast.std_ms == 0.0 and fast.round_p50_ms == pytest.approx((4.0,) * 5)
    # the warm-up calls ran but were not timed: 2 + 50 calls of each runner, 52 × (4 + 12) ms in all
    assert clock.ns == 52 * 16 * 1_000_000


def test_rounds_rotate_the_order_and_every_runner_gets_all_runs():
    calls: list[str] = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    stats = time_interleaved(runners, warmup=3, runs=52, rounds=4, batch=1, threads=None)
    assert calls[:9] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3  # warm-up, runner by runner
    timed = calls[9:]
    assert all(timed.count(n) == 52 for n in "abc") and all(s.runs == 52 for s in stats.values())
    blocks = [timed[0]] + [cur for prev, cur in zip(timed, timed[1:]) if cur != prev]
    # round r starts with runner r mod 3: a b c | b c a | c a b | a b c
    assert blocks == list("abcbcacababc")


def test_schedule_spreads_the_remainder_over_the_first_rounds():
    blocks = schedule(["x", "y"], runs=51, rounds=5)
    assert [n for n, _ in blocks[:4]] == ["x", "y", "y", "x"]
    assert sum(c for n, c in blocks if n == "x") == 51 and blocks[0][1] == 11 and blocks[-1][1] == 10


def test_device_timed_runner_reports_its_own_milliseconds():
    stats = time_interleaved({"gpu": lambda: 2.5}, warmup=0, runs=50, rounds=1, batch=1, threads=None)
    assert stats["gpu"].p50_ms == 2.5 and stats["gpu"].std_ms == 0.0


@pytest.mark.parametrize("kwargs, key", [(dict(runs=49), "runs"), (dict(runs=10), "below 50"),
                                         (dict(rounds=0), "rounds"), (dict(warmup=-1), "warmup"),
                                         (dict(rounds=60, runs=50), "rounds"), (dict(batch=0), "batch")])
def test_bad_protocol_is_input_error(kwargs, key):
    options = dict(warmup=0, runs=50, rounds=5, batch=1, threads=None)
    options.update(kwargs)
    with pytest.raises(InputError, match=key):
        time_interleaved({"a": lambda: None}, **options)


def test_noise_flags_a_long_tail():
    common = dict(p99_ms=5.0, min_ms=0.9, runs=50, warmup=10, batch=1, threads=1)
    steady = LatencyStats(p50_ms=1.0, p90_ms=1.1, mean_ms=1.0, std_ms=0.05, **common)
    noisy = LatencyStats(p50_ms=1.0, p90_ms=1.5, mean_ms=1.2, std_ms=0.3, **common)
    assert not noise(steady)["noisy"] and noise(noisy)["noisy"]
    assert noise(noisy)["p90_over_p50"] == pytest.approx(1.5) and noise(noisy)["cv"] == pytest.approx(0.25)


def test_round_medians_and_speedups_follow_the_load_of_each_round():
    """Self-timed runners (they return their own milliseconds): the machine 'slows down' by 1.5x in round 2 for the
    compressed engine only, as if a neighbour woke up during its block. Round medians and per-round speedups are
    then known exactly, and the spread flags the speedup as unsettled; without the slowdown it is settled."""
    def compressed_engine(slow_round: int | None):
        calls = []

        def run():
            calls.append(1)
            this_round = (len(calls) - 1) // 10  # 50 runs in 5 rounds: 10 calls per block
            return 1.5 if this_round == slow_round else 1.0
        return run

    for slow_round, unsettled in ((2, True), (None, False)):
        stats = time_interleaved({"before": lambda: 2.0, "after": compressed_engine(slow_round)}, warmup=0, runs=50,
                                 rounds=5, batch=1, threads=None)
        assert stats["before"].round_p50_ms == (2.0,) * 5
        expected = [2.0 / (1.5 if r == slow_round else 1.0) for r in range(5)]
        assert round_speedups(stats["before"], stats["after"]) == pytest.approx(expected)
        assert speedup_is_unsettled(expected) is unsettled
    assert not speedup_is_unsettled([1.36]) and not speedup_is_unsettled([])


class FlipOne:
    """An engine that agrees with the reference except that it moves sample 2's maximum to another class."""

    name = "flip-one"

    def __init__(self, reference):
        self.reference = reference

    def run(self, x):
        out = self.reference(x).copy()
        out[2] = out[2][::-1]
        return out


def reference(x):
    # logits = the first 4 pixel values of the sample: known argmaxes from known inputs
    return x.reshape(len(x), -1)[:, :4].astype(np.float32)


def test_parity_with_one_flipped_prediction():
    x = np.zeros((4, 1, 2, 2), np.float32)
    x[:, 0, 0, 0] = [1, 2, 3, 4]  # each sample's logits are (v, 0, 0, 0): argmax 0
    result = parity(reference, FlipOne(reference), x)
    assert result["n"] == 4 and result["top1_agreement"] == 0.75
    assert result["max_abs_err"] == 3.0  # sample 2: (3,0,0,0) vs (0,0,0,3)
    assert result["mean_abs_err"] == pytest.approx(6.0 / 16)
    assert result["nonfinite"] == 0


def test_parity_shape_mismatch_and_nan():
    x = np.ones((2, 1, 2, 2), np.float32)

    class Wrong:
        name = "wrong"

        def run(self, x):
            return np.zeros((2, 3), np.float32)

    with pytest.raises(ParityError, match="wrong"):
        parity(reference, Wrong(), x)

    class Nan:
        def run(self, x):
            out = reference(x)
            out[0, 0] = np.nan
            return out

    result = parity(reference, Nan(), x)
    assert result["max_abs_err"] == float("inf") and result["nonfinite"] == 1


def test_top1_known_answer_and_static_padding():
    rng = np.random.default_rng(0)
    n, k = 10, 4
    y = rng.integers(0, k, n)
    x = np.zeros((n, 1, 2, 2), np.float32)
    x.reshape(n, -1)[np.arange(n), y] = 1.0  # a one-hot image: reference predicts y exactly
    seen_batches = []

    def static_engine(chunk):
        seen_batches.append(len(chunk))
        out = reference(chunk)
        out[:, 0] += 1.5 * (np.arange(len(chunk)) == 0)  # first image of every chunk now predicts class 0
        return out

    score = top1(static_engine, x, y, batch=4, static_batch=True)
    assert seen_batches == [4, 4, 4]  # 10 images: last chunk of 2 padded to 4
    # chunk starts are images 0, 4, 8: with 1.5 on class 0 they are right only if their label is 0
    wrong = sum(1 for i in (0, 4, 8) if y[i] != 0)
    assert score == pytest.approx(100.0 * (n - wrong) / n)

    seen_batches.clear()
    top1(static_engine, x, y, batch=4, static_batch=False)
    assert seen_batches == [4, 4, 2]


def test_top1_rejects_mismatched_data():
    with pytest.raises(DataError, match="3 images but 2 labels"):
        top1(reference, np.zeros((3, 1, 2, 2), np.float32), np.zeros(2), batch=2, static_batch=False)
    with pytest.raises(InputError, match="batch"):
        run_batched(reference, np.zeros((3, 1, 2, 2), np.float32), batch=0, static_batch=False)
