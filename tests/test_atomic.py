"""Atomic output files: nothing half-written under the final name, ever."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dfp_deploy.core.atomic import atomic_path, temp_path_for, write_json_atomic, write_text_atomic


def test_exception_leaves_neither_temp_nor_final(tmp_path):
    final = tmp_path / "engine.plan"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as temp:
            temp.write_bytes(b"half an engine")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_the_previous_file(tmp_path):
    final = tmp_path / "report.json"
    final.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as temp:
            temp.write_text("new but incomplete")
            raise KeyboardInterrupt
    assert final.read_text() == "old" and list(tmp_path.iterdir()) == [final]


def test_success_replaces_an_existing_file(tmp_path):
    final = tmp_path / "sub" / "model.onnx"
    final.parent.mkdir()
    final.write_text("old")
    with atomic_path(final) as temp:
        assert temp.parent == final.parent and temp.name.startswith(".model.onnx.tmp-")
        assert temp == temp_path_for(final)
        temp.write_text("new")
        assert final.read_text() == "old"  # not visible until the context exits
    assert final.read_text() == "new" and sorted(p.name for p in final.parent.iterdir()) == ["model.onnx"]


def test_write_json_handles_numpy_and_keeps_key_order(tmp_path):
    path = tmp_path / "out" / "r.json"
    write_json_atomic(path, {"z": np.float32(1.5), "a": np.int64(3), "ok": np.bool_(True), "v": np.arange(2)})
    text = path.read_text()
    assert text.endswith("}\n") and text.index('"z"') < text.index('"a"') and '\n  "a": 3' in text
    assert json.loads(text) == {"z": 1.5, "a": 3, "ok": True, "v": [0, 1]}


def test_write_text_and_unserialisable_json(tmp_path):
    write_text_atomic(tmp_path / "r.md", "# hi\n")
    assert (tmp_path / "r.md").read_text() == "# hi\n"
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "bad.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.md"]
