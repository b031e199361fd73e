"""The training loop and the demo and benchmark drivers read in one sitting: no function there is longer
than `MAX_LINES` (a function's lines run from its `def` to its last line, docstring included).

Run as a script to list the longest functions of the whole package:

    python tests/test_function_length.py [COUNT]
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dynamicvit"
MAX_LINES = 80
CHECKED = sorted((SRC / "training").glob("*.py")) + [SRC / "demo.py", SRC / "runtime" / "bench.py"]


def function_lengths(paths, root: Path = SRC.parent) -> list[tuple[int, str]]:
    """(lines, "path:line name") of every function and method in `paths`, longest first."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def test_the_loop_and_the_drivers_have_no_long_function():
    lengths = function_lengths(CHECKED)
    assert len(lengths) > 50  # the files were found and parsed
    too_long = [f"{where} ({n} lines)" for n, where in lengths if n > MAX_LINES]
    assert not too_long, f"functions over {MAX_LINES} lines: {', '.join(too_long)}"


def test_a_function_counts_from_its_def_to_its_last_line(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    \"\"\"doc\"\"\"\n    x = 1\n\n    return x\n\n\nclass C:\n    def g(self):\n        pass\n")
    assert function_lengths([probe], root=tmp_path) == [(5, "probe.py:1 f"), (2, "probe.py:9 g")]


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    for n, where in function_lengths(sorted(SRC.rglob("*.py")))[:count]:
        print(f"{n:4d}  {where}")
