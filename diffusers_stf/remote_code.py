"""Hub-native folders: diffusers' remote-code layout, generated from the package's own modules.

``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` resolves ``_class_name = [file, Class]`` to
``folder/file.py`` and each component entry ``[file, Class]`` to ``folder/<component>/file.py``. The pipeline's file is
one self-contained module holding the pipeline and every component class, with everything they need from
``diffusers_stf``: the generator follows the module-level imports (``from ..module import Name``) and keeps only the
top-level definitions that are reached. It imports only torch, diffusers, numpy and the standard library, and the
package stays the one source of the code. Each component file takes its class from that module, so the pipeline and
its components share their classes (``isinstance`` checks hold) as they do in the package. A model saved on its own
gets its own file, named in ``config.json``'s ``auto_map`` for ``diffusers.AutoModel``.

Rules the generator relies on (a :class:`ValueError` at save time names the offending line otherwise):
intra-package imports are module-level ``from <module> import Name [as alias]``; module-level external imports come
from torch, diffusers, numpy or the standard library; PIL and transformers may be imported inside functions.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tempfile
import tokenize
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

PACKAGE = __name__.split(".")[0]
ALLOWED_IMPORTS = frozenset({"torch", "diffusers", "numpy", "__future__"})
# Optional packages a function may import lazily: PIL ships with diffusers; transformers backs optional extractors.
ALLOWED_LAZY_IMPORTS = ALLOWED_IMPORTS | {"PIL", "transformers"}
# Bases that only add the package's own save/load plumbing; the remote copy uses diffusers' defaults instead.
EXCLUDED_BASES = frozenset({"RemoteCodeMixin"})


def _is_allowed(module: str, allowed: frozenset) -> bool:
    top = module.split(".")[0]
    return top in allowed or top in sys.stdlib_module_names


# ---------------------------------------------------------------------------------------------------------------------
# Reading the package's modules


@dataclass
class _Module:
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


def _stored_names(node) -> Set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


class _Package:
    """Parsed source of ``diffusers_stf`` modules, loaded on demand (works the same from a wheel or a checkout)."""

    def __init__(self):
        self.modules: Dict[str, _Module] = {}

    def get(self, name: str) -> _Module:
        if name not in self.modules:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                raise ValueError(f"remote code: cannot find the source of module {name!r}")
            with open(spec.origin, encoding="utf-8") as f:
                source = f.read()
            module = _Module(name, spec.origin, source.splitlines(keepends=True), ast.parse(source),
                             spec.submodule_search_locations is not None)
            self._index(module)
            self.modules[name] = module
        return self.modules[name]

    def is_module(self, name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            return False

    def _index(self, module: _Module):
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
                    if source == PACKAGE or source.startswith(PACKAGE + "."):
                        if alias.name == "*":
                            raise ValueError(f"remote code: `import *` is not supported ({module.where(stmt)})")
                        module.intra[binding] = (source, alias.name)
                    elif _is_allowed(source, ALLOWED_IMPORTS):
                        module.extern[binding] = ("from", source, alias.name)
                    else:
                        module.extern[binding] = ("forbidden", source, module.where(stmt))
                continue
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        raise ValueError(f"remote code: write `from {alias.name.rpartition('.')[0] or PACKAGE} import "
                                         f"...` instead of `import {alias.name}` ({module.where(stmt)})")
                    key = ("import", alias.name, True) if alias.asname else ("import", alias.name.split(".")[0], False)
                    if alias.asname is None and "." in alias.name:
                        key = ("import", alias.name, False)
                    if not _is_allowed(alias.name, ALLOWED_IMPORTS):
                        key = ("forbidden", alias.name, module.where(stmt))
                    module.extern[alias.asname or alias.name.split(".")[0]] = key
                continue
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = {stmt.name}
            else:
                names = _stored_names(stmt) if not isinstance(stmt, ast.Expr) else set()
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


def _check_nested_imports(module: _Module, stmt):
    for node in ast.walk(stmt):
        if node is stmt or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == PACKAGE):
            raise ValueError(f"remote code: move the import of the package's own code at {module.where(node)} to "
                             "module level, where the generator follows it")
        names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        for name in names:
            if name.split(".")[0] == PACKAGE:
                raise ValueError(f"remote code: move `import {name}` at {module.where(node)} to module level")
            if not _is_allowed(name, ALLOWED_LAZY_IMPORTS):
                raise ValueError(f"remote code: {module.where(node)} imports {name}; remote code may import only "
                                 f"{sorted(ALLOWED_LAZY_IMPORTS - {'__future__'})} and the standard library")


def _collect(package: _Package, roots: List[Tuple[str, str]]) -> _Bundle:
    bundle = _Bundle()
    work = list(roots)

    def include(module: _Module, index: int):
        included = bundle.statements.setdefault(module.name, set())
        if index in included:
            return
        included.add(index)
        stmt = module.tree.body[index]
        _check_nested_imports(module, stmt)
        bindings = bundle.bindings.setdefault(module.name, {})
        for name in sorted(_loaded_names(stmt) - EXCLUDED_BASES):
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
# Writing the file


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


def _statement_lines(module: _Module, index: int) -> Tuple[int, int]:
    stmt = module.tree.body[index]
    start = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
    while start > 1 and module.lines[start - 2].startswith("#"):
        start -= 1  # the comment block right above a definition belongs to it
    return start, stmt.end_lineno


def _drop_excluded_bases(module: _Module, index: int, lines: List[str], first_line: int) -> List[str]:
    stmt = module.tree.body[index]
    if not isinstance(stmt, ast.ClassDef):
        return lines
    out = list(lines)
    for base in sorted(stmt.bases, key=lambda b: (b.lineno, b.col_offset), reverse=True):
        if isinstance(base, ast.Name) and base.id in EXCLUDED_BASES:
            row = base.lineno - first_line
            text = out[row]
            end = base.end_col_offset
            while end < len(text) and text[end] in ", ":
                end += 1
            out[row] = text[: base.col_offset] + text[end:]
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


def generate_remote_code(*classes: type) -> str:
    """The source of one self-contained module that defines ``classes`` (classes of this package) and what they
    need, each definition once.

    Args:
        classes: pipeline, scheduler or model classes defined in ``diffusers_stf``.
    """
    package = _Package()
    roots = []
    for cls in classes:
        module_name = cls.__module__
        if not (module_name == PACKAGE or module_name.startswith(PACKAGE + ".")):
            raise ValueError(f"remote code is generated for {PACKAGE} classes only, got {module_name}.{cls.__name__}")
        roots.append(package.resolve(module_name, cls.__name__))
    bundle = _collect(package, roots)
    order = _module_order(bundle)

    # global names: a name bound by two different things is renamed in every module after the first
    final: Dict[Tuple, str] = {}
    taken: Dict[str, Tuple] = {}
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
        module = package.get(module_name)
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
        f"Generated by {PACKAGE} {_package_version()} ``save_pretrained`` from these modules of the package, keeping\n",
        "the definitions the classes above need (edits are lost when the folder is saved again):\n\n",
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
        rel = os.path.relpath(module.path, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        body.append(f"\n\n# {'-' * 20} {rel.replace(os.sep, '/')} {'-' * 20}\n")
        previous_was_def = False
        for index in sorted(bundle.statements[module_name]):
            start, end = _statement_lines(module, index)
            lines = module.lines[start - 1: end]
            lines = _drop_excluded_bases(module, index, lines, start)
            is_def = isinstance(module.tree.body[index], (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            body.append("\n\n" if is_def or previous_was_def else "\n")
            previous_was_def = is_def
            body.extend(_rename(lines, start, renames))
    text = "".join(header + body)
    ast.parse(text)  # fail at save time, not at load time
    return text


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers-stf")
    except Exception:  # noqa: BLE001  (a source checkout without metadata)
        return "(source checkout)"


# ---------------------------------------------------------------------------------------------------------------------
# Folders


def code_file_stem(cls: type) -> str:
    """The file name (without ``.py``) of ``cls``'s code in a saved folder: its defining module's name."""
    return cls.__module__.rpartition(".")[2]


def _is_package_entry(value) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and (value[0] == PACKAGE or value[0].startswith(PACKAGE + ".")))


def write_remote_code(pipeline, save_directory: str) -> Dict:
    """Write the code files of ``pipeline`` and its package components into ``save_directory`` and switch
    ``model_index.json`` to the remote-code layout. Returns the new index."""
    index_path = os.path.join(save_directory, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    pipeline_cls = type(pipeline)
    stem = code_file_stem(pipeline_cls)
    components = {name: type(getattr(pipeline, name)) for name, value in index.items() if _is_package_entry(value)}
    # One module defines the pipeline and every component class, so the pipeline's isinstance checks see the classes
    # its components were loaded with. diffusers loads it first (``_class_name``); each component file only picks
    # its class from it. ``from . import`` is not a dependency diffusers copies from the component's folder (which
    # on the Hub holds only the named file), and the module is already in diffusers' dynamic-module package.
    with open(os.path.join(save_directory, f"{stem}.py"), "w", encoding="utf-8") as f:
        f.write(generate_remote_code(pipeline_cls, *dict.fromkeys(components.values())))
    index["_class_name"] = [stem, pipeline_cls.__name__]
    for name, component_cls in components.items():
        component_stem = code_file_stem(component_cls)
        if component_stem == stem:
            raise ValueError(f"remote code: component {name!r} and the pipeline would share the file {stem}.py")
        os.makedirs(os.path.join(save_directory, name), exist_ok=True)
        with open(os.path.join(save_directory, name, f"{component_stem}.py"), "w", encoding="utf-8") as f:
            f.write(_component_file(component_cls, stem))
        index[name] = [component_stem, component_cls.__name__]
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    return index


def write_model_remote_code(model, save_directory: str) -> Dict:
    """Make a folder written by ``model.save_pretrained`` (a model of this package saved on its own, outside a
    pipeline) load with ``diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)``: write the model's
    self-contained code file and name it in ``config.json``'s ``auto_map``. Returns the new config."""
    cls = type(model)
    stem = code_file_stem(cls)
    with open(os.path.join(save_directory, f"{stem}.py"), "w", encoding="utf-8") as f:
        f.write(generate_remote_code(cls))
    config_path = os.path.join(save_directory, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["auto_map"] = {"AutoModel": f"{stem}.{cls.__name__}"}
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return config


def _component_file(cls: type, pipeline_stem: str) -> str:
    return (f'"""{cls.__name__} for diffusers\' ``trust_remote_code=True`` loading, generated by {PACKAGE} '
            f"{_package_version()}.\n\n"
            f"Its code is in ../{pipeline_stem}.py, which diffusers loads before the components.\n"
            f'"""\n\nfrom . import {pipeline_stem} as _code\n\n{cls.__name__} = _code.{cls.__name__}\n')


def _package_view(folder: str, index: Dict) -> str:
    """A temporary folder whose ``model_index.json`` names the package's classes (``["diffusers_stf", Class]``) and
    whose component folders link to ``folder``'s, so diffusers loads a remote-code folder through our classes."""
    import diffusers_stf

    view = tempfile.mkdtemp(prefix="diffusers_stf_view_")
    new_index = dict(index)
    class_name = index["_class_name"]
    new_index["_class_name"] = class_name[1] if isinstance(class_name, list) else class_name
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        if os.path.isfile(os.path.join(folder, name, f"{value[0]}.py")):
            if not hasattr(diffusers_stf, value[1]):
                raise ValueError(f"{folder}: component {name!r} is {value[1]}, which {PACKAGE} does not define; "
                                 "load it with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)")
            new_index[name] = [PACKAGE, value[1]]
    for entry in os.listdir(folder):
        source = os.path.join(folder, entry)
        if entry != "model_index.json" and os.path.isdir(source):
            try:
                os.symlink(os.path.abspath(source), os.path.join(view, entry), target_is_directory=True)
            except OSError:  # no symlinks (some Windows setups): copy
                shutil.copytree(source, os.path.join(view, entry))
    with open(os.path.join(view, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(new_index, f, indent=2)
    return view


def resolve_folder(path_or_repo: str, download_kwargs: Dict) -> str:
    """A local folder for ``path_or_repo``: the folder itself, or a Hub snapshot (downloaded, or from the cache).

    diffusers' own download step cannot resolve components that live in an installed package, so repo ids go through
    ``huggingface_hub.snapshot_download`` first."""
    path = os.fspath(path_or_repo)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(path, **download_kwargs)
    except (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as err:
        raise OSError(
            f"cannot load {path!r}: there is no such folder ({os.path.abspath(path)}), and it is not a Hub repo "
            f"found in the local Hub cache or on the Hub ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err


class RemoteCodeMixin:
    """``save_pretrained`` writes the remote-code layout; ``from_pretrained`` loads it (and folders that name
    ``["diffusers_stf", Class]``) through the package's classes. Mixed into the package's pipelines, before
    ``DiffusionPipeline``."""

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: Optional[str] = None,
                        max_shard_size=None, push_to_hub: bool = False, **kwargs):
        """Save as diffusers does, then add the code files so that ``DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)`` loads the folder without this package.

        Args:
            save_directory: the folder.
            push_to_hub: also upload the folder (``repo_id``, ``token``, ``private``, ``commit_message`` as in
                diffusers).
            **kwargs: passed to ``DiffusionPipeline.save_pretrained``.
        """
        hub_keys = ("repo_id", "token", "private", "commit_message", "create_pr")
        hub_kwargs = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant,
                                max_shard_size=max_shard_size, **kwargs)
        write_remote_code(self, os.fspath(save_directory))
        if push_to_hub:
            from huggingface_hub import HfApi

            folder = os.fspath(save_directory)
            api = HfApi(token=hub_kwargs.get("token"))
            repo_id = hub_kwargs.get("repo_id") or os.path.basename(os.path.normpath(folder))
            repo_id = api.create_repo(repo_id, private=bool(hub_kwargs.get("private", False)), exist_ok=True).repo_id
            api.upload_folder(repo_id=repo_id, folder_path=folder, create_pr=bool(hub_kwargs.get("create_pr", False)),
                              commit_message=hub_kwargs.get("commit_message") or "Upload pipeline")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder or Hub repo written by ``save_pretrained`` (either layout) with this package's classes.

        ``revision``, ``token``, ``cache_dir``, ``local_files_only`` and ``force_download`` go to the download; all
        other keyword arguments (e.g. ``discriminator=None``, ``torch_dtype``) go to
        ``DiffusionPipeline.from_pretrained``.
        """
        download_keys = ("revision", "token", "cache_dir", "local_files_only", "force_download")
        download_kwargs = {k: kwargs.pop(k) for k in download_keys if k in kwargs}
        folder = resolve_folder(pretrained_model_name_or_path, download_kwargs)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            raise OSError(f"{folder} has no model_index.json: it is not a saved pipeline folder")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        if not isinstance(index.get("_class_name"), list):
            return super().from_pretrained(folder, **kwargs)
        view = _package_view(folder, index)
        try:
            pipeline = super().from_pretrained(view, **kwargs)
        finally:
            shutil.rmtree(view, ignore_errors=True)
        pipeline.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        return pipeline
