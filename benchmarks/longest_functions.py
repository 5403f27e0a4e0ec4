"""The longest functions and methods of the package and its command lines, by line count.

    python benchmarks/longest_functions.py [--top 10] [PATH ...]

Parses every .py file under the given paths (default: wyckoffgpt/, generate.py, train.py, data_prep/;
not the model-code copies in wyckoffgpt/pretrained/) with `ast` and counts each function's lines from
its `def` (decorators excluded) to its last line, docstring and comments included; a nested function is counted on its own and inside its parent.
Prints a table of the --top longest, then one JSON line: the count and median length of all
functions, and the top list (qualified name, file, first line, lines).
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PATHS = ("wyckoffgpt", "generate.py", "train.py", "data_prep")
# Model folders hold copies of the model's code (saved with the weights for trust_remote_code):
# counted once, in the package.
SKIPPED = ("wyckoffgpt/pretrained",)


def skipped(path: Path) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == s or rel.startswith(s + "/") for s in SKIPPED)


def python_files(paths: list[str]) -> list[Path]:
    """The .py files named or under the named folders, relative to the repository, sorted."""
    files: set[Path] = set()
    for name in paths:
        path = (REPO / name).resolve()
        if path.is_dir():
            files.update(p for p in path.rglob("*.py") if "__pycache__" not in p.parts and not skipped(p))
        elif path.suffix == ".py" and path.is_file():
            files.add(path)
        else:
            print(f"longest_functions.py: no Python file or folder {name!r}", file=sys.stderr)
            raise SystemExit(2)
    return sorted(files)


def functions(path: Path) -> list[dict]:
    """Every function and method of one file: qualified name, first line and line count."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[dict] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                found.append({"name": name, "file": str(path.relative_to(REPO)), "line": child.lineno,
                              "lines": child.end_lineno - child.lineno + 1})
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS),
                    help="files or folders relative to the repository (default: %(default)s)")
    ap.add_argument("--top", type=int, default=10, help="how many to list (default 10)")
    args = ap.parse_args()
    if args.top < 1:
        print("longest_functions.py: --top must be at least 1", file=sys.stderr)
        raise SystemExit(2)
    every = [f for path in python_files(args.paths) for f in functions(path)]
    top = sorted(every, key=lambda f: (-f["lines"], f["file"], f["line"]))[:args.top]
    print("| lines | function | where |")
    print("| --- | --- | --- |")
    for f in top:
        print(f"| {f['lines']} | `{f['name']}` | {f['file']}:{f['line']} |")
    lengths = [f["lines"] for f in every]
    print(json.dumps({"paths": args.paths, "functions": len(every),
                      "median_lines": statistics.median(lengths) if lengths else None, "top": top}))


if __name__ == "__main__":
    main()
