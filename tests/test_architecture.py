"""Rules of the codebase that a reviewer would otherwise have to remember."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["actors", "learner", "replay", "cluster", "configs"]


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]


def test_the_layout_of_the_design_card() -> None:
    for name in [*PACKAGES, "tests"]:
        assert (REPO / name).is_dir(), name
    for pkg in ["actors", "learner", "replay", "cluster"]:
        assert (REPO / pkg / "__init__.py").is_file(), f"{pkg} must be an import package"
    for name in ["pyproject.toml", "Makefile", "README.md", ".ci/run"]:
        assert (REPO / name).is_file(), name


def test_nothing_unpickles() -> None:
    """Records cross process boundaries as msgpack/safetensors/numpy, never pickle."""
    banned = {"pickle", "cloudpickle", "dill", "joblib"}
    offenders = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n in banned]
    assert not offenders


def test_init_files_are_empty() -> None:
    """Importing a package must not pull in torch, vLLM or DeepSpeed."""
    for pkg in PACKAGES:
        for init in (REPO / pkg).rglob("__init__.py"):
            assert init.read_text().strip() == "", init


def test_configs_import_without_heavy_dependencies() -> None:
    code = (
        "import sys, configs.load, configs.schema; "
        "heavy = {'torch', 'transformers', 'vllm', 'deepspeed', 'ray'} & set(sys.modules); "
        "print(sorted(heavy)); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, f"configs pulled in {proc.stdout}"


SHARED_PURE_MODULES = {"learner.logprobs"}  # the one log-prob function the scorers share with the objectives
# Who may import whom: configs at the bottom, the replay on it, actors and learner side by side on both, cluster
# (the launcher, the CLI, evaluation) on top of everything. bench/ and tests/ may import anything.
MAY_IMPORT = {
    "configs": {"configs"},
    "replay": {"configs", "replay"},
    "learner": {"configs", "replay", "learner"},
    "actors": {"configs", "replay", "actors"} | SHARED_PURE_MODULES,
    "cluster": set(PACKAGES),
}


def _project_imports(path: Path) -> list[str]:
    """Every project module the file imports, at the top or inside a function."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return [n for n in names if n.split(".")[0] in PACKAGES]


def test_imports_point_down_the_layers() -> None:
    offenders = []
    for pkg, allowed in MAY_IMPORT.items():
        for path in (REPO / pkg).rglob("*.py"):
            for name in _project_imports(path):
                if name.split(".")[0] not in allowed and name not in allowed:
                    offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_the_import_rule_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from cluster.launch import train\n")
    assert _project_imports(bad) == ["cluster.launch"]
