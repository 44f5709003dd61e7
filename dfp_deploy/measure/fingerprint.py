"""Latency fingerprint of a target: how one conv's latency responds to its channel count, and the multiple it wants.

Rule (docs/methods/latency_fingerprint.md): with t(c) the p50 latency of a c-channel probe and U_m(c) = m*ceil(c/m),
rounding a count up to a multiple of m costs E_m = mean_c max(0, t(U_m(c)) / t(c) - 1). A target that runs a
partly filled block of m channels as a whole one pays nothing to round up to m (E_m ~ 0), while on a smooth
target E_m grows with m. The fingerprint's multiple is the largest candidate with E_m <= FREE_COST. Counts off
the target's fast path (e.g. not a multiple of 4 on ONNX Runtime's blocked CPU convs) are slower than the next
multiple up and cost nothing to round, so they never hold the multiple back.

Stored as a small JSON keyed by (device, backend, precision, batch, size, threads, library versions); a file
measured under another key is refused, so a fingerprint never leaks to another machine or version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dfp_deploy.core.atomic import write_json_atomic
from dfp_deploy.core.errors import InputError
from dfp_deploy.measure.latency import time_interleaved

CANDIDATES = (1, 2, 4, 8, 16, 32)
# rounding up may cost at most 3 % latency on average: above the +1 % that 3 % timing noise adds on its own, below
# the ~4.7 % that rounding to 4 costs a smooth quadratic cost curve at 64 channels
FREE_COST = 0.03
DEFAULT_CHANNELS = tuple(range(33, 129))  # the largest candidate's block thrice (U_32 of 33..128 is swept too)


@dataclass(frozen=True)
class FingerprintKey:
    device: str
    backend: str
    precision: str
    batch: int
    size: int
    threads: int  # 0: the backend's default
    versions: tuple[tuple[str, str], ...]  # (library, version), sorted

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def file_name(self) -> str:
        return f"{self.backend}-{self.precision}-b{self.batch}-s{self.size}-t{self.threads}-{self.digest()}.json"


@dataclass(frozen=True)
class Fingerprint:
    key: FingerprintKey
    channels: tuple[int, ...]
    p50_ms: tuple[float, ...]
    multiple: int
    rounding_costs: dict  # candidate multiple (as str) -> E_m, the mean cost of rounding up to it

    def cost_of_not_rounding(self) -> float:
        """How much slower, on average, a swept count that is not a multiple is than the next multiple up
        (t(c) / t(U_m(c)) - 1 over those counts): positive means unrounded counts are slower despite fewer channels."""
        times = dict(zip(self.channels, self.p50_ms))
        m = self.multiple
        ratios = [times[c] / times[m * -(-c // m)] for c in self.channels if c % m and m * -(-c // m) in times]
        return float(np.mean(ratios) - 1.0) if ratios else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["key"]["versions"] = dict(self.key.versions)
        d["cost_of_not_rounding"] = self.cost_of_not_rounding()
        return d


def rounding_cost(channels: Sequence[int], times: Sequence[float], multiple: int) -> float | None:
    """E_m: mean latency increase of rounding each swept count up to a multiple of `multiple` (None when a
    rounded-up count was not swept)."""
    t = dict(zip(channels, times))
    excess = []
    for c in channels:
        up = multiple * -(-c // multiple)
        if up not in t:
            return None
        excess.append(max(0.0, t[up] / t[c] - 1.0))
    return float(np.mean(excess))


def step_multiple(channels: Sequence[int], times: Sequence[float],
                  candidates: Sequence[int] = CANDIDATES) -> tuple[int, dict[int, float | None]]:
    """The largest candidate multiple that costs at most FREE_COST to round up to, and E_m for every candidate."""
    if len(channels) != len(times) or len(channels) < 8:
        raise InputError("fingerprint: need at least 8 (channels, time) points of equal count")
    if min(times) <= 0:
        raise InputError("fingerprint: latencies must be positive")
    costs = {m: rounding_cost(channels, times, m) for m in candidates}
    free = [m for m, cost in costs.items() if cost is not None and cost <= FREE_COST]
    return (max(free) if free else 1), costs


def measure(key: FingerprintKey, make_runner: Callable[[int], Callable[[], float | None]], *,
            channels: Sequence[int] = DEFAULT_CHANNELS, warmup: int = 5, runs: int = 50, rounds: int = 5,
            threads: int | None = None, progress: bool = False) -> Fingerprint:
    """Time one probe per channel count, interleaved (load drifts hit every count alike), and fit the step."""
    if progress:
        import sys

        from tqdm import tqdm

        channels_built = tqdm(channels, desc="building probes", unit="engine", file=sys.stderr, leave=False,
                              disable=not sys.stderr.isatty())
    else:
        channels_built = channels
    runners = {str(c): make_runner(c) for c in channels_built}
    stats = time_interleaved(runners, warmup=warmup, runs=runs, rounds=rounds, batch=key.batch, threads=threads,
                             progress=progress)
    times = tuple(stats[str(c)].p50_ms for c in channels)
    multiple, costs = step_multiple(channels, times)
    return Fingerprint(key, tuple(channels), times, multiple, {str(m): cost for m, cost in costs.items()})


def save(fingerprint: Fingerprint, folder: Path) -> Path:
    path = Path(folder) / fingerprint.key.file_name()
    write_json_atomic(path, fingerprint.as_dict())
    return path


def load(key: FingerprintKey, folder: Path) -> Fingerprint | None:
    """The stored fingerprint for exactly this key, or None; a file whose recorded key differs is refused."""
    path = Path(folder) / key.file_name()
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        stored = FingerprintKey(**{**d["key"], "versions": tuple(sorted(d["key"]["versions"].items()))})
        if stored != key:
            raise InputError(f"fingerprint: {path} was measured on {stored.device} with {dict(stored.versions)}, "
                             f"not this target; delete it or measure again with --refresh")
        return Fingerprint(stored, tuple(d["channels"]), tuple(d["p50_ms"]), int(d["multiple"]),
                           dict(d["rounding_costs"]))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"fingerprint: {path} is not a fingerprint file ({type(e).__name__}); delete it") from e


def make_key(*, device: str, backend: str, precision: str, batch: int, size: int, threads: int | None,
             versions: Mapping[str, str | None]) -> FingerprintKey:
    return FingerprintKey(device, backend, precision, int(batch), int(size), int(threads or 0),
                          tuple(sorted((k, str(v)) for k, v in versions.items() if v is not None)))
