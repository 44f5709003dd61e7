"""Benchmark: top-1 of data-free repair with and without adaptive BatchNorm (compress.bn_adapt) on synthetic inputs.

For every plan — uniform at each --ratios with each --plans spec (`l2` = make_plan's l2 ranking, `lmmse` = the lmmse
selection with uniform allocation, `lmmse-macs` = lmmse selection with the MAC allocation, as the data-free recipe;
`lmmse-macs-abs` = the allocation on the absolute error, compress.prune.allocation: macs-abs)
and every build plan.json given with --plan-json (labelled by its folder) — and every repair in --methods, prints a
Markdown row: MACs change, top-1 data-free, then top-1 after adapt_batchnorm on BN-matched synthetic inputs for each
--steps value (--samples inputs, seed --seed, cached under --cache). The first row is the ORIGINAL model adapted the
same way: how far the synthetic inputs themselves move an unchanged model (0 with perfect inputs). E.g.

  python bench/bench_bn_adapt.py --eval /tmp/jpeg_tune.npz \\
      --ratios 0.3 0.5 --plans l2 lmmse-macs --methods none,udfc,lmmse --steps 50 200

For cifar_resnet56, --weights and --eval default to the ResNet-56 weights and CIFAR test set under --data-root.
Single-threaded by default (--threads 1); the lmmse-macs planning of ResNet-56 takes about a minute per ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from dfp_deploy.analysis import analyze, count_macs
from dfp_deploy.compress import ChannelPlanner, adapt_batchnorm, compress_model, make_plan, prune_model, self_agreement
from dfp_deploy.core import PrunePlan
from dfp_deploy.data import load_calibration_inputs, load_images, to_tensor
from dfp_deploy.models import load_model
from dfp_deploy.pipeline import cache_dir
from data_root import add_data_root, fill  # bench/data_root.py (the script's folder is on sys.path)


def top1(model: torch.nn.Module, x: torch.Tensor, y) -> float:
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)])
    return float(100.0 * (pred.numpy() == y).mean())


def adapted(model: torch.nn.Module, inputs: torch.Tensor) -> torch.nn.Module:
    out = copy.deepcopy(model)
    adapt_batchnorm(out, inputs)
    return out


def uniform_plan(model, analysis, ratio: float, spec: str, round_to: int) -> PrunePlan:
    if spec == "l2":
        return make_plan(model, analysis, ratio=ratio, importance="l2", round_to=round_to)
    allocation = {"lmmse": "uniform", "lmmse-macs": "macs", "lmmse-macs-abs": "macs-abs"}[spec]
    return ChannelPlanner(model, analysis, importance="lmmse", allocation=allocation, round_to=round_to).plan(ratio)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_resnet56")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--eval", default=None, help="labelled test .npz (cifar_resnet56: the CIFAR test set)")
    add_data_root(ap)
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.5])
    ap.add_argument("--plans", nargs="*", default=["l2"], choices=["l2", "lmmse", "lmmse-macs", "lmmse-macs-abs"])
    ap.add_argument("--plan-json", nargs="*", default=[], help="plan.json files of builds (e.g. a searched plan)")
    ap.add_argument("--round-to", type=int, default=4)
    ap.add_argument("--methods", default="none,udfc,lmmse", help="data-free repairs (comma separated)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--steps", type=int, nargs="+", default=[200], help="synthetic_steps values to compare")
    ap.add_argument("--seed", type=int, default=1, help="synthetic inputs' seed (a build uses recipe seed + 1)")
    ap.add_argument("--cache", default=str(cache_dir() / "synthetic"),
                    help="default: the builds' cache, so seed 1 gives the very inputs a build with seed 0 uses")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench_bn_adapt.jsonl")
    args = ap.parse_args(argv)
    if args.model == "cifar_resnet56":
        fill(args, {"weights": "models/resnet56-4bfd9763.th", "eval": "data/cifar10_test_exact932.npz"})
    elif args.eval is None:
        ap.error(f"--eval is required with --model {args.model} (a labelled test .npz)")
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, args.weights)
    model = loaded.module.eval()
    one = torch.zeros((1, *loaded.input_shape))
    analysis = analyze(model, one)
    x8, y = load_images(args.eval, loaded.preprocess, limit=args.eval_limit)
    x = torch.from_numpy(to_tensor(x8, loaded.preprocess))
    del x8
    macs0 = count_macs(model, one)
    sources = {}
    for steps in args.steps:
        start = time.perf_counter()
        sources[steps] = load_calibration_inputs("synthetic", args.samples, model=model, preprocess=loaded.preprocess,
                                                 input_shape=loaded.input_shape, seed=args.seed,
                                                 synthetic_steps=steps, cache_dir=args.cache)
        print(f"# synthetic inputs, {steps} steps: {time.perf_counter() - start:.0f} s (0 if cached), "
              f"self_agreement {self_agreement(model, sources[steps]):.3f}", flush=True)
    print(f"# {args.model} on {len(y)} images of {os.path.basename(args.eval)}, {args.samples} synthetic inputs "
          f"(seed {args.seed}), {args.threads} thread(s)", flush=True)
    print("| plan | MACs | repair | data-free | " + " | ".join(f"adapted, {s} steps" for s in args.steps) +
          " | adapt s |", flush=True)
    print("|---|---|---|---|" + "---|" * len(args.steps) + "---|", flush=True)

    plans = {os.path.basename(os.path.dirname(os.path.abspath(f))):
             PrunePlan(keep={k: tuple(v) for k, v in json.load(open(f))["keep"].items()}) for f in args.plan_json}
    for ratio in args.ratios:
        for spec in args.plans:
            plans[f"{spec} {ratio:g}"] = uniform_plan(model, analysis, ratio, spec, args.round_to)
    rows = [("original", PrunePlan(), "none")] + [(name, plan, method) for name, plan in plans.items()
                                                   for method in args.methods.split(",")]
    for name, plan, method in rows:
        compressed = compress_model(model, analysis, plan, method=method).eval() if plan.keep else model
        macs = count_macs(compressed, one) / macs0 - 1
        scores, seconds = {}, 0.0
        for steps, inputs in sources.items():
            start = time.perf_counter()
            model_adapted = adapted(compressed, inputs)
            seconds += (time.perf_counter() - start) / len(sources)
            scores[steps] = top1(model_adapted, x, y)
        base = top1(compressed, x, y)
        with open(args.out, "a") as f:
            f.write(json.dumps(dict(model=args.model, plan=name, method=method, macs_change=macs, data_free=base,
                                    adapted={str(k): v for k, v in scores.items()}, samples=args.samples,
                                    seed=args.seed, eval=args.eval, eval_images=len(y))) + "\n")
        print(f"| {name} | {macs:+.1%} | {method} | {base:.2f} | " +
              " | ".join(f"{scores[s]:.2f}" for s in args.steps) + f" | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
