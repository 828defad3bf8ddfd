"""The package's architecture holds in its imports.

Every ``saereg`` import in the installed code is read from the source (module level and inside
functions alike): the layers go one way, registry <- training <- analysis <- commands (the
migrations count with the registry, whose catalog runs them); no module-level import cycle
exists between modules; only the command line turns typed errors into exit codes (no click
outside it); and no library module imports the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"registry": "saereg.registry", "training": "saereg.training",
           "analysis": "saereg.analysis", "migrations": "saereg.migrations", "cli": "saereg"}
LAYER = {"saereg.registry": 0, "saereg.migrations": 0, "saereg.training": 1,
         "saereg.analysis": 2, "saereg.commands": 3}


def module_files() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = module_files()


def layer_of(module: str) -> int:
    for prefix, layer in LAYER.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return 3  # the top package: the public API re-exports, above every layer


def imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """The saereg modules ``path`` imports (``from a import b`` counts ``a.b`` when it is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return {m for m in found if m == "saereg" or m.startswith("saereg.")}


def test_the_source_tree_maps_onto_the_namespace():
    assert {"saereg", "saereg.commands.main", "saereg.registry.api", "saereg.training.job",
            "saereg.analysis.stats", "saereg.migrations.env"} <= set(MODULES)
    assert all(m in MODULES or m.rpartition(".")[0] in MODULES
               for path_module in MODULES for m in imports(MODULES[path_module], path_module, False)
               if m != "saereg"), "an import names a saereg module that does not exist"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_one_way(module):
    upward = sorted(m for m in imports(MODULES[module], module, top_level_only=False)
                    if layer_of(m) > layer_of(module) and m != "saereg")
    assert upward == [], f"{module} (layer {layer_of(module)}) imports a higher layer: {upward}"


def test_no_module_level_import_cycle():
    graph = {m: {i for i in imports(p, m, top_level_only=True) if i in MODULES and i != m}
             for m, p in MODULES.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) < 3))
def test_the_library_knows_nothing_of_click(module):
    assert not {"click"} & {a.split(".")[0] for a in _all_imports(MODULES[module])}, \
        f"{module} imports click: only saereg.commands turns errors into exit codes"


def _all_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
    return names


# Inside the base layer: references, errors and homes; then the SAE on disk; then the catalog
# (which runs the migrations); then hub sync; then the public API over all of them.
REGISTRY_ORDER = {"saereg.registry.errors": 0, "saereg.registry.paths": 0,
                  "saereg.registry.refs": 0, "saereg.registry.sae": 1,
                  "saereg.registry.catalog": 2, "saereg.migrations": 2,
                  "saereg.registry.hub": 3, "saereg.registry.api": 4}


def registry_level(module: str) -> int | None:
    for prefix, level in REGISTRY_ORDER.items():
        if module == prefix or module.startswith(prefix + "."):
            return level
    return None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if registry_level(m) is not None))
def test_the_base_layer_keeps_its_own_order(module):
    upward = sorted(m for m in imports(MODULES[module], module, top_level_only=False)
                    if (registry_level(m) or 0) > registry_level(module))
    assert upward == [], f"{module} imports {upward}, above it in the base layer"
