"""Interrupts: SIGINT, SIGTERM and SIGHUP at any stage end with one line and 128+signal, the previous output
byte-identical and no staging folder left; the ONNX exporter's fallback never swallows one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from dfp_deploy.core import interrupts, output
from dfp_deploy.export import onnx_export

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def _no_recorded_signal():
    yield
    interrupts._received = None


def _tiny():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _no_fallback(monkeypatch):
    calls = []
    monkeypatch.setattr(onnx_export, "_export_torchscript", lambda *a, **k: calls.append(a))
    return calls


def test_an_interrupt_wrapped_in_a_capture_error_is_not_retried(monkeypatch, tmp_path):
    def capture(*a, **k):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("torch.export could not capture the model") from e

    monkeypatch.setattr(onnx_export, "_export_dynamo", capture)
    fallback = _no_fallback(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(_tiny(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert fallback == [] and list(tmp_path.iterdir()) == []


def test_a_signal_the_library_turned_into_an_error_stops_the_export(monkeypatch, tmp_path):
    def capture(*a, **k):
        interrupts.record(signal.SIGTERM)  # what the handler did before torch replaced its exception
        raise RuntimeError("graph break")

    monkeypatch.setattr(onnx_export, "_export_dynamo", capture)
    fallback = _no_fallback(monkeypatch)
    with pytest.raises(interrupts.Interrupted) as info:
        onnx_export.export_onnx(_tiny(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert info.value.exit_code == 143 and fallback == [] and list(tmp_path.iterdir()) == []


def test_a_signal_lost_inside_the_exporter_stops_after_it(monkeypatch, tmp_path):
    def export(model, x, temp, dynamic_batch, opset, optimize=True, names=("logits",)):  # _export_dynamo's
        temp.write_bytes(b"an exported model")
        interrupts.record(signal.SIGINT)  # raised in a destructor: printed and dropped by the interpreter

    monkeypatch.setattr(onnx_export, "_export_dynamo", export)
    with pytest.raises(interrupts.Interrupted):
        onnx_export.export_onnx(_tiny(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_signal_during_the_swap_finishes_it_then_says_so(monkeypatch, tmp_path):
    out = tmp_path / "out"
    stage = output.start_staging(out)
    (stage / "model.onnx").write_text("first")
    output.commit(stage, out)
    (out / "notes.txt").write_text("mine")
    real = output._carry_over

    def carry_over(*a):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)

    monkeypatch.setattr(output, "_carry_over", carry_over)
    stage = output.start_staging(out)
    (stage / "model.onnx").write_text("second")
    with interrupts.handled(), pytest.raises(interrupts.Interrupted) as info:
        output.commit(stage, out)
    assert info.value.output == str(out) and info.value.exit_code == 143
    assert interrupts.describe(info.value).startswith("interrupted (SIGTERM) after the new output was in place")
    assert (out / "model.onnx").read_text() == "second" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _previous_output(folder: Path) -> dict:
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"previous engine")
    (folder / "report.json").write_text('{"previous": true}\n')
    output.write_marker(folder)
    (folder / "notes.txt").write_text("the user's")
    return _tree(folder)


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# signal, the progress line to send it after, seconds to wait after that line (inside torch.export)
CASES = [(signal.SIGINT, "[4/8] exporting ONNX", 0.5), (signal.SIGTERM, "[4/8] exporting ONNX", 1.0),
         (signal.SIGHUP, "[1/8] loading model", 0.2)]


@pytest.mark.slow
def test_real_signals_keep_the_previous_output(tmp_path):
    """Real subprocesses on the quickstart recipe, one per signal, run side by side to keep the test short."""
    runs = []
    for sig, line, delay in CASES:
        out = tmp_path / sig.name / "out"
        out.parent.mkdir()
        before = _previous_output(out)
        # an empty cache of its own: the export really runs (a cached export would be over before the signal)
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / f"cache-{sig.name}")}
        proc = subprocess.Popen([sys.executable, "-m", "dfp_deploy.cli", "build", str(QUICKSTART), "--out", str(out),
                                 "--set", "measure.latency=false", "--set", "compress.reconstruct=none",
                                 "--set", "compress.prune.importance=l2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path, env=env)
        runs.append((sig, line, delay, out, before, proc))

    def interrupt(sig, line, delay, proc) -> list[str]:
        # each build is watched by its own thread: read one after the other, a later build could finish before
        # its turn and the signal would land after the build
        seen = []
        while not any(s.startswith(line) for s in seen):
            text = proc.stderr.readline()
            if not text:
                return seen + [f"(the build ended before {line!r})"]
            seen.append(text)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        return seen + err.splitlines(keepends=True)

    try:
        with ThreadPoolExecutor(max_workers=len(runs)) as pool:
            lines = list(pool.map(lambda run: interrupt(run[0], run[1], run[2], run[5]), runs))
        for (sig, line, delay, out, before, proc), printed in zip(runs, lines):
            messages = [s for s in printed if not s.startswith("[")]
            assert proc.returncode == 128 + sig, (sig.name, proc.returncode, messages)
            assert [m.strip() for m in messages] == [f"interrupted ({sig.name}): the output folder was left as it "
                                                     "was, no staging folder left"], messages
            assert _tree(out) == before
            assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    finally:
        for *_, proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
