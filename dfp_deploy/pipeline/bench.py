"""The bench sequence: a recipe's grid of variants, each built by `build`, then all timed in one interleaved run.

Every variant is validated (loaded and resolved) before the first build starts, so a bad key or value costs
nothing. The builds skip their own timing; afterwards the original engine and every variant's engine are rebuilt
from the graphs the builds shipped and timed together under measure/latency.py's protocol, so each speedup is the
original's p50 over the variant's from the same run. Existing build folders (`--with`, e.g. searched plans) are
checked against the recipe before anything is built and timed in the same run from the graphs they shipped; the run
can be repeated (`--repeats`, order reversed every other time). The bench folder is staged and swapped into place
like a build's output (core/output.py): an interrupted bench leaves the previous one intact.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dfp_deploy.backends.registry import get_backend
from dfp_deploy.core import output
from dfp_deploy.core.atomic import write_json_atomic, write_text_atomic
from dfp_deploy.core.env import environment
from dfp_deploy.core.errors import DfpError, InputError
from dfp_deploy.measure.latency import round_speedups, time_interleaved
from dfp_deploy.pipeline import compress_step as cs
from dfp_deploy.pipeline.build import build
from dfp_deploy.pipeline.context import output_dir, resolve_recipe
from dfp_deploy.recipe import Recipe, load_recipe
from dfp_deploy.recipe.loader import check_output_dir
from dfp_deploy.report.bench_table import BENCH_JSON, BENCH_MD, equal_points, render_bench_markdown

_NAME_LIMIT = 80  # folder names from overrides; the build stages beside each under a longer name


@dataclass(frozen=True)
class Variant:
    """One point of the grid: its overrides (key, value as typed), its folder name and its validated recipe."""

    overrides: tuple[tuple[str, str], ...]
    name: str
    recipe: Recipe

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.overrides)


def split_values(text: str) -> list[str]:
    """`v1,v2` → [v1, v2]; commas inside brackets, braces or quotes belong to the value (`[32,32]`, `"a,b"`)."""
    values, depth, quote, start = [], 0, None, 0
    for i, c in enumerate(text):
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth = max(0, depth - 1)
        elif c == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_grid(items, sets=()) -> list[tuple[str, list[str]]]:
    """--grid KEY=V1,V2 options → [(key, [value texts])], in the order given; malformed items refused in one line."""
    set_keys = {s.split("=", 1)[0].strip() for s in sets if "=" in s}
    grid, seen = [], set()
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--grid {item!r}: expected key=v1,v2, e.g. --grid compress.prune.ratio=0.25,0.5")
        values = split_values(text)
        if not any(values) or "" in values:
            raise InputError(f"--grid {key}: empty value in {text!r}; give comma-separated values, e.g. "
                             f"--grid {key}=0.25,0.5")
        if key in seen:
            raise InputError(f"--grid {key}: given twice; list all its values in one --grid {key}=v1,v2,...")
        if key in set_keys:
            raise InputError(f"--grid {key}: also given with --set; a key is either fixed (--set) or varied (--grid)")
        if key == "output.dir":
            raise InputError("--grid output.dir: each variant is written to its own folder of the bench's --out")
        seen.add(key)
        grid.append((key, values))
    if not grid:
        raise InputError("--grid: nothing to compare; give at least one --grid key=v1,v2")
    return grid


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("._") or "_"


def folder_names(combos: list[tuple[tuple[str, str], ...]]) -> list[str]:
    """Filesystem-safe, unique folder names: `ratio-0.25_precision-int8` from the keys' last parts and the values,
    the whole keys where last parts clash, and a counter where the values still clash after sanitising."""
    keys = [k for k, _ in combos[0]] if combos else []
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    short = len(set(leaves)) == len(leaves)
    names = []
    for combo in combos:
        parts = [f"{(k.rsplit('.', 1)[-1] if short else k)}-{v}" for k, v in combo]
        names.append(_safe("_".join(parts))[:_NAME_LIMIT])
    if len(set(names)) < len(names):
        names = [f"{i + 1:02d}_{n}"[:_NAME_LIMIT] for i, n in enumerate(names)]
    return names


def expand(recipe_path: Path | None, sets, grid: list[tuple[str, list[str]]]) -> tuple[Recipe, list[Variant]]:
    """The base recipe (--set only) and every variant of the grid, each loaded and resolved: every error a recipe
    can have is raised here, before anything is built. All variants must share what one interleaved timing run
    shares: the model, the target's backend, batch and threads, the export's batch mode and opset, the measure
    protocol, and the images top-1 is measured on."""
    base = load_recipe(recipe_path, list(sets))
    base_plan = resolve_recipe(base)
    combos = [tuple(zip([k for k, _ in grid], values)) for values in itertools.product(*[v for _, v in grid])]
    variants = []
    for combo, name in zip(combos, folder_names(combos)):
        shown = ", ".join(f"{k}={v}" for k, v in combo)
        try:
            recipe = load_recipe(recipe_path, [*sets, *(f"{k}={v}" for k, v in combo)])
            plan = resolve_recipe(recipe)
        except DfpError as exc:
            raise _naming(exc, f"--grid variant {shown}") from None
        differs = [what for what, a, b in _shared(base_plan, plan) if a != b]
        if differs:
            raise InputError(f"--grid variant {shown}: changes the {differs[0]}, which every variant shares (all "
                             "are timed in one run against one original engine); compare those in separate benches")
        variants.append(Variant(combo, name, recipe))
    return base, variants


def _naming(exc: DfpError, where: str) -> DfpError:
    """The same error, its message prefixed with the variant it came from (DfpErrors take one message)."""
    return type(exc)(f"{where}: {exc}")


def _shared(a, b):
    ta, tb, ma, mb = a.target, b.target, a.measure, b.measure
    return [("model", a.model, b.model), ("target backend", ta.backend, tb.backend), ("batch", ta.batch, tb.batch),
            ("threads", ta.threads, tb.threads), ("export batch mode", a.export.dynamic_batch, b.export.dynamic_batch),
            ("export opset", a.export.opset, b.export.opset),
            ("evaluation images", (a.eval.data, a.eval.start, a.eval.limit, a.eval.metric),
             (b.eval.data, b.eval.start, b.eval.limit, b.eval.metric)),
            ("measure protocol", (ma.warmup, ma.runs, ma.rounds), (mb.warmup, mb.runs, mb.rounds))]


def default_out(recipe: Recipe, recipe_path: Path | None) -> Path:
    d = output_dir(recipe, recipe_path)
    return d.with_name(d.name + "-bench")


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Existing:
    """A `--with` build folder: its name in the table, its path and its report.json."""

    name: str
    path: Path
    report: dict


def load_existing(dirs, plan, loaded, taken: set[str]) -> list[Existing]:
    """Every --with folder's report, refused in one line when it is not a build output or was built from another
    model, weights, input shape, target backend or batch than the bench times (its row would compare unlike
    engines). `loaded` is the bench's model as the recipe loads it; `taken` the names already in the table."""
    out, names = [], set(taken)
    for d in dirs:
        path = Path(d)
        rep = _read_report(path, d)
        name = path.resolve().name or str(d)
        if name in names:
            raise InputError(f"--with {d}: a row is already named {name!r} (a grid variant, the original or another "
                             "--with folder); give folders with distinct names")
        names.add(name)
        recorded = rep["model"]
        target = rep["recipe"].get("target", {})
        for what, theirs, ours in (
                ("model", recorded.get("name"), loaded.name),
                ("weights", _file(recorded.get("weights")), _file(loaded.weights)),
                ("input shape", list(recorded.get("input_shape") or []), list(loaded.input_shape)),
                ("target backend", target.get("backend"), plan.target.backend),
                ("batch", target.get("batch"), plan.target.batch)):
            if theirs != ours:
                raise InputError(f"--with {d}: built with {what} {theirs!r}, the bench times {ours!r}; give a build "
                                 f"of the recipe's {what}")
        out.append(Existing(name, path, rep))
    return out


def _read_report(path: Path, shown) -> dict:
    not_build = f"--with {shown}: not a `dfp-deploy build` output folder"
    try:
        rep = json.loads((path / "report.json").read_text())
    except FileNotFoundError:
        raise InputError(f"{not_build} (no report.json); give a folder that a build wrote") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{not_build} (report.json unreadable: {str(exc)[:80]}); rebuild it") from None
    try:
        ok = all(k in rep for k in ("model", "recipe", "macs", "params", "parity", "latency"))
        onnx = path / rep["artifacts"]["onnx"]
    except (KeyError, TypeError):
        ok = False
    if not ok or not isinstance(rep, dict):
        raise InputError(f"{not_build} (report.json lacks the build's keys); give a folder that a build wrote")
    if not onnx.is_file():
        raise InputError(f"--with {shown}: its engine graph {rep['artifacts']['onnx']} is missing; rebuild the folder")
    return rep


def _file(weights) -> str | None:
    """A weights file as one spelling (relative and absolute paths to one file compare equal)."""
    return None if weights is None else os.path.realpath(str(weights))


def bench(recipe_path: Path | None, sets=(), grid_items=(), *, out: str | Path | None = None,
          command: str | None = None, quiet: bool = False, with_dirs=(), repeats: int = 1) -> dict:
    """Build every variant of the grid into <out>/<variant>, time them interleaved with the original and the
    --with folders (`repeats` times), write <out>/bench.json and bench.md; return the bench dict."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"--repeats: {repeats!r} must be an integer >= 1")
    grid = parse_grid(list(grid_items), sets)
    base, variants = expand(recipe_path, list(sets), grid)
    existing = []
    if with_dirs:
        plan = resolve_recipe(base)
        with cs.recipe_code(recipe_path):
            loaded = cs.load(plan)
        existing = load_existing(list(with_dirs), plan, loaded, {"original", *(v.name for v in variants)})
    if out is not None:
        check_output_dir(str(out), "--out")  # before Path(), which turns "" into "."
    named = Path(out) if out is not None else default_out(base, recipe_path)
    check_output_dir(named, "--out" if out is not None else "output.dir")
    target = output.resolve(named)
    output.check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    output.remove_stale(target)
    stage_dir = output.start_staging(target)
    try:
        result = _bench_into(recipe_path, base, grid, variants, existing, repeats, stage_dir, command, quiet)
        output.commit(stage_dir, target)
    except BaseException:
        output.discard_staging(stage_dir)
        raise
    result["dir"] = str(named)
    return result


def _bench_into(recipe_path, base: Recipe, grid, variants: list[Variant], existing: list[Existing], repeats: int,
                work: Path, command, quiet) -> dict:
    reports = []
    for i, v in enumerate(variants, 1):
        _say(quiet, f"[{i}/{len(variants)}] building {v.label()} -> {v.name}/")
        try:
            reports.append(build(v.recipe, recipe_path, quiet=True, out=work / v.name, timed=False))
        except DfpError as exc:  # the whole bench stops: its table would lack a row
            raise _naming(exc, f"--grid variant {v.label()}") from None
        _say(quiet, f"[{i}/{len(variants)}] {v.name}: {_brief(reports[-1])}")
    plan = resolve_recipe(base)
    t, m = plan.target, plan.measure
    more = f" and {len(existing)} --with build(s)" if existing else ""
    times = f", {repeats} times (order reversed every other time)" if repeats > 1 else ""
    _say(quiet, f"timing the original, {len(variants)} variant(s){more} interleaved ({t.backend}, batch {t.batch}, "
                f"{m.runs} runs in {m.rounds} rounds each{times})")
    reps, threads = _time(recipe_path, plan, variants, reports, existing, repeats, work, quiet)
    result = _assemble(recipe_path, grid, variants, reports, existing, reps, plan, command, threads)
    write_json_atomic(work / BENCH_JSON, result)
    write_text_atomic(work / BENCH_MD, render_bench_markdown(result))
    return result


def _brief(report: dict) -> str:
    macs = report["macs"]
    acc = report.get("accuracy")
    top1 = f", top-1 {acc['after']:.2f}%" if acc and acc["metric"] == "top1_percent" else ""
    return (f"MACs {macs['before'] / 1e6:.2f}M -> {macs['after'] / 1e6:.2f}M{top1}, "
            f"parity max|diff| {report['parity']['max_abs_err']:.1e}")


def _time(recipe_path, plan, variants, reports, existing, repeats: int, work: Path, quiet: bool):
    """The original (fp32, as every build's `before`), each variant's and each --with folder's shipped graph,
    rebuilt on the target and timed in one interleaved run, `repeats` times with the order reversed every other
    time. Returns one {name: LatencyStats} per repeat (keys: "original", the variants' and folders' names)."""
    t, m = plan.target, plan.measure
    backend = get_backend(t.backend, **t.options)
    with cs.recipe_code(recipe_path), tempfile.TemporaryDirectory(prefix="dfp-bench-") as tmp:
        loaded = cs.load(plan)
        example = cs.example_input(loaded, t.batch, plan.seed).numpy()
        engines = {"original": backend.build(work / variants[0].name / "original.onnx", precision="fp32",
                                             threads=t.threads, out_dir=Path(tmp), torch_model=loaded.module)}
        shipped = [(v.name, work / v.name, rep, resolve_recipe(v.recipe).target.precision)
                   for v, rep in zip(variants, reports)]
        shipped += [(e.name, e.path, e.report, e.report["latency"]["precision"]) for e in existing]
        for name, folder, rep, precision in shipped:
            pt = rep["artifacts"].get("model_pt")
            model = torch.load(folder / pt, weights_only=False) if pt and (folder / pt).is_file() else None
            engines[name] = backend.build(folder / rep["artifacts"]["onnx"], precision=precision, threads=t.threads,
                                          out_dir=Path(tmp), torch_model=model)
        runners = {name: engine.prepare(example) for name, engine in engines.items()}
        names = list(runners)
        reps = []
        for k in range(repeats):  # reversed every other repeat: who goes first in each round alternates too
            order = names[::-1] if k % 2 else names
            reps.append(time_interleaved({n: runners[n] for n in order}, warmup=m.warmup, runs=m.runs,
                                         rounds=m.rounds, batch=t.batch, threads=t.threads, progress=not quiet))
        return reps, getattr(engines["original"], "threads", None) or t.threads


def _accuracy(acc: dict | None, side: str) -> dict | None:
    if not acc:
        return None
    return {"metric": acc["metric"], "value": acc[side], "data": acc["data"], "start": acc.get("start", 0),
            "n": acc["n"]}


def _timing(reps: list[dict], name: str) -> dict:
    """A row's timing. One repeat: its p50/p90 and original p50 / row p50. Several: the median over repeats of each
    repeat's p50 (p90), and of original p50 / row p50 within each repeat (load drifting between repeats cancels),
    with that ratio's per-repeat range."""
    if len(reps) == 1:
        orig, s = reps[0]["original"], reps[0][name]
        rounds = round_speedups(orig, s)
        return {"p50_ms": s.p50_ms, "p90_ms": s.p90_ms, "speedup": orig.p50_ms / s.p50_ms,
                "speedup_rounds": [min(rounds), max(rounds)] if rounds else None, "stats": s.as_dict()}
    per = [r["original"].p50_ms / r[name].p50_ms for r in reps]
    rounds = [x for r in reps for x in round_speedups(r["original"], r[name])]
    return {"p50_ms": float(np.median([r[name].p50_ms for r in reps])),
            "p90_ms": float(np.median([r[name].p90_ms for r in reps])), "speedup": float(np.median(per)),
            "speedup_rounds": [min(rounds), max(rounds)] if rounds else None, "speedup_repeats": [min(per), max(per)],
            "stats_by_repeat": [r[name].as_dict() for r in reps]}


def _assemble(recipe_path, grid, variants, reports, existing, reps, plan, command, threads) -> dict:
    from dfp_deploy import __version__

    t, m = plan.target, plan.measure
    first = reports[0]
    original = {"name": "original", "overrides": {}, "precision": "fp32",
                "params": first["params"]["before"], "macs": first["macs"]["before"], "macs_cut": 0.0,
                "accuracy": _accuracy(first.get("accuracy"), "before"), "parity_max_abs_err": None,
                **_timing(reps, "original")}
    rows = [_row(v.name, dict(v.overrides), rep, _timing(reps, v.name), plan=f"{v.name}/plan.json")
            for v, rep in zip(variants, reports)]
    built = [_row(e.name, {}, e.report, _timing(reps, e.name), plan=str(e.path / "plan.json"), dir=str(e.path))
             for e in existing]
    order = "interleaved, rotating; original and every variant in one run"
    result = {"recipe": str(recipe_path) if recipe_path else None, "model": first["model"]["name"],
              "grid": {k: vals for k, vals in grid}, "command": command,
              "dfp_deploy_version": __version__,
              "target": {"backend": t.backend, "batch": t.batch, "threads": threads},
              "protocol": {"warmup": m.warmup, "runs": m.runs, "rounds": m.rounds, "repeats": len(reps),
                           "order": order + (", order reversed every other repeat" if len(reps) > 1 else "")},
              "environment": environment(), "original": original, "variants": rows}
    if built:
        result["with"] = built
        result["equal"] = equal_points(rows, built)
    return result


def _row(name: str, overrides: dict, rep: dict, timing: dict, **where) -> dict:
    macs = rep["macs"]
    return {"name": name, "overrides": overrides, "precision": rep["latency"]["precision"],
            "params": rep["params"]["after"], "macs": macs["after"],
            "macs_cut": 1 - macs["after"] / macs["before"] if macs["before"] else 0.0,
            "accuracy": _accuracy(rep.get("accuracy"), "after"),
            "parity_max_abs_err": rep["parity"]["max_abs_err"], **where, **timing}
