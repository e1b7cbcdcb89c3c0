"""The layout the design promises, read from the source: no import cycle anywhere in the project,
``probes`` never imports ``interp``, forward hooks are registered in ``interp/models.py`` only,
and the PING package names no particular model."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("interp", "probes")
HOOK_CALLS = ("register_forward_hook", "register_forward_pre_hook", "add_hook")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            out[".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module ``path`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names}
            found |= (subs & known) or {base}
    resolved = set()
    for m in found:  # a module, or the nearest package that holds it
        while m and m not in known:
            m = m.rpartition(".")[0]
        if m and m != name:
            resolved.add(m)
    return resolved


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def _is_package_edge(a: str, b: str) -> bool:
    """A package's ``__init__`` importing its own submodules (or a submodule importing a name
    its package re-exports) is how packages are built, not a design cycle."""
    return a.startswith(b + ".") or b.startswith(a + ".")


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(g[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif not state.get(v):
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(g):
        if not state.get(m):
            visit(m, [])
    return [c for c in found if not any(_is_package_edge(a, b) for a, b in zip(c, c[1:]))]


def test_no_module_imports_itself_back_through_others():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_probes_never_imports_interp():
    g = graph()
    assert {m: sorted(d) for m, d in g.items() if m.startswith("probes") and any(x.startswith("interp") for x in d)} == {}


def test_forward_hooks_are_registered_in_models_only():
    sites = sorted(str(p.relative_to(ROOT)) for p in modules().values()
                   if any(f".{call}(" in p.read_text() for call in HOOK_CALLS))
    assert sites == ["interp/models.py"]


def test_the_ping_package_names_no_particular_model():
    g = graph()
    ping = {m: sorted(d) for m, d in g.items() if m.startswith("interp.ping")}
    assert {m: [x for x in d if x.startswith(("interp.organism", "interp.smollm2"))] for m, d in ping.items()} == {
        m: [] for m in ping}


def test_models_names_no_built_in_model():
    assert not any(x.startswith(("interp.organism", "interp.smollm2")) for x in graph()["interp.models"])
