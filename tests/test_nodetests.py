"""ops/nodetests.py ships what tests/node imports: a module left out fails every test on the
nodes at collection (pytest exit 4), found only in the end-to-end tier. Checked here first."""

from __future__ import annotations

import ast
from pathlib import Path

from ops import nodetests
from ops.paths import ROOT

# Imported only after pytest.importorskip of a package the nodes lack (the module then skips).
CONTROLLER_ONLY = {"ops.pki"}


def _project_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("ops", "tests"):
            names.add(node.module)
            # `from ops import artifact` imports the module ops/artifact.py too
            names |= {f"{node.module}.{a.name}" for a in node.names
                      if (ROOT / node.module.replace(".", "/") / f"{a.name}.py").exists()}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] in ("ops", "tests")}
    return names


def _shipped(module: str) -> bool:
    rel = module.replace(".", "/")
    return any(rel == s or rel.startswith(s + "/") or s in (f"{rel}.py", f"{rel}/__init__.py")
               for s in nodetests.SHIPPED)


def test_every_project_module_tests_node_imports_is_shipped_to_the_nodes():
    imported = set().union(*(_project_imports(p) for p in (ROOT / "tests" / "node").glob("*.py")))
    assert "tests.waiting" in imported, "the walker finds the imports"
    missing = sorted(m for m in imported - CONTROLLER_ONLY if not _shipped(m))
    assert missing == [], f"tests/node imports {missing}, which ops/nodetests.py does not ship"
