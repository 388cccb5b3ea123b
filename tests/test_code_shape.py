"""The shape of the code: each job in one place. No function is longer than MAX_FUNCTION_LINES, no two
modules share a file name, and there is one DataError.

A function's length is its own span: from its ``def`` line (decorators not counted) to the last line of
its body, nested functions included in their parent's span (they are lines of the parent)."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
NOT_OURS = ("tests", "docs", "data", "checkpoints", "runs", "experiments")


def project_files(root: Path = REPO) -> list[Path]:
    """Every .py file of the project outside the tests (and outside hidden, data and output folders)."""
    return sorted(p for p in root.rglob("*.py")
                  if p.relative_to(root).parts[0] not in NOT_OURS
                  and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(root).parts))


def function_spans(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines from def to the body's end) of every function and method in ``path``."""
    spans = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                spans.append((f"{prefix}{child.name}", child.end_lineno - child.lineno + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return spans


def long_functions(root: Path = REPO, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    return [f"{p.relative_to(root)}:{name} ({n} lines)" for p in project_files(root) for name, n in function_spans(p)
            if n > limit]


def test_the_span_counts_from_def_to_the_end_of_the_body(tmp_path):
    code = tmp_path / "m.py"
    code.write_text("@decorator\ndef f():\n    def g():\n        pass\n    return g\n\n\nclass C:\n    def m(self):\n"
                    "        x = 1\n        return x\n")
    assert function_spans(code) == [("f", 4), ("f.g", 2), ("C.m", 3)]


def test_the_check_finds_a_long_function(tmp_path):
    (tmp_path / "long.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    (tmp_path / "short.py").write_text("def f():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1))
    assert long_functions(tmp_path) == [f"long.py:f ({MAX_FUNCTION_LINES + 1} lines)"]


def test_no_function_is_longer_than_the_limit():
    assert not long_functions(), f"functions over {MAX_FUNCTION_LINES} lines: {long_functions()}"


def test_no_two_modules_share_a_name():
    """``export.py`` twice (or a module and a package of one name) would be ambiguous in logs, tracebacks
    and conversations; ``__init__`` and ``__main__`` are a package's own and do not count."""
    places = defaultdict(list)
    for path in project_files():
        rel = path.relative_to(REPO)
        if path.stem not in ("__init__", "__main__"):
            places[path.stem].append(str(rel))
        elif path.stem == "__init__" and len(rel.parts) > 1:
            places[rel.parts[-2]].append(str(rel.parent) + "/")
    same = {name: where for name, where in places.items() if len(where) > 1}
    assert not same, same


def test_there_is_one_data_error():
    defined = [f"{p.relative_to(REPO)}:{node.lineno}" for p in project_files()
               for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
               if isinstance(node, ast.ClassDef) and node.name == "DataError"]
    assert len(defined) == 1, defined
