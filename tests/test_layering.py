"""The import layers of dpt_fast (ARCHITECTURE.md §2): imports point down, never back up.

Every import statement of every module is read from the source with `ast` -- those inside functions
too, which a lazy import would otherwise hide -- so a model that reaches up into checkpoint I/O or a
command fails here, not in a circle at import time."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpt_fast"

# What the models may never import: the layers above them (weights I/O that builds models, the
# commands and their engines).
ABOVE_MODELS = ("dpt_fast.weights", "dpt_fast.depth_anything_weights", "dpt_fast.predict", "dpt_fast.train",
                "dpt_fast.bench", "dpt_fast.inference", "dpt_fast.export", "dpt_fast.export_cli", "dpt_fast.cli",
                "dpt_fast.cli_args", "dpt_fast.data", "dpt_fast.losses", "dpt_fast.video")
# Leaves and the checkpoint readers below the models: they never import the models (or anything above).
BELOW_MODELS = ("dpt_fast.specs", "dpt_fast.env", "dpt_fast.fileio", "dpt_fast.config_validation",
                "dpt_fast.hf_convert", "dpt_fast.checkpoints")
# The batch-inference engine under the commands and video/: choosing inputs, planning and recording
# outputs, a process's place in a run. They never import video/ (a lazy import would hide the circle)
# or a command.
ENGINE = ("dpt_fast.inference", "dpt_fast.input_files", "dpt_fast.output_manifest", "dpt_fast.distributed")
ABOVE_ENGINE = ("dpt_fast.video", "dpt_fast.predict", "dpt_fast.train", "dpt_fast.bench", "dpt_fast.export",
                "dpt_fast.export_cli", "dpt_fast.cli", "dpt_fast.cli_args")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every dpt_fast module `path` imports, anywhere in the file, relative imports resolved; for
    `from PACKAGE import NAME` both PACKAGE and PACKAGE.NAME (NAME may be a submodule)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "dpt_fast" or m.startswith("dpt_fast.")}


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_reader_resolves_relative_and_lazy_imports():
    models = PACKAGE / "models" / "dpt.py"
    assert "dpt_fast.checkpoints" in imported_modules(models)  # a lazy `from ..checkpoints import ...`
    assert "dpt_fast.models.backbone" in imported_modules(models)


def test_models_never_import_the_layers_above_them():
    offenders = {module: sorted(m for m in imports if _within(m, ABOVE_MODELS))
                 for module, imports in _graph().items() if _within(module, ("dpt_fast.models",))}
    assert not {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize("lower", BELOW_MODELS)
def test_lower_layers_never_import_the_models_or_above(lower):
    imports = _graph()[lower]
    bad = sorted(m for m in imports if _within(m, ("dpt_fast.models",) + ABOVE_MODELS))
    assert not bad, f"{lower} imports {bad}"


def test_specs_is_a_leaf():
    assert _graph()["dpt_fast.specs"] == set()


@pytest.mark.parametrize("engine", ENGINE)
def test_the_inference_engine_never_imports_video_or_the_commands(engine):
    imports = _graph()[engine]
    bad = sorted(m for m in imports if _within(m, ABOVE_ENGINE))
    assert not bad, f"{engine} imports {bad}"


def test_distributed_is_a_leaf():
    assert _graph()["dpt_fast.distributed"] == set()
