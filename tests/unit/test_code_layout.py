"""The package's shape, as a reviewer checks it: the graph of imports between job's modules has no
cycle (imports inside functions included: a deferred import hides a cycle, it does not remove it),
and no module uses another module's private (_underscored) names."""

import ast
import pathlib

JOB = pathlib.Path(__file__).resolve().parents[2] / "job"


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in JOB.rglob("*.py"):
        parts = path.relative_to(JOB.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(mods: dict[str, pathlib.Path]) -> tuple[dict[str, set[str]], list[str]]:
    """({module: the job modules it imports}, ["module uses other.private_name", ...])."""

    def owner(name: str) -> str:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges[mod] |= {owner(a.name) for a in node.names if a.name.startswith("job")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("job"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in mods:  # a module: `from job.data import images`
                        edges[mod].add(full)
                        aliases[a.asname or a.name] = full
                        continue
                    edges[mod].add(owner(node.module or ""))
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        private.append(f"{mod} imports {full}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    private.append(f"{mod} uses {aliases[node.value.id]}.{node.attr}")
        edges[mod] -= {mod, "job"}
    return edges, private


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a path that comes back to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(mod: str, path: list[str]) -> list[str] | None:
        state[mod] = 1
        for nxt in sorted(edges.get(mod, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [mod, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[mod] = 2
        return None

    for mod in sorted(edges):
        if mod not in state:
            found = visit(mod, [mod])
            if found:
                return found
    return None


def test_the_checker_sees_a_cycle_and_a_private_use(tmp_path):
    """The checks below could pass by seeing nothing: they must flag what they look for."""
    (tmp_path / "a.py").write_text("from job import b\n\ndef f():\n    from job.c import _hidden\n    return b._inner()\n")
    (tmp_path / "b.py").write_text("def g():\n    import job.a\n")
    (tmp_path / "c.py").write_text("_hidden = 1\n")
    edges, private = imports({"job.a": tmp_path / "a.py", "job.b": tmp_path / "b.py", "job.c": tmp_path / "c.py"})
    assert cycle(edges) == ["job.a", "job.b", "job.a"]
    assert sorted(private) == ["job.a imports job.c._hidden", "job.a uses job.b._inner"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    edges, _ = imports(modules())
    assert "job.data.images" in edges["job.data.idx"]  # a module imported by name
    assert "job.storage" in edges["job.data.mirror"]


def test_job_modules_import_each_other_without_a_cycle():
    edges, _ = imports(modules())
    assert cycle(edges) is None, " -> ".join(cycle(edges) or [])


def test_no_module_uses_another_modules_private_names():
    _, private = imports(modules())
    assert private == []


def test_every_package_is_in_the_wheel():
    """setuptools puts only the listed packages in a wheel (the images install one): a new folder
    left out would be missing from the image while every test from the checkout passes."""
    import tomllib

    listed = set(tomllib.loads((JOB.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(p.parent.relative_to(JOB.parent).parts) for p in JOB.rglob("__init__.py")}
    assert packages == listed
