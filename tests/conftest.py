"""Test-suite settings: one torch thread (2-core shared machines; the first multi-threaded forward costs seconds), and
the golden builds started in the background as soon as they are collected (tests/_golden.py)."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

# plain `pytest` puts tests/ on sys.path but not the checkout, as `python -m pytest` does: without it, imports of
# `bench.*` and `tests.*` work one way and not the other
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# the suite never reads or writes the user's caches (ONNX exports, latency fingerprints, measurements): a fingerprint
# stored on this machine would change the default channel multiple, and with it the plans the tests check
_CACHE = tempfile.mkdtemp(prefix="dfp-deploy-tests-cache-")
os.environ["XDG_CACHE_HOME"] = os.environ["DFP_TESTS_CACHE"] = _CACHE  # _helpers.own_cache shares its exports


def pytest_collection_modifyitems(config, items):
    # golden tests last: their builds run in the background meanwhile, and they only read the results
    items.sort(key=lambda item: bool(item.get_closest_marker("golden")))


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    items = session.items  # after -k / -m selection
    names = sorted({item.callspec.params["golden"] for item in items
                    if item.get_closest_marker("golden") and "golden" in getattr(getattr(item, "callspec", None),
                                                                                 "params", {})})
    if names:
        import _golden

        # one build per core, beside the rest of the suite: the builds are most of the suite's work, so sharing the
        # cores with the other tests ends soonest (at most 4 at a time: an EfficientNet build holds 2 GB)
        _golden.start(names, workers=max(1, min(os.cpu_count() or 2, 4)))


def pytest_terminal_summary(terminalreporter):
    golden = sys.modules.get("_golden")
    runner = golden and golden._runner
    if not runner or not runner.finished():
        return
    rows = sorted(runner.finished(), key=lambda d: d.name)
    terminalreporter.write_line("golden builds (own process each): " + ", ".join(
        f"{d.name} {d.cpu_s if d.cpu_s is not None else '?'} s CPU / {d.wall_s:.0f} s wall" for d in rows))


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)
    if "_golden" in sys.modules:
        sys.modules["_golden"].stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole run (its start is most of the Ray tests' cost) offering two units of
    the fake target's resource; its workers import the fake target from tests/."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'dfp-deploy[ray]')")
    from _fake_target import RAY_RESOURCE
    ray.init(address="local", num_cpus=2, resources={RAY_RESOURCE: 2}, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    try:
        yield ray
    finally:
        ray.shutdown()
