"""End to end through the CLI: a real (tiny) build, the report contract, and bad input handled without damage."""

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfp_deploy.cli import main

from _helpers import own_cache

# builds cost seconds each (two ONNX exports): the tests share them where they can, and time engines only where
# they read the timing (an untimed build also skips the unrounded plan's engine)
FAST = ["--set", "measure.latency=false", "--set", "advanced.measure.parity_samples=8", "--quiet"]
TIMED = ["--set", "measure.latency=true", "--set", "advanced.measure.runs=50", "--set", "advanced.measure.warmup=2",
         "--set", "advanced.measure.rounds=2"]


def _write_recipe(tmp_path: Path) -> Path:
    # advanced.target.fingerprint: table: these builds test other things; an auto build that times its target
    # would measure a latency fingerprint first (tests/test_fingerprint.py holds that)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8),
             y=rng.integers(0, 10, 24))
    p = tmp_path / "tiny.yaml"
    p.write_text("model:\n  name: cifar_resnet20\ncompress:\n  prune:\n    ratio: 0.5\n"
                 "target:\n  batch: 4\neval:\n  data: eval.npz\nadvanced:\n  target:\n    fingerprint: table\n")
    return p


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    return _write_recipe(tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real, timed build shared by the tests that need a finished output folder. Ratio 0.4 at round_to 8 makes
    the rounding visible: 16·0.6 = 9.6 channels are rounded to 8, the unrounded plan keeps 10."""
    tmp = tmp_path_factory.mktemp("built")
    recipe = _write_recipe(tmp)
    res = run("build", recipe, "--out", tmp / "out", *FAST, *TIMED, "--set", "compress.prune.ratio=0.4",
              "--set", "compress.prune.round_to=8")
    return recipe, tmp / "out", res


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_build_writes_the_report_contract(built):
    recipe, out, res = built
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    r = json.loads((out / "report.json").read_text())
    assert r["params"]["after"] < r["params"]["before"]
    assert r["macs"]["after"] < r["macs"]["before"]
    assert r["latency"]["backend"] == "ort-cpu"
    assert r["latency"]["batch"] == 4
    for side in ("before", "after"):
        assert r["latency"][side]["p50_ms"] > 0
        assert r["latency"][side]["p90_ms"] >= r["latency"][side]["p50_ms"]
        assert r["latency"][side]["runs"] >= 50
    # the timing is filed in the measurement cache (tests/test_measure_cache.py: a second build reads it)
    assert r["latency"]["cached"] in (False, True) and Path(r["latency"]["cache_entry"]).is_file()
    assert r["parity"]["max_abs_err"] <= 1e-3
    assert 0 <= r["accuracy"]["before"] <= 100 and r["accuracy"]["n"] == 24
    assert r["recipe"]["compress"]["prune"]["ratio"] == 0.4
    assert r["prune"]["round_to"]["value"] >= 1 and r["prune"]["round_to"]["source"]
    assert "torch" in r["environment"]
    for name in ("model.onnx", "original.onnx", "model.pt", "plan.json", "report.md"):
        assert (out / name).is_file(), name
    assert "dfp-deploy report" in (out / "report.md").read_text()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no staging folder left


@pytest.mark.slow
def test_failed_build_keeps_the_previous_output(built, tmp_path, monkeypatch):
    recipe, first, res = built
    assert res.exit_code == 0
    out = tmp_path / "out"
    shutil.copytree(first, out)
    before = (out / "report.json").read_bytes()
    # a parity tolerance no engine can meet makes the build fail after everything was written to staging (the rule
    # scales with the logits, advanced.measure.parity_tolerance is only its floor: take the relative allowance away too)
    monkeypatch.setattr("dfp_deploy.measure.parity.SIGMAS", 0.0)
    res = run("build", recipe, "--out", out, *FAST, "--set", "advanced.measure.parity_tolerance=1e-30")
    assert res.exit_code == 1
    assert "parity" in res.output
    assert (out / "report.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_interrupted_build_keeps_the_previous_output(built, tmp_path, monkeypatch):
    recipe, first, _ = built
    out = tmp_path / "out"
    shutil.copytree(first, out)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    # the build sequence's own name for it (pipeline/build.py imports it at the top)
    monkeypatch.setattr(importlib.import_module("dfp_deploy.pipeline.build"), "analyze", interrupt)
    res = run("build", recipe, "--out", out, *FAST)
    assert res.exit_code == 130
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_bad_recipe_value_is_one_line_exit_2(recipe, tmp_path):
    res = run("build", recipe, "--out", tmp_path / "o", "--set", "compress.prune.ratio=1.3")
    assert res.exit_code == 2
    assert res.output.strip() == "error: compress.prune.ratio: 1.3 is not in [0, 1)"
    assert not (tmp_path / "o").exists()


def test_missing_weights_exit_2(recipe, tmp_path):
    res = run("build", recipe, "--out", tmp_path / "o", "--set", f"model.weights={tmp_path / 'nope.th'}")
    assert res.exit_code == 2
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nope.th" in last
    assert "Traceback" not in res.output


def test_refuses_to_overwrite_a_foreign_folder(recipe, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    res = run("build", recipe, "--out", foreign)
    assert res.exit_code == 2
    assert "not a dfp-deploy output folder" in res.output
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_inspect_lists_groups(recipe):
    res = run("inspect", recipe)
    assert res.exit_code == 0, res.output
    assert "cifar_resnet20" in res.output
    assert "layer1.0.conv1" in res.output


def test_backends_lists_ort_cpu_available():
    res = run("backends")
    assert res.exit_code == 0
    line = next(l for l in res.output.splitlines() if l.startswith("ort-cpu"))
    assert " yes " in f" {line} "
    assert "tensorrt" in res.output


def test_recipe_keys_lists_contract_keys():
    res = run("recipe-keys")
    assert "compress.prune.ratio" in res.output and "target.batch" in res.output
    assert "\nadvanced." not in res.output  # the advanced keys only with --advanced
    assert "advanced.compress.udfc_form" in run("recipe-keys", "--advanced").output


@pytest.mark.slow
def test_int8_build_runs_integer_kernels(recipe, tmp_path):
    out = tmp_path / "int8"
    res = run("build", recipe, "--out", out, *FAST, "--set", "target.precision=int8",
              # random-init weights: agreement itself is not the point
              "--set", "advanced.measure.int8_min_agreement=0")
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    assert r["quantization"]["style"] == "ort-cpu"
    assert r["artifacts"]["onnx"] == "model.int8.onnx" and (out / "model.int8.onnx").is_file()
    kernels = r["engine"]["kernels"]
    assert kernels["integer_conv_gemm"] >= 19 and kernels["float_conv_gemm"] == 0  # 19 convs + 1 gemm in ResNet-20
    assert 0 <= r["parity"]["top1_agreement"] <= 1
    # the integer kernels reproduce the simulated quantization far more closely than the float model
    sim = r["parity"]["simulated"]
    assert sim["max_abs_err"] < 0.5 * r["parity"]["max_abs_err"] and sim["top1_agreement"] >= 0.9
    assert "Against the simulated quantization" in (out / "report.md").read_text()
    # the BN-kept export is removed; the only hidden file is the output's marker
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".dfp-deploy-output"]


# the search tests' common settings: 2 seeded warm-up episodes, 8 synthetic proxy inputs of 2 steps; round_to 8
# because the CPU default (16 with AVX-512) leaves a MAC floor of 0.600
SEARCH = [*FAST, "--set", "advanced.search.warmup=2", "--set", "search.ratio=0.4", "--set", "search.samples=8",
          "--set", "advanced.search.synthetic_steps=2", "--set", "compress.prune.round_to=8",
          "--set", "compress.prune.importance=l2", "--set", "compress.reconstruct=udfc"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One small search build (l2 channels, UDFC repair, 3 episodes) that the search tests check, compare their own
    builds with, or resume. Its folder holds the recipe, the output, the search state and the synthetic cache."""
    tmp = tmp_path_factory.mktemp("searched")
    recipe = _write_recipe(tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", own_cache(tmp / "cache"))
        res = run("build", recipe, "--out", tmp / "out", *SEARCH, "--set", "search.episodes=3")
    assert res.exit_code == 0, res.output
    return tmp


def _search_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "search_log.jsonl").read_text().splitlines()]


def _check_search_build(out: Path, episodes: int) -> None:
    r = json.loads((out / "report.json").read_text())
    assert r["search"]["episodes"] == episodes
    assert (r["search"]["ratio"], r["search"]["budget"]) == (0.4, 0.6)  # removed, as in the recipe; and kept
    assert r["macs"]["after"] <= 0.6 * r["macs"]["before"] * 1.0001
    log = _search_log(out)
    assert len(log) == episodes and all(e["macs"] <= 0.6 * r["macs"]["before"] * 1.0001 for e in log)
    assert "Search (AutoDFP, SAC)" in (out / "report.md").read_text()


@pytest.mark.slow
def test_search_build_meets_the_mac_budget_and_logs_episodes(searched):
    _check_search_build(searched / "out", episodes=3)


@pytest.mark.slow
def test_lmmse_search_build_meets_the_mac_budget_and_logs_episodes(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", own_cache(tmp_path / "cache"))
    out = tmp_path / "searched"
    res = run("build", recipe, "--out", out, *SEARCH, "--set", "search.episodes=3",
              "--set", "compress.prune.importance=lmmse", "--set", "compress.reconstruct=lmmse")
    assert res.exit_code == 0, res.output
    _check_search_build(out, episodes=3)


@pytest.mark.slow
def test_search_scores_candidates_after_bn_adapt(searched, recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", own_cache(searched / "cache"))
    out = tmp_path / "adapted"
    res = run("build", recipe, "--out", out, *SEARCH, "--set", "search.episodes=2",
              "--set", "compress.bn_adapt.data=synthetic", "--set", "compress.bn_adapt.samples=8",
              "--set", "advanced.compress.bn_adapt.synthetic_steps=2")
    assert res.exit_code == 0, res.output
    adapted = json.loads((out / "report.json").read_text())
    assert adapted["compress"]["bn_adapt"]["samples"] == 8
    assert adapted["macs"]["after"] <= 0.6 * adapted["macs"]["before"] * 1.0001
    # the seeded warm-up picks the same plans; only the adaptation of each candidate changes their scores
    plain_log, adapted_log = _search_log(searched / "out")[:2], _search_log(out)
    assert [e["macs"] for e in adapted_log] == [e["macs"] for e in plain_log]
    assert all(a["proxy"] != p["proxy"] for a, p in zip(adapted_log, plain_log))


@pytest.mark.slow
def test_search_scores_candidates_on_real_images_when_asked(searched, recipe, tmp_path, monkeypatch):
    """search.data: an .npz scores the candidates on a seeded subset of its images instead of generated ones
    (nothing is generated), and the report says the search was not data-free."""
    import dfp_deploy.data.synthetic as synthetic

    def no_generation(*args, **kwargs):
        raise AssertionError("synthetic inputs generated although search.data names images")

    monkeypatch.setattr(synthetic, "bn_matched_inputs", no_generation)
    monkeypatch.setenv("XDG_CACHE_HOME", own_cache(tmp_path / "cache"))
    data = tmp_path / "eval.npz"
    res = run("build", recipe, "--out", tmp_path / "real", *SEARCH, "--set", "search.episodes=2",
              "--set", f"search.data={data}", "--set", "search.samples=16")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "real" / "report.json").read_text())
    assert (r["search"]["proxy_data"], r["search"]["proxy_samples"]) == (str(data), 16)
    assert "not data-free" in (tmp_path / "real" / "report.md").read_text()
    synthetic_log, real_log = _search_log(searched / "out")[:2], _search_log(tmp_path / "real")
    # the seeded warm-up plays the same plans; only the inputs they are scored on differ
    assert [e["macs"] for e in synthetic_log] == [e["macs"] for e in real_log]
    assert all(a["proxy"] != b["proxy"] for a, b in zip(synthetic_log, real_log))


@pytest.mark.slow
def test_search_proxy_data_with_too_few_images_is_refused(recipe, tmp_path):
    out = tmp_path / "out"
    res = run("build", recipe, "--out", out, *SEARCH, "--set", "search.episodes=2",
              "--set", f"search.data={tmp_path / 'eval.npz'}", "--set", "search.samples=100")
    assert res.exit_code != 0
    assert "search.samples: 100 images asked for" in res.output and "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.slow
def test_resumed_search_refuses_changed_scoring(searched, tmp_path, monkeypatch):
    """The search state lives beside the output folder; a rerun that scores candidates differently (here another
    repair) must not continue a log whose proxies were measured the old way, while the same recipe resumes."""
    copy = tmp_path / "copy"
    shutil.copytree(searched, copy)  # recipe, output, search state and cache, as the interrupted search left them
    monkeypatch.setenv("XDG_CACHE_HOME", own_cache(copy / "cache"))
    recipe, out = copy / "tiny.yaml", copy / "out"
    first = (out / "search_log.jsonl").read_text().splitlines()
    res = run("build", recipe, "--out", out, *SEARCH, "--set", "search.episodes=4",
              "--set", "compress.reconstruct=lmmse")
    assert res.exit_code != 0 and "scoring changed" in res.output
    res = run("build", recipe, "--out", out, *SEARCH, "--set", "search.episodes=4")
    assert res.exit_code == 0, res.output
    again = (out / "search_log.jsonl").read_text().splitlines()
    assert len(again) == 4 and again[:3] == first


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """One build that reads the calibration images for every use at once: channels chosen on their activations
    (lmmse, macs-abs, round_to 1), two-phase calibration, and int8 activation ranges. It counts the loads."""
    import dfp_deploy.data.sources as sources

    tmp = tmp_path_factory.mktemp("calibrated")
    recipe, data, out = _write_recipe(tmp), tmp / "eval.npz", tmp / "out"
    calls = []
    load = sources.load_inputs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "load_inputs", lambda spec, **k: calls.append(spec.key) or load(spec, **k))
        res = run("build", recipe, "--out", out, *FAST, "--set", f"compress.calibration.data={data}",
                  "--set", "compress.calibration.samples=16", "--set", "advanced.compress.calibration.squeeze_epochs=1",
                  "--set", "advanced.compress.calibration.calib_epochs=1", "--set", "compress.prune.importance=lmmse",
                  "--set", "compress.prune.allocation=macs-abs", "--set",
                  "advanced.compress.prune.statistics=calibration",
                  "--set", "compress.prune.round_to=1", "--set", "target.precision=int8",
                  "--set", "advanced.measure.int8_min_agreement=0", "--set",
                  "advanced.compress.quantize.activations=calibration")
    assert res.exit_code == 0, res.output
    return data, out, calls


@pytest.mark.slow
def test_two_phase_calibration_build(calibrated):
    data, out, _ = calibrated
    r = json.loads((out / "report.json").read_text())
    assert r["compress"]["calibration"] == {"data": str(data), "samples": 16}
    assert r["params"]["after"] < r["params"]["before"]
    assert "two-phase calibration on 16 inputs" in (out / "report.md").read_text()


@pytest.mark.slow
def test_channels_chosen_on_calibration_activations(calibrated):
    """statistics: calibration plans with the activations measured on the calibration inputs (the same plan a
    ChannelPlanner gets from those statistics), then calibrates; the report says how channels were chosen."""
    from dfp_deploy.analysis import analyze
    from dfp_deploy.compress.select.measured import measured_group_statistics
    from dfp_deploy.compress.select.planner import ChannelPlanner
    from dfp_deploy.data.sources import load_calibration_inputs
    from dfp_deploy.models import load_model

    data, out, _ = calibrated
    r = json.loads((out / "report.json").read_text())
    assert r["prune"]["selection"] == {"importance": "lmmse", "allocation": "macs-abs", "statistics": "calibration"}
    assert "on activations measured on the calibration inputs, allocated by `macs-abs`" in (out / "report.md").read_text()

    torch.manual_seed(0)  # the build seeds the random initialisation of the weightless model with recipe.seed
    loaded = load_model("cifar_resnet20")
    model = loaded.module.eval()
    analysis = analyze(model, torch.zeros(1, 3, 32, 32))
    x = load_calibration_inputs(str(data), 16, model=model, preprocess=loaded.preprocess,
                                input_shape=loaded.input_shape, seed=0)
    measured = measured_group_statistics(model, analysis, x)
    expected = ChannelPlanner(model, analysis, importance="lmmse", allocation="macs-abs", round_to=1,
                              measured=measured).plan(0.5)
    modelled = ChannelPlanner(model, analysis, importance="lmmse", allocation="macs-abs", round_to=1).plan(0.5)
    written = {g: tuple(k) for g, k in json.loads((out / "plan.json").read_text())["keep"].items()}
    assert written == expected.keep != modelled.keep


@pytest.mark.slow
def test_calibration_images_are_loaded_once_for_every_use(calibrated):
    """Channels chosen on the images, two-phase calibration and int8 ranges from the same images: one load, and
    the ranges came from them."""
    _, out, calls = calibrated
    r = json.loads((out / "report.json").read_text())
    assert r["quantization"]["activations"] == "calibration"
    assert r["compress"]["calibration"]["samples"] == 16
    assert calls == ["compress.calibration"]


@pytest.mark.parametrize("settings, message", [
    (["compress.prune.importance=lmmse"], "statistics: calibration needs compress.calibration.data"),
    (["compress.calibration.data=eval.npz"], "statistics: calibration needs compress.prune.importance: lmmse"),
    (["compress.prune.importance=lmmse", "compress.calibration.data=eval.npz", "search.episodes=2"],
     "cannot be combined with search"),
])
def test_calibration_statistics_are_refused_where_they_cannot_apply(recipe, tmp_path, settings, message):
    sets = [a for s in settings for a in ("--set", s.replace("eval.npz", str(tmp_path / "eval.npz")))]
    res = run("build", recipe, "--out", tmp_path / "o", "--quiet", "--set",
              "advanced.compress.prune.statistics=calibration",
              *sets)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (tmp_path / "o").exists()


def test_calibration_and_data_free_repair_are_exclusive(recipe, tmp_path):
    res = run("build", recipe, "--out", tmp_path / "o", "--quiet", "--set", "compress.reconstruct=udfc",
              "--set", "compress.calibration.data=" + str(tmp_path / "eval.npz"))
    assert res.exit_code == 2
    assert "calibration replaces the data-free repair" in res.output


def test_every_shipped_recipe_is_valid():
    from dfp_deploy.recipe import load_recipe

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        assert load_recipe(path).model.name, path


@pytest.mark.slow
def test_report_shows_what_channel_rounding_cost(built):
    _, out, res = built
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    rnd = r["rounding"]
    assert rnd["round_to"] == 8 and rnd["macs_rounded"] == r["macs"]["after"]
    assert rnd["macs_unrounded"] != rnd["macs_rounded"]  # 16·0.6 = 9.6 → 8 channels rounded, 10 exact
    assert rnd["p50_ms_unrounded"] > 0 and rnd["latency_gain"] > 0
    assert "Channel rounding to multiples of 8" in (out / "report.md").read_text()
    assert not list(out.glob(".unrounded*"))


def _size_measurer():
    """The search's LocalMeasurer with the real engine builds but a noise-free clock: the candidate runs
    10 ms × (0.3 + 0.7 × parameter share), the original 10 ms. (The tiny test net's real latency hardly depends on its
    widths: under load its floor plan measured up to 0.96 of the original, which made this test's 0.95 budget
    flaky.)"""
    from dfp_deploy.measure.workers import LocalMeasurer

    class SizeMeasurer(LocalMeasurer):
        def __init__(self, spec, original, **kw):
            super().__init__(spec, original, **kw)
            self._params = self._count(original.module)

        @staticmethod
        def _count(model) -> int:
            return sum(p.numel() for p in model.parameters())

        def measure(self, candidates):
            assert all(callable(self._bench._engine(c.onnx, "candidate", c.module)) for c in candidates)  # real
            return [(10.0 * (0.3 + 0.7 * self._count(c.module) / self._params), 10.0) for c in candidates]

    return SizeMeasurer


@pytest.mark.slow
def test_latency_budget_search_fits_its_model_to_the_original_and_the_floor(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", own_cache(tmp_path / "cache"))
    monkeypatch.setattr("dfp_deploy.measure.workers.LocalMeasurer", _size_measurer())
    common = ["--set", "search.episodes=2", "--set", "advanced.search.warmup=1", "--set", "search.samples=8",
              "--set", "advanced.search.synthetic_steps=2", "--set", "search.target=latency"]
    res = run("build", recipe, "--out", tmp_path / "lat", *FAST, *common, "--set", "search.ratio=0.05")
    assert res.exit_code == 0, res.output
    fitted = json.loads((tmp_path / "lat" / "report.json").read_text())["search"]["latency_model"]
    assert set(fitted["measured_ms"]) == {"original", "floor"}
    assert fitted["measured_ms"]["original"] == 10.0 and 3.0 < fitted["measured_ms"]["floor"] < 10.0
    # advanced.search.measure "best" (default): the first candidate is always a new best, so it is timed on the target
    log = [json.loads(line) for line in (tmp_path / "lat" / "search_log.jsonl").read_text().splitlines()]
    timed = [r for r in log if r["latency_ms"] is not None]
    assert log[0]["latency_ms"] is not None and len(timed) == fitted["candidates_timed"] >= 1
    assert fitted["engines_timed"] == 2 + fitted["candidates_timed"]
    assert fitted["target_ms"] == pytest.approx(0.95 * fitted["measured_ms"]["original"])
    best = json.loads((tmp_path / "lat" / "report.json").read_text())["search"]
    assert best["latency_penalty"] == 10.0  # the recipe default reaches the reward
    assert all(r["reward"] == pytest.approx(r["proxy"] - 10.0 * max(0.0, r["latency_ms"] / fitted["target_ms"] - 1))
               for r in timed)
    assert "engines timed during the search" in (tmp_path / "lat" / "report.md").read_text()
    assert best["best_latency_ms"] == log[best["best_episode"]]["latency_ms"] is not None  # the plan returned was timed
    # the floor keeps >= 20% of every inner group and the whole residual stream: 5% of the latency is out of reach
    res = run("build", recipe, "--out", tmp_path / "lat5", *FAST, *common, "--set", "search.ratio=0.95")
    assert res.exit_code == 2 and "unreachable" in res.output
    assert not (tmp_path / "lat5").exists()


@pytest.fixture(scope="module")
def three_bit(tmp_path_factory):
    """Two 3-bit UDFC builds, with and without bias correction, stem and classifier at 8 bits, of a net whose BN
    means are not 0 (a freshly initialised net has BN means 0, so every layer's input mean, hence the correction,
    would be 0). Returns {name: (report, state_dict, output folder)}."""
    from dfp_deploy.models import load_model

    tmp = tmp_path_factory.mktemp("three_bit")
    recipe = _write_recipe(tmp)
    state = load_model("cifar_resnet20", None).module.state_dict()
    generator = torch.Generator().manual_seed(0)
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.copy_(torch.rand(value.shape, generator=generator))
    torch.save(state, tmp / "trained_like.pt")

    def build(name, *extra):
        res = run("build", recipe, "--out", tmp / name, *FAST, "--set", f"model.weights={tmp / 'trained_like.pt'}",
                  "--set", "compress.reconstruct=udfc", "--set", "compress.quantize.weight_bits=3",
                  "--set", "advanced.compress.quantize.first_last_bits=8", *extra)
        assert res.exit_code == 0, res.output
        report = json.loads((tmp / name / "report.json").read_text())
        return report, torch.load(tmp / name / "model.pt", weights_only=False).state_dict(), tmp / name

    return {"default": build("default"), "bc": build("bc", "--set", "advanced.compress.quantize.bias_correction=true")}


@pytest.mark.slow
def test_bias_correction_reaches_the_build_and_the_report(three_bit):
    default, weights_default, _ = three_bit["default"]
    corrected, weights_corrected, out = three_bit["bc"]
    assert default["compress"]["bias_correction"] is False  # UDFC as published
    assert corrected["compress"]["bias_correction"] is True
    assert "bias correction on" in (out / "report.md").read_text()
    # the correction moves BN means (or biases) only; the quantized weights are the same
    moved = [k for k in weights_default if not torch.equal(weights_default[k], weights_corrected[k])]
    assert moved and all(k.endswith(("running_mean", "bias")) for k in moved)


@pytest.mark.slow
def test_first_and_last_layers_keep_their_own_bits(three_bit):
    report, weights, out = three_bit["default"]
    assert report["compress"]["weight_bits"] == 3
    assert report["compress"]["layer_bits"] == {"conv1": 8, "linear": 8}  # ResNet-20's stem and classifier
    assert "(8 in `conv1`, `linear`)" in (out / "report.md").read_text()
    # 3-bit layers hold at most 7 levels per output channel, the 8-bit stem more
    assert len(torch.unique(weights["layer1.0.conv1.weight"][0])) <= 7
    assert len(torch.unique(weights["conv1.weight"][0])) > 7


def test_bias_correction_with_calibration_is_refused_before_anything_runs(recipe, tmp_path):
    res = run("build", recipe, "--out", tmp_path / "o", "--quiet", "--set",
              "advanced.compress.quantize.bias_correction=true",
              "--set", "compress.quantize.weight_bits=4", "--set", "search.episodes=3",
              "--set", "compress.calibration.data=" + str(tmp_path / "eval.npz"))
    assert res.exit_code == 2
    assert "bias_correction: applies to the data-free repair" in res.output
    assert not (tmp_path / "o").exists()


def test_shipped_search_recipes_can_reach_their_budget():
    """The MAC floor of a search space depends on the architecture only (no weights needed): a shipped search recipe
    whose budget sits below it would stop with "unreachable" on its default settings."""
    from dfp_deploy.analysis import analyze
    from dfp_deploy.models import load_model
    from dfp_deploy.pipeline import resolve_recipe
    from dfp_deploy.recipe import load_recipe
    from dfp_deploy.search.env import MacCost, PruneEnv
    from dfp_deploy.search.space import build_space

    checked = 0
    for path in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        if not recipe.search.episodes or recipe.search.target != "macs":
            continue
        loaded = load_model(recipe.model.name, None)
        one = torch.zeros((1, *loaded.input_shape))
        plan = resolve_recipe(recipe)
        space = build_space(loaded.module, analyze(loaded.module, one), one, min_keep=plan.search.min_keep,
                            round_to=plan.select.round_to, include_residual=plan.search.include_residual)
        PruneEnv(space, MacCost(space), plan.search.budget).check_reachable()  # raises InputError if not
        checked += 1
    assert checked >= 1


def test_summary_and_warnings_say_when_the_speedup_moved_between_rounds():
    from dfp_deploy.cli import _summary
    from dfp_deploy.report.assemble import latency_warnings as _latency_warnings

    def report(rounds):
        latency = {"backend": "ort-cpu", "batch": 8, "speedup": 1.39, "speedup_rounds": rounds,
                   "before": {"p50_ms": 3.2}, "after": {"p50_ms": 2.3}}
        return {"params": {"before": 10, "after": 5}, "macs": {"before": 1e6, "after": 5e5}, "latency": latency,
                "parity": {"max_abs_err": 1e-6}, "artifacts": {"dir": "out"}}

    moved, steady = report([1.35, 1.68, 2.44]), report([1.36, 1.37, 1.36])
    assert "(1.39x, 1.35-2.44x by round, ort-cpu" in _summary(moved)
    assert "(1.39x, ort-cpu" in _summary(steady)
    assert _latency_warnings(steady["latency"]) == []
    (warning,) = _latency_warnings(moved["latency"])
    assert "1.35x to 2.44x" in warning and "quiet machine" in warning


def test_bn_adapt_reestimates_the_statistics_before_quantizing(recipe, tmp_path):
    def build(name, *extra):
        res = run("build", recipe, "--out", tmp_path / name, *FAST, "--set", "measure.latency=false",
                  "--set", "compress.reconstruct=udfc", "--set", "compress.quantize.weight_bits=4", *extra)
        assert res.exit_code == 0, res.output
        report = json.loads((tmp_path / name / "report.json").read_text())
        return report, torch.load(tmp_path / name / "model.pt", weights_only=False)

    plain, plain_model = build("plain")
    adapted, adapted_model = build("adapted", "--set", "compress.bn_adapt.data=synthetic",
                                   "--set", "compress.bn_adapt.samples=12", "--set",
                                   "advanced.compress.bn_adapt.synthetic_steps=3")
    assert plain["compress"]["bn_adapt"] is None
    trust = adapted["compress"]["bn_adapt"].pop("self_agreement")
    assert adapted["compress"]["bn_adapt"] == {"data": "synthetic", "samples": 12, "synthetic_steps": 3}
    assert 0.0 <= trust <= 1.0
    warned = [w for w in adapted["warnings"] if w.startswith("compress.bn_adapt:")]
    assert bool(warned) == (trust < 0.9), (trust, warned)
    assert "BatchNorm statistics re-estimated on 12 synthetic inputs" in (tmp_path / "adapted" / "report.md").read_text()
    assert adapted["prune"] == plain["prune"] and adapted["macs"] == plain["macs"]
    # the statistics moved, and the weights are still on the 4-bit grid (quantized after the re-estimation)
    bn = "layer1.0.bn1"
    assert not torch.allclose(dict(plain_model.named_modules())[bn].running_var,
                              dict(adapted_model.named_modules())[bn].running_var)
    weights = [m.weight for m in adapted_model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(len(torch.unique(w[0])) <= 16 for w in weights)  # still 4-bit weights after the re-estimation


def test_bn_adapt_with_calibration_is_refused(recipe, tmp_path):
    res = run("build", recipe, "--out", tmp_path / "o", "--quiet", "--set", "compress.bn_adapt.data=synthetic",
              "--set", "compress.calibration.data=" + str(tmp_path / "eval.npz"))
    assert res.exit_code == 2
    assert "already re-estimates the BatchNorm statistics" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_udfc_vector_form_reaches_the_build(recipe, tmp_path):
    """advanced.compress.udfc_form: vector builds exactly what the library's UDFC vector (NNLS) form gives for the
    plan, which is not what the default single merges give; the report names the form."""
    from dfp_deploy.analysis import analyze
    from dfp_deploy.compress.repair.apply import compress_model
    from dfp_deploy.core.types import PrunePlan
    from dfp_deploy.models import load_model

    out = tmp_path / "vector"
    res = run("build", recipe, "--out", out, *FAST, "--set", "measure.latency=false",
              "--set", "compress.reconstruct=udfc", "--set", "advanced.compress.udfc_form=vector")
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    assert r["compress"]["reconstruct"] == "udfc" and r["compress"]["udfc_form"] == "vector"
    assert "reconstruction `udfc` (vector form)" in (out / "report.md").read_text()

    torch.manual_seed(0)  # the build seeds the random initialisation of the weightless model with recipe.seed
    model = load_model("cifar_resnet20").module.eval()
    analysis = analyze(model, torch.zeros(1, 3, 32, 32))
    plan = PrunePlan(keep={g: tuple(k) for g, k in json.loads((out / "plan.json").read_text())["keep"].items()})
    built = torch.load(out / "model.pt", weights_only=False).state_dict()
    vector = compress_model(model, analysis, plan, method="udfc", multi=True).state_dict()
    merges = compress_model(model, analysis, plan, method="udfc").state_dict()
    assert built.keys() == vector.keys()
    assert all(torch.equal(built[k], vector[k]) for k in built)
    assert not all(torch.equal(built[k], merges[k]) for k in built)


def test_udfc_form_without_udfc_is_refused(recipe, tmp_path):
    res = run("build", recipe, "--out", tmp_path / "o", "--quiet", "--set", "compress.reconstruct=lmmse",
              "--set", "advanced.compress.udfc_form=vector")
    assert res.exit_code == 2
    assert "advanced.compress.udfc_form: vector applies to compress.reconstruct: udfc only" in res.output
    assert not (tmp_path / "o").exists()


def test_input_larger_than_the_images_fails_at_once_naming_model_resize(recipe, tmp_path):
    res = run("build", recipe, "--out", tmp_path / "o", "--set", "model.input_size=[3,40,40]")
    assert res.exit_code == 2 and "Traceback" not in res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: eval.data: ") and "32x32 images, smaller than the model's 40x40 input" in line
    assert "advanced.model.resize=46" in line and len(line) <= 300
    assert not (tmp_path / "o").exists()
    res = run("build", recipe, "--out", tmp_path / "o", "--set", "model.input_size=[3,40,40]",
              "--set", "advanced.model.resize=36")
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith("error: advanced.model.resize: 36 is smaller than the 40x40 "
                                                          "input")
    res = run("build", recipe, "--out", tmp_path / "o", "--set", "advanced.eval.start=24")
    assert res.exit_code == 2 and "advanced.eval.start: 24 is beyond the 24 images" in res.output


def test_resize_and_start_reach_the_build(recipe, tmp_path):
    """A 40-px model on 32-px images with advanced.model.resize, evaluated on images 8..19 only."""
    res = run("build", recipe, "--out", tmp_path / "o", *FAST, "--set", "model.input_size=[3,40,40]",
              "--set", "advanced.model.resize=44", "--set", "advanced.eval.start=8", "--set", "eval.limit=12")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["accuracy"]["start"] == 8 and report["accuracy"]["n"] == 12
    assert report["model"]["input_shape"] == [3, 40, 40]
