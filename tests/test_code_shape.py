"""The shape of the code that review alone does not hold: a function longer than 80 lines says why in its
docstring ("Long because ..."), so a long function is a decision, not an accident."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mae"
MAX_LINES = 80


def long_functions_without_a_reason(root: Path) -> list[str]:
    """`path:line name (N lines)` of every function over MAX_LINES whose docstring gives no reason."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                doc = " ".join((ast.get_docstring(node) or "").split())
                if length > MAX_LINES and "Long because" not in doc and "on purpose" not in doc:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_every_function_over_80_lines_says_why():
    assert not long_functions_without_a_reason(SRC)


def test_the_check_finds_a_long_function_without_a_reason(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "long.py").write_text(f'def f():\n    """Does much."""\n{body}\n')
    (tmp_path / "fine.py").write_text(f'def g():\n    """Does much. Long because it must."""\n{body}\n')
    assert long_functions_without_a_reason(tmp_path) == [f"{tmp_path.name}/long.py:1 f ({MAX_LINES + 2} lines)"]
