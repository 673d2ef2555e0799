"""Rules of the test suite itself (docs/testing.md): every test can fail.

A test function must assert something: an ``assert`` statement, a call of an ``assert…`` function
(``torch.testing.assert_close``, a helper such as ``assert_same_samples``), ``pytest.raises``/``warns``/``fail``, or a
call of a helper of its own module (or of a function defined inside it) that does one of these. A test that only
runs code passes whatever the code returns.
"""

import ast
import pathlib

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
CHECKING_CALLS = {"raises", "warns", "fail", "deprecated_call"}  # pytest's


def called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def own_statements(node):
    """The nodes of a function's body, without the bodies of the functions and lambdas defined inside it."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(child))


def checks(function, helpers, seen=frozenset()) -> bool:
    """Whether ``function`` asserts, directly or through a helper (module level or defined inside it) it calls."""
    local = {n.name: n for n in ast.walk(function) if isinstance(n, ast.FunctionDef) and n is not function}
    scope = {**helpers, **local}
    for node in own_statements(function):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            name = called_name(node)
            if name.startswith("assert") or name in CHECKING_CALLS:
                return True
            if name in scope and name not in seen and checks(scope[name], helpers, seen | {name}):
                return True
    return False


def unchecked_tests(source: str):
    """Names of the test functions and methods of a module's source that check nothing."""
    tree = ast.parse(source)
    helpers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):  # methods call their class's helpers as self.helper(...)
            methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
            found += [name for name, n in methods.items()
                      if name.startswith("test") and not checks(n, {**helpers, **methods})]
    found += [name for name, n in helpers.items() if name.startswith("test") and not checks(n, helpers)]
    return found


MODULES = sorted(p for p in TESTS.glob("*.py") if p.name != "conftest.py")


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_every_test_asserts_something(path):
    assert unchecked_tests(path.read_text()) == [], f"{path.name}: these tests assert nothing"


def test_the_rule_can_fail():
    source = '''
def helper(x):
    assert x > 0

def test_runs_only(tmp_path):
    f(1)

def test_through_a_helper():
    helper(1)

def test_assert_inside_an_unused_hook():
    hook = lambda m: m
    def unused():
        assert False

def test_raises():
    with pytest.raises(ValueError):
        f(-1)

class TestContract:
    def check(self):
        torch.testing.assert_close(1, 1)

    def test_method(self):
        self.check()

    def test_method_that_only_runs(self):
        self.run()
'''
    assert sorted(unchecked_tests(source)) == ["test_assert_inside_an_unused_hook", "test_method_that_only_runs",
                                                     "test_runs_only"]
