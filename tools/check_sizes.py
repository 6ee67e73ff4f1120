"""The house's size rules, checked by `make lint`: no module under fusion/ over 600 lines and no
function or method over 80 lines (decorators and docstring included).

    .venv/bin/python tools/check_sizes.py [--max-file 600] [--max-function 80] [PATH ...]

Prints one line per breach (path:line name length) and exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def breaches(path: Path, max_file: int, max_function: int) -> list[str]:
    text = path.read_text()
    out = []
    n_lines = len(text.splitlines())
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if n_lines > max_file:
        out.append(f"{rel}: {n_lines} lines (at most {max_file})")
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - start + 1
            if length > max_function:
                out.append(f"{rel}:{node.lineno} {node.name}: {length} lines (at most {max_function})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="check_sizes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "paths",
        nargs="*",
        type=Path,
        default=[ROOT / "fusion"],
        help="files or directories (default: fusion/)",
    )
    p.add_argument("--max-file", type=int, default=600, help="lines per module (default 600)")
    p.add_argument("--max-function", type=int, default=80, help="lines per function (default 80)")
    args = p.parse_args(argv)
    files = []
    for path in args.paths:
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    found = [line for f in files for line in breaches(f.resolve(), args.max_file, args.max_function)]
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
