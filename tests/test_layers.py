"""Data flows one way: VCF -> cache -> windows/masks -> batches -> HMM and retrieval -> network
-> training and output -> commands. No module imports (at the top or inside a function) from a
module that stands above it, and every module has a place in the flow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "snvbert"

# Rank in the flow; a module may import from its own rank and below. A prefix covers a package.
LAYERS: dict[str, int] = {
    "snvbert": 0,  # the package itself (__version__)
    "snvbert.errors": 0,
    "snvbert.maf": 0,
    "snvbert.utils": 0,
    "snvbert.data": 0,  # the package's __init__, empty
    "snvbert.data.encoding": 1,
    "snvbert.data.genetic_map": 1,
    "snvbert.data.vcf": 1,
    "snvbert.data.sites": 1,
    "snvbert.simulate": 1,  # writes the VCFs everything else reads
    "snvbert.pretrained": 1,  # where the shipped default model lies (impute reads it)
    "snvbert.prepare": 1,
    "snvbert.data.windows": 2,
    "snvbert.data.masks": 2,
    "snvbert.data.curriculum": 2,
    "snvbert.data.batch": 3,
    "snvbert.data.agreement": 3,  # compiled agreement runs (numba)
    "snvbert.hmm": 4,
    "snvbert.data.retrieval": 4,
    "snvbert.model": 5,
    "snvbert.metrics": 5,
    "snvbert.hmm.imputer": 6,  # the classical imputer writes output VCFs
    "snvbert.data.vcf_writer": 6,
    "snvbert.data.datamodule": 6,
    "snvbert.baselines": 6,
    "snvbert.callbacks": 6,
    "snvbert.health": 6,
    "snvbert.config": 7,
    "snvbert.train": 7,
    "snvbert.impute": 7,
    "snvbert.evaluate": 7,
    "snvbert.diagnose": 7,
    "snvbert.demo": 7,
    "snvbert.merge": 7,
    "snvbert.workflow": 7,  # runs the commands above as Snakemake jobs
    "snvbert.bench": 8,
    "snvbert.pretrained.make": 8,  # trains the shipped model (make pretrained)
}


def rank(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return LAYERS[name]
    raise KeyError(module)


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path))
    return out


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # ``from snvbert.data import masks`` imports a module
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                found.add(sub if is_module else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "snvbert"}


@pytest.mark.parametrize("name,path", modules(), ids=[m for m, _ in modules()])
def test_no_module_imports_from_above_it(name: str, path: Path) -> None:
    own = rank(name)  # KeyError: a new module needs its place in LAYERS
    above = sorted(dep for dep in imports(path) if rank(dep) > own)
    assert not above, f"{name} (rank {own}) imports from above it: {above}"


def test_the_rule_catches_a_backward_import(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from snvbert.impute import impute\n")
    assert rank("snvbert.hmm.chromosome") < max(rank(dep) for dep in imports(source))
