"""The original's top-1 is evaluated once per graph, image set and target, and a stored one is used only under exactly
the key it was stored with."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dfp_deploy.backends.registry import BackendInfo
from dfp_deploy.core.types import Preprocess
from dfp_deploy.measure.accuracy_cache import AccuracyCache, accuracy_key
from dfp_deploy.pipeline import engine_step
from dfp_deploy.recipe import load_recipe
from dfp_deploy.recipe.resolve import resolve

CLASSES = 3


class _Engine:
    """An engine held to the part of the Engine protocol evaluation uses (run, static_batch, threads): logits that
    pick class (sum of pixels) mod 3, so its top-1 on the images below is known; it counts the images it ran."""

    static_batch = None
    threads = 1
    name = "fake"

    def __init__(self, shift: int = 0):
        self.shift, self.images = shift, 0

    def run(self, x: np.ndarray) -> np.ndarray:
        self.images += len(x)
        label = (np.round(x.reshape(len(x), -1).sum(axis=1)).astype(int) + self.shift) % CLASSES
        return np.eye(CLASSES, dtype=np.float32)[label]


class _Loaded:
    preprocess = Preprocess(size=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, (20, 4, 4, 3), dtype=np.uint8)
    y = x.reshape(20, -1).astype(int).sum(axis=1) % CLASSES
    y[:5] = (y[:5] + 1) % CLASSES  # the first five are wrong for shift 0: top-1 75 %
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    (tmp_path / "original.onnx").write_bytes(b"graph A")  # the key reads only its bytes
    info = BackendInfo("ort-cpu", True, "1.0", "", "cpu-model-x")

    def plan(*settings):
        recipe = load_recipe(None, [f"eval.data={tmp_path / 'eval.npz'}", "target.batch=4", *settings])
        return resolve(recipe, fingerprint=None, cache=tmp_path / "cache")

    return tmp_path, plan, info


def _evaluate(plan, original, info, before=None):
    before = before or _Engine()
    result = engine_step.accuracy(plan, _Loaded(), before, _Engine(), quiet=True, original=original, target=info)
    return result, before.images


def test_the_original_is_evaluated_once_then_read_back(setup):
    tmp, plan, info = setup
    first, ran = _evaluate(plan(), tmp / "original.onnx", info)
    assert (first["before"], first["before_cached"], ran) == (75.0, False, 20)
    second, ran = _evaluate(plan(), tmp / "original.onnx", info, before=_Engine(shift=1))
    assert (second["before"], second["before_cached"], ran) == (75.0, True, 0)  # the stored number, not re-run
    again, ran = _evaluate(plan("advanced.measure.remeasure=true"), tmp / "original.onnx", info,
                           before=_Engine(shift=1))
    assert again["before_cached"] is False and ran == 20 and again["before"] != 75.0


@pytest.mark.parametrize("change", ["graph", "images", "selection", "batch", "device"])
def test_anything_that_could_change_the_number_misses(setup, change):
    tmp, plan, info = setup
    _evaluate(plan(), tmp / "original.onnx", info)
    settings, original = [], tmp / "original.onnx"
    if change == "graph":
        original = tmp / "other.onnx"
        original.write_bytes(b"graph B")
    elif change == "images":
        data = dict(np.load(tmp / "eval.npz"))
        data["x"][0, 0, 0, 0] += 1
        np.savez(tmp / "eval.npz", **data)
    elif change == "selection":
        settings = ["eval.limit=12"]
    elif change == "batch":
        settings = ["target.batch=2"]
    else:
        info = BackendInfo("ort-cpu", True, "1.0", "", "cpu-model-y")
    result, ran = _evaluate(plan(*settings), original, info)
    assert result["before_cached"] is False and ran > 0


def test_an_entry_stored_under_another_key_or_damaged_is_never_used(tmp_path):
    cache, key = AccuracyCache(tmp_path), accuracy_key(graph="a", data="b", threads=0)
    cache.put(key, 91.5, 100)
    assert cache.get(key) == (91.5, 100)
    (entry,) = tmp_path.glob("*.json")
    stored = json.loads(entry.read_text())
    entry.write_text(json.dumps({**stored, "key": {**stored["key"], "graph": "c"}}))  # copied under the wrong name
    assert cache.get(key) is None
    entry.write_text("{")
    assert cache.get(key) is None
