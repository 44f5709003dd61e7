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
