"""The README's "Your own model, end to end" example, run as written in an empty folder: its files are written from
the README's code blocks and its shell lines run in a fresh process, so the README cannot drift from what works."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- readme-example: custom-model -->", "<!-- /readme-example -->"


def example() -> tuple[dict[str, str], list[str]]:
    """({file name: text}, [shell commands]) of the README example."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(START) + len(START):text.index(END)]
    files, commands = {}, []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S):
        if lang == "bash":
            commands += [line for line in body.splitlines() if line.strip() and not line.startswith("#")]
        else:
            name = body.splitlines()[0].lstrip("# ").strip()
            files[name] = body
    return files, commands


def _command(line: str) -> str:
    # the checkout's interpreter and CLI, whatever is first on PATH
    python = shlex.quote(sys.executable)
    if line.startswith("dfp-deploy "):
        return f"{python} -c 'from dfp_deploy.cli import main; main()' {line[len('dfp-deploy '):]}"
    if line.startswith("python "):
        return f"{python} {line[len('python '):]}"
    return line


@pytest.mark.slow
def test_the_readme_custom_model_example_runs_as_written(tmp_path):
    files, commands = example()
    assert set(files) == {"mynet.py", "mymetric.py", "recipe.yaml"} and commands[-1].startswith("dfp-deploy build")
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    # PYTHONPATH holds the checkout only: mynet and mymetric are found in the recipe's folder, as the README says
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for line in commands:
        res = subprocess.run(_command(line), shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, (line, res.stdout, res.stderr)
    assert "mymetric:score {top1_percent" in res.stdout
    r = json.loads((tmp_path / "runs" / "mynet" / "report.json").read_text())
    assert set(r["accuracy"]["after"]) == {"top1_percent", "box_l1"} and r["accuracy"]["metric"] == "mymetric:score"
    assert list(r["parity"]["outputs"]) == ["classes", "box"] and r["parity"]["rule"]["passed"]
    assert all(o["informative"] for o in r["parity"]["outputs"].values())
    assert r["macs"]["after"] < r["macs"]["before"]


def test_the_factory_module_is_found_in_the_recipe_folder_and_only_there(tmp_path):
    """The recipe's folder is searched after sys.path and removed from it after the build (core/user_code.py)."""
    from dfp_deploy.core.user_code import importable_from, resolve_function

    (tmp_path / "only_here_metric.py").write_text("def f(run, data):\n    return 1.0\n")
    with importable_from(tmp_path):
        assert sys.path[-1] == str(tmp_path.resolve())
        assert resolve_function("only_here_metric:f", "eval.metric")(None, None) == 1.0
    assert str(tmp_path.resolve()) not in sys.path
