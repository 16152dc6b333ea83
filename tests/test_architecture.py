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


def test_actors_and_learner_do_not_import_each_other() -> None:
    for side, other in (("actors", "learner"), ("learner", "actors")):
        for path in (REPO / side).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                for name in names:
                    ok = name.split(".")[0] != other or name in SHARED_PURE_MODULES
                    assert ok, f"{path.relative_to(REPO)} imports {name}"
