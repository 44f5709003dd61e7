"""Every recipe key the code names (error messages, help texts, docstrings) exists in the recipe schema."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from dfp_deploy.recipe.loader import iter_keys
from dfp_deploy.recipe.schema import RENAMED_KEYS

PACKAGE = Path(__file__).resolve().parent.parent / "dfp_deploy"
SECTIONS = ("model", "compress", "search", "export", "target", "measure", "eval", "output", "advanced")
# a dotted name starting with a section, not part of a module path, a file path or a call (model.state_dict())
KEY = re.compile(r"(?<![\w./:-])(?:%s)(?:\.[a-z0-9_]+)+(?![\w(])" % "|".join(SECTIONS))
# an f-string that builds a key from a section prefix: the test could not check it, so keys are written whole
TEMPLATED = re.compile(r"(?<![\w./:-])(?:%s)(?:\.[a-z0-9_]+)*\.$" % "|".join(SECTIONS))
FILE_SUFFIXES = {"pt", "pth", "th", "onnx", "json", "plan", "yaml", "npz", "txt", "md", "py"}


def _named_keys():
    """(file, line, name, templated) for every key-like name in a string constant of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for name in KEY.findall(node.value):
                    yield path, node.lineno, name, False
            elif isinstance(node, ast.JoinedStr):
                for piece, nxt in zip(node.values, node.values[1:]):
                    if (isinstance(piece, ast.Constant) and isinstance(nxt, ast.FormattedValue)
                            and TEMPLATED.search(piece.value)):
                        yield path, node.lineno, piece.value.split()[-1] + "{...}", True


def test_every_key_named_in_the_code_exists():
    keys = {k for k, *_ in iter_keys()}
    sections = {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}
    dict_keys = {k for k, type_, *_ in iter_keys() if type_.startswith("dict")}  # model.kwargs.<name>
    bad = []
    for path, line, name, templated in _named_keys():
        where = f"{path.relative_to(PACKAGE.parent)}:{line}"
        if path.name == "schema.py" and name in RENAMED_KEYS:
            continue  # the rename table names the old paths it answers
        if templated:
            bad.append(f"{where}: key built from a prefix ({name}); write the whole key")
        elif (name not in keys and name not in sections and name.rsplit(".", 1)[-1] not in FILE_SUFFIXES
              and not any(name.startswith(d + ".") for d in dict_keys)):
            bad.append(f"{where}: {name} is not a recipe key")
    assert not bad, "\n".join(bad)
