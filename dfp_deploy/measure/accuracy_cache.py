"""Content-addressed store of an original engine's top-1, so the builds of one model on one image set evaluate it once.

Every build evaluates the model the user has next to the one they ship; a second recipe, a bench grid's variants or a
rebuild for another precision would evaluate the unchanged original again (minutes on a large image set). An entry
is one measured top-1 and its image count, filed under the sha256 of its key: the engine's ONNX bytes, the image
file's bytes and the selection [start, start + limit) of it, the preprocessing, the backend and its options, the
precision, batch and batch mode, threads, the device and the runtime version. Anything else could change a logit's
argmax, so it is in the key; an entry whose recorded key differs from the one asked for (a damaged or copied file)
is never used. Only the built-in top-1 is stored: a user's `eval.metric` is code this store cannot key.
Entries are written atomically (core/atomic.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from dfp_deploy.core.atomic import write_json_atomic

FORMAT = 1


def accuracy_key(**fields) -> dict:
    """The key as a plain dict of strings and numbers (sorted when stored), e.g. graph=<sha256>, data=<sha256>, ..."""
    return {"format": FORMAT, **{k: v if isinstance(v, (int, float, str, type(None))) else str(v)
                                 for k, v in fields.items()}}


class AccuracyCache:
    """A folder of entries `<sha256 of the key>.json` holding {"key": ..., "top1": ..., "n": ...}."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _path(self, key: Mapping) -> Path:
        digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()
        return self.folder / f"{digest}.json"

    def get(self, key: Mapping) -> tuple[float, int] | None:
        """(top-1 percent, images) stored under exactly `key`, else None."""
        try:
            entry = json.loads(self._path(key).read_text())
            if entry["key"] != json.loads(json.dumps(dict(key), sort_keys=True)):
                return None
            return float(entry["top1"]), int(entry["n"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: Mapping, top1: float, n: int) -> None:
        """Best effort: a full or read-only cache never fails a build."""
        try:
            write_json_atomic(self._path(key), {"key": dict(key), "top1": float(top1), "n": int(n)})
        except OSError:
            pass
