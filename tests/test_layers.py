"""The package's layers: every import inside `pipeline` points down the data flow, and none goes in a circle.

The table below is the one docs/ARCHITECTURE.md draws, lowest layer first. A
module may import its own layer and the layers listed before it, never one
listed after it: data knows nothing of models, stage one nothing of stage two,
evaluation nothing of the jobs that call it. Imports inside functions count
too (they are how circles used to hide), and so do modules imported as names
(`from pipeline import x`).
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

# Lowest first. A module belongs to the longest prefix it starts with.
LAYERS = (
    ("pipeline", "pipeline.progress", "pipeline.threads", "pipeline.schema"),  # root, progress bar, OpenMP policy,
                                                                              # the typed-settings helpers
    ("pipeline.data",),                 # benchmark records and readers
    ("pipeline.models",),               # model families, loading, prompts, tokenisation, forward passes
    ("pipeline.config",),               # every setting: defaults, YAML, overrides, ranges
    ("pipeline.cache",),                # the reference cache's format, its fingerprint, inspection
    ("pipeline.stage1",),               # viker precompute
    ("pipeline.stage2",),               # viker train (and the knowledge injection that makes the vanilla model)
    ("pipeline.evaluation",),           # viker evaluate, its metrics, attacks and the CLEAR protocol
    ("pipeline.jobs",),                 # config -> stage arguments, worker processes, the demo and its report
    ("pipeline.study",),                # the study grid and its report
    ("pipeline.cli",),                  # the viker command
)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            exact_only = name == "pipeline"   # the root holds only its own __init__
            if module == name or (not exact_only and module.startswith(name + ".")):
                if len(name) > best_len:
                    best, best_len = i, len(name)
    if best is None:
        raise AssertionError(f"module {module} is in no layer of tests/test_layers.py: add it to LAYERS")
    return best


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=None)
def import_statements(source: str) -> tuple[ast.stmt, ...]:
    """Every import statement of a source, nested ones too (parsed once: each test reads the whole package)."""
    return tuple(node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom)))


def imports_of(module: str, source: str, is_package: bool, modules: set[str]) -> set[str]:
    """The pipeline modules `module` imports, relative imports resolved, `from pkg import mod` as mod."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in import_statements(source):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pipeline":
                continue
            named = {f"{target}.{a.name}" for a in node.names} & modules
            found |= named or {target}
    return found - {module}


def import_graph(extra: dict[str, str] | None = None) -> dict[str, set[str]]:
    """module -> the pipeline modules it imports, read from the sources (plus `extra`: name -> source)."""
    sources = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        sources[module_name(path, PACKAGE)] = (path.read_text(), path.name == "__init__.py")
    for name, text in (extra or {}).items():
        sources[name] = (text, False)
    modules = set(sources)
    return {m: imports_of(m, text, is_pkg, modules) for m, (text, is_pkg) in sources.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {LAYERS[layer_of(m)][0]}) imports {t} (layer {LAYERS[layer_of(t)][0]})"
                  for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each as the modules along it (depth-first search over the graph)."""
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if t not in graph:
                continue
            if state.get(t) == "open":
                found.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_every_module_has_a_layer_and_imports_point_down():
    graph = import_graph()
    assert len(graph) > 40          # the parser did read the package
    assert upward_imports(graph) == []


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_an_added_upward_import_is_caught():
    # What the check reports if data (or stage one) reached for stage two, spelled either way.
    before = set(upward_imports(import_graph()))
    absolute = {"pipeline.data.bad": "def f():\n    from pipeline.stage2.train import train\n"}
    relative = {"pipeline.stage1.bad": "from ..stage2 import losses\n"}
    assert set(upward_imports(import_graph(absolute))) - before == {
        "pipeline.data.bad (layer pipeline.data) imports pipeline.stage2.train (layer pipeline.stage2)"}
    assert set(upward_imports(import_graph(relative))) - before == {
        "pipeline.stage1.bad (layer pipeline.stage1) imports pipeline.stage2.losses (layer pipeline.stage2)"}


def test_an_added_circle_is_caught():
    pair = {"pipeline.evaluation.a": "from . import b\n", "pipeline.evaluation.b": "from .a import x\n"}
    assert ["pipeline.evaluation.a", "pipeline.evaluation.b", "pipeline.evaluation.a"] in circles(import_graph(pair))


def test_each_subpackage_says_what_it_owns_and_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 200, f"{init} needs its docstring: what the folder owns and what it may import"
        assert "may import" in doc.lower(), f"{init}'s docstring does not say what the folder may import"


def test_architecture_doc_has_a_line_for_every_module():
    # docs/ARCHITECTURE.md lists each module under its folder's heading: a new module must be added there.
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    listed, folder = set(), None
    for line in doc.split("## A line a module", 1)[1].split("\n## ", 1)[0].splitlines():
        if line.startswith("### "):   # `folder/` or a heading of the package root
            name = line[4:].strip().strip("`")
            folder = name.rstrip("/") if name.endswith("/") else ""
        elif line.startswith("- `") and folder is not None:
            listed.add(f"{folder}/{line[3:].split('`')[0]}".lstrip("/"))
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    top = {"config.py", "cli.py"}    # headed by their own name, described by a plain line
    assert modules - listed - top == set()
    assert listed - modules - {"__init__.py"} == set()
