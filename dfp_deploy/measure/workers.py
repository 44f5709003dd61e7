"""Time candidate ONNX files against the original on the target: in this process, a local process pool, or Ray
actors that each hold one target device.

Every implementation of `Measurer` returns, per candidate, the pair (p50 of the candidate, p50 of the original)
from ONE interleaved run on one warm worker (measure/latency.py), so a worker's load or clock cancels out of the
ratio. A search times candidates minutes apart on shared machines, where load drifts by tens of percent between
runs (docs/research/search.md); timing each candidate alone would compare them across those drifts. `CandidateTimer` therefore puts the pairs on the original's scale,
    ℓ(c) = ℓ_ref · p50(c) / p50(original, in c's run),   ℓ_ref = the original's p50 in the first candidate's run,
where "first" is the order candidates were asked for, never the order workers finished in, and it reads and fills
the measurement cache (measure/cache.py) around the measurer.

- LocalMeasurer (default, no dependency): workers=1 times in this process, as the search always did; workers=N>1
  runs N spawned processes, each with its backend and the original's engine built once and kept warm. On one
  machine concurrent timings share the cores: give each engine its threads (target.threads) so N × threads fit.
- RayMeasurer (optional `ray` extra; Ray is imported only there): one actor per unit of the Ray custom resource
  naming the target (e.g. `target:ort-cpu`), so an actor holds its device exclusively, keeps the backend and the
  original's engine warm, and times candidates against it. The device-independent part of each build (a backend's
  `prepare_graph`: for ONNX Runtime the graph's provider-independent optimisation) runs first as a Ray task on any
  worker's CPU, without the target resource, concurrently for the whole batch; the actor finishes the engine from
  it (the device-specific part) and times it. A backend without `prepare_graph` (TensorRT: a plan is only valid on
  the GPU model it was built on) is built entirely by the actor that times it. An actor that dies mid-task is
  replaced and its task retried on another live actor; a resource with no live worker fails within `timeout_s`
  with one line naming the resource, never a hang.
"""

from __future__ import annotations

import glob
import importlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from dfp_deploy.core.digest import file_sha256
from dfp_deploy.core.errors import BackendUnavailable, InputError
from dfp_deploy.measure.cache import MeasurementCache, make_key
from dfp_deploy.measure.latency import time_interleaved

MAX_ATTEMPTS = 3  # a candidate that took down this many workers is reported, not retried forever
RUNS_MODULE = ("torch-cpu", "torch-cuda")  # backends that run the PyTorch module itself, not the ONNX file


class NoTargetWorker(BackendUnavailable):
    """No live worker holds the target resource (or none answered in time)."""


@dataclass(frozen=True, eq=False)
class TargetSpec:
    """What a worker needs to build and time engines: plain, picklable data (it travels to processes and actors)."""

    backend: str  # registry name, or "module:attribute" of a zero-argument Backend factory
    precision: str
    batch: int
    threads: int | None
    example: np.ndarray  # the timed input, [batch, C, H, W] float32
    warmup: int = 10
    runs: int = 50
    rounds: int = 5
    options: dict = field(default_factory=dict)  # backend constructor options (TensorRT's opt_level, ...)

    def protocol(self) -> dict:
        return {"warmup": self.warmup, "runs": self.runs, "rounds": self.rounds}

    def make_backend(self):
        if ":" in self.backend:
            module, attribute = self.backend.split(":")
            return getattr(importlib.import_module(module), attribute)(**self.options)
        from dfp_deploy.backends.registry import get_backend

        return get_backend(self.backend, **self.options)


@dataclass(frozen=True, eq=False)
class Candidate:
    onnx: Path
    module: object | None = None  # the PyTorch module, for backends that run it (RUNS_MODULE); in-process only


class Measurer(Protocol):
    where: str  # for the report: "local", "local x2", "ray target:ort-cpu x2"

    def describe(self) -> dict:
        """{"device": ..., "versions": {...}} of the target the timings run on (the cache key's device part)."""
        ...

    def measure(self, candidates: Sequence[Candidate]) -> list[tuple[float, float]]:
        """(candidate p50 ms, original p50 ms) per candidate, in the order given."""
        ...

    def close(self) -> None: ...


class _Bench:
    """One target's backend with the original's engine built once and kept warm; times candidates against it."""

    def __init__(self, spec: TargetSpec, original: bytes | Path, folder: Path, *, backend=None,
                 original_module=None) -> None:
        self.spec, self.folder = spec, Path(folder)
        self.backend = backend if backend is not None else spec.make_backend()
        self._names = itertools.count()
        self.original = self._engine(original, "original", original_module)

    def _engine(self, onnx: bytes | Path, name: str, module=None):
        s = self.spec
        if isinstance(onnx, bytes):
            path = self.folder / f"{name}.onnx"
            path.write_bytes(onnx)
        else:
            path = Path(onnx)
        try:
            engine = self.backend.build(path, precision=s.precision, threads=s.threads, out_dir=self.folder,
                                        torch_model=module)
            return engine.prepare(s.example)
        finally:
            if isinstance(onnx, bytes):
                path.unlink(missing_ok=True)

    def describe(self) -> dict:
        info = self.backend.info()
        return {"device": info.device, "versions": {self.spec.backend: info.version}}

    def time(self, candidate: bytes | Path, module=None) -> tuple[float, float]:
        runner = self._engine(candidate, f"candidate{next(self._names)}", module)
        stats = time_interleaved({"original": self.original, "candidate": runner}, batch=self.spec.batch,
                                 threads=self.spec.threads, **self.spec.protocol())
        return stats["candidate"].p50_ms, stats["original"].p50_ms


# --- local -----------------------------------------------------------------------------------------------------

_POOL_BENCH: _Bench | None = None  # the pool worker process's bench, built once by its initializer


def _pool_init(spec: TargetSpec, original: bytes) -> None:
    global _POOL_BENCH
    _POOL_BENCH = _Bench(spec, original, Path(tempfile.mkdtemp(prefix="dfp-measure-")))


def _pool_describe() -> dict:
    return _POOL_BENCH.describe()


def _pool_time(candidate: bytes) -> tuple[float, float]:
    return _POOL_BENCH.time(candidate)


class LocalMeasurer:
    """Timing on this machine: in this process (workers=1) or in `workers` spawned processes."""

    def __init__(self, spec: TargetSpec, original: Candidate, *, workers: int = 1, backend=None) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InputError(f"advanced.measure.local_workers: {workers!r} must be an integer >= 1")
        self.spec, self.workers = spec, workers
        self.where = "local" if workers == 1 else f"local x{workers}"
        self._folder = Path(tempfile.mkdtemp(prefix="dfp-measure-"))
        self._pool = None
        if workers == 1:
            self._bench = _Bench(spec, original.onnx, self._folder, backend=backend, original_module=original.module)
        else:
            if spec.backend in RUNS_MODULE:
                raise InputError(f"advanced.measure.local_workers: {spec.backend} runs the PyTorch module itself, "
                                 "which worker processes cannot receive as ONNX; use advanced.measure.local_workers=1")
            self._original = Path(original.onnx).read_bytes()
            self._start_pool()

    def _start_pool(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a forked copy of a process with torch's and ORT's thread pools running is not safe
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_pool_init, initargs=(self.spec, self._original))

    def describe(self) -> dict:
        if self._pool is None:
            return self._bench.describe()
        return self._pool.submit(_pool_describe).result()

    def measure(self, candidates: Sequence[Candidate]) -> list[tuple[float, float]]:
        if self._pool is None:
            return [self._bench.time(c.onnx, c.module) for c in candidates]
        from concurrent.futures.process import BrokenProcessPool

        payloads = [Path(c.onnx).read_bytes() for c in candidates]
        results: list[tuple[float, float] | None] = [None] * len(payloads)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            todo = [i for i, r in enumerate(results) if r is None]
            futures = {i: self._pool.submit(_pool_time, payloads[i]) for i in todo}
            try:
                for i, future in futures.items():
                    results[i] = future.result()
                return results
            except BrokenProcessPool:
                # a worker process died (killed, out of memory): what finished is kept, the rest runs on a new pool
                for i, future in futures.items():
                    if results[i] is None and future.done() and future.exception() is None:
                        results[i] = future.result()
                self._pool.shutdown(wait=False, cancel_futures=True)
                if attempt == MAX_ATTEMPTS:
                    raise NoTargetWorker(f"advanced.measure.local_workers: timing worker processes died {attempt} "
                                         "times while timing one batch of candidates; see the system log (out of "
                                         "memory?)"
                                         ) from None
                self._start_pool()
        return results  # unreachable

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        shutil.rmtree(self._folder, ignore_errors=True)


# --- Ray -------------------------------------------------------------------------------------------------------

def prepare_graph(spec: TargetSpec, onnx: bytes) -> bytes:
    """The device-independent part of an engine build (a backend's optional `prepare_graph`, ort.py), on whichever
    host runs it; the target's build finishes the engine from its result."""
    backend = spec.make_backend()
    with tempfile.TemporaryDirectory(prefix="dfp-prepare-") as folder:
        source = Path(folder) / "graph.onnx"
        source.write_bytes(onnx)
        return Path(backend.prepare_graph(source, precision=spec.precision, out_dir=Path(folder))).read_bytes()


def _prepare_task(ray):
    # a CPU of any node, never the target resource: a target's time goes to timing only. Ray retries the task
    # elsewhere when its worker dies
    @ray.remote(num_cpus=1, num_returns=2, max_retries=MAX_ATTEMPTS - 1)
    def prepare(spec: TargetSpec, onnx: bytes):
        context = ray.get_runtime_context()
        site = {"pid": os.getpid(), "node": context.get_node_id(), "resources": dict(context.get_assigned_resources())}
        return prepare_graph(spec, onnx), site

    return prepare


def _target_worker_class(ray):
    @ray.remote(max_restarts=0, max_task_retries=0)
    class TargetWorker:
        """Holds one unit of the target resource: the backend and the original's engine, warm, on that device."""

        def __init__(self, spec: TargetSpec, original: bytes) -> None:
            self.bench = _Bench(spec, original, Path(tempfile.mkdtemp(prefix="dfp-target-")))

        def describe(self) -> dict:
            return {**self.bench.describe(), "pid": os.getpid()}

        def time(self, candidate: bytes) -> tuple[float, float]:
            return self.bench.time(candidate)

    return TargetWorker


def _ray_endpoint(address: str | None) -> tuple[str, int] | None:
    """host, port that `ray.init(address)` will connect to: ray://host:port, host:port, or for "auto" the RAY_ADDRESS
    variable or the address the last `ray start` on this machine recorded; None when there is nothing to connect to."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            recorded = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
            address = recorded.read_text().strip() if recorded.is_file() else None
    if not address:
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def _check_reachable(address: str | None, timeout_s: float) -> None:
    """Fail in timeout_s, not after Ray's own minutes of retries, when nothing listens at the cluster's address (a
    stopped cluster leaves its address recorded on the machine)."""
    import socket

    endpoint = _ray_endpoint(address)
    if endpoint is None:
        raise NoTargetWorker(f"advanced.measure.workers: no Ray cluster to connect to at {address!r} (none running "
                             "here: start one with ray start --head, or give ray://host:port)")
    try:
        socket.create_connection(endpoint, timeout=timeout_s).close()
    except OSError as e:
        raise NoTargetWorker(f"advanced.measure.workers: cannot reach the Ray cluster at {endpoint[0]}:{endpoint[1]} "
                             f"({e.strerror or type(e).__name__}); is it running?") from None


class RayMeasurer:
    """Timing on Ray actors, one per unit of `resource` in the cluster (module docstring)."""

    def __init__(self, spec: TargetSpec, original: Candidate, *, resource: str, address: str | None = None,
                 timeout_s: float = 60.0, task_timeout_s: float = 1800.0) -> None:
        try:
            import ray
        except ImportError:
            raise InputError("advanced.measure.workers: Ray is not installed; pip install 'dfp-deploy[ray]' or use "
                             "advanced.measure.workers=local") from None
        if spec.backend in RUNS_MODULE:
            raise InputError(f"advanced.measure.workers: {spec.backend} runs the PyTorch module itself, which Ray "
                             "workers cannot receive as ONNX; use advanced.measure.workers=local")
        self._ray, self.resource, self.timeout_s, self.task_timeout_s = ray, resource, timeout_s, task_timeout_s
        if not ray.is_initialized():
            _check_reachable(address, timeout_s)
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            except Exception as e:  # ConnectionError, or Ray's own errors for a bad address
                raise NoTargetWorker(f"advanced.measure.workers: cannot reach the Ray cluster at {address}: "
                                     f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                                     ) from None
        self._cls = _target_worker_class(ray).options(num_cpus=0, resources={resource: 1})
        # a backend that can do part of its build off the target (ORT: the graph) gets build tasks on any worker; a
        # TensorRT plan is only valid on the GPU model it was built on, so its whole build stays on the target. A
        # cluster without a CPU to give a task (targets declared with --num-cpus=0 only) builds on the target too
        offers_cpu = ray.cluster_resources().get("CPU", 0) >= 1
        self._prepare = (_prepare_task(ray) if offers_cpu and hasattr(spec.make_backend(), "prepare_graph")
                         else None)
        self.build_sites: list[dict] = []  # where each build task ran (pid, node, the Ray resources it held)
        self._spec, self._sites = spec, []
        self._original = self._prepared([ray.put(Path(original.onnx).read_bytes())])[0]
        units = int(ray.cluster_resources().get(resource, 0))
        if units < 1:
            raise NoTargetWorker(self._no_worker("no node of the Ray cluster offers it"))
        starting = [self._start() for _ in range(units)]
        self._idle = self._await_ready(starting)
        self.where = f"ray {resource} x{len(self._idle)}"
        self._description = ray.get(self._idle[0].describe.remote(), timeout=timeout_s)
        self._starting: dict = {}  # describe() ref of a replacement actor -> the actor
        self.replaced = 0

    def _prepared(self, payloads: list) -> list:
        """Refs to the graphs the target builds engines from: the build tasks' results, or the ONNX itself. The
        tasks run concurrently, and all of them finish before any timing starts: on a node that is both a build
        worker and a CPU target, a build beside a timing takes the cores the timed engine runs on
        (docs/research/measurement-fabric.md)."""
        if self._prepare is None:
            return payloads
        tasks = [self._prepare.remote(self._spec, p) for p in payloads]
        self._sites += [site for _, site in tasks]
        graphs = [graph for graph, _ in tasks]
        self._ray.wait(graphs, num_returns=len(graphs), timeout=self.task_timeout_s, fetch_local=False)
        return graphs

    def _no_worker(self, why: str) -> str:
        return (f"advanced.measure.target_resource: no live Ray worker holds the resource {self.resource!r} ({why}); "
                f"start one on the target with ray start --address=<head> --resources='{{\"{self.resource}\": 1}}'")

    def _start(self):
        actor = self._cls.remote(self._spec, self._original)
        return actor, actor.describe.remote()

    def _await_ready(self, starting: list) -> list:
        """The actors whose describe() answered within timeout_s; the others are killed (their resource may be held
        by another search, or their node gone). None at all is an error naming the resource."""
        ray = self._ray
        refs = {ref: actor for actor, ref in starting}
        done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout_s)
        ready = []
        for ref in done:
            try:
                ray.get(ref)
                ready.append(refs[ref])
            except ray.exceptions.RayActorError:
                pass
            except ray.exceptions.RayTaskError as e:
                raise e.cause if isinstance(e.cause, Exception) else e from None  # the target's own error
        for ref in pending:
            ray.kill(refs[ref])
        if not ready:
            raise NoTargetWorker(self._no_worker(f"none started within {self.timeout_s:g} s"))
        return ready

    def describe(self) -> dict:
        return {k: v for k, v in self._description.items() if k != "pid"}

    def measure(self, candidates: Sequence[Candidate]) -> list[tuple[float, float]]:
        ray = self._ray
        payloads = self._prepared([ray.put(Path(c.onnx).read_bytes()) for c in candidates])
        results: list[tuple[float, float] | None] = [None] * len(payloads)
        attempts = [0] * len(payloads)
        queue = list(range(len(payloads)))
        in_flight: dict = {}  # ref -> (candidate index, actor)
        while queue or in_flight:
            while queue and self._idle:
                i, actor = queue.pop(0), self._idle.pop(0)
                attempts[i] += 1
                in_flight[actor.time.remote(payloads[i])] = (i, actor)
            if not in_flight and not self._starting:
                actor, ready = self._start()  # every actor died: ask for a replacement
                self._starting[ready] = actor
            starting = {ref: actor for ref, actor in self._starting.items()}
            # waiting only on replacements is bounded by timeout_s: a resource with no live worker must not hang
            timeout = self.task_timeout_s if in_flight else self.timeout_s
            done, _ = ray.wait(list(in_flight) + list(starting), num_returns=1, timeout=timeout)
            if not done:
                if in_flight:
                    raise NoTargetWorker(f"advanced.measure.workers: no timing finished on {self.resource!r} within "
                                         f"{timeout:g} s")
                self.close()
                raise NoTargetWorker(self._no_worker(f"its workers died and none restarted within {timeout:g} s"))
            ref = done[0]
            if ref in starting:
                actor = self._starting.pop(ref)
                try:
                    ray.get(ref)
                    self._idle.append(actor)
                except ray.exceptions.RayActorError:
                    pass  # the replacement died too; the loop asks for another while work is left
                continue
            i, actor = in_flight.pop(ref)
            try:
                results[i] = tuple(ray.get(ref))
                self._idle.append(actor)
            except ray.exceptions.RayActorError:
                # the worker died mid-task (killed, node lost, out of memory): the task goes to another live actor
                # and a replacement is started without waiting on it (it joins when it answers)
                if attempts[i] >= MAX_ATTEMPTS:
                    raise NoTargetWorker(f"advanced.measure.workers: candidate {i} took down {attempts[i]} workers "
                                         f"holding {self.resource!r}; see their logs (ray logs)") from None
                queue.insert(0, i)
                self.replaced += 1
                actor, ready = self._start()
                self._starting[ready] = actor
            except ray.exceptions.RayTaskError as e:
                raise e.cause if isinstance(e.cause, Exception) else e from None
        if self._prepare is not None:
            self.build_sites += ray.get(self._sites, timeout=self.timeout_s)
            self._sites = []
        return results

    def close(self) -> None:
        for actor in [*self._idle, *self._starting.values()]:
            self._ray.kill(actor)
        self._idle, self._starting = [], {}


# --- choosing one, and the relative scale ------------------------------------------------------------------------

def make_measurer(spec: TargetSpec, original: Candidate, *, workers: str = "local", local_workers: int = 1,
                  resource: str | None = None, timeout_s: float = 60.0, backend=None,
                  notes: list[str] | None = None) -> Measurer:
    """`workers`: local | auto | ray://host:port (advanced.measure.workers); auto uses a running Ray cluster that
    offers the
    target resource, else the local pool (with a note)."""
    resource = resource or f"target:{spec.backend}"
    if workers == "local":
        return LocalMeasurer(spec, original, workers=local_workers, backend=backend)
    if workers == "auto":
        try:
            return RayMeasurer(spec, original, resource=resource, address="auto", timeout_s=timeout_s)
        except (InputError, NoTargetWorker) as e:
            if notes is not None:
                notes.append(f"advanced.measure.workers auto: timed locally ({e})")
            return LocalMeasurer(spec, original, workers=local_workers, backend=backend)
    if isinstance(workers, str) and workers.startswith("ray://") and len(workers) > len("ray://"):
        return RayMeasurer(spec, original, resource=resource, address=workers, timeout_s=timeout_s)
    raise InputError(f"advanced.measure.workers: {workers!r} is not local, auto or ray://host:port")


def engine_options(options: dict) -> dict:
    """The backend options that shape the engine (TensorRT's opt_level, ...), as cache-key extras; folders of the
    backend's own caches only speed its build up and are left out."""
    return {f"option:{k}": v for k, v in sorted(options.items()) if not isinstance(v, Path)}


class CandidateTimer:
    """ℓ(c) for several candidates at once (module docstring): cached pairs are read, the rest timed concurrently
    by the measurer and stored. `export(model) -> Candidate` writes a candidate's ONNX file; it is deleted after."""

    def __init__(self, measurer: Measurer, original_onnx: Path, spec: TargetSpec, *,
                 cache: MeasurementCache | None = None, export: Callable[[object], Candidate] | None = None,
                 remeasure: bool = False) -> None:
        self.measurer, self.spec, self.cache, self._export = measurer, spec, cache, export
        self.remeasure = remeasure  # time every candidate, replacing what the cache holds
        self._original = file_sha256(original_onnx)
        self._target = measurer.describe()
        self.reference_ms: float | None = None
        self.timed = 0  # candidates given a latency (fresh or cached)
        self.fresh = 0  # of those, timed now on a worker

    def key(self, onnx: Path):
        s = self.spec
        return make_key(candidate=file_sha256(onnx), original=self._original, backend=s.backend, precision=s.precision,
                        batch=s.batch, threads=s.threads, device=self._target["device"],
                        versions=self._target["versions"], extra=engine_options(s.options))

    def measure(self, model, name: str = "candidate") -> float:
        return self.measure_many([model])[0]

    def measure_many(self, models: Sequence) -> list[float]:
        """ℓ per model (or Candidate), in the order given."""
        candidates = [m if isinstance(m, Candidate) else self._export(m) for m in models]
        try:
            keys = [self.key(c.onnx) for c in candidates] if self.cache is not None else None
            pairs: list[tuple[float, float] | None] = [None] * len(candidates)
            if keys is not None and not self.remeasure:
                for i, key in enumerate(keys):
                    entry = self.cache.get(key)
                    if entry is not None:
                        pairs[i] = (entry.candidate_ms, entry.original_ms)
            missing = [i for i, p in enumerate(pairs) if p is None]
            if missing:
                fresh = self.measurer.measure([candidates[i] for i in missing])
                for i, (c_ms, o_ms) in zip(missing, fresh):
                    pairs[i] = (c_ms, o_ms)
                    if keys is not None:
                        self.cache.put(keys[i], c_ms, o_ms, self.spec.protocol())
        finally:
            if self._export is not None:
                for c, m in zip(candidates, models):
                    if c is not m:  # exported here: the file and anything the exporter wrote beside it
                        for f in Path(c.onnx).parent.glob(glob.escape(Path(c.onnx).name) + "*"):
                            f.unlink(missing_ok=True)
        out = []
        for c_ms, o_ms in pairs:
            if self.reference_ms is None:
                self.reference_ms = o_ms
            out.append(self.reference_ms * c_ms / o_ms)
        self.timed += len(out)
        self.fresh += len(missing)
        return out

    def summary(self) -> dict:
        return {"workers": self.measurer.where, "timed": self.timed, "timed_on_workers": self.fresh,
                "cache": self.cache.summary() if self.cache is not None else None}

    def close(self) -> None:
        self.measurer.close()
