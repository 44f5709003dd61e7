"""Benchmark data-free reconstruction on a CIFAR ResNet: pruning × reconstruction × weight bits, and quantization alone.

Sections (--sections, comma separated):
  tune    hyper-parameter sweeps (UDFC α, α', multi-channel form; lmmse rounding, bias correction, spatial ρ; NM t),
          on TUNING images only: the first --tune-train exact training images plus JPEG test images
          [--jpeg-start, --jpeg-start + --tune-jpeg) (relative numbers only; disjoint from the exact test images)
  select  lmmse-macs allocation knobs (select_plan max_ratio × normalise) at --ratios, lmmse fp32, on the TUNING
          images of `tune` (never the test images)
  guard   merge_grid_growth sweep (UDFC merges into quantized consumers, compress/repair/udfc.guard_merges): plain and
          UDFC per growth (--growths) at --ratios × --full-selections × quantized --bits, on the tuning images of
          `tune` (CIFAR) or, for models without labelled tuning images, agreement with the original model on the
          first --guard-images of --calib (label-free)
  prune   top-1 on the exact test images for ratio × channel selection × method × weight bits (block-internal
          groups only, as make_plan does by default); selection "l2"/"group_l2" = make_plan's rankings,
          "lmmse-u" = select_plan(budget="uniform"), "lmmse-macs" = select_plan(budget="macs") (same MACs removed
          as the uniform plan, allocated across blocks), "lmmse-macs-abs" = the same on ΔE itself with every group
          keeping ≥ 30% (select_plan normalise=False, max_ratio=0.7: chosen by the select section)
  quant   top-1 for weight quantization alone: round-to-nearest, + bias correction, + Hessian rounding, UDFC, lmmse
  peers   what a user would reach for instead (needs the `bench` extra: pip install torch-pruning):
          Torch-Pruning MagnitudeImportance(p=2) on the same block-internal groups with the same kept counts as the
          "l2" plan (so the same MACs as every selection of that ratio), no reconstruction; ONNX Runtime
          quantize_static int8 (QDQ, per-channel S8 weights, U8 activations, MinMax) calibrated on --calib-count real
          training images (bench/bench_int8_cpu.py's ort_quantize_static); for reference the project's own int8
          Q/DQ graph with data-free activation ranges (export.int8.int8_onnx, style ort-cpu) of the fp32 model and
          of the lmmse w8 model. int8 graphs run on ORT CPU with its graph optimizations (integer kernels).

    python bench/bench_reconstruct.py --sections tune            # choose defaults (never looks at the test images)
    python bench/bench_reconstruct.py --sections prune,quant,peers   # the tables of docs/research/reconstruction.md
    python bench/bench_reconstruct.py --model efficientnet_lite0 \
        --weights ../shared/imagenet/efficientnet-lite0-57934424.pth \
        --test ../shared/imagenet/imagenet_val1300_acuity_jpeg.npz \
        --calib ../shared/imagenet/imagenet_sample1000_eli_224q95.npz --selections l2,lmmse-macs ...

Evaluation engine (--engine): "torch" runs the PyTorch model; "ort" exports it (TorchScript exporter, fp32) and runs
ONNX Runtime CPU, numerically the same model (|Δlogit| ~1e-5) and about 5x faster for EfficientNet-Lite0's depthwise
convs at 224x224; "auto" = torch below 64x64 inputs, ort above. Batches of --batch images (default 500 at 32x32,
50 at 224x224) bound the memory.
Single-threaded by default (--threads 1): other jobs share the machine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dfp_deploy.analysis import analyze, count_macs
from dfp_deploy.compress import METHODS, RepairOptions, compress_model, edge_layers, make_plan, select_plan
from dfp_deploy.core import PrunePlan
from dfp_deploy.data import to_tensor
from dfp_deploy.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8_cpu import ort_quantize_static, session  # noqa: E402  (the ORT peer, one implementation)
from data_root import add_data_root, fill  # noqa: E402
from mdtable import markdown  # noqa: E402

# prune table columns: --prune-methods name -> (label, compress_model method, its options). "udfc-multi" is UDFC's
# non-negative least-squares vector form over several kept channels (docs/methods/reconstruction.md §2: no error bound)
PRUNE_VARIANTS = {"none": ("plain", "none", {}), "neuron_merging": ("NM", "neuron_merging", {}),
                  "udfc": ("UDFC", "udfc", {}), "lmmse": ("lmmse", "lmmse", {}),
                  "udfc-multi": ("UDFC multi", "udfc", {"multi": True})}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_resnet56")
    add_data_root(ap)
    ap.add_argument("--weights", default=None, help="default: models/resnet56-4bfd9763.th under --data-root")
    ap.add_argument("--test", default=None, help="default: data/cifar10_test_exact932.npz under --data-root")
    ap.add_argument("--test-start", type=int, default=0,
                    help="first --test image evaluated (e.g. 0 with --test-count 500: the val1300 tuning split)")
    ap.add_argument("--test-count", type=int, default=None, help="--test images evaluated (default: to the end)")
    ap.add_argument("--train", default=None, help="default: data/cifar10_train_exact4660.npz under --data-root")
    ap.add_argument("--jpeg", default=None, help="default: data/cifar10_test.npz under --data-root")
    ap.add_argument("--tune-train", type=int, default=1000)
    ap.add_argument("--tune-jpeg", type=int, default=3000)
    ap.add_argument("--jpeg-start", type=int, default=5000)
    ap.add_argument("--ratios", default="0.1,0.3,0.5")
    ap.add_argument("--bits", default="32,8,6,4", help="32 = float weights")
    ap.add_argument("--quant-bits", default="8,6,4,3")
    ap.add_argument("--sections", default="prune,quant")
    ap.add_argument("--selections", default="l2,group_l2,lmmse-u,lmmse-macs",
                    help="channel selections of the prune table")
    ap.add_argument("--full-selections", default="l2,lmmse-macs",
                    help="selections that get every weight bit width (the others fp32 only)")
    ap.add_argument("--prune-methods", default=",".join(METHODS),
                    help="columns of the prune table: " + ", ".join(PRUNE_VARIANTS))
    ap.add_argument("--quant-methods", default="all",
                    help="comma-separated row labels of the quant table (default all), e.g. RTN,UDFC")
    ap.add_argument("--first-last-bits", type=int, default=None,
                    help="quant table: also run every method with the first and last layer at these bits")
    ap.add_argument("--calib", default=None,
                    help="real training images for the ORT quantize_static peer (default: the training file under --data-root)")
    ap.add_argument("--calib-count", type=int, default=512)
    ap.add_argument("--growths", default="inf,0,0.1,0.5,1,2", help="guard section: merge_grid_growth values")
    ap.add_argument("--guard-images", type=int, default=300,
                    help="guard section, models without labelled tuning images: --calib images scored by agreement")
    ap.add_argument("--engine", choices=("auto", "torch", "ort"), default="auto")
    ap.add_argument("--batch", type=int, default=None, help="images per forward pass (default 500, 50 at 224x224)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--round-to", type=int, default=1, help="lmmse selections: kept counts snap to this multiple "
                    "(the recipe's compress.prune.round_to)")
    ap.add_argument("--out", default=None, help="write all numbers as JSON here")
    return fill(ap.parse_args(argv), {"weights": "models/resnet56-4bfd9763.th",
                                      "test": "data/cifar10_test_exact932.npz",
                                      "train": "data/cifar10_train_exact4660.npz",
                                      "jpeg": "data/cifar10_test.npz",
                                      "calib": "data/cifar10_train_exact4660.npz"})


class Evaluator:
    """Top-1 on one or more labelled image sets (float NCHW tensors, already preprocessed), in batches of `batch`,
    by PyTorch or by ONNX Runtime on the exported model (module docstring)."""

    def __init__(self, sets: dict[str, tuple[torch.Tensor, torch.Tensor]], engine: str = "torch", batch: int = 500,
                 threads: int = 1):
        self.sets, self.engine, self.batch, self.threads = sets, engine, batch, threads

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        model.eval()
        if self.engine == "ort":
            with tempfile.TemporaryDirectory() as work:
                path = Path(work) / "model.onnx"
                example = next(iter(self.sets.values()))[0][:1]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
                                      opset_version=17)
                return self.onnx(path)
        out = {}
        b = self.batch
        for name, (x, y) in self.sets.items():
            correct = sum(int((model(x[i:i + b]).argmax(1) == y[i:i + b]).sum()) for i in range(0, len(x), b))
            out[name] = 100.0 * correct / len(x)
        return out

    def onnx(self, path: Path, optimize: bool = True) -> dict[str, float]:
        """Top-1 of an ONNX model (input "input") on ORT CPU."""
        sess = session(Path(path), self.threads, optimize=optimize)
        name = sess.get_inputs()[0].name
        out = {}
        for key, (x, y) in self.sets.items():
            xn, b = x.numpy(), self.batch
            pred = np.concatenate([sess.run(None, {name: xn[i:i + b]})[0].argmax(1) for i in range(0, len(xn), b)])
            out[key] = 100.0 * float((pred == y.numpy()).mean())
        return out


def load_set(path: str, preprocess, start: int = 0, count: int | None = None):
    data = np.load(path)
    end = None if count is None else start + count
    if "x" in data.files:
        x = data["x"][start:end]
    else:  # JPEG layout of the full test set
        from dfp_deploy.data import load_images

        x, _ = load_images(path, preprocess, limit=end)
        x = x[start:]
    y = data["y"][start:end]
    return torch.from_numpy(to_tensor(np.ascontiguousarray(x), preprocess)), torch.from_numpy(y.astype(np.int64))


def fmt(v: float) -> str:
    return f"{v:.2f}"


class Bench:
    def __init__(self, args):
        torch.set_num_threads(args.threads)
        self.args = args
        loaded = load_model(args.model, args.weights)
        self.model, self.pre = loaded.module.eval(), loaded.preprocess
        self.example = torch.zeros(1, *loaded.input_shape)
        self.analysis = analyze(self.model, self.example)
        self.base_macs = count_macs(self.model, self.example)
        self.results: dict = {"model": args.model, "base_macs": self.base_macs}
        self._plans: dict = {}
        size = loaded.input_shape[-1]
        self.engine = args.engine if args.engine != "auto" else ("ort" if size > 64 else "torch")
        self.batch = args.batch or (500 if size <= 64 else 50)

    def evaluator(self, sets) -> Evaluator:
        return Evaluator(sets, self.engine, self.batch, self.args.threads)

    def macs_cut(self, model) -> float:
        return 100.0 * (1 - count_macs(model, self.example) / self.base_macs)

    def plan(self, ratio: float, selection: str) -> PrunePlan:
        key = (ratio, selection)
        if key not in self._plans:
            if selection in ("l2", "group_l2", "bn_l2"):
                self._plans[key] = make_plan(self.model, self.analysis, ratio=ratio, importance=selection,
                                            round_to=self.args.round_to)
            else:
                budget = {"lmmse-u": "uniform", "lmmse-macs": "macs", "lmmse-macs-abs": "macs"}[selection]
                # lmmse-macs-abs: groups compete on ΔE itself, each keeping ≥ 30% (chosen by --sections select on
                # the tuning images at r=0.5, ResNet-56)
                extra = {"normalise": False, "max_ratio": 0.7} if selection == "lmmse-macs-abs" else {}
                self._plans[key], _ = select_plan(self.model, self.analysis, ratio=ratio, budget=budget,
                                                  round_to=self.args.round_to, **extra)
        return self._plans[key]

    def run(self, evaluate, plan, method, bits, **kw) -> tuple[dict, float]:
        """kw: compress_model's arguments, and RepairOptions' tuning constants by name (the sweeps vary them)."""
        tuning = {f.name: kw.pop(f.name) for f in dataclasses.fields(RepairOptions) if f.name in kw}
        model = compress_model(self.model, self.analysis, plan, method=method,
                               weight_bits=None if bits == 32 else bits, options=RepairOptions(**tuning), **kw)
        return evaluate(model), self.macs_cut(model)

    def cifar_tuning_sets(self) -> dict:
        """The tuning images (module docstring): exact training images and a JPEG test range, never the test set."""
        a = self.args
        return {"train": load_set(a.train, self.pre, 0, a.tune_train),
                "jpeg": load_set(a.jpeg, self.pre, a.jpeg_start, a.tune_jpeg)}

    # ------------------------------------------------------------------------------------------------ tune
    def tune(self):
        a = self.args
        ev = self.evaluator(self.cifar_tuning_sets())
        base = ev(self.model)
        print(f"\n## Tuning (train {a.tune_train} exact / JPEG test {a.jpeg_start}..{a.jpeg_start + a.tune_jpeg}); "
              f"fp32: train {fmt(base['train'])}, JPEG {fmt(base['jpeg'])}\n")
        rows, record = [], []

        def go(label, plan, method, bits, **kw):
            t = time.time()
            acc, cut = self.run(ev, plan, method, bits, **kw)
            rows.append([label, fmt(cut), fmt(acc["train"]), fmt(acc["jpeg"]), f"{time.time() - t:.0f}s"])
            record.append({"config": label, "macs_cut": cut, **acc})
            print(f"  {label}: MACs -{cut:.1f}% train {acc['train']:.2f} jpeg {acc['jpeg']:.2f}", flush=True)

        for ratio in (0.3, 0.5):
            plan = self.plan(ratio, "l2")
            for alpha in (0.0, 0.001, 0.01, 0.1, 1.0):
                go(f"UDFC prune r={ratio} l2 α={alpha}", plan, "udfc", 32, alpha=alpha)
            go(f"UDFC prune r={ratio} l2 α=0.01 multi (NNLS)", plan, "udfc", 32, alpha=0.01, multi=True)
            for t in (0.1, 0.3, 0.5):
                go(f"NM prune r={ratio} l2 t={t}", plan, "neuron_merging", 32, nm_threshold=t)
        for bits in (4, 3):
            for alpha_q in (0.001, 0.01, 0.1, 1.0, 10.0):
                go(f"UDFC quant w{bits} α'={alpha_q}", PrunePlan(), "udfc", bits, alpha_q=alpha_q)
        for bits, ratio in ((3, 0.0), (4, 0.3), (3, 0.3)):
            plan = self.plan(ratio, "lmmse-macs") if ratio else PrunePlan()
            for rounding in ("nearest", "hessian"):
                for bc in (False, True):
                    go(f"lmmse r={ratio} w{bits} rounding={rounding} bias_correction={bc}", plan, "lmmse", bits,
                       rounding=rounding, bias_correction=bc)
            for rho in (0.5, 0.9):
                go(f"lmmse r={ratio} w{bits} hessian ρ={rho}", plan, "lmmse", bits, spatial_rho=rho)
        print(markdown(["config", "MACs −%", "train top-1", "JPEG top-1", "time"], rows))
        self.results["tune"] = {"base": base, "rows": record}

    # ------------------------------------------------------------------------------------------------ select
    def select(self):
        a = self.args
        ev = self.evaluator(self.cifar_tuning_sets())
        rows, record = [], []
        for ratio in [float(r) for r in a.ratios.split(",")]:
            for normalise in (True, False):
                for max_ratio in (0.6, 0.7, 0.8, 0.9):
                    plan, _ = select_plan(self.model, self.analysis, ratio=ratio, budget="macs",
                                            max_ratio=max_ratio, normalise=normalise)
                    acc, cut = self.run(ev, plan, "lmmse", 32)
                    label = f"r={ratio} lmmse-macs max_ratio={max_ratio} normalise={normalise}"
                    rows.append([label, fmt(cut), fmt(acc["train"]), fmt(acc["jpeg"])])
                    record.append({"config": label, "macs_cut": cut, **acc})
                    print(f"  {label}: MACs -{cut:.1f}% train {acc['train']:.2f} jpeg {acc['jpeg']:.2f}", flush=True)
        print("\n## Selection allocation (tuning images; lmmse fp32)\n")
        print(markdown(["config", "MACs −%", "train top-1", "JPEG top-1"], rows))
        self.results["select"] = record

    # ------------------------------------------------------------------------------------------------ guard
    def tuning_sets(self) -> dict:
        """CIFAR: the labelled tuning images of `tune`. Otherwise (no labelled tuning split, e.g. Lite0): the first
        --guard-images of --calib labelled with the ORIGINAL model's predictions, so top-1 = agreement with it."""
        a = self.args
        if a.model.startswith("cifar"):
            return self.cifar_tuning_sets()
        x, _ = load_set(a.calib, self.pre, 0, a.guard_images)
        with torch.inference_mode():
            agree = torch.cat([self.model(x[i:i + self.batch]).argmax(1) for i in range(0, len(x), self.batch)])
        return {"agreement": (x, agree)}

    def guard(self):
        """MERGE_GRID_GROWTH sweep (repair/udfc.guard_merges): plain vs UDFC with growths, quantized weights."""
        a = self.args
        sets = self.tuning_sets()
        ev = self.evaluator(sets)
        growths = [float(g) for g in a.growths.split(",")]
        rows, record = [], []
        for ratio in [float(r) for r in a.ratios.split(",")]:
            for selection in a.full_selections.split(","):
                plan = self.plan(ratio, selection)
                for bits in [int(b) for b in a.bits.split(",") if int(b) != 32]:
                    configs = [("plain", "none", {})] + [(f"UDFC g={g:g}", "udfc", {"merge_grid_growth": g})
                                                         for g in growths]
                    for label, method, kw in configs:
                        acc, cut = self.run(ev, plan, method, bits, **kw)
                        name = f"r={ratio} {selection} w{bits} {label}"
                        rows.append([name, fmt(cut), *(fmt(acc[k]) for k in sets)])
                        record.append({"config": name, "macs_cut": cut, **acc})
                        print(f"  {name}: " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)
        print("\n## Merge guard (tuning images" + ("" if "train" in sets else ": agreement with the original") + ")\n")
        print(markdown(["config", "MACs −%", *sets], rows))
        self.results["guard"] = record

    # ------------------------------------------------------------------------------------------------ prune
    def prune(self, ev):
        a = self.args
        ratios = [float(r) for r in a.ratios.split(",")]
        bits_list = [int(b) for b in a.bits.split(",")]
        methods = [m.strip() for m in a.prune_methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in PRUNE_VARIANTS]
        if unknown:
            raise SystemExit(f"--prune-methods: unknown {', '.join(unknown)} (known: {', '.join(PRUNE_VARIANTS)})")
        headers = ["ratio", "selection", "MACs −%"] + [
            f"{PRUNE_VARIANTS[m][0]} {'fp32' if b == 32 else f'w{b}'}" for b in bits_list for m in methods]
        rows, record = [], []
        selections = [x.strip() for x in a.selections.split(",") if x.strip()]
        full_selections = {x.strip() for x in a.full_selections.split(",")}
        for ratio in ratios:
            for selection in selections:
                t = time.time()
                plan = self.plan(ratio, selection)
                print(f"  plan r={ratio} {selection}: {time.time() - t:.0f}s", flush=True)
                full = selection in full_selections
                cells, cut = [], None
                for bits in bits_list:
                    for method in methods:
                        if not full and bits != 32:
                            cells.append("")
                            continue
                        _, name, options = PRUNE_VARIANTS[method]
                        acc, cut = self.run(ev, plan, name, bits, **options)
                        cells.append(fmt(acc["test"]))
                        record.append({"ratio": ratio, "selection": selection, "method": method, "bits": bits,
                                       "macs_cut": cut, "top1": acc["test"]})
                        print(f"  r={ratio} {selection} {method} w{bits}: {acc['test']:.2f} (MACs -{cut:.1f}%)",
                              flush=True)
                rows.append([str(ratio), selection, fmt(cut)] + cells)
        print("\n## Pruning (top-1 %, exact test images)\n")
        print(markdown(headers, rows))
        self.results["prune"] = record

    # ------------------------------------------------------------------------------------------------ quant
    def quant(self, ev):
        configs = [("RTN", "none", {}), ("RTN + bias corr.", "none", {"bias_correction": True}),
                   ("Hessian rounding + bias corr.", "none", {"rounding": "hessian", "bias_correction": True}),
                   ("UDFC", "udfc", {}), ("UDFC + bias corr.", "udfc", {"bias_correction": True}),
                   ("lmmse (Hessian + bias corr.)", "lmmse", {})]
        bits_list = [int(b) for b in self.args.quant_bits.split(",")]
        if self.args.quant_methods != "all":
            wanted = [x.strip() for x in self.args.quant_methods.split(",")]
            configs = [c for c in configs if any(c[0] == w or c[0].startswith(w + " (") for w in wanted)]
        if self.args.first_last_bits:
            edges = {name: self.args.first_last_bits for name in edge_layers(self.model, self.analysis.module_order)}
            configs += [(f"{label}, first/last w{self.args.first_last_bits}", method, {**kw, "layer_bits": edges})
                        for label, method, kw in configs]
        rows, record = [], []
        for label, method, kw in configs:
            cells = []
            for bits in bits_list:
                acc, _ = self.run(ev, PrunePlan(), method, bits, **kw)
                cells.append(fmt(acc["test"]))
                record.append({"config": label, "bits": bits, "top1": acc["test"]})
                print(f"  {label} w{bits}: {acc['test']:.2f}", flush=True)
            rows.append([label] + cells)
        print("\n## Weight quantization alone (top-1 %, exact test images)\n")
        print(markdown(["method"] + [f"w{b}" for b in bits_list], rows))
        self.results["quant"] = record


    # ------------------------------------------------------------------------------------------------ peers
    def torch_pruning(self, plan: PrunePlan) -> torch.nn.Module:
        """Torch-Pruning MagnitudeImportance(p=2) on each planned group, keeping the plan's channel COUNT (its own
        choice of channels): the group's producer conv drives the dependency graph (BN, depthwise, consumers)."""
        import torch_pruning as tp

        model = copy.deepcopy(self.model).eval()
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=self.example)
        importance = tp.importance.MagnitudeImportance(p=2)
        modules = dict(model.named_modules())
        for group, keep in plan.keep.items():
            producer, = self.analysis.members(group).producers
            conv = modules[producer]
            channels = conv.out_channels
            full = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(channels)))
            scores = importance(full)
            drop = torch.argsort(scores, stable=True)[:channels - len(keep)].tolist()
            graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop).prune()
        return model

    def peers(self, ev):
        from dfp_deploy.export import export_onnx, int8_onnx

        a = self.args
        rows, record = [], []
        for ratio in [float(r) for r in a.ratios.split(",")]:
            t = time.time()
            model = self.torch_pruning(self.plan(ratio, "l2"))
            acc, cut = ev(model), self.macs_cut(model)
            rows.append([f"Torch-Pruning MagnitudeImportance(p=2), r={ratio}", fmt(cut), fmt(acc["test"])])
            record.append({"config": "torch-pruning", "ratio": ratio, "macs_cut": cut, "top1": acc["test"]})
            print(f"  Torch-Pruning r={ratio}: {acc['test']:.2f} (MACs -{cut:.1f}%, {time.time() - t:.0f}s)", flush=True)
        calib = load_set(a.calib, self.pre, 0, a.calib_count)[0].numpy()
        onnx_ev = Evaluator(ev.sets, "ort", self.batch, a.threads)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            fp32 = work / "fp32.onnx"
            export_onnx(self.model, self.example, fp32, dynamic_batch=True)
            acc = onnx_ev.onnx(fp32)
            rows.append(["ORT fp32 (reference)", "0.00", fmt(acc["test"])])
            record.append({"config": "ort-fp32", "top1": acc["test"]})
            t = time.time()
            q = ort_quantize_static(fp32, work / "qstatic.onnx", calib, reduce_range=False)
            acc = onnx_ev.onnx(q)
            label = f"ORT quantize_static int8 (QDQ, per-channel, U8 act., MinMax, {len(calib)} train images)"
            rows.append([label, "0.00", fmt(acc["test"])])
            record.append({"config": "ort-quantize-static", "calib_images": len(calib), "top1": acc["test"]})
            print(f"  {label}: {acc['test']:.2f} ({time.time() - t:.0f}s)", flush=True)
            for label, method, bits in (("ours int8 Q/DQ, data-free ranges, fp32 weights", "none", None),
                                        ("ours int8 Q/DQ, data-free ranges, lmmse w8 weights", "lmmse", 8)):
                model = compress_model(self.model, self.analysis, PrunePlan(), method=method, weight_bits=bits)
                src = work / f"{method}.onnx"
                export_onnx(model, self.example, src, dynamic_batch=True)
                out = int8_onnx(model, self.example, src, work / f"{method}.int8.onnx", style="ort-cpu",
                                preprocess=self.pre)
                acc = onnx_ev.onnx(out)
                rows.append([label, "0.00", fmt(acc["test"])])
                record.append({"config": label, "top1": acc["test"]})
                print(f"  {label}: {acc['test']:.2f}", flush=True)
        print("\n## Peers (top-1 %, same test images)\n")
        print(markdown(["peer", "MACs −%", "top-1"], rows))
        self.results["peers"] = record


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"tune", "select", "guard", "prune", "quant", "peers"}
    if unknown:
        print(f"error: unknown section(s) {sorted(unknown)}; choose from tune, select, guard, prune, quant, peers",
              file=sys.stderr)
        return 2
    if "tune" in sections:
        bench.tune()
    if "guard" in sections:
        bench.guard()
    if "select" in sections:
        bench.select()
    if {"prune", "quant", "peers"} & set(sections):
        ev = bench.evaluator({"test": load_set(args.test, bench.pre, args.test_start, args.test_count)})
        base = ev(bench.model)
        bench.results["base_top1"] = base["test"]
        print(f"\n{args.model}: fp32 top-1 {base['test']:.2f} on {args.test} ({bench.base_macs / 1e6:.2f} M MACs, "
              f"engine {bench.engine})", flush=True)
        if "prune" in sections:
            bench.prune(ev)
        if "quant" in sections:
            bench.quant(ev)
        if "peers" in sections:
            bench.peers(ev)
    if args.out:
        Path(args.out).write_text(json.dumps(bench.results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
