"""Content-addressed store of candidate timings on a target, so a second search or build reuses what was measured.

An entry is one interleaved run of a candidate against the original (measure/workers.py, or a build's before/after
timing, pipeline/engine_step.py): the candidate's p50, the original's p50 in that run and their ratio, and for a build
every engine's statistics. It is filed under the sha256 of its key: the candidate's ONNX bytes (plan and weights
alike), the original's ONNX bytes, backend, precision, batch, threads, the device that timed it, the runtime versions
there and whatever else decides the timing (`extra`: other engines timed in the same run, a build's protocol, backend
options). Timings of one run are stored together and only together: a pair is never assembled from two runs. A cached ratio is only valid under exactly that key, so an entry whose recorded key
differs from the key asked for (copied from another device, written by another runtime version, or a damaged file)
is refused: never used, counted, and named in `notes`; the candidate is then timed again and the entry replaced.
Entries are written atomically (core/atomic.py), so an interrupted search never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dfp_deploy.core.atomic import write_json_atomic

FORMAT = 1  # bumped when an entry's meaning changes; an entry of another format is refused like another device's


@dataclass(frozen=True)
class MeasurementKey:
    candidate: str  # sha256 of the candidate's ONNX bytes
    original: str  # sha256 of the original's ONNX bytes
    backend: str
    precision: str
    batch: int
    threads: int  # 0: the backend's default
    device: str  # where the timing ran (the worker's device, not the machine running the search)
    versions: tuple[tuple[str, str], ...]  # (library, version), sorted
    format: int = FORMAT
    extra: tuple[tuple[str, str], ...] = ()  # (name, value), sorted; absent from the digest when empty

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    def as_dict(self) -> dict:
        d = asdict(self)
        d["versions"] = dict(self.versions)
        # a key without extras digests as before extras existed, so the search's entries stay addressable
        if self.extra:
            d["extra"] = dict(self.extra)
        else:
            del d["extra"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> MeasurementKey:
        return cls(**{**d, "versions": _pairs(d["versions"]), "extra": _pairs(d.get("extra", {}))})


def _pairs(d: Mapping) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in d.items() if v is not None))


def make_key(*, candidate: str, original: str, backend: str, precision: str, batch: int, threads: int | None,
             device: str, versions: Mapping[str, str | None], extra: Mapping | None = None) -> MeasurementKey:
    return MeasurementKey(candidate, original, backend, precision, int(batch), int(threads or 0), str(device),
                          _pairs(versions), extra=_pairs(extra or {}))


@dataclass(frozen=True)
class Entry:
    key: MeasurementKey
    candidate_ms: float  # p50 of the candidate
    original_ms: float  # p50 of the original, interleaved with it in the same run
    protocol: dict = field(default_factory=dict)  # warmup, runs, rounds of that run
    stats: dict = field(default_factory=dict)  # engine name -> LatencyStats.as_dict() of that run (builds)

    @property
    def ratio(self) -> float:
        return self.candidate_ms / self.original_ms

    def as_dict(self) -> dict:
        return {"key": self.key.as_dict(), "candidate_p50_ms": self.candidate_ms,
                "original_p50_ms": self.original_ms, "ratio": self.ratio, "protocol": dict(self.protocol),
                **({"stats": self.stats} if self.stats else {})}


class MeasurementCache:
    """A folder of entries, `<digest[:2]>/<digest>.json`; any number of processes or machines may share it."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0
        self.refused = 0
        self.notes: list[str] = []

    def path_for(self, key: MeasurementKey) -> Path:
        digest = key.digest()
        return self.folder / digest[:2] / f"{digest}.json"

    def get(self, key: MeasurementKey) -> Entry | None:
        """The entry measured under exactly `key`, or None (a miss, or a refused entry: see the module docstring)."""
        path = self.path_for(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            stored = MeasurementKey.from_dict(d["key"])
            entry = Entry(stored, float(d["candidate_p50_ms"]), float(d["original_p50_ms"]), dict(d["protocol"]),
                          {str(k): dict(v) for k, v in d.get("stats", {}).items()})
            valid = entry.candidate_ms > 0 and entry.original_ms > 0 and all(
                float(v["p50_ms"]) > 0 for v in entry.stats.values())
        except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
            return self._refuse(path, f"it is not a measurement entry ({type(e).__name__})")
        if not valid:
            return self._refuse(path, "its latencies are not positive")
        if stored != key:
            changed = sorted(k for k, v in key.as_dict().items() if stored.as_dict().get(k) != v)
            return self._refuse(path, f"it was measured under another key ({', '.join(changed)} differ: "
                                      f"{stored.device} with {dict(stored.versions)})")
        self.hits += 1
        return entry

    def put(self, key: MeasurementKey, candidate_ms: float, original_ms: float, protocol: Mapping,
            stats: Mapping | None = None) -> Entry:
        entry = Entry(key, float(candidate_ms), float(original_ms), dict(protocol), dict(stats or {}))
        write_json_atomic(self.path_for(key), entry.as_dict())
        return entry

    def _refuse(self, path: Path, why: str) -> None:
        self.refused += 1
        self.misses += 1
        self.notes.append(f"measurement cache: refused {path.name}: {why}; timed again and replaced")
        return None

    def summary(self) -> dict:
        return {"folder": str(self.folder), "hits": self.hits, "misses": self.misses, "refused": self.refused}
