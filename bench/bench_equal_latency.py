"""Benchmark: searched plans (dfp-deploy build outputs) vs uniform plans at equal measured latency and equal MACs.

  python bench/bench_equal_latency.py --weights ../shared/models/resnet56-4bfd9763.th \
      --eval ../shared/data/cifar10_test_exact932.npz --searched /tmp/h3/search_macs /tmp/h3/search_lat \
      --ratios 0.3 0.35 0.4 0.5 0.6 0.65 0.7 --threads 1 --batch 8 --runs 150 --rounds 15 --repeats 3
(--searched: folders written by `dfp-deploy build recipes/cifar_resnet56_search.yaml --out DIR`; with round_to 8,
ratios 0.45-0.55 give the same ResNet-56 plan.) --uniform-builds DIR ...: uniform plans built by the pipeline
itself (e.g. with `--set compress.bn_adapt.data=synthetic`, a repair this script does not rebuild), timed and
scored like the built-in uniform plans; with --ratios and no values only these are the uniform reference. Each searched folder's model.onnx (the engine the build shipped;
MACs from its report.json) is timed on ORT CPU fp32 in ONE interleaved schedule with the original and with uniform
plans built as a recipe with `importance: lmmse, allocation: uniform, reconstruct: lmmse, round_to: R` builds them
(ChannelPlanner + compress_model, static batch). The schedule runs --repeats times (engine order reversed every
other time); "p50" is the median over repeats of each per-repeat p50, "rel." the median of p50 / p50 of the
original in the same repeat (less sensitive to load drifting between repeats), "rel. range" its per-repeat min-max.
Top-1 of every engine on the whole --eval set (never seen by the search). Below the table, each searched plan's
top-1 is set against the uniform top-1 linearly interpolated between the two uniform plans that bracket it in
relative p50 (equal latency) and in MACs (equal MACs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from dfp_deploy.analysis import analyze, count_macs
from dfp_deploy.backends.registry import get_backend
from dfp_deploy.compress.repair.apply import compress_model
from dfp_deploy.compress.select.planner import ChannelPlanner
from dfp_deploy.export.onnx_export import export_onnx
from dfp_deploy.measure.accuracy import top1
from dfp_deploy.data.images import load_images, to_tensor
from dfp_deploy.measure.latency import time_interleaved
from dfp_deploy.models import load_model


def interpolate(x: float, points: list[tuple[float, float]]) -> str:
    """Top-1 at abscissa x, linear between the two bracketing (abscissa, top-1) points; '-' if x is outside."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            y = y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
            return f"{y:.2f}"
    return "- (outside the uniform range)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_resnet56")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--eval", required=True, help="labelled .npz for top-1")
    ap.add_argument("--searched", nargs="+", default=[],
                    help="dfp-deploy build output folder(s) compared with the uniform plans (searched or not)")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.3, 0.35, 0.4, 0.5, 0.6, 0.65, 0.7])
    ap.add_argument("--uniform-builds", nargs="*", default=[], help="dfp-deploy build output folder(s) of uniform "
                    "plans, used as uniform reference points")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, args.weights)
    model, one = loaded.module, torch.zeros((1, *loaded.input_shape))
    analysis = analyze(model, one)
    example = torch.randn((args.batch, *loaded.input_shape), generator=torch.Generator().manual_seed(0))
    x8, y = load_images(args.eval, loaded.preprocess)
    x = to_tensor(x8, loaded.preprocess)
    backend = get_backend("ort-cpu")
    planner = ChannelPlanner(model, analysis, importance="lmmse", allocation="uniform", round_to=args.round_to)

    engines, macs, kinds = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        def add(name: str, onnx: Path, mac: int, kind: str) -> None:
            engines[name] = backend.build(onnx, precision="fp32", threads=args.threads, out_dir=Path(tmp))
            macs[name], kinds[name] = mac, kind

        models = [("original", model)] + [(f"uniform {r:g} lmmse", compress_model(
            model, analysis, planner.plan(r), method="lmmse")) for r in args.ratios]
        for i, (name, m) in enumerate(models):
            exp = export_onnx(m.eval(), example, Path(tmp) / f"v{i}.onnx")
            add(name, exp.path, count_macs(m, one), "original" if i == 0 else "uniform")
        for folder in map(Path, args.uniform_builds):
            rep = json.loads((folder / "report.json").read_text())
            add(f"uniform build ({folder.name})", folder / "model.onnx", rep["macs"]["after"], "uniform")
        for folder in map(Path, args.searched):
            rep = json.loads((folder / "report.json").read_text())
            s = rep.get("search")
            label = f"searched {s.get('target', '?')} {s.get('budget', '?')}" if s else "build"
            add(f"{label} ({folder.name})", folder / "model.onnx", rep["macs"]["after"], "searched")
        acc = {n: top1(e.run, x, y, batch=args.batch, static_batch=e.static_batch is not None)
               for n, e in engines.items()}
        runners = {n: e.prepare(example.numpy()) for n, e in engines.items()}
        reps = []
        for k in range(args.repeats):
            order = list(runners)[::-1 if k % 2 else 1]
            reps.append(time_interleaved({n: runners[n] for n in order}, warmup=10, runs=args.runs,
                                         rounds=args.rounds, batch=args.batch, threads=args.threads,
                                         progress=sys.stderr.isatty()))
    p50 = {n: float(np.median([r[n].p50_ms for r in reps])) for n in engines}
    rel = {n: float(np.median([r[n].p50_ms / r["original"].p50_ms for r in reps])) for n in engines}
    spread = {n: float(np.median([r[n].p90_ms / r[n].p50_ms for r in reps])) for n in engines}

    print(f"# {args.model}: ORT CPU fp32, batch {args.batch}, {args.threads} thread(s), {args.runs} runs per engine "
          f"in {args.rounds} interleaved rounds, {args.repeats} repeats; uniform = lmmse selection + lmmse "
          f"reconstruction, round_to {args.round_to}"
          + (f", and {len(args.uniform_builds)} uniform plan(s) built by the pipeline" if args.uniform_builds else "")
          + f"; top-1 on {len(y)} images\n")
    print("| variant | MACs (M) | MACs kept | p50 ms | p50 rel. | rel. range | p90/p50 | top-1 |\n"
          "|---|---|---|---|---|---|---|---|")
    for n in engines:
        r = [rep[n].p50_ms / rep["original"].p50_ms for rep in reps]
        print(f"| {n} | {macs[n] / 1e6:.2f} | {macs[n] / macs['original']:.3f} | {p50[n]:.2f} | {rel[n]:.3f} | "
              f"{min(r):.3f}-{max(r):.3f} | {spread[n]:.2f} | {acc[n]:.2f} |")
    uni = [n for n in engines if kinds[n] == "uniform"]
    print("\n| searched | top-1 | uniform top-1 at equal latency (rel. p50) | uniform top-1 at equal MACs |\n"
          "|---|---|---|---|")
    for n in (n for n in engines if kinds[n] == "searched"):
        at_lat = interpolate(rel[n], [(rel[u], acc[u]) for u in uni])
        at_mac = interpolate(macs[n], [(macs[u], acc[u]) for u in uni])
        print(f"| {n} | {acc[n]:.2f} | {at_lat} | {at_mac} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
