"""bench/gpu_check.py, the GPU acceptance run: its plan (dry run) and its behaviour on a machine without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.gpu_check import main, plan

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_lists_every_gpu_build_with_loadable_recipes_and_exits_0(tmp_path, capsys):
    assert main(["--dry-run", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    steps = [line.split(":")[0].strip() for line in lines if line.startswith("  ") and "backends:" not in line]
    # an empty data root: quickstart only (ResNet-56 needs ../shared), every GPU backend and precision, one search
    assert steps == ["quickstart-torch-cuda-fp32", "quickstart-torch-cuda-fp16", "quickstart-tensorrt-fp32",
                     "quickstart-tensorrt-fp16", "quickstart-tensorrt-int8", "quickstart-ort-cuda-fp32",
                     "search-latency-tensorrt"]
    assert "search.target=latency" in stdout and "all 7 recipes load" in stdout
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_plan_adds_resnet56_when_the_data_root_has_it_and_skips_missing_backends():
    shared = REPO.parent / "shared"
    if not (shared / "models" / "resnet56-4bfd9763.th").is_file():
        pytest.skip("../shared (pretrained ResNet-56) is not present")
    steps = plan(shared, {"torch-cuda": True, "tensorrt": False, "ort-cuda": False})
    assert [s["name"] for s in steps] == ["quickstart-torch-cuda-fp32", "quickstart-torch-cuda-fp16",
                                          "resnet56-torch-cuda-fp32", "resnet56-torch-cuda-fp16",
                                          "search-latency-torch-cuda"]


def test_without_a_gpu_the_run_records_the_listing_and_builds_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the real run would build engines")
    assert main(["--out", str(tmp_path / "o"), "--data-root", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert {b["name"] for b in summary["backends"]} >= {"torch-cuda", "tensorrt", "ort-cuda"}
    assert summary["steps"] == {} and "no GPU backend" in summary["note"]
    assert "torch" in summary["environment"]["versions"]
