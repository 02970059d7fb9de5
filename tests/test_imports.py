"""Imports point one way: module → functional → dispatch → registry ← ops → kernels; no cycles.

Walks every ``import`` in the package's source with ``ast`` (lazy imports inside functions
included) and fails on an import from a higher layer or on a cycle between modules.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Layer of each module (a lower number may not import a higher one). Same-layer imports are allowed
# only within one subpackage (e.g. pyattn.ops.attention_triton importing pyattn.ops.attention_common).
LAYERS = [
    ("pyattn._triton", 0), ("pyattn.tolerances", 0), ("pyattn._extension", 1),
    ("pyattn._registry", 2), ("pyattn.kernels", 2), ("pyattn.reference", 2), ("pyattn.ops", 3),
    ("pyattn._dispatch", 4), ("pyattn.functional", 5), ("pyattn.nn", 6), ("pyattn._explain", 7),
    ("pyattn.distributed", 7), ("pyattn.integrations", 8), ("pyattn.examples", 8), ("pyattn.bench", 8),
    ("pyattn.build_info", 8), ("pyattn", 9),
]


EXTENSION_MODULES = {"pyattn._C"}  # compiled, no Python source: a leaf


def _module_name(path: pathlib.Path) -> str:
    if path.is_relative_to(ROOT / "kernels"):
        parts = ("pyattn", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> tuple[int, str]:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer, prefix
    raise AssertionError(f"{module} has no layer in tests/test_imports.py: add it")


def _sources():
    for folder in ("pyattn", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield _module_name(path), path


def _imports(module: str, path: pathlib.Path, modules) -> set[str]:
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            submodules = {f"{target}.{alias.name}" for alias in node.names} & (set(modules) | EXTENSION_MODULES)
            found |= submodules  # `from pkg import submodule` imports the submodule, not pkg's own code
            if len(submodules) < len(node.names):
                found.add(target)
    return {name for name in found if name == "pyattn" or name.startswith("pyattn.")}


def _graph():
    modules = dict(_sources())
    graph = {}
    for module, path in modules.items():
        graph[module] = {name for name in _imports(module, path, modules) if name in modules and name != module}
    return graph


def test_no_upward_import():
    wrong = []
    for module, targets in _graph().items():
        layer, prefix = _layer(module)
        for target in targets:
            target_layer, target_prefix = _layer(target)
            if module == "pyattn" or target == "pyattn":
                continue  # the package's own __init__ loads everything; nothing imports it back (checked below)
            if target_layer > layer or (target_layer == layer and target_prefix != prefix):
                wrong.append(f"{module} (layer {layer}) imports {target} (layer {target_layer})")
    assert not wrong, "imports must point down the layers:\n" + "\n".join(sorted(wrong))


def test_kernels_import_nothing_of_pyattn_but_kernels():
    bad = [f"{module} imports {target}" for module, targets in _graph().items() if module.startswith("pyattn.kernels")
           for target in targets if not target.startswith("pyattn.kernels")]
    assert not bad, "\n".join(bad)


def test_dispatch_does_not_import_the_ops():
    targets = _graph()["pyattn._dispatch"]
    assert not {t for t in targets if t.startswith("pyattn.ops")}, targets


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_walk_sees_the_package():
    graph = _graph()
    assert "pyattn.ops.attention_triton" in graph and "pyattn.kernels" in graph
    assert "pyattn._registry" in graph["pyattn.ops.attention_triton"]
