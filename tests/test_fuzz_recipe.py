"""Seeded mutation fuzzing of recipes through the CLI: whatever the recipe, no traceback, and either the recipe is
accepted or the exit code is 2 with one line of at most 300 characters.

Each case starts from a valid recipe and mutates it: hostile values put at schema keys (NaN, Inf, huge or negative
integers, wrong types, long or broken strings and paths), structural damage to the YAML text (aliases, nesting,
duplicate sections, truncation, flipped bytes, non-UTF-8), `--set` overrides and unusable `--out` folders. The CLI
runs in-process; `pipeline.build` is replaced by a stand-in that checks what a valid recipe promises (every float
finite) and stops there, so no model is built. `python tests/test_fuzz_recipe.py` prints the outcome table.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import random
import re
import typing
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import dfp_deploy.pipeline
import dfp_deploy.recipe.resolve
from dfp_deploy.cli import MAX_MESSAGE, main
from dfp_deploy.recipe.schema import Recipe

CASES = 400
SEED = 20261207
BASE = {"model": {"name": "cifar_resnet20"}, "compress": {"prune": {"ratio": 0.5}, "reconstruct": "udfc"},
        "target": {"batch": 4}, "advanced": {"measure": {"runs": 50}}}


def _leaves(cls=Recipe, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], f.metadata


LEAVES = list(_leaves())
# values that no key accepts, whatever its type (None is accepted by optional keys, so it is not here; a nested
# mapping is a valid model.kwargs, so that key never gets one)
ALWAYS_BAD = [float("nan"), float("inf"), float("-inf"), -(10**30), -(2**64), {"a": {"b": 1}}, [[1, [2]]]]
NON_FINITE = [float("nan"), float("inf"), float("-inf"), "nan", "NaN", "-inf", "1e999"]
# values some keys accept and others refuse (10^30 is a valid advanced.measure.parity_tolerance: "no parity check")
SOMETIMES = [None, 0, 1, -1, 0.5, 1.5, 1e-300, 2**31, 2**64, 10**30, True, False, "", "x", "nan", "1e999", "a\nb",
             "é" * 20,
             "x" * 5000, "/dev/null/x", "../" * 40 + "x", "pypi:nope", "synthetic", "a\0b", [], [3, 32, 32],
             [1, 2, 3, 4], {}, {"k": 1}, "os:system", "torchvision:resnet18", "l2", "int8", "ort-cpu"]


def _valid_value(rng: random.Random, typ, meta):
    """A value the key accepts: a boundary of its range or one of its choices."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        typ = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Literal:
        return rng.choice(args)
    lo, hi = meta.get("lo"), meta.get("hi")
    if typ is bool:
        return rng.choice([True, False])
    if typ is int:
        lo = 0 if lo is None else lo
        return rng.choice([lo, lo + 1, hi if hi is not None else lo + 7])
    if typ is float:
        lo = 0.0 if lo is None else lo
        hi = lo + 10.0 if hi is None else hi
        return rng.choice([(lo + hi) / 2, lo + (hi - lo) * 0.25])
    return None  # str, list and dict keys: their valid values are in SOMETIMES


def _set(tree: dict, key: str, value) -> None:
    *path, leaf = key.split(".")
    for part in path:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _dump(tree) -> str:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, width=10_000)


def _structural(rng: random.Random, text: str) -> tuple[str | bytes, bool | None]:
    """Damage the YAML text itself; returns (text, surely_invalid), None where the damage may have removed what
    made the recipe invalid (a truncation, a flipped byte)."""
    kind = rng.randrange(9)
    if kind == 0:
        return text + "compress:\n  reconstruct: none\n", True  # a second section: duplicate key
    if kind == 1:
        return "a: &a [x, x]\n" + "".join(f"b{i}: &b{i} [*{'a' if i == 0 else f'b{i - 1}'}, *a]\n"
                                          for i in range(12)) + text + "seed: *b11\n", True
    if kind == 2:
        depth = rng.choice([40, 500, 5000])
        return text + "seed: " + "[" * depth + "]" * depth + "\n", True
    if kind == 3:
        return text[: rng.randrange(1, max(2, len(text)))], None  # truncated: may still parse
    if kind == 4:
        data = bytearray(text.encode())
        data[rng.randrange(len(data))] = rng.choice([0xFF, 0xC3, 0x80, 0x00, 0x09, ord(":"), ord("[")])
        return bytes(data), None
    if kind == 5:
        return rng.choice(["- a\n- b\n", "42\n", "'just a string'\n", "~\n", "[\n", "{a: 1\n"]), None
    if kind == 6:
        return text + f"{rng.choice(['bogus', 'model', 'compress'])}_{rng.randrange(99)}: 1\n", True
    if kind == 7:
        return text.replace("  ", "\t", 1), None
    return text + "target:\n  batch: 2\n", True  # duplicate section again, other key


def make_case(rng: random.Random, tmp: Path) -> tuple[list[str], bool]:
    """CLI arguments for one case, and whether the input is surely invalid (then exit 2 is required)."""
    tree = yaml.safe_load(_dump(BASE))
    sets: list[str] = []
    invalid = False
    chosen = rng.sample(LEAVES, rng.randint(1, 3))  # distinct keys: a later value would hide an earlier one
    for key, typ, meta in chosen:
        roll = rng.random()
        if roll < 0.3 and _valid_value(rng, typ, meta) is not None:
            value = _valid_value(rng, typ, meta)
        elif roll < 0.55 and key != "model.kwargs":
            value, invalid = rng.choice(NON_FINITE if typ is float else ALWAYS_BAD), True
        else:
            value = rng.choice(SOMETIMES)
        if rng.random() < 0.3:
            sets += ["--set", f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()}"
                     .replace("\n...", "")]
        else:
            _set(tree, key, value)
    text: str | bytes = _dump(tree)
    if rng.random() < 0.3:
        text, surely = _structural(rng, text)
        # damage that may have removed the invalid value leaves only "no crash, one line" to check
        invalid = False if surely is None else invalid or surely
    path = tmp / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = ["--out", str(tmp / "out")]
    if any(key == "output.dir" for key, *_ in chosen):
        out = []  # --out would override the mutated output.dir
    elif rng.random() < 0.1:
        out, invalid = ["--out", rng.choice(["/dev/null/x", "/proc/self/x", "o" * 300, str(tmp / ("o" * 240))])], True
    return ["build", str(path), *sets, *out, "--quiet"], invalid


class _Accepted(Exception):
    """Raised by the stand-in build: the recipe got through every check the CLI makes before building."""


def _stand_in_build(recipe, recipe_path=None, *, quiet=False, out=None, timed=True):
    """What a valid recipe promises the pipeline, checked instead of building: finite floats everywhere."""
    dfp_deploy.recipe.resolve.check_consistency(recipe)

    def walk(value, where):
        if isinstance(value, float):
            assert math.isfinite(value), f"{where} = {value} accepted"
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}")
    walk(dataclasses.asdict(recipe), "recipe")
    raise _Accepted


def classify(line: str) -> str:
    for pattern, label in [("not a finite number", "non-finite number"), (r"is not in [\[(]", "out of range"),
                           ("expected (an integer|a number|true or false|a string|a list|a mapping|a section|"
                            r"\d+ values)", "wrong type"),
                           ("must be set", "wrong type"), ("is not one of", "not a choice"),
                           ("unknown key", "unknown key"), ("duplicate key", "duplicate key"),
                           ("aliases", "YAML alias"), ("nested deeper", "too deep"),
                           ("not valid YAML|cannot be read|must be a mapping of sections", "not YAML / not a mapping"),
                           ("not UTF-8", "not UTF-8"), ("^error: (--out|output.dir)", "output folder"),
                           ("path|NUL|cannot resolve", "path")]:
        if re.search(pattern, line):
            return label
    return "other: " + line[7:50]


def run_cases(tmp: Path, n: int = CASES, seed: int = SEED) -> tuple[collections.Counter, list[str]]:
    """Run n cases; return the outcome counts and the failures (each a one-line description)."""
    real = dfp_deploy.pipeline.build
    assert list(inspect.signature(_stand_in_build).parameters) == list(inspect.signature(real).parameters)
    rng = random.Random(seed)
    runner = CliRunner()
    outcomes: collections.Counter = collections.Counter()
    failures: list[str] = []
    dfp_deploy.pipeline.build = _stand_in_build
    try:
        for i in range(n):
            case_dir = tmp / f"c{i}"
            case_dir.mkdir()
            args, invalid = make_case(rng, case_dir)
            res = runner.invoke(main, args, catch_exceptions=True)
            where = f"case {i} ({' '.join(a[:40] for a in args[2:])[:200]})"
            if isinstance(res.exception, _Accepted):
                outcomes["accepted"] += 1
                if invalid:
                    failures.append(f"{where}: invalid input accepted")
                continue
            if res.exception is not None and not isinstance(res.exception, SystemExit):
                failures.append(f"{where}: {type(res.exception).__name__}: {str(res.exception)[:200]}")
                continue
            lines = res.stderr.splitlines()
            if res.exit_code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") \
                    or len(lines[0]) > MAX_MESSAGE:
                failures.append(f"{where}: exit {res.exit_code}, stderr {res.stderr[:300]!r}")
                continue
            outcomes[f"exit 2: {classify(lines[0])}"] += 1
    finally:
        dfp_deploy.pipeline.build = real
    return outcomes, failures


def test_fuzzed_recipes_never_crash_and_fail_in_one_line(tmp_path):
    outcomes, failures = run_cases(tmp_path)
    assert failures == [], "\n".join(failures[:20])
    assert sum(outcomes.values()) == CASES
    # both sides of the oracle are exercised: valid recipes get through, hostile ones are refused for many reasons
    assert outcomes["accepted"] >= CASES // 20
    assert len([k for k in outcomes if k.startswith("exit 2")]) >= 8


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        counts, failed = run_cases(Path(tmp))
    print(f"{CASES} cases, seed {SEED}, {len(failed)} failures")
    print("| outcome | cases |\n|---|---:|")
    for outcome, count in counts.most_common():
        print(f"| {outcome} | {count} |")
    for f in failed[:20]:
        print(f)
