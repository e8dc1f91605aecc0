"""The package's layers point only down (shared/DESIGN.md): every import of an ldm_jax module,
at the top of a file or inside a function, goes to a lower layer or stays within its own package.
Read from the source (ast), so an import that runs only on some path is caught too."""
import ast
import os

import pytest

from tests.training.tiny import ROOT

PACKAGE = os.path.join(ROOT, "ldm_jax")

# Lowest first. A module may import its own package's modules and any module of a lower layer.
LAYERS = [
    ("runtime", "diffusion", "optim"),  # mesh and compiler options, the math, the optimiser: no ldm_jax imports
    ("data",),  # datasets, the input pipeline, the tokenizer
    ("models",),  # Flax networks
    ("interop",),  # diffusers / transformers weights and folders
    ("config",),  # configs: loading, validation, the modules they describe
    ("runs",),  # a run's files: stored config, checkpoints, metrics
    ("ldm",),  # the model object and where its weights come from
    ("generation", "pipeline"),  # the compiled sampling program and the pipeline
    ("sample_job",),  # the sample command's library
    ("evaluation",),  # the metrics (the training loop runs them at the end of a run)
    ("training",),  # the stages and the loop
    ("train", "sample", "evaluate", "convert", "experiments"),  # command lines and sweeps
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """ldm_jax.training.loop -> "training"; ldm_jax.pipeline -> "pipeline"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield path, rel.removesuffix(".__init__")


def _imports(path: str, module: str):
    """(line, imported ldm_jax module) for every import in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base == "ldm_jax":  # from ldm_jax import config: the imported names are modules
                for alias in node.names:
                    yield node.lineno, f"ldm_jax.{alias.name}"
            else:
                yield node.lineno, base


def upward_imports() -> list[str]:
    found = []
    for path, module in _modules():
        unit = _unit(module)
        if unit not in RANK:
            if unit:  # a new top-level module must be given a layer
                found.append(f"{module}: not in any layer of tests/test_layering.py")
            continue
        for line, target in _imports(path, module):
            if not target.startswith("ldm_jax."):
                continue
            other = _unit(target)
            if other == unit:
                continue
            if other not in RANK:
                found.append(f"{module}:{line} imports {target}, which is in no layer")
            elif RANK[other] > RANK[unit] or (RANK[other] == RANK[unit] and other != unit and
                                             not _same_layer_allowed(unit, other)):
                found.append(f"{module}:{line} imports {target} ({other}, above {unit})")
    return found


def _same_layer_allowed(unit: str, other: str) -> bool:
    """Within a layer only these pairs may meet: the pipeline runs the generation program."""
    return (unit, other) in {("pipeline", "generation")}


def test_imports_point_only_down():
    assert upward_imports() == []


@pytest.mark.parametrize("source, target", [("models", "interop"), ("training", "evaluation")])
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, source, target):
    """A file that imports upward (written into a copy of the package's layout) is reported."""
    fake = tmp_path / "ldm_jax"
    (fake / source).mkdir(parents=True)
    (fake / target).mkdir(parents=True)
    (fake / source / "bad.py").write_text(f"def f():\n    from ldm_jax.{target} import something\n")
    (fake / target / "fine.py").write_text(f"from ldm_jax.{source} import bad\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", str(fake))
    monkeypatch.setattr(f"{__name__}.ROOT", str(tmp_path))
    found = upward_imports()
    if RANK[target] > RANK[source]:
        assert found == [f"ldm_jax.{source}.bad:2 imports ldm_jax.{target} ({target}, above {source})"]
    else:
        assert found == [f"ldm_jax.{target}.fine:1 imports ldm_jax.{source} ({source}, above {target})"]
