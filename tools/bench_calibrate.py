"""Benchmark: top-1 of few-shot calibration (squeeze + least squares + per-layer Adam) against plain pruning.

One line of JSON per configuration is appended to --out, and a Markdown row is printed, e.g.
  python tools/bench_calibrate.py --model cifar_resnet56 --weights ../shared/models/resnet56-4bfd9763.th \\
      --calib ../shared/data/cifar10_train_exact4660.npz --eval ../shared/data/cifar10_test_exact932.npz \\
      --ratios 0.3 0.5 --samples 64 256 1024 --squeeze-epochs 2 --calib-epochs 2
Calibration images are a seeded random subset of --calib (a TRAINING file; never point it at test images), or
"synthetic" for BN-matched generated inputs. Wall time is for calibrate() alone; the 1-minute load average before and
after is recorded because these machines are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from dfp_deploy.analysis import analyze, count_macs
from dfp_deploy.compress.calibrate import CalibrationLog, calibrate, load_calibration_inputs
from dfp_deploy.compress.plan import make_plan
from dfp_deploy.compress.prune import prune_model
from dfp_deploy.measure.dataset import load_images, to_tensor
from dfp_deploy.models import load_model


def top1(model: torch.nn.Module, x: torch.Tensor, y) -> float:
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return float(100.0 * (pred.numpy() == y).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_resnet56")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--calib", required=True, help="training-image .npz or 'synthetic'")
    ap.add_argument("--eval", required=True, help="labelled test .npz")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--samples", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--importance", default="l2")
    ap.add_argument("--squeeze-epochs", type=int, default=2)
    ap.add_argument("--calib-epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--ls-samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_calibrate.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, args.weights)
    model = loaded.module
    one = torch.zeros((1, *loaded.input_shape))
    analysis = analyze(model, one)
    x8, y = load_images(args.eval, loaded.preprocess)
    x_eval = torch.from_numpy(to_tensor(x8, loaded.preprocess))
    base = top1(model, x_eval, y)
    macs0 = count_macs(model, one)
    print(f"# {args.model}: original top-1 {base:.2f} on {len(y)} images of {os.path.basename(args.eval)}")
    print("| ratio | MACs | calib | n | squeeze/calib ep | plain | calibrated | LS only L | final L | BN kept | "
          "wall s | load |")
    for ratio in args.ratios:
        plan = make_plan(model, analysis, ratio=ratio, importance=args.importance)
        pruned = prune_model(model, analysis, plan)
        plain = top1(pruned, x_eval, y)
        macs = count_macs(pruned, one) / macs0 - 1
        for n in args.samples:
            inputs = load_calibration_inputs(args.calib, n, model=model, preprocess=loaded.preprocess,
                                             input_shape=loaded.input_shape, seed=args.seed)
            log = CalibrationLog()
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            calibrated = calibrate(model, analysis, plan, inputs, squeeze_epochs=args.squeeze_epochs,
                                   calib_epochs=args.calib_epochs, batch=args.batch, lr=args.lr, ridge=args.ridge,
                                   ls_samples=args.ls_samples, seed=args.seed, log=log)
            wall = time.perf_counter() - start
            load_after = os.getloadavg()[0]
            acc = top1(calibrated, x_eval, y)
            row = dict(model=args.model, ratio=ratio, macs_change=macs, calib=os.path.basename(args.calib),
                       samples=n, squeeze_epochs=args.squeeze_epochs, calib_epochs=args.calib_epochs,
                       batch=args.batch, lr=args.lr, ridge=args.ridge, ls_samples=args.ls_samples, seed=args.seed,
                       importance=args.importance, original=base, plain=plain, calibrated=acc, wall_s=wall,
                       threads=args.threads, load1_before=load_before, load1_after=load_after, log=vars(log))
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"| {ratio:g} | {macs:+.1%} | {row['calib']} | {n} | {args.squeeze_epochs}/{args.calib_epochs} | "
                  f"{plain:.2f} | {acc:.2f} | {log.after_least_squares:.3g} | {log.final:.3g} | "
                  f"{log.bn_reestimated} | {wall:.0f} | {load_before:.1f}→{load_after:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
