"""Progress bars on stderr for long steps: a `(done, total)` callback that a stage calls and tqdm draws."""

from __future__ import annotations

import sys
from typing import TextIO


class ProgressBar:
    """A callable `(done, total)`: the bar opens on the first call and closes when done reaches total, so a stage
    that calls it never manages a bar's lifetime (and a stage that finds its result cached never opens one)."""

    def __init__(self, desc: str, unit: str, stream: TextIO | None = None):
        self.desc, self.unit, self.stream = desc, unit, stream if stream is not None else sys.stderr
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            # a log file or pipe would keep every redraw; the bar is for a person watching a terminal
            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=self.stream, leave=False,
                             disable=not self.stream.isatty())
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_bar(desc: str, unit: str, *, enabled: bool = True, stream: TextIO | None = None) -> ProgressBar | None:
    """A ProgressBar, or None (no progress reported) when not `enabled` (e.g. `--quiet`)."""
    return ProgressBar(desc, unit, stream) if enabled else None
