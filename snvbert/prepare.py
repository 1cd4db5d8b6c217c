"""``python -m snvbert.prepare vcf=PANEL``: build (or find) a panel's cache and summarise it.

Running it before training is optional, since training builds the same cache on first use, but
it shows up front what the panel holds and what was skipped and why.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from snvbert.data.vcf import Panel, load_panel
from snvbert.errors import SnvbertError
from snvbert.utils.cli import user_errors_exit


def prepare(cfg: DictConfig) -> Panel:
    """Load the panel named by ``cfg.vcf`` through its cache; the testable core of the command."""
    if not cfg.get("vcf"):
        raise SnvbertError("no panel given; run: python -m snvbert.prepare vcf=panel.vcf.gz")
    return load_panel(
        cfg.vcf,
        cache_dir=cfg.cache_dir,
        chrom=None if cfg.chrom is None else str(cfg.chrom),
        populations=cfg.populations,
        drop_monomorphic=bool(cfg.drop_monomorphic),
        progress=bool(cfg.progress),
    )


@hydra.main(version_base=None, config_path="pkg://snvbert.conf", config_name="prepare")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    print(prepare(cfg).summary())


if __name__ == "__main__":
    main()
