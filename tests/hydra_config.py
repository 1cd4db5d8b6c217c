"""Compose the real configs in tests, as ``python -m snvbert.<name> ...`` would."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
# The checkout's conf/, read directly (no install needed). The commands read the same folder as
# pkg://snvbert.conf in an editable install: test_package.py checks that both compose alike.
CONF = ROOT / "conf"


def compose_config(name: str, output_dir: Path, overrides: list[str]) -> DictConfig:
    """The composed config with Hydra's runtime set (so ``${hydra:...}`` paths resolve to
    ``output_dir``), and the ``hydra`` section removed, as a Hydra run hands it to ``main``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg
