"""The packages of r1flow import each other in one direction only, and every module is read, imports inside
functions included (those are where cycles used to hide).

Layers, lowest first: `config`, `provenance` and `memory` (plumbing: they import nothing of r1flow),
then data < models < generation < rewards < training < evaluation. A module may import its own layer or a
lower one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "r1flow"
LAYERS = {"__init__": 0, "config": 0, "provenance": 0, "memory": 0, "data": 1, "models": 2, "generation": 3, "rewards": 4,
          "training": 5, "evaluation": 6}
# r1flow imports allowed inside a function, and why; every other one goes at the top of its module
LAZY = {
    # the reward package is imported by the verifier worker processes, which must start without torch/pandas
    ("r1flow.rewards.model_based", "r1flow.models.reward_model"),
    ("r1flow.rewards.model_based", "r1flow.data.preferences"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(target: str) -> str:
    """The r1flow module an import reaches: the longest known module prefix of `target`."""
    while target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def imports(name: str, path: Path):
    """(imported r1flow module, at top level) for each import statement of a module."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 packages
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]  # `from pkg import submodule` reaches it
        else:
            continue
        for t in targets:
            if t == "r1flow" or t.startswith("r1flow."):
                yield resolve(t), id(node) in top


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_is_in_a_layer():
    assert {layer(m) for m in MODULES} <= set(LAYERS)


def test_imports_go_down_the_layers_and_sit_at_the_top():
    upward, hidden = [], []
    for name, path in MODULES.items():
        for target, at_top in imports(name, path):
            if LAYERS[layer(target)] > LAYERS[layer(name)]:
                upward.append(f"{name} -> {target}")
            if not at_top and (name, target) not in LAZY:
                hidden.append(f"{name} -> {target}")
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(set(upward)))
    assert not hidden, "r1flow imports inside functions (move them to the top):\n" + "\n".join(sorted(set(hidden)))


def test_no_import_cycle():
    # A package's __init__ importing its own submodules (the reward registry) is how the package exposes
    # them, not a dependency: those submodules import the __init__ for its definitions.
    graph = {name: {t for t, _ in imports(name, path)
                    if t != name and not (path.name == "__init__.py" and t.startswith(name + "."))}
             for name, path in MODULES.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
