"""GPU acceptance run: every NVIDIA backend built, checked for parity and timed, in one command, with no network.

    python bench/gpu_check.py --out gpu-check            # on a machine with an NVIDIA GPU (under 8 minutes)
    python bench/gpu_check.py --dry-run                  # anywhere: print the plan, exit 0

Steps (each a `dfp-deploy build` through the public API; a failing step is recorded and the run goes on):
  1. backend listing (without initialising CUDA) and the environment: nvidia-smi, driver, torch/TensorRT/ORT versions;
  2. for each GPU backend that imports (torch-cuda fp32/fp16, tensorrt fp32/fp16/int8, ort-cuda fp32): the
     quickstart recipe and, when the data root has it, pretrained CIFAR ResNet-56 with its eval images:
     parity (the precision-aware rule), p50 before/after (CUDA events, CUDA graphs where the backend replays them)
     and speed-up;
  3. a short latency search (search.target=latency) on the first available GPU backend (tensorrt preferred).
Writes <out>/summary.json (one object) and copies every engine's layer JSON to <out>/layers/; each build's full
output stays in <out>/builds/<step>/. Steps not started before the time budget (default 450 s) are listed as
skipped, so the run ends in time.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data_root import REPO, add_data_root, root  # noqa: E402

GPU_PRECISIONS = {"torch-cuda": ("fp32", "fp16"), "tensorrt": ("fp32", "fp16", "int8"), "ort-cuda": ("fp32",)}
RESNET56 = ("models/resnet56-4bfd9763.th", "data/cifar10_test_exact932.npz")
# GPU inferences take well under a millisecond: more runs than the CPU recipes, still seconds per build
MEASURE = ["advanced.measure.warmup=20", "advanced.measure.runs=300", "advanced.measure.rounds=3"]
SEARCH = ["search.episodes=6", "search.target=latency", "search.ratio=0.3", "search.samples=64",
          "advanced.search.synthetic_steps=10"]


def plan(data_root: Path, available: dict[str, bool] | None) -> list[dict]:
    """The builds to run: {"name", "recipe", "overrides", "backend", "precision"}; available=None lists all."""
    steps = []
    resnet_present = all((data_root / rel).is_file() for rel in RESNET56)
    models = [("quickstart", REPO / "recipes" / "quickstart.yaml", [])]
    if resnet_present:
        models.append(("resnet56", REPO / "recipes" / "cifar_resnet56.yaml",
                       [f"model.weights={data_root / RESNET56[0]}", f"eval.data={data_root / RESNET56[1]}"]))
    for backend, precisions in GPU_PRECISIONS.items():
        if available is not None and not available.get(backend):
            continue
        for model, recipe, extra in models:
            for precision in precisions:
                steps.append({"name": f"{model}-{backend}-{precision}", "recipe": str(recipe), "backend": backend,
                              "precision": precision,
                              "overrides": [f"target.backend={backend}", f"target.precision={precision}",
                                            *extra, *MEASURE]})
    search_backend = next((b for b in ("tensorrt", "torch-cuda", "ort-cuda")
                           if available is None or available.get(b)), None)
    if search_backend is not None:
        steps.append({"name": f"search-latency-{search_backend}", "recipe": str(REPO / "recipes" / "quickstart.yaml"),
                      "backend": search_backend, "precision": "fp32",
                      "overrides": [f"target.backend={search_backend}", "target.precision=fp32", *SEARCH, *MEASURE]})
    return steps


def _run(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    versions = {}
    for module in ("torch", "tensorrt", "onnxruntime", "onnx"):
        try:
            versions[module] = getattr(__import__(module), "__version__", None)
        except Exception as e:  # noqa: BLE001 - a missing or broken package is a fact to record
            versions[module] = f"unavailable: {type(e).__name__}"
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                "--format=csv,noheader"]),
            "nvidia_smi_full": _run(["nvidia-smi"])}


def _summary_of(report: dict) -> dict:
    latency, parity = report.get("latency", {}), report.get("parity", {})
    rule = parity.get("rule") or {}
    return {"parity": {k: parity.get(k) for k in ("max_abs_err", "top1_agreement", "ref_scale", "tolerance",
                                                   "min_agreement")}
            | {"rule_passed": rule.get("passed"), "rel_tolerance": rule.get("rel_tolerance"),
               "arithmetic": rule.get("arithmetic")},
            "p50_ms": {"before": (latency.get("before") or {}).get("p50_ms"),
                       "after": (latency.get("after") or {}).get("p50_ms")},
            "speedup": latency.get("speedup"), "cuda_graph": latency.get("cuda_graph"),
            "engine_layers": ((report.get("engine") or {}).get("layers") or {}).get("text"),
            "accuracy": report.get("accuracy"), "search": bool(report.get("search")),
            "warnings": report.get("warnings", [])}


def run_step(step: dict, out: Path) -> dict:
    from dfp_deploy.pipeline import build
    from dfp_deploy.recipe import load_recipe

    folder = out / "builds" / step["name"]
    started = time.perf_counter()
    try:
        recipe = load_recipe(step["recipe"], step["overrides"], out=str(folder))
        report = build(recipe, Path(step["recipe"]), quiet=True)
        result = {"status": "ok", **_summary_of(report)}
    except Exception as e:  # noqa: BLE001 - one failed build must not end the acceptance run
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc(limit=6)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    layers = out / "layers"
    for path in folder.glob("*.layers.json") if folder.is_dir() else ():
        layers.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, layers / f"{step['name']}.{path.name}")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-check", help="folder for summary.json, layers/ and builds/")
    ap.add_argument("--budget-s", type=float, default=450.0, help="start no step after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (every backend) and exit 0")
    add_data_root(ap)
    args = ap.parse_args(argv)
    data_root = root(args)

    if args.dry_run:
        from dfp_deploy.recipe import load_recipe

        steps = plan(data_root, None)
        for step in steps:  # a plan whose recipes do not load would only fail on the GPU machine
            load_recipe(step["recipe"], step["overrides"], out=str(Path(args.out) / "builds" / step["name"]))
        print(f"gpu_check plan ({len(steps)} builds; GPU backends that do not import are skipped at run time; "
              f"data root {data_root}):")
        print("  backends: dfp-deploy backends listing (no CUDA initialisation), nvidia-smi, versions")
        for step in steps:
            print(f"  {step['name']}: {Path(step['recipe']).name} {' '.join(step['overrides'])}")
        print(f"all {len(steps)} recipes load; writes {Path(args.out) / 'summary.json'}, "
              f"{Path(args.out) / 'layers'}/*.layers.json")
        return 0

    from dfp_deploy.backends import list_backends

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    infos = list_backends()
    available = {info.name: info.available for info in infos}
    summary = {"backends": [vars(info) for info in infos], "environment": environment(), "data_root": str(data_root),
               "steps": {}}
    if not any(available.get(b) for b in GPU_PRECISIONS):
        summary["note"] = "no GPU backend is available here: nothing was built"
    for step in plan(data_root, available):
        if time.perf_counter() - started > args.budget_s:
            summary["steps"][step["name"]] = {"status": "skipped: time budget"}
            continue
        print(f"[{time.perf_counter() - started:6.1f}s] {step['name']}", flush=True)
        summary["steps"][step["name"]] = {"backend": step["backend"], "precision": step["precision"],
                                          **run_step(step, out)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))  # partial results survive
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    failed = [name for name, s in summary["steps"].items() if s.get("status") == "failed"]
    print(f"wrote {out / 'summary.json'}: {len(summary['steps'])} steps, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
