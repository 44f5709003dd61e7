"""The bench scripts use the public API only (a package's top-level `__all__`) and take --data-root for shared data."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name != "data_root.py")
PACKAGES = sorted(p.parent.name for p in (ROOT / "dfp_deploy").glob("*/__init__.py"))


def _public(package: str) -> set[str]:
    return set(getattr(importlib.import_module(f"dfp_deploy.{package}"), "__all__", ()))


def _off_api(tree: ast.AST) -> list[str]:
    """Each dfp_deploy import of `tree` that is not `from dfp_deploy.<package> import <name in its __all__>`."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.startswith("dfp_deploy.")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dfp_deploy":
            parts = node.module.split(".")
            if len(parts) == 1:
                bad += [f"dfp_deploy.{a.name}" for a in node.names if a.name not in PACKAGES]
            elif len(parts) > 2 or parts[1] not in PACKAGES:
                bad.append(node.module)
            else:
                public = _public(parts[1])
                bad += [f"{node.module}.{a.name}" for a in node.names if a.name not in public]
    return bad


def _reads_shared_data(source: str) -> bool:
    return "../shared" in source or "shared/" in source


def _takes_data_root(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == "add_data_root"
               for n in ast.walk(tree))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_imports_public_names_only(script):
    assert _off_api(ast.parse(script.read_text())) == []


READERS = [p for p in SCRIPTS if _reads_shared_data(p.read_text())]


def test_some_bench_scripts_read_shared_data():
    assert len(READERS) >= 5  # the check below would hold vacuously if the detection broke


@pytest.mark.parametrize("script", READERS, ids=lambda p: p.name)
def test_bench_script_reading_shared_data_takes_data_root(script):
    assert _takes_data_root(ast.parse(script.read_text()))


def test_the_check_catches_deep_and_unlisted_imports():
    tree = ast.parse("from dfp_deploy.compress.repair.apply import compress_model\nimport dfp_deploy.models.loader\n"
                     "from dfp_deploy.compress import _not_public\nfrom dfp_deploy import nowhere\n"
                     "from dfp_deploy.compress import compress_model\nfrom dfp_deploy import pipeline\n")
    assert _off_api(tree) == ["dfp_deploy.compress.repair.apply", "dfp_deploy.models.loader",
                              "dfp_deploy.compress._not_public", "dfp_deploy.nowhere"]
    assert not _takes_data_root(ast.parse("import argparse\nargparse.ArgumentParser()"))


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves(package):
    module = importlib.import_module(f"dfp_deploy.{package}")
    missing = [name for name in getattr(module, "__all__", ()) if not hasattr(module, name)]
    assert missing == []
