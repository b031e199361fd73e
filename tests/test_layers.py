"""The package is layered: every import points down, and no two modules import each other.

Each source file is parsed (imports inside functions included) and every import of a `dynamicvit`
module is checked against `LAYERS`. A module may import from its own layer or from a lower one; the
modules of one layer must not form a cycle. Importing `a.b.c` also runs the package `a.b`, so that
package counts as imported too (a package `__init__` that reached upward would close a cycle).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dynamicvit"

# Bottom to top. The first name after `dynamicvit.` decides a module's layer.
LAYERS = (
    ("errors", "version", "files", "progress", "extras", "text"),  # foundations: no model, no tensor code
    ("core",),  # the method: settings, math, hosts, the two model classes, losses
    ("weights",),  # checkpoint files and the three ways to get a model
    ("data",),  # datasets and the one evaluation transform
    ("runtime",),  # device and precision, MACs, timing, export, speed-ups
    ("evaluate",),  # accuracy of a model (torch or ONNX Runtime) on a dataset
    ("training",),  # settings, recipes, the loop, run safety
    ("visualize",),  # pictures of what was kept
    ("demo",),  # the Fashion-MNIST demo driver
    ("cli", "commands", "__main__", "__init__", "train", "deploy", "losses"),  # the surface and public aliases
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts)


def is_package(name: str) -> bool:
    return (SRC.parent / Path(*name.split("."))).is_dir()


def exists(name: str) -> bool:
    base = SRC.parent / Path(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, source: str | None = None) -> set[str]:
    """Every `dynamicvit` module that the file `path` imports (packages as themselves)."""
    me = module_name(path)
    package = me.removesuffix(".__init__") if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dynamicvit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dynamicvit":
                continue
            for alias in node.names:  # `from package import module` imports the module
                sub = f"{target}.{alias.name}"
                found.add(sub if exists(sub) else target)
    # Importing a.b.c runs a.b's __init__ too, unless the importer lives in a.b (then it already ran). The
    # root package is left out: it is the surface itself.
    me = me.removesuffix(".__init__")
    for name in list(found):
        parts = name.split(".")
        found.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts))) if not me.startswith(p + "."))
    return {n for n in found if n != me and exists(n)}


def layer(name: str) -> int:
    parts = name.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return RANK[key]


def graph() -> dict[str, set[str]]:
    return {module_name(p).removesuffix(".__init__"): imports_of(p) for p in SRC.rglob("*.py")}


def test_every_module_has_a_layer():
    unknown = sorted({n for n in graph() if n.split(".")[1:2] and n.split(".")[1] not in RANK})
    assert not unknown, f"modules outside LAYERS (add them to a layer): {unknown}"


def test_every_import_points_down():
    upward = [
        f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
        for src, targets in graph().items()
        for dst in targets
        if layer(dst) > layer(src)
    ]
    assert not upward, "imports that point up:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    edges = graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt == "dynamicvit":  # the surface imports everything; nothing below imports it (checked above)
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_commands_share_code_through_helpers_not_through_each_other():
    commands = {f"dynamicvit.commands.{p.stem}" for p in (SRC / "commands").glob("*.py")}
    helpers = {"dynamicvit.commands.__init__", "dynamicvit.commands._common", "dynamicvit.commands._model"}
    for path in (SRC / "commands").glob("*.py"):
        assert not imports_of(path) & (commands - helpers), f"{path.name} imports another command"


@pytest.mark.parametrize("source, expected", [
    ("from ..errors import ConfigError", {"dynamicvit.errors"}),
    ("def f():\n    from ..weights.build import load", {"dynamicvit.weights.build", "dynamicvit.weights"}),
    ("from .. import deploy", {"dynamicvit.deploy"}),
    ("import dynamicvit.core.ops", {"dynamicvit.core.ops", "dynamicvit.core"}),
])
def test_the_import_reader_resolves_relative_and_function_level_imports(source, expected):
    """The checker itself, on a file of the commands package."""
    assert imports_of(SRC / "commands" / "probe.py", source) == expected
