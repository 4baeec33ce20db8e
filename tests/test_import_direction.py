"""Imports follow the flow of the data (DESIGN.md, "Layout"), and none goes round in a circle.

Every `import` and `from ... import` in `synjax/` is read with `ast` (also the
ones inside functions and `if TYPE_CHECKING:` blocks: a lazy import is a
dependency all the same) and checked against `FLOW`: a package may import
from its own line and the lines above it, never from a line below.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "synjax"

# One line per level of the flow, earliest first; a package may import from
# its own line and the lines above it.
FLOW = (
    ("io",),  # volumes, CREMI files, the synapse table, the workdir's file names
    ("data",),  # synthetic volumes, sampling, augmentation, intensity
    ("targets",),  # training targets and class weights
    ("models", "detection"),  # Flax networks and losses; detection ops and heads
    ("train",),  # mesh, batches, settings, state, loop, checkpoints
    ("inference",),  # slice-wise and block-wise prediction, merges
    ("postprocess",),  # candidates, watershed, agglomeration, windows
    ("evaluation",),  # metrics on arrays
    ("stages",),  # one per trained model: build, train, load, predict
    ("pipelines",),  # end-to-end jobs, their data and config checks
    ("main", "view"),  # the command line; the viewer of a run
)
# Importable from anywhere; they themselves import only these and the first line.
ANYWHERE = ("errors", "geometry", "settings", "lazy", "report", "runtime")
# The config files' helper: configs import it, library code never does.
CONFIG_HELPER = "configlib"
# Earlier packages that a package may still not import. Evaluation judges
# arrays: no network, no training code, no post-processing (which takes its
# metric as an argument instead).
NEVER = {"evaluation": ("models", "detection", "train", "inference", "postprocess")}

LEVEL = {name: level for level, names in enumerate(FLOW) for name in names}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(module: str) -> bool:
    return (ROOT / pathlib.Path(*module.split(".")) / "__init__.py").is_file()


def _is_module(module: str) -> bool:
    path = ROOT / pathlib.Path(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, synjax module) of every import in a file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("synjax")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("synjax"):
                continue
            for alias in node.names:
                # `from synjax.io import atomic` imports a module; `... import open_volume` a name.
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub if _is_module(sub) else node.module))
    return sorted(set(found))


def _top(module: str) -> str | None:
    """`synjax.io.cremi` -> "io"; `synjax` itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _sources() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_is_placed():
    """A new package or top-level module must be given its place in the flow here."""
    names = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    names |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    unplaced = names - set(LEVEL) - set(ANYWHERE) - {CONFIG_HELPER}
    assert not unplaced, f"add {sorted(unplaced)} to FLOW or ANYWHERE in {__file__}"


def _violations() -> list[str]:
    found = []
    for path in _sources():
        importer = _top(_module_name(path))
        for line, module in _imports(path):
            imported = _top(module)
            if imported is None or imported == importer:
                continue
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            if imported == CONFIG_HELPER:
                found.append(f"{where}: library code never imports configlib")
            elif importer in ANYWHERE:
                if imported not in ANYWHERE and LEVEL.get(imported) != 0:
                    found.append(f"{where}: {importer} is importable from anywhere")
            elif importer == CONFIG_HELPER or imported in ANYWHERE:
                continue
            elif LEVEL[imported] > LEVEL[importer]:
                found.append(f"{where}: {imported} comes after {importer} in the flow")
            elif imported in NEVER.get(importer, ()):
                found.append(f"{where}: {importer} never imports {imported}")
    return found


def test_imports_follow_the_flow():
    assert _violations() == []


def _graph() -> dict[str, set[str]]:
    """synjax module -> the synjax modules it imports (packages as their `__init__`)."""
    graph = {}
    for path in _sources():
        name = _module_name(path)
        graph[name] = {m for _, m in _imports(path) if m != name and m != "synjax"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    graph = _graph()
    # Importing a package's module runs the package's `__init__` first, which
    # re-exports its modules: that edge is Python's, not a dependency.
    for name in list(graph):
        if _is_package(name):
            graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    assert _cycle(graph) is None


def test_no_export_hides_a_module():
    """A package must not re-export a name of one of its own modules.

    `from synjax.targets.signed_proximity import signed_proximity` in the
    package's `__init__` would make `from synjax.targets import
    signed_proximity` give the function, not the module.
    """
    clashes = []
    for init in sorted(PACKAGE.rglob("__init__.py")):
        modules = {p.stem for p in init.parent.glob("*.py")} | {
            p.name for p in init.parent.iterdir() if (p / "__init__.py").is_file()
        }
        package = _module_name(init)
        tree = ast.parse(init.read_text())
        # `from synjax.x.module import name` re-exports a name; `from synjax.x
        # import module` (the package's own module) does not.
        exported = {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module != package
            for a in n.names
        }
        # Lazy exports: the keys of the dict passed to `lazy_exports`.
        exported |= {
            k.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "lazy_exports"
            for arg in n.args
            if isinstance(arg, ast.Dict)
            for k in arg.keys
        }
        clashes += [f"{init.relative_to(ROOT)}: {name}" for name in sorted(exported & modules)]
    assert clashes == []


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.name)
def test_configs_import_only_their_helper(config):
    """Configs hold their own values: no library constant, only `synjax.configlib`."""
    imported = {module for _, module in _imports(config)}
    assert imported <= {"synjax.configlib"}, imported


def test_the_check_sees_a_violation(tmp_path):
    """The walk finds imports at any depth and resolves `from synjax.x import module`."""
    source = tmp_path / "fake.py"
    source.write_text(
        "def f():\n"
        "    from synjax.pipelines import partners\n"
        "    import synjax.train.loop\n"
        "from synjax.io import open_volume\n"
    )
    assert sorted(_imports(source)) == [
        (2, "synjax.pipelines.partners"),
        (3, "synjax.train.loop"),
        (4, "synjax.io"),
    ]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
