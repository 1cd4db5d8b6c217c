"""Retrieval: the K panel haplotypes nearest a query by Hamming distance over its observed sites.

Haplotypes are encoded +1 (ALT) / -1 (REF) per site and a hidden query site as 0, so the inner
product of query and panel vector is (agreements - disagreements) over the query's observed
sites: ranking by inner product is ranking by masked Hamming distance, exactly.

Ties are common (few typed sites, many similar haplotypes). They are broken by a seeded random
jitter in [0, 0.5) per panel haplotype — smaller than one agreement, so it never reorders
distinct distances — never by panel index, which in real panels sorted by population would
favour one ancestry.

Engines: ``torch`` (matmul + top-k, on the batch's device; measured fastest for exact search on
CPU) and ``faiss`` (``flat`` exact, ``ivf`` and ``hnsw`` approximate for large panels, a GPU index
when faiss-gpu and a GPU are present). Both give the same exact results with ``flat``.

After the search, :func:`neighbour_features` gives, per neighbour and window site, the run of
consecutive observed query sites on each side where the neighbour agrees with the query: the
per-locus signal an HMM uses, which a single window-wide distance throws away.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from snvbert.errors import SnvbertError

ENGINES = ("torch", "faiss")
INDEXES = ("flat", "ivf", "hnsw")


def tie_jitter(n_panel: int, *, seed: int, stream: int, epoch: int, window: int) -> np.ndarray:
    """Seeded tie-breaking scores in [0, 0.5), one per panel haplotype, float32."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, stream, epoch & 0xFFFFFFFF, window, 0x71E])
    return (rng.random(n_panel) * 0.5).astype(np.float32)


class Retriever:
    """Exact (or, with faiss ``ivf``/``hnsw``, approximate) masked-Hamming K-nearest search."""

    def __init__(
        self,
        k: int = 128,
        engine: str = "torch",
        index: str = "flat",
        nlist: int = 64,
        nprobe: int = 8,
        hnsw_m: int = 32,
        feature_sites: int | None = 1024,
    ) -> None:
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

    def search(
        self, query: Tensor, panel: Tensor, jitter: Tensor, exclude: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Nearest panel rows for each query row.

        query (B, C) float in {-1, 0, +1}; panel (N, C) float in {-1, +1}; jitter (N,);
        exclude (B, N) bool, True where a query must not retrieve that panel row (itself, its
        person). Returns scores (B, K), indices (B, K) and valid (B, K); when fewer than K
        rows are allowed the tail is padded with valid=False.
        """
        observed = (query != 0).any(0)  # (C,) columns any query observes
        if not bool(observed.all()):  # sparse (array) masks: search the typed columns only
            query, panel = query[:, observed], panel[:, observed]
        if self.engine == "torch":
            scores, idx = self._search_torch(query, panel, jitter, exclude)
        else:
            scores, idx = self._search_faiss(query, panel, jitter, exclude)
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
        scores = torch.addmm(jitter, query, panel.T)  # (B, N) inner products + tie-break jitter
        if exclude is not None:
            scores.masked_fill_(exclude, float("-inf"))
        return torch.topk(scores, min(self.k, panel.shape[0]), dim=1, sorted=True)

    def _search_faiss(
        self, query: Tensor, panel: Tensor, jitter: Tensor, exclude: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        import faiss

        device = query.device
        # One extra dimension carries the tie-breaking jitter: query 1, panel jitter.
        xb = torch.cat([panel, jitter[:, None]], 1).float().cpu().numpy()
        xq = torch.cat([query, torch.ones_like(query[:, :1])], 1).float().cpu().numpy()
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
        if device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
        index.add(xb)
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
    observed = query != 0  # (B, C)
    if cols is None:
        cols = feature_columns(observed, win_offset, win_len, None)  # (U,)
    window_cols = torch.arange(win_offset, win_offset + win_len, device=query.device)
    nbr_win = panel[:, win_offset : win_offset + win_len][idx]  # (B, K, W)
    alleles = (nbr_win > 0).float()

    if cols.numel() == 0:
        left = right = torch.zeros(b, k, win_len, device=query.device)
    else:
        q_obs = observed[:, cols][:, None, :]  # (B, 1, U)
        agree = panel[:, cols][idx] == query[:, cols][:, None, :]  # (B, K, U)
        disagree = q_obs & ~agree
        left_incl = _runs_inclusive(q_obs, disagree)  # (B, K, U)
        right_incl = _runs_inclusive(q_obs.flip(-1), disagree.flip(-1)).flip(-1)
        n_before = torch.searchsorted(cols, window_cols, right=False)  # columns < site
        n_upto = torch.searchsorted(cols, window_cols, right=True)  # columns <= site
        zero = torch.zeros(b, k, 1, dtype=left_incl.dtype, device=query.device)
        left = torch.cat([zero, left_incl], -1).index_select(-1, n_before).float()
        right = torch.cat([right_incl, zero], -1).index_select(-1, n_upto).float()

    pad = length - win_len
    if pad:
        alleles, left, right = (
            torch.nn.functional.pad(t, (0, pad)) for t in (alleles, left, right)
        )
    return alleles, left, right


def _runs_inclusive(observed: Tensor, disagree: Tensor) -> Tensor:
    """Per column, the count of observed columns since the last disagreement, inclusive.

    observed (B, 1, U) bool, disagree (B, K, U) bool. An unobserved column carries the value of
    the column before it; a disagreeing column is 0.
    """
    count = torch.cumsum(observed.to(torch.int32), -1)  # (B, 1, U)
    at_disagreement = torch.where(disagree, count, torch.zeros_like(count))
    last = torch.cummax(at_disagreement, -1).values  # (B, K, U)
    return count - last


def copying_posteriors(
    query: Tensor,
    panel: Tensor,
    idx: Tensor,
    valid: Tensor,
    ctx_morgan: Tensor,
    win_offset: int,
    win_len: int,
    length: int,
    *,
    n_panel: int,
    ne: float = 20_000.0,
    err: float = 0.002,
    states: str = "neighbours",
    allowed: Tensor | None = None,
    cols: Tensor | None = None,
    panel_post: Tensor | None = None,
    ibs: dict | None = None,
) -> Tensor:
    """Li–Stephens posterior of copying each neighbour at each window site, (B, K, length).

    The query is a mosaic of haplotypes it copies: at each observed site it emits the copied
    allele (or the other with probability ``err``); between observed sites it jumps to a
    uniformly chosen haplotype with probability ``1 - exp(-4 ne d / n_panel)``, d the genetic
    distance in Morgans (``ctx_morgan``, the context sites' genetic positions: a genetic map's,
    or a constant 1 cM/Mb). The hidden states are either the K retrieved neighbours
    (``states="neighbours"``) or every panel haplotype the query may copy (``states="panel"``,
    ``allowed`` (B, N) bool; the classical HMM, as Beagle runs it), whose posterior is then read
    at the K neighbours. Forward-backward runs over the context columns observed by any query
    of the batch (``cols``, the :func:`feature_columns`; every observed column when None). A
    column a query does not observe emits 1 for every state, so its posterior there is the exact
    HMM posterior at that position; window sites between such columns take the posterior
    interpolated linearly in genetic position, as Beagle and Minimac do. ``panel_post``
    (B, N, U) are panel-state posteriors at ``cols`` computed beforehand (imputation runs the
    HMM once over a whole chromosome, not once per window); they are read at the neighbours.
    ``ibs`` (states="panel"): the states are only the haplotypes :func:`ibs_states` keeps.

    This is the state of the art's per-locus weighting: the fusion gets it as a feature, its
    log a softmax over the neighbours turns back into the HMM's weighting, and learns where to
    trust it and where not.
    """
    if states not in ("neighbours", "panel"):
        raise ValueError(f"states='{states}' must be 'neighbours' or 'panel'")
    b, k = idx.shape
    observed = query != 0
    if cols is None:
        cols = feature_columns(observed, win_offset, win_len, None)  # (U,)
    if cols.numel() == 0:
        valid_f = valid.float()
        post_w = (valid_f / valid_f.sum(1, keepdim=True).clamp(min=1.0))[:, :, None]
        post_w = post_w.expand(b, k, win_len)
    else:
        if states == "panel" and panel_post is None:
            if allowed is None:
                allowed = torch.ones(b, panel.shape[0], dtype=torch.bool, device=query.device)
            panel_post = panel_posteriors(
                query, panel, allowed, ctx_morgan, cols, ne=ne, err=err, ibs=ibs
            )  # (B, N, U)
        if panel_post is not None:
            post = torch.take_along_dim(panel_post, idx[:, :, None], dim=1)  # (B, K, U)
        else:  # the K neighbours are the states
            state_cols = panel[:, cols][idx].permute(2, 0, 1).contiguous()  # (U, B, K)
            switch = switch_probabilities(ctx_morgan[cols], ne, n_panel)
            q_cols = query[:, cols].T.contiguous()  # (U, B)
            post = forward_backward(state_cols, q_cols, valid, switch, err)
        post = post * valid[:, :, None]  # (B, K, U)
        left, right, w = site_interpolation(cols, ctx_morgan, win_offset, win_len)
        post_w = (1 - w) * post.index_select(2, left) + w * post.index_select(2, right)
    pad = length - win_len
    return torch.nn.functional.pad(post_w, (0, pad)) if pad else post_w


def site_interpolation(
    cols: Tensor, ctx_morgan: Tensor, win_offset: int, win_len: int
) -> tuple[Tensor, Tensor, Tensor]:
    """For each window site, the HMM columns either side and the weight of the right one.

    Returns left, right (win_len,) indices into ``cols`` and w (win_len,) float32: a quantity
    known at the columns is ``(1 - w) * at[left] + w * at[right]`` at the site, linear in genetic
    position (``cols`` must be non-empty; a site beyond the ends takes the nearest column).
    """
    n_cols = cols.numel()
    sites = torch.arange(win_offset, win_offset + win_len, device=cols.device)
    right = torch.searchsorted(cols, sites, right=False).clamp(max=n_cols - 1)
    left = (torch.searchsorted(cols, sites, right=True) - 1).clamp(min=0)
    g_left, g_right = ctx_morgan[cols[left]].double(), ctx_morgan[cols[right]].double()
    span = g_right - g_left
    w = torch.where(span > 0, (ctx_morgan[sites].double() - g_left) / span, 0.0)
    return left, right, w.clamp(0, 1).float()


def panel_dosage(
    panel_post: Tensor | None,
    cols: Tensor,
    panel: Tensor,
    allowed: Tensor,
    ctx_morgan: Tensor,
    win_offset: int,
    win_len: int,
    length: int,
) -> Tensor:
    """The Li–Stephens P(ALT) at each window site over every panel state, (B, length).

    ``panel_post`` (B, N, U) the panel-state posteriors at ``cols`` (None or no column: the
    uniform copying prior over the ``allowed`` (B, N) rows, i.e. their ALT frequency). At a site,
    the posterior interpolated between the columns either side (:func:`site_interpolation`) is
    summed over the haplotypes carrying ALT: the HMM's own imputation, which the network takes
    as its starting logit and corrects. Only the columns some site reads are multiplied out, so
    the cost is (B x N x those columns x window) however wide the context.
    """
    alt = (panel[:, win_offset : win_offset + win_len] > 0).float()  # (N, W)
    if panel_post is None or cols.numel() == 0:
        ok = allowed.float()
        dose = (ok @ alt) / ok.sum(1, keepdim=True).clamp(min=1.0)  # (B, W)
    else:
        left, right, w = site_interpolation(cols, ctx_morgan, win_offset, win_len)
        used, inverse = torch.unique(torch.cat([left, right]), return_inverse=True)
        # (B, used, W): each used column's posterior summed over ALT carriers at every site
        at_cols = torch.matmul(panel_post.index_select(2, used).transpose(1, 2), alt)
        sites = torch.arange(win_len, device=alt.device)
        at_left, at_right = inverse[:win_len], inverse[win_len:]
        dose = (1 - w) * at_cols[:, at_left, sites] + w * at_cols[:, at_right, sites]
    dose = dose.clamp(0.0, 1.0)
    pad = length - win_len
    return torch.nn.functional.pad(dose, (0, pad)) if pad else dose


# Beagle 5.4's defaults: 0.1 cM steps, IBS judged over 7 of them, imp-states=1600 spread over a
# 6 cM segment (1600 // 60 = 26 haplotypes a step).
IBS_DEFAULTS = {"haps": 26, "step_cm": 0.1, "steps": 7}


def ibs_states(
    query_cols: Tensor,
    state_cols: Tensor,
    morgan: Tensor,
    allowed: Tensor,
    *,
    haps: int = 26,
    step_cm: float = 0.1,
    steps: int = 7,
    seed: int = 0,
) -> Tensor:
    """The HMM states Beagle would pick for each query: (B, N) bool, a subset of ``allowed``.

    query_cols (U, B) the query's alleles at the HMM's columns (+-1, 0 unobserved: matches
    anything); state_cols (U, N) the panel's (+-1); morgan (U,) their genetic positions. The
    columns fall into steps of ``step_cm``. From each step, a query takes the ``haps`` panel
    haplotypes that stay identical by state with it longest over the next ``steps`` steps
    (Beagle's ImpIbs; a query that matches no haplotype over any whole step keeps them all):
    the haplotypes still matching at the first depth where at most ``haps`` do, topped up from
    those that matched one step less; where more than ``haps`` match all the way, ``haps`` of
    them. Ties are broken by a fixed pseudo-random priority of the panel
    haplotypes per step (``seed``), so a query's states do not depend on its batch. The states
    are the union over steps. On the 5 Mb scenarios this keeps ~600 of 2,000 haplotypes, and the
    HMM over them (the jump rate still that of the whole panel) beats both the HMM over every
    haplotype and Beagle's composite states in every MAF bin; on a panel of 600 haplotypes it
    loses (see :data:`snvbert.impute.IBS_MIN_HAPS`).
    """
    n_cols = query_cols.shape[0]
    if n_cols == 0:
        return allowed.clone()
    cm = morgan.double() * 100.0
    bins = torch.floor((cm - cm[0]) / step_cm + 1e-9).long()  # 1e-9: decimal steps exactly
    starts = torch.cat(
        [
            torch.zeros(1, dtype=torch.long, device=bins.device),
            torch.nonzero(torch.diff(bins)).flatten() + 1,
        ]
    ).tolist() + [n_cols]
    q, p = query_cols.float(), state_cols.float()
    n_steps, n_haps = len(starts) - 1, state_cols.shape[1]
    agree: dict[int, Tensor] = {}  # the last ``steps`` steps' (B, N) masks: memory (steps, B, N)

    def ok(s: int) -> Tensor:
        """The allowed panel haplotypes identical by state with each query over step s."""
        if s not in agree:
            a, b = starts[s], starts[s + 1]
            same = (q[a:b].T @ p[a:b]) >= q[a:b].abs().sum(0)[:, None] - 0.5
            agree[s] = same & allowed
        return agree[s]

    gen = torch.Generator().manual_seed(seed)

    def first(mask: Tensor, prio: Tensor, m: Tensor) -> Tensor:
        """Per row, the m[row] members of ``mask`` of highest priority."""
        order = torch.argsort(torch.where(mask, prio, -1.0), dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(n_haps, device=order.device).expand_as(order)
        )
        return mask & (rank < m[:, None])

    keep = torch.zeros_like(allowed)
    for i in range(n_steps):
        for done_step in [k for k in agree if k < i]:
            del agree[done_step]
        priority = torch.rand(n_haps, generator=gen).to(allowed.device)  # this step's
        cell = ok(i)
        count = cell.sum(1)
        done = count <= haps
        keep |= cell & done[:, None]
        for d in range(1, min(steps, n_steps - i)):
            prev, cell = cell, cell & ok(i + d)
            count = cell.sum(1)
            now = ~done & (count <= haps)
            if now.any():
                top_up = first(prev[now] & ~cell[now], priority, haps - count[now])
                keep[now] |= cell[now] | top_up
                done |= now
            if done.all():
                break
        rest = ~done
        if rest.any():
            keep[rest] |= first(cell[rest], priority, torch.full_like(count[rest], haps))
    # A query identical by state with no haplotype over any whole step keeps every state.
    empty = ~keep.any(1)
    keep[empty] = allowed[empty]
    return keep


def panel_posteriors(
    query: Tensor,
    panel: Tensor,
    allowed: Tensor,
    ctx_morgan: Tensor,
    cols: Tensor,
    *,
    ne: float,
    err: float,
    ibs: dict | None = None,
) -> Tensor:
    """The Li–Stephens posterior over every panel haplotype at ``cols``, (B, N, U).

    ``ibs`` (keyword arguments of :func:`ibs_states`): only the haplotypes Beagle's IBS
    selection keeps are states (the jump rate stays that of the whole panel).
    """
    switch = switch_probabilities(ctx_morgan[cols], ne, panel.shape[0])
    state_cols, query_cols = panel[:, cols].T.contiguous(), query[:, cols].T.contiguous()
    if ibs is not None:
        allowed = ibs_states(query_cols, state_cols, ctx_morgan[cols], allowed, **ibs)
    return forward_backward(state_cols, query_cols, allowed, switch, err)


def select_by_posterior(
    post: Tensor,
    cols: Tensor,
    win_offset: int,
    win_len: int,
    k: int,
    query: Tensor,
    panel: Tensor,
    allowed: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The K panel rows the HMM copies most within the window: scores, idx, valid (B, K).

    A haplotype's weight is its largest posterior over the columns that bear on the window (the
    last one before it through the first one after it), so the neighbours hold the mosaic the
    HMM actually copies there, including short segments a whole-context similarity misses.
    Returned in order of the usual retrieval score (agreements minus disagreements).
    """
    lo = int(torch.searchsorted(cols, torch.tensor(win_offset, device=cols.device))) - 1
    hi = int(torch.searchsorted(cols, torch.tensor(win_offset + win_len, device=cols.device))) + 1
    lo, hi = max(lo, 0), min(max(hi, lo + 1), cols.numel())
    weight = post[:, :, lo:hi].amax(-1).masked_fill(~allowed, -1.0)  # (B, N)
    k = min(k, weight.shape[1])
    top = torch.topk(weight, k, dim=1)
    score = (query.float() @ panel.float().T).gather(1, top.indices)  # (B, K)
    score = score.masked_fill(top.values < 0, float("-inf"))
    order = torch.argsort(score, dim=1, descending=True)
    idx, score = top.indices.gather(1, order), score.gather(1, order)
    valid = torch.isfinite(score)
    return torch.where(valid, score, torch.zeros_like(score)), idx, valid


def switch_probabilities(morgan: Tensor, ne: float, n_states: int) -> Tensor:
    """Probability of a jump before each column, ``1 - exp(-4 ne d / N)`` (float32, (U,))."""
    morgan = morgan.double()
    gap = torch.diff(morgan, prepend=morgan[:1]).clamp(min=0.0)
    return (1.0 - torch.exp(-4.0 * ne * gap / max(n_states, 1))).float()


def li_stephens_err(n_states: int) -> float:
    """Li & Stephens' (2003) mismatch rate for a panel of ``n_states`` haplotypes.

    theta / (2 (theta + N)) with Watterson's theta = 1 / sum_{i<N} 1/i: about 3e-5 for 2,000
    haplotypes. The least error rate :func:`estimate_err` returns.
    """
    n = max(int(n_states), 2)
    theta = 1.0 / float(np.sum(1.0 / np.arange(1, n)))
    return theta / (2.0 * (theta + n))


def estimate_err(
    state_cols: Tensor,
    query_cols: Tensor,
    state_ok: Tensor | None,
    switch: Tensor,
    *,
    start: float = 0.002,
    batch: int = 32,
    max_iter: int = 5,
    tol: float = 0.05,
) -> float:
    """The error rate that fits these queries: EM (Baum-Welch) on the HMM's one emission parameter.

    Each step runs :func:`forward_backward` over every query (``batch`` at a time) and sets
    ``err`` to the posterior share of observed alleles that differ from the copied haplotype's,
    until it moves less than ``tol`` (relative) or after ``max_iter`` steps. On error-free
    calls the maximum-likelihood value falls towards 0 (a large panel always holds a perfect
    copy), so the estimate is floored at :func:`li_stephens_err`. state_cols (U, S) +-1;
    query_cols (U, Q) +-1, 0 unobserved; state_ok (Q, S) bool or None (every state allowed).
    """
    floor = li_stephens_err(state_cols.shape[1])
    err = max(float(start), floor)
    if state_ok is None:
        state_ok = torch.ones(
            query_cols.shape[1], state_cols.shape[1], dtype=torch.bool, device=query_cols.device
        )
    for _ in range(max_iter):
        mismatch, observed = 0.0, 0
        for lo in range(0, query_cols.shape[1], batch):
            q = query_cols[:, lo : lo + batch]
            post = forward_backward(state_cols, q, state_ok[lo : lo + batch], switch, err)
            # post (B, S, U); an observed allele the copied state does not carry
            differs = (state_cols.T[None, :, :] != q.T[:, None, :]) & (q.T[:, None, :] != 0)
            mismatch += float((post * differs).sum())
            observed += int((q != 0).sum())
        new = max(mismatch / max(observed, 1), floor)
        done = abs(new - err) <= tol * err
        err = new
        if done:
            break
    return err


def forward_backward(
    state_cols: Tensor,
    query_cols: Tensor,
    state_ok: Tensor,
    switch: Tensor,
    err: float,
) -> Tensor:
    """Scaled forward-backward: state posteriors (B, S, U).

    state_cols (U, S) or (U, B, S) the states' alleles (+-1) at each column; query_cols (U, B)
    the query's (0: unobserved, emits 1); state_ok (B, S) bool (other states have probability
    0); switch (U,) probability of a jump to a uniform state before each column. Emissions are
    made one column at a time, so memory holds the forward pass (U, B, S) and nothing else of
    that size.
    """
    n_cols, b = query_cols.shape
    ok = state_ok.float()
    n_states = ok.shape[1]
    uniform = ok / ok.sum(1, keepdim=True).clamp(min=1.0)  # (B, S)

    def emission(j: int) -> Tensor:
        q = query_cols[j][:, None]  # (B, 1)
        e = torch.where(state_cols[j] == q, 1.0 - err, err)  # (B, S)
        return torch.where(q != 0, e, torch.ones_like(e)) * ok

    fwd = torch.empty(n_cols, b, n_states, device=query_cols.device)
    a = emission(0) * uniform
    fwd[0] = a / a.sum(1, keepdim=True).clamp(min=1e-30)
    for j in range(1, n_cols):  # forward, scaled
        prior = (1.0 - switch[j]) * fwd[j - 1] + switch[j] * uniform
        a = prior * emission(j)
        fwd[j] = a / a.sum(1, keepdim=True).clamp(min=1e-30)
    beta = uniform.clone()
    for j in range(n_cols - 1, -1, -1):  # backward; the posterior replaces the forward value
        g = fwd[j] * beta
        g = g / g.sum(1, keepdim=True).clamp(min=1e-30)
        fwd[j] = g
        if j:
            be = beta * emission(j)
            beta = (1.0 - switch[j]) * be + switch[j] * be.sum(1, keepdim=True) * uniform
            beta = beta / beta.sum(1, keepdim=True).clamp(min=1e-30)
    return fwd.permute(1, 2, 0)
