"""A Li-Stephens HMM imputer: the classical reference snvbert is measured against.

Each target haplotype is modelled as a mosaic of the panel's haplotypes (Li & Stephens 2003).
Hidden state: the panel haplotype copied; at each typed site it emits the copied allele, or the
other one with probability ``err``; between typed sites i and i+1 the copied haplotype changes
with probability ``1 - exp(-4 ne d / N)`` (d in Morgans from the genetic map, N panel
haplotypes). Forward-backward over the typed sites gives the posterior of each state there;
at an untyped site the posterior is interpolated linearly in genetic distance between the
flanking typed sites (as Minimac and Beagle do), and P(ALT) is the posterior mass on panel
haplotypes carrying ALT. Vectorised over panel haplotypes and a batch of targets: no per-state
Python loop. It reads and writes like :mod:`snvbert.impute`, with the same site matching.
With ``ibs`` the states are only the haplotypes Beagle's IBS selection keeps for each target
haplotype (:func:`snvbert.data.retrieval.ibs_states`), the states of snvbert's own HMM feature.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from snvbert.data.genetic_map import genetic_positions
from snvbert.data.retrieval import estimate_err, ibs_states
from snvbert.data.vcf import load_panel
from snvbert.impute import hmm_query, prepare_target, write_imputed


def posteriors(
    obs: np.ndarray,
    ref: np.ndarray,
    switch: np.ndarray,
    err: float,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """State posteriors at typed sites, float32 (m, B, N), by scaled forward-backward.

    obs (m, B) query alleles 0/1, -1 missing (emits 1 for every state); ref (m, N) panel
    alleles; switch (m,) probability of a jump before each site (switch[0] unused); allowed
    (B, N) bool the states each query may copy (None: all), jumps land uniformly on them.
    """
    m, b = obs.shape
    n = ref.shape[1]
    ok = np.ones((b, n), np.float32) if allowed is None else allowed.astype(np.float32)
    pi = ok / ok.sum(1, keepdims=True)

    def emission(j: int) -> np.ndarray:
        match = ref[j][None, :] == obs[j][:, None]  # (B, N)
        e = np.where(match, 1.0 - err, err).astype(np.float32)
        return np.where(obs[j][:, None] < 0, np.float32(1.0), e) * ok

    fwd = np.empty((m, b, n), dtype=np.float32)
    a = emission(0) * pi
    fwd[0] = a / a.sum(1, keepdims=True)
    for j in range(1, m):
        prior = (1 - switch[j]) * fwd[j - 1] + switch[j] * pi  # rows of fwd sum to 1
        a = prior * emission(j)
        fwd[j] = a / a.sum(1, keepdims=True)
    beta = pi.copy()
    for j in range(m - 1, -1, -1):
        post = fwd[j] * beta
        fwd[j] = post / post.sum(1, keepdims=True)  # the posterior replaces the forward value
        if j:
            be = beta * emission(j)
            beta = (1 - switch[j]) * be + switch[j] * (be * pi).sum(1, keepdims=True)
            beta /= beta.sum(1, keepdims=True)
    return fwd


def impute_hmm(
    panel: str | os.PathLike,
    target: str | os.PathLike,
    out: str | os.PathLike,
    *,
    genetic_map: str | os.PathLike | None = None,
    ne: float = 150_000.0,  # measured best of 20k-600k on the 5 Mb scenario (seed 1)
    err: float | str = "auto",
    ibs: dict | None = None,
    batch_haps: int = 32,
    cache_dir: str | os.PathLike = ".snvbert_cache",
    progress: bool = True,
) -> dict[str, int]:
    """Impute ``target`` against ``panel`` with the HMM; write ``out`` like snvbert.impute does.

    ``err`` the mismatch rate, or ``auto``: fitted to the targets by EM, as snvbert.impute does.
    ``ibs`` (keyword arguments of :func:`snvbert.data.retrieval.ibs_states`, e.g. its
    ``IBS_DEFAULTS``): only the haplotypes Beagle's IBS selection keeps are states (None: all).
    """
    panel_path, target_path = Path(panel), Path(target)
    pan = load_panel(panel_path, cache_dir=cache_dir, progress=progress)
    tgt, match, calls = prepare_target(pan, target_path, panel_path)
    typed = match.panel_index
    morgans = genetic_positions(pan.pos, genetic_map)
    n_haps = pan.n_haps
    d = np.diff(morgans[typed], prepend=morgans[typed[0]])
    switch = (1.0 - np.exp(-4.0 * ne * np.maximum(d, 1e-10) / n_haps)).astype(np.float32)
    ref_typed = np.asarray(pan.haplotypes[typed])  # (m, N)
    states = torch.from_numpy(2 * ref_typed.astype(np.int8) - 1)  # +-1, as the torch HMM reads
    if err == "auto":
        err = estimate_err(states, hmm_query(calls), None, torch.from_numpy(switch))
    err = float(err)

    # Each site's flanking typed sites and interpolation weight (nearest one outside the ends).
    right = np.clip(np.searchsorted(typed, np.arange(pan.n_sites), side="left"), 0, len(typed) - 1)
    left = np.clip(
        np.searchsorted(typed, np.arange(pan.n_sites), side="right") - 1, 0, len(typed) - 1
    )
    span = morgans[typed[right]] - morgans[typed[left]]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(span > 0, (morgans - morgans[typed[left]]) / span, 0.0).clip(0, 1)

    change = np.flatnonzero((np.diff(left) != 0) | (np.diff(right) != 0)) + 1
    runs = np.concatenate([[0], change, [pan.n_sites]])

    probs = np.empty((pan.n_sites, calls.shape[1]), dtype=np.float32)
    typed_morgan = torch.from_numpy(morgans[typed])
    for start in tqdm(
        range(0, calls.shape[1], batch_haps),
        desc="HMM",
        file=sys.stderr,
        disable=None if progress else True,
    ):
        cols = slice(start, min(start + batch_haps, calls.shape[1]))
        allowed = None
        if ibs is not None:
            allowed = ibs_states(
                hmm_query(calls[:, cols]),
                states,
                typed_morgan,
                torch.ones(cols.stop - cols.start, n_haps, dtype=torch.bool),
                **ibs,
            ).numpy()
        post = posteriors(calls[:, cols], ref_typed, switch, err, allowed)  # (m, B, N)
        # Runs of sites sharing their flanking typed sites: each run's panel rows read once.
        for lo, hi in zip(runs[:-1], runs[1:], strict=True):
            alleles = np.asarray(pan.haplotypes[lo:hi], dtype=np.float32).T  # (N, S)
            pl = post[left[lo]] @ alleles  # (B, S)
            pr = post[right[lo]] @ alleles
            ws = w[lo:hi][None, :]
            probs[lo:hi, cols] = ((1 - ws) * pl + ws * pr).T
    n = write_imputed(
        Path(out),
        pan,
        tgt,
        match,
        calls,
        probs,
        panel_path,
        f"hmm panel={panel_path} target={target_path} ne={ne} err={err:.3g} ibs={ibs}",
    )
    return {"written": n, "typed": int(len(typed)), "imputed": pan.n_sites - len(typed), "err": err}
