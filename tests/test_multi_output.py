"""Models with several outputs (detectors): naming, export, per-output parity, builds on every CPU target, and a
user-supplied eval.metric."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from dfp_deploy.cli import main
from dfp_deploy.core.errors import InputError
from dfp_deploy.core.outputs import as_named, concat, flatten, take, to_numpy
from dfp_deploy.measure.metric import check_result, evaluate
from dfp_deploy.measure.parity import ParityRule, parity

QUICK_SETS = ["measure.latency=false", "advanced.measure.parity_samples=8"]
QUICK = [a for s in QUICK_SETS for a in ("--set", s)] + ["--quiet"]


class _Engine:
    def __init__(self, fn):
        self.name, self.run = "fake", fn


class _Int8Engine:
    """An int8 engine stand-in, held to the real Engine API (backends/registry.py): it returns `reference`'s outputs
    with requantization-sized rounding noise, and optionally one output zeroed (an engine that lost a head)."""

    static_batch, threads = None, 1

    def __init__(self, reference, *, noise: float = 0.02, zeroed: str | None = None, name: str = "fake int8"):
        self.name, self.reference, self.noise, self.zeroed = name, reference, noise, zeroed

    def run(self, x: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(1)
        out = {}
        for key, v in as_named(self.reference(x)).items():
            rms = float(np.sqrt(np.mean(np.square(v))))
            out[key] = (np.zeros_like(v) if key == self.zeroed else
                        v + (self.noise * rms * rng.standard_normal(v.shape)).astype(v.dtype))
        return out

    def prepare(self, x: np.ndarray):
        return lambda: None

    def inspect(self):
        from dfp_deploy.core.types import EngineSummary

        return EngineSummary(self.name, "int8", "int8")


def test_the_int8_stand_in_engine_has_the_real_engine_api():
    import inspect

    from dfp_deploy.backends.registry import Engine

    for method in ("run", "prepare", "inspect"):
        assert (list(inspect.signature(getattr(_Int8Engine, method)).parameters)
                == list(inspect.signature(getattr(Engine, method)).parameters))
    assert all(hasattr(_Int8Engine(None), attr) for attr in Engine.__annotations__)


def test_outputs_are_named_after_the_tuple_index_and_the_dict_key():
    t = torch.zeros(2, 3)
    assert [n for n, _ in flatten(t)] == ["logits"]
    assert [n for n, _ in flatten((t, t))] == ["output_0", "output_1"]
    assert [n for n, _ in flatten({"boxes": t, "scores": (t, t)})] == ["boxes", "scores.0", "scores.1"]
    named = to_numpy({"boxes": t, "scores": t + 1})
    assert list(named) == ["boxes", "scores"] and named["scores"].shape == (2, 3)
    assert isinstance(to_numpy(t), np.ndarray) and list(as_named(to_numpy(t))) == ["logits"]
    both = concat([named, named])
    assert both["boxes"].shape == (4, 3) and take(both, 1)["scores"].shape == (1, 3)
    for bad, why in (((t, None), "None at output 'output_1'"), ({1: t}, "key 1"), ((), "needs a tensor"),
                     ({"a.b": t}, "without '.'")):
        with pytest.raises(InputError, match=why):
            flatten(bad)


def test_each_output_is_judged_against_its_own_scale():
    big = np.linspace(-1e4, 1e4, 40).reshape(4, 10)
    small = np.linspace(-1, 1, 8).reshape(4, 2)
    ref = {"big": big, "small": small}
    rule = ParityRule("fp32", 10, 100, 1e-3)
    good = parity(lambda x: ref, _Engine(lambda x: {"big": big * (1 + 1e-7), "small": small}), np.zeros((4, 1)),
                  rule=rule)
    assert good["rule"]["passed"] and good["top1_agreement"] is None
    assert good["outputs"]["big"]["tolerance"] > 1e-2 and good["outputs"]["small"]["tolerance"] == 1e-3
    # 5e-3 on the small head is hidden by a tolerance taken from the large one (max|R| = 1e4 over both outputs)
    bad = parity(lambda x: ref, _Engine(lambda x: {"big": big, "small": small + 5e-3}), np.zeros((4, 1)), rule=rule)
    assert 5e-3 < rule.rel_tolerance * 1e4
    assert not bad["rule"]["passed"] and "output 'small'" in bad["rule"]["failure"]
    assert bad["outputs"]["big"]["passed"] and not bad["outputs"]["small"]["passed"]


def test_an_output_too_small_for_parity_to_mean_anything_is_flagged():
    ref = {"scores": np.full((2, 5), 3e-9), "boxes": np.linspace(-2, 2, 8).reshape(2, 4)}
    result = parity(lambda x: ref, _Engine(lambda x: ref), np.zeros((2, 1)), rule=ParityRule("fp32", 3, 27, 1e-3))
    assert result["rule"]["passed"]
    assert not result["outputs"]["scores"]["informative"] and result["outputs"]["boxes"]["informative"]
    assert len(result["warnings"]) == 1 and "output 'scores'" in result["warnings"][0]
    # int8 (no tolerance): the absolute floor of a numerically zero reference still flags it
    int8 = parity(lambda x: ref, _Engine(lambda x: ref), np.zeros((2, 1)))
    assert not int8["outputs"]["scores"]["informative"] and int8["outputs"]["boxes"]["informative"]


def test_relative_rms_known_answers():
    from dfp_deploy.measure.parity import relative_rms

    ref = np.array([[3.0, -4.0]])
    assert relative_rms(ref, np.array([[3.3, -4.4]])) == pytest.approx(0.1)  # |(0.3, -0.4)| / |(3, -4)|
    assert relative_rms(ref, np.zeros_like(ref)) == 1.0 and relative_rms(ref, -ref) == 2.0
    assert relative_rms(np.zeros(3), np.zeros(3)) == 0.0 and relative_rms(np.zeros(3), np.ones(3)) == float("inf")
    assert relative_rms(ref, np.array([[np.nan, 0.0]])) == float("inf")


def test_the_int8_gate_judges_every_output_of_a_yolo_style_model_against_its_simulation():
    """int8 engines of models with several outputs have no class to agree on: each output must reproduce the
    simulated quantization within INT8_MAX_REL_RMS of its own RMS; one zeroed head fails the build in one line
    that names it (before, any such engine passed)."""
    from dfp_deploy.core.errors import ParityError
    from dfp_deploy.measure.parity import int8_verdict
    from dfp_deploy.pipeline.engine_step import enforce_parity, torch_runner
    from dfp_deploy.recipe.resolve import ParitySpec
    from tests._detectors import TinyYolo

    torch.manual_seed(0)
    simulation = torch_runner(TinyYolo().eval())
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    spec = ParitySpec("int8", 1e-3, 2, 0.9)

    def gate(engine):
        sim = parity(simulation, engine, x)
        par = {"top1_agreement": None, "simulated": {"rule": int8_verdict(sim)}}
        enforce_parity(spec, par, "gaussian noise")
        return sim

    good = gate(_Int8Engine(simulation))
    assert all(0.01 < o["rel_rms"] < 0.05 for o in good["outputs"].values())
    with pytest.raises(ParityError) as err:
        gate(_Int8Engine(simulation, zeroed="output_1"))
    message = str(err.value)
    assert message.startswith("parity: the int8 engine differs from its simulated quantization on output "
                              "'output_1' by 1 x the output's RMS (> 0.5") and "\n" not in message
    assert "output_0" not in message and "output_2" not in message and len(message) <= 300


def test_metric_data_pairs_arrays_with_the_evaluated_images_and_is_read_only():
    from dfp_deploy.measure.metric import eval_data

    images = np.zeros((3, 3, 4, 4), np.float32)
    data = eval_data(images, {"y": np.arange(5), "classes": np.arange(2)}, count=5)
    assert data["y"].tolist() == [0, 1, 2] and data["classes"].tolist() == [0, 1] and data["images"] is images
    later = eval_data(images, {"y": np.arange(5)}, count=5, start=2)  # advanced.eval.start: file images 2..4
    assert later["y"].tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="read-only"):
        data["images"][0] = 1


def test_metric_results_are_checked():
    assert check_result("m:f", np.float32(2.5)) == 2.5 and check_result("m:f", {"map": 1}) == {"map": 1.0}
    for bad in ("good", True, float("nan"), {}, {"map": "x"}, [1.0], None):
        with pytest.raises(InputError, match="eval.metric: m:f returned"):
            check_result("m:f", bad)
    with pytest.raises(InputError, match="eval.metric: m:f raised ValueError: empty"):
        evaluate("m:f", lambda run, data: (_ for _ in ()).throw(ValueError("empty")), None, {})


def _recipe(tmp: Path, factory: str, **sections) -> Path:
    text = f"model:\n  name: tests._detectors:{factory}\n  input_size: [3, 32, 32]\n"
    text += "compress:\n  prune:\n    ratio: 0.3\n    round_to: 8\n"
    for section, body in sections.items():
        text += f"{section}:\n" + "".join(f"  {line}\n" for line in body)
    path = tmp / f"{factory}.yaml"
    path.write_text(text)
    return path


def _eval_npz(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp / "det.npz"
    np.savez(path, x=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 4, 12))
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
@pytest.mark.parametrize("target", [["target.backend=ort-cpu", "measure.latency=true", "advanced.measure.runs=50",
                                     "advanced.measure.warmup=1", "advanced.measure.rounds=2"],
                                    ["target.backend=ort-cpu", "target.precision=int8", "target.batch=2"],
                                    ["target.backend=torch-cpu"]], ids=["ort-fp32-timed", "ort-int8", "torch-cpu"])
def test_a_yolo_style_tuple_model_prunes_exports_builds_and_passes_parity_per_output(tmp_path, target):
    recipe = _recipe(tmp_path, "TinyYolo")
    sets = [a for t in target for a in ("--set", t)]
    res = run("build", recipe, "--out", tmp_path / "out", *QUICK, *sets)
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    groups = {g["name"]: g for g in r["prune"]["groups"]}
    assert r["prune"]["groups_pruned"] >= 3 and r["macs"]["after"] < r["macs"]["before"]
    assert all(not groups[h]["prunable"] for h in ("h2", "h3", "h4"))  # the heads' channels are the outputs
    names = ["output_0", "output_1", "output_2"]
    assert [o.name for o in onnx.load(tmp_path / "out" / r["artifacts"]["onnx"]).graph.output] == names
    par = r["parity"]
    assert list(par["outputs"]) == names and all(o["informative"] for o in par["outputs"].values())
    if "target.precision=int8" in target:
        assert list(par["simulated"]["outputs"]) == names and par["top1_agreement"] is None
        assert all(o["rel_err"] < 0.5 for o in par["outputs"].values())
        assert par["simulated"]["rule"]["passed"] and par["simulated"]["rel_rms"] <= 0.5
        _int8_engine_with_a_lost_head_is_refused(recipe, sets, tmp_path / "out")
    else:
        assert par["rule"]["passed"] and all(o["passed"] for o in par["outputs"].values())
        assert par["max_abs_err"] <= 1e-3
    if "measure.latency=true" in target:
        assert r["latency"]["after"]["p50_ms"] > 0
    assert "| output_2 |" in (tmp_path / "out" / "report.md").read_text()


def _int8_engine_with_a_lost_head_is_refused(recipe: Path, sets: list[str], out: Path):
    """The build's own parity step on the real int8 graph and its simulation, with the built engine's
    output_2 zeroed: refused in one line naming that output."""
    from dfp_deploy.backends.registry import get_backend
    from dfp_deploy.core.errors import ParityError
    from dfp_deploy.pipeline import compress_step, engine_step
    from dfp_deploy.pipeline.context import resolve_recipe
    from dfp_deploy.recipe import load_recipe

    plan = resolve_recipe(load_recipe(recipe, [*QUICK_SETS, *(s for s in sets if s != "--set")]))
    loaded = compress_step.load(plan)
    compressed = torch.load(out / "model.pt", weights_only=False).eval()
    onnx_path = out / "model.int8.onnx"
    real = get_backend("ort-cpu").build(onnx_path, precision="int8", threads=1, out_dir=out, torch_model=compressed)
    lost = _Int8Engine(real.run, noise=0.0, zeroed="output_2")
    lost.static_batch = real.static_batch
    with pytest.raises(ParityError, match=r"^parity: the int8 engine differs from its simulated quantization on "
                                          r"output 'output_2' by 1 x"):
        engine_step.check_parity(plan, loaded, compressed, lost, onnx_path)


def test_a_weight_shared_by_two_convs_gets_one_dequantize_node_name_per_conv():
    """A detection head shared by several levels reads one weight in two Convs: the int8 pass gives each its own
    DequantizeLinear, and ONNX refuses two nodes of one name (ORT: 'two nodes with same node name')."""
    from onnx import TensorProto, helper

    from dfp_deploy.export.passes import pass_insert_qdq

    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2, 1, 1], np.ones(4, np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["a", "w"], ["y"], name="conv_b")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    out, changed = pass_insert_qdq(model, style="ort-cpu", ranges={"x": (-1.0, 1.0), "a": (-2.0, 2.0)})
    names = [n.name for n in out.graph.node]
    assert changed and len(names) == len(set(names))
    onnx.checker.check_model(out, full_check=True)


@pytest.mark.slow
def test_a_retinanet_style_dict_model_builds_and_is_scored_by_a_user_metric(tmp_path):
    data = _eval_npz(tmp_path)
    recipe = _recipe(tmp_path, "TinyRetina", target=["batch: 4"],
                     eval=[f"data: {data}", "metric: tests._detectors:head_scores"])
    res = run("build", recipe, "--out", tmp_path / "out", *QUICK)
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(r["parity"]["outputs"]) == ["cls_logits", "bbox_regression"]
    acc = r["accuracy"]
    assert acc["metric"] == "tests._detectors:head_scores" and acc["n"] == 12
    assert set(acc["before"]) == set(acc["after"]) == {"top1", "box_mean_abs"}
    assert 0 <= acc["after"]["top1"] <= 100 and acc["before"]["box_mean_abs"] > 0
    assert "tests._detectors:head_scores" in res.output


@pytest.mark.slow
def test_parity_on_vanishing_logits_is_flagged_in_the_report_and_on_stdout(tmp_path):
    recipe = _recipe(tmp_path, "Vanishing")
    res = run("build", recipe, "--out", tmp_path / "out", *QUICK)
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    assert r["parity"]["outputs"]["logits"]["informative"] is False
    assert any("cannot tell a right engine" in w for w in r["warnings"])
    assert "warning: parity: max|R| of the logits" in res.output


@pytest.mark.parametrize("metric, message", [
    ("nope", "eval.metric: 'nope' is not of the form 'package.module:function'"),
    ("os.path:join", "eval.metric: os.path is Python's standard library"),
    ("tests._no_such_module:f", "eval.metric: cannot import module 'tests._no_such_module'"),
    ("tests._detectors:missing", "eval.metric: module 'tests._detectors' has no attribute 'missing'"),
    ("tests._detectors:TinyYolo", "eval.metric: tests._detectors:TinyYolo is a type, not a Python function"),
    ("top1", "eval.metric: top1 needs a model that returns one [N, classes] logits tensor"),
])
def test_bad_metrics_fail_in_one_line_before_any_work(tmp_path, metric, message):
    recipe = _recipe(tmp_path, "TinyYolo", eval=[f"data: {_eval_npz(tmp_path)}", f"metric: '{metric}'"])
    res = run("build", recipe, "--out", tmp_path / "out", *QUICK)
    assert res.exit_code == 2 and res.output.startswith(f"error: {message}"), res.output
    assert len(res.output.strip().splitlines()) == 1 and "[1/8]" not in res.output


@pytest.mark.parametrize("metric, message", [
    ("returns_text", "eval.metric: tests._detectors:returns_text returned str 'good'"),
    ("raises", "eval.metric: tests._detectors:raises raised ValueError: no boxes in this batch"),
])
def test_a_metric_that_misbehaves_is_one_line(metric, message):
    import tests._detectors as det

    fn = getattr(det, metric)
    with pytest.raises(InputError) as err:
        evaluate(f"tests._detectors:{metric}", fn, lambda x: x, {"images": np.zeros((1, 3, 4, 4))})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_steps_that_read_a_class_decision_say_so_for_a_model_with_several_outputs(tmp_path, monkeypatch):
    import dfp_deploy.data.synthetic as synthetic
    from dfp_deploy.compress.calibrate.bn_adapt import self_agreement
    from tests._detectors import TinyRetina

    assert self_agreement(TinyRetina().eval(), torch.randn(4, 3, 32, 32)) is None  # no top-1 class to keep

    def no_generation(*args, **kwargs):
        raise AssertionError("proxy inputs generated for a search the model cannot have")

    monkeypatch.setattr(synthetic, "bn_matched_inputs", no_generation)  # the refusal comes before any work
    res = run("build", _recipe(tmp_path, "TinyYolo"), "--out", tmp_path / "out", *QUICK, "--set", "search.episodes=4")
    assert res.exit_code == 2 and res.output.startswith("error: search.episodes: the search scores candidates by "
                                                        "their logits' fidelity"), res.output
