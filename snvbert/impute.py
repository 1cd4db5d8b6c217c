"""``python -m snvbert.impute``: impute a phased target (array) VCF against a reference panel.

::

    python -m snvbert.impute ckpt=run/checkpoints/last.ckpt panel=panel.vcf.gz \\
        target=array.vcf.gz out=imputed.vcf.gz

The steps, each of which names what it changed:

1. **Checkpoint.** The model, and the description of the data it was trained on (saved by
   :class:`~snvbert.data.datamodule.SNVDataModule` in every checkpoint): the window geometry,
   the retrieval context, the HMM's settings. Any phased panel and region can be given: the
   windows, retrieval context and HMM are rebuilt on it with those settings (the network's
   inputs, within-window positions, distances, allele frequencies, neighbours' agreement runs
   and HMM posteriors, are the same kind of numbers on any panel); the summary says how it
   differs from the training panel, and K shrinks to a panel with fewer haplotypes.
2. **Site matching** by CHROM:POS:REF:ALT (:mod:`snvbert.data.sites`). A ``chr`` prefix difference is
   harmonised; REF/ALT-swapped sites are flipped (never strand-ambiguous A/T, C/G ones); sites
   whose alleles do not match are dropped; target sites absent from the panel are written
   through unchanged. Too little overlap means another build or chromosome: an error.
3. **Queries.** Each target haplotype is observed at its matched, non-missing sites and hidden
   everywhere else: untyped panel sites and missing calls alike are predicted.
4. **Windows** exactly as in training. The Li–Stephens HMM over the reference runs once per
   block of target people over the whole chromosome's typed sites (switch rates from
   ``genetic_map=``, else on the training panel the map the model was trained with, else a
   constant 1 cM/Mb; its mismatch rate fitted to the
   targets by EM; :class:`snvbert.hmm.ChromosomeHMM`, compiled for the CPU in
   :mod:`snvbert.hmm.kernel`), and gives P(ALT) at every site. Per window, the reference's
   context is built once per block; per batch of people the neighbours are retrieved and the
   network run at the sites where the HMM is not already certain (``model.hmm_certain``;
   elsewhere the HMM's answer stands), their neighbour features made for those sites alone.
   Each site takes the prediction of the one window whose core holds it.
5. **Output** (:mod:`snvbert.data.vcf_writer`): a bgzipped, tabix-indexed VCF with phased GT and
   DS per sample (and GP with ``gp=true``) and AF, DR2 and IMP per site, as Beagle 5 writes
   them; written atomically.

This module holds the imputation steps only: batches are built by :mod:`snvbert.data.batch`,
neighbours and HMM read-outs by :func:`snvbert.data.retrieval.retrieve`, as in training.
"""

from __future__ import annotations

import functools
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from snvbert.config import filled
from snvbert.data.batch import MASK, assemble_batch, panel_inputs
from snvbert.data.encoding import call_code, plus_minus
from snvbert.data.genetic_map import genetic_positions
from snvbert.data.retrieval import INDEXES, Retriever, retrieve
from snvbert.data.sites import in_region, parse_region, prepare_target
from snvbert.data.vcf import Panel, load_panel
from snvbert.data.vcf_writer import write_imputed
from snvbert.data.windows import Window, make_windows
from snvbert.errors import SnvbertError
from snvbert.hmm import (
    HMM_MEMORY_BYTES,
    ChromosomeHMM,
    HMMConfig,
    IBSConfig,
    ibs_by_default,
    kernel,
)
from snvbert.hmm.readout import PanelReadout
from snvbert.utils.checkpoint import load_checkpoint
from snvbert.utils.cli import user_errors_exit
from snvbert.utils.io import partial_prefix
from snvbert.utils.progress import progress as progress_bar

log = logging.getLogger("snvbert.impute")

# Most bytes of the reference's +-1 code imputation keeps for the whole chromosome.
PANEL_CODE_BYTES = 1024**3

IMPUTE_STREAM = 7
"""Tie-break stream of imputation; training uses 0, evaluation 1-3. Fixed: imputation is
deterministic, the same target gives the same output on every run."""

# The retrieval settings of checkpoints written before they recorded the faiss index's.
_OLD_RETRIEVAL = {"nlist": 64, "nprobe": 8, "hnsw_m": 32}


# --- checkpoint ---------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """The network and what imputation must reproduce of its training data."""

    net: torch.nn.Module
    describe: dict[str, Any]
    retrieval: dict[str, Any]
    hmm: HMMConfig | None


def load_trained(ckpt: str | Path, device: torch.device) -> TrainedModel:
    """Load a checkpoint written by ``snvbert.train``; errors name the file and what to do.

    The net alone, without Lightning (whose import costs seconds of every imputation), read
    with ``weights_only=True`` (:func:`snvbert.utils.checkpoint.load_checkpoint`)."""
    from snvbert.model.net import net_from_checkpoint

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise SnvbertError("checkpoint not found; pass ckpt=PATH to a .ckpt file", path=ckpt)
    raw = load_checkpoint(ckpt)  # weights_only: a checkpoint runs no code
    describe = (raw.get("SNVDataModule") or {}).get("describe")
    if not describe:
        raise SnvbertError(
            "holds no description of its training data (SNVDataModule state); pass a checkpoint "
            "written by python -m snvbert.train",
            path=ckpt,
        )
    try:
        net = net_from_checkpoint(raw).to(device)
    except (KeyError, TypeError, RuntimeError) as err:
        raise SnvbertError(
            f"holds no snvbert network this version can load ({err}); retrain with it", path=ckpt
        ) from err
    if not isinstance(describe.get("retrieval"), dict):
        raise SnvbertError(
            "lacks the retrieval settings of its training run; retrain with this snvbert version",
            path=ckpt,
        )
    hmm = describe.get("hmm")
    return TrainedModel(
        net,
        dict(describe),
        {**_OLD_RETRIEVAL, **describe["retrieval"]},
        None if hmm is None else HMMConfig.from_checkpoint(hmm),
    )


# --- the model over windows -----------------------------------------------------------------


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SnvbertError(f"device='{device}' must be auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SnvbertError("device=cuda but no CUDA device is available; use device=cpu")
    return torch.device(device)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a GPU that has it (precision=auto), full precision otherwise."""
    p = str(precision)
    if p == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else None
    if p in ("32", "32-true", "fp32"):
        return None
    if p in ("bf16", "bf16-mixed"):
        return torch.bfloat16
    raise SnvbertError(f"precision='{precision}' must be auto, 32 or bf16")


def predict(
    model: TrainedModel,
    panel: Panel,
    typed_sites: np.ndarray,
    typed_alleles: np.ndarray,
    query_persons: np.ndarray,
    ref_persons: np.ndarray,
    af: np.ndarray,
    *,
    k: int,
    batch_size: int,
    morgans: np.ndarray | None = None,
    hmm_err: float | None = None,
    hmm_ibs: IBSConfig | None | str = "train",
    device: torch.device,
    autocast: torch.dtype | None,
    progress: bool = True,
) -> np.ndarray:
    """P(ALT) per panel site and target haplotype, float32 (n_sites, 2 * n_targets).

    typed_sites (m,) increasing panel site indices observed in the target; typed_alleles
    (m, 2 * n_targets) int8 0/1, -1 where a call is missing (hidden, so predicted).
    query_persons (n_targets,) the person id of each target in retrieval exclusion: a panel
    index when the target is also a panel person (so it never retrieves itself), else negative.
    morgans (n_sites,) the panel sites' genetic positions (None: a constant 1 cM/Mb).
    hmm_err the HMM's mismatch rate (None: the one the model was trained with). hmm_ibs the
    panel-state HMM's IBS state selection (None: every reference haplotype is a state;
    "train": as the model was trained).
    """
    describe = model.describe
    length = int(describe["window"]["length"])
    windows = make_windows(
        panel.pos, length, int(describe["window"]["overlap"]), int(describe["context_bp"])
    )
    seed = int(describe["seed"])
    retrieval = {key: v for key, v in model.retrieval.items() if key != "k"}
    retriever = Retriever(k=k, **retrieval)
    ref_persons = np.asarray(ref_persons, dtype=np.int64)
    ref_haps = np.stack([2 * ref_persons, 2 * ref_persons + 1], 1).ravel()
    n_targets = len(query_persons)
    probs = np.full((panel.n_sites, 2 * n_targets), np.nan, dtype=np.float32)
    hmm = model.hmm
    if hmm is not None and hmm_err is not None:
        hmm = replace(hmm, err=float(hmm_err))
    if hmm is not None and hmm_ibs != "train":
        hmm = replace(hmm, ibs=hmm_ibs)
    morgans = genetic_positions(panel.pos, None) if morgans is None else morgans
    chromosome = None  # the panel-state HMM over the typed sites of the whole chromosome
    compiled = _compiled_path(device)
    if hmm is not None and hmm.states == "panel" and len(typed_sites):
        # The compiled path holds a block of people's posteriors, the block sized below to
        # HMM_MEMORY_BYTES (so one person must fit); the dense one a whole batch's.
        queries = 2 if compiled else 2 * batch_size
        if ChromosomeHMM.fits(len(typed_sites), len(ref_haps), queries, HMM_MEMORY_BYTES):
            chromosome = ChromosomeHMM.from_panel(
                panel.haplotypes,
                typed_sites,
                ref_haps,
                morgans,
                ne=hmm.ne,
                ibs=hmm.ibs,
                device=device,
            )
        else:
            log.info("the chromosome-wide HMM would not fit in memory: the HMM runs per window")
    compact = chromosome is not None and compiled
    # The reference haplotypes' +-1 code over the whole chromosome, made once (each window's
    # context is a view of it) when it takes at most PANEL_CODE_BYTES; else per window.
    panel_pm = None
    if panel.n_sites * len(ref_haps) <= PANEL_CODE_BYTES:
        panel_pm = np.ascontiguousarray(plus_minus(np.asarray(panel.haplotypes)[:, ref_haps]).T)
    readouts = compact and hmm.select == "score"  # P(ALT) and neighbours' posteriors precomputed
    if readouts:
        sparse = kernel.ChromosomeReadout.from_panel(
            panel.haplotypes, ref_haps, typed_sites, morgans
        )
    # Blocks of people: the HMM runs once per block over the whole chromosome, then each
    # window's panel context is built once per block and serves every batch of it. On a CPU a
    # block is as many people as HMM_MEMORY_BYTES of posteriors over their own states hold
    # (compiled kernel; a whole number of batches, or one smaller batch when a batch's would
    # not fit); on a GPU one batch (the dense torch pass).
    per_person = 2 * max(1, len(typed_sites)) * len(ref_haps) * 4
    block = batch_size
    if compact:
        fit = max(1, HMM_MEMORY_BYTES // per_person)
        block = fit // batch_size * batch_size if fit >= batch_size else fit
    blocks = [np.arange(i, min(i + block, n_targets)) for i in range(0, n_targets, block)]
    n_batches = sum(-(-len(b) // batch_size) for b in blocks)
    bar = progress_bar(len(windows) * n_batches, "imputing", "batches", log, enabled=progress)
    for people_block in blocks:
        block_rows = np.stack([2 * people_block, 2 * people_block + 1], 1).ravel()
        block_persons = np.repeat(query_persons[people_block], 2)
        block_post = None  # the block's posteriors: compact (CPU) or dense (B, N, U) (GPU)
        if chromosome is not None:
            q = torch.from_numpy(call_code(typed_alleles[:, block_rows])).to(device)
            allowed = _allowed_states(block_persons, ref_persons).to(device)
            if compact:
                block_post = chromosome.compact_posteriors(q, allowed, float(hmm.err))
                if readouts:  # the HMM's P(ALT) at every site, (n_sites, block haplotypes)
                    block_dose = sparse.dosage(block_post)
            else:
                block_post = chromosome.posteriors(q, allowed, float(hmm.err))
        batches = [
            np.arange(i, min(i + batch_size, len(people_block)))
            for i in range(0, len(people_block), batch_size)
        ]
        for window in windows:
            c0, c1 = window.ctx_start, window.ctx_end
            lo, hi = np.searchsorted(typed_sites, [c0, c1])
            span = _context_columns(window, typed_sites[lo:hi], retriever.feature_sites)
            ctx_cols = np.arange(c0, c1) if isinstance(span, slice) else span
            if panel_pm is not None:
                ctx_rows, ctx = None, panel_pm[:, span]
            else:
                ctx_rows, ctx = np.asarray(panel.haplotypes[span]), None  # (C, n_panel_haps)
            side = panel_inputs(
                ctx_rows,
                ref_haps,
                ref_persons,
                window,
                seed=seed,
                stream=IMPUTE_STREAM,
                epoch=0,
                panel_ctx=ctx,
            )
            side = {key: v.to(device) for key, v in side.items()}
            cols = np.searchsorted(ctx_cols, typed_sites[lo:hi])
            for local in batches:
                people = people_block[local]
                in_block = np.stack([2 * local, 2 * local + 1], 1).ravel()
                # rows 2i, 2i+1: one person
                rows = np.stack([2 * people, 2 * people + 1], 1).ravel()
                persons = block_persons[in_block]
                haps = np.where(persons >= 0, 2 * persons + np.tile([0, 1], len(people)), -1 - rows)
                calls = typed_alleles[lo:hi, rows].T  # (B, m_w) 0/1, -1 missing
                hidden = np.ones((len(rows), len(ctx_cols)), dtype=bool)
                hidden[:, cols] = calls < 0
                observed = np.zeros((len(rows), len(ctx_cols)), dtype=np.int8)
                observed[:, cols] = np.maximum(calls, 0)
                batch = assemble_batch(
                    window,
                    length,
                    observed,
                    observed,
                    hidden,
                    pos=panel.pos,
                    morgans=morgans,
                    af=af,
                    haps=haps,
                    persons=persons,
                    ctx_columns=ctx_cols,
                )
                batch = {key: v.to(device) for key, v in batch.items()} | side
                panel_post, readout = None, None
                if readouts:
                    dose = np.zeros((len(rows), length), dtype=np.float32)
                    dose[:, : window.length] = block_dose[window.start : window.end, in_block].T
                    readout = PanelReadout(
                        torch.from_numpy(dose).to(device),
                        torch.from_numpy(cols).to(device),
                        functools.partial(
                            _neighbour_posteriors, block_post, in_block, lo, hi, len(ref_haps)
                        ),
                    )
                elif block_post is not None and hi > lo:
                    if compact:
                        post = block_post.dense(len(ref_haps), in_block, lo, hi)
                        post = torch.from_numpy(post).to(device)
                    else:
                        post = block_post[in_block][:, :, lo:hi]
                    panel_post = (post, torch.from_numpy(cols).to(device))
                cs, ce = window.core_start - window.start, window.core_end - window.start
                sites = None  # with a readout, the network's chosen sites are known beforehand
                if readout is not None:
                    run = model.net.chosen_sites(
                        batch["tokens"], batch["pad"], readout.dose, batch["af"]
                    )
                    if run is not None:
                        # a row whose core holds no hidden site the net runs at keeps the HMM's
                        # answer there: its typed sites need not run either
                        hidden_core = batch["tokens"][:, cs:ce] == MASK
                        run &= (run[:, cs:ce] & hidden_core).any(1, keepdim=True)
                        sites = torch.nonzero(run, as_tuple=True)
                batch = retrieve(batch, retriever, hmm, panel_post, readout, sites)
                with (
                    torch.inference_mode(),
                    torch.autocast(
                        device.type, dtype=autocast or torch.float32, enabled=autocast is not None
                    ),
                ):
                    logits = model.net(batch)["logits"]
                p = torch.sigmoid(logits.float())[:, : window.length].cpu().numpy()  # (B, W)
                probs[window.core_start : window.core_end, rows] = p[:, cs:ce].T
                bar.update()
    bar.close()
    return probs


def _compiled_path(device: torch.device) -> bool:
    """Whether predict takes the CPU path (compiled HMM, compact posteriors, sparse read-out,
    packed neighbour features) rather than the GPU one (the dense torch HMM, features over the
    window). A test runs the GPU path on the CPU by replacing this."""
    return device.type == "cpu"


def _context_columns(
    window: Window, typed: np.ndarray, feature_sites: int | None
) -> slice | np.ndarray:
    """The panel sites of a window's context that imputation builds its batches over.

    Only the typed sites and the window's own are read (every other context column is hidden
    for every query): those, sorted, while the per-site features keep every typed column of the
    context (at most ``feature_sites``), which makes the result the same as over the whole
    context (``tests/test_impute.py``); else the whole context, ``slice(ctx_start, ctx_end)``.
    """
    if feature_sites is not None and len(typed) > feature_sites:
        return slice(window.ctx_start, window.ctx_end)
    return np.union1d(typed, np.arange(window.start, window.end))


def _neighbour_posteriors(
    post: kernel.CompactPosteriors,
    rows: np.ndarray,
    lo: int,
    hi: int,
    n_states: int,
    idx: torch.Tensor,
    at: torch.Tensor | None = None,
    which: torch.Tensor | None = None,
) -> torch.Tensor:
    """The posteriors (B, K, hi - lo) of neighbours ``idx`` (B, K) of queries ``rows`` at the
    block's HMM columns lo:hi, or (B, K, len(at)) at those ``at`` (indices into lo:hi) only;
    ``which`` (B',): the neighbours ``idx`` (B', K) are those of queries ``rows[which]``."""
    columns = np.arange(lo, hi) if at is None else lo + at.cpu().numpy()
    if which is not None:
        rows = rows[which.cpu().numpy()]
    got = kernel.take_states(post, rows, idx.cpu().numpy(), columns, n_states)
    return torch.from_numpy(got).to(idx.device)


def _allowed_states(persons: np.ndarray, ref_persons: np.ndarray) -> torch.Tensor:
    """(B, N) bool: which reference haplotypes each query may copy (never its own person's)."""
    return torch.from_numpy(persons[:, None] != np.repeat(ref_persons, 2)[None, :])


# At most this many typed sites and target haplotypes inform the estimated HMM error rate.
ERR_FIT_SITES = 4000
ERR_FIT_HAPS = 256


def fit_hmm_err(
    model: TrainedModel,
    panel: Panel,
    typed_sites: np.ndarray,
    typed_alleles: np.ndarray,
    query_persons: np.ndarray,
    ref_persons: np.ndarray,
    morgans: np.ndarray,
    device: torch.device,
    ibs: IBSConfig | None,
) -> float | None:
    """The HMM mismatch rate these targets call for (EM, :meth:`ChromosomeHMM.fit_err`); None
    without HMM.

    Genotyping errors and phase switches raise it, an error-free array lowers it towards Li and
    Stephens' value; a fixed rate is right for one kind of array only (on the 5 Mb scenario the
    whole-panel HMM's r² is 0.9719 at 1e-4 and 0.9714 at 0.002 on the clean array, 0.9620 and
    0.9646 on the realistic one, with 0.5 % genotype errors). At most ERR_FIT_SITES typed sites
    (the middle ones) and ERR_FIT_HAPS target haplotypes are used, the HMM over the states
    imputation runs (``ibs``: IBS-selected, None: every reference haplotype).
    """
    if model.hmm is None or len(typed_sites) < 2:
        return None
    m = len(typed_sites)
    lo = max(0, (m - ERR_FIT_SITES) // 2)
    sites = slice(lo, lo + ERR_FIT_SITES)
    ref_haps = np.stack([2 * ref_persons, 2 * ref_persons + 1], 1).ravel()
    hmm = ChromosomeHMM.from_panel(
        panel.haplotypes,
        typed_sites[sites],
        ref_haps,
        morgans,
        ne=model.hmm.ne,
        ibs=ibs,
        device=device,
    )
    q = torch.from_numpy(call_code(typed_alleles[sites, :ERR_FIT_HAPS])).to(device)
    persons = np.repeat(query_persons, 2)[:ERR_FIT_HAPS]
    allowed = _allowed_states(persons, ref_persons).to(device)
    return hmm.fit_err(q, allowed, start=float(model.hmm.err), memory_bytes=HMM_MEMORY_BYTES)


# --- the whole job ----------------------------------------------------------------------------


def _number(value: Any) -> float:
    """A setting's value as a float; NaN (outside every range) when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _resolve_hmm_err(value: str | float | None) -> str | float | None:
    """impute's hmm_err: 'auto', 'train' (None: the checkpoint's value) or a rate in (0, 0.5)."""
    if value == "auto":
        return "auto"
    if value in ("train", None):
        return None
    rate = _number(value)
    if not 0.0 < rate < 0.5:
        raise SnvbertError(f"hmm_err={value} must be auto, train or a rate between 0 and 0.5")
    return rate


# impute's hmm_certain=auto: the network runs where the HMM's P(ALT) is more than this many
# times the trained hmm_certain from 0 and 1. Measured (README, Speed; paired r² by MAF bin, the
# same checkpoint): compact trained at 0.01 run at 0.02 moved every bin of scenario 1's two
# arrays by at most 0.0002 with 27 % fewer tokens; small trained at 0.001 run at 0.002 moved the
# demo's bins by at most 0.0003 (at 0.02 its [0.01, 0.05) bin lost 0.0021).
AUTO_CERTAIN_FACTOR = 2.0


def _resolve_hmm_certain(value: Any, trained: float) -> float | None:
    """impute's hmm_certain: ``auto`` (AUTO_CERTAIN_FACTOR times the trained value; a network
    trained at every site, 0, stays so), ``train`` (as trained: None) or a number."""
    if value == "auto":
        return min(AUTO_CERTAIN_FACTOR * trained, 0.49) if trained > 0 else None
    if value in ("train", None):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SnvbertError(f"hmm_certain={value} must be auto, train or a number") from None


# impute's hmm_common_maf=auto for a checkpoint trained without a cap, when the HMM runs over
# IBS-selected states: hidden sites of panel MAF at least this take the HMM's answer. Measured
# (README, Speed; paired r² by MAF bin, the same checkpoint): on scenario 1's two arrays (2,000
# reference haplotypes, IBS states) every bin below 0.05 unchanged to the fourth decimal,
# [0.05, 0.5] -0.0002 (intervals across zero; that HMM alone is above Beagle there), 57 % fewer
# uncertain tokens. Over every haplotype (a small panel: the demo's 600) the network adds 0.01
# at common sites, so there auto leaves every MAF to it; and on a sparse array too: with one
# site per 30 kb (33 typed sites per Mb, README "Any panel") the cap cost 0.0083
# [0.0065, 0.0095] in [0.05, 0.5] and turned a lead over Beagle there into a loss, so auto caps
# only from AUTO_COMMON_MAF_MIN_DENSITY typed sites per Mb (the measured 10 kb arrays: 100).
AUTO_COMMON_MAF = 0.05
AUTO_COMMON_MAF_MIN_DENSITY = 80.0


def _resolve_hmm_common_maf(
    value: Any, trained: float | None, ibs: bool, typed_per_mb: float = float("inf")
) -> float | None:
    """impute's hmm_common_maf: ``auto`` (the checkpoint's cap; without one AUTO_COMMON_MAF
    when the HMM's states are IBS-selected, ``ibs``, and the array has at least
    AUTO_COMMON_MAF_MIN_DENSITY typed sites per Mb, else none), ``train`` (the checkpoint's),
    ``off`` (every MAF: None) or a MAF in (0, 0.5]."""
    if value == "auto":
        if trained is not None:
            return trained
        dense = typed_per_mb >= AUTO_COMMON_MAF_MIN_DENSITY
        return AUTO_COMMON_MAF if ibs and dense else None
    if value in ("train", None):
        return trained
    if value in ("off", False):
        return None
    maf = _number(value)
    if not 0.0 < maf <= 0.5:
        raise SnvbertError(f"hmm_common_maf={value} must be auto, train, off or a MAF in (0, 0.5]")
    return maf


def _resolve_hmm_states(
    value: str, trained: IBSConfig | None, n_ref_haps: int
) -> IBSConfig | None | str:
    """impute's hmm_states as predict's hmm_ibs: an IBSConfig, None or "train".

    ``ibs``: the haplotypes Beagle's IBS selection keeps (the checkpoint's data.hmm.ibs, else
    Beagle's defaults); ``panel``: every reference haplotype; ``train``: as in training;
    ``auto``: ``ibs`` with more than IBS_MIN_HAPS reference haplotypes, else ``panel``.
    """
    if value == "auto":
        value = "ibs" if ibs_by_default(n_ref_haps) else "panel"
    return {"ibs": trained or IBSConfig(), "panel": None, "train": "train"}[value]


def impute(
    ckpt: str | Path | None,
    panel: str | Path,
    target: str | Path,
    out: str | Path,
    *,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    reference: str | None = None,
    k: int | None = None,
    retrieval_index: str | None = None,
    genetic_map: str | Path | None = None,
    hmm_err: str | float | None = None,
    hmm_states: str | None = None,
    hmm_certain: float | str | None = None,
    hmm_common_maf: float | str | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    progress: bool | None = None,
    gp: bool | None = None,
    region: str | None = None,
    people_block: int | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Impute ``target`` against ``panel`` with the model in ``ckpt``; write ``out``.

    ``ckpt`` None: the default model shipped with snvbert (:mod:`snvbert.pretrained`).

    Each setting left out (None) takes its value from ``conf/impute.yaml``, as the command
    does: ``batch_size`` target people per batch; ``device`` and ``precision``; ``reference``
    the retrieval panel: ``all`` panel people (the targets are outside people, as for Beagle)
    or only the ``train`` people of the checkpoint (its training panel only); ``k`` neighbours
    per query (the YAML's null: as in training; shrunk to the haplotypes a query may copy);
    ``retrieval_index`` the neighbour search (None: as trained; ``flat`` exact, ``ivf`` or
    ``hnsw`` faiss's approximate indexes, built once per window); ``genetic_map`` a PLINK map for the HMM's switch rates (null: on the training panel the map
    the model was trained with, if any; on another panel a constant 1 cM/Mb); ``hmm_err`` the
    HMM's mismatch rate: ``auto`` fits it to the targets (:func:`fit_hmm_err`), ``train`` keeps
    the training value, a number sets it; ``hmm_states`` the panel-state HMM's states (:func:`_resolve_hmm_states`);
    ``hmm_certain`` where the network runs (hidden sites whose HMM P(ALT) is more than this
    from 0 and 1; ``auto``: :data:`AUTO_CERTAIN_FACTOR` times the checkpoint's
    ``model.hmm_certain``; ``train``: the checkpoint's); ``hmm_common_maf`` the panel MAF
    from which hidden sites take the HMM's answer whatever their P(ALT) (``auto``: the
    checkpoint's ``model.hmm_common_maf``, else :data:`AUTO_COMMON_MAF` with IBS-selected HMM
    states and an array of at least :data:`AUTO_COMMON_MAF_MIN_DENSITY` typed sites per Mb,
    none otherwise; ``train``: the checkpoint's; ``off``: none); ``cache_dir``; ``threads`` the
    CPU threads of torch and the compiled HMM (None: every core); ``progress``; ``gp``
    whether the output carries GP beside GT and DS; ``region`` ``CHR:START-END``, a chunk:
    only the sites in it are read and written (:mod:`snvbert.merge` ligates chunks);
    ``people_block`` target people imputed and written at once (memory is bounded by it, not
    by the cohort; the blocks are merged into exactly one run's records). Returns
    a summary: site counts by kind and every adjustment.
    """
    setting = filled(
        "impute",
        {
            "batch_size": batch_size,
            "device": device,
            "precision": precision,
            "reference": reference,
            "retrieval.k": k,
            "retrieval.index": retrieval_index,
            "genetic_map": genetic_map,
            "hmm_err": hmm_err,
            "hmm_states": hmm_states,
            "hmm_certain": hmm_certain,
            "hmm_common_maf": hmm_common_maf,
            "cache_dir": cache_dir,
            "threads": threads,
            "progress": progress,
            "gp": gp,
            "region": region,
            "people_block": people_block,
        },
    )
    batch_size, device, precision = setting["batch_size"], setting["device"], setting["precision"]
    reference, k, genetic_map = setting["reference"], setting["retrieval.k"], setting["genetic_map"]
    hmm_err, hmm_states = setting["hmm_err"], str(setting["hmm_states"])
    cache_dir, progress = setting["cache_dir"], bool(setting["progress"])
    if not isinstance(setting["gp"], bool):
        raise SnvbertError(f"gp={setting['gp']} must be true or false")
    started = time.perf_counter()
    if setting["threads"] is not None:
        n_threads = int(setting["threads"])
        if n_threads < 1:
            raise SnvbertError(f"threads={n_threads} must be at least 1")
        torch.set_num_threads(n_threads)
        kernel.set_threads(n_threads)
    panel_path, target_path, out = Path(panel), Path(target), Path(out)
    if reference not in ("all", "train"):
        raise SnvbertError(f"reference='{reference}' must be 'all' or 'train'")
    if int(batch_size) < 1:
        raise SnvbertError(f"batch_size={batch_size} must be at least 1")
    err = _resolve_hmm_err(hmm_err)
    if hmm_states not in ("auto", "ibs", "panel", "train"):
        raise SnvbertError(f"hmm_states={hmm_states} must be auto, ibs, panel or train")
    dev = _resolve_device(str(device))
    autocast = _autocast_dtype(str(precision), dev)
    shipped = ckpt is None
    if shipped:
        from snvbert.pretrained import default_checkpoint

        ckpt = default_checkpoint()
    model = load_trained(ckpt, dev)
    if setting["retrieval.index"] is not None:  # exact (flat) or approximate faiss search
        index = str(setting["retrieval.index"])
        if index not in INDEXES:
            raise SnvbertError(f"retrieval.index={index} must be one of {', '.join(INDEXES)}")
        engine = "faiss" if index != "flat" else model.retrieval["engine"]
        model.retrieval.update(index=index, engine=engine)
    certain = _resolve_hmm_certain(setting["hmm_certain"], model.net.config.hmm_certain)
    if certain is not None:
        if not 0.0 <= float(certain) < 0.5:
            raise SnvbertError(f"hmm_certain={certain} must be at least 0 and below 0.5")
        if float(certain) > 0 and not model.net.config.hmm_certain:
            raise SnvbertError(
                f"hmm_certain={certain}: this checkpoint's network was trained at every site "
                "(model.hmm_certain=0); leave hmm_certain=auto"
            )
        model.net.config.hmm_certain = float(certain)
    describe = model.describe
    trained_ibs = None if model.hmm is None else model.hmm.ibs

    pan = load_panel(panel_path, cache_dir=cache_dir, progress=progress)
    span = None if setting["region"] is None else parse_region(setting["region"], pan.chrom)
    if span is not None:  # a chunk: only the panel's and the target's sites in it
        pan = in_region(pan, *span)
        if pan.n_sites == 0:
            raise SnvbertError(f"region={setting['region']} holds no panel site", path=panel_path)
    # Any panel: windows, retrieval context and HMM are rebuilt on this one with the
    # checkpoint's settings; what was trained stays fixed (the inputs are the same kind of
    # numbers on any panel). What differs from the training panel is reported, not refused.
    same_panel = pan.fingerprint == describe["panel_fingerprint"]
    tgt, match, calls = prepare_target(pan, target_path, panel_path, span)
    n_matched = len(match.panel_index)
    counts = dict(match.counts)
    counts["chr_renamed"] = tgt.n_sites if tgt.chrom != pan.chrom else 0
    counts.update({f"skipped_{why}": n for why, n in tgt.skipped.items()})

    name_to_index = {s: i for i, s in enumerate(pan.samples)}
    if reference == "all":
        ref_persons = np.arange(pan.n_samples, dtype=np.int64)
    elif not same_panel:
        raise SnvbertError(
            "reference=train names the checkpoint's training people, and this is not its "
            "training panel; use reference=all",
            path=panel_path,
        )
    else:
        ref_persons = np.array(
            sorted(name_to_index[s] for s in describe["train_samples"] if s in name_to_index),
            dtype=np.int64,
        )
    # A target who is also a panel person keeps its panel index, so it never retrieves itself.
    query_persons = np.array(
        [name_to_index.get(s, -1 - i) for i, s in enumerate(tgt.samples)], dtype=np.int64
    )
    counts["targets_in_panel"] = int((query_persons >= 0).sum())
    panel_report = _panel_report(pan, describe, same_panel, n_matched)
    # The targets' own alleles never inform their inputs (as in training, leave them out).
    af_people = np.setdiff1d(ref_persons, query_persons[query_persons >= 0])
    ibs = _resolve_hmm_states(hmm_states, trained_ibs, 2 * len(ref_persons))
    run_ibs = trained_ibs if ibs == "train" else ibs  # the IBS selection the HMM runs
    model.net.config.hmm_common_maf = _resolve_hmm_common_maf(
        setting["hmm_common_maf"],
        model.net.config.hmm_common_maf,
        run_ibs is not None,
        panel_report["typed_per_mb"],
    )
    af = pan.alt_freq(af_people)
    k_asked = int(k if k is not None else model.retrieval["k"])
    if k_asked < 1:
        raise SnvbertError(f"retrieval.k={k_asked} must be at least 1")
    # A query may copy every reference haplotype but its own person's two: K shrinks to fit.
    own = 2 if counts["targets_in_panel"] else 0
    k_used = max(1, min(k_asked, 2 * len(ref_persons) - own))
    # The training map belongs to the training panel's region; another panel takes its own
    # (genetic_map=) or the constant map.
    trained_map = describe.get("genetic_map") if same_panel else None
    gmap = genetic_map if genetic_map is not None else trained_map
    if gmap is not None and not Path(gmap).exists():
        why = "" if genetic_map is not None else " (the model was trained with it)"
        raise SnvbertError(
            f"genetic map not found{why}; pass genetic_map=PATH to a PLINK map", path=gmap
        )
    morgans = genetic_positions(pan.pos, gmap)
    if err == "auto":
        err = fit_hmm_err(
            model,
            pan,
            match.panel_index,
            calls,
            query_persons,
            ref_persons,
            morgans,
            dev,
            run_ibs,
        )
        if err is not None:
            log.info("HMM mismatch rate fitted to the targets: %.2g", err)

    command = command or _api_command(ckpt, panel_path, target_path, out)
    people_block = int(setting["people_block"])
    if people_block < 1:
        raise SnvbertError(f"people_block={people_block} must be at least 1")
    blocks = [
        np.arange(i, min(i + people_block, tgt.n_samples))
        for i in range(0, tgt.n_samples, people_block)
    ]

    def impute_block(people: np.ndarray, block_out: Path) -> int:
        """Impute and write the target people ``people`` (indices into the target's)."""
        cols = np.stack([2 * people, 2 * people + 1], 1).ravel()
        block_calls = calls[:, cols]
        probs = predict(
            model,
            pan,
            match.panel_index,
            block_calls,
            query_persons[people],
            ref_persons,
            af,
            k=k_used,
            batch_size=int(batch_size),
            morgans=morgans,
            hmm_err=err,
            hmm_ibs=ibs,
            device=dev,
            autocast=autocast,
            progress=progress,
        )
        part = tgt if len(people) == tgt.n_samples else _target_people(tgt, people)
        return write_imputed(
            block_out, pan, part, match, block_calls, probs, panel_path, command, gp=setting["gp"]
        )

    if len(blocks) == 1:
        n_written = impute_block(blocks[0], out)
    else:
        # Memory bounded whatever the cohort: each block of people is imputed and written
        # apart, then the blocks are merged as target batches are (snvbert.merge), which gives
        # exactly the records one block of everyone would (tests/test_merge.py).
        from snvbert.merge import merge

        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=partial_prefix(out), suffix=".partial", dir=out.parent))
        try:
            parts = [work / f"people{j}.vcf.gz" for j in range(len(blocks))]
            n_written = [impute_block(b, part) for b, part in zip(blocks, parts, strict=True)][0]
            merge(parts, out, command=None)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    summary = {
        "out": str(out),
        "region": None if span is None else f"{pan.chrom}:{span[0]}-{span[1]}",
        "ckpt": str(ckpt),
        "shipped_model": shipped,
        "targets": tgt.n_samples,
        "reference_people": int(len(ref_persons)),
        "k": k_used,
        "k_trained": int(model.retrieval["k"]),
        "retrieval_index": str(model.retrieval["index"]),
        "panel": panel_report,
        "genetic_map": None if gmap is None else str(gmap),
        "hmm_err": err if err is not None else (None if model.hmm is None else model.hmm.err),
        "hmm_ibs": _plain(run_ibs),
        "hmm_certain": float(model.net.config.hmm_certain),
        "hmm_common_maf": model.net.config.hmm_common_maf,
        "sites": {
            "written": n_written,
            "imputed": pan.n_sites - n_matched,
            "typed": n_matched,
            "passthrough": len(match.passthrough),
            "missing_calls_imputed": int((calls < 0).sum()),
        },
        "adjustments": counts,
        "seconds": round(seconds, 2),
    }
    return summary


def _target_people(tgt: Any, people: np.ndarray) -> Any:
    """The target restricted to the people ``people`` (indices), all of its sites."""
    cols = np.stack([2 * people, 2 * people + 1], 1).ravel()
    return replace(
        tgt,
        samples=[tgt.samples[i] for i in people],
        genotypes=tgt.genotypes[:, cols],
        phased=tgt.phased[:, people],
    )


def _panel_report(pan: Panel, describe: dict[str, Any], same: bool, n_typed: int) -> dict[str, Any]:
    """This panel against the checkpoint's training panel: what differs (the summary says it)."""
    span_mb = max(float(pan.pos[-1] - pan.pos[0]), 1.0) / 1e6 if pan.n_sites else 1.0
    array = [lv for lv in describe.get("levels", []) if lv.get("strategy") == "array"]
    return {
        "training_panel": bool(same),
        "haplotypes": int(pan.n_haps),
        "sites": int(pan.n_sites),
        "chrom": pan.chrom,
        "typed_per_mb": n_typed / span_mb,
        "trained": {
            "sites": describe.get("panel_sites"),
            "chrom": describe.get("chrom"),
            "train_people": len(describe.get("train_samples", [])),
            "array_spacing_bp": array[-1].get("spacing_bp") if array else None,
            "array_spacing_bp_max": array[-1].get("spacing_bp_max") if array else None,
        },
    }


def _plain(ibs: IBSConfig | None) -> dict[str, Any] | None:
    return None if ibs is None else asdict(ibs)


def _api_command(ckpt: Path | str, panel: Path, target: Path, out: Path) -> str:
    return f"impute ckpt={ckpt} panel={panel} target={target} out={out}"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary for people: what was imputed, typed, passed through, dropped, flipped."""
    s, a = summary["sites"], summary["adjustments"]
    dropped = {
        key.removeprefix("dropped_"): v for key, v in a.items() if key.startswith("dropped_") and v
    }
    skipped = {
        key.removeprefix("skipped_"): v for key, v in a.items() if key.startswith("skipped_") and v
    }
    lines = [
        f"wrote      {summary['out']} ({s['written']:,} records, {summary['targets']:,} people"
        + (f", region {summary['region']})" if summary.get("region") else ")"),
        f"imputed    {s['imputed']:,} panel sites absent from the target, and "
        f"{s['missing_calls_imputed']:,} missing calls at typed sites",
        f"typed      {s['typed']:,} target sites matched to the panel "
        f"({a['flipped']:,} with REF/ALT swapped, recoded)",
        f"passed     {s['passthrough']:,} target-only sites written through unchanged",
        "dropped    "
        + (", ".join(f"{v:,} {why.replace('_', ' ')}" for why, v in dropped.items()) or "none"),
    ]
    if skipped:
        lines.append("skipped    " + ", ".join(f"{v:,} {why}" for why, v in skipped.items()))
    if a.get("chr_renamed"):
        lines.append(f"renamed    {a['chr_renamed']:,} target sites to the panel's chromosome name")
    if a.get("targets_in_panel"):
        lines.append(
            f"note       {a['targets_in_panel']} target people are also panel people; "
            "they never retrieve their own haplotypes"
        )
    panel = summary.get("panel")
    if panel is not None:
        which = "the default model shipped with snvbert, " if summary.get("shipped_model") else ""
        if panel["training_panel"]:
            lines.append(f"model      {which}trained on this panel")
        else:
            t = panel["trained"]
            spacing, most = t["array_spacing_bp"], t.get("array_spacing_bp_max")
            kb = f"{spacing / 1000:g}" + (f"-{most / 1000:g}" if most else "")
            trained_array = f", arrays of one site per {kb} kb" if spacing else ""
            lines.append(
                f"model      {which}trained on another panel (chr{t['chrom']}, "
                f"{t['sites']:,} sites, "
                f"{t['train_people']:,} training people{trained_array}); windows, retrieval "
                f"and HMM rebuilt on this one (chr{panel['chrom']}, {panel['sites']:,} sites, "
                f"{panel['haplotypes']:,} haplotypes, {panel['typed_per_mb']:.0f} typed sites "
                "per Mb)"
            )
            if summary.get("genetic_map") is None:
                lines.append(
                    "map        none given for this panel: switch rates from a constant "
                    "1 cM/Mb (pass genetic_map=PATH, a PLINK map)"
                )
    shrunk = summary["k"] < summary.get("k_trained", summary["k"])
    k_note = f" (trained with {summary['k_trained']}; shrunk to the haplotypes it may copy)"
    lines.append(
        f"reference  {summary['reference_people']:,} panel people, k={summary['k']}"
        + (k_note if shrunk else "")
        + (
            f", approximate search ({summary['retrieval_index']})"
            if summary.get("retrieval_index", "flat") != "flat"
            else ""
        )
    )
    if summary.get("hmm_err") is not None:
        ibs = summary.get("hmm_ibs")
        states = (
            "every reference haplotype"
            if ibs is None
            else (
                f"IBS-selected ({ibs['haps']} a {ibs['step_cm']:g} cM step over {ibs['steps']} steps)"
            )
        )
        lines.append(f"hmm        mismatch rate {summary['hmm_err']:.2g}, states: {states}")
    if summary.get("hmm_certain"):
        eps = summary["hmm_certain"]
        common = summary.get("hmm_common_maf")
        rare = "" if common is None else f" and whose panel MAF is below {common:g}"
        lines.append(
            f"network    at typed sites and hidden ones whose HMM P(ALT) lies in "
            f"({eps:g}, {1 - eps:g}){rare}; the HMM's answer elsewhere"
        )
    lines.append(f"time       {summary['seconds']:.1f} s")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="pkg://snvbert.conf", config_name="impute")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    for key in ("panel", "target", "out"):
        if not cfg.get(key):
            raise SnvbertError(
                f"set {key}=PATH (python -m snvbert.impute panel=... target=... "
                "out=imputed.vcf.gz, and ckpt=... for a model of your own)"
            )
    summary = impute(
        cfg.ckpt or None,
        cfg.panel,
        cfg.target,
        cfg.out,
        batch_size=cfg.batch_size,
        device=cfg.device,
        precision=str(cfg.precision),
        reference=cfg.reference,
        k=cfg.retrieval.k,
        retrieval_index=cfg.retrieval.index,
        genetic_map=cfg.genetic_map,
        hmm_err=cfg.hmm_err,
        hmm_states=str(cfg.hmm_states),
        hmm_certain=cfg.hmm_certain,
        hmm_common_maf=cfg.hmm_common_maf,
        cache_dir=cfg.cache_dir,
        threads=cfg.threads,
        progress=cfg.progress,
        gp=cfg.gp,
        region=cfg.region,
        people_block=cfg.people_block,
        command="python -m snvbert.impute " + " ".join(sys.argv[1:]),
    )
    print(format_summary(summary), flush=True)


if __name__ == "__main__":
    main()
