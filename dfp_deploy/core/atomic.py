"""Write output files atomically: a temp file in the same directory, renamed into place only on success.

`os.replace` within one directory (one filesystem) is atomic on POSIX and Windows, so a reader sees either the
old file or the complete new one, never a half-written file; an interrupted build leaves at most a hidden
`.<name>.tmp-<pid>` that no consumer looks for (and which the context manager removes on any exception).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def temp_path_for(final: Path) -> Path:
    """The hidden sibling that `atomic_path` writes to before renaming."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path next to `final`; on success move it onto `final`, on any exception delete it and re-raise."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(final)
    try:
        yield temp
        os.replace(temp, final)
    except BaseException:
        # BaseException too: a Ctrl-C mid-write must not leave a temp file behind
        temp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            # durable before the rename, so a crash right after cannot expose an empty file under the final name
            os.fsync(f.fileno())


def _json_default(obj):
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json_atomic(path: Path, obj) -> None:
    """JSON with indent=2, keys in insertion order, trailing newline; numpy scalars/arrays and Paths allowed."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n")
