"""The package's import graph: no cycles among lmpo's modules (imports inside functions count),
and arrows only point down the layers of docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lmpo"

# lower number = lower floor; a module may import its own floor's modules or lower floors
LAYERS = {
    "lmpo": 0, "lmpo.errors": 0,                      # the package's own __init__ (its version) and error types
    "lmpo.algorithms": 1,                             # pure tensor math and its registries
    "lmpo.config": 2,                                 # the config tree; its choice lists come from the registries
    "lmpo.data": 3, "lmpo.models": 3, "lmpo.rewards": 3, "lmpo.rollout": 3,   # the leaves
    "lmpo.parallel": 4,                               # torchrun collectives the loop calls (no-ops in one process)
    "lmpo.io": 5,                                     # output directory, checkpoints, metrics, signals
    "lmpo.stages": 6,                                 # SFT, reward model, evaluation, the embedded default model
    "lmpo.rl": 7,                                     # the loop
    "lmpo.launch": 8,                                 # launchers that run the loop elsewhere (Ray)
    "lmpo.cli": 9, "lmpo.demo": 9, "lmpo.compare": 9, "lmpo.__main__": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every lmpo module that ``name`` imports, anywhere in the file (functions included)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            # `from pkg import submodule` imports the submodule
            targets = [mod] + ["%s.%s" % (mod, a.name) for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def layer(mod: str) -> int:
    parts = mod.split(".")
    for i in range(len(parts), 1 if len(parts) > 1 else 0, -1):
        key = ".".join(parts[:i])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError("module %s is in no layer of LAYERS: add it (docs/architecture.md draws them)" % mod)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if n == m or n not in g:
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def is_package_init(mod: str, g) -> bool:
    return any(o.startswith(mod + ".") for o in g)


def test_no_import_cycles():
    g = graph()
    # a package's __init__ re-exporting its own modules is not a cycle of the design
    g = {m: {n for n in deps if not (n.startswith(m + ".") and is_package_init(m, g))} for m, deps in g.items()}
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_arrows_point_down():
    g = graph()
    upward = sorted("%s (floor %d) imports %s (floor %d)" % (m, layer(m), n, layer(n))
                    for m, deps in g.items() for n in deps if layer(n) > layer(m))
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_lmpo_imports_sit_at_the_top_of_modules():
    """Imports inside functions only for optional third-party packages (ray, vllm, peft, ...); the
    CLI alone imports a subcommand's modules when that subcommand runs (``lmpo --help`` stays fast)."""
    inside = []
    for name, path in modules().items():
        if name == "lmpo.cli":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lmpo"))
                            or isinstance(node, ast.Import) and any(a.name.startswith("lmpo") for a in node.names)):
                        inside.append("%s:%d" % (path.relative_to(PKG.parent), node.lineno))
    assert not inside, "lmpo imports inside functions: " + ", ".join(inside)


def test_the_checker_sees_cycles_and_function_level_imports(tmp_path):
    """The checker itself: a two-module cycle closed by an import inside a function is found."""
    g = {"a": {"b"}, "b": {"a"}}
    assert find_cycle(g) in (["a", "b", "a"], ["b", "a", "b"])
    pkg = tmp_path / "lmpo"
    pkg.mkdir()
    (pkg / "x.py").write_text("def f():\n    from lmpo import y\n")
    src = ast.parse((pkg / "x.py").read_text())
    names = [n for n in ast.walk(src) if isinstance(n, ast.ImportFrom)]
    assert names and names[0].module == "lmpo"


# ----------------------------------------------------------------------------- function size

MAX_LINES, MAX_PARAMS = 60, 8


def oversized(tree: ast.AST) -> list[tuple[str, int, int, int]]:
    """(name, line, lines, parameters) of every function longer than MAX_LINES lines (its def line to
    its last line, docstring included) or with more than MAX_PARAMS parameters (self and cls not
    counted; *args and **kwargs count one each)."""
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = fn.args
            names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
            names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
            n_params = len([p for p in names if p not in ("self", "cls")])
            n_lines = fn.end_lineno - fn.lineno + 1
            if n_lines > MAX_LINES or n_params > MAX_PARAMS:
                out.append((fn.name, fn.lineno, n_lines, n_params))
    return out


def test_functions_are_short_and_take_few_parameters():
    """One job per function: none longer than 60 lines or with more than 8 parameters (group what
    travels together in a record: SamplingSpec, AdvantageInputs, CallPolicy, FitSpec, ...)."""
    found = ["%s:%d %s: %d lines, %d parameters" % (path.relative_to(PKG.parent), line, name, n_lines, n_params)
             for path in sorted(PKG.rglob("*.py"))
             for name, line, n_lines, n_params in oversized(ast.parse(path.read_text(), str(path)))]
    assert not found, "functions over %d lines or %d parameters:\n" % (MAX_LINES, MAX_PARAMS) + "\n".join(found)


def test_the_size_check_counts_lines_and_parameters():
    """The checker itself on hand-written functions: 9 parameters and 61 lines are found; self and
    cls are not counted; 8 parameters and 60 lines pass."""
    nine = "def f(a, b, c, d, e, f, g, h, *, i):\n    pass\n"
    eight = "class K:\n    def m(self, a, b, c, d, e, f, g, *h):\n        pass\n"
    long = "def g():\n" + "    x = 1\n" * 60
    fits = "def h():\n" + "    x = 1\n" * 59
    assert [(n, p) for n, _, _, p in oversized(ast.parse(nine))] == [("f", 9)]
    assert oversized(ast.parse(eight)) == []
    assert [(n, ln) for n, _, ln, _ in oversized(ast.parse(long))] == [("g", 61)]
    assert oversized(ast.parse(fits)) == []
