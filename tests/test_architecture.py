"""Data flows one way (docs/architecture.md): no module of the package imports from a layer above its own.

The layers, bottom to top, are read from the import statements of every module (module level and inside functions),
so a lazy import cannot hide an upward arrow.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "diffusers_stf"

# bottom → top; a module may import its own layer and the ones below
LAYERS = [
    {"noise_schedules", "digits", "files", "hub"},
    {"preconditioning", "augment", "mp_layers"},
    {"schedulers"},
    {"losses"},
    {"models"},
    {"guidance"},
    {"pipelines"},
    {"conversion", "convert"},
    {"evaluation"},
    {"training", "phema"},
    {"push"},
]


def layer_of(top_level_name: str) -> int:
    for rank, names in enumerate(LAYERS):
        if top_level_name in names:
            return rank
    raise KeyError(top_level_name)


def package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",) or parts[-1] == "__main__":
            continue
        yield path, parts


def imported_top_levels(path: pathlib.Path, parts) -> set:
    """The package's top-level modules/subpackages that ``path`` imports (relative or absolute)."""
    found = set()
    package_parts = parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                target = list(base) + (node.module.split(".") if node.module else [])
                if not target:  # `from . import x` at the package root
                    target = [alias.name for alias in node.names]
                    found.update(target)
                    continue
                found.add(target[0])
            elif node.module and node.module.split(".")[0] == "diffusers_stf":
                rest = node.module.split(".")[1:]
                found.update(rest[:1] or ["__init__"])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "diffusers_stf":
                    found.update(names[1:2] or ["__init__"])
    return found


MODULES = list(package_modules())



def test_every_module_has_a_layer():
    for _, parts in MODULES:
        layer_of(parts[0])


@pytest.mark.parametrize("path,parts", MODULES, ids=[".".join(p) for _, p in MODULES])
def test_no_module_imports_from_a_layer_above(path, parts):
    own = layer_of(parts[0])
    for name in imported_top_levels(path, parts):
        assert name != "__init__", f"{'.'.join(parts)} imports the package root, which imports every layer"
        assert layer_of(name) <= own, f"{'.'.join(parts)} (layer {own}) imports {name} (layer {layer_of(name)})"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule can fail: a scheduler that imports a loss is reported."""
    fake = tmp_path / "scheduling_fake.py"
    fake.write_text("from ..losses.edm import EDMLoss\n\ndef f():\n    from ..pipelines import EDMPipeline\n")
    names = imported_top_levels(fake, ("schedulers", "scheduling_fake"))
    assert names == {"losses", "pipelines"}
    assert max(layer_of(n) for n in names) > layer_of("schedulers")
