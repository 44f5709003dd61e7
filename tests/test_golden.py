"""Golden builds: the shipped recipes built on the real model files, their plans and top-1 pinned to today's values.

Each build runs once, through the CLI with `measure.latency=false` in a process of its own, started in the
background as soon as pytest has collected it (tests/_golden.py, conftest.py); several tests read its outputs through the public contract only (report.json's stable keys, plan.json, model.pt and the engine's ONNX),
so that restructuring the code cannot move a documented number unnoticed. Pinned per build, in
tests/golden/<name>.json: the kept channels of every group exactly (a sha256 of plan.json's keep lists, plus the
count per group so that a failure says where), params and MACs exactly, and top-1 before and after to ±0.05
points (on CIFAR-10's 932 images one image is 0.107 points, so this is "the same images right").

The pinned values are what the code computed when they were recorded (the commit is in each file). They change
only with a change that is meant to change results, recorded again with `DFP_GOLDEN_RECORD=1 pytest -m golden`,
and the commit says why. A recipe key that moves may be renamed in BUILDS (tests/_golden.py); the numbers stay.

Builds that take minutes as shipped run a cheaper variant that goes through the same code path; each says which and
why. The real files live in the shared folder beside the checkout (../shared); without it those builds are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import onnx
import pytest
import torch

from _golden import BUILDS, ROOT, SHARED, Build, runner

PINNED = Path(__file__).resolve().parent / "golden"
TOP1_TOLERANCE = 0.05  # points
RECORD = bool(os.environ.get("DFP_GOLDEN_RECORD"))

pytestmark = [pytest.mark.golden, pytest.mark.slow]


def _plan_digest(keep: dict[str, list[int]]) -> str:
    canonical = json.dumps({g: sorted(int(c) for c in k) for g, k in sorted(keep.items())}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _observed(build: Build, out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    keep = json.loads((out / "plan.json").read_text())["keep"]
    observed = {"recipe": f"recipes/{build.recipe}", "settings": list(build.settings), "variant": build.why,
                "plan_sha256": _plan_digest(keep), "kept": {g: len(k) for g, k in sorted(keep.items())},
                "params": {k: report["params"][k] for k in ("before", "after")},
                "macs": {k: report["macs"][k] for k in ("before", "after")}}
    if "accuracy" in report:
        observed["top1"] = {k: report["accuracy"][k] for k in ("before", "after", "n")}
    return observed


def _build(name: str) -> tuple:
    build = BUILDS[name]
    if build.needs_shared and not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the shared folder with the real weights and images) is absent")
    done = runner().result(name)
    assert done.returncode == 0, done.output
    observed = _observed(build, done.out)
    path = PINNED / f"{name}.json"
    if RECORD:
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"commit": _commit(), **observed}, indent=1) + "\n")
    pinned = json.loads(path.read_text())
    return build, json.loads((done.out / "report.json").read_text()), done.out, observed, pinned


@pytest.fixture(scope="module")
def golden_builds():
    """Reads each build once for all the tests that check it (a failed or skipped build is not retried)."""
    done: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in done:
            try:
                done[name] = ("ok", _build(name))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # pytest's skip and failure outcomes are BaseExceptions
                done[name] = ("raised", exc)
        kind, value = done[name]
        if kind == "raised":
            raise value
        return value

    return get


@pytest.fixture
def golden(request, golden_builds):
    """(build, report, output folder, observed values, pinned values) of the build named by the parameter."""
    return golden_builds(request.param)


def _names(*wanted: str) -> list[str]:
    return list(wanted) if wanted else list(BUILDS)


def _parametrize(*wanted: str):
    return pytest.mark.parametrize("golden", _names(*wanted), indirect=True)


@_parametrize()
def test_plan_keeps_the_pinned_channels(golden):
    _, _, _, observed, pinned = golden
    assert observed["kept"] == pinned["kept"]  # the count per group first: a readable failure
    assert observed["plan_sha256"] == pinned["plan_sha256"]


@_parametrize()
def test_params_and_macs_are_pinned(golden):
    _, _, _, observed, pinned = golden
    assert observed["params"] == pinned["params"]
    assert observed["macs"] == pinned["macs"]


@_parametrize()
def test_top1_is_pinned(golden):
    build, report, _, observed, pinned = golden
    if "top1" not in pinned:
        assert "accuracy" not in report and not build.needs_shared  # only the quickstart has no images
        return
    assert observed["top1"]["n"] == pinned["top1"]["n"]
    for side in ("before", "after"):
        assert abs(observed["top1"][side] - pinned["top1"][side]) <= TOP1_TOLERANCE, (side, observed["top1"])


@_parametrize(*[n for n in BUILDS if n != "cifar_resnet56_int8"])
def test_float_engines_match_pytorch(golden):
    _, report, out, _, _ = golden
    assert report["parity"]["max_abs_err"] <= 1e-3
    for name in ("model.onnx", "original.onnx", "model.pt", "plan.json", "report.md"):
        assert (out / name).is_file(), name


@_parametrize("cifar_resnet56_int8")
def test_int8_engine_is_quantized(golden):
    _, report, out, _, _ = golden
    graph = onnx.load(str(out / report["artifacts"]["onnx"])).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 56  # ResNet-56: 55 convolutions and the classifier
    # every one reads its activations and its weights through DequantizeLinear (the integer kernels' Q/DQ pattern)
    assert all(producer.get(n.input[0]) == producer.get(n.input[1]) == "DequantizeLinear" for n in layers)


@_parametrize("cifar_resnet56_w3")
def test_three_bit_weights_keep_the_stem_and_classifier_at_8_bits(golden):
    _, _, out, _, _ = golden
    model = torch.load(out / "model.pt", weights_only=False)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    levels = [max(len(torch.unique(w)) for w in layer.weight.detach().flatten(1)) for layer in layers]
    assert max(levels[1:-1]) <= 7  # symmetric 3-bit: -3..3 times a per-channel scale
    assert levels[0] > 7 and levels[-1] > 7
