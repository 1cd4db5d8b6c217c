"""The classical Li–Stephens imputer: the reference snvbert is measured against (README's HMM column).

Each target haplotype is modelled as a mosaic of the panel's haplotypes; the forward–backward
over the typed sites (:class:`~snvbert.hmm.chromosome.ChromosomeHMM`, the engine snvbert's own
imputation runs) gives each state's posterior there, an untyped site takes it interpolated in
genetic position between its flanking typed sites, and P(ALT) is the posterior mass on panel
haplotypes carrying ALT, summed over the carriers of each site's minor allele only
(:class:`~snvbert.hmm.kernel.ChromosomeReadout`, compiled for the CPU). It reads targets and
writes VCFs as :mod:`snvbert.impute` does (:mod:`snvbert.data.sites`,
:mod:`snvbert.data.vcf_writer`), and needs neither the network nor Lightning nor Hydra.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from snvbert.data.encoding import call_code
from snvbert.data.genetic_map import genetic_positions
from snvbert.data.sites import prepare_target
from snvbert.data.vcf import load_panel
from snvbert.data.vcf_writer import write_imputed
from snvbert.hmm import kernel
from snvbert.hmm.chromosome import ChromosomeHMM
from snvbert.hmm.config import IBSConfig

# The mismatch rate EM starts from.
ERR_START = 0.002


def impute_hmm(
    panel: str | os.PathLike,
    target: str | os.PathLike,
    out: str | os.PathLike,
    *,
    genetic_map: str | os.PathLike | None = None,
    ne: float = 150_000.0,  # measured best of 20k-600k on the 5 Mb scenario (seed 1)
    err: float | str = "auto",
    ibs: IBSConfig | None = None,
    batch_haps: int = 128,
    cache_dir: str | os.PathLike = ".snvbert_cache",
    progress: bool = True,
    gp: bool = False,
) -> dict[str, int | float]:
    """Impute ``target`` against ``panel`` with the HMM; write ``out`` like snvbert.impute does.

    ``err`` the mismatch rate, or ``auto``: fitted to the targets by EM, as snvbert.impute does.
    ``ibs``: only the haplotypes Beagle's IBS selection keeps are states (None: all).
    Every panel haplotype is a reference; ``batch_haps`` target haplotypes run at a time.
    ``gp``: write GP beside GT:DS.
    """
    panel_path, target_path = Path(panel), Path(target)
    pan = load_panel(panel_path, cache_dir=cache_dir, progress=progress)
    tgt, match, calls = prepare_target(pan, target_path, panel_path)
    typed = match.panel_index
    morgans = genetic_positions(pan.pos, genetic_map)
    every = np.arange(pan.n_haps)
    hmm = ChromosomeHMM.from_panel(pan.haplotypes, typed, every, morgans, ne=ne, ibs=ibs)
    query = torch.from_numpy(call_code(calls))  # (m, 2n)
    if err == "auto":
        err = hmm.fit_err(query, None, start=ERR_START)
    err = float(err)

    probs = np.empty((pan.n_sites, calls.shape[1]), dtype=np.float32)
    readout = kernel.ChromosomeReadout.from_panel(pan.haplotypes, every, typed, morgans)
    for start in tqdm(
        range(0, calls.shape[1], batch_haps),
        desc="HMM",
        file=sys.stderr,
        disable=None if progress else True,
    ):
        cols = slice(start, min(start + batch_haps, calls.shape[1]))
        q = query[:, cols]
        allowed = torch.ones(q.shape[1], pan.n_haps, dtype=torch.bool)
        post = hmm.compact_posteriors(q, allowed, err)  # each query over its own states
        probs[:, cols] = readout.dosage(post)
    n = write_imputed(
        Path(out),
        pan,
        tgt,
        match,
        calls,
        probs,
        panel_path,
        f"hmm panel={panel_path} target={target_path} ne={ne} err={err:.3g} ibs={ibs}",
        gp=gp,
    )
    return {"written": n, "typed": int(len(typed)), "imputed": pan.n_sites - len(typed), "err": err}
