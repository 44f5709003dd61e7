"""Benchmark: ORT CPU latency of original vs pruned engines, timed interleaved in one process, next to MAC cuts.

Regenerates the latency tables of docs/research/latency-cpu.md and int8-cpu.md, e.g.
  python bench/bench_latency.py --model cifar_resnet56 \
      --eval ../shared/data/cifar10_test_exact932.npz --batch 1 8 --threads 1 --int8
With --int8 every variant is also built as an ORT-CPU int8 engine (Q/DQ, data-free activation ranges from BN
statistics, 7-bit weights on CPUs without VNNI) and its top-1 is that of the int8 engine itself.
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
from dfp_deploy.backends import get_backend
from dfp_deploy.compress import ChannelPlanner
from dfp_deploy.data import load_images, to_tensor
from dfp_deploy.export import export_onnx, int8_onnx
from dfp_deploy.measure import time_interleaved, top1
from dfp_deploy.models import load_model
from data_root import add_data_root, fill  # bench/data_root.py (the script's folder is on sys.path)


def variants(model, analysis, ratios: list[float], round_tos: list[int], importance: str, allocation: str,
             reconstruct: str, residual: bool):
    from dfp_deploy.compress import compress_model

    yield "original", model
    for include_residual in (False, True) if residual else (False,):
        for round_to in round_tos:
            planner = ChannelPlanner(model, analysis, importance=importance, allocation=allocation,
                                     round_to=round_to, include_residual=include_residual)
            for r in ratios:
                plan = planner.plan(r)
                name = (f"pruned {r:g}" + (" +residual" if include_residual else "")
                        + (f" round {round_to}" if len(round_tos) > 1 else "")
                        + (f" {reconstruct}" if reconstruct != "none" else ""))
                yield name, compress_model(model, analysis, plan, method=reconstruct)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_resnet56")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--eval", default=None, help="labelled .npz for top-1 (optional)")
    add_data_root(ap)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--round-to", type=int, nargs="+", default=[4],
                    help="kept-channel multiple(s); several values give one variant each, timed side by side")
    ap.add_argument("--importance", default="l2", help="channel ranking: l1 | l2 | bn_l2 | group_l2 | lmmse ...")
    ap.add_argument("--allocation", default="uniform", help="uniform | macs (importance lmmse only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reconstruct", default="none", help="none | neuron_merging | udfc | lmmse")
    ap.add_argument("--residual", action="store_true", help="also prune the residual-stream groups")
    ap.add_argument("--int8", action="store_true", help="also time int8 (ort-cpu Q/DQ) engines of every variant")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    if args.model == "cifar_resnet56":  # its trained weights under --data-root, unless named
        fill(args, {"weights": "models/resnet56-4bfd9763.th"})
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, args.weights)
    one = torch.zeros((1, *loaded.input_shape))
    analysis = analyze(loaded.module, one)
    models = list(variants(loaded.module, analysis, args.ratios, args.round_to, args.importance, args.allocation,
                           args.reconstruct, args.residual))
    macs = {name: count_macs(m, one) for name, m in models}
    backend = get_backend("ort-cpu")
    x = y = None
    if args.eval:
        x8, y = load_images(args.eval, loaded.preprocess, limit=args.eval_limit)
        x = to_tensor(x8, loaded.preprocess)
    print(f"# {args.model}: ORT CPU, {args.threads} thread(s), {args.runs} timed runs per engine in "
          f"{args.rounds} interleaved rounds, importance {args.importance} ({args.allocation}), "
          f"reconstruct {args.reconstruct}, round_to {' / '.join(map(str, args.round_to))}\n")
    accs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch:
            example = torch.randn((batch, *loaded.input_shape), generator=torch.Generator().manual_seed(0))
            runners, acc, rows = {}, {}, []
            for i, (name, m) in enumerate(models):
                exp = export_onnx(m, example, Path(tmp) / f"b{batch}_{i}.onnx", dynamic_batch=True)
                builds = [(name, exp.path, "fp32")]
                if args.int8:
                    q = int8_onnx(m, example, exp.path, Path(tmp) / f"b{batch}_{i}.int8.onnx", style="ort-cpu",
                                  preprocess=loaded.preprocess, threads=args.threads)
                    builds.append((f"{name} int8", q, "int8"))
                for label, path, precision in builds:
                    engine = backend.build(path, precision=precision, threads=args.threads, out_dir=Path(tmp))
                    runners[label] = engine.prepare(example.numpy())
                    rows.append((label, name))
                    if x is not None and batch == args.batch[0]:
                        acc[label] = top1(engine.run, x, y, batch=64, static_batch=False)
                    elif x is not None:
                        acc[label] = accs[label]
            accs = acc
            stats = time_interleaved(runners, warmup=10, runs=args.runs, rounds=args.rounds, batch=batch,
                                     threads=args.threads, progress=sys.stderr.isatty())
            base = stats["original"].p50_ms
            print(f"## batch {batch}\n")
            print("| variant | MACs (M) | MAC cut | p50 ms | p90/p50 | speedup | realized/MACs |"
                  + (" top-1 |" if acc else ""))
            print("|---|---|---|---|---|---|---|" + ("---|" if acc else ""))
            for label, name in rows:
                s = stats[label]
                mac_factor = macs["original"] / macs[name]
                speed = base / s.p50_ms
                row = (f"| {label} | {macs[name] / 1e6:.2f} | {mac_factor:.2f}x | {s.p50_ms:.3f} | "
                       f"{s.p90_ms / s.p50_ms:.2f} | {speed:.2f}x | {speed / mac_factor:.2f} |")
                print(row + (f" {acc[label]:.2f} |" if acc else ""))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
