"""The layer map of ``metarl_tf`` and ``serving``, and its guard (STYLE.md 11: imports point down).

Every module's imports are read with ``ast`` -- function-local ones and ``TYPE_CHECKING`` ones
included: an import that is only deferred still ties the two modules together. Importing
``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``, so it counts as importing those
packages too, except the two top packages themselves (``metarl_tf/__init__.py`` only sets
TensorFlow's environment and re-exports lazily, ``serving/__init__.py`` only documents) and the
importing module's own packages (their ``__init__`` ran before it).

No module may import a module of a higher layer; within a layer there is no cycle; and the
edges listed in ``FORBIDDEN`` never occur, whatever the layers say. A module missing from the
map fails the test: place it when you add it (docs/architecture.md explains the layers).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fresh_python import run_python

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("metarl_tf", "serving")

# Layer of every module (a package name covers its submodules unless one is listed itself).
# Lower layers know nothing of higher ones.
LAYERS: dict[int, list[str]] = {
    # data contracts and file formats: specs <-> JSON, episode arrays, typed configuration, the
    # bundle's meta.json schema, checkpoints, atomic file writes (no TensorFlow)
    0: [
        "metarl_tf.specs",
        "metarl_tf.episodes",
        "metarl_tf.config",
        "metarl_tf.version",
        "metarl_tf.bundle_schema",
        "metarl_tf.checkpoint",
        "metarl_tf.atomic_files",
    ],
    # environments; policies (the MLP forward pass, the parameter layout; the numpy half without
    # TensorFlow); advantages
    1: ["metarl_tf.envs", "metarl_tf.policy", "metarl_tf.numpy_policy", "metarl_tf.advantages"],
    # the algorithm: inner step, analytic curvature, outer steps; the sampler
    2: ["metarl_tf.maml", "metarl_tf.curvature", "metarl_tf.outer", "metarl_tf.rollout"],
    # what a trained policy is and how it leaves the library
    3: [
        "metarl_tf.bundle",
        "metarl_tf.client_weights",
        "metarl_tf.export",
        "metarl_tf.agents",
    ],
    # training and evaluation
    4: [
        "metarl_tf.training",
        "metarl_tf.evaluation",
        "metarl_tf.scratch",
    ],
    # applications: parse, call the library, print / respond
    5: ["metarl_tf.cli", "metarl_tf.__main__", "metarl_tf", "serving", "serving.*"],
}

# Edges that must never exist, whatever the layers allow: (importer prefix, imported prefix).
FORBIDDEN = [
    *[
        ("metarl_tf.envs", f"metarl_tf.{m}")
        for m in ("policy", "rollout", "bundle", "training", "evaluation", "maml")
    ],
    ("metarl_tf.policy", "metarl_tf.envs"),
    *[
        ("serving", f"metarl_tf.{m}")
        for m in ("envs", "rollout", "training", "evaluation", "scratch", "agents")
    ],  # fmt: skip
    ("metarl_tf", "serving"),
]


def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the two packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ``name`` (itself, or the module that defines the imported attribute)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``module`` imports, anywhere in its file, with the packages whose
    ``__init__`` the import runs."""
    tree = ast.parse(modules[module].read_text(), filename=str(modules[module]))
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            target = _resolve(name, modules)
            parts = target.split(".")
            # importing a.b.c runs the __init__ of a.b (not of the top package: see docstring),
            # unless a.b is a package of the importing module (whose __init__ ran before it)
            for i in range(2, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if i == len(parts) or not _covers(prefix, module):
                    targets.add(prefix)
    targets.discard(module)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: imports_of(m, modules) for m in modules}


def _matches(entry: str, module: str) -> bool:
    """An entry of :data:`LAYERS` names a module and its submodules; a top package's bare name
    only the package's ``__init__`` (``serving.*``: every module of ``serving``)."""
    if entry.endswith(".*"):
        return module.startswith(entry[:-1])
    if entry in PACKAGES:
        return module == entry
    return _covers(entry, module)


def layer_of(module: str) -> int | None:
    """The layer of the longest entry of :data:`LAYERS` that matches ``module``."""
    best, best_len = None, -1
    for layer, names in LAYERS.items():
        for name in names:
            if _matches(name, module) and len(name) > best_len:
                best, best_len = layer, len(name)
    return best


def _covers(prefix: str, module: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        layer = layer_of(module)
        if layer is None:
            problems.append(f"{module} is not in LAYERS (tests/test_layers.py): give it a layer")
            continue
        for target in sorted(targets):
            target_layer = layer_of(target)
            if target_layer is not None and target_layer > layer:
                problems.append(
                    f"{module} (layer {layer}) imports {target} (layer {target_layer}): "
                    "imports point down; move the shared part to the lower layer"
                )
    return problems


def forbidden_edges(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {target}: forbidden ({src} must not import {dst})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        for src, dst in FORBIDDEN
        if _covers(src, module) and _covers(dst, target) and not _covers(src, target)
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: one per strongly connected component of more than one
    module (Tarjan's algorithm), as the sorted list of its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer_and_imports_point_down():
    problems = layer_violations(import_graph())
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_forbidden_edges():
    problems = forbidden_edges(import_graph())
    assert not problems, "\n".join(problems)


def test_the_guards_catch_what_they_should(tmp_path):
    """The checks flag an upward import, a cycle hidden in a function, a forbidden edge and an
    unplaced module (an import graph written by hand)."""
    graph = {
        "metarl_tf.policy": {"metarl_tf.specs", "metarl_tf.maml"},  # up: 1 -> 2
        "metarl_tf.maml": {"metarl_tf.policy"},
        "metarl_tf.specs": set(),
        "metarl_tf.envs.base": {"metarl_tf.specs", "metarl_tf.envs.navigation"},
        "metarl_tf.envs.navigation": {"metarl_tf.envs.base"},  # a cycle within a layer
        "serving.engine": {"metarl_tf.bundle", "metarl_tf.envs"},  # forbidden
        "metarl_tf.bundle": set(),
        "metarl_tf.envs": set(),
        "metarl_tf.somewhere_new": set(),
    }
    layers = layer_violations(graph)
    assert any("metarl_tf.policy (layer 1) imports metarl_tf.maml" in p for p in layers)
    assert any("metarl_tf.somewhere_new is not in LAYERS" in p for p in layers)
    assert len(layers) == 2, layers
    assert sorted(cycles(graph)) == [
        ["metarl_tf.envs.base", "metarl_tf.envs.navigation"],
        ["metarl_tf.maml", "metarl_tf.policy"],
    ]
    assert forbidden_edges(graph) == [
        "serving.engine imports metarl_tf.envs: forbidden (serving must not import metarl_tf.envs)"
    ]

    # ast: a function-local import counts, and a from-import of a package's module resolves to it
    (tmp_path / "metarl_tf" / "envs").mkdir(parents=True)
    (tmp_path / "metarl_tf" / "__init__.py").write_text("")
    (tmp_path / "metarl_tf" / "envs" / "__init__.py").write_text("")
    (tmp_path / "metarl_tf" / "envs" / "base.py").write_text(
        "def f():\n    from metarl_tf.policy import make_policy\n    from . import other\n"
    )
    (tmp_path / "metarl_tf" / "envs" / "other.py").write_text("")
    (tmp_path / "metarl_tf" / "policy.py").write_text("")
    modules = {
        name: tmp_path / path
        for name, path in {
            "metarl_tf": "metarl_tf/__init__.py",
            "metarl_tf.envs": "metarl_tf/envs/__init__.py",
            "metarl_tf.envs.base": "metarl_tf/envs/base.py",
            "metarl_tf.envs.other": "metarl_tf/envs/other.py",
            "metarl_tf.policy": "metarl_tf/policy.py",
        }.items()
    }
    # (its own package metarl_tf.envs is not an edge: its __init__ ran before it)
    assert imports_of("metarl_tf.envs.base", modules) == {
        "metarl_tf.policy",
        "metarl_tf.envs.other",
    }
    # importing metarl_tf.envs.other from outside runs metarl_tf/envs/__init__.py too
    (tmp_path / "metarl_tf" / "policy.py").write_text("import metarl_tf.envs.other\n")
    assert imports_of("metarl_tf.policy", modules) == {"metarl_tf.envs", "metarl_tf.envs.other"}


def _run(script: str, **env: str) -> str:
    out = run_python(["-c", script], timeout=300, **env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_the_service_loads_a_bundle_without_environments_or_tf_agents():
    """``import serving.service`` with a bundle set, and the bundle loaded and adapted on as the
    service does, imports no gymnasium, MuJoCo or tf-agents module (nor the sampler or the
    environments), and leaves TF_USE_LEGACY_KERAS unset."""
    script = """
import os, sys
import numpy as np
import serving.service
from metarl_tf.bundle import load_bundle
bundle = load_bundle(os.environ["METARL_BUNDLE"])
obs = np.zeros((3, 2), np.float32)
adapted = bundle.adapt([(obs, np.zeros((3, 2), np.float32), np.ones(3, np.float32))])
assert bundle.horizon == 100 and bundle.action_spec.shape == (2,), bundle.horizon
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("gymnasium", "gym", "mujoco",
    "tf_agents", "tensorflow_probability") or m.startswith(("metarl_tf.envs", "metarl_tf.rollout")))
print("loaded:", loaded)
print("legacy:", os.environ.get("TF_USE_LEGACY_KERAS"))
"""
    out = _run(script, METARL_BUNDLE=str(REPO_ROOT / "saved_models" / "nav2d-maml"))
    assert "loaded: []" in out and "legacy: None" in out, out


def test_importing_the_package_sets_no_legacy_keras():
    """``import metarl_tf`` (and the core modules) leave TF_USE_LEGACY_KERAS alone: only the
    modules that import tf-agents set it."""
    out = _run(
        "import os\nimport metarl_tf, metarl_tf.bundle, metarl_tf.training\n"
        "print('legacy:', os.environ.get('TF_USE_LEGACY_KERAS'))"
    )
    assert "legacy: None" in out, out
