"""The batch: what the DataModule hands the model, key by key.

Training (:class:`snvbert.data.datamodule.PanelWindows`) and imputation (:mod:`snvbert.impute`)
both build their batches here: :func:`assemble_batch` the query side, :func:`panel_inputs` the
retrieval panel's side; :func:`snvbert.data.retrieval.retrieve` then adds the neighbours.

A batch is a ``dict[str, Tensor]``. Items are (window, person): each brings the person's two
haplotypes as consecutive rows, so rows ``2i`` and ``2i+1`` are one person and diploid dosages are
``p[2i] + p[2i+1]``. All rows of a batch share one window (batches are grouped by window), so
retrieval is one search call per batch.

Shapes: ``B`` rows (haplotypes), ``L`` sites of the window (padded to the configured window
length), ``K`` retrieved neighbours.

From the DataLoader (CPU, built in workers):

- ``tokens``   (B, L) long   0/1 observed allele, ``MASK`` where hidden, ``PAD`` past the window end
- ``alleles``  (B, L) long   true alleles 0/1 (labels; 0 at PAD)
- ``mask``     (B, L) bool   True where the site is hidden and must be predicted (never at PAD)
- ``pad``      (B, L) bool   True past the end of a short window
- ``af``       (B, L) float  ALT frequency in the training panel (never from val/test people)
- ``pos``      (B, L) long   base-pair position (0 at PAD)
- ``site``     (B, L) long   global site index in the panel cache (-1 at PAD)
- ``core``     (B, L) bool   True inside the window's core (the sites this window answers for)
- ``hap``      (B,)   long   global haplotype index in the cache (2 * sample + phase)
- ``person``   (B,)   long   sample index in the cache
- ``window``   (B,)   long   window index (all equal within a batch)
- ``mask_epoch``, ``mask_level``, ``mask_stream`` (B,) long: the key the mask was drawn from
  (training and validation batches of the panel; absent at imputation)
- ``panel_index`` (B,) long: with several training panels (``data.panel`` a list), which one

Added by retrieval (``SNVDataModule.on_after_batch_transfer``, on the batch's device):

- ``nbr_hap``    (B, K)    long   global haplotype index of each neighbour
- ``nbr_valid``  (B, K)    bool   False for padding when the panel has fewer than K haplotypes
- ``nbr_score``  (B, K)    float  observed agreements minus disagreements over the context
- ``nbr_alleles``(B, K, L) float  the neighbour's alleles over the window, site-aligned with the query
- ``nbr_left``   (B, K, L) float  run of consecutive observed query sites left of each site (within
                                  the retrieval context) where the neighbour agrees with the query
- ``nbr_right``  (B, K, L) float  the same to the right
- ``nbr_hmm``    (B, K, L) float  Li–Stephens posterior of copying each neighbour at each site
                                  (unless ``data.hmm=null``); sums to 1 over valid neighbours with
                                  ``data.hmm.states=neighbours``, to the neighbours' share of the
                                  posterior (<= 1) with ``states=panel``
- ``hmm_dose``   (B, L)    float  the HMM's own P(ALT) at each site: its posterior summed over the
                                  states carrying ALT (every allowed panel haplotype with
                                  ``states=panel``, the neighbours otherwise); the net's skip input
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from snvbert.data.encoding import plus_minus, query_code
from snvbert.data.genetic_map import genetic_positions
from snvbert.data.masks import tie_jitter
from snvbert.data.windows import Window

ALLELE_REF = 0
ALLELE_ALT = 1
MASK = 2
PAD = 3
VOCAB_SIZE = 4


def assemble_batch(
    window: Window,
    length: int,
    truth_ctx: np.ndarray,
    observed_ctx: np.ndarray,
    hidden_ctx: np.ndarray,
    *,
    pos: np.ndarray,
    af: np.ndarray,
    haps: np.ndarray,
    persons: np.ndarray,
    morgans: np.ndarray | None = None,
    ctx_columns: np.ndarray | None = None,
) -> dict[str, Tensor]:
    """The query side of a batch (see :mod:`snvbert.data.batch`) from context-wide arrays.

    truth_ctx, observed_ctx (B, C) int8 alleles 0/1 (observed may carry genotype errors, and is
    ignored where hidden); hidden_ctx (B, C) bool; af the panel ALT frequency, per site of the
    panel (n_sites,) or per row over the window (B, window sites); morgans the panel sites'
    genetic positions (None: a constant 1 cM/Mb). ``ctx_columns`` (C,) the panel sites of the
    context's columns, increasing and holding the whole window, when the context is not every
    site of ``[ctx_start, ctx_end)`` (imputation keeps only the typed ones and the window's).
    """
    b = truth_ctx.shape[0]
    if ctx_columns is None:
        ctx_columns = np.arange(window.ctx_start, window.ctx_end)
    off, n = int(np.searchsorted(ctx_columns, window.start)), window.length
    win = slice(off, off + n)
    tokens = np.full((b, length), PAD, dtype=np.int64)
    tokens[:, :n] = np.where(hidden_ctx[:, win], MASK, observed_ctx[:, win])
    alleles = np.zeros((b, length), dtype=np.int64)
    alleles[:, :n] = truth_ctx[:, win]
    mask = np.zeros((b, length), dtype=bool)
    mask[:, :n] = hidden_ctx[:, win]
    pad = np.ones((b, length), dtype=bool)
    pad[:, :n] = False
    sites = np.full(length, -1, dtype=np.int64)
    sites[:n] = np.arange(window.start, window.end)
    core = (sites >= window.core_start) & (sites < window.core_end)
    site_af = np.zeros((b, length), dtype=np.float32)
    site_af[:, :n] = af[window.start : window.end] if np.ndim(af) == 1 else af
    site_pos = np.zeros(length, dtype=np.int64)
    site_pos[:n] = pos[window.start : window.end]
    query_ctx = query_code(observed_ctx, hidden_ctx)
    return {
        "tokens": torch.from_numpy(tokens),
        "alleles": torch.from_numpy(alleles),
        "mask": torch.from_numpy(mask),
        "pad": torch.from_numpy(pad),
        "af": torch.from_numpy(site_af),
        "pos": torch.from_numpy(np.broadcast_to(site_pos, (b, length)).copy()),
        "site": torch.from_numpy(np.broadcast_to(sites, (b, length)).copy()),
        "core": torch.from_numpy(np.broadcast_to(core, (b, length)).copy()),
        "hap": torch.from_numpy(np.asarray(haps, dtype=np.int64)),
        "person": torch.from_numpy(np.asarray(persons, dtype=np.int64)),
        "window": torch.full((b,), window.index, dtype=torch.long),
        "query_ctx": torch.from_numpy(query_ctx),
        "ctx_morgan": torch.from_numpy(
            np.asarray(
                genetic_positions(pos[ctx_columns], None)
                if morgans is None
                else morgans[ctx_columns],
                dtype=np.float64,
            )
        ),
        "win_offset": torch.tensor([off], dtype=torch.long),
        "win_len": torch.tensor([n], dtype=torch.long),
    }


def panel_inputs(
    ctx_rows: np.ndarray | None,
    panel_haps: np.ndarray,
    panel_persons: np.ndarray,
    window: Window,
    *,
    seed: int,
    stream: int,
    epoch: int,
    panel_ctx: np.ndarray | None = None,
) -> dict[str, Tensor]:
    """The retrieval panel's side of a batch: its haplotypes over the context, as +-1.

    ``panel_ctx`` (N, C) int8 the +-1 code already made (a view of the whole chromosome's, as
    imputation keeps it), else made from ``ctx_rows`` (C, n_haps) 0/1.
    """
    if panel_ctx is None:
        panel_ctx = np.ascontiguousarray(plus_minus(ctx_rows[:, panel_haps].T))  # (N, C)
    jitter = tie_jitter(len(panel_haps), seed=seed, stream=stream, epoch=epoch, window=window.index)
    return {
        "panel_ctx": torch.from_numpy(panel_ctx),
        "panel_hap": torch.from_numpy(panel_haps.astype(np.int64)),
        "panel_person": torch.from_numpy(np.repeat(panel_persons, 2).astype(np.int64)),
        "jitter": torch.from_numpy(jitter),
    }
