"""The package's layering (README "Architecture"): imports only point down the layer order
below, no module imports itself round a cycle, the embedded SDK loads nothing of the network,
servers or learner, and the old module paths are deprecated aliases of the new ones.

Every import counts: module level, ``if TYPE_CHECKING:`` and imports inside functions (a lazy
import that points up still ties the lower layer to the upper one). The few known exceptions
are listed in ``ALLOWED_UP`` with the reason each one exists.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import loops_sdk

PACKAGE_DIR = Path(loops_sdk.__file__).resolve().parent
TESTS_DIR = Path(__file__).resolve().parent

# Lowest first. A module may import modules of its own layer or of lower ones. Keys are
# module prefixes; the longest matching prefix gives a module's layer.
LAYERS: list[tuple[str, ...]] = [
    ("loops_sdk._proto",),                        # generated message classes
    ("loops_sdk.errors",),
    ("loops_sdk.records", "loops_sdk.decision"),  # the column table; what a decision returns
    ("loops_sdk.rules",),
    ("loops_sdk.scorer", "loops_sdk._scorer"),    # the hot path: compiles what it is given
    ("loops_sdk.policy",),                        # validates by compiling (policy -> scorer)
    ("loops_sdk.sink",),
    ("loops_sdk.net",),                           # channels, server auth, the server set-up
    ("loops_sdk.sync",),                          # shipper + policy watcher, spool
    ("loops_sdk.client", "loops_sdk.redis_caps"), # DecisionClient; its capped decisions via Redis
    ("loops_sdk.metrics",),                       # Prometheus collectors (reads stats, imports none)
    ("loops_sdk.evaluation",),                    # pure numpy off-policy estimators
    ("loops_sdk.serve",),                         # the gRPC decision server
    ("loops_sdk.learner",),                       # store, join, train, gate, report, service
    ("loops_sdk.cluster",),                       # the sharded learner on Ray
    ("loops_sdk.cli",),                           # the `loops` command and the demo
    ("loops_sdk",),                               # the facade (__init__) and the old aliases
]

# Deprecated aliases of moved modules (one release): nothing in the package or the tests
# may import them.
SHIMS = {
    "loops_sdk.transport": "loops_sdk.sync.transport",
    "loops_sdk.spool": "loops_sdk.sync.spool",
    "loops_sdk.service": "loops_sdk.serve.service",
    "loops_sdk.serve_pool": "loops_sdk.serve.pool",
    "loops_sdk.unary_loop": "loops_sdk.serve.unary_loop",
    "loops_sdk.demo": "loops_sdk.cli.demo",
    "loops_sdk.report": "loops_sdk.learner.report.report",
    "loops_sdk.charts": "loops_sdk.learner.report.charts",
    "loops_sdk.batch": "loops_sdk.records",
}
SECURITY_SHIM = "loops_sdk.security"   # split three ways: re-exports instead of one alias

# (importer, imported): upward imports that exist on purpose, each inside a function.
ALLOWED_UP = {
    # Annotations only (under TYPE_CHECKING): the scorer compiles any policy-shaped object and
    # imports nothing of policy at run time.
    ("loops_sdk.scorer", "loops_sdk.policy"),
    # LoggedData.from_store, deprecated for one release: reading the store is the learner's
    # (loops_sdk.learner.window.read_logged_data).
    ("loops_sdk.evaluation.data", "loops_sdk.learner.window"),
    ("loops_sdk.evaluation.data", "loops_sdk.learner.store"),
    ("loops_sdk.evaluation.data", "loops_sdk.learner"),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*")):
        if path.suffix in (".py", ".pyx") and "__pycache__" not in path.parts:
            if path.name == "__main__.py":
                continue
            out[_module_name(path)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return (PACKAGE_DIR.parent / Path(*name.split(".")) / "__init__.py").exists()


def _resolve(importer: str, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
    if level > 1:
        base = base[:-(level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str, path: Path) -> set[str]:
    """Every loops_sdk module ``name`` imports (its own ancestors' __init__ excepted, which
    Python has already started running; the root facade, which runs before anything)."""
    text = path.read_text()
    if path.suffix == ".pyx":   # Cython: keep the plain Python import statements
        kept, open_parens = [], 0
        for line in text.splitlines():
            if open_parens or (line.startswith(("import ", "from "))
                               and " cimport " not in line and not line.startswith("cimport")):
                kept.append(line)
                open_parens += line.count("(") - line.count(")")
        text = "\n".join(kept)
    targets: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, node.level, node.module)
            mods = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for mod in mods:
            if mod in SHIMS:     # the old paths resolve through loops_sdk._moved
                targets.add(mod)
            elif mod in MODULES:
                targets.add(mod)
                parts = mod.split(".")
                for i in range(2, len(parts)):   # importing a.b.c runs package a.b first
                    parent = ".".join(parts[:i])
                    if not name.startswith(parent + ".") and parent != name:
                        targets.add(parent)
    targets.discard(name)
    targets.discard("loops_sdk")
    return targets


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    best, layer = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), i
    assert layer >= 0, f"{name} is in no layer: add it to LAYERS"
    return layer


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_imports_only_point_down():
    up = []
    for name, targets in GRAPH.items():
        for target in targets:
            if (name, target) not in ALLOWED_UP and _layer(target) > _layer(name):
                up.append(f"{name} -> {target}")
    assert not up, "imports pointing up the layer order:\n" + "\n".join(sorted(up))


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}      # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = {n: {t for t in ts if (n, t) not in ALLOWED_UP} for n, ts in GRAPH.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_parser_sees_function_level_and_relative_imports(tmp_path):
    # The transport is given callables: it must not reach back into the client.
    assert "loops_sdk.client" not in GRAPH["loops_sdk.sync.transport"]
    # function-level, relative two levels up
    assert "loops_sdk.learner.service" in GRAPH["loops_sdk.cli.main"]
    assert "loops_sdk.serve.unary_loop" in GRAPH["loops_sdk.serve.service"]   # from . import x
    pyx = [n for n, p in MODULES.items() if p.suffix == ".pyx"]                # the core
    assert pyx and all("loops_sdk.records" in GRAPH[n] or "loops_sdk.decision" in GRAPH[n]
                       for n in pyx), {n: GRAPH[n] for n in pyx}


def test_nothing_imports_the_deprecated_aliases():
    inside = [f"{n} -> {t}" for n, ts in GRAPH.items() for t in ts
              if t in SHIMS or t == SECURITY_SHIM]
    assert not inside, inside
    used = []
    for path in sorted(TESTS_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                    if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            used += [f"{path.name}: {m}" for m in mods if m in SHIMS or m == SECURITY_SHIM]
    assert not used, used


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_loops_sdk_loads_no_grpc_learner_or_servers():
    loaded = _run("import json, sys, loops_sdk; print(json.dumps(sorted(sys.modules)))")
    roots = ("grpc", "loops_sdk.learner", "loops_sdk.serve", "loops_sdk.net", "loops_sdk.sync",
             "loops_sdk.cli")
    forbidden = [m for m in loaded if m.startswith("grpc_")
                 or any(m == r or m.startswith(r + ".") for r in roots)]
    assert not forbidden, forbidden
    assert "loops_sdk.client" in loaded and "loops_sdk.scorer" in loaded


def test_the_lazy_public_names_still_resolve():
    names = _run("import json, loops_sdk\n"
                 "print(json.dumps({n: getattr(loops_sdk, n).__module__ for n in "
                 "('DecisionServer', 'DecisionServerPool', 'ServerSecurity', "
                 "'ChannelSecurity', 'TokenSet', 'open_channel', 'make_dev_certs')}))")
    assert names == {"DecisionServer": "loops_sdk.serve.service",
                     "DecisionServerPool": "loops_sdk.serve.pool",
                     "ServerSecurity": "loops_sdk.net.auth", "TokenSet": "loops_sdk.net.auth",
                     "ChannelSecurity": "loops_sdk.net.channel",
                     "open_channel": "loops_sdk.net.channel",
                     "make_dev_certs": "loops_sdk.net.devcerts"}


@pytest.mark.parametrize("old", sorted(SHIMS))
def test_old_module_paths_are_deprecated_aliases(old):
    new = SHIMS[old]
    got = _run(
        "import importlib, json, sys, warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        "print(json.dumps({'same': old is new and sys.modules[%r] is new, 'warned': "
        "[str(x.message) for x in w if x.category is DeprecationWarning]}))" % old)
    assert got["same"]
    assert any(old in m and new in m for m in got["warned"]), got["warned"]


def test_old_security_module_re_exports_the_split():
    got = _run(
        "import json, warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from loops_sdk import security\n"
        "from loops_sdk.net import auth, channel, devcerts\n"
        "print(json.dumps({'ok': security.open_channel is channel.open_channel and "
        "security.ChannelSecurity is channel.ChannelSecurity and security.TokenSet is "
        "auth.TokenSet and security.ServerSecurity is auth.ServerSecurity and "
        "security.make_dev_certs is devcerts.make_dev_certs and security.DEV_HOSTS is "
        "devcerts.DEV_HOSTS and security.join_host_port is channel.join_host_port, "
        "'warned': any(x.category is DeprecationWarning for x in w)}))")
    assert got == {"ok": True, "warned": True}


def test_python_dash_m_cli_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "loops_sdk.cli", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_the_deprecation_is_shown_to_the_importing_script(tmp_path):
    # Python's default filters show a DeprecationWarning only when it is attributed to
    # __main__: the alias must blame the importer, not the import machinery.
    script = tmp_path / "old_user.py"
    script.write_text("import loops_sdk.transport\nfrom loops_sdk import batch\n"
                      "import loops_sdk.security\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for old in ("loops_sdk.transport", "loops_sdk.batch", "loops_sdk.security"):
        assert f"DeprecationWarning: {old} is deprecated" in out.stderr, out.stderr
    assert "old_user.py:" in out.stderr


def test_every_package_is_listed_for_a_regular_install():
    # setuptools installs only the listed packages: a folder missing here is left out of a
    # regular (non-editable) install while an editable one still finds it.
    tomllib = pytest.importorskip("tomllib")
    pyproject = PACKAGE_DIR.parent / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("not a source checkout")
    listed = set(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p.parent / "__init__.py") for p in PACKAGE_DIR.rglob("__init__.py")
             if "__pycache__" not in p.parts}
    assert found == listed


def test_the_bench_has_no_import_cycles():
    """`python -m bench`'s modules (``__main__`` too: it is what runs) import each other
    without a cycle; shared helpers such as the table printer live in bench/common.py."""
    bench = PACKAGE_DIR.parent / "bench"
    if not (bench / "__main__.py").exists():
        pytest.skip("not a source checkout")
    names = {p.stem for p in bench.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in bench.glob("*.py"):
        found = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= ({node.module} if node.module else {a.name for a in node.names})
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = node.module.split(".")
                if parts[0] == "bench":
                    found |= ({parts[1]} if len(parts) > 1 else {a.name for a in node.names})
        found &= names - {path.stem}
    assert graph.get("__main__"), "the parser found none of __main__'s imports"
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle in bench/: " + " -> ".join(cycle)
