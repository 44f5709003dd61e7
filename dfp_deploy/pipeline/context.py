"""What a build needs from its surroundings: the per-user cache, stored fingerprints, progress lines and bars."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dfp_deploy.core.progress import progress_bar
from dfp_deploy.recipe import Recipe
from dfp_deploy.recipe.resolve import BuildPlan, resolve


def cache_dir() -> Path:
    """Per-user cache (synthetic inputs, TensorRT timing caches): $XDG_CACHE_HOME/dfp-deploy or ~/.cache/dfp-deploy."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dfp-deploy"


def resolve_recipe(recipe: Recipe) -> BuildPlan:
    """The recipe's BuildPlan on this machine (its stored fingerprints and cache)."""
    return resolve(recipe, fingerprint=stored_multiple, cache=cache_dir())


def output_dir(recipe: Recipe, recipe_path: Path | None) -> Path:
    if recipe.output.dir:
        return Path(recipe.output.dir)
    stem = recipe_path.stem if recipe_path else "default"
    return Path("runs") / stem


# the sweep a build measures by itself: 65..128 channels covers U_32 of every count, in 3 interleaved rounds instead of
# 5; about 0.4 of `dfp-deploy fingerprint`'s 33..128 in 5 (docs/research/latency-fingerprint.md, its cost)
AUTO_FINGERPRINT_CHANNELS = tuple(range(65, 129))
AUTO_FINGERPRINT_ROUNDS = 3


def measure_target_fingerprint(plan: BuildPlan, *, quiet: bool) -> float:
    """Measure and store the target's latency fingerprint with the build's short sweep; the seconds it took."""
    t = plan.target
    started = time.perf_counter()
    fingerprint(t.backend, t.precision, t.batch, threads=t.threads, channels=AUTO_FINGERPRINT_CHANNELS,
                rounds=AUTO_FINGERPRINT_ROUNDS, quiet=quiet)
    return round(time.perf_counter() - started, 1)


def fingerprint_report(plan: BuildPlan, measured_s: float | None) -> dict | None:
    """The fingerprint a build used, for report.json: its file, multiple, swept counts, the measured cost of not
    rounding to its multiple, and what measuring it took in this build (None: read from the store)."""
    t = plan.target
    if plan.select.round_to_source == "recipe" or t.fingerprint == "table":
        return None
    stored = stored_fingerprint(t.backend, t.precision, t.batch, t.threads)
    if stored is None:
        return None
    fingerprint, path = stored
    return {"file": str(path), "device": fingerprint.key.device, "multiple": fingerprint.multiple,
            "channels": [fingerprint.channels[0], fingerprint.channels[-1]],
            "cost_of_not_rounding": round(fingerprint.cost_of_not_rounding(), 4),
            "rounding_costs": fingerprint.rounding_costs, "measured_s": measured_s}


def fingerprint_key(backend, backend_name: str, precision: str, batch: int, size: int, threads: int | None):
    from dfp_deploy.export.probe import PROBE_OPSET
    from dfp_deploy.measure import fingerprint as fp

    info = backend.info()
    return fp.make_key(device=info.device, backend=backend_name, precision=precision, batch=batch, size=size,
                       threads=threads, versions={backend_name: info.version, "probe-opset": str(PROBE_OPSET)})


def stored_fingerprint(backend_name: str, precision: str, batch: int, threads: int | None, size: int = 14):
    """(Fingerprint, path) stored for exactly this target, or None (also when the backend cannot run here)."""
    from dfp_deploy.backends.registry import get_backend
    from dfp_deploy.measure import fingerprint as fp

    backend = get_backend(backend_name)
    if not backend.info().available:
        return None
    key = fingerprint_key(backend, backend_name, precision, batch, size, threads)
    folder = cache_dir() / "fingerprints"
    stored = fp.load(key, folder)
    return (stored, folder / key.file_name()) if stored is not None else None


def stored_multiple(backend_name: str, precision: str, batch: int, threads: int | None) -> tuple[int, str] | None:
    """The channel multiple of the target's stored fingerprint and the file it is stored in (the resolver's
    lookup), or None."""
    stored = stored_fingerprint(backend_name, precision, batch, threads)
    return (stored[0].multiple, str(stored[1])) if stored is not None else None


@dataclass
class Stages:
    """Numbered progress lines on stderr, so a user sees where a slow build is; bars for the slow steps inside."""

    total: int
    quiet: bool = False
    done: int = 0
    started: float = field(default_factory=time.perf_counter)

    def __call__(self, what: str) -> None:
        self.done += 1
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            print(f"[{self.done}/{self.total}] {what} (t={elapsed:.1f}s)", file=sys.stderr, flush=True)

    def bar(self, key: str):
        """The progress callback for generating the synthetic inputs a recipe section names (None when quiet)."""
        return progress_bar(f"{key} synthetic inputs", "step", enabled=not self.quiet)


def fingerprint(backend_name: str, precision: str, batch: int, *, size: int = 14, threads: int | None = None,
                channels=None, runs: int = 50, rounds: int = 5, refresh: bool = False, folder: Path | None = None,
                quiet: bool = False):
    """The target's latency fingerprint (measure/fingerprint.py): loaded when one exists for exactly this target,
    else measured on one-conv probes built by the real backend, then stored. Returns (Fingerprint, path, reused)."""
    import tempfile

    import numpy as np

    from dfp_deploy.backends.registry import get_backend
    from dfp_deploy.core.errors import BackendUnavailable
    from dfp_deploy.export.probe import write_conv_probe
    from dfp_deploy.measure import fingerprint as fp
    from dfp_deploy.recipe.resolve import qdq_style

    backend = get_backend(backend_name)
    info = backend.info()
    if not info.available:
        raise BackendUnavailable(f"--backend: {backend_name} is unavailable here: {info.reason}")
    folder = Path(folder) if folder is not None else cache_dir() / "fingerprints"
    key = fingerprint_key(backend, backend_name, precision, batch, size, threads)
    if not refresh:
        stored = fp.load(key, folder)
        if stored is not None:
            return stored, folder / key.file_name(), True
    x = np.random.default_rng(0).standard_normal((batch, 1, size, size)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="dfp-fingerprint-") as tmp:
        def make_runner(c: int):
            path = write_conv_probe(Path(tmp) / f"probe{c}.onnx", c, batch=batch, size=size, precision=precision,
                                    qdq_style=qdq_style(backend_name))
            engine = backend.build(path, precision=precision, threads=threads, out_dir=Path(tmp))
            return engine.prepare(np.repeat(x, c, axis=1))

        result = fp.measure(key, make_runner, **({"channels": tuple(channels)} if channels else {}), runs=runs,
                            rounds=rounds, threads=threads, progress=not quiet)
    return result, fp.save(result, folder), False
