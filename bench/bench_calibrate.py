"""Benchmark: top-1 of few-shot calibration (squeeze + least squares + per-layer Adam) against data-free repair.

For every prune ratio, the same plan (make_plan with --importance, or with --importance lmmse the lmmse channel
selection, ChannelPlanner(importance="lmmse", allocation="uniform"), same kept counts) is scored as: plain pruning,
UDFC and lmmse (dfp_deploy.compress.compress_model, data-free), then calibrate() with each calibration
source × size. One line of JSON per calibrated configuration is appended to --out, and a Markdown row is printed, e.g.

  python bench/bench_calibrate.py --model cifar_resnet56 --ratios 0.3 0.5 --samples 64 256 1024 --synthetic 256

(for cifar_resnet56, --weights, --calib and --eval default to the ResNet-56 weights and the CIFAR training and test
sets under --data-root, default ../shared beside the checkout).

Calibration images are a seeded random subset of --calib (a TRAINING file; never point it at test images; labels are
ignored), and --synthetic N... adds runs on N BN-matched generated inputs (data/synthetic.py, --synthetic-steps
optimisation steps, cached under --cache so both ratios share them). Time is for calibrate() alone, as process CPU
seconds (with one thread this is the unshared wall time; the machines are shared, so wall time, in brackets, and the
1-minute load average before and after are recorded too); generating synthetic inputs is timed separately (gen).
Single-threaded by default (--threads 1). The lmmse selection of Lite0 takes minutes; --plan-cache FILE keeps
the plans (JSON, keyed by model, weights, importance and ratio) so later runs reuse them. --plan-json FILE ...
calibrates given plans instead of uniform ratios: the plan.json of a build (e.g. the plan a `search:` recipe found),
labelled by the file's folder name. --allocation macs / macs-abs (with --importance lmmse) spends the ratio's MAC cut
across groups (compress/select/planner.py); --statistics calibration chooses the channels from activations measured
on each calibration input set in the original model (compress/select/measured.py; recipe key
advanced.compress.prune.statistics), so the plan, and its data-free columns, are made per input set; --round-to snaps
kept counts (the recipes use 4).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import torch

from dfp_deploy.analysis import analyze, count_macs
from dfp_deploy.compress import (ALLOCATIONS, RANKINGS, CalibrationLog, ChannelPlanner, auto_batch,
                                 calibrate_model as calibrate, compress_model, make_plan, measured_group_statistics,
                                 prune_model)
from dfp_deploy.core import PrunePlan
from dfp_deploy.data import load_calibration_inputs, load_images, to_tensor
from dfp_deploy.models import load_model
from data_root import add_data_root, fill  # bench/data_root.py (the script's folder is on sys.path)


def top1(model: torch.nn.Module, x: torch.Tensor, y) -> float:
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 100]).argmax(1) for i in range(0, len(x), 100)])
    return float(100.0 * (pred.numpy() == y).mean())


def plan_for(model, analysis, ratio: float, importance: str, cache: str | None, key: str,
             allocation: str = "uniform", round_to: int = 1) -> PrunePlan:
    """The plan at `ratio`: make_plan's ranking, or the lmmse selection (same kept counts, or with --allocation the
    same MACs)."""
    stored = {}
    if cache and os.path.exists(cache):
        with open(cache) as f:
            stored = json.load(f)
    entry = f"{key}|{importance}|{ratio:g}" + ("" if (allocation, round_to) == ("uniform", 1)
                                              else f"|{allocation}|r{round_to}")
    if entry in stored:
        return PrunePlan(keep={name: tuple(kept) for name, kept in stored[entry].items()})
    if importance == "lmmse":
        plan = ChannelPlanner(model, analysis, importance="lmmse", allocation=allocation, round_to=round_to).plan(ratio)
    else:
        plan = make_plan(model, analysis, ratio=ratio, importance=importance, round_to=round_to)
    if cache:
        stored[entry] = {name: list(kept) for name, kept in plan.keep.items()}
        with open(cache + ".tmp", "w") as f:
            json.dump(stored, f)
        os.replace(cache + ".tmp", cache)
    return plan


def load_plan_json(path: str) -> PrunePlan:
    """The plan a build wrote (plan.json: {"keep": {group: [kept channel indices]}, ...})."""
    with open(path) as f:
        return PrunePlan(keep={name: tuple(kept) for name, kept in json.load(f)["keep"].items()})


def ridge_summary(ridges: dict[str, float]) -> str:
    """'1e-4×20 1×3 inf×2': how many least-squares layers used each relative ridge (inf = weights kept)."""
    return " ".join(f"{rho:g}×{n}" for rho, n in sorted(collections.Counter(ridges.values()).items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_resnet56")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--calib", default=None, help="training-image .npz (real calibration images)")
    ap.add_argument("--eval", default=None, help="labelled test .npz (cifar_resnet56: the CIFAR test set)")
    add_data_root(ap)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--samples", type=int, nargs="*", default=[64, 256, 1024], help="real image counts")
    ap.add_argument("--synthetic", type=int, nargs="*", default=[], help="synthetic input counts")
    ap.add_argument("--synthetic-steps", type=int, default=50)
    ap.add_argument("--cache", default="/tmp/dfp_bench_synthetic")
    ap.add_argument("--baselines", default="plain,udfc,lmmse", help="data-free columns (comma separated)")
    ap.add_argument("--importance", default="l2", choices=RANKINGS,
                    help="channel ranking; lmmse = ChannelPlanner's lmmse selection (see --allocation, --statistics)")
    ap.add_argument("--allocation", default="uniform", choices=ALLOCATIONS, help="with --importance lmmse")
    ap.add_argument("--statistics", default="model", choices=("model", "calibration"),
                    help="lmmse selection on the data-free model, or on each calibration set's measured activations")
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--plan-cache", default=None, help="JSON file that stores the plans between runs")
    ap.add_argument("--plan-json", nargs="+", default=None,
                    help="plan.json files of builds (e.g. a searched plan) to calibrate instead of --ratios")
    ap.add_argument("--squeeze-epochs", type=int, default=2)
    ap.add_argument("--calib-epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="default: calibrate's auto_batch (64 ResNet-56, 16 Lite0)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--ridge", type=float, default=None,
                    help="fixed relative ridge of the least squares; default: cross-validated per layer")
    ap.add_argument("--ls-samples", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench_calibrate.jsonl")
    args = ap.parse_args(argv)
    if args.model == "cifar_resnet56":  # the shared files under --data-root, unless named
        fill(args, {"weights": "models/resnet56-4bfd9763.th", "eval": "data/cifar10_test_exact932.npz",
                    "calib": "data/cifar10_train_exact4660.npz"})
    elif args.eval is None:
        ap.error(f"--eval is required with --model {args.model} (a labelled test .npz)")
    torch.set_num_threads(args.threads)
    if args.samples and not args.calib:
        ap.error("--samples needs --calib (a training .npz); use --samples with no values for synthetic only")
    if (args.allocation != "uniform" or args.statistics != "model") and args.importance != "lmmse":
        ap.error("--allocation and --statistics apply to --importance lmmse")
    if args.statistics != "model" and args.plan_json:
        ap.error("--statistics calibration makes its own plans; it cannot calibrate --plan-json files")

    loaded = load_model(args.model, args.weights)
    model = loaded.module
    one = torch.zeros((1, *loaded.input_shape))
    analysis = analyze(model, one)
    x8, y = load_images(args.eval, loaded.preprocess, limit=args.eval_limit)
    x_eval = torch.from_numpy(to_tensor(x8, loaded.preprocess))
    del x8
    base = top1(model, x_eval, y)
    macs0 = count_macs(model, one)
    print(f"# {args.model}: original top-1 {base:.2f} on {len(y)} images of {os.path.basename(args.eval)}, "
          f"{args.threads} thread(s)", flush=True)

    plans, rows = {}, {}
    baselines = [b for b in args.baselines.split(",") if b]
    # a ratio, or the folder name of a build's plan.json
    plan_files = {os.path.basename(os.path.dirname(os.path.abspath(f))): f for f in args.plan_json or []}
    keys = list(plan_files) or args.ratios

    def score(plan: PrunePlan) -> dict:
        """MAC change and the data-free columns of a plan."""
        scores = {}
        for method in baselines:
            compressed = compress_model(model, analysis, plan, method="none" if method == "plain" else method)
            scores[method] = top1(compressed, x_eval, y)
        return dict(macs_change=count_macs(prune_model(model, analysis, plan), one) / macs0 - 1, **scores)

    def describe(ratio, row: dict, source: str, seconds: float) -> None:
        print(f"# ratio {ratio}: MACs {row['macs_change']:+.1%}, {source} {seconds:.0f} s, data-free " +
              ", ".join(f"{k} {row[k]:.2f}" for k in baselines), flush=True)

    for ratio in keys if args.statistics == "model" else []:
        start = time.perf_counter()
        if plan_files:
            plan = load_plan_json(plan_files[ratio])
        else:
            plan = plan_for(model, analysis, ratio, args.importance, args.plan_cache,
                            f"{args.model}|{os.path.basename(args.weights or '')}", args.allocation, args.round_to)
        plans[ratio] = plan
        plan_s = time.perf_counter() - start
        rows[ratio] = score(plan)
        describe(ratio, rows[ratio], os.path.basename(plan_files[ratio]) if plan_files
                 else f"{args.importance} {args.allocation} plan", plan_s)

    print("| ratio | MACs | calib | n | ep sq/cal | lr | " + "".join(f"{b} | " for b in baselines) +
          "calibrated | L prune→LS→final | BN kept | Adam kept | LS ρ (layers) | CPU s (wall) | gen CPU s | load |",
          flush=True)
    sources = [(args.calib, n) for n in args.samples] + [("synthetic", n) for n in args.synthetic]
    for source, n in sources:
        start, cpu_start = time.perf_counter(), time.process_time()
        inputs = load_calibration_inputs(source, n, model=model, preprocess=loaded.preprocess,
                                         input_shape=loaded.input_shape, seed=args.seed,
                                         synthetic_steps=args.synthetic_steps, cache_dir=args.cache)
        gen = time.perf_counter() - start if source == "synthetic" else 0.0
        gen_cpu = time.process_time() - cpu_start if source == "synthetic" else 0.0
        label = "synthetic" if source == "synthetic" else os.path.basename(source)
        if args.statistics == "calibration":  # plans chosen on these inputs' measured activations
            start = time.perf_counter()
            planner = ChannelPlanner(model, analysis, importance="lmmse", allocation=args.allocation,
                                     round_to=args.round_to, measured=measured_group_statistics(model, analysis,
                                                                                                inputs))
            for ratio in keys:
                plans[ratio] = planner.plan(ratio)
                rows[ratio] = score(plans[ratio])
                describe(ratio, rows[ratio], f"lmmse {args.allocation} plan on {n} {label} activations",
                         time.perf_counter() - start)
        for ratio in keys:
            log = CalibrationLog()
            load_before = os.getloadavg()[0]
            start, cpu_start = time.perf_counter(), time.process_time()
            calibrated = calibrate(model, analysis, plans[ratio], inputs, squeeze_epochs=args.squeeze_epochs,
                                   calib_epochs=args.calib_epochs, batch=args.batch, lr=args.lr, ridge=args.ridge,
                                   ls_samples=args.ls_samples, seed=args.seed, log=log)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            load_after = os.getloadavg()[0]
            acc = top1(calibrated, x_eval, y)
            row = dict(model=args.model, ratio=ratio, calib=label, samples=n,
                       synthetic_steps=args.synthetic_steps if source == "synthetic" else None,
                       squeeze_epochs=args.squeeze_epochs, calib_epochs=args.calib_epochs,
                       batch=args.batch or auto_batch(model, inputs[:1]),
                       lr=args.lr, ridge=args.ridge, ls_samples=args.ls_samples, seed=args.seed,
                       importance=None if plan_files else args.importance, plan_json=plan_files.get(ratio),
                       allocation=None if plan_files else args.allocation, statistics=args.statistics,
                       round_to=None if plan_files else args.round_to,
                       original=base, eval_images=len(y), **rows[ratio],
                       calibrated=acc, wall_s=wall, cpu_s=cpu, gen_s=gen, gen_cpu_s=gen_cpu, threads=args.threads,
                       load1_before=load_before, load1_after=load_after, log=vars(log))
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"| {ratio} | {rows[ratio]['macs_change']:+.1%} | {label} | {n} | "
                  f"{args.squeeze_epochs}/{args.calib_epochs} | {args.lr:g} | " +
                  "".join(f"{rows[ratio][b]:.2f} | " for b in baselines) +
                  f"{acc:.2f} | {log.after_prune:.3g}→{log.after_least_squares:.3g}→{log.final:.3g} | "
                  f"{log.bn_reestimated} | {log.calib_kept} | {ridge_summary(log.least_squares_ridge)} | "
                  f"{cpu:.0f} ({wall:.0f}) | {gen_cpu:.0f} | "
                  f"{load_before:.1f}→{load_after:.1f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
