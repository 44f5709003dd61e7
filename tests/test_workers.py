"""Measurement workers and batched search: a fake target of known latency timed in this process, in a local process
pool and on a real local Ray cluster (two actors holding a custom target resource); a worker killed mid-search; the
measurement cache across searches; and episodes that depend on the seed and the batch size only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dfp_deploy.analysis import analyze
from dfp_deploy.core.errors import DfpError, InputError
from dfp_deploy.export.probe import write_conv_probe
from dfp_deploy.measure.cache import MeasurementCache
from dfp_deploy.measure.workers import (Candidate, CandidateTimer, LocalMeasurer, NoTargetWorker, TargetSpec,
                                        make_measurer)
from dfp_deploy.search.agent import SacConfig
from dfp_deploy.search.loop import run_search
from dfp_deploy.search.space import build_space

from _fake_target import MS_PER_CHANNEL, RAY_RESOURCE
from _helpers import Deep, example

FAKE = "_fake_target:FakeTarget"
SMALL = SacConfig(batch=16)


def spec(**options) -> TargetSpec:
    return TargetSpec(FAKE, "fp32", 1, 1, np.zeros((1, 1, 4, 4), np.float32), warmup=1, runs=50, rounds=5,
                      options=options)


def probe(folder: Path, channels: int) -> Candidate:
    return Candidate(write_conv_probe(Path(folder) / f"probe{channels}.onnx", channels, batch=1, size=4,
                                      precision="fp32"))


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probes")
    return {c: probe(folder, c) for c in (4, 8, 16, 32)}


def expected(channels: list[int]) -> list[tuple[float, float]]:
    return [(MS_PER_CHANNEL * c, MS_PER_CHANNEL * 32) for c in channels]


# --- local -----------------------------------------------------------------------------------------------------

def test_in_process_measurer_times_each_candidate_against_the_warm_original(probes):
    m = make_measurer(spec(), probes[32], workers="local")
    try:
        assert m.where == "local" and m.describe() == {"device": "Fake Device", "versions": {FAKE: "1.0"}}
        assert m.measure([probes[16], probes[4]]) == expected([16, 4])
    finally:
        m.close()


def test_a_local_pool_gives_the_same_timings_and_survives_a_killed_worker(probes, tmp_path):
    marker = tmp_path / "die"
    m = LocalMeasurer(spec(die_marker=str(marker)), probes[32], workers=2)
    try:
        assert m.where == "local x2"
        assert m.measure([probes[16], probes[8], probes[4]]) == expected([16, 8, 4])
        marker.touch()  # the next build kills its worker process: the batch is finished on a fresh pool
        assert m.measure([probes[8], probes[16]]) == expected([8, 16])
        assert not marker.exists()
    finally:
        m.close()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_an_ort_graph_prepared_off_the_target_builds_the_engine_the_raw_graph_builds(tmp_path, precision):
    """Ray build tasks prepare graphs on any host (measure/workers.py prepare_graph); the target's engine from the
    prepared graph must be the engine it would build from the raw one: same kernels, same outputs."""
    from dfp_deploy.backends.registry import get_backend
    from dfp_deploy.measure.workers import prepare_graph

    raw = write_conv_probe(tmp_path / "raw.onnx", 16, batch=1, size=8, precision=precision)
    target = TargetSpec("ort-cpu", precision, 1, 1, np.zeros((1, 16, 8, 8), np.float32))
    (tmp_path / "prepared.onnx").write_bytes(prepare_graph(target, raw.read_bytes()))
    backend, x = get_backend("ort-cpu"), np.random.default_rng(0).standard_normal((1, 16, 8, 8), np.float32)
    engines = [backend.build(tmp_path / f"{name}.onnx", precision=precision, threads=1, out_dir=tmp_path)
               for name in ("raw", "prepared")]
    assert np.array_equal(engines[0].run(x), engines[1].run(x))
    if precision == "int8":
        assert engines[0].kernels == engines[1].kernels  # the optimized graph the target runs, op for op


def test_bad_worker_settings_are_input_errors(probes):
    with pytest.raises(InputError, match="advanced.measure.workers: 'ray:/x' is not local, auto or ray://host:port"):
        make_measurer(spec(), probes[32], workers="ray:/x")
    with pytest.raises(InputError, match="advanced.measure.local_workers"):
        LocalMeasurer(spec(), probes[32], workers=0)
    torch_spec = TargetSpec("torch-cpu", "fp32", 1, 1, np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(InputError, match="runs the PyTorch module itself"):
        LocalMeasurer(torch_spec, probes[32], workers=2)


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_auto_without_a_reachable_cluster_times_locally_and_says_why(probes, monkeypatch):
    """A stopped cluster leaves its address recorded; Ray itself would retry connecting to it for minutes."""
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    notes = []
    m = make_measurer(spec(), probes[32], workers="auto", notes=notes)
    try:
        assert m.where == "local" and len(notes) == 1 and "timed locally" in notes[0]
    finally:
        m.close()


def test_an_unreachable_ray_address_fails_in_one_line(probes):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'dfp-deploy[ray]')")
    port = closed_port()
    with pytest.raises(NoTargetWorker, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}") as e:
        make_measurer(spec(), probes[32], workers=f"ray://127.0.0.1:{port}", timeout_s=2.0)
    assert "\n" not in str(e.value)


# --- batched search --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def space():
    model = Deep()
    return build_space(model, analyze(model, example()), example(), min_keep=0.2)


def weights(space):
    return np.random.default_rng(1).uniform(0.1, 2.0, space.size)


def proxy_of(space, ratios) -> float:
    keep = np.asarray([1.0 - ratios.get(g, 0.0) for g in space.groups])
    return -float((weights(space) * (1 - keep) ** 2).sum())


def kept_of(space, ratios) -> int:
    return int(sum(round(c * (1.0 - ratios.get(g, 0.0))) for g, c in zip(space.groups, space.channels)))


def search(space, tmp, *, batch, evaluate_batch=None, episodes=9, resume=False, **kw):
    def evaluate(ratios):
        return {"proxy": proxy_of(space, ratios)}

    return run_search(space, evaluate, episodes=episodes, warmup=3, seed=0, target=0.5, log_path=tmp / "log.jsonl",
                      config=SMALL, progress=False, batch=batch, evaluate_batch=evaluate_batch, resume=resume,
                      plot_path=tmp / "p.png", **kw)


def lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_batch_one_through_evaluate_batch_is_the_sequential_search(space, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    search(space, tmp_path / "a", batch=1)
    calls = []

    def evaluate_batch(many):
        calls.append(len(many))
        return [{"proxy": proxy_of(space, r)} for r in many]

    search(space, tmp_path / "b", batch=1, evaluate_batch=evaluate_batch)
    assert lines(tmp_path / "a" / "log.jsonl") == lines(tmp_path / "b" / "log.jsonl")
    assert set(calls) == {1}


def test_a_batch_is_evaluated_together_and_its_results_do_not_depend_on_completion_order(space, tmp_path):
    sizes = []

    def forward(many):
        sizes.append(len(many))
        return [{"proxy": proxy_of(space, r)} for r in many]

    def backward(many):  # workers that finish in the opposite order: results still line up with the proposals
        out = {i: {"proxy": proxy_of(space, many[i])} for i in reversed(range(len(many)))}
        return [out[i] for i in range(len(many))]

    for name, fn in (("f", forward), ("b", backward)):
        (tmp_path / name).mkdir()
        search(space, tmp_path / name, batch=4, evaluate_batch=fn)
    assert lines(tmp_path / "f" / "log.jsonl") == lines(tmp_path / "b" / "log.jsonl")
    assert len(lines(tmp_path / "f" / "log.jsonl")) == 9 and max(sizes) > 1 and sum(sizes) <= 9


def test_an_interrupted_batched_search_resumes_to_the_same_episodes(space, tmp_path):
    (tmp_path / "whole").mkdir(), (tmp_path / "cut").mkdir()
    whole = search(space, tmp_path / "whole", batch=3)
    batches = []

    def interrupted(many):
        batches.append(len(many))
        if len(batches) == 3:
            raise KeyboardInterrupt
        return [{"proxy": proxy_of(space, r)} for r in many]

    with pytest.raises(KeyboardInterrupt):
        search(space, tmp_path / "cut", batch=3, evaluate_batch=interrupted)
    resumed = search(space, tmp_path / "cut", batch=3, resume=True)
    assert lines(tmp_path / "whole" / "log.jsonl") == lines(tmp_path / "cut" / "log.jsonl")
    assert resumed.best_ratios == whole.best_ratios
    with pytest.raises(InputError, match="batch"):  # another batch size would not give the same episodes
        search(space, tmp_path / "cut", batch=2, resume=True)


def timed_search(space, tmp, measurer_factory, cache, *, batch=4, close=True):
    """The pipeline's shape: score every plan of a batch, then time the batch's candidates in one measurer call;
    latency = the fake target's known t(Σ kept), on the original's scale."""
    folder = tmp / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    original = probe(folder, 32)
    timer = CandidateTimer(measurer_factory(original), original.onnx, spec(), cache=cache,
                           export=lambda ratios: probe(folder, kept_of(space, ratios)))
    try:
        def evaluate_batch(many):
            latencies = timer.measure_many(many)
            return [{"proxy": proxy_of(space, r), "latency_ms": ms} for r, ms in zip(many, latencies)]

        search(space, tmp, batch=batch, evaluate_batch=evaluate_batch, episodes=8,
               target_ms=0.6 * MS_PER_CHANNEL * sum(space.channels), penalty=10.0)
    finally:
        if close:
            timer.close()
    return lines(tmp / "log.jsonl"), timer


@pytest.fixture(scope="module")
def local_timed(space, tmp_path_factory):
    """One timed batched search on the in-process measurer, its cache filled."""
    tmp = tmp_path_factory.mktemp("local_timed")
    cache = MeasurementCache(tmp / "cache")
    log, timer = timed_search(space, tmp, lambda original: LocalMeasurer(spec(), original), cache)
    return log, timer, cache


def test_a_timed_batched_search_reads_known_latencies_and_its_second_run_times_nothing(space, local_timed,
                                                                                        tmp_path):
    log, timer, cache = local_timed
    for r in log:
        assert r["latency_ms"] == pytest.approx(MS_PER_CHANNEL * sum(r["kept"]))
    # the cache is content-addressed: two plans with one probe (equal Σ kept) may share a timing even in one search
    assert timer.fresh == timer.timed - cache.hits >= len({sum(r["kept"]) for r in log}) > 1
    log2, timer2 = timed_search(space, tmp_path, lambda original: LocalMeasurer(spec(), original), cache)
    assert log2 == log and timer2.fresh == 0 and timer2.timed == timer.timed


# --- Ray -------------------------------------------------------------------------------------------------------

RESOURCE = RAY_RESOURCE  # offered twice by the session's cluster (conftest.ray_cluster)


def ray_measurer(original, **kw):
    from dfp_deploy.measure.workers import RayMeasurer

    return RayMeasurer(spec(**kw.pop("options", {})), original, resource=kw.pop("resource", RESOURCE), **kw)


@pytest.fixture(scope="module")
def on_ray(ray_cluster, probes, tmp_path_factory):
    """A measurer holding both units of the resource (two actors), whose fake target dies on a build while `marker`
    exists."""
    marker = tmp_path_factory.mktemp("ray") / "die"
    m = ray_measurer(probes[32], options={"die_marker": str(marker)})
    try:
        yield m, marker
    finally:
        m.close()


def test_two_ray_actors_hold_the_target_and_time_interleaved_with_the_original(ray_cluster, on_ray, probes):
    m, _ = on_ray
    assert m.where == f"ray {RESOURCE} x2"
    assert m.describe() == {"device": "Fake Device", "versions": {FAKE: "1.0"}}
    assert m.measure([probes[4], probes[8], probes[16], probes[4]]) == expected([4, 8, 16, 4])
    pids = ray_cluster.get([a.describe.remote() for a in m._idle])
    assert len({d["pid"] for d in pids}) == 2  # two worker processes, one per unit of the resource
    # every graph (the original's and the four candidates') was prepared by a build task that held no unit of the
    # target resource, in a process that is not one of the target's actors
    assert len(m.build_sites) == 5
    assert all(RESOURCE not in site["resources"] and site["resources"].get("CPU") == 1 for site in m.build_sites)
    assert not {site["pid"] for site in m.build_sites} & {d["pid"] for d in pids}


def test_a_ray_worker_killed_mid_search_is_replaced_and_the_search_completes(on_ray, space, local_timed, tmp_path):
    m, marker = on_ray
    marker.touch()  # the actors are up: the next candidate build kills the process of the actor doing it
    log_ray, timer = timed_search(space, tmp_path, lambda original: m, None, close=False)
    assert m.replaced == 1 and not marker.exists() and timer.fresh == timer.timed
    assert log_ray == local_timed[0]  # same seed and batch, same episodes, whichever actor finished first


def test_a_target_without_a_live_worker_fails_in_one_line_naming_it(on_ray, probes):
    with pytest.raises(NoTargetWorker, match="target:absent") as e:
        ray_measurer(probes[32], resource="target:absent")
    assert "\n" not in str(e.value)
    # both units of the resource are held by on_ray's actors: a second search cannot get one, and says so in time
    with pytest.raises(NoTargetWorker, match=f"{RESOURCE}.*within 1 s") as e:
        ray_measurer(probes[32], timeout_s=1.0)
    assert "\n" not in str(e.value) and isinstance(e.value, DfpError)
