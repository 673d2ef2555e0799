"""The bundler's reading of a package's modules: each module's top-level statements, what each binds, and where each
imported name comes from (see :mod:`.bundle` for the rules the source must follow)."""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Set, Tuple

ALLOWED_IMPORTS = frozenset({"torch", "diffusers", "numpy", "__future__"})
# Optional packages a function may import lazily: PIL ships with diffusers; transformers backs optional extractors.
ALLOWED_LAZY_IMPORTS = ALLOWED_IMPORTS | {"PIL", "transformers"}


def is_allowed(module: str, allowed: frozenset) -> bool:
    top = module.split(".")[0]
    return top in allowed or top in sys.stdlib_module_names


@dataclass
class Module:
    name: str
    path: str
    lines: List[str]
    tree: ast.Module
    is_package: bool
    defs: Dict[str, List[int]] = field(default_factory=dict)  # name -> indices of the statements that bind it
    intra: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # binding -> (module, name)
    extern: Dict[str, Tuple] = field(default_factory=dict)  # binding -> import key
    side_effects: List[int] = field(default_factory=list)  # statements that bind nothing (besides a docstring)

    def where(self, node) -> str:
        return f"{os.path.relpath(self.path)}:{node.lineno}"

    @property
    def source_path(self) -> str:
        """The module's path inside its package, the same on every machine (``pkg/sub/module.py``)."""
        return self.name.replace(".", "/") + ("/__init__.py" if self.is_package else ".py")


def stored_names(node) -> Set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def _origin(name: str):
    """(path of the source, is a package) of an importable module, read from ``sys.modules`` when it is loaded."""
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__file__", None):
        return module.__file__, hasattr(module, "__path__")
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None, False
    return spec.origin, spec.submodule_search_locations is not None


class Package:
    """Parsed source of one package's modules (``package``: its top-level name), loaded on demand; the same from a
    wheel or a checkout."""

    def __init__(self, package: str):
        self.package = package
        self.modules: Dict[str, Module] = {}

    def owns(self, module_name: str) -> bool:
        return module_name == self.package or module_name.startswith(self.package + ".")

    def get(self, name: str) -> Module:
        if name not in self.modules:
            path, is_package = _origin(name)
            if not path or not path.endswith(".py"):
                raise ValueError(f"remote code: cannot find the source of module {name!r}")
            with open(path, encoding="utf-8") as f:
                source = f.read()
            module = Module(name, path, source.splitlines(keepends=True), ast.parse(source), is_package)
            self._index(module)
            self.modules[name] = module
        return self.modules[name]

    def is_module(self, name: str) -> bool:
        if name in sys.modules:
            return True
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            return False

    def _index(self, module: Module):
        package = module.name if module.is_package else module.name.rpartition(".")[0]
        for i, stmt in enumerate(module.tree.body):
            if i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # module docstring
            if isinstance(stmt, ast.ImportFrom):
                source = importlib.util.resolve_name("." * stmt.level + (stmt.module or ""), package) if stmt.level \
                    else stmt.module
                if source == "__future__":
                    continue
                for alias in stmt.names:
                    binding = alias.asname or alias.name
                    if self.owns(source):
                        if alias.name == "*":
                            raise ValueError(f"remote code: `import *` is not supported ({module.where(stmt)})")
                        module.intra[binding] = (source, alias.name)
                    elif is_allowed(source, ALLOWED_IMPORTS):
                        module.extern[binding] = ("from", source, alias.name)
                    else:
                        module.extern[binding] = ("forbidden", source, module.where(stmt))
                continue
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if self.owns(alias.name):
                        raise ValueError(f"remote code: write `from {alias.name.rpartition('.')[0] or self.package} "
                                         f"import ...` instead of `import {alias.name}` ({module.where(stmt)})")
                    key = ("import", alias.name, True) if alias.asname else ("import", alias.name.split(".")[0], False)
                    if alias.asname is None and "." in alias.name:
                        key = ("import", alias.name, False)
                    if not is_allowed(alias.name, ALLOWED_IMPORTS):
                        key = ("forbidden", alias.name, module.where(stmt))
                    module.extern[alias.asname or alias.name.split(".")[0]] = key
                continue
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = {stmt.name}
            else:
                names = stored_names(stmt) if not isinstance(stmt, ast.Expr) else set()
            if not names:
                module.side_effects.append(i)
            for name in names:
                module.defs.setdefault(name, []).append(i)

    def resolve(self, module_name: str, name: str, seen=()) -> Tuple[str, str]:
        """The (module, name) that defines ``name`` as seen from ``module_name`` (following re-exports)."""
        module = self.get(module_name)
        if name in module.defs:
            return module_name, name
        if name in module.intra:
            target = module.intra[name]
            if target in seen:
                raise ValueError(f"remote code: circular re-export of {name!r} in {module_name}")
            return self.resolve(*target, seen=(*seen, target))
        if module.is_package and self.is_module(f"{module_name}.{name}"):
            raise ValueError(f"remote code: {module_name}.{name} is a module; import the names it defines instead "
                             f"(`from {module_name}.{name} import ...`)")
        raise ValueError(f"remote code: {module_name} does not define {name!r}")
