"""Coverage of torchvision's classification zoo: inspect, prune, int8 and ratio-0 builds through the real pipeline.

python bench/zoo_coverage.py --out docs/research/torchvision-zoo.md            # every model below (hours on 2 cores)
python bench/zoo_coverage.py --models resnet18 vit_b_16 --out /tmp/zoo.md      # a few
python bench/zoo_coverage.py --latency resnet50 mobilenet_v2 --out docs/research/torchvision-zoo.md
Needs torchvision (`pip install 'dfp-deploy[torchvision]'`); downloads nothing. Each model gets random weights made
non-degenerate (dfp_deploy.models.random_init: BatchNorm statistics of one batch, unit-RMS layers, unit-scale
logits), saved as a state_dict and passed as model.weights, then four checks, each through pipeline.inspect /
pipeline.build: inspect at ratio 0.3; build at compress.prune.ratio=0.3 with include_residual (every prunable group) (fp32 ORT-CPU; parity relative to
max|logit|); the same at target.precision=int8 (data-free ranges); ratio 0 (model.pt must compute bit for bit what
the original computes). A check that raises a DfpError is a clean refusal (its one line is kept); any other
exception is a failure. Results go to <out>.json after every model (a rerun skips models already there unless
--redo), and the table to <out>, between the markers below (the rest of the page is kept).
--latency builds the named models at ratio 0.3 with latency on (original and pruned timed interleaved by the
pipeline, --threads threads) and writes the MAC cut beside the realized speedup.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from dfp_deploy.core import DfpError
from dfp_deploy.models import non_degenerate_

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mdtable import markdown  # noqa: E402  (bench/mdtable.py)

# the smallest member of every convolutional family, a second member where the family's blocks differ, and ViT
MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small",
    "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf",
    "densenet121", "shufflenet_v2_x0_5", "squeezenet1_0", "squeezenet1_1", "mnasnet0_5", "googlenet",
    "inception_v3", "convnext_tiny", "vgg11", "vgg11_bn", "alexnet", "vit_b_16",
]
RATIO = 0.3
BEGIN, END = "<!-- zoo-coverage:begin -->", "<!-- zoo-coverage:end -->"
LAT_BEGIN, LAT_END = "<!-- zoo-latency:begin -->", "<!-- zoo-latency:end -->"
PARITY_LIMIT = 1e-3  # fp32 engine vs PyTorch, relative to max|logit|


def input_size(name: str) -> int:
    return 299 if name.startswith("inception") else 224


def random_weights(name: str, work: Path, seed: int) -> Path:
    """Non-degenerate random weights for torchvision model `name`, saved once under `work`."""
    from torchvision import models as tv_models

    path = work / f"{name}.random{seed}.pt"
    if not path.exists():
        torch.manual_seed(seed)
        model = tv_models.get_model(name, weights=None)
        non_degenerate_(model, (3, input_size(name), input_size(name)), seed=seed)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return path


def recipe_for(name: str, weights: Path, out: Path, extra: list[str]):
    from dfp_deploy.recipe import load_recipe

    s = input_size(name)
    sets = [f"model.name=torchvision:{name}", f"model.weights={weights}", f"model.input_size=[3,{s},{s}]",
            "target.batch=1", "measure.latency=false", "advanced.measure.rounding_cost=false",
            "advanced.measure.parity_samples=4", "advanced.compress.prune.include_residual=true", *extra]
    return load_recipe(None, sets, out=str(out))


def attempt(fn):
    """(status, value, seconds): ok | refused (DfpError, its line) | failed (any other exception)."""
    t0 = time.perf_counter()
    try:
        return "ok", fn(), time.perf_counter() - t0
    except DfpError as exc:
        return "refused", str(exc).splitlines()[0][:300], time.perf_counter() - t0
    except Exception as exc:  # a traceback is what this script exists to find
        traceback.print_exc()
        return "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:240] if str(exc) else ''}", \
            time.perf_counter() - t0


def check_model(name: str, work: Path, seed: int, log) -> dict:
    from dfp_deploy import pipeline

    row: dict = {"model": name, "input": input_size(name)}
    weights = random_weights(name, work, seed)

    def inspect():
        info = pipeline.inspect(recipe_for(name, weights, work / f"{name}-inspect", [f"compress.prune.ratio={RATIO}"]))
        groups = info["groups"]
        return {"groups": len(groups), "prunable": sum(g.prunable for g in groups),
                "prunable_channels": sum(g.channels for g in groups if g.prunable),
                "channels": sum(g.channels for g in groups), "macs": info["macs"], "params": info["params"],
                "warnings": len(info["warnings"]), "first_warning": (info["warnings"] or [""])[0][:300]}

    def build(extra: list[str], tag: str):
        def run():
            report = pipeline.build(recipe_for(name, weights, work / f"{name}-{tag}", extra), quiet=True)
            par = report["parity"]
            scale = par.get("ref_scale") or 1.0
            return {"macs_before": report["macs"]["before"], "macs_after": report["macs"]["after"],
                    "mac_cut": report["macs"]["reduction"], "params_cut": report["params"]["reduction"],
                    "groups_pruned": report["prune"]["groups_pruned"], "max_abs_err": par["max_abs_err"],
                    "ref_scale": scale, "rel_err": par["max_abs_err"] / scale,
                    "top1_agreement": par.get("top1_agreement"),
                    "simulated": par.get("simulated"), "notice": report["prune"].get("notice"),
                    "out": str(work / f"{name}-{tag}")}
        return run

    for key, fn in (("inspect", inspect), ("prune", build([f"compress.prune.ratio={RATIO}"], "prune")),
                    ("int8", build([f"compress.prune.ratio={RATIO}", "target.precision=int8"], "int8")),
                    ("ratio0", build(["compress.prune.ratio=0"], "ratio0"))):
        status, value, seconds = attempt(fn)
        row[key] = {"status": status, "seconds": round(seconds, 1),
                    **(value if status == "ok" else {"reason": value})}
        log(f"  {name} {key}: {status} in {seconds:.1f}s"
            + ("" if status == "ok" else f" ({value})"))
    if row["ratio0"]["status"] == "ok":
        row["ratio0"]["bit_identical"] = bit_identical(name, weights, Path(row["ratio0"]["out"]))
    if row["prune"]["status"] == "ok":
        row["prune"]["parity_ok"] = row["prune"]["rel_err"] <= PARITY_LIMIT
    return row


def bit_identical(name: str, weights: Path, out: Path) -> bool:
    """model.pt of the ratio-0 build computes exactly what the original computes, on seeded noise."""
    from dfp_deploy.models import load_model

    s = input_size(name)
    original = load_model(f"torchvision:{name}", str(weights), input_shape=(3, s, s)).module
    built = torch.load(out / "model.pt", weights_only=False).eval()
    x = torch.randn((2, 3, s, s), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return bool(torch.equal(original(x), built(x)))


# --- the page --------------------------------------------------------------------------------------------------

def _pct(x) -> str:
    return f"{100 * x:.1f} %"


def table(rows: list[dict]) -> str:
    headers = ["model", "input", "groups (prunable)", "MAC cut at 0.3", "fp32 parity (rel.)", "int8 vs fp32 (rel.) / "
               "top-1 agreement / vs simulated Q/DQ (rel.)", "ratio 0 bit-identical", "build s (prune, int8)", "verdict"]
    body = []
    for r in rows:
        ins, pr, q, z = r["inspect"], r["prune"], r["int8"], r["ratio0"]
        groups = f"{ins['groups']} ({ins['prunable']})" if ins["status"] == "ok" else ins["status"]
        if pr["status"] == "ok":
            cut = _pct(pr["mac_cut"])
            parity = f"{pr['rel_err']:.1e}"
        else:
            cut, parity = pr["status"], "–"
        if q["status"] == "ok":
            agree, sim = q["top1_agreement"], (q.get("simulated") or {}).get("max_abs_err")
            int8 = f"{q['rel_err']:.2f} / {_pct(agree) if agree is not None else '–'}" \
                + (f" / {sim / q['ref_scale']:.0e}" if sim is not None else "")
        else:
            int8 = q["status"]
        zero = {True: "yes", False: "NO"}.get(z.get("bit_identical"), z["status"])
        times = f"{pr['seconds']:.0f}, {q['seconds']:.0f}"
        body.append([r["model"], r["input"], groups, cut, parity, int8, zero, times, verdict(r)])
    return markdown(headers, body)


def verdict(r: dict) -> str:
    """✔ when the prune build passed parity and ratio 0 is bit-identical; what was refused, and why, in a few words."""
    checks = {k: r[k]["status"] for k in ("inspect", "prune", "int8", "ratio0")}
    if "failed" in checks.values():
        return "✘ traceback in " + ", ".join(k for k, v in checks.items() if v == "failed")
    if checks["inspect"] != "ok" or checks["prune"] != "ok" or checks["ratio0"] != "ok":
        return "refused: " + next(r[k]["reason"] for k in ("inspect", "prune", "ratio0") if checks[k] != "ok")[:160]
    if not r["prune"].get("parity_ok", False) or r["ratio0"].get("bit_identical") is False:
        return "✘ parity"
    text = "✔"
    if r["prune"]["groups_pruned"] == 0:
        text += " nothing prunable (notice printed)"
    if checks["int8"] == "refused":
        reason = r["int8"]["reason"]
        text += "; int8 refused: " + ("no BatchNorm for data-free ranges" if "need BatchNormalization" in reason
                                      else reason[:120])
    return text


def write_page(out: Path, rows: list[dict], latency_rows: list[dict] | None) -> None:
    text = out.read_text() if out.exists() else f"# torchvision classification zoo\n\n{BEGIN}\n{END}\n"
    if rows:
        text = _replace(text, BEGIN, END, table(rows))
    if latency_rows:
        text = _replace(text, LAT_BEGIN, LAT_END, latency_table(latency_rows))
    out.write_text(text)


def _replace(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


# --- latency ---------------------------------------------------------------------------------------------------

def latency_row(name: str, work: Path, seed: int, threads: int, runs: int, rounds: int) -> dict:
    from dfp_deploy import pipeline

    weights = random_weights(name, work, seed)
    recipe = recipe_for(name, weights, work / f"{name}-latency",
                        [f"compress.prune.ratio={RATIO}", "measure.latency=true", f"target.threads={threads}",
                         f"advanced.measure.runs={runs}", f"advanced.measure.rounds={rounds}",
                         "advanced.measure.warmup=10",
                         "advanced.target.fingerprint=table"])  # the table's multiple: no fingerprint measured first
    report = pipeline.build(recipe, quiet=True)
    lat = report["latency"]
    rounds_speedup = lat.get("speedup_rounds") or []
    return {"model": name, "mac_cut": report["macs"]["reduction"],
            "mac_factor": report["macs"]["before"] / report["macs"]["after"],
            "p50_before": lat["before"]["p50_ms"], "p50_after": lat["after"]["p50_ms"],
            "p90_before": lat["before"]["p90_ms"], "p90_after": lat["after"]["p90_ms"],
            "speedup": lat["speedup"], "speedup_min": min(rounds_speedup, default=None),
            "speedup_max": max(rounds_speedup, default=None), "threads": lat.get("threads"),
            "runs": runs, "rounds": rounds, "round_to": report["prune"]["round_to"]}


def latency_table(rows: list[dict]) -> str:
    headers = ["model (ratio 0.3)", "MAC cut", "MAC factor", "p50 ms original (p90)", "p50 ms pruned (p90)",
               "speedup (median)", "per-round speedups", "realized / MAC factor"]
    body = [[f"{r['model']} (channels rounded to {(r.get('round_to') or {}).get('value', '?')})", _pct(r["mac_cut"]), f"{r['mac_factor']:.2f}x",
             f"{r['p50_before']:.2f} ({r['p90_before']:.2f})", f"{r['p50_after']:.2f} ({r['p90_after']:.2f})",
             f"{r['speedup']:.2f}x", f"{r['speedup_min']:.2f}–{r['speedup_max']:.2f}x",
             f"{r['speedup'] / r['mac_factor']:.2f}"] for r in rows]
    return markdown(headers, body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--latency", nargs="+", default=None, help="models to time at ratio 0.3 instead")
    ap.add_argument("--out", type=Path, required=True, help="Markdown page (the JSON goes beside it)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dfp-zoo"), help="weights and build folders")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--redo", action="store_true", help="re-check models already in the JSON")
    ap.add_argument("--render", action="store_true", help="only rewrite the page from the JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.out.with_suffix(".json")
    data = json.loads(store.read_text()) if store.exists() else {}
    data.setdefault("coverage", {})
    data.setdefault("latency", {})

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def save() -> None:
        data["environment"] = {"torch": torch.__version__, "torchvision": _tv_version(), "threads": args.threads}
        store.write_text(json.dumps(data, indent=1, default=float) + "\n")
        coverage = [data["coverage"][m] for m in MODELS + sorted(set(data["coverage"]) - set(MODELS))
                    if m in data["coverage"]]
        lat = [data["latency"][m] for m in data["latency"]]
        write_page(args.out, coverage, lat)

    if args.render:
        save()
        return 0
    if args.latency:
        for name in args.latency:
            log(f"{name}: latency at ratio {RATIO}")
            data["latency"][name] = latency_row(name, args.work, args.seed, args.threads, args.runs, args.rounds)
            log(f"  {data['latency'][name]}")
            save()
        return 0
    for name in args.models:
        if name in data["coverage"] and not args.redo:
            continue
        log(f"{name}: checking")
        data["coverage"][name] = check_model(name, args.work, args.seed, log)
        log(f"  {name}: {verdict(data['coverage'][name])}")
        save()
    return 0


def _tv_version() -> str | None:
    try:
        import torchvision

        return torchvision.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
