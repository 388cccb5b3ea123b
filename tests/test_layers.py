"""The layers of docs/architecture.md: every import of ours points down (or sideways inside a layer),
nothing imports an entry script, dataset.py and models/ know nothing of each other, and there are no
import cycles."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES_BY_MODULE = ("helpers", "imagedata", "scoring", "training", "paper")  # each of their modules is placed
LAYERS = {  # lower numbers are lower layers
    0: {"util", "helpers.safe_io", "helpers.download", "helpers.runlock", "helpers.runtime", "helpers.console",
        "helpers.preprocessing", "helpers"},
    1: {"option"},
    2: {"dataset", "imagedata.images", "imagedata.image_check", "imagedata.cache", "imagedata.augment",
        "imagedata.flickr_aes", "imagedata.demo_data", "imagedata.personal_data", "imagedata", "models"},
    3: {"training.engine", "training.run_data", "scoring", "scoring.errors", "scoring.inputs", "scoring.scorer",
        "scoring.results", "scoring.result_log", "scoring.onnx_model",
        "scoring.onnx_export", "scoring.ray_engine", "report", "webapp",
        "paper.ablation", "paper.personalize", "training", "paper"},
    4: {"main_nni", "predict", "serve", "report.__main__", "tools"},
}
REPORT_PUBLIC = {"report.__init__", "report.build", "report.attention", "report.__main__"}  # usable from outside
DATA = {m for m in LAYERS[2] if m != "models"}  # dataset.py and imagedata/
FORBIDDEN = {*((d, "models") for d in DATA), *(("models", d) for d in DATA), ("option", "*")}


def module_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts
    if parts[0] in ("models", "tools", "webapp"):
        return parts[0]
    if parts[0] == "report":
        return "report.__main__" if parts[-1] == "__main__" else "report"
    if parts[0] in PACKAGES_BY_MODULE:
        return parts[0] if parts[-1] == "__init__" else ".".join(parts[:2])
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
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in PACKAGES_BY_MODULE:
            names = [f"{node.module}.{alias.name}" for alias in node.names]  # from helpers import runtime
        for name in names:
            parts = name.split(".")
            top = ".".join(parts[:2]) if parts[0] in PACKAGES_BY_MODULE else parts[0]
            if name.startswith("report.__main__"):
                top = "report.__main__"
            if top not in ours and parts[0] in ours:
                top = parts[0]  # a name from a package's __init__
            if top in ours:
                found.add(top)
    return found


def our_files() -> list[Path]:
    return [p for p in REPO.rglob("*.py") if p.relative_to(REPO).parts[0] not in ("tests", "docs", ".git")
            and not any(part.startswith(".") for part in p.relative_to(REPO).parts)]


def graph() -> dict[str, set[str]]:
    files = our_files()
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


def test_code_outside_the_report_uses_only_its_public_modules():
    """The library (``report``, ``report.build``) and the web page's figure (``report.attention``); never the
    report's internals (its passes, figures, page...)."""
    internals = {f"report.{p.stem}" for p in (REPO / "report").glob("*.py")} - REPORT_PUBLIC
    bad = []
    for path in our_files():
        if path.relative_to(REPO).parts[0] == "report":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            bad += [f"{path.relative_to(REPO)} imports {name}" for name in names if name in internals]
    assert not bad, bad


def test_every_module_is_placed_in_a_layer():
    for module in graph():
        layer(module)


def test_library_code_takes_arguments_not_the_command_line_parser():
    """Only entry scripts (and option.py's own tests) read option.py: the library packages (data, models,
    training, scoring, the report's library, the web app, the paper's tables) get what they need as arguments."""
    library = {m for number in (2, 3) for m in LAYERS[number]}
    bad = sorted(source for source, targets in graph().items() if source in library and "option" in targets)
    assert not bad, f"library modules that import option.py: {bad}"


def test_the_root_holds_the_design_names_and_few_others():
    """``ls`` tells the architecture: the design's names, the entry scripts and a few packages named for
    their jobs (at most 14 importable names)."""
    importable = {p.stem for p in REPO.glob("*.py")} | {p.name for p in REPO.iterdir()
                                                         if p.is_dir() and (p / "__init__.py").is_file()}
    design = {"main_nni", "dataset", "option", "util", "models", "predict", "serve"}
    assert design <= importable, design - importable
    assert len(importable) <= 14, sorted(importable)
