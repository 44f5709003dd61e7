"""`dfp-deploy bench --grid`: grid expansion and validation before any build, and one real two-variant bench on a
tiny model whose rows, plans and speedups are checked against their sources."""

import importlib
import inspect
import json
import shutil
from pathlib import Path

import pytest

from dfp_deploy.pipeline import bench as bench_mod
from dfp_deploy.pipeline import inspect as run_inspect
from dfp_deploy.recipe import load_recipe
from dfp_deploy.core.errors import InputError
from tests.test_cli import FAST, TIMED, _write_recipe, run

GRID = ["--grid", "compress.prune.ratio=0.25,0.5"]
SETS = [*FAST, *TIMED, "--set", "compress.prune.round_to=4"]


@pytest.fixture(scope="module")
def benched(tmp_path_factory):
    """One real bench of two variants, timed with the shortest protocol the loader allows; time_interleaved is
    wrapped (not replaced) to record which engines each call timed."""
    tmp = tmp_path_factory.mktemp("bench")
    recipe = _write_recipe(tmp)
    calls = []
    real = bench_mod.time_interleaved

    def spy(runners, **kw):
        stats = real(runners, **kw)
        calls.append((list(runners), stats))
        return stats

    mp = pytest.MonkeyPatch()
    mp.setattr(bench_mod, "time_interleaved", spy)
    try:
        res = run("bench", recipe, *GRID, *SETS, "--out", tmp / "b")
    finally:
        mp.undo()
    return recipe, tmp / "b", res, calls


def test_split_values_keeps_commas_inside_brackets_and_quotes():
    assert bench_mod.split_values("0.25, 0.5") == ["0.25", "0.5"]
    assert bench_mod.split_values('[32,32],[64,64],"a,b"') == ["[32,32]", "[64,64]", '"a,b"']


@pytest.mark.parametrize("items, sets, fragment", [
    (["compress.prune.ratio"], [], "expected key=v1,v2"),
    (["compress.prune.ratio=0.1,,0.2"], [], "empty value"),
    (["seed=1,2", "seed=3"], [], "given twice"),
    (["seed=1,2"], ["seed=0"], "also given with --set"),
    (["output.dir=a,b"], [], "its own folder"),
    ([], [], "nothing to compare"),
])
def test_malformed_grid_is_refused(items, sets, fragment):
    with pytest.raises(InputError, match=fragment):
        bench_mod.parse_grid(items, sets)


def test_folder_names_are_safe_and_unique():
    combos = [(("compress.prune.ratio", "0.25"), ("target.precision", "int8")),
              (("compress.prune.ratio", "a/b"), ("target.precision", "fp32"))]
    assert bench_mod.folder_names(combos) == ["ratio-0.25_precision-int8", "ratio-a_b_precision-fp32"]
    clash = [(("a.x", "1"), ("b.x", "2"))]  # same last part: the whole keys name the folder
    assert bench_mod.folder_names(clash) == ["a.x-1_b.x-2"]
    same = [(("seed", "a/b"),), (("seed", "a_b"),)]  # distinct values, one sanitised name: numbered
    assert bench_mod.folder_names(same) == ["01_seed-a_b", "02_seed-a_b"]


@pytest.mark.parametrize("grid, fragment", [
    ("compress.prune.ratioo=0.25,0.5", "compress.prune.ratioo: unknown key (did you mean compress.prune.ratio?)"),
    ("compress.prune.ratio=0.25,1.3", "--grid variant compress.prune.ratio=1.3: compress.prune.ratio: 1.3 is not "
                                      "in [0, 1)"),
    ("target.batch=2,4", "--grid variant target.batch=2: changes the batch"),
    ("advanced.eval.start=0,8", "--grid variant advanced.eval.start=8: changes the evaluation images"),
])
def test_bad_grid_is_one_line_exit_2_before_any_build(tmp_path, monkeypatch, grid, fragment):
    recipe = _write_recipe(tmp_path)

    def no_build(*a, **k):
        raise AssertionError("a variant was built before every variant was validated")

    monkeypatch.setattr(bench_mod, "build", no_build)
    res = run("bench", recipe, "--grid", grid, *SETS, "--out", tmp_path / "b")
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith("error: ") and fragment in line, line
    assert not (tmp_path / "b").exists()


def test_bench_writes_one_row_per_variant(benched):
    recipe, out, res, _ = benched
    assert res.exit_code == 0, res.output
    b = json.loads((out / "bench.json").read_text())
    assert b["grid"] == {"compress.prune.ratio": ["0.25", "0.5"]}
    assert [r["name"] for r in b["variants"]] == ["ratio-0.25", "ratio-0.5"]
    assert [r["overrides"] for r in b["variants"]] == [{"compress.prune.ratio": "0.25"},
                                                       {"compress.prune.ratio": "0.5"}]
    orig = b["original"]
    for row in b["variants"]:
        report = json.loads((out / row["name"] / "report.json").read_text())
        assert "before" not in report["latency"]  # the builds left the timing to the bench
        assert row["macs"] == report["macs"]["after"] < orig["macs"] == report["macs"]["before"]
        assert row["macs_cut"] == pytest.approx(1 - row["macs"] / orig["macs"])
        assert row["params"] == report["params"]["after"]
        assert row["parity_max_abs_err"] == report["parity"]["max_abs_err"]
        assert row["accuracy"]["value"] == report["accuracy"]["after"]
        assert (row["accuracy"]["n"], row["accuracy"]["start"]) == (24, 0)
    assert b["variants"][1]["macs"] < b["variants"][0]["macs"]
    assert b["command"].startswith("dfp-deploy bench ") and "--grid compress.prune.ratio=0.25,0.5" in b["command"]
    assert "torch" in b["environment"]
    md = (out / "bench.md").read_text()
    assert b["command"] in md and "| ratio-0.5 | 0.5 |" in md and "top-1 %" in md
    assert "| ratio-0.25 | 0.25 |" in res.output  # the table is printed too
    assert not [p for p in out.parent.iterdir() if ".building-" in p.name]


def test_speedups_come_from_one_interleaved_run(benched):
    _, out, res, calls = benched
    assert res.exit_code == 0, res.output
    assert len(calls) == 1
    names, stats = calls[0]
    assert names == ["original", "ratio-0.25", "ratio-0.5"]
    b = json.loads((out / "bench.json").read_text())
    assert b["original"]["p50_ms"] == stats["original"].p50_ms
    for row in b["variants"]:
        assert row["p50_ms"] == stats[row["name"]].p50_ms
        assert row["speedup"] == pytest.approx(stats["original"].p50_ms / stats[row["name"]].p50_ms)
        assert row["stats"]["runs"] == 50 and len(row["stats"]["round_p50_ms"]) == 2


def test_each_variant_keeps_the_channels_a_plain_build_keeps(benched):
    # the plan a build with the same --set applies (inspect runs the build's own channel choice)
    recipe, out, res, _ = benched
    assert res.exit_code == 0, res.output
    for ratio in ("0.25", "0.5"):
        sets = [s for s in SETS if "=" in s] + [f"compress.prune.ratio={ratio}"]
        keep = run_inspect(load_recipe(recipe, sets), recipe)["plan"].keep
        plan = json.loads((out / f"ratio-{ratio}" / "plan.json").read_text())
        assert plan["keep"] == {k: list(v) for k, v in keep.items()}
        assert plan["keep"]  # something was pruned, so the comparison compares something


def test_interrupted_bench_keeps_the_previous_one(benched, tmp_path, monkeypatch):
    recipe, first, res, _ = benched
    assert res.exit_code == 0
    out = tmp_path / "b"
    shutil.copytree(first, out)
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("dfp_deploy.pipeline.build"), "analyze", interrupt)
    res = run("bench", recipe, *GRID, *SETS, "--out", out)
    assert res.exit_code == 130
    assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    assert not [p for p in tmp_path.rglob("*") if ".building-" in p.name]


def test_a_failing_variant_names_itself_and_leaves_nothing(tmp_path, monkeypatch):
    from dfp_deploy.core.errors import ParityError

    recipe = _write_recipe(tmp_path)

    real = inspect.signature(importlib.import_module("dfp_deploy.pipeline.build").build)

    def build(recipe, recipe_path, *, quiet, out, timed):  # fails as a build can
        real.bind(recipe, recipe_path, quiet=quiet, out=out, timed=timed)  # held to the real signature
        assert out.parent.name.startswith(".b.building-")  # into the bench's staging folder
        raise ParityError("parity: max |diff| 1e-2 exceeds the tolerance")

    monkeypatch.setattr(bench_mod, "build", build)
    res = run("bench", recipe, *GRID, *SETS, "--out", tmp_path / "b")
    assert res.exit_code == 1
    assert res.output.strip() == ("error: --grid variant compress.prune.ratio=0.25: parity: max |diff| 1e-2 exceeds "
                                  "the tolerance")
    assert not (tmp_path / "b").exists() and not [p for p in tmp_path.iterdir() if ".building-" in p.name]


def test_interpolation_known_answer():
    from dfp_deploy.report.bench_table import equal_points, interpolate

    pts = [(0.7, 92.0), (0.5, 90.0), (0.3, 80.0)]  # unsorted on purpose
    assert interpolate(0.6, pts) == pytest.approx(91.0)
    assert interpolate(0.4, pts) == pytest.approx(85.0)
    assert interpolate(0.5, pts) == pytest.approx(90.0)
    assert interpolate(0.2, pts) is None and interpolate(0.8, pts) is None

    def row(name, speedup, macs, top1):
        return {"name": name, "speedup": speedup, "macs": macs,
                "accuracy": {"metric": "top1_percent", "value": top1}}

    grid = [row("a", 2.0, 100, 80.0), row("b", 1.25, 300, 90.0)]  # relative p50 0.5 and 0.8
    got = equal_points(grid, [row("s", 1 / 0.6, 250, 88.0), row("far", 4.0, 50, 70.0)])
    assert got[0]["name"] == "s" and got[0]["relative_p50"] == pytest.approx(0.6)
    assert got[0]["grid_top1_at_equal_latency"] == pytest.approx(80 + 10 * (0.1 / 0.3))
    assert got[0]["grid_top1_at_equal_macs"] == pytest.approx(87.5)
    assert got[1]["grid_top1_at_equal_latency"] is None and got[1]["grid_top1_at_equal_macs"] is None


def _foreign(folder: Path, edit) -> Path:
    rep = json.loads((folder / "report.json").read_text())
    edit(rep)
    (folder / "report.json").write_text(json.dumps(rep))
    return folder


@pytest.mark.parametrize("edit, fragment", [
    (None, "not a `dfp-deploy build` output folder (no report.json)"),
    (lambda r: r["recipe"]["target"].update(batch=2), "built with batch 2, the bench times 4"),
    (lambda r: r["model"].update(weights="/elsewhere/other.pth"), "built with weights '/elsewhere/other.pth'"),
    (lambda r: r["model"].update(input_shape=[3, 64, 64]), "built with input shape [3, 64, 64]"),
    (lambda r: r["recipe"]["target"].update(backend="tensorrt"), "built with target backend 'tensorrt'"),
])
def test_a_foreign_with_folder_is_refused_before_any_build(benched, tmp_path, monkeypatch, edit, fragment):
    recipe, first, res, _ = benched
    assert res.exit_code == 0, res.output
    folder = tmp_path / "other"
    if edit is None:
        folder.mkdir()
    else:
        _foreign(shutil.copytree(first / "ratio-0.25", folder), edit)

    def no_build(*a, **k):
        raise AssertionError("a variant was built before the --with folders were checked")

    monkeypatch.setattr(bench_mod, "build", no_build)
    res = run("bench", recipe, *GRID, *SETS, "--with", folder, "--out", tmp_path / "b")
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith(f"error: --with {folder}: ") and fragment in line, line
    assert not (tmp_path / "b").exists()


def test_with_rows_and_repeats_in_one_run(benched, tmp_path, monkeypatch):
    """A second bench of one variant (its build replaced by a copy of the first bench's) with a --with folder and
    two repeats, timed by a stand-in held to time_interleaved's signature that calls every runner once and returns
    known p50s: the folder's row reads its report, the second repeat runs the engines in reverse order, the row's
    numbers are the medians over the repeats, and the equal-latency section compares the folder with the grid."""
    from dfp_deploy.measure.latency import summarise

    recipe, first, res, _ = benched
    assert res.exit_code == 0, res.output
    real_build = inspect.signature(importlib.import_module("dfp_deploy.pipeline.build").build)
    real_time = inspect.signature(bench_mod.time_interleaved)

    def build(recipe_, recipe_path, *, quiet, out, timed):
        real_build.bind(recipe_, recipe_path, quiet=quiet, out=out, timed=timed)
        shutil.copytree(first / "ratio-0.25", out)
        return json.loads((out / "report.json").read_text())

    p50 = [{"original": 10.0, "ratio-0.25": 5.0, "searched": 4.0},
           {"original": 12.0, "ratio-0.25": 6.0, "searched": 4.0}]
    calls = []

    def timed(runners, **kw):
        real_time.bind(runners, **kw)
        calls.append(list(runners))
        for run_once in runners.values():
            run_once()
        return {n: summarise([[p50[len(calls) - 1][n]]], warmup=kw["warmup"], batch=kw["batch"],
                             threads=kw["threads"]) for n in runners}

    monkeypatch.setattr(bench_mod, "build", build)
    monkeypatch.setattr(bench_mod, "time_interleaved", timed)
    searched = shutil.copytree(first / "ratio-0.5", tmp_path / "searched")
    res = run("bench", recipe, "--grid", "compress.prune.ratio=0.25", *SETS, "--with", searched, "--repeats", "2",
              "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    assert calls == [["original", "ratio-0.25", "searched"], ["searched", "ratio-0.25", "original"]]
    b = json.loads((tmp_path / "b" / "bench.json").read_text())
    report = json.loads((searched / "report.json").read_text())
    row = b["with"][0]
    assert row["name"] == "searched" and row["dir"] == str(searched)
    assert (row["macs"], row["params"]) == (report["macs"]["after"], report["params"]["after"])
    assert row["accuracy"]["value"] == report["accuracy"]["after"]
    assert row["parity_max_abs_err"] == report["parity"]["max_abs_err"]
    assert (row["p50_ms"], row["speedup"], row["speedup_repeats"]) == (4.0, 2.75, [2.5, 3.0])
    assert b["original"]["p50_ms"] == 11.0 and b["variants"][0]["speedup"] == 2.0
    assert b["protocol"]["repeats"] == 2 and "--with" in b["command"] and "--repeats 2" in b["command"]
    assert b["equal"] == [{"name": "searched", "top1": row["accuracy"]["value"], "relative_p50": 1 / 2.75,
                           "macs": row["macs"], "grid_top1_at_equal_latency": None,
                           "grid_top1_at_equal_macs": None}]  # one grid row brackets nothing
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "| searched (--with) |" in md and "(its report.json)" in md and "| 2.50-3.00 |" in md
    assert "outside the grid" in md
