"""Hostile but fair input through the CLI: every case exits 2 with one bounded line naming the key or file, before
any work, and nothing a recipe names is executed unless it can build a model."""

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfp_deploy.cli import MAX_MESSAGE, _quiet_libraries, main, one_line
from dfp_deploy.models.cifar_resnet import cifar_resnet


PROGRESS = re.compile(r"\[\d+/\d+\] ")  # the build's stage lines


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(res, *names: str) -> str:
    """Exit 2, no traceback, exactly one stderr line of bounded length that names each of `names`."""
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if not PROGRESS.match(line)]
    assert len(lines) == 1, res.stderr[:2000]
    line = lines[0]
    assert line.startswith("error: ") and len(line) <= MAX_MESSAGE, line
    for name in names:
        assert name in line, line
    return line


@pytest.fixture
def empty(tmp_path: Path) -> Path:
    p = tmp_path / "e.yaml"
    p.write_text("{}\n")
    return p


def write(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "r.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


# a few hundred bytes that expand to 2^20 leaves once anything walks them (the bomb was 418 bytes)
ALIAS_BOMB = "a: &a [x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}]\n" for p, c in zip("abcdefghijklmnopqrs",
                                                                                      "bcdefghijklmnopqrst")) \
             + "seed: *t\n"


@pytest.mark.parametrize("text, names", [
    (ALIAS_BOMB, ["aliases"]),
    ("seed: " + "[" * 5000 + "]" * 5000 + "\n", ["nested deeper"]),
    (b"model:\n  name: caf\xe9\n", ["not UTF-8", "r.yaml"]),
    ("seed: 18446744073709551616\n", ["seed"]),
    ("seed: " + "9" * 5000 + "\n", ["cannot be read"]),
    ("target:\n  threads: 1000000000000\n", ["target.threads"]),
    ("advanced:\n  measure:\n    parity_samples: 1000000000000\n", ["advanced.measure.parity_samples"]),
    ("model:\n  input_size: [3, 1000000, 1000000]\n", ["model.input_size"]),
    ("model:\n  weights: " + "w" * 5000 + "\n", ["model.weights"]),
    ("eval:\n  data: " + "d" * 5000 + "\n", ["eval.data"]),
    ("compress:\n  prune:\n    ratio: .nan\n", ["compress.prune.ratio", "finite"]),
    ("advanced:\n  compress:\n    quantize:\n      range_k: nan\n", ["advanced.compress.quantize.range_k", "finite"]),
    ("search:\n  ratio: 'nan'\n", ["search.ratio", "finite"]),
    ("advanced:\n  compress:\n    calibration:\n      lr: .inf\n", ["advanced.compress.calibration.lr", "finite"]),
    ("advanced:\n  search:\n    min_keep: -.inf\n", ["advanced.search.min_keep", "finite"]),
    ("compress:\n  prune:\n    ratio: 0.5\ncompress:\n  reconstruct: udfc\n", ["duplicate key 'compress'"]),
    ("target:\n  batch: 1\n  batch: 2\n", ["duplicate key 'batch'"]),
    ('target:\n  "bat\\nch": 3\n', ["unknown key"]),
    ("compress:\n  prune:\n    round_to: 1000000000000000000000000000000\n", ["compress.prune.round_to"]),
])
def test_hostile_recipe_is_one_line_exit_2(tmp_path, text, names):
    line = assert_refused(run("inspect", write(tmp_path, text)), *names)
    assert "Traceback" not in line


def test_alias_bomb_stays_small(tmp_path):
    res = run("build", write(tmp_path, ALIAS_BOMB), "--out", tmp_path / "o")
    assert_refused(res, "aliases")
    assert len(res.output) < 1000
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out, names", [
    ("/dev/null/x", ["--out", "/dev/null"]),
    ("/proc/self/x", ["--out", "/proc/self/x"]),
    ("o" * 300, ["--out", "300"]),
])
def test_unusable_output_folder_is_refused_before_any_work(empty, out, names):
    assert_refused(run("build", empty, "--out", out), *names)


def test_output_folder_name_leaves_room_for_the_staging_folder(empty, tmp_path):
    assert_refused(run("build", empty, "--out", tmp_path / ("o" * 240)), "--out", "at most")


def test_output_under_a_file_is_refused(empty, tmp_path):
    (tmp_path / "f").write_text("x")
    assert_refused(run("build", empty, "--out", tmp_path / "f" / "o"), "is a file")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere; needs a plain user")
def test_unwritable_output_parent_is_refused(empty, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_refused(run("build", empty, "--out", locked / "o"), "--out", "no write permission")
    finally:
        locked.chmod(0o700)


# --- data and weights: refused at the loading stage, before the model is analysed, exported or built


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 8))
    torch.save(cifar_resnet(20).state_dict(), tmp_path / "w.th")
    p = tmp_path / "tiny.yaml"
    p.write_text("model:\n  name: cifar_resnet20\n  weights: w.th\neval:\n  data: eval.npz\n")
    return p


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if a build gets past loading: analysis is the first stage after it."""
    import importlib

    def analyze(*_, **__):
        raise AssertionError("the build went past loading")

    # the build sequence's own name for it (pipeline/build.py imports it at the top)
    monkeypatch.setattr(importlib.import_module("dfp_deploy.pipeline.build"), "analyze", analyze)


@pytest.mark.parametrize("labels", [[0, 1, 2, 10], [0, -1, 2, 3]])
def test_labels_outside_the_classes_are_refused_naming_eval_data(tiny, tmp_path, no_work, labels):
    np.savez(tmp_path / "eval.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array(labels))
    assert_refused(run("build", tiny, "--out", tmp_path / "o"), "eval.data", "[0, 10)")
    assert_refused(run("inspect", tiny), "eval.data")


def _corrupt_compressed_npz(path: Path) -> None:
    import zipfile

    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.savez_compressed(path, x=x, y=np.arange(8) % 10)
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo("x.npy")
    start = info.header_offset + 30 + len(info.filename) + 40  # inside the deflate stream: zlib.error, not a CRC
    data[start:start + 64] = bytes(b ^ 0x5A for b in data[start:start + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("key", ["eval.data", "compress.calibration.data"])
def test_corrupt_compressed_npz_is_refused_naming_the_file(tiny, tmp_path, no_work, key):
    _corrupt_compressed_npz(tmp_path / "bad.npz")
    res = run("build", tiny, "--out", tmp_path / "o", "--set", f"{key}={tmp_path / 'bad.npz'}")
    assert_refused(res, key, "bad.npz", "damaged")


def test_corrupt_compressed_npz_is_refused_where_it_is_read(tmp_path):
    from dfp_deploy.core.errors import DataError
    from dfp_deploy.core.types import Preprocess
    from dfp_deploy.data.images import load_images

    _corrupt_compressed_npz(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="bad.npz: array 'x' cannot be read"):
        load_images(tmp_path / "bad.npz", Preprocess(size=32, mean=(0,) * 3, std=(1,) * 3, resize=None))


def test_nan_weights_are_refused_naming_model_weights(tiny, tmp_path, no_work):
    state = torch.load(tmp_path / "w.th")
    state["linear.weight"][0, 0] = float("inf")
    torch.save(state, tmp_path / "w.th")
    assert_refused(run("build", tiny, "--out", tmp_path / "o"), "model.weights", "NaN or Inf", "linear.weight")


def test_corrupt_weight_bytes_are_refused_naming_model_weights(tiny, tmp_path, no_work):
    import zipfile

    path = tmp_path / "w.th"
    data = bytearray(path.read_bytes())
    info = max(zipfile.ZipFile(path).infolist(), key=lambda i: i.file_size)  # a large tensor's record
    extra = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")  # local header's own
    start = info.header_offset + 30 + len(info.filename) + extra + 256
    data[start:start + 16] = bytes(b ^ 0xFF for b in data[start:start + 16])
    path.write_bytes(bytes(data))
    assert_refused(run("build", tiny, "--out", tmp_path / "o"), "model.weights", "CRC-32")


def test_input_size_too_large_for_memory_is_refused(tiny, tmp_path, no_work):
    res = run("build", tiny, "--out", tmp_path / "o", "--set", "model.input_size=[64, 4096, 4096]",
              "--set", "target.batch=4")
    assert_refused(res, "model.input_size", "target.batch")


def test_round_to_that_prunes_nothing_is_refused(tiny, tmp_path):
    res = run("inspect", tiny, "--set", "compress.prune.ratio=0.5", "--set", "compress.prune.round_to=4096")
    assert_refused(res, "compress.prune.round_to", "nothing would be pruned")
    res = run("inspect", tiny, "--set", "compress.prune.ratio=0.5", "--set", "advanced.compress.prune.min_channels=64")
    assert_refused(res, "advanced.compress.prune.min_channels")


# --- recipes are code only where they name a model factory


@pytest.mark.parametrize("name, kwargs, why", [
    ("os:system", "{command: 'touch MARK'}", "standard library"),
    ("subprocess:run", "{args: 'touch MARK', shell: true}", "standard library"),
    ("shutil:copyfile", "{src: /dev/null, dst: MARK}", "standard library"),
    ("pathlib:Path.touch", "{self: MARK}", "standard library"),
    ("collections:OrderedDict", "{MARK: 1}", "standard library"),
    ("numpy:ndarray", "{shape: [1]}", "not a torch.nn.Module subclass"),
    ("torch:zeros", "{size: [1]}", "builtin"),
])
def test_factory_form_refuses_what_is_not_a_model_factory_before_calling_it(empty, tmp_path, name, kwargs, why):
    marker = tmp_path / "ran"
    kwargs = kwargs.replace("MARK", str(marker))
    assert_refused(run("inspect", empty, "--set", f"model.name={name}", "--set", f"model.kwargs={kwargs}"), name, why)
    assert not marker.exists()


def test_factory_returning_something_else_is_refused(empty):
    assert_refused(run("inspect", empty, "--set", "model.name=json:loads", "--set", "model.kwargs={s: '1'}"),
                   "json:loads")


# --- messages


def test_one_line_escapes_breaks_and_bounds_length():
    assert one_line("a\nb\r\tc") == "a\\nb\\r\\tc"
    long = one_line("key: " + "x" * 10_000 + " fix it")
    assert len(long) == MAX_MESSAGE and "…" in long and long.startswith("key: ") and long.endswith("fix it")


@pytest.mark.parametrize("args", [["nope"], ["build"], ["build", "--bogus", "r.yaml"], ["inspect", "a", "b"]])
def test_usage_errors_are_one_line(args):
    res = run(*args)
    assert res.exit_code == 2
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("error: "), res.stderr


def test_library_warnings_are_silenced_unless_asked_for(monkeypatch):
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    monkeypatch.setattr("sys.warnoptions", [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _quiet_libraries()
        for module in ("torch.onnx._internal.exporter", "onnxruntime.capi", "onnxscript.rewriter", "dfp_deploy.x"):
            warnings.warn_explicit("library noise", UserWarning, "lib.py", 1, module=module)
    assert seen == []
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _quiet_libraries()
        warnings.warn_explicit("wanted", UserWarning, "lib.py", 1, module="torch.onnx")
    assert [str(w.message) for w in seen] == ["wanted"]


def test_report_json_never_holds_a_bare_nan(tmp_path):
    from dfp_deploy.core.atomic import write_json_atomic

    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "r.json", {"parity": {"max_abs_err": float("nan")}})
    assert not (tmp_path / "r.json").exists()
    write_json_atomic(tmp_path / "r.json", {"x": np.float32(1.5)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1.5}
