"""The output folder: dfp-deploy replaces only what it provably wrote, keeps the user's files, cleans up after dead
builds, swaps under a lock and follows a symlinked --out."""

from __future__ import annotations

import importlib
import inspect
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from dfp_deploy import pipeline
from dfp_deploy.cli import main
from dfp_deploy.core import output
from dfp_deploy.core.atomic import write_json_atomic
from dfp_deploy.core.errors import InputError
from dfp_deploy.recipe import load_recipe

sequence = importlib.import_module("dfp_deploy.pipeline.build")  # the module; `pipeline.build` is the function

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def _real_build_into_signature():
    return inspect.signature(sequence._build_into)


def fake_build_into(recipe, recipe_path, work, stage, timed=True, *, files=None):
    """Stands in for the seconds-long real build: writes artifacts into `work` and returns a report dict with
    the keys build() reads, like pipeline/build.py's _build_into (whose signature the fixture checks)."""
    files = files or {"model.onnx": "onnx", "model.pt": "pt", "report.md": "# report\n"}
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    report = {"artifacts": {"report_json": pipeline.REPORT_NAME}}
    write_json_atomic(work / pipeline.REPORT_NAME, report)
    return report


@pytest.fixture
def fake_build(monkeypatch):
    """build(out, **files): the real pipeline.build (staging, marker, lock, swap) around a fake stage sequence."""
    assert (list(inspect.signature(fake_build_into).parameters)[:5]
            == list(_real_build_into_signature().parameters))

    def run(out: Path, files: dict | None = None):
        monkeypatch.setattr(sequence, "_build_into",
                            lambda r, p, w, s, t=True: fake_build_into(r, p, w, s, t, files=files))
        return pipeline.build(load_recipe(QUICKSTART, [], out=str(out)), QUICKSTART, quiet=True)

    return run


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_a_folder_with_only_a_report_json_is_refused_and_kept(tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "report.json").write_text("{}")
    (out / "notes.txt").write_text("keep")
    res = CliRunner().invoke(main, ["build", str(QUICKSTART), "--out", str(out), "--quiet"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "not a dfp-deploy output folder" in lines[0] and output.MARKER in lines[0]
    assert _tree(out) == {"notes.txt": b"keep", "report.json": b"{}"}


def test_rebuild_carries_the_users_files_into_the_new_output(fake_build, tmp_path):
    out = tmp_path / "out"
    fake_build(out, {"model.onnx": "first", "engines/a.plan": "a"})
    (out / "notes.txt").write_text("mine")
    (out / "engines" / "tuning.log").write_text("mine too")
    (out / "extra").mkdir()
    (out / "extra" / "x.csv").write_text("1,2")
    fake_build(out, {"model.onnx": "second", "engines/a.plan": "b"})
    tree = _tree(out)
    assert tree["model.onnx"] == b"second" and tree["engines/a.plan"] == b"b"
    assert tree["notes.txt"] == b"mine" and tree["engines/tuning.log"] == b"mine too"
    assert tree["extra/x.csv"] == b"1,2"
    manifest = json.loads(tree[output.MARKER])["files"]
    assert "notes.txt" not in manifest and "model.onnx" in manifest  # still the user's on the next rebuild
    assert _leftovers(tmp_path, "out") == []


def test_an_artifact_that_was_edited_is_not_deleted(fake_build, tmp_path):
    out = tmp_path / "out"
    fake_build(out)
    (out / "report.md").write_text("# my notes on this build\n")
    before = _tree(out)
    with pytest.raises(InputError, match=r"report\.md was changed after dfp-deploy wrote it"):
        fake_build(out)
    assert _tree(out) == before and _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("marker", ["{not json", json.dumps({"tool": "other"}),
                                    json.dumps({"tool": "dfp-deploy", "format": 1, "state": "output",
                                                "files": {"../victim.txt": {"sha256": "0" * 64}}})])
def test_a_damaged_or_forged_marker_is_refused(fake_build, tmp_path, marker):
    out = tmp_path / "out"
    out.mkdir()
    (out / output.MARKER).write_text(marker)
    (tmp_path / "victim.txt").write_text("precious")
    with pytest.raises(InputError, match="damaged or was not written by dfp-deploy"):
        fake_build(out)
    assert (tmp_path / "victim.txt").read_text() == "precious" and (out / output.MARKER).read_text() == marker


def test_a_users_file_named_like_a_new_artifact_refuses_the_swap(fake_build, tmp_path):
    out = tmp_path / "out"
    fake_build(out)
    (out / "model.int8.onnx").write_text("the user's own")
    before = _tree(out)
    with pytest.raises(InputError, match=r"model\.int8\.onnx was not written by dfp-deploy"):
        fake_build(out, {"model.onnx": "new", "model.int8.onnx": "new int8"})
    assert _tree(out) == before and _leftovers(tmp_path, "out") == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _staging_marker(folder: Path, pid: int, host: str | None = None) -> None:
    folder.mkdir()
    write_json_atomic(folder / output.MARKER, {**output._header("staging"), "pid": pid,
                                               "host": host or socket.gethostname()})
    (folder / "model.onnx").write_text("half")


def test_stale_staging_of_dead_builds_is_removed_and_nothing_else(fake_build, tmp_path):
    out = tmp_path / "out"
    dead = _dead_pid()
    _staging_marker(output.staging_path(out, dead), dead)
    unmarked = output.staging_path(out, dead + 1 if dead + 1 != os.getpid() else dead + 2)
    unmarked.mkdir()
    (unmarked / "thesis.tex").write_text("not ours")
    alive = output.staging_path(out, os.getppid())
    _staging_marker(alive, os.getppid())
    other_host = output.staging_path(out, dead - 1)
    _staging_marker(other_host, dead - 1, host="another-host")
    fake_build(out)
    assert not output.staging_path(out, dead).exists()
    assert (unmarked / "thesis.tex").read_text() == "not ours" and alive.is_dir() and other_host.is_dir()


def test_a_parked_previous_output_of_a_killed_swap_is_restored_or_removed(fake_build, tmp_path):
    out = tmp_path / "out"
    fake_build(out, {"model.onnx": "previous"})
    (out / "notes.txt").write_text("mine")
    dead = _dead_pid()
    parked = output.parked_path(out, dead)
    os.replace(out, parked)  # as a swap killed between its two renames leaves it
    output.remove_stale(out)
    assert _tree(out)["model.onnx"] == b"previous" and not parked.exists()

    os.replace(out, parked)
    fake_build(tmp_path / "new", {"model.onnx": "new"})
    os.replace(tmp_path / "new", out)  # killed after the second rename: the parked one is stale
    output.remove_stale(out)
    tree = _tree(out)
    assert tree["model.onnx"] == b"new" and tree["notes.txt"] == b"mine" and not parked.exists()


def test_the_swap_waits_for_the_lock(fake_build, tmp_path):
    out = tmp_path / "out"
    fake_build(out, {"model.onnx": "first"})
    errors = []

    def second():
        try:
            fake_build(out, {"model.onnx": "second"})
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)

    with output.locked(out):
        t = threading.Thread(target=second)
        t.start()
        t.join(timeout=1.0)
        # whatever the machine's speed: while the lock is held, the output is not touched
        assert (out / "model.onnx").read_text() == "first"
    t.join()
    assert not errors and (out / "model.onnx").read_text() == "second"
    assert _leftovers(tmp_path, "out") == []


def _race(out: str, tag: str) -> None:
    out = Path(out)
    stage = output.start_staging(out)
    (stage / "model.onnx").write_text(tag)
    output.commit(stage, out)


def test_concurrent_swaps_into_one_output_all_succeed(tmp_path):
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_race, args=(str(out), f"build {i}")) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0] * 6
    found = output.check_replaceable(out)
    assert found is not None and found.owned == ("model.onnx",) and found.foreign == ()
    assert _leftovers(tmp_path, "out") == []


def test_a_symlinked_out_stays_a_link_to_the_rebuilt_folder(fake_build, tmp_path):
    real = tmp_path / "real"
    fake_build(real, {"model.onnx": "first"})
    link = tmp_path / "link"
    link.symlink_to(real)
    report = fake_build(link, {"model.onnx": "second"})
    assert link.is_symlink() and Path(os.readlink(link)) == real
    assert (link / "model.onnx").read_text() == "second" and report["artifacts"]["dir"] == str(link)
    assert _leftovers(tmp_path, "link") == [] and _leftovers(tmp_path, "real") == []


def test_a_finished_staging_folder_killed_before_its_swap_is_removed(fake_build, tmp_path):
    out = tmp_path / "out"
    dead = _dead_pid()
    stage = output.staging_path(out, dead)
    stage.mkdir()
    (stage / "model.onnx").write_text("finished")
    marker = output.write_marker(stage)
    write_json_atomic(stage / output.MARKER, {**marker, "pid": dead})
    fake_build(out)
    assert not stage.exists() and (out / "model.onnx").read_text() == "onnx"


def test_a_users_file_that_cannot_move_keeps_the_parked_folder_and_says_so(fake_build, tmp_path, capsys):
    out = tmp_path / "out"
    fake_build(out, {"model.onnx": "first", "engines/a.plan": "a"})
    (out / "engines" / "tuning.log").write_text("mine")
    fake_build(out, {"model.onnx": "second", "engines": "now a file"})
    parked = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert (out / "engines").read_text() == "now a file" and len(parked) == 1
    assert _tree(parked[0]) == {"engines/tuning.log": b"mine"}  # the user's file, and nothing of ours
    assert "engines/tuning.log" in capsys.readouterr().err
