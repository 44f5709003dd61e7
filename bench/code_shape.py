"""The shape of the code: largest modules, longest functions and longest module docstrings, read with the AST.

    python bench/code_shape.py                  # the working tree's dfp_deploy/
    python bench/code_shape.py --rev a5ab4c8    # the package as committed at a git revision
    python bench/code_shape.py --top 15 --markdown

A function's length is its `end_lineno - lineno + 1` (decorators and docstring included); nested functions and
methods are counted on their own, named `outer.inner` / `Class.method`.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sources(package: str, rev: str | None) -> dict[str, str]:
    """path -> text of every .py file under `package`, from the working tree or from git at `rev`."""
    if rev is None:
        return {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / package).rglob("*.py"))}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "--", package], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    return {n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=REPO, check=True, capture_output=True,
                              text=True).stdout for n in names if n.endswith(".py")}


def functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, lines) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield prefix + node.name, node.end_lineno - start + 1
            yield from functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, prefix + node.name + ".")
        else:
            yield from functions(node, prefix)


def shape(package: str = "dfp_deploy", rev: str | None = None) -> dict:
    files = sources(package, rev)
    modules = sorted(((len(text.splitlines()), path) for path, text in files.items()), reverse=True)
    funcs, docs = [], []
    for path, text in files.items():
        tree = ast.parse(text)
        for name, lines in functions(tree):
            funcs.append((lines, f"{path}:{name}"))
        doc = ast.get_docstring(tree, clean=False)
        if doc:
            docs.append((len(doc.splitlines()), path))
    funcs.sort(reverse=True)
    docs.sort(reverse=True)
    return {"modules": modules, "functions": funcs, "docstrings": docs, "total_lines": sum(n for n, _ in modules),
            "n_modules": len(modules), "n_functions": len(funcs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default="dfp_deploy")
    ap.add_argument("--rev", default=None, help="a git revision (default: the working tree)")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--markdown", action="store_true", help="Markdown tables instead of plain text")
    args = ap.parse_args(argv)
    s = shape(args.package, args.rev)
    where = f"{args.package} at {args.rev}" if args.rev else f"{args.package} (working tree)"
    over = lambda limit: sum(1 for n, _ in s["functions"] if n > limit)  # noqa: E731
    print(f"{where}: {s['n_modules']} modules, {s['total_lines']:,} lines, {s['n_functions']} functions "
          f"({over(50)} over 50 lines, {over(100)} over 100)")
    for title, rows in (("largest modules", s["modules"]), ("longest functions", s["functions"]),
                        ("longest module docstrings", s["docstrings"])):
        print()
        if args.markdown:
            print(f"| lines | {title} |\n|---:|---|")
            for n, name in rows[:args.top]:
                print(f"| {n} | `{name}` |")
        else:
            print(title)
            for n, name in rows[:args.top]:
                print(f"  {n:5d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
