"""The package's layering, read from the source with ``ast`` so that it stays true as the code grows.

A job passes through the folders in this order, and each may import only what is below it:

    cli -> supervise -> backends -> plan -> config        (dashboard reads store/plan; worker stands apart)

Every import counts, also one deferred into a function body. A failure names the rule, the
importing file and line, and the imported module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "orchestrator"
MAX_LINES = 400
MAX_LINES_RECIPE = 520  # train_worker.py: the recipe users read top to bottom (torchtune's rule)

# component -> the components (or modules) it may import. A component is the first name under
# orchestrator/ (a sub-package, or one of the small top-level modules).
ALLOWED: dict[str, set[str]] = {
    "states": set(),                      # the vocabulary: JobState, Failure
    "errors": set(),
    "demo": set(),                        # builds the demo assets; stands alone
    "worker": {"worker"},
    "config": {"config", "errors"},
    "plan": {"plan", "config", "worker", "store.paths", "states", "errors"},
    "store": {"store", "worker", "states", "errors"},
    "backends": {"backends", "plan", "store", "worker", "config", "states", "errors"},
    "supervise": {"supervise", "backends", "plan", "store", "worker", "config", "states", "errors"},
    "dashboard": {"dashboard", "store", "plan", "worker", "states", "errors"},
    "cli": {"cli", "supervise", "backends", "plan", "store", "worker", "config", "dashboard", "states", "errors",
            "demo"},
}

RULES = {
    "config": "config is the input layer: it imports no planning, backend, store or worker code",
    "plan": "plan is pure planning: it imports no backend, supervisor, dashboard or ledger (store.paths only)",
    "store": "store holds state, not policy: no plan, backend, supervisor or dashboard",
    "backends": "backends act on plans: they never import the supervisor, the dashboard or the CLI",
    "supervise": "the supervisor never imports the dashboard or the CLI",
    "dashboard": "the dashboard only reads: it never imports a backend or the supervisor",
    "worker": "the worker stands apart: worker/ imports nothing outside worker/",
    "states": "states.py is the shared vocabulary and imports nothing of the package",
    "errors": "errors.py imports nothing of the package",
    "demo": "demo.py imports nothing of the package",
    "cli": "the CLI is the top: anything may be below it",
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in the file (deferred ones too)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import channel`: the imported names may be modules themselves
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return found


def _component(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "orchestrator" or len(parts) < 2:
        return None
    return parts[1]


def _allowed(target: str, allowed: set[str]) -> bool:
    rest = target.split(".", 1)[1] if "." in target else ""
    return any(rest == a or rest.startswith(a + ".") for a in allowed)


def _violations(component: str) -> list[str]:
    bad = []
    for module, path in _modules():
        if _component(module) != component:
            continue
        for line, target in _imports(module, path):
            if not target.startswith("orchestrator."):
                continue
            if not _allowed(target, ALLOWED[component] | {component}):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    return bad


def test_every_component_has_a_rule():
    components = {_component(m) for m, _ in _modules()} - {None}
    assert components <= set(ALLOWED), f"new component(s) without a layering rule: {components - set(ALLOWED)}"
    assert set(ALLOWED) == set(RULES)


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_layering_rule(component):
    bad = _violations(component)
    assert not bad, f"rule broken: {RULES[component]}\n  " + "\n  ".join(bad)


def test_the_worker_script_imports_only_the_worker_package():
    bad = [f"train_worker.py:{line} imports {t}" for line, t in _imports("train_worker", REPO / "train_worker.py")
           if t.startswith("orchestrator") and not t.startswith("orchestrator.worker")]
    assert not bad, "rule broken: train_worker.py runs in the job and uses only orchestrator.worker\n  " + \
        "\n  ".join(bad)


def test_only_the_worker_script_imports_trls_trainer():
    bad = []
    for module, path in _modules():
        for line, target in _imports(module, path):
            if target.startswith("trl.") and target.rsplit(".", 1)[-1].endswith("Trainer"):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not bad, "rule broken: train_worker.py is the only file that imports TRL's trainer\n  " + "\n  ".join(bad)


def test_no_module_over_the_size_limit():
    sizes = {p: len(p.read_text().splitlines()) for _, p in _modules()}
    big = [f"{p.relative_to(REPO)}: {n} lines" for p, n in sizes.items() if n > MAX_LINES]
    worker = len((REPO / "train_worker.py").read_text().splitlines())
    if worker > MAX_LINES_RECIPE:
        big.append(f"train_worker.py: {worker} lines (recipe limit {MAX_LINES_RECIPE})")
    assert not big, f"rule broken: modules stay under {MAX_LINES} lines\n  " + "\n  ".join(big)


def test_the_checker_sees_a_violation(tmp_path):
    """The rules are not vacuous: a relative import that breaks one is resolved and caught."""
    module = "orchestrator.dashboard.x"
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from ..backends.local import LocalBackend\n")
    targets = [t for _, t in _imports(module, path)]
    assert targets == ["orchestrator.backends.local.LocalBackend"]
    assert not _allowed(targets[0], ALLOWED["dashboard"])
    assert _allowed("orchestrator.store.paths.RunPaths", ALLOWED["plan"])
    assert not _allowed("orchestrator.store.ledger.Ledger", ALLOWED["plan"])
