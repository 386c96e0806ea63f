"""The fast subset, `pytest -m "not slow"`, stays fast: a test that needs a once-per-machine setup (real
tokenizers, llama.cpp's converter, the real 270M base), torchrun, lm-eval or a benchmark script is
marked slow, so a new heavy test cannot land in the fast subset unnoticed.

Read from the source with `ast` (nothing is imported or run), as tests/test_layering.py reads the
package: a test needs what its fixtures need, through conftest.py and fixtures imported from other
test modules.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# Fixtures whose setup is the cost: a test that needs one, directly or through other fixtures, is slow.
HEAVY_FIXTURES = {
    "real_tokenizer_dir": "fetches the llama-cpp-python sdist (77 MB) once per machine, builds real tokenizers",
    "llama_cpp": "extracts llama.cpp's converter from that sdist",
    "llama_cpp_site": "builds llama.cpp from that sdist once per machine (minutes)",
    "real_home": "builds builtin:gemma-3-270m (real weights) once per machine",
}
# The real base: a test, or a fixture it needs, whose code (docstrings and comments aside) names it is
# slow; so is one that uses a name imported from the module that defines it.
REAL_BASE, REAL_BASE_MODULE = "builtin:gemma-3-270m", "peftko.model.gemma_base"
REAL_BASE_WHY = "real weights: built once per machine, then minutes a run on 2 cores"
# What makes a whole module slow (a pattern in its code): it must carry `pytestmark` with pytest.mark.slow.
HEAVY_MODULE_CODE = {  # what it uses: (pattern, why it is slow)
    "torchrun": (r"torchrun", "a process of imports per rank, some 10 s a launch on 2 cores"),
    "lm_eval": (r"\blm_eval\b", "lm-eval's imports and task index take seconds a test"),
    "a script in benchmarks/": (r"['\"]benchmarks[/'\"]", "it runs in processes of its own"),
}
# Tests that name the real base yet are cheap, and why. Each must still exist.
CHEAP = {
    "test_real_base.py::test_without_the_package_one_line_says_what_to_install":
        "find_spec is patched, so the refusal comes before anything is built",
}


@dataclass
class Module:
    name: str  # file name
    tree: ast.Module
    fixtures: dict[str, ast.FunctionDef] = field(default_factory=dict)
    imported: dict[str, str] = field(default_factory=dict)  # name -> stem of the tests module it comes from
    real_base_names: set[str] = field(default_factory=set)  # names imported from REAL_BASE_MODULE
    slow: bool = False  # module-level pytestmark holds pytest.mark.slow


def is_slow_mark(node: ast.AST) -> bool:
    """pytest.mark.slow, alone or in a list or tuple of marks."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(is_slow_mark(e) for e in node.elts)
    return ast.unparse(node) == "pytest.mark.slow"


def fixture_decorator(f: ast.FunctionDef) -> ast.expr | None:
    for d in f.decorator_list:
        if ast.unparse(d.func if isinstance(d, ast.Call) else d) == "pytest.fixture":
            return d
    return None


def parse(name: str, source: str) -> Module:
    module = Module(name, ast.parse(source))
    for node in module.tree.body:
        if isinstance(node, ast.FunctionDef) and fixture_decorator(node) is not None:
            module.fixtures[node.name] = node
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests."):
            for alias in node.names:
                module.imported[alias.asname or alias.name] = node.module.removeprefix("tests.")
        elif isinstance(node, ast.ImportFrom) and node.module == REAL_BASE_MODULE:
            module.real_base_names |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            module.slow = is_slow_mark(node.value)
    return module


def code_text(node: ast.AST) -> str:
    """NODE's code without docstrings or comments, lower-cased: what it does, not what it says."""
    node = ast.parse(ast.unparse(node))  # a copy, without comments
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body[0] = ast.Pass()
    return ast.unparse(node).lower()


def requested(f: ast.FunctionDef) -> list[str]:
    """The fixtures F asks for: its arguments, @pytest.mark.usefixtures and request.getfixturevalue."""
    names = [a.arg for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs]
    for call in ast.walk(f):
        if isinstance(call, ast.Call) and (ast.unparse(call.func) == "pytest.mark.usefixtures"
                                           or ast.unparse(call.func).endswith(".getfixturevalue")):
            names += [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return names


def autouse(module: Module) -> list[str]:
    return [n for n, f in module.fixtures.items() if "autouse=True" in ast.unparse(fixture_decorator(f))]


def collected(module: Module):
    """(test function, the decorators that mark it): module-level tests and those of Test* classes."""
    for node in module.tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            yield node, node.decorator_list
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for f in node.body:
                if isinstance(f, ast.FunctionDef) and f.name.startswith("test_"):
                    yield f, node.decorator_list + f.decorator_list


class Suite:
    def __init__(self, modules: list[Module]):
        self.modules = {Path(m.name).stem: m for m in modules}

    def fixture(self, stem: str, name: str) -> tuple[str, ast.FunctionDef] | None:
        """The fixture NAME as module STEM sees it: its own, one it imports, else conftest's."""
        module = self.modules[stem]
        if name in module.fixtures:
            return stem, module.fixtures[name]
        if module.imported.get(name) in self.modules:
            return self.fixture(module.imported[name], name)
        conftest = self.modules.get("conftest")
        if stem != "conftest" and conftest and name in conftest.fixtures:
            return "conftest", conftest.fixtures[name]
        return None

    def needs(self, stem: str, test: ast.FunctionDef) -> list[ast.FunctionDef]:
        """Every fixture TEST needs, through other fixtures too, the autouse ones included."""
        first = requested(test) + autouse(self.modules[stem])
        if "conftest" in self.modules:
            first += autouse(self.modules["conftest"])
        todo, seen, out = [(stem, name) for name in first], set(), []
        while todo:
            found = self.fixture(*todo.pop(0))
            if found is not None and (found[0], found[1].name) not in seen:
                seen.add((found[0], found[1].name))
                out.append(found[1])
                todo += [(found[0], p) for p in requested(found[1])]
        return out

    def names_real_base(self, module: Module, f: ast.FunctionDef) -> bool:
        """F's code names the real base. (F may be a fixture of another module: its own imports count.)"""
        owner = next((m for m in self.modules.values() if m.fixtures.get(f.name) is f), module)
        used = {n.id for n in ast.walk(f) if isinstance(n, ast.Name)}
        return REAL_BASE in code_text(f) or bool(used & owner.real_base_names)

    def problems(self, cheap: dict[str, str] = CHEAP) -> list[str]:
        out = []
        for stem, module in sorted(self.modules.items()):
            if not stem.startswith("test_"):
                continue
            if not module.slow:
                whole = code_text(module.tree)
                out += [f"{module.name} uses {what} ({why}): give the module `pytestmark = pytest.mark.slow`"
                        for what, (pattern, why) in HEAVY_MODULE_CODE.items() if re.search(pattern, whole)]
                if stem.endswith("_benchmark"):
                    out.append(f"{module.name} tests a benchmark script: give it `pytestmark = pytest.mark.slow`")
            for test, marks in collected(module):
                if module.slow or any(is_slow_mark(d) for d in marks):
                    continue
                where, needed = f"{module.name}::{test.name}", self.needs(stem, test)
                out += [f"{where} needs fixture {f.name} ({HEAVY_FIXTURES[f.name]}): mark it slow"
                        for f in needed if f.name in HEAVY_FIXTURES]
                if where not in cheap and any(self.names_real_base(module, f) for f in [test, *needed]):
                    out.append(f"{where} uses {REAL_BASE} ({REAL_BASE_WHY}): mark it slow")
        return out


def this_suite() -> Suite:
    """tests/*.py but this file, which names everything it looks for."""
    return Suite([parse(p.name, p.read_text(encoding="utf-8")) for p in sorted(TESTS.glob("*.py"))
                  if p.name != Path(__file__).name])


def test_every_heavy_test_is_marked_slow():
    assert this_suite().problems() == []


def test_each_cheap_exception_is_a_test_that_exists():
    suite = this_suite()
    for where in CHEAP:
        file, name = where.split("::")
        module = suite.modules[Path(file).stem]
        assert any(isinstance(f, ast.FunctionDef) and f.name == name for f in module.tree.body), where


CONFTEST = '''
import pytest

@pytest.fixture(scope="session")
def real_tokenizer_dir():
    return fetch()

@pytest.fixture(scope="session")
def real_base(tmp_path_factory, real_tokenizer_dir):
    return build(real_tokenizer_dir)

@pytest.fixture
def tiny(tmp_path):
    return tmp_path
'''


def test_the_check_finds_what_a_missing_mark_lets_into_the_fast_subset():
    heavy = '''
import pytest
from peftko.model.gemma_base import NAME as REAL
from tests.other import exported

@pytest.fixture
def run(real_base):
    return train(real_base)

def test_through_two_fixtures(run, tiny):
    """Not builtin:gemma-3-270m: a docstring says what it likes."""

def test_through_an_imported_fixture(exported):
    pass

@pytest.mark.usefixtures("run")
def test_through_usefixtures():
    pass

def test_through_getfixturevalue(request):
    request.getfixturevalue("real_base")

def test_real_weights(tmp_path):
    train("builtin:gemma-3-270m")  # comments and docstrings aside, the code says it

def test_real_weights_by_name(tmp_path):
    train(REAL)

@pytest.mark.slow
def test_marked(run):
    pass

def test_cheap(tiny):
    """torchrun, lm_eval and builtin:gemma-3-270m in a docstring are no cost."""

class TestGrouped:
    def test_in_a_class(self, run):
        pass

@pytest.mark.slow
class TestMarked:
    def test_in_a_marked_class(self, run):
        pass
'''
    other = '''
import pytest

@pytest.fixture(scope="module", params=["a", "b"])
def exported(real_base, llama_cpp):
    return merge(real_base, llama_cpp)
'''
    launches = 'import pytest\nTORCHRUN = "torchrun"\npytestmark = [pytest.mark.skipif(False, reason="x")]\n'
    marked = launches.replace('reason="x")]', 'reason="x"), pytest.mark.slow]')
    suite = Suite([parse("conftest.py", CONFTEST), parse("test_heavy.py", heavy), parse("other.py", other),
                   parse("test_launches.py", launches), parse("test_marked.py", marked),
                   parse("test_x_benchmark.py", "import subprocess\n")])
    problems = suite.problems(cheap={})
    assert [p.split(" (")[0] for p in problems] == [
        "test_heavy.py::test_through_two_fixtures needs fixture real_tokenizer_dir",
        "test_heavy.py::test_through_an_imported_fixture needs fixture real_tokenizer_dir",
        "test_heavy.py::test_through_usefixtures needs fixture real_tokenizer_dir",
        "test_heavy.py::test_through_getfixturevalue needs fixture real_tokenizer_dir",
        "test_heavy.py::test_real_weights uses builtin:gemma-3-270m",
        "test_heavy.py::test_real_weights_by_name uses builtin:gemma-3-270m",
        "test_heavy.py::test_in_a_class needs fixture real_tokenizer_dir",
        "test_launches.py uses torchrun",
        "test_x_benchmark.py tests a benchmark script: give it `pytestmark = pytest.mark.slow`",
    ], problems
