"""Summarise a mutmut run of the maths modules (docs/testing.md): counts per file and each surviving mutant's change.

Run from the repository root after ``mutmut run``; it reads mutmut's own records under ``mutants/`` (the ``.meta`` files
of the exit codes and the generated ``x_<function>__mutmut_<n>`` variants), so it needs no mutmut import and never
reruns a test.

    python scripts/mutation_report.py                 # the table
    python scripts/mutation_report.py --survivors     # and the line each survivor changes
    python scripts/mutation_report.py --survivors --only "losses.*"

The pass itself (the mutants of ``PATTERNS``, with the tests of pyproject.toml's ``[tool.mutmut]``):

    OMP_NUM_THREADS=1 nice -n 19 mutmut run --max-children 2 $(python scripts/mutation_report.py --patterns)
"""

from __future__ import annotations

import argparse
import ast
import collections
import difflib
import fnmatch
import json
import pathlib
import re
import sys

# mutmut's exit codes (mutmut/stats.py, status_by_exit_code; anything else is "suspicious")
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 2: "interrupted", None: "not checked",
          33: "no tests", 34: "skipped", 35: "suspicious", 36: "timeout", 37: "caught by type check", -24: "timeout",
          24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault"}
# The mutants of the pass (docs/testing.md): every function of the maths modules, and of pipeline_edm.py the loop.
PATTERNS = ("diffusers_stf.schedulers.*", "diffusers_stf.preconditioning.*", "diffusers_stf.losses.*",
            "diffusers_stf.guidance.*", "diffusers_stf.pipelines.pipeline_edm.x_add_output_change*",
            "diffusers_stf.pipelines.pipeline_edm.*denoising_loop*",
            "diffusers_stf.pipelines.pipeline_edm.*_add_corrections*",
            "diffusers_stf.pipelines.pipeline_edm.*network_output*",
            "diffusers_stf.pipelines.pipeline_edm.*guided_output*",
            "diffusers_stf.pipelines.pipeline_edm.*prepare_latents*")
VARIANT = re.compile(r"^(?P<function>.+)__mutmut_(?P<n>orig|\d+)$")


def variants(source_path: pathlib.Path) -> dict:
    """{function name: {"orig" | n: source lines}} of one mutated file."""
    source = source_path.read_text(encoding="utf-8")
    lines = source.splitlines()
    found = collections.defaultdict(dict)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            match = VARIANT.match(node.name)
            if match:
                body = lines[node.lineno - 1:node.end_lineno]
                body[0] = body[0].replace(node.name, match["function"], 1)
                found[match["function"]][match["n"]] = body
    return found


def change(orig, mutant) -> str:
    diff = [line for line in difflib.unified_diff(orig, mutant, lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return "\n".join("      " + line.strip() if line[0] == "+" else "      " + line.strip() for line in diff)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--mutants", default="mutants", help="mutmut's working folder (default: ./mutants)")
    parser.add_argument("--survivors", action="store_true", help="print the change of every surviving mutant")
    parser.add_argument("--only", default="*", help="a glob on mutant names, without the leading 'diffusers_stf.'")
    parser.add_argument("--patterns", action="store_true", help="print the mutant patterns of the pass, for mutmut run")
    args = parser.parse_args(argv)
    if args.patterns:
        print(" ".join(PATTERNS))
        return 0
    root = pathlib.Path(args.mutants)
    metas = sorted(root.rglob("*.py.meta"))
    if not metas:
        print(f"no mutmut results under {root}/ (run `mutmut run` first)", file=sys.stderr)
        return 1
    totals = collections.Counter()
    rows, survivors = [], []
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        module = meta.relative_to(root).with_suffix("").with_suffix("")
        counts = collections.Counter()
        for key, code in codes.items():
            if not fnmatch.fnmatch(key.removeprefix("diffusers_stf."), args.only):
                continue
            if not any(fnmatch.fnmatch(key, pattern) for pattern in PATTERNS):
                continue
            status = STATUS.get(code, "suspicious")
            counts[status] += 1
            if status == "survived":
                survivors.append((meta.with_suffix(""), key))
        if counts:
            rows.append((str(module).replace("/", "."), counts))
            totals.update(counts)
    columns = ["killed", "survived", "timeout", "no tests", "not checked"]
    columns += sorted(set(totals) - set(columns))
    width = max(len(name) for name, _ in rows + [("total", None)])
    print(f"{'module':{width}}  " + "  ".join(f"{c:>11}" for c in columns))
    for name, counts in rows + [("total", totals)]:
        print(f"{name:{width}}  " + "  ".join(f"{counts[c]:>11}" for c in columns))
    checked = totals["killed"] + totals["survived"] + totals["timeout"]
    if checked:
        print(f"\nscore (killed + timeout) / (killed + survived + timeout): "
              f"{(totals['killed'] + totals['timeout']) / checked:.1%}")
    if args.survivors:
        cache = {}
        for source, key in survivors:
            functions = cache.setdefault(source, variants(source))
            function, n = VARIANT.match(key.rsplit(".", 1)[1]).group("function", "n")
            body = functions.get(function, {})
            print(f"\n{key}")
            if "orig" in body and n in body:
                print(change(body["orig"], body[n]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
