"""Latency fingerprint: the channel-multiple rule on known step functions, storage keyed by target, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dfp_deploy.cli import main
from dfp_deploy.core.errors import InputError
from dfp_deploy.measure import fingerprint as fp

from _helpers import own_cache

CHANNELS = fp.DEFAULT_CHANNELS


def _up(c: int, m: int) -> int:
    return m * -(-c // m)


def _blocks_of(m: int):
    # a target that runs a partly filled block of m channels as a whole one (cost ~ padded in x padded out)
    return [0.05 + 1e-4 * _up(c, m) ** 2 for c in CHANNELS]


@pytest.mark.parametrize("m", [8, 16, 32])
def test_a_padded_block_target_wants_its_block(m):
    multiple, costs = fp.step_multiple(CHANNELS, _blocks_of(m))
    assert multiple == m
    assert costs[m] == 0.0  # rounding up inside a block is free by construction


def test_a_smooth_target_wants_no_real_multiple():
    times = [0.05 + 1e-4 * c ** 2 for c in CHANNELS]
    multiple, costs = fp.step_multiple(CHANNELS, times)
    # rounding to 2 costs ~1.5 %: within FREE_COST; rounding to 4 costs ~4 %: not free
    assert multiple == 2
    assert costs[4] > fp.FREE_COST > costs[2]


def test_counts_off_the_fast_path_do_not_hold_the_multiple_back():
    # ONNX Runtime's CPU shape: multiples of 4 run blocked kernels padded to 16, other counts a slow generic path
    times = [0.05 + 1e-4 * _up(c, 16) ** 2 if c % 4 == 0 else 3e-4 * c ** 2 for c in CHANNELS]
    assert fp.step_multiple(CHANNELS, times)[0] == 16


def test_timing_noise_of_a_few_percent_keeps_the_block():
    rng = np.random.default_rng(0)
    times = np.asarray(_blocks_of(16)) * (1 + 0.02 * rng.standard_normal(len(CHANNELS)))
    assert fp.step_multiple(CHANNELS, list(times))[0] == 16


def _key(**changes):
    base = dict(device="fake accelerator", backend="fake", precision="fp32", batch=8, size=14, threads=None,
                versions={"fake-runtime": "1.0"})
    return fp.make_key(**{**base, **changes})


def test_measure_save_and_load_round_trip(tmp_path):
    truth = dict(zip(CHANNELS, _blocks_of(16)))
    # runners that report their own device time (a float), as CUDA-event runners do: no wall clock involved
    result = fp.measure(_key(), lambda c: (lambda: float(truth[c])), warmup=1, runs=50, rounds=5)
    assert result.multiple == 16
    assert result.p50_ms == tuple(truth[c] for c in CHANNELS)
    path = fp.save(result, tmp_path)
    assert json.loads(path.read_text())["multiple"] == 16
    assert fp.load(_key(), tmp_path) == result
    assert fp.load(_key(batch=1), tmp_path) is None  # another batch is another target


def test_a_file_measured_elsewhere_is_refused(tmp_path):
    result = fp.measure(_key(), lambda c: (lambda: 1.0 + c), warmup=1, runs=50, rounds=5)
    path = fp.save(result, tmp_path)
    data = json.loads(path.read_text())
    data["key"]["device"] = "another machine"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="another machine"):
        fp.load(_key(), tmp_path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not a fingerprint file"):
        fp.load(_key(), tmp_path)


@pytest.mark.slow
def test_cli_measures_a_real_ort_target_once_then_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = ["fingerprint", "--backend", "ort-cpu", "--batch", "1", "--size", "4", "--threads", "1", "--quiet"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "channel multiple" in first.output and "wrote" in first.output
    stored = list((tmp_path / "dfp-deploy" / "fingerprints").glob("ort-cpu-fp32-b1-s4-t1-*.json"))
    assert len(stored) == 1
    data = json.loads(stored[0].read_text())
    assert data["channels"] == list(CHANNELS) and len(data["p50_ms"]) == len(CHANNELS)
    assert data["multiple"] in fp.CANDIDATES
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0 and "reused" in second.output


def test_a_stored_fingerprint_sets_the_default_channel_multiple(tmp_path, monkeypatch):
    from dfp_deploy import pipeline
    from dfp_deploy.pipeline.context import fingerprint_key
    from dfp_deploy.recipe import load_recipe

    source_of = _source_of

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: cifar_resnet20}\ntarget: {backend: ort-cpu, batch: 2, threads: 1}\n")
    recipe = load_recipe(path, [])
    value, source = source_of(recipe)
    assert source.startswith("table") and value == pipeline.default_round_to("ort-cpu", "fp32")

    # a fingerprint of exactly this target (device, backend, precision, batch, threads, versions) says 4
    backend = __import__("dfp_deploy.backends.registry", fromlist=["get_backend"]).get_backend("ort-cpu")
    key = fingerprint_key(backend, "ort-cpu", "fp32", 2, 14, 1)
    truth = dict(zip(CHANNELS, [0.05 + 1e-4 * _up(c, 4) ** 2 for c in CHANNELS]))
    stored = fp.save(fp.measure(key, lambda c: (lambda: float(truth[c])), warmup=1, runs=50, rounds=5),
                     tmp_path / "dfp-deploy" / "fingerprints")
    assert source_of(recipe) == (4, f"fingerprint {stored}")
    # another batch is another target: back to the table; a recipe value always wins
    assert source_of(load_recipe(path, ["target.batch=8"]))[1].startswith("table")
    assert source_of(load_recipe(path, ["compress.prune.round_to=2"])) == (2, "recipe")


def _source_of(recipe) -> tuple[int, str]:
    from dfp_deploy import pipeline

    select = pipeline.resolve_recipe(recipe).select
    return select.round_to, select.round_to_source


def _store_fingerprint(tmp_path, batch: int, multiple: int, precision: str = "fp32"):
    """A fingerprint of this machine's ort-cpu target at `precision` and `batch`, one thread, measured on a known
    step of `multiple` channels, stored where builds look."""
    from dfp_deploy.backends.registry import get_backend
    from dfp_deploy.pipeline.context import fingerprint_key

    key = fingerprint_key(get_backend("ort-cpu"), "ort-cpu", precision, batch, 14, 1)
    truth = dict(zip(CHANNELS, [0.05 + 1e-4 * _up(c, multiple) ** 2 for c in CHANNELS]))
    return fp.save(fp.measure(key, lambda c: (lambda: float(truth[c])), warmup=1, runs=50, rounds=5),
                   tmp_path / "dfp-deploy" / "fingerprints")


def test_auto_measures_a_fingerprint_only_where_the_build_needs_one_and_times_the_target_here(tmp_path, monkeypatch):
    from dfp_deploy import pipeline
    from dfp_deploy.recipe import load_recipe

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: cifar_resnet20}\ncompress: {prune: {ratio: 0.5}}\n"
                    "target: {backend: ort-cpu, batch: 2, threads: 1}\n")

    def needed(*settings):
        return pipeline.resolve_recipe(load_recipe(path, list(settings))).target.measure_fingerprint

    assert needed() and load_recipe(path, []).advanced.target.fingerprint == "auto"
    assert not needed("advanced.target.fingerprint=stored") and not needed("advanced.target.fingerprint=table")
    assert not needed("compress.prune.round_to=4")  # the recipe's multiple is used: nothing to measure
    assert not needed("compress.prune.ratio=0")  # nothing is pruned
    assert not needed("measure.latency=false")  # nothing is timed here: this machine may not be the target
    assert needed("measure.latency=false", "search.episodes=2", "search.target=latency")
    assert not needed("target.backend=torch-cpu")  # builds from the module, not from the ONNX probes
    # int8 on ORT CPU: the probe's multiple made whole networks slower than the table's (latency-fingerprint.md)
    assert not needed("target.precision=int8")
    _store_fingerprint(tmp_path, batch=2, multiple=4)
    assert not needed()  # measured once: the stored one is used from then on
    assert needed("target.batch=8")  # another batch is another target


def test_target_fingerprint_table_ignores_a_stored_fingerprint(tmp_path, monkeypatch):
    from dfp_deploy import pipeline
    from dfp_deploy.recipe import load_recipe

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: cifar_resnet20}\ntarget: {backend: ort-cpu, batch: 2, threads: 1}\n")
    stored = _store_fingerprint(tmp_path, batch=2, multiple=4)
    assert _source_of(load_recipe(path, ["advanced.target.fingerprint=stored"])) == (4, f"fingerprint {stored}")
    value, source = _source_of(load_recipe(path, ["advanced.target.fingerprint=table"]))
    assert (value, source) == (pipeline.default_round_to("ort-cpu", "fp32"), "table (advanced.target.fingerprint: "
                                                         "table)")


def test_auto_leaves_int8_on_ort_cpu_to_the_table_and_stored_still_applies_it(tmp_path, monkeypatch):
    """On whole networks the int8 probe's multiple was slower than the table's (docs/research/latency-fingerprint.md)."""
    from dfp_deploy import pipeline
    from dfp_deploy.recipe import load_recipe

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: cifar_resnet20}\ntarget: {backend: ort-cpu, precision: int8, batch: 2, threads: 1}\n")
    stored = _store_fingerprint(tmp_path, batch=2, multiple=2, precision="int8")
    assert _source_of(load_recipe(path, [])) == (pipeline.default_round_to("ort-cpu", "int8"),
                                                 "table (advanced.target.fingerprint: auto, int8 on ort-cpu)")
    multiple = json.loads(stored.read_text())["multiple"]
    assert multiple != pipeline.default_round_to("ort-cpu", "int8")
    assert _source_of(load_recipe(path, ["advanced.target.fingerprint=stored"])) == (multiple, f"fingerprint {stored}")


@pytest.mark.slow
def test_a_timed_build_measures_the_missing_fingerprint_once_and_reports_it(tmp_path, monkeypatch):
    from dfp_deploy import pipeline
    from dfp_deploy.pipeline import context

    monkeypatch.setenv("XDG_CACHE_HOME", own_cache(tmp_path / "cache"))
    # a short sweep (the rule needs 8 counts); the default one is what a real build measures
    monkeypatch.setattr(context, "AUTO_FINGERPRINT_CHANNELS", tuple(range(65, 73)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: cifar_resnet20, input_size: [3, 8, 8]}\n"
                      "compress: {prune: {ratio: 0.5}, reconstruct: none}\n"
                      "target: {backend: ort-cpu, batch: 2, threads: 1}\n"
                      "advanced: {measure: {warmup: 1, runs: 50, rounds: 1, parity_samples: 4, "
                      "rounding_cost: false}}\n")
    res = CliRunner().invoke(main, ["build", str(recipe), "--out", str(tmp_path / "out")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "[1/9] measuring the latency fingerprint of ort-cpu fp32 batch 2" in res.output
    stored = list((tmp_path / "cache" / "dfp-deploy" / "fingerprints").glob("ort-cpu-fp32-b2-s14-t1-*.json"))
    assert len(stored) == 1
    rnd = json.loads((tmp_path / "out" / "report.json").read_text())["prune"]["round_to"]
    used = rnd["fingerprint"]
    assert rnd["source"] == f"fingerprint {stored[0]}" and rnd["value"] == used["multiple"]
    assert used["file"] == str(stored[0]) and used["channels"] == [65, 72] and used["measured_s"] > 0
    assert used["cost_of_not_rounding"] == pytest.approx(json.loads(stored[0].read_text())["cost_of_not_rounding"],
                                                         abs=1e-4)
    assert f"latency fingerprint `{stored[0]}`, measured by this build" in (tmp_path / "out" / "report.md").read_text()
    from dfp_deploy.recipe import load_recipe

    assert not pipeline.resolve_recipe(load_recipe(recipe, [])).target.measure_fingerprint  # the next build reads it
