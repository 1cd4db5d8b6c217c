"""snvbert as an installed package: the wheel carries every config, and the commands work from
any folder, installed from the wheel or editable (where conf/ edits take effect at once).

The entry points read their configs as ``pkg://snvbert.conf``; pyproject.toml installs the
top-level conf/ as that package. The fast tests check the listing and that, in this (editable)
environment, the package is the checkout's conf/. The slow ones build the wheel, install it in a
fresh venv as a new user would, and run commands there (minutes: mostly installing torch).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PKG_CONF = "pkg://snvbert.conf"
SIM_FILES = (
    *(f"{n}.vcf.gz{t}" for n in ("panel", "truth", "array") for t in ("", ".tbi")),
    "populations.tsv",
    "map.plink",
    "manifest.json",
)
# Never copied into the source tree the wheel is built from (a fresh clone has none of them).
NOT_SOURCE = {".git", ".venv", "outputs", "build", "multirun", "lightning_logs", "__pycache__"}


def _hydra_mains() -> dict[str, re.Match]:
    """``{module: match}`` for every ``@hydra.main(...)`` line in snvbert/."""
    found = {}
    for path in sorted((ROOT / "snvbert").rglob("*.py")):
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("@hydra.main("):
                name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                found[name] = re.search(r'config_path="([^"]*)".*config_name="([^"]*)"', line)
    return found


def _conf_yaml(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.yaml")}


def test_every_package_and_config_group_is_listed():
    """pyproject.toml lists its packages (discovery cannot see conf/ as ``snvbert.conf``): every
    package under snvbert/ and every config group must be there, or the wheel lacks it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["snvbert.conf"] == "conf"
    code = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "snvbert").rglob("__init__.py")
    }
    groups = {
        ".".join(("snvbert", "conf", *p.parent.relative_to(CONF).parts))
        for p in CONF.rglob("*.yaml")
    }
    assert (CONF / "__init__.py").is_file(), "Hydra's pkg:// source needs conf/__init__.py"
    assert set(setuptools["packages"]) == code | groups | {"snvbert.conf"}


def test_entry_points_read_the_packaged_configs():
    """A path relative to the module file (``../conf``) exists only in a checkout."""
    mains = _hydra_mains()
    assert {"snvbert.train", "snvbert.impute", "snvbert.simulate"} <= set(mains)
    for module, match in mains.items():
        assert match and match[1] == PKG_CONF, f"{module}: config_path should be {PKG_CONF}"


def test_packaged_configs_are_the_checkouts():
    """Here (editable install) ``snvbert.conf`` is the checkout's conf/, so a YAML edit counts
    at once and tests that compose from conf/ (hydra_config.py) see what the commands see."""
    found = Path(str(resources.files("snvbert.conf"))).resolve()
    assert found == CONF.resolve(), (
        f"snvbert.conf is {found}, not {CONF}: reinstall editable (make install, or "
        "pip install --no-deps -e .)"
    )
    mains = _hydra_mains()
    for module in mains:  # as each command does: importing them registers structured configs
        importlib.import_module(module)
    for name in sorted({m[2] for m in mains.values()}):
        composed = []
        for init in (
            lambda: initialize_config_module(config_module="snvbert.conf", version_base="1.3"),
            lambda: initialize_config_dir(config_dir=str(CONF), version_base="1.3"),
        ):
            GlobalHydra.instance().clear()
            with init():
                composed.append(OmegaConf.to_container(compose(name)))
        assert composed[0] == composed[1], name


# --- the wheel and the editable install in a fresh venv (slow) --------------------------------


def _run(cmd: list, cwd: Path, timeout: int = 900, **extra_env: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra_env)
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _torch_version() -> str:
    """The torch the Makefile installs first (its CPU build lies in the local index)."""
    match = re.search(r"^TORCH_VERSION \?= *(\S+)", (ROOT / "Makefile").read_text(), re.M)
    return match[1] if match else "2.13.0"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory):
    """A copy of the source tree, its wheel, and a fresh venv with torch and the wheel
    installed (its dependencies too, no extras). The venv (over 1 GB) is removed afterwards."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=lambda _, names: [
            n for n in names if n in NOT_SOURCE or n.endswith(".egg-info") or n.startswith(".")
        ],
    )
    wheels = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "-q", "-w", wheels], cwd=tmp)
    (wheel,) = wheels.glob("snvbert-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp)
    python = venv / "bin" / "python"
    # --no-compile: byte-compiling torch's files would take longer than the rest of the test.
    install = [python, "-m", "pip", "install", "-q", "--no-compile"]
    _run([*install, f"torch=={_torch_version()}"], cwd=tmp)  # first, as the Makefile does
    _run([*install, wheel], cwd=tmp)
    try:
        yield src, wheel, python
    finally:
        shutil.rmtree(venv, ignore_errors=True)


@pytest.mark.slow
def test_wheel_installs_working_commands(fresh, tmp_path: Path):
    src, wheel, python = fresh
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    packaged = {n.removeprefix("snvbert/conf/") for n in names if n.startswith("snvbert/conf/")}
    assert "__init__.py" in packaged
    assert {n for n in packaged if n.endswith(".yaml")} == _conf_yaml(src / "conf")

    assert {"snvbert/pretrained/default.ckpt", "snvbert/pretrained/default.json"} <= set(names)

    sim = _run([python, "-m", "snvbert.simulate", "out=sim", "seed=1", "size=tiny"], tmp_path)
    assert "wrote" in sim
    assert all((tmp_path / "sim" / f).is_file() for f in SIM_FILES)
    # A new user's first imputation: no training, no ckpt=, the model inside the wheel.
    imputed = _run(
        [
            python,
            "-m",
            "snvbert.impute",
            "panel=sim/panel.vcf.gz",
            "target=sim/array.vcf.gz",
            "genetic_map=sim/map.plink",
            "out=imputed.vcf.gz",
            "progress=false",
        ],
        tmp_path,
        # numba's kernel cache outside the installed package: files pip never installed would
        # outlive its uninstall and shadow the editable install the next test makes
        NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"),
    )
    assert "the default model shipped with snvbert" in imputed
    assert (tmp_path / "imputed.vcf.gz.tbi").is_file()
    job = _run([python, "-m", "snvbert.train", "--cfg", "job", "model=tiny"], tmp_path)
    cfg = OmegaConf.create(job)
    assert cfg.task_name == "train" and cfg.model.d_model > 0
    # --help lists the config groups, read from the installed package's folders.
    help_text = _run([python, "-m", "snvbert.train", "--help"], tmp_path)
    assert re.search(r"^model: .*\btiny\b", help_text, re.M), help_text
    # Every primary config composes from the installed package, which lies in the venv.
    mains = [f"{module}:{m[2]}" for module, m in _hydra_mains().items()]
    where = _run([python, "-c", _COMPOSE_ALL, *mains], tmp_path)
    assert Path(where.strip()).is_relative_to(python.parents[1])


_COMPOSE_ALL = """
import importlib, sys
from importlib import resources
from hydra import compose, initialize_config_module
mains = [arg.split(":") for arg in sys.argv[1:]]
for module, _ in mains:
    importlib.import_module(module)
with initialize_config_module(config_module="snvbert.conf", version_base="1.3"):
    for _, name in mains:
        compose(name)
print(resources.files("snvbert.conf"))
"""


@pytest.mark.slow
def test_editable_install_reads_conf_edits(fresh, tmp_path: Path):
    """``pip install -e .`` (as the Makefile does): a YAML edited in conf/ counts at once."""
    src, _, python = fresh
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", src], cwd=src)
    where = _run(
        [python, "-c", "from importlib import resources as r; print(r.files('snvbert.conf'))"],
        tmp_path,
    )
    assert Path(where.strip()).resolve() == (src / "conf").resolve()
    local = src / "conf" / "local" / "default.yaml"
    local.write_text(local.read_text() + "seed: 424242\n")
    job = _run([python, "-m", "snvbert.train", "--cfg", "job"], tmp_path)
    assert OmegaConf.create(job).seed == 424242
