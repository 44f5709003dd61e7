"""Interrupt matrix: signal × build stage → exit code, previous output intact, leftovers (docs/research/hardening.md).

Each cell is a real `dfp-deploy build` subprocess on a recipe (the quickstart by default) whose output folder
holds a previous output (marked, with a file of the user's). The signal is sent a given delay after the stage's
progress line appears on stderr. After the process ends the tool records its exit code, whether the previous
output is byte-identical (or, if the build finished first, whether the new output kept the user's file), what
was left next to the output folder, and for SIGKILL (which nothing can handle) whether the next build's stale
cleanup removes the leftovers.

    .venv/bin/python bench/interrupt_matrix.py [--recipe recipes/quickstart.yaml] [--jobs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfp_deploy.core import remove_stale, write_marker  # noqa: E402

# (label, progress-line prefix, seconds after it)
STAGES = [("1 load model", "[1/8]", 0.0), ("2 analyse", "[2/8]", 0.3), ("3 compress", "[3/8]", 0.3),
          ("4 export +0.2 s", "[4/8]", 0.2), ("4 export +1 s", "[4/8]", 1.0), ("4 export +2 s", "[4/8]", 2.0),
          ("4 export +4 s", "[4/8]", 4.0), ("5 engines", "[5/8]", 0.1), ("6 parity", "[6/8]", 0.1),
          ("7 timing", "[7/8]", 0.5), ("8 accuracy/report", "[8/8]", 0.0)]
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL]


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _previous(out: Path) -> dict:
    out.mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"previous engine")
    (out / "report.json").write_text('{"previous": true}\n')
    write_marker(out)
    (out / "notes.txt").write_text("the user's")
    return _tree(out)


def cell(recipe: Path, sig: signal.Signals, label: str, line: str, delay: float, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="dfp-int-") as tmp:
        out = Path(tmp) / "out"
        before = _previous(out)
        cmd = [sys.executable, "-m", "dfp_deploy.cli", "build", str(recipe), "--out", str(out), *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        seen = []
        while not any(s.startswith(line) for s in seen):
            text = proc.stderr.readline()
            if not text:
                break
            seen.append(text)
        time.sleep(delay)
        sent = proc.poll() is None
        if sent:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=600)
        messages = [s.strip() for s in seen + err.splitlines() if s.strip() and not s.startswith("[")]
        after = _tree(out) if out.is_dir() else None
        finished = after is not None and after.get("model.onnx") != before["model.onnx"]
        leftovers = sorted(p.name for p in Path(tmp).iterdir() if p.name != "out")
        cleaned = None
        if leftovers:
            remove_stale(out)  # what the next build does first
            cleaned = sorted(p.name for p in Path(tmp).iterdir() if p.name != "out") == []
        return {"signal": sig.name, "stage": label, "sent": sent, "exit": proc.returncode,
                "previous_intact": after == before, "finished": finished,
                "user_file_kept": after is not None and after.get("notes.txt") == b"the user's",
                "leftovers": leftovers, "cleaned_by_next_build": cleaned,
                "message": messages[-1] if messages else "", "lines": len(messages),
                "traceback": any("Traceback" in m for m in messages)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    extra = [x for kv in a.overrides for x in ("--set", kv)]
    jobs = [(sig, *stage) for stage in STAGES for sig in SIGNALS]
    started = time.time()
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda j: cell(a.recipe, *j, extra), jobs))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{len(rows)} cells in {time.time() - started:.0f} s, recipe {a.recipe.name} {' '.join(extra)}")
    print("| stage | " + " | ".join(s.name for s in SIGNALS) + " |")
    print("|---|" + "---|" * len(SIGNALS))
    for label, *_ in STAGES:
        cells = []
        for sig in SIGNALS:
            r = next(r for r in rows if r["stage"] == label and r["signal"] == sig.name)
            if r["finished"]:
                state = "finished first" + ("" if r["user_file_kept"] else ", USER FILE LOST")
            else:
                state = "intact" if r["previous_intact"] else "PREVIOUS CHANGED"
            left = ("none" if not r["leftovers"] else
                    f"{len(r['leftovers'])} left, " + ("cleaned by next build" if r["cleaned_by_next_build"]
                                                      else "NOT CLEANED"))
            bad = (", TRACEBACK" if r["traceback"] else "") + (f", {r['lines']} lines" if r["lines"] > 1 else "")
            cells.append(f"{r['exit']}, {state}, {left}{bad}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
