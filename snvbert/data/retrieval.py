"""Retrieval: the K panel haplotypes nearest a query by Hamming distance over its observed sites.

Haplotypes are encoded +1 (ALT) / -1 (REF) per site and a hidden query site as 0, so the inner
product of query and panel vector is (agreements - disagreements) over the query's observed
sites: ranking by inner product is ranking by masked Hamming distance, exactly.

Ties are common (few typed sites, many similar haplotypes). They are broken by a seeded random
jitter in [0, 0.5) per panel haplotype (:func:`snvbert.data.masks.tie_jitter`) — smaller than one
agreement, so it never reorders distinct distances — never by panel index, which in real panels
sorted by population would favour one ancestry.

Engines: ``torch`` (matmul + top-k, on the batch's device; measured fastest for exact search on
CPU) and ``faiss`` (``flat`` exact, ``ivf`` and ``hnsw`` approximate for large panels, a GPU index
when faiss-gpu and a GPU are present). Both give the same exact results with ``flat``.

After the search, :func:`neighbour_features` gives, per neighbour and window site, the run of
consecutive observed query sites on each side where the neighbour agrees with the query: the
per-locus signal an HMM uses, which a single window-wide distance throws away.

:func:`retrieve` is the step both training (``SNVDataModule.on_after_batch_transfer``) and
imputation run on a batch: the search, the agreement runs, and the HMM's read-outs
(:mod:`snvbert.hmm`) at the neighbours and as the HMM's own P(ALT).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from snvbert.data.agreement import packed_runs
from snvbert.errors import SnvbertError
from snvbert.hmm import (
    ChromosomeHMM,
    HMMConfig,
    context_posteriors,
    copying_posteriors,
    neighbour_posteriors,
    panel_dosage,
    select_by_posterior,
)
from snvbert.hmm.readout import PanelReadout, site_interpolation, uniform_neighbour_posteriors

ENGINES = ("torch", "faiss")
INDEXES = ("flat", "ivf", "hnsw")


class Retriever:
    """Exact (or, with faiss ``ivf``/``hnsw``, approximate) masked-Hamming K-nearest search."""

    def __init__(
        self,
        *,
        k: int,
        engine: str,
        index: str,
        nlist: int,
        nprobe: int,
        hnsw_m: int,
        feature_sites: int | None,
    ) -> None:
        """Settings as ``data.retrieval`` gives them (the YAML holds every value)."""
        if engine not in ENGINES:
            raise SnvbertError(f"retrieval.engine='{engine}' is not one of {ENGINES}")
        if index not in INDEXES:
            raise SnvbertError(f"retrieval.index='{index}' is not one of {INDEXES}")
        if engine == "torch" and index != "flat":
            raise SnvbertError("retrieval.index ivf/hnsw needs retrieval.engine=faiss")
        if k < 1:
            raise SnvbertError(f"retrieval.k={k} must be at least 1")
        self.k, self.engine, self.index = int(k), engine, index
        self.nlist, self.nprobe, self.hnsw_m = nlist, nprobe, hnsw_m
        # Most observed context columns the per-site features (runs, HMM) look at.
        self.feature_sites = None if feature_sites is None else int(feature_sites)
        # The faiss index of the last panel searched, reused while the same panel tensor (one
        # window's context: imputation searches it once per batch of people) and the same
        # observed columns come back; index_builds counts the indexes built.
        self._index: tuple[Tensor, Tensor, Tensor, Any] | None = None
        self.index_builds = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None}  # a faiss index does not travel (workers, DDP)

    def settings(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this retriever (saved in checkpoints)."""
        keys = ("k", "engine", "index", "nlist", "nprobe", "hnsw_m", "feature_sites")
        return {key: getattr(self, key) for key in keys}

    def search(
        self, query: Tensor, panel: Tensor, jitter: Tensor, exclude: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Nearest panel rows for each query row.

        query (B, C) in {-1, 0, +1}; panel (N, C) in {-1, +1} (any dtype); jitter (N,);
        exclude (B, N) bool, True where a query must not retrieve that panel row (itself, its
        person). Returns scores (B, K), indices (B, K) and valid (B, K); when fewer than K
        rows are allowed the tail is padded with valid=False.
        """
        observed = (query != 0).any(0)  # (C,) columns any query observes
        key = (panel, jitter, observed)  # what a faiss index is built from
        if not bool(observed.all()):  # sparse (array) masks: search the typed columns only
            query, panel = query[:, observed], panel[:, observed]
        query, panel = query.float(), panel.float()
        if self.engine == "torch":
            scores, idx = self._search_torch(query, panel, jitter, exclude)
        else:
            scores, idx = self._search_faiss(query, panel, jitter, exclude, key)
        valid = torch.isfinite(scores)
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        scores = torch.where(valid, scores.floor(), torch.zeros_like(scores))  # drop the jitter
        if scores.shape[1] < self.k:
            pad = self.k - scores.shape[1]
            scores = torch.nn.functional.pad(scores, (0, pad))
            idx = torch.nn.functional.pad(idx, (0, pad))
            valid = torch.nn.functional.pad(valid, (0, pad))
        return scores, idx, valid

    def _search_torch(
        self, query: Tensor, panel: Tensor, jitter: Tensor, exclude: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        # (B, N) inner products (integers, exact in any summation order), then the tie-break
        # jitter added apart, so a row's scores do not depend on the batch's other rows or columns
        scores = torch.mm(query, panel.T).add_(jitter)
        if exclude is not None:
            scores.masked_fill_(exclude, float("-inf"))
        return torch.topk(scores, min(self.k, panel.shape[0]), dim=1, sorted=True)

    def _faiss_index(
        self, panel: Tensor, jitter: Tensor, key: tuple[Tensor, Tensor, Tensor]
    ) -> Any:
        """The index over ``panel`` (searched columns) and its jitter: the cached one when
        ``key`` (the panel tensor, jitter tensor and observed columns) is the last one's."""
        import faiss

        cached = self._index
        if (
            cached is not None
            and cached[0] is key[0]
            and cached[1] is key[1]
            and torch.equal(cached[2], key[2])
        ):
            return cached[3]
        # One extra dimension carries the tie-breaking jitter: query 1, panel jitter.
        xb = torch.cat([panel, jitter[:, None]], 1).float().cpu().numpy()
        n, d = xb.shape
        if self.index == "flat":
            index = faiss.IndexFlatIP(d)
        elif self.index == "ivf":
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, min(self.nlist, n), faiss.METRIC_INNER_PRODUCT)
            index.train(xb)
            index.nprobe = self.nprobe
        else:
            index = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        device = panel.device
        if device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
        index.add(xb)
        self._index = (key[0], key[1], key[2].clone(), index)
        self.index_builds += 1
        return index

    def _search_faiss(
        self,
        query: Tensor,
        panel: Tensor,
        jitter: Tensor,
        exclude: Tensor | None,
        key: tuple[Tensor, Tensor, Tensor],
    ) -> tuple[Tensor, Tensor]:
        device = query.device
        index = self._faiss_index(panel, jitter, key)
        xq = torch.cat([query, torch.ones_like(query[:, :1])], 1).float().cpu().numpy()
        n = panel.shape[0]
        n_excl = 0 if exclude is None else int(exclude.sum(1).max())
        k_search = min(self.k + n_excl, n)
        dist, ids = index.search(xq, k_search)
        scores = torch.from_numpy(dist).to(device)
        idx = torch.from_numpy(ids).to(device)
        missing = idx < 0  # approximate indexes may return fewer hits
        idx = idx.clamp_min(0)
        if exclude is not None:
            missing |= torch.gather(exclude, 1, idx)
        scores = scores.masked_fill(missing, float("-inf"))
        # Keep the best k allowed hits, still in descending order.
        order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, : min(self.k, n)]
        return torch.gather(scores, 1, order), torch.gather(idx, 1, order)


def feature_columns(
    observed: Tensor, win_offset: int, win_len: int, max_cols: int | None
) -> Tensor:
    """Context columns observed by any query, at most ``max_cols`` of them nearest the window.

    Sparse (array) masks keep every observed column of a wide context; dense masks, whose
    observed columns number in the thousands, keep those around the window, which bounds the
    cost of the per-site features without losing what they measure.
    """
    cols = torch.nonzero(observed.any(0)).squeeze(1)
    if max_cols is None or cols.numel() <= max_cols:
        return cols
    centre = win_offset + win_len / 2
    nearest = torch.topk((cols.float() - centre).abs(), max_cols, largest=False).indices
    return cols[torch.sort(nearest).values]


def neighbour_features(
    query: Tensor,
    panel: Tensor,
    idx: Tensor,
    win_offset: int,
    win_len: int,
    length: int,
    cols: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Neighbour alleles and agreement runs over a window, site-aligned with the query.

    query (B, C) int8 in {-1, 0, +1} over the context; panel (N, C) int8 in {-1, +1}; idx (B, K)
    neighbours; the window is context columns [win_offset, win_offset + win_len), padded to
    ``length``. Returns alleles (B, K, length) in {0, 1}, and left / right runs (B, K, length):
    for each window site, the number of consecutive observed query sites strictly to its left
    (right), nearest first, on which the neighbour agrees with the query (among ``cols``, the
    :func:`feature_columns`; every observed column when None).
    """
    b, k = idx.shape
    if cols is None:
        cols = feature_columns(query != 0, win_offset, win_len, None)  # (U,)
    window_cols = torch.arange(win_offset, win_offset + win_len, device=query.device)
    nbr_win = panel[:, win_offset : win_offset + win_len][idx]  # (B, K, W)
    alleles = (nbr_win > 0).float()
    if cols.numel() == 0:
        left = right = torch.zeros(b, k, win_len, device=query.device)
    else:
        left_runs, right_runs, n_before, n_upto = _agreement_runs(
            query, panel, idx, cols, window_cols
        )
        left = left_runs.index_select(-1, n_before).float()
        right = right_runs.index_select(-1, n_upto).float()

    pad = length - win_len
    if pad:
        alleles, left, right = (
            torch.nn.functional.pad(t, (0, pad)) for t in (alleles, left, right)
        )
    return alleles, left, right


def packed_neighbour_features(
    query: Tensor,
    panel: Tensor,
    idx: Tensor,
    win_offset: int,
    cols: Tensor,
    rows: Tensor,
    sites: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`neighbour_features` at chosen (row, window site) pairs only, each (T, K).

    rows, sites (T,) the batch row and window site of each pair (the sites the network runs at,
    :meth:`snvbert.model.net.SNVBertNet.chosen_sites`); the cost is T x K, not B x K x W.
    """
    at = sites + win_offset  # context columns
    alleles = (panel[idx[rows], at[:, None]] > 0).float()  # (T, K)
    if cols.numel() == 0:
        zero = torch.zeros(rows.numel(), idx.shape[1], device=query.device)
        return alleles, zero, zero.clone()
    if query.device.type == "cpu":  # compiled: one pass per (query, neighbour), no cummax
        before = torch.searchsorted(cols, at, right=False)
        upto = torch.searchsorted(cols, at, right=True)
        left, right = packed_runs(
            query[:, cols].numpy(),
            panel[:, cols].numpy(),
            idx.numpy(),
            rows.numpy(),
            before.numpy(),
            upto.numpy(),
        )
        return alleles, torch.from_numpy(left).float(), torch.from_numpy(right).float()
    left_runs, right_runs, n_before, n_upto = _agreement_runs(query, panel, idx, cols, at)
    left = left_runs[rows, :, n_before].float()
    right = right_runs[rows, :, n_upto].float()
    return alleles, left, right


def _agreement_runs(
    query: Tensor, panel: Tensor, idx: Tensor, cols: Tensor, sites: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Agreement runs ending at (left) and starting at (right) each column, padded so that
    index ``n_before`` / ``n_upto`` of a site reads its run strictly to the left / right.

    Returns left (B, K, U + 1), right (B, K, U + 1) and, per site (context columns),
    n_before (columns < site) and n_upto (columns <= site)."""
    observed = query != 0  # (B, C)
    q_obs = observed[:, cols][:, None, :]  # (B, 1, U)
    agree = panel[:, cols][idx] == query[:, cols][:, None, :]  # (B, K, U)
    disagree = q_obs & ~agree
    left_incl = _runs_inclusive(q_obs, disagree)  # (B, K, U)
    right_incl = _runs_inclusive(q_obs.flip(-1), disagree.flip(-1)).flip(-1)
    n_before = torch.searchsorted(cols, sites, right=False)
    n_upto = torch.searchsorted(cols, sites, right=True)
    b, k = idx.shape
    zero = torch.zeros(b, k, 1, dtype=left_incl.dtype, device=query.device)
    return torch.cat([zero, left_incl], -1), torch.cat([right_incl, zero], -1), n_before, n_upto


def _runs_inclusive(observed: Tensor, disagree: Tensor) -> Tensor:
    """Per column, the count of observed columns since the last disagreement, inclusive.

    observed (B, 1, U) bool, disagree (B, K, U) bool. An unobserved column carries the value of
    the column before it; a disagreeing column is 0.
    """
    count = torch.cumsum(observed.to(torch.int32), -1)  # (B, 1, U)
    at_disagreement = torch.where(disagree, count, torch.zeros_like(count))
    last = torch.cummax(at_disagreement, -1).values  # (B, K, U)
    return count - last


# A batch's chromosome-wide HMM inputs (data.hmm.scope=chromosome, array levels): the query's
# calls at the chip's typed sites (U, B), the panel's alleles there (U, N), their genetic
# positions (U,), the window context's columns among them and their span [lo, hi) in U.
CHROMOSOME_HMM_KEYS = ("hmm_query", "hmm_states", "hmm_morgan", "hmm_cols", "hmm_span")


def chromosome_posteriors(
    inputs: dict[str, Tensor], allowed: Tensor, hmm: HMMConfig
) -> tuple[Tensor, Tensor] | None:
    """The panel-state posteriors at a window's context columns, from the chromosome-wide HMM.

    The HMM imputation runs once per chromosome, here run per training batch over the chip's
    typed sites; None when the context holds none of them.
    """
    lo, hi = (int(v) for v in inputs["hmm_span"])
    if hi <= lo:
        return None
    model = ChromosomeHMM(inputs["hmm_states"], inputs["hmm_morgan"], ne=hmm.ne, ibs=hmm.ibs)
    post = model.posteriors(inputs["hmm_query"], allowed, float(hmm.err))  # (B, N, U)
    return post[:, :, lo:hi], inputs["hmm_cols"]


def retrieve(
    batch: dict[str, Tensor],
    retriever: Retriever,
    hmm: HMMConfig | None = None,
    panel_post: tuple[Tensor, Tensor] | None = None,
    readout: PanelReadout | None = None,
    sites: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Replace the panel inputs of a batch by its K neighbours and their per-site features.

    Runs on the batch's device. A query never retrieves a haplotype of its own person. With
    ``hmm`` (its ``err`` already this batch's), the neighbours' Li–Stephens copying posteriors
    are added as ``nbr_hmm`` and the HMM's P(ALT) as ``hmm_dose``. ``panel_post``
    (posteriors (B, N, U) over the panel rows, their context columns (U,)) supplies panel-state
    posteriors computed beforehand (imputation: once per chromosome instead of per window);
    a training batch built with ``data.hmm.scope=chromosome`` carries its own chromosome-wide
    HMM inputs (:data:`CHROMOSOME_HMM_KEYS`) instead. ``readout`` (with ``hmm.states`` panel
    and ``select`` score) gives the HMM's P(ALT) and the neighbours' posteriors themselves,
    computed beforehand (imputation on a CPU, from the compiled kernel's compact posteriors).
    With it, ``sites`` (rows, window sites) (T,) asks for the neighbour features at those pairs
    only, packed: ``nbr_alleles``, ``nbr_left``, ``nbr_right``, ``nbr_hmm`` (T, K) and
    ``packed_rows``, ``packed_sites`` (the network's chosen sites; it runs over them alone).
    """
    ctx_morgan = batch.pop("ctx_morgan")
    query = batch.pop("query_ctx")
    panel = batch.pop("panel_ctx")
    panel_hap = batch.pop("panel_hap")
    panel_person = batch.pop("panel_person")
    jitter = batch.pop("jitter")
    off, n = int(batch.pop("win_offset")[0]), int(batch.pop("win_len")[0])
    exclude = batch["person"][:, None] == panel_person[None, :]
    chromosome = {key: batch.pop(key) for key in CHROMOSOME_HMM_KEYS if key in batch}
    if readout is not None and (hmm is None or hmm.states != "panel" or hmm.select != "score"):
        raise ValueError("a precomputed readout needs data.hmm states=panel, select=score")
    if chromosome and panel_post is None and hmm is not None and readout is None:
        panel_post = chromosome_posteriors(chromosome, ~exclude, hmm)
    # One set of feature columns serves both the agreement runs and the HMM.
    cols = feature_columns(query != 0, off, n, retriever.feature_sites)
    panel_states = hmm is not None and hmm.states == "panel"
    if panel_states and panel_post is None and readout is None and cols.numel() > 0:
        # One panel-state HMM per batch serves the neighbours' posteriors, the panel dosage
        # and (select=posterior) the choice of neighbours.
        panel_post = (context_posteriors(query, panel, ~exclude, ctx_morgan, cols, hmm), cols)
    if hmm is not None and hmm.select == "posterior" and panel_post is not None:
        # Neighbours chosen by the panel-state HMM: the haplotypes it copies in this window.
        scores, idx, valid = select_by_posterior(
            *panel_post, off, n, retriever.k, query, panel, ~exclude
        )
    elif sites is not None:
        # Only the rows that hold a chosen site need neighbours: the others take the HMM skip.
        scores, idx, valid = _search_rows(retriever, query, panel, jitter, exclude, sites[0])
    else:
        scores, idx, valid = retriever.search(query, panel, jitter, exclude)
    length = batch["tokens"].shape[1]
    if sites is not None:
        if readout is None:
            raise ValueError("packed neighbour features need a precomputed readout")
        return _packed(
            batch,
            query,
            panel,
            idx,
            valid,
            scores,
            panel_hap,
            off,
            readout,
            sites,
            ctx_morgan,
            cols,
        )
    alleles, left, right = neighbour_features(query, panel, idx, off, n, length, cols)
    keep = valid[:, :, None].float()
    if readout is not None:
        if readout.cols.numel() == 0:
            batch["nbr_hmm"] = uniform_neighbour_posteriors(valid, n, length)
        else:
            post = readout.neighbours(idx)  # (B, K, U)
            batch["nbr_hmm"] = neighbour_posteriors(
                post, valid, readout.cols, ctx_morgan, off, n, length
            )
        batch["hmm_dose"] = readout.dose
    elif hmm is not None:
        post_states, post_cols = (None, cols) if panel_post is None else panel_post
        batch["nbr_hmm"] = copying_posteriors(
            query,
            panel,
            idx,
            valid,
            ctx_morgan,
            off,
            n,
            length,
            hmm=hmm,
            cols=post_cols,
            panel_post=post_states,
        )
        if panel_states:  # the HMM's own P(ALT) over every panel state
            batch["hmm_dose"] = panel_dosage(
                post_states, post_cols, panel, ~exclude, ctx_morgan, off, n, length
            )
        else:  # over the K neighbour states, whose posterior sums to 1
            post = batch["nbr_hmm"] * valid[:, :, None]
            batch["hmm_dose"] = (post * alleles).sum(1) / post.sum(1).clamp(min=1e-12)
    batch.update(_neighbour_keys(idx, valid, scores, panel_hap, alleles, left, right, keep))
    return batch


def _search_rows(
    retriever: Retriever,
    query: Tensor,
    panel: Tensor,
    jitter: Tensor,
    exclude: Tensor,
    rows: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """:meth:`Retriever.search` for the batch rows among ``rows`` alone, as (B, K) tensors; the
    other rows get no neighbour (valid False). Each row's search is its own, so a searched row
    gets exactly what a search over the whole batch gives it."""
    active = torch.unique(rows)
    if active.numel() == query.shape[0]:
        return retriever.search(query, panel, jitter, exclude)
    b, k = query.shape[0], retriever.k
    scores = torch.zeros(b, k, device=query.device)
    idx = torch.zeros(b, k, dtype=torch.long, device=query.device)
    valid = torch.zeros(b, k, dtype=torch.bool, device=query.device)
    if active.numel():
        got = retriever.search(query[active], panel, jitter, exclude[active])
        scores[active], idx[active], valid[active] = got
    return scores, idx, valid


def _packed(
    batch: dict[str, Tensor],
    query: Tensor,
    panel: Tensor,
    idx: Tensor,
    valid: Tensor,
    scores: Tensor,
    panel_hap: Tensor,
    off: int,
    readout: PanelReadout,
    sites: tuple[Tensor, Tensor],
    ctx_morgan: Tensor,
    run_cols: Tensor,
) -> dict[str, Tensor]:
    """retrieve's packed ending: per chosen (row, site) pair and neighbour, (T, K); the
    agreement runs over ``run_cols`` (the dense path's feature columns), the HMM's posteriors
    interpolated between the readout's columns."""
    rows, at = sites
    alleles, left, right = packed_neighbour_features(query, panel, idx, off, run_cols, rows, at)
    cols = readout.cols
    keep = valid[rows].float()  # (T, K)
    if cols.numel() == 0 or rows.numel() == 0:
        n_valid = valid.float().sum(1, keepdim=True).clamp(min=1.0)
        hmm = (valid.float() / n_valid)[rows]
    else:
        lo, hi, w = site_interpolation(cols, ctx_morgan, off, int(at.max()) + 1)
        # only the HMM columns either side of a chosen site, of the rows that hold one:
        # (active rows, K, used)
        used, inverse = torch.unique(torch.cat([lo[at], hi[at]]), return_inverse=True)
        active, row_at = torch.unique(rows, return_inverse=True)
        post = readout.neighbours(idx[active], used, active) * valid[active][:, :, None]
        on_left, on_right = inverse[: at.numel()], inverse[at.numel() :]
        w = w[at][:, None]
        hmm = (1 - w) * post[row_at, :, on_left] + w * post[row_at, :, on_right]
    batch["hmm_dose"] = readout.dose
    batch.update(_neighbour_keys(idx, valid, scores, panel_hap, alleles, left, right, keep))
    batch.update(nbr_hmm=hmm, packed_rows=rows, packed_sites=at)
    return batch


def _neighbour_keys(
    idx: Tensor,
    valid: Tensor,
    scores: Tensor,
    panel_hap: Tensor,
    alleles: Tensor,
    left: Tensor,
    right: Tensor,
    keep: Tensor,
) -> dict[str, Tensor]:
    """The neighbour keys of a batch; per-site features zeroed (``keep``) at invalid ones."""
    return {
        "nbr_hap": torch.where(valid, panel_hap[idx], torch.full_like(idx, -1)),
        "nbr_valid": valid,
        "nbr_score": scores,
        "nbr_alleles": alleles * keep,
        "nbr_left": left * keep,
        "nbr_right": right * keep,
    }
