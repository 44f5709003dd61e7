"""Benchmark: ORT CPU latency of original vs pruned engines, timed interleaved in one process, next to MAC cuts.

Regenerates the latency tables of docs/BENCHMARKS.md, e.g.
  python tools/bench_latency.py --model cifar_resnet56 --weights ../shared/models/resnet56-4bfd9763.th \
      --eval ../shared/data/cifar10_test_exact932.npz --batch 1 8 --threads 1
Each engine's realized speedup (p50 of the original / p50 of the variant) is printed beside its MAC reduction
factor (MACs of the original / MACs of the variant); "realized/MACs" is their ratio (1.0 = the engine is exactly
as much faster as the MAC count promises). Variants are all timed in the same rotating schedule so machine noise
hits each equally; the table shows the median and the p90/p50 spread.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from dfp_deploy.analysis import analyze, count_macs
from dfp_deploy.backends.registry import get_backend
from dfp_deploy.compress.plan import make_plan
from dfp_deploy.compress.prune import prune_model
from dfp_deploy.export.onnx_export import export_onnx
from dfp_deploy.measure.accuracy import top1
from dfp_deploy.measure.dataset import load_images, to_tensor
from dfp_deploy.measure.latency import time_interleaved
from dfp_deploy.models import load_model


def variants(model, analysis, ratios: list[float], round_to: int, importance: str):
    yield "original", model
    for include_residual in (False, True):
        for r in ratios:
            plan = make_plan(model, analysis, ratio=r, round_to=round_to, importance=importance,
                             include_residual=include_residual)
            name = f"pruned {r:g}" + (" (+residual)" if include_residual else " (block-internal)")
            yield name, prune_model(model, analysis, plan)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_resnet56")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--eval", default=None, help="labelled .npz for top-1 (optional)")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--round-to", type=int, default=4)
    ap.add_argument("--importance", default="l2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, args.weights)
    one = torch.zeros((1, *loaded.input_shape))
    analysis = analyze(loaded.module, one)
    models = list(variants(loaded.module, analysis, args.ratios, args.round_to, args.importance))
    macs = {name: count_macs(m, one) for name, m in models}
    acc = {}
    if args.eval:
        x8, y = load_images(args.eval, loaded.preprocess, limit=args.eval_limit)
        x = to_tensor(x8, loaded.preprocess)
        for name, m in models:
            with torch.inference_mode():
                acc[name] = top1(lambda a: m(torch.from_numpy(a)).numpy(), x, y, batch=64, static_batch=False)
    backend = get_backend("ort-cpu")
    print(f"# {args.model}: ORT CPU fp32, {args.threads} thread(s), {args.runs} timed runs per engine in "
          f"{args.rounds} interleaved rounds, importance {args.importance}, round_to {args.round_to}\n")
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch:
            example = torch.randn((batch, *loaded.input_shape), generator=torch.Generator().manual_seed(0))
            runners = {}
            for i, (name, m) in enumerate(models):
                exp = export_onnx(m, example, Path(tmp) / f"b{batch}_{i}.onnx")
                engine = backend.build(exp.path, precision="fp32", threads=args.threads, out_dir=Path(tmp))
                runners[name] = engine.prepare(example.numpy())
            stats = time_interleaved(runners, warmup=10, runs=args.runs, rounds=args.rounds, batch=batch,
                                     threads=args.threads, progress=sys.stderr.isatty())
            base = stats["original"].p50_ms
            print(f"## batch {batch}\n")
            print("| variant | MACs (M) | MAC cut | p50 ms | p90/p50 | speedup | realized/MACs |"
                  + (" top-1 |" if acc else ""))
            print("|---|---|---|---|---|---|---|" + ("---|" if acc else ""))
            for name, _ in models:
                s = stats[name]
                mac_factor = macs["original"] / macs[name]
                speed = base / s.p50_ms
                row = (f"| {name} | {macs[name] / 1e6:.2f} | {mac_factor:.2f}x | {s.p50_ms:.3f} | "
                       f"{s.p90_ms / s.p50_ms:.2f} | {speed:.2f}x | {speed / mac_factor:.2f} |")
                print(row + (f" {acc[name]:.2f} |" if acc else ""))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
