"""The int8 gate on the zoo's int8 builds: each engine against its simulated quantization, RMS error / RMS.

python bench/zoo_int8_gate.py --work /tmp/dfp-zoo      # after bench/zoo_coverage.py left its <model>-int8 folders
Rebuilds nothing: reads each build's model.int8.onnx, builds the ORT-CPU int8 engine and the simulation (the Q/DQ
graph as float ops, backends/ort.py) on one thread and compares them on 4 seeded Gaussian inputs with the build's
own parity code (measure/parity.py `int8_verdict`). No torchvision needed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from dfp_deploy.backends import get_backend, simulation
from dfp_deploy.measure import INT8_MAX_REL_RMS, check_parity as parity, int8_verdict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mdtable import markdown  # noqa: E402  (bench/mdtable.py)


class _OneByOne:
    """A static-batch-1 engine fed a batch row by row."""

    def __init__(self, name: str, run):
        self.name, self._run = name, run

    def run(self, x: np.ndarray):
        return np.concatenate([self._run(x[i:i + 1]) for i in range(len(x))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dfp-zoo"))
    ap.add_argument("--samples", type=int, default=4)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for folder in sorted(args.work.glob("*-int8")):
            path = folder / "model.int8.onnx"
            if not path.is_file():
                continue
            engine = get_backend("ort-cpu").build(path, precision="int8", threads=1, out_dir=Path(tmp))
            shape = [d if isinstance(d, int) else 1 for d in engine.session.get_inputs()[0].shape]
            x = np.random.default_rng(0).standard_normal((args.samples, *shape[1:]), dtype=np.float32)
            result = parity(_OneByOne("simulation", simulation("int8", path, 1).run).run,
                            _OneByOne("engine", engine.run), x)
            worst = max(result["outputs"].values(), key=lambda o: o["rel_rms"])
            rows.append([folder.name.removesuffix("-int8"), f"{worst['rel_rms']:.2e}", f"{worst['rel_err']:.2e}",
                         "yes" if int8_verdict(result)["passed"] else "NO"])
            print(*rows[-1], flush=True, file=sys.stderr)
    print(markdown(["model", "RMS error / RMS", "max error / max", f"passes (≤ {INT8_MAX_REL_RMS:g})"], rows))


if __name__ == "__main__":
    main()
