"""The progress-bar callback stages are handed: drawn on a terminal, silent in a pipe, absent when quiet."""

from __future__ import annotations

import io

from dfp_deploy.core.progress import ProgressBar, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_sees_the_bar_and_it_closes_at_the_total():
    stream = Terminal()
    bar = progress_bar("synthetic inputs", "step", stream=stream)
    for done in range(1, 5):
        bar(done, 4)
    drawn = stream.getvalue()
    assert "synthetic inputs" in drawn and "0/4" in drawn
    assert drawn.endswith("\r") and bar._bar is None  # closed and erased: a later phase opens a fresh bar


def test_a_pipe_gets_nothing_and_quiet_gets_no_callback():
    stream = io.StringIO()
    bar = ProgressBar("synthetic inputs", "step", stream)
    bar(1, 2)
    bar(2, 2)
    assert stream.getvalue() == ""
    assert progress_bar("synthetic inputs", "step", enabled=False) is None
