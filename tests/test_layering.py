"""The package's import rule: entry points -> train / evaluation -> inference -> weights -> models ->
ops -> common, data beside models (with the TFDS builder package under it, which may use common), the
recipes (configs) apart, importing only each other, nothing importing upward,
no import cycles, and no function-local imports of the project's own modules.

Read from the source (ast), so a violation fails naming the file, the line and the import.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("p3m_jax", "tfds_p3m10k")

# Layer of a module -> the layers it may import (its own layer is always allowed).
ALLOWED = {
    "common": set(),
    "ops": {"common"},
    "models": {"ops", "common"},
    "tfds_p3m10k": {"common"},
    "configs": set(),
    "data": {"common", "tfds_p3m10k"},
    "weights": {"models", "ops", "common"},
    "inference": {"weights", "models", "ops", "common"},
    "evaluation": {"inference", "data", "weights", "models", "ops", "common"},
    "train": {"evaluation", "inference", "data", "weights", "models", "ops", "common"},
}
ALLOWED["entry"] = set(ALLOWED)  # the command-line modules and the public API on top
ENTRY_POINTS = {"main", "predict", "evaluate", "convert", "demo", "export", "serve", "__init__"}

# Function-local imports of project modules that are allowed, with why: (importing module, imported module).
DEFERRED_OK = {
    # `import p3m_jax.common...` (the TFDS builder's worker processes, a command's --help) does not import JAX.
    ("p3m_jax", "p3m_jax.models"),
    ("p3m_jax", "p3m_jax.inference"),
    # `--help` and flag errors answer before JAX and the training stack import.
    ("p3m_jax.main", "p3m_jax.common.compilation_cache"),
    ("p3m_jax.main", "p3m_jax.train.loop"),
    ("p3m_jax.main", "p3m_jax.train.checkpointing"),
    ("p3m_jax.main", "p3m_jax.train.workdir_lock"),
    ("p3m_jax.main", "p3m_jax.train.tpu_plan"),
    # The builder imports TensorFlow Datasets (seconds); grain's workers read records without it.
    ("p3m_jax.data.builds", "tfds_p3m10k.p3m10k_dataset_builder"),
    # The ONNX lowerings are jax2onnx plugins: jax2onnx is the optional export extra, imported on export only.
    ("p3m_jax.inference.export_formats", "p3m_jax.inference.onnx_pooling"),
}


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "tfds_p3m10k":
        return "tfds_p3m10k"
    if len(parts) == 1 or parts[1] in ENTRY_POINTS:  # p3m_jax.serve is a package of entry-point modules
        return "entry"
    return parts[1]


def project_imports(path: pathlib.Path, modules: set[str], root: pathlib.Path):
    """(line, imported module, whether the import is inside a function) for each project import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    local = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(child) for child in ast.walk(node) if child is not node)
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            ]
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                yield node.lineno, target, id(node) in local


def violations(root: pathlib.Path = ROOT, packages=PACKAGES) -> list[str]:
    files = {module_name(p, root): p for package in packages for p in (root / package).rglob("*.py")}
    files = {m: p for m, p in files.items() if not p.name.endswith("_test.py")}
    modules = set(files)
    problems, graph = [], {m: set() for m in modules}
    for module, path in sorted(files.items()):
        where = path.relative_to(root)
        for line, target, deferred in project_imports(path, modules, root):
            if target not in modules:
                problems.append(f"{where}:{line} imports {target}, which is not a module of the project")
                continue
            source_layer, target_layer = layer_of(module), layer_of(target)
            if target_layer != source_layer and target_layer not in ALLOWED[source_layer]:
                problems.append(f"{where}:{line} imports {target}: {source_layer} may not import {target_layer}")
            if deferred and (module, target) not in DEFERRED_OK:
                problems.append(f"{where}:{line} imports {target} inside a function (import it at the top)")
            if not deferred and target != module:
                graph[module].add(target)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_project_follows_the_import_rule():
    problems = violations()
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    layers = {layer_of(module_name(p, ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    assert layers <= set(ALLOWED), layers - set(ALLOWED)


# The longest a function of the package may be (the recipes in configs/ aside): a longer one is split
# into named steps.
MAX_FUNCTION_LINES = 120


def long_functions(root: pathlib.Path = ROOT) -> list[str]:
    """'file:line name (N lines)' for each function of both packages over MAX_FUNCTION_LINES."""
    found = []
    for path in sorted(p for package in PACKAGES for p in (root / package).rglob("*.py")):
        if "configs" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_over_120_lines(tmp_path):
    assert not long_functions(), "\n".join(long_functions())
    body = "".join(f"    x = {i}\n" for i in range(MAX_FUNCTION_LINES))
    write(tmp_path, "p3m_jax/train/long.py", f"def long():\n{body}")
    assert long_functions(tmp_path) == [f"p3m_jax/train/long.py:1 long ({MAX_FUNCTION_LINES + 1} lines)"]


def write(root: pathlib.Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    "relative, text, expected",
    [
        ("p3m_jax/models/net.py", "from p3m_jax.train import loop\n", "models may not import train"),
        ("p3m_jax/ops/conv.py", "def f():\n    from p3m_jax.ops import pool\n", "inside a function"),
        ("p3m_jax/ops/pool.py", "import p3m_jax.ops.conv\n", "import cycle: p3m_jax.ops.conv -> p3m_jax.ops.pool"),
        ("p3m_jax/common/names.py", "import p3m_jax.common.gone\n", "not a module of the project"),
    ],
)
def test_the_checker_names_each_kind_of_violation(tmp_path, relative, text, expected):
    for package in ("p3m_jax", "p3m_jax/train", "p3m_jax/models", "p3m_jax/ops", "p3m_jax/common", "tfds_p3m10k"):
        write(tmp_path, f"{package}/__init__.py", "")
    write(tmp_path, "p3m_jax/train/loop.py", "from p3m_jax.models import net\n")
    write(tmp_path, "p3m_jax/models/net.py", "from p3m_jax.ops import conv\n")
    write(tmp_path, "p3m_jax/ops/conv.py", "from p3m_jax.ops import pool\n")
    write(tmp_path, "p3m_jax/ops/pool.py", "")
    assert violations(tmp_path) == []
    write(tmp_path, relative, text)
    problems = violations(tmp_path)
    assert any(expected in problem for problem in problems), problems


def test_every_module_imports():
    """Each module of both packages imports in the test environment (every extra installed): the fast
    tier (-m "not slow") touches every module at least this far."""
    import importlib
    import pkgutil

    names = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        names += [info.name for info in pkgutil.walk_packages(root.__path__, package + ".")]
    for name in names:
        if not name.endswith("__main__"):  # the `python -m` forms run their command on import
            importlib.import_module(name)
    assert len(names) > 60, names
