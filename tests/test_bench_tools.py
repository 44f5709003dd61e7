"""The bench scripts' pure parts: --data-root path mapping, RESULTS.md rendering, the AST code-shape counts."""

import ast
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield {name: importlib.import_module(name) for name in ("data_root", "results", "code_shape")}
    finally:
        sys.path.remove(str(BENCH))


def test_path_overrides_move_shared_files_under_the_data_root(bench, tmp_path):
    results, data_root = bench["results"], bench["data_root"]
    recipe = data_root.REPO / "recipes" / "cifar_resnet56.yaml"
    sets = results.path_overrides(recipe, tmp_path)
    assert sets == [f"model.weights={tmp_path / 'models' / 'resnet56-4bfd9763.th'}",
                    f"eval.data={tmp_path / 'data' / 'cifar10_test_exact932.npz'}"]
    # the default data root is where the recipes already point: nothing to override
    assert results.path_overrides(recipe, (data_root.REPO / data_root.DEFAULT).resolve()) == []


def test_fill_only_sets_the_paths_left_out(bench, tmp_path):
    import argparse

    data_root = bench["data_root"]
    args = argparse.Namespace(data_root=str(tmp_path), weights=None, eval="mine.npz")
    data_root.fill(args, {"weights": "models/w.th", "eval": "data/e.npz"})
    assert args.weights == str(tmp_path / "models" / "w.th") and args.eval == "mine.npz"


def test_render_marks_rows_that_were_not_regenerated(bench):
    row = {"recipe": "a", "model": "m", "params": [10, 5], "macs": [2e6, 1e6], "top1": [90.0, 89.5],
           "p50_ms": [2.0, 1.0], "speedup": 2.0, "speedup_rounds": [1.9, 2.1], "engine": "ort-cpu fp32",
           "hardware": "cpu", "versions": "torch x", "command": "dfp-deploy build recipes/a.yaml", "commit": "abc",
           "source": None}
    copied = {**row, "recipe": "b", "macs": "−50 %", "p50_ms": None, "speedup": None, "speedup_rounds": None,
              "source": "b: from docs/research/x.md, not yet regenerated"}
    page = bench["results"].render({"a": row, "b": copied})
    line_a = next(line for line in page.splitlines() if "[a](" in line)
    line_b = next(line for line in page.splitlines() if "[b](" in line)
    assert "10 → 5" in line_a and "2.0 → 1.0" in line_a and "2.00× (1.90–2.10 by round)" in line_a
    assert "[1]" in line_b and "−50 %" in line_b and "[1]" not in line_a
    assert "1. b: from docs/research/x.md, not yet regenerated" in page


def test_code_shape_counts_functions_methods_and_nesting(bench):
    tree = ast.parse("def f():\n    def g():\n        pass\n    return g\n\n"
                     "class C:\n    @staticmethod\n    def m():\n        return 1\n")
    assert sorted(bench["code_shape"].functions(tree)) == [("C.m", 3), ("f", 4), ("f.g", 2)]


def test_results_row_names_the_images_its_top1_was_measured_on(bench):
    results = bench["results"]
    report = {"model": {"name": "m"}, "params": {"before": 10, "after": 5}, "macs": {"before": 2e6, "after": 1e6},
              "accuracy": {"before": 83.5, "after": 78.25, "n": 800, "start": 500},
              "latency": {"backend": "ort-cpu", "precision": "fp32", "batch": 1, "threads": 1},
              "environment": {"cpu": "x", "cores": 2, "torch": "2"}}
    row = results.row_from_report("r", "dfp-deploy build recipes/r.yaml", report, None, "abc")
    assert row["eval_images"] == [500, 1299]
    line = next(line for line in results.render({"r": row}).splitlines() if "[r](" in line)
    assert "83.50 → 78.25 (images 500–1299)" in line
