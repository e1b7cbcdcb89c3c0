"""Specification of the probes package as a whole: independent of interp, lazy to import."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import probes

ROOT = Path(__file__).resolve().parents[1]


def test_no_module_of_probes_imports_interp():
    importers = []
    for path in sorted((ROOT / "probes").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n == "interp" or n.startswith("interp.") for n in names):
                importers.append(path.name)
    assert importers == []


def test_import_probes_is_lazy_and_its_modules_load_no_interp():
    script = """
import json, sys
import probes
lazy = sorted(m for m in ("torch", "sklearn", "scipy") if m in sys.modules)
import probes._fit, probes._persist, probes._solver, probes.directions, probes.linear, probes.metrics
interp = [m for m in sys.modules if m.split(".")[0] == "interp"]
print(json.dumps({"lazy": lazy, "interp": interp}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.splitlines()[-1]) == {"lazy": [], "interp": []}


def test_every_public_name_is_exported_lazily():
    for name in probes.__all__:
        assert getattr(probes, name) is not None
    assert {"LayerProbes", "LinearProbe", "fit_layer_probes", "pearson", "spearman"} <= set(
        probes.__all__
    )
