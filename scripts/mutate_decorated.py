"""Mutation runner for the decorated functions of the maths modules, which mutmut leaves alone (docs/testing.md).

mutmut 3 does not mutate a function with a decorator other than ``@staticmethod``/``@classmethod`` (its trampoline
cannot wrap them), nor module-level code. Among the maths modules that leaves ``stable_target_field`` and
``stable_target_epsilon`` (``@torch.no_grad()``), the EDM scheduler's ``__init__`` (``@register_to_config``) and its
properties (``init_noise_sigma``, ``sigma_range``, ``current_sigma``, ``state_in_first_order``),
``GuidedEvaluation.denoised`` (``@cached_property``) and ``EDMPipeline.__call__`` (``@torch.no_grad()``). This script
makes the classic operator and constant mutants of exactly those functions (AST: + − * / ** swapped, comparisons
flipped at their boundary or negated, and/or swapped, max/min swapped, numbers changed by one, a unary minus or
``not`` dropped, ``is``/``is not`` swapped), writes each into a scratch copy of the package, and runs the function's tests against it, stopping at the
first failure.

    OMP_NUM_THREADS=1 nice -n 19 python scripts/mutate_decorated.py [--jobs 2] [--only NAME]

It prints one line per mutant (killed, SURVIVED, timeout) and a summary; the exit status is the number of survivors.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEDULER_TESTS = ["tests/test_edm_schedulers.py", "tests/test_preconditioning.py", "tests/test_guidance_schedulers.py",
                   "tests/test_discriminator_guidance.py", "-k",
                   "not (hub or save_load or test_train_ or toy_2d or unet_encoder or backbone)"]
# (file, function qualname, the tests that exercise it)
TARGETS = [
    ("diffusers_stf/losses/stable_target_field.py", "stable_target_field",
     ["tests/test_stable_target_field.py", "tests/test_sequence_aware.py", "tests/test_loss_contract.py", "-k",
      "not run_writes and not tiny_training"]),
    ("diffusers_stf/losses/stable_target_field.py", "stable_target_epsilon", ["tests/test_stable_target_field.py"]),
    ("diffusers_stf/schedulers/scheduling_edm_heun.py", "EDMHeunScheduler.__init__", SCHEDULER_TESTS),
    ("diffusers_stf/schedulers/scheduling_edm_heun.py", "EDMHeunScheduler.sigma_range", SCHEDULER_TESTS),
    ("diffusers_stf/schedulers/scheduling_edm_heun.py", "EDMHeunScheduler.init_noise_sigma", SCHEDULER_TESTS),
    ("diffusers_stf/schedulers/scheduling_edm_heun.py", "EDMHeunScheduler.state_in_first_order", SCHEDULER_TESTS),
    ("diffusers_stf/schedulers/scheduling_edm_heun.py", "EDMHeunScheduler.current_sigma", SCHEDULER_TESTS),
    ("diffusers_stf/guidance/base.py", "GuidedEvaluation.denoised",
     ["tests/test_cfg_autoguidance.py", "tests/test_guidance_schedulers.py", "-k", "autoguidance or cfg"]),
    ("diffusers_stf/pipelines/pipeline_edm.py", "EDMPipeline.__call__",
     ["tests/test_pipeline_edm.py", "tests/test_cfg_autoguidance.py", "tests/test_discriminator_guidance.py", "-k",
      "not (hub or save_load or another_preconditioning or test_train_ or toy_2d or unet_encoder or backbone)"]),
]

SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
        ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv}
MAX_MIN = {"max": "min", "min": "max", "amax": "amin", "amin": "amax", "maximum": "minimum", "minimum": "maximum"}
COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
           ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


def find_function(tree: ast.Module, qualname: str):
    node, parts = tree, qualname.split(".")
    for part in parts:
        node = next(n for n in ast.iter_child_nodes(node)
                    if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
    return node


def mutants_of(function: ast.FunctionDef):
    """(node, replacement node, description) for every mutant of the function's body (docstring and decorators
    excluded)."""
    body = function.body[1:] if (function.body and isinstance(function.body[0], ast.Expr)
                                 and isinstance(function.body[0].value, ast.Constant)) else function.body
    for statement in body:
        for node in ast.walk(statement):
            if isinstance(node, ast.BinOp) and type(node.op) in SWAP:
                new = copy.deepcopy(node)
                new.op = SWAP[type(node.op)]()
                yield node, new, "operator"
            elif isinstance(node, ast.Compare):
                for i, op in enumerate(node.ops):
                    if type(op) in COMPARE:
                        new = copy.deepcopy(node)
                        new.ops[i] = COMPARE[type(op)]()
                        yield node, new, "comparison"
            elif isinstance(node, ast.BoolOp):
                new = copy.deepcopy(node)
                new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
                yield node, new, "and/or"
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in MAX_MIN:
                new = copy.deepcopy(node)
                if isinstance(new.func, ast.Name):
                    new.func.id = MAX_MIN[new.func.id]
                else:
                    new.func.attr = MAX_MIN[new.func.attr]
                yield node, new, "max/min"
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
                yield node, copy.deepcopy(node.operand), "unary"
            elif (isinstance(node, ast.Constant) and isinstance(node.value, (int, float))
                  and not isinstance(node.value, bool)):
                yield node, ast.Constant(node.value + 1), "number"


def replace(source: str, node: ast.AST, new: ast.AST) -> str:
    """The source with ``node``'s text replaced by ``new`` (parenthesised), everything else untouched."""
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode("utf-8")))
    data = source.encode("utf-8")
    start = offsets[node.lineno - 1] + node.col_offset
    end = offsets[node.end_lineno - 1] + node.end_col_offset
    return (data[:start] + f"({ast.unparse(new)})".encode("utf-8") + data[end:]).decode("utf-8")


def run_mutant(workdir: pathlib.Path, relative: str, mutated: str, tests, timeout: float):
    """Write the mutant into its own scratch tree and run the tests there; 'killed', 'SURVIVED' or 'timeout'."""
    tree = pathlib.Path(tempfile.mkdtemp(dir=workdir))
    try:
        shutil.copytree(workdir / "base", tree, symlinks=True, dirs_exist_ok=True)
        target = tree / relative
        target.unlink()
        target.write_text(mutated, encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                    cwd=tree, env=env, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout"
        return "SURVIVED" if result.returncode == 0 else "killed"
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--only", default=None, help="only the target whose qualname contains this")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant before it counts as a timeout")
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mutate_decorated_") as scratch:
        workdir = pathlib.Path(scratch)
        base = workdir / "base"  # the package copied once, the tests and everything else linked
        shutil.copytree(ROOT / "diffusers_stf", base / "diffusers_stf",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("tests", "examples", "pyproject.toml"):
            if (ROOT / name).exists():
                os.symlink(ROOT / name, base / name)
        probe = subprocess.run([sys.executable, "-c", "import diffusers_stf; print(diffusers_stf.__file__)"], cwd=base,
                               env=dict(os.environ, PYTHONPATH=str(base)), capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(base)):  # the tests must import the scratch copy, not ROOT's
            raise RuntimeError(f"the scratch tree does not shadow the package: {probe.stdout or probe.stderr}")
        jobs = []
        for relative, qualname, tests in TARGETS:
            if args.only and args.only not in qualname:
                continue
            source = (ROOT / relative).read_text(encoding="utf-8")
            function = find_function(ast.parse(source), qualname)
            for node, new, kind in mutants_of(function):
                mutated = replace(source, node, new)
                ast.parse(mutated)  # a mutant must be valid Python
                where = f"{relative}:{node.lineno} {qualname}: {kind} {ast.unparse(node)} -> {ast.unparse(new)}"
                jobs.append((where, relative, mutated, tests))
        counts = {"killed": 0, "SURVIVED": 0, "timeout": 0}
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_mutant, workdir, relative, mutated, tests, args.timeout): where
                       for where, relative, mutated, tests in jobs}
            for future in concurrent.futures.as_completed(futures):
                status = future.result()
                counts[status] += 1
                print(f"{status:8} {futures[future]}", flush=True)
    minutes = (time.time() - started) / 60
    print(f"\n{len(jobs)} mutants: {counts['killed']} killed, {counts['SURVIVED']} survived, "
          f"{counts['timeout']} timeout ({minutes:.1f} min)")
    return counts["SURVIVED"]


if __name__ == "__main__":
    sys.exit(main())
