"""The golden builds (tests/test_golden.py): what each one builds, and a runner that builds them in the background.

Each build is a `dfp-deploy build` in its own process with one torch thread, as the test process runs (conftest.py),
started as soon as pytest has collected the golden tests (conftest.py), so that they run beside the rest of the suite
(which uses one core at a time), one per core.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BUILD_TIMEOUT_S = 1200


@dataclass(frozen=True)
class Build:
    recipe: str
    settings: tuple[str, ...] = ()
    why: str = "as shipped"
    needs_shared: bool = True


BUILDS = {
    "efficientnet_lite0_calibrate": Build(
        "efficientnet_lite0_calibrate.yaml",
        ("advanced.compress.prune.exclude=['_blocks.1[2-5]._expand_conv', '_conv_head']",
         "compress.calibration.samples=16",
         "advanced.compress.calibration.squeeze_epochs=1", "advanced.compress.calibration.calib_epochs=1",
         "advanced.eval.start=0",
         "eval.limit=100", "advanced.measure.parity_samples=8"),
        why="the 1152- and 1280-channel groups unpruned, 16 calibration images, one epoch per phase, top-1 on the "
            "first 100 images (5.5 minutes as shipped)"),
    # as shipped, the lmmse selection of the four 1152-channel expand groups and the 1280-channel head takes most of
    # the build's minutes: they are left unpruned here, every other group goes through the same selection and repair
    "efficientnet_lite0": Build(
        "efficientnet_lite0.yaml",
        ("advanced.compress.prune.exclude=['_blocks.1[2-5]._expand_conv', '_conv_head']", "advanced.eval.start=0",
         "eval.limit=100",
         "advanced.measure.parity_samples=8"),
        why="the 1152- and 1280-channel groups unpruned, top-1 on the first 100 images (minutes as shipped)"),
    "cifar_resnet56_calibrate": Build(
        "cifar_resnet56_calibrate.yaml",
        ("compress.calibration.samples=64", "advanced.compress.calibration.squeeze_epochs=1",
         "advanced.compress.calibration.calib_epochs=1", "eval.limit=300"),
        why="64 calibration images and one epoch per phase instead of 1024 and two (minutes as shipped), top-1 on "
            "300 of the 932 images"),
    # int8 Q/DQ engine with activation ranges from the BatchNorm statistics (no data), on the headline recipe
    "cifar_resnet56_int8": Build("cifar_resnet56.yaml", ("target.precision=int8",),
                                 why="the shipped recipe as a data-free int8 engine"),
    # not fewer: 16 inputs of 10 steps adapt the statistics worse than none (30 % top-1 on 300 images, where the plan
    # without adaptation keeps 52 % on all 932), a regime that would pin noise rather than the method
    "cifar_resnet56_half": Build(
        "cifar_resnet56_half.yaml", ("compress.bn_adapt.samples=32", "advanced.compress.bn_adapt.synthetic_steps=20"),
        why="BatchNorm re-estimated on 32 synthetic inputs of 20 steps instead of 256 of 200 (5 minutes)"),
    "cifar_resnet56": Build("cifar_resnet56.yaml"),
    # the documented 3-bit setting (docs/BENCHMARKS.md): UDFC + bias correction, stem and classifier at 8 bits
    "cifar_resnet56_w3": Build(
        "cifar_resnet56.yaml",
        ("compress.prune.ratio=0", "compress.reconstruct=udfc", "compress.quantize.weight_bits=3",
         "advanced.compress.quantize.first_last_bits=8", "advanced.compress.quantize.bias_correction=true"),
        why="3-bit weights, no pruning: the documented mixed-precision setting"),
    # the random-weight quickstart reads no files; its rounding is pinned because the default follows the CPU
    # (8 with AVX2, 16 with AVX-512) and the plan must not depend on the machine
    "quickstart": Build("quickstart.yaml", ("compress.prune.round_to=8",),
                        why="as shipped, channel rounding pinned to 8 (the AVX2 default)", needs_shared=False),
}

# the longest builds early, and the builds that share exports after the build that stores them: the Lite0 builds
# share the original, cifar_resnet56_int8 the compressed model (and its template), w3 the original's template
START_ORDER = ("cifar_resnet56", "efficientnet_lite0", "efficientnet_lite0_calibrate", "cifar_resnet56_int8",
               "cifar_resnet56_calibrate", "cifar_resnet56_half", "cifar_resnet56_w3", "quickstart")
assert sorted(START_ORDER) == sorted(BUILDS)

# the child: one torch thread like the test process, and its own CPU seconds written for the summary
_CHILD = """import sys, time, atexit, torch
torch.set_num_threads(1)
cpu_file, sys.argv = sys.argv[1], ["dfp-deploy", *sys.argv[2:]]
atexit.register(lambda: open(cpu_file, "w").write(f"{time.process_time():.1f}"))
from dfp_deploy.cli import main
main()
"""


def _child_setup() -> None:
    """In the build process before it starts: lower priority, and (Linux) killed when pytest dies.

    Nice 10: the builds fill whatever the cores leave, while the rest of the suite, a single process that waits on
    each test in turn, keeps a core to itself; at equal priority three processes share two cores and the suite's
    own tests, the longest chain, run at two thirds of a core. A killed pytest runs no clean-up of its own, hence
    the parent-death signal."""
    try:
        os.nice(10)
    except OSError:
        pass
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class Done:
    name: str
    out: Path
    returncode: int
    output: str
    wall_s: float
    cpu_s: float | None


def available(name: str) -> bool:
    return not BUILDS[name].needs_shared or SHARED.is_dir()


class Runner:
    """Starts the named builds at once (a few at a time) and hands each one over when it has finished."""

    def __init__(self, names: list[str], workers: int):
        self.dir = Path(tempfile.mkdtemp(prefix="dfp-golden-"))
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="golden")
        # the longest first, but never two builds of one model side by side at the start: the second then reuses
        # the first's ONNX export of the unchanged original from the shared cache instead of repeating it
        self._futures: dict[str, Future] = {n: self._pool.submit(self._build, n) for n in START_ORDER
                                            if n in names and available(n)}

    def _build(self, name: str) -> Done:
        build, work = BUILDS[name], self.dir / name
        work.mkdir()
        args = ["build", str(ROOT / "recipes" / build.recipe), "--out", str(work / "out"), "--quiet",
                "--set", "measure.latency=false"]
        for setting in build.settings:
            args += ["--set", setting]
        # one cache for this run's builds, never a user's (written by older code): synthetic inputs are generated
        # afresh and ONNX exports shared between builds of one model (both caches are keyed by content)
        env = {**os.environ, "XDG_CACHE_HOME": str(self.dir / "cache")}
        start = time.perf_counter()
        with self._lock:
            if self._closed:
                raise RuntimeError("the golden runner was closed")
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(work / "cpu_s"), *args], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    preexec_fn=_child_setup)
            self._procs.add(proc)
        try:
            output, _ = proc.communicate(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            output += f"\n(killed after {BUILD_TIMEOUT_S} s)"
        finally:
            with self._lock:
                self._procs.discard(proc)
        cpu = work / "cpu_s"
        return Done(name, work / "out", proc.returncode, output, time.perf_counter() - start,
                    float(cpu.read_text()) if cpu.is_file() else None)

    def result(self, name: str) -> Done:
        if name not in self._futures:  # not collected at start (e.g. a rerun of one test): build it now
            self._futures[name] = self._pool.submit(self._build, name)
        return self._futures[name].result()

    def finished(self) -> list[Done]:
        return [f.result() for f in self._futures.values() if f.done() and not f.exception()]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for proc in self._procs:
                proc.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.dir, ignore_errors=True)


_runner: Runner | None = None


def start(names: list[str], workers: int) -> Runner:
    global _runner
    if _runner is None:
        _runner = Runner(names, workers)
    return _runner


def runner() -> Runner:
    return start([], 1)


def stop() -> Runner | None:
    global _runner
    done, _runner = _runner, None
    if done is not None:
        done.close()
    return done
