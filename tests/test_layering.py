"""The import graph reads one way: cli / sweep -> recipe -> train | infer -> hub... -> data | model ->
infrastructure -> config and the other bottom modules, with no arrow back up, no arrow between
siblings that must not know each other, and no circle inside a package (docs/design.md).

Read from the source (every `import`, also those inside functions and under TYPE_CHECKING), so a lazy
import cannot hide an arrow."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

import xlsr_jax

PACKAGE = Path(xlsr_jax.__file__).parent

# Rooms, lowest first: a module may import its own room and any room of a lower rank. Rooms of the same
# rank do not import each other.
RANKS = {
    "errors": 0,
    "text": 1,
    "config": 2,
    "rundir": 3, "atomic": 3,
    "plots": 4, "parallel": 4, "checkpoint": 4, "aot": 4, "malloc": 4, "backend": 4,
    "data": 5, "model": 5,  # siblings: the CTC frame rule comes into data/ as a function (frames_fn)
    "train": 6, "infer": 6,  # siblings: the trainer gets evaluation and export as `Tasks`
    "hub": 7,  # exports and checks with infer/'s loader and LM decoder
    "pretrain": 7,  # a road on the trainer: an Objective for train/'s loop (never imports infer/ or hub/)
    "recipe": 8,
    "sweep": 9,
    "cli": 10,
}


def _room(module: str) -> str:
    """xlsr_jax.data.loader -> data; xlsr_jax.cli -> cli; xlsr_jax -> '' (the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports() -> dict[str, set[str]]:
    """{module: modules of xlsr_jax it imports}; `from xlsr_jax.x import y` counts y when y is a module."""
    modules = {".".join(("xlsr_jax", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("xlsr_jax"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if not base.startswith("xlsr_jax"):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        graph[module] = targets - {module}
    return graph


GRAPH = _imports()


def test_every_room_has_a_rank():
    rooms = {_room(m) for m in GRAPH} - {""}
    assert rooms == set(RANKS), f"rooms without a rank: {rooms - set(RANKS)}; ranks of no room: {set(RANKS) - rooms}"


def test_no_module_imports_a_higher_or_sibling_room():
    wrong = []
    for module, targets in sorted(GRAPH.items()):
        room = _room(module)
        for target in sorted(targets):
            other = _room(target)
            if room and other and other != room and RANKS[other] >= RANKS[room]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n  " + "\n  ".join(wrong)


def test_no_circle_between_modules():
    """Within a package too (data/ once had sources <-> hub and prepare <-> report)."""
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if target == "xlsr_jax" or target.rpartition(".")[0] == module:
                continue  # a package's __init__ importing its own modules, or the root package
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n  " + "\n  ".join(circles)


def test_no_private_name_crosses_a_file():
    crossing = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xlsr_jax"):
                crossing += [f"{path.relative_to(PACKAGE.parent)}: {node.module}.{a.name}"
                             for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not crossing, "private names imported from another file:\n  " + "\n  ".join(crossing)


@pytest.mark.parametrize("room, forbidden", [("train", "infer"), ("train", "hub"), ("data", "model"),
                                             ("model", "data"), ("infer", "train")])
def test_siblings_stay_apart(room, forbidden):
    """The arrows docs/design.md names, spelled out (the rank test implies them)."""
    arrows = [f"{m} -> {t}" for m, ts in GRAPH.items() if _room(m) == room for t in ts if _room(t) == forbidden]
    assert arrows == []


def test_the_graph_is_read():
    """The reader finds known arrows, lazy ones included (else the tests above pass on an empty graph)."""
    assert "xlsr_jax.train.loop" in GRAPH["xlsr_jax.recipe"]
    assert "xlsr_jax.data.hf_datasets" in GRAPH["xlsr_jax.data.sources"]  # imported inside a function
    assert "xlsr_jax.parallel" in GRAPH["xlsr_jax.train.step"]  # `from xlsr_jax import parallel`
    assert collections.Counter(_room(m) for m in GRAPH)["data"] >= 15
