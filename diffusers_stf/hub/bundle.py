"""The bundler: classes of a package → the source of one self-contained module that defines them.

A saved folder carries this module so that ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (or
``diffusers.AutoModel``) loads it without the package. Starting from the classes it is given, the bundler follows the
module-level imports inside their package (``from ..module import Name``) and keeps only the top-level definitions
that are reached, each once, renaming a name that two modules bind differently. The package stays the one source of
the code: nothing is kept by hand.

Rules for the package's code, so that it can travel (``generate_remote_code`` raises a :class:`ValueError` naming the
offending line otherwise; ``tests/test_hub.py`` bundles every class that can be saved and checks the result):

1. Import the package's own code at module level, as ``from <module> import Name [as alias]`` (relative or absolute):
   not ``import package.x``, not ``from . import module`` used as ``module.Name``, not ``import *``, and not inside a
   function (the bundler follows module-level imports only).
2. At module level, import only torch, diffusers, numpy and the standard library. Inside a function, PIL (a diffusers
   dependency) and transformers (optional backbones) are allowed too.
3. Inside an f-string, do not use a global name that clashes with another bundled module's (it cannot be renamed
   there); give the two things distinct names.
4. Do not test the ``__module__`` of the package's classes: a remote-code load puts them in ``diffusers_modules.*``.
   ``isinstance`` works, since one module defines every class a pipeline and its components use.
5. The hub's own plumbing does not travel: a base class named ``RemoteCodeMixin`` and class attributes named
   ``component_library`` are dropped (the remote copy saves and loads as plain diffusers does).

The generated module keeps the definitions of its first execution when it is executed again: diffusers re-executes a
remote-code file in the same module object each time a folder naming it is loaded, and earlier pipelines hold
instances of the first execution's classes. This is right because a file's name is a hash of its text (``layout``),
so the same module name means the same code.
"""

from __future__ import annotations

import ast
import importlib
import io
import re
import tokenize
from dataclasses import dataclass, field
from typing import Dict, List, Set, Tuple

from .source import ALLOWED_LAZY_IMPORTS, Module, Package, is_allowed

PLUMBING_BASES = frozenset({"RemoteCodeMixin"})
PLUMBING_ATTRIBUTES = frozenset({"component_library"})
FIRST_RUN = "_FIRST_RUN"  # the generated module's record of its first execution's definitions


# ---------------------------------------------------------------------------------------------------------------------
# Collecting what a class needs


@dataclass
class _Bundle:
    statements: Dict[str, Set[int]] = field(default_factory=dict)  # module -> included statement indices
    definitions: Set[Tuple[str, str]] = field(default_factory=set)  # (module, name)
    bindings: Dict[str, Dict[str, Tuple]] = field(default_factory=dict)  # module -> binding -> ("def", m, n) / ext key
    module_deps: Dict[str, Set[str]] = field(default_factory=dict)


def _loaded_names(node) -> Set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _plumbing_statements(stmt) -> List[ast.stmt]:
    """The class-body statements of ``stmt`` that bind a plumbing attribute (rule 5)."""
    if not isinstance(stmt, ast.ClassDef):
        return []
    found = []
    for s in stmt.body:
        targets = s.targets if isinstance(s, ast.Assign) else [s.target] if isinstance(s, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id in PLUMBING_ATTRIBUTES for t in targets):
            found.append(s)
    return found


def _needed_names(stmt) -> Set[str]:
    """The names ``stmt`` reads, without the plumbing that does not travel."""
    skipped = {id(n) for s in _plumbing_statements(stmt) for n in ast.walk(s)}
    return {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and id(n) not in skipped} - PLUMBING_BASES


def _check_nested_imports(package: Package, module: Module, stmt):
    for node in ast.walk(stmt):
        if node is stmt or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom) and (node.level or package.owns(node.module or "")):
            raise ValueError(f"remote code: move the import of the package's own code at {module.where(node)} to "
                             "module level, where the generator follows it")
        names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        for name in names:
            if package.owns(name):
                raise ValueError(f"remote code: move `import {name}` at {module.where(node)} to module level")
            if not is_allowed(name, ALLOWED_LAZY_IMPORTS):
                raise ValueError(f"remote code: {module.where(node)} imports {name}; remote code may import only "
                                 f"{sorted(ALLOWED_LAZY_IMPORTS - {'__future__'})} and the standard library")


def _collect(package: Package, roots: List[Tuple[str, str]]) -> _Bundle:
    bundle = _Bundle()
    work = list(roots)

    def include(module: Module, index: int):
        included = bundle.statements.setdefault(module.name, set())
        if index in included:
            return
        included.add(index)
        stmt = module.tree.body[index]
        _check_nested_imports(package, module, stmt)
        bindings = bundle.bindings.setdefault(module.name, {})
        for name in sorted(_needed_names(stmt)):
            if name in module.defs:
                work.append((module.name, name))
            elif name in module.intra:
                target = package.resolve(*module.intra[name])
                bindings[name] = ("def", *target)
                if target[0] != module.name:
                    bundle.module_deps.setdefault(module.name, set()).add(target[0])
                work.append(target)
            elif name in module.extern:
                key = module.extern[name]
                if key[0] == "forbidden":
                    raise ValueError(f"remote code: {key[2]} imports {key[1]}; remote code may import only torch, "
                                     "diffusers, numpy and the standard library at module level")
                bindings[name] = key

    while True:
        while work:
            module_name, name = work.pop()
            if (module_name, name) in bundle.definitions:
                continue
            bundle.definitions.add((module_name, name))
            module = package.get(module_name)
            for index in module.defs[name]:
                include(module, index)
        # statements binding nothing (e.g. `Class.attr = ...`) follow the definitions they touch
        for module_name in list(bundle.statements):
            module = package.get(module_name)
            defined = {n for m, n in bundle.definitions if m == module_name}
            for index in module.side_effects:
                if index not in bundle.statements[module_name] and _loaded_names(module.tree.body[index]) & defined:
                    include(module, index)
        if not work:
            return bundle


def _module_order(bundle: _Bundle) -> List[str]:
    order, state = [], {}

    def visit(name):
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            return  # an import cycle: definitions are order-independent at call time
        state[name] = "active"
        for dep in sorted(bundle.module_deps.get(name, ())):
            visit(dep)
        state[name] = "done"
        order.append(name)

    for name in sorted(bundle.statements):
        visit(name)
    return order


# ---------------------------------------------------------------------------------------------------------------------
# Writing the module


def _rename(lines: List[str], first_line: int, renames: Dict[str, str]) -> List[str]:
    """Rename global names in ``lines`` (a statement starting at source line ``first_line``), not attributes."""
    if not renames:
        return lines
    edits = []
    tokens = list(tokenize.generate_tokens(io.StringIO("".join(lines)).readline))
    significant = [t for t in tokens if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT,
                                                        tokenize.INDENT, tokenize.DEDENT)]
    for k, tok in enumerate(significant):
        if tok.type == tokenize.STRING and "f" in tok.string.split(tok.string[-1])[0].lower():
            # Python 3.11 tokenizes an f-string as one token: refuse rather than leave a stale name inside it
            for expression in re.findall(r"{([^{}]*)}", tok.string):
                clash = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expression)) & set(renames)
                if clash:
                    raise ValueError(f"remote code: {sorted(clash)} must be renamed inside an f-string (line "
                                     f"{first_line + tok.start[0] - 1}); give the clashing names distinct names in "
                                     "the package")
        if tok.type != tokenize.NAME or tok.string not in renames:
            continue
        if k > 0 and significant[k - 1].string == ".":
            continue
        keyword = k + 1 < len(significant) and significant[k + 1].string == "="
        if keyword and k > 0 and significant[k - 1].string in ("(", ","):
            continue  # a keyword argument
        edits.append((tok.start[0] - 1, tok.start[1], tok.end[1], renames[tok.string]))
    out = list(lines)
    for row, start, end, new in sorted(edits, reverse=True):
        out[row] = out[row][:start] + new + out[row][end:]
    return out


def _statement_lines(module: Module, index: int) -> Tuple[int, int]:
    stmt = module.tree.body[index]
    start = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
    while start > 1 and module.lines[start - 2].startswith("#"):
        start -= 1  # the comment block right above a definition belongs to it
    return start, stmt.end_lineno


def _drop_plumbing(module: Module, index: int, lines: List[str], first_line: int) -> List[str]:
    """``lines`` of a class without its plumbing bases and attributes (rule 5)."""
    stmt = module.tree.body[index]
    if not isinstance(stmt, ast.ClassDef):
        return lines
    out = list(lines)
    for base in sorted(stmt.bases, key=lambda b: (b.lineno, b.col_offset), reverse=True):
        if isinstance(base, ast.Name) and base.id in PLUMBING_BASES:
            row = base.lineno - first_line
            text = out[row]
            end = base.end_col_offset
            while end < len(text) and text[end] in ", ":
                end += 1
            out[row] = text[: base.col_offset] + text[end:]
    for attribute in sorted(_plumbing_statements(stmt), key=lambda s: s.lineno, reverse=True):
        del out[attribute.lineno - first_line: attribute.end_lineno - first_line + 1]
    return out


def _same_external(a: Tuple, b: Tuple) -> bool:
    """Whether two ``from module import name`` keys bind the same object (e.g. diffusers' re-exports)."""
    if a[0] != "from" or b[0] != "from":
        return False
    try:
        return getattr(importlib.import_module(a[1]), a[2]) is getattr(importlib.import_module(b[1]), b[2])
    except (ImportError, AttributeError):
        return False


def _import_line(key: Tuple, name: str) -> str:
    if key[2]:  # import x.y as name
        return f"import {key[1]} as {name}"
    return f"import {key[1]}"


def _package_of(classes) -> str:
    packages = {cls.__module__.split(".")[0] for cls in classes}
    if len(packages) != 1:
        raise ValueError(f"remote code bundles the classes of one package, got classes of {sorted(packages)}")
    return packages.pop()


def generate_remote_code(*classes: type) -> str:
    """The source of one self-contained module that defines ``classes`` and what they need, each definition once
    (the rules are in this module's docstring).

    Args:
        classes: classes of one package (pipelines, schedulers, models), e.g. a pipeline and its components' classes.
    """
    if not classes:
        raise ValueError("generate_remote_code needs at least one class")
    package = Package(_package_of(classes))
    roots = [package.resolve(cls.__module__, cls.__name__) for cls in classes]
    bundle = _collect(package, roots)
    order = _module_order(bundle)

    # global names: a name bound by two different things is renamed in every module after the first
    final: Dict[Tuple, str] = {}
    taken: Dict[str, Tuple] = {FIRST_RUN: ("generated",)}
    imports_needed = set()

    aliases = set()

    def claim(key, name, suffix):
        if key in final:
            return
        owner = taken.get(name)
        if owner is not None and _same_external(owner, key):
            final[key] = name
            aliases.add(key)
            return
        if owner is not None and owner != key and not (key[0] == owner[0] == "import" and key[1].split(".")[0]
                                                        == owner[1].split(".")[0] and not key[2] and not owner[2]):
            name = f"{name}_{suffix}"
            if name in taken:
                raise ValueError(f"remote code: cannot give {key} a unique name")
        taken.setdefault(name, key)
        final[key] = name

    for module_name in order:
        suffix = module_name.rpartition(".")[2]
        for m, n in sorted(bundle.definitions):
            if m == module_name:
                claim(("def", m, n), n, suffix)
    for module_name in order:
        suffix = module_name.rpartition(".")[2]
        for binding, key in sorted(bundle.bindings.get(module_name, {}).items()):
            if key[0] != "def":
                claim(key, binding, suffix)
                imports_needed.add(key)

    names = ", ".join(c.__name__ for c in classes)
    header = [
        f'"""{names}: code for diffusers\' ``trust_remote_code=True`` loading.\n\n',
        f"Generated by {package.package} {package_version(package.package)} ``save_pretrained`` from these modules "
        "of the package,\nkeeping the definitions the classes above need (edits are lost when the folder is saved "
        "again):\n\n",
        *(f"    {module_name}\n" for module_name in order),
        "\nSelf-contained: imports only torch, diffusers, numpy and the standard library.\n",
        '"""\n\n',
        "from __future__ import annotations\n\n",
    ]
    imports_needed -= aliases
    plain = sorted((k for k in imports_needed if k[0] == "import"), key=lambda k: k[1])
    body = [_import_line(k, final[k]) + "\n" for k in plain]
    froms: Dict[str, List[str]] = {}
    for k in sorted((k for k in imports_needed if k[0] == "from"), key=lambda k: (k[1], k[2])):
        froms.setdefault(k[1], []).append(k[2] + (f" as {final[k]}" if final[k] != k[2] else ""))
    for module_name, imported in froms.items():
        line = f"from {module_name} import {', '.join(imported)}\n"
        if len(line) > 120:
            line = f"from {module_name} import (\n" + "".join(f"    {name},\n" for name in imported) + ")\n"
        body.append(line)
    body.append(
        "\n# diffusers executes this file again, in the same module, each time it loads a folder that names it. The\n"
        "# file's name is a hash of this text, so a second run defines the same code: keep the first run's\n"
        "# definitions, whose classes the pipelines loaded earlier use.\n"
        f'{FIRST_RUN} = dict(globals()) if "{FIRST_RUN}" in globals() else None\n'
    )
    for module_name in order:
        module = package.get(module_name)
        bindings = bundle.bindings.get(module_name, {})
        renames = {}
        for name in module.defs:
            key = ("def", module_name, name)
            if key in final and final[key] != name:
                renames[name] = final[key]
        for binding, key in bindings.items():
            if final[key] != binding:
                renames[binding] = final[key]
        body.append(f"\n\n# {'-' * 20} {module.source_path} {'-' * 20}\n")
        previous_was_def = False
        for index in sorted(bundle.statements[module_name]):
            start, end = _statement_lines(module, index)
            lines = _drop_plumbing(module, index, module.lines[start - 1: end], start)
            is_def = isinstance(module.tree.body[index], (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            body.append("\n\n" if is_def or previous_was_def else "\n")
            previous_was_def = is_def
            body.extend(_rename(lines, start, renames))
    body.append(f"\n\nif {FIRST_RUN} is not None:\n    globals().update({FIRST_RUN})\n")
    text = "".join(header + body)
    ast.parse(text)  # fail at save time, not at load time
    return text


def package_version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package.replace("_", "-"))
    except Exception:  # noqa: BLE001  (a source checkout without metadata)
        return "(source checkout)"
