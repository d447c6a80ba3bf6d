"""The architecture is a contract the suite checks: import-linter's contracts in
pyproject.toml (layers run downward only; the catalog, the database, DICOM I/O and the metrics
never import torch; no import cycles)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_of_pyproject_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "3 kept, 0 broken" in r.stdout


def test_only_the_configuration_module_reads_the_environment() -> None:
    import re

    readers = re.compile(r"os\.environ|os\.getenv|getenv\(")
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "workbench").rglob("*.py"))
        if path.name != "config.py" or path.parent.name != "workbench"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if readers.search(line)
    ]
    assert found == []


def test_every_workbench_environment_variable_is_in_the_readme() -> None:
    from workbench.config import ENVIRONMENT

    readme = (ROOT / "README.md").read_text()
    missing = [n for n in ENVIRONMENT if n.startswith("WORKBENCH_") and n not in readme]
    assert missing == []


def test_every_module_of_the_package_sits_in_a_layer() -> None:
    """A new module outside the layers would escape the contract unchecked."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    listed = {m.strip() for line in layers for m in line.replace("|", ":").split(":")}
    package = ROOT / "workbench"
    modules = {f"workbench.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {f"workbench.{p.parent.name}" for p in package.glob("*/__init__.py")}
    assert sorted(modules - listed) == []
