"""The folder tree is the architecture: each subpackage is a layer, and a layer imports only from
itself and the layers below it, with no import cycle anywhere.

Read from the source with `ast` (nothing is imported), so a violation fails here even when no
test happens to execute the offending line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peftko"
# Lowest first. The package root only holds __version__, so every layer may read it.
LAYERS = ("core", "run", "corpus", "data", "model", "evaluate", "train", "merge", "commands", "studio", "cli",
          "__main__")
# Imports of peftko's own modules inside a function, and why each is lazy. The CLI imports each
# command's module inside the command (`peftko --help` without torch); `peftko markers` loads a
# tokenizer (torch, transformers) only when --model asks for one.
LAZY = {"peftko.cli", "peftko.commands.markers"}
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported peftko module, inside a function?) for every import statement in the module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = {id(node) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(f) if node is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{package}.{base}".rstrip(".")
            # `from peftko.model import base` imports the module peftko.model.base
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found += [(t, id(node) in in_function) for t in targets if t == "peftko" or t.startswith("peftko.")]
    return found


def layer(module: str) -> int | None:
    """The layer's rank; None for the package root, which any layer may import."""
    parts = module.split(".")
    return None if len(parts) == 1 else LAYERS.index(parts[1])


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


def test_every_module_sits_in_a_known_layer():
    unknown = [m for m in GRAPH if m != "peftko" and m.split(".")[1] not in LAYERS]
    assert not unknown, f"put these modules into one of the layers {LAYERS}: {unknown}"


def test_no_layer_imports_a_layer_above_it():
    upward = [f"{m} imports {t}" for m, targets in GRAPH.items() for t, _ in targets
              if layer(m) is not None and layer(t) is not None and layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle():
    edges = {m: {t for t, _ in targets if t in GRAPH and t != m} for m, targets in GRAPH.items()}
    done, path = set(), []

    def visit(m: str) -> None:
        if m in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for t in sorted(edges[m]):
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(edges):
        visit(m)


def test_imports_are_at_the_top_except_where_laziness_is_the_point():
    lazy = [f"{m} imports {t} inside a function" for m, targets in GRAPH.items() for t, inner in targets
            if inner and m not in LAZY]
    assert not lazy, "\n".join(lazy)
    total = sum(len(targets) for targets in GRAPH.values())
    inner = sum(inner for targets in GRAPH.values() for _, inner in targets)
    assert inner <= 0.15 * total, (inner, total)


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules by responsibility: {long}"


# The engine (every layer below commands/) reports through peftko.core.progress; only commands/
# and the CLI print. What counts as printing: print(), click, rich, and sys.stdout/stderr.write.
PRINTING_MODULES = {"click", "rich_click", "rich"}
STREAMS = {"stdout", "stderr"}


def printing(path: Path) -> list[str]:
    """Each place in the module that prints, as 'line N: what'."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in PRINTING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PRINTING_MODULES:
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            found.append(f"line {node.lineno}: print()")
        elif (isinstance(node, ast.Attribute) and node.attr == "write"  # a flush before a descriptor is redirected prints nothing
              and isinstance(node.value, ast.Attribute) and node.value.attr in STREAMS):
            found.append(f"line {node.lineno}: sys.{node.value.attr}.{node.attr}")
    return found


def engine_modules() -> dict[str, Path]:
    return {m: p for m, p in modules().items() if layer(m) is not None and layer(m) < LAYERS.index("commands")}


def test_the_engine_never_prints():
    leaks = [f"{m} {where}" for m, p in engine_modules().items() for where in printing(p)]
    assert not leaks, "report through peftko.core.progress (say, warn, phase) instead:\n" + "\n".join(leaks)


def test_the_print_check_finds_each_way_of_printing(tmp_path):
    """The check above can fail: each way of printing in a module is found."""
    stray = tmp_path / "stray.py"
    stray.write_text("import sys\nimport click\nfrom rich import print as p\n\ndef f():\n    print('x')\n"
                     "    sys.stderr.write('y')\n    sys.stdout.flush()\n", encoding="utf-8")
    assert [w.split(":")[0] for w in printing(stray)] == ["line 2", "line 3", "line 6", "line 7"]
    assert engine_modules() and all(not m.startswith("peftko.commands") for m in engine_modules())


# --- the run's records are parsed in one place
RECORDS = "peftko.run.records"
RECORD_NAMES = {"MANIFEST", "RUN_FILE", "MERGE_MARK"}  # peftko.run.layout's names of the three files
RECORD_FILES = {"peftko.json", "run.json", "peftko-merge.json"}
JSON_READERS = {"loads", "read_json_object"}  # a bare `load` is also the model loader's name


def record_aliases() -> dict[str, set[str]]:
    """Each module's names for the file-name constants, followed through `import ... as` and re-exports
    (merge/gguf.py's MARK is merge/merged_folder.py's alias of MERGE_MARK)."""
    trees = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in modules().items()}
    aliases = {m: set() for m in trees}
    aliases["peftko.run.layout"] = set(RECORD_NAMES)
    changed = True
    while changed:
        changed = False
        for m, tree in trees.items():
            for node in tree.body:
                found = set()
                if isinstance(node, ast.ImportFrom) and node.module in aliases:
                    found = {a.asname or a.name for a in node.names if a.name in aliases[node.module]}
                elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id in aliases[m]:
                    found = {t.id for t in node.targets if isinstance(t, ast.Name)}
                if not found <= aliases[m]:
                    aliases[m] |= found
                    changed = True
    return aliases


def _mentions(node: ast.AST, names: set[str]) -> bool:
    return any((isinstance(n, ast.Name) and n.id in names) or (isinstance(n, ast.Attribute) and n.attr in RECORD_NAMES)
               or (isinstance(n, ast.Constant) and n.value in RECORD_FILES) for n in ast.walk(node))


def _is_json_read(call: ast.Call) -> bool:
    f = call.func
    if isinstance(f, ast.Attribute):
        return f.attr == "read_json_object" or (f.attr in ("load", "loads") and isinstance(f.value, ast.Name)
                                                 and f.value.id == "json")
    return isinstance(f, ast.Name) and f.id in JSON_READERS


def record_reads(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines that JSON-read a path built from the file names, directly or through a variable of the
    same function (`path = out / RUN_FILE; json.loads(path.read_text())`, `with open(path) as f`)."""
    lines = []
    scopes = [tree, *(f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)))]
    for scope in scopes:
        tainted = set(names)
        for node in ast.walk(scope):
            pairs = [(t, node.value) for t in getattr(node, "targets", [])] if isinstance(node, ast.Assign) else []
            pairs += [(i.optional_vars, i.context_expr) for i in getattr(node, "items", []) if i.optional_vars]
            for target, value in pairs:
                if _mentions(value, tainted):
                    tainted |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        lines += [n.lineno for n in ast.walk(scope) if isinstance(n, ast.Call) and _is_json_read(n)
                  and any(_mentions(a, tainted) for a in [*n.args, *(k.value for k in n.keywords)])]
    return sorted(set(lines))


def test_only_the_records_module_reads_peftko_json_run_json_and_the_merge_mark():
    aliases = record_aliases()
    readers = {m: lines for m, p in modules().items() if m != RECORDS
               and (lines := record_reads(ast.parse(p.read_text(encoding="utf-8")), aliases[m]))}
    assert not readers, ("read peftko.json, run.json and peftko-merge.json through peftko.run.records "
                         f"(RunRecord, RunIdentityRecord, MergeRecord), not by hand: {readers}")
