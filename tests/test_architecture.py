"""The package's layers (ARCHITECTURE.md): every import, at module level or inside a function, runs to the same
layer or one below, and no module imports itself back through others."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "skymoe_jax"

# Bottom to top; a module belongs to the first entry its dotted name starts with.
LAYERS = [
    ("errors", "config"),
    ("model", "kernels"),
    ("parallel", "data", "metrics"),
    ("training",),
    ("checkpoint",),
    ("run",),
    ("args", "advise", "bench", "cli"),
]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    """Layer index of a module name relative to the package ('' is the package's own __init__: the top)."""
    if not module:
        return len(LAYERS)
    head = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"skymoe_jax.{module} is in no layer; add its folder to LAYERS and ARCHITECTURE.md")


def imports(module: str) -> set[str]:
    """Package modules `module` imports anywhere in its code (lazy imports and __import__ included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".") if package else []
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(["skymoe_jax", *anchor, *([base] if base else [])])
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", "") == "__import__"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names = [node.args[0].value]
        for name in names:
            if name == "skymoe_jax" or name.startswith("skymoe_jax."):
                inner = name.removeprefix("skymoe_jax").lstrip(".")
                if inner in MODULES:  # `from pkg import name` names a module only when one exists
                    found.add(inner)
    return found - {module}


GRAPH = {m: imports(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m))
def test_imports_run_downward(module):
    upward = sorted(t for t in GRAPH[module] if layer_of(t) > layer_of(module))
    assert not upward, (
        f"skymoe_jax.{module} (layer {layer_of(module)}: {LAYERS[layer_of(module)]}) imports "
        + ", ".join(f"skymoe_jax.{t} (layer {layer_of(t)})" for t in upward)
        + "; move the shared piece down or the importer up (ARCHITECTURE.md)"
    )


def test_no_import_cycles():
    """Packages (__init__ modules) are left out: importing pkg.a always runs pkg/__init__ first, which is not
    a dependency of pkg.a's code."""
    graph = {
        m: {t for t in GRAPH[m] if MODULES[t].name != "__init__.py"}
        for m in MODULES
        if MODULES[m].name != "__init__.py"
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(f"skymoe_jax.{c}" for c in cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_an_upward_and_a_lazy_import():
    assert "run.loop" in GRAPH["cli"]  # a lazy import inside cmd_train
    assert "bench.routing" in GRAPH["cli"]  # through __import__
    assert layer_of("run.loop") > layer_of("training.step") > layer_of("model.transformer") > layer_of("config")
    assert "model.spec" in GRAPH["parallel.plan"] and layer_of("model.spec") < layer_of("parallel.plan")
