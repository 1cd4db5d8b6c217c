"""The imputation workflow: chromosomes x region chunks x target batches, on Snakemake.

``python -m snvbert.workflow --configfile my.yaml --cores 8`` runs it on this machine and
``... --slurm`` on a SLURM cluster (Snakemake's SLURM executor plugin, the profile in
``profiles/slurm``); any other argument goes to Snakemake as it is (``-n`` for a dry run). The
settings are ``config.yaml`` beside this file (copy it and fill in the paths). Each
chunk x batch is one ``snvbert.impute region=... `` job; each chunk's batches are merged and the
chunks ligated by ``snvbert.merge`` into ``<out>/<chromosome>.vcf.gz``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

HERE = Path(str(files(__package__)))
SNAKEFILE = HERE / "Snakefile"
CONFIG = HERE / "config.yaml"
PROFILES = HERE / "profiles"
