"""Measurement cache: content-addressed hits and misses, refusal of another device's or version's entry, atomic
entries, and the candidate timer reading it before it times anything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dfp_deploy.core.digest import file_sha256
from dfp_deploy.measure.cache import MeasurementCache, make_key
from dfp_deploy.measure.workers import Candidate, CandidateTimer, TargetSpec

PROTOCOL = {"warmup": 1, "runs": 50, "rounds": 5}


def key(candidate="c" * 64, device="Fake CPU", version="1.0", **changes):
    base = dict(candidate=candidate, original="o" * 64, backend="ort-cpu", precision="fp32", batch=8, threads=1,
                device=device, versions={"ort-cpu": version})
    return make_key(**{**base, **changes})


def test_a_stored_timing_is_a_hit_under_its_key_and_a_miss_under_any_other(tmp_path):
    cache = MeasurementCache(tmp_path)
    assert cache.get(key()) is None
    cache.put(key(), 3.0, 6.0, PROTOCOL)
    entry = cache.get(key())
    assert (entry.candidate_ms, entry.original_ms, entry.ratio) == (3.0, 6.0, 0.5)
    assert entry.protocol == PROTOCOL
    # every part of the key addresses the entry: another candidate, batch, thread count or device is a miss
    for other in (key(candidate="d" * 64), key(batch=1), key(threads=None), key(device="Other CPU"),
                  key(version="1.1"), key(precision="int8")):
        assert cache.get(other) is None
    assert (cache.hits, cache.misses, cache.refused) == (1, 7, 0)
    assert not list(tmp_path.rglob(".*.tmp-*"))  # written through a temp file, renamed into place


@pytest.mark.parametrize("field,value", [("device", "Another CPU"), ("versions", {"ort-cpu": "0.9"})])
def test_an_entry_recorded_under_another_device_or_version_is_refused_and_said(tmp_path, field, value):
    """A shared cache folder copied between machines, or an entry renamed: the recorded key decides, not the name."""
    cache = MeasurementCache(tmp_path)
    cache.put(key(), 3.0, 6.0, PROTOCOL)
    path = cache.path_for(key())
    d = json.loads(path.read_text())
    d["key"][field] = value
    path.write_text(json.dumps(d))
    assert cache.get(key()) is None
    assert cache.refused == 1 and cache.hits == 0
    assert len(cache.notes) == 1 and path.name in cache.notes[0] and field in cache.notes[0]
    cache.put(key(), 4.0, 8.0, PROTOCOL)  # timed again: the fresh entry replaces the refused one
    assert cache.get(key()).candidate_ms == 4.0


def test_a_damaged_entry_is_refused_not_raised(tmp_path):
    cache = MeasurementCache(tmp_path)
    path = cache.path_for(key())
    path.parent.mkdir(parents=True)
    path.write_text('{"key": {"device": ')  # torn by a crash of a writer that did not use the atomic path
    assert cache.get(key()) is None
    assert cache.refused == 1 and "not a measurement entry" in cache.notes[0]


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    import hashlib

    (tmp_path / "a.onnx").write_bytes(b"abc" * 1000)
    assert file_sha256(tmp_path / "a.onnx") == hashlib.sha256(b"abc" * 1000).hexdigest()


class CountingMeasurer:
    """Stands in for a Measurer (workers.py): (candidate, original) p50 pairs, the candidate's from its file's first
    byte; counts what it timed."""

    where = "stub"

    def __init__(self, device="Fake CPU", original_ms=10.0):
        self.device, self.original_ms, self.timed = device, original_ms, []

    def describe(self):
        return {"device": self.device, "versions": {"ort-cpu": "1.0"}}

    def measure(self, candidates):
        self.timed += [Path(c.onnx).name for c in candidates]
        return [(float(Path(c.onnx).read_bytes()[0]), self.original_ms) for c in candidates]

    def close(self):
        pass


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, ms in (("original", 10), ("a", 5), ("b", 8)):
        paths[name] = tmp_path / f"{name}.onnx"
        paths[name].write_bytes(bytes([ms]) + name.encode())
    return paths


def spec():
    return TargetSpec("ort-cpu", "fp32", 8, 1, np.zeros((8, 3, 4, 4), np.float32), **PROTOCOL)


def test_a_second_timer_reuses_every_measurement_and_keeps_the_scale(tmp_path, files):
    cache = MeasurementCache(tmp_path / "cache")
    first = CandidateTimer(CountingMeasurer(original_ms=10.0), files["original"], spec(), cache=cache)
    assert first.measure_many([Candidate(files["a"]), Candidate(files["b"])]) == [5.0, 8.0]
    assert first.measurer.timed == ["a.onnx", "b.onnx"] and first.reference_ms == 10.0

    # a second search under double load: nothing is timed again, and the readings are those of the first
    second = CandidateTimer(CountingMeasurer(original_ms=20.0), files["original"], spec(), cache=cache)
    assert second.measure_many([Candidate(files["b"]), Candidate(files["a"])]) == [8.0, 5.0]
    assert second.measurer.timed == [] and second.fresh == 0 and second.timed == 2
    assert cache.hits == 2


def test_a_load_change_between_candidates_cancels_out(files):
    # run 1: original 10 ms, candidate a 5 ms; run 2 under double load: original 20 ms, candidate b 16 ms (0.8 of
    # the original): 8 ms on the first run's scale, not the 16 ms measured under load
    measurer = CountingMeasurer(original_ms=10.0)
    timer = CandidateTimer(measurer, files["original"], spec())
    assert timer.measure(Candidate(files["a"])) == 5.0 and timer.reference_ms == 10.0
    measurer.original_ms = 20.0
    measurer.measure = lambda cands: [(2 * float(Path(c.onnx).read_bytes()[0]), 20.0) for c in cands]
    assert timer.measure(Candidate(files["b"])) == pytest.approx(8.0)
    assert timer.timed == 2 and timer.reference_ms == 10.0


def test_another_device_never_reads_this_devices_timings(tmp_path, files):
    cache = MeasurementCache(tmp_path / "cache")
    CandidateTimer(CountingMeasurer(), files["original"], spec(), cache=cache).measure(Candidate(files["a"]))
    other = CandidateTimer(CountingMeasurer(device="Other CPU"), files["original"], spec(), cache=cache)
    other.measure(Candidate(files["a"]))
    assert other.measurer.timed == ["a.onnx"]


def test_a_changed_original_is_another_key(tmp_path, files):
    """The ratio is against the original engine: a re-exported, different original must not reuse it."""
    cache = MeasurementCache(tmp_path / "cache")
    CandidateTimer(CountingMeasurer(), files["original"], spec(), cache=cache).measure(Candidate(files["a"]))
    files["original"].write_bytes(bytes([10]) + b"original, other weights")
    again = CandidateTimer(CountingMeasurer(), files["original"], spec(), cache=cache)
    again.measure(Candidate(files["a"]))
    assert again.measurer.timed == ["a.onnx"]


# --- a build's before/after timing ------------------------------------------------------------------------------

@pytest.fixture
def build_timing(tmp_path, files):
    """time_engines as the build calls it, on engines of known device time (tests/_fake_target.py): the plan of a
    one-line recipe whose measurement cache is tmp_path/cache."""
    from _fake_target import FakeEngine, FakeTarget
    from dfp_deploy.pipeline.context import resolve_recipe
    from dfp_deploy.pipeline.engine_step import time_engines
    from dfp_deploy.recipe import load_recipe

    def run(*overrides, graphs=None, device="Fake Device", after_ms=2.0, after=FakeEngine):
        plan = resolve_recipe(load_recipe(None, ["model.name=cifar_resnet20", "advanced.target.fingerprint=table",
                                                 "advanced.measure.runs=50", "advanced.measure.rounds=2",
                                                 "advanced.measure.warmup=0",
                                                 f"advanced.measure.cache={tmp_path / 'cache'}", *overrides]))
        engines = {"before": FakeEngine("before", 4.0), "after": after("after", after_ms),
                   "unrounded": FakeEngine("unrounded", 3.0)}
        graphs = graphs or {"before": files["original"], "after": files["a"], "unrounded": "u" * 64}
        import torch

        return time_engines(plan, engines, torch.zeros(1), quiet=True, graphs=graphs,
                            target=FakeTarget(device).info())
    return run


def test_a_second_identical_build_reports_the_timings_measured_together_the_first_time(build_timing, files):
    first, _ = build_timing()
    assert first["cached"] is False and first["speedup"] == 2.0 and Path(first["cache_entry"]).is_file()
    # the engines are as fast as ever but the build reads the first run: all three engines from one stored run
    second, stats = build_timing(after_ms=1.0)
    assert second["cached"] is True and second["cache_entry"] == first["cache_entry"]
    assert second["speedup"] == 2.0 and stats["unrounded"].p50_ms == 3.0
    assert {k: v for k, v in second.items() if not k.startswith("cache")} == \
        {k: v for k, v in first.items() if not k.startswith("cache")}


def test_a_changed_graph_protocol_or_device_times_again(build_timing, files):
    build_timing()
    for changed in (dict(graphs={"before": files["original"], "after": files["b"], "unrounded": "u" * 64}),
                    dict(graphs={"before": files["original"], "after": files["a"], "unrounded": "v" * 64}),
                    dict(overrides=("advanced.measure.runs=60",)), dict(overrides=("target.threads=2",)),
                    dict(device="Other Device")):
        again, _ = build_timing(*changed.pop("overrides", ()), after_ms=1.0, **changed)
        assert again["cached"] is False and again["speedup"] == 4.0, changed


def test_remeasure_times_again_and_replaces_the_stored_run(build_timing):
    build_timing()
    fresh, _ = build_timing("advanced.measure.remeasure=true", after_ms=1.0)
    assert fresh["cached"] is False and fresh["speedup"] == 4.0
    assert build_timing(after_ms=0.5)[0]["speedup"] == 4.0  # the replaced entry is what the next build reads


def test_a_build_timing_copied_from_another_device_is_refused_and_said(build_timing):
    first, _ = build_timing()
    path = Path(first["cache_entry"])
    d = json.loads(path.read_text())
    d["key"]["device"] = "Another CPU"
    path.write_text(json.dumps(d))
    again, _ = build_timing(after_ms=1.0)
    assert again["cached"] is False and again["speedup"] == 4.0
    assert len(again["cache_notes"]) == 1 and "device" in again["cache_notes"][0]


def test_a_stored_run_the_load_moved_is_not_reused(build_timing):
    from _fake_target import FakeEngine

    class Drifting(FakeEngine):  # the second half of its calls ran under three times the load
        def prepare(self, x):
            calls = iter(range(10**6))
            return lambda: self.ms * (1.0 if next(calls) < 25 else 3.0)

    unsettled, _ = build_timing(after=Drifting)
    assert unsettled["cached"] is False
    again, _ = build_timing(after_ms=1.0)
    assert again["cached"] is False and again["speedup"] == 4.0 and "unsettled" in again["cache_notes"][0]
    assert build_timing(after_ms=0.5)[0]["cached"] is True  # the settled run that replaced it is reused
