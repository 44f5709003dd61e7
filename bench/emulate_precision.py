"""fp16 and TF32 engines emulated on the CPU: their parity errors, judged by the old absolute bound and the new rule.

    python bench/emulate_precision.py                      # pretrained ResNet-56 and EfficientNet-Lite0 from ../shared
    python bench/emulate_precision.py --models resnet56 --images 256 --json out.json

For each model: the float32 model is the reference; the "engines" are the same model run in emulated fp16 and TF32
arithmetic (dfp_deploy.measure.emulate), and the same again with one corrupted weight (the largest weight of the
middle conv layer, sign flipped). Each is judged by the old rule (max|E - R| <= 1e-3) and by the precision-aware
rule of measure/parity.py. Real images from the data root; single-threaded, about 3 minutes for both models.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data_root import add_data_root, fill  # noqa: E402

MODELS = {
    "resnet56": ("cifar_resnet56", "models/resnet56-4bfd9763.th", "data/cifar10_test_exact932.npz"),
    "efficientnet_lite0": ("efficientnet_lite0", "imagenet/efficientnet-lite0-57934424.pth",
                           "imagenet/imagenet_sample1000_eli_224q95.npz"),
}
OLD_TOLERANCE = 1e-3


def evaluate(key: str, root: Path, images: int) -> list[dict]:
    import numpy as np
    import torch

    from dfp_deploy.data import load_images, to_tensor
    from dfp_deploy.measure import ParityRule, check_parity as parity, corrupt_one_weight, emulated, network_size
    from dfp_deploy.models import load_model

    name, weights, data = MODELS[key]
    loaded = load_model(name, str(root / weights))
    x, _ = load_images(root / data, loaded.preprocess, limit=images, require_labels=False)
    x = to_tensor(x, loaded.preprocess)
    layers, max_dot = network_size(loaded.module)

    def runner(model):
        class Engine:
            def run(self, batch):
                with torch.no_grad():
                    return np.concatenate([model(torch.from_numpy(chunk)).numpy()
                                           for chunk in np.array_split(batch, max(1, len(batch) // 64))])
        return Engine()

    reference = runner(loaded.module).run
    broken, where = corrupt_one_weight(loaded.module)
    rows = []
    for arithmetic in ("tf32", "fp16"):
        for label, model in (("correct", loaded.module), (f"corrupted {where}", broken)):
            rule = ParityRule(arithmetic, layers, max_dot, abs_floor=OLD_TOLERANCE)
            result = parity(reference, runner(emulated(model, arithmetic)), x, rule=rule)
            verdict = result["rule"]
            rows.append({"model": key, "arithmetic": arithmetic, "engine": label, "images": len(x),
                         "layers": layers, "max_dot": max_dot, "ref_scale": result["ref_scale"],
                         "max_abs_err": result["max_abs_err"], "rel_err": verdict["rel_err"],
                         "top1_agreement": result["top1_agreement"],
                         "old_rule_passes": result["max_abs_err"] <= OLD_TOLERANCE,
                         "rel_tolerance": verdict["rel_tolerance"], "tolerance": verdict["tolerance"],
                         "new_rule_passes": verdict["passed"], "near_ties": verdict.get("near_ties")})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS, reverse=True))
    ap.add_argument("--images", type=int, default=None, help="images per model (default 256 ResNet-56, 64 Lite0)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    add_data_root(ap)
    args = fill(ap.parse_args(argv), {})
    import torch

    from bench.data_root import root

    torch.set_num_threads(1)
    rows = []
    for key in args.models:
        started = time.perf_counter()
        images = args.images or (256 if key == "resnet56" else 64)
        rows += evaluate(key, root(args), images)
        print(f"# {key}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print("| model | arithmetic | engine | max abs err | rel err (/max\\|ref\\|) | top-1 agree | old 1e-3 | "
          "new tolerance (rel) | new rule |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['arithmetic']} | {r['engine']} | {r['max_abs_err']:.3g} | {r['rel_err']:.2e} | "
              f"{r['top1_agreement']:.3f} | {'pass' if r['old_rule_passes'] else 'FAIL'} | "
              f"{r['tolerance']:.3g} ({r['rel_tolerance']:.2e}) | {'pass' if r['new_rule_passes'] else 'FAIL'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
