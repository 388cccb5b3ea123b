"""The layers of docs/architecture.md: every import of ours points down (or sideways inside a layer),
nothing imports an entry script, dataset.py and models/ know nothing of each other, and there are no
import cycles."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {  # lower numbers are lower layers
    0: {"util", "safe_io", "download", "runlock", "runtime", "console"},
    1: {"presets", "option"},
    2: {"images", "dataset", "demo_data", "personal_data", "flickr_aes", "models", "onnx_model"},
    3: {"engine", "run_data", "scoring", "result_files", "ray_scoring", "report", "image_check", "cache", "augment",
        "export", "webapp",
        "ablation", "personalize"},
    4: {"main_nni", "predict", "serve", "report.__main__", "tools"},
}
FORBIDDEN = {("dataset", "models"), ("models", "dataset"), ("images", "models"), ("models", "images"),
             ("option", "*")}


def module_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts
    if parts[0] in ("models", "tools"):
        return parts[0]
    if parts[0] == "report":
        return "report.__main__" if parts[-1] == "__main__" else "report"
    return parts[0]


def layer(module: str) -> int:
    for number, members in LAYERS.items():
        if module in members:
            return number
    raise AssertionError(f"module {module!r} is in no layer of docs/architecture.md")


def our_imports(path: Path, ours: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if name.startswith("report.__main__"):
                top = "report.__main__"
            if top in ours:
                found.add(top)
    return found


def graph() -> dict[str, set[str]]:
    files = [p for p in REPO.rglob("*.py") if p.relative_to(REPO).parts[0] not in ("tests", "docs", ".git")
             and not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    ours = {module_of(p) for p in files} | {"report.__main__"}
    edges: dict[str, set[str]] = {}
    for path in files:
        source = module_of(path)
        edges.setdefault(source, set()).update(our_imports(path, ours) - {source})
    return edges


def test_every_import_points_down_the_layers():
    bad = []
    for source, targets in graph().items():
        for target in targets:
            if layer(target) > layer(source) or (source, target) in FORBIDDEN or (source, "*") in FORBIDDEN:
                bad.append(f"{source} (layer {layer(source)}) imports {target} (layer {layer(target)})")
            if layer(target) == 4:
                bad.append(f"{source} imports the entry script {target}")
    assert not bad, bad


def test_there_are_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(trail + [node, nxt])}")
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_every_module_is_placed_in_a_layer():
    for module in graph():
        layer(module)
