"""Agreement runs at chosen sites, compiled for the CPU (numba).

A neighbour's left (right) agreement run at a site counts the query's observed columns since
(until) the nearest one where the neighbour disagrees with it, strictly left (right) of the
site (:func:`snvbert.data.retrieval.neighbour_features` defines them with cumulative maxima
over every column of every neighbour: right on a GPU, and on a CPU the largest cost of
imputation's retrieval). Here one pass per (query, neighbour) over the feature columns, one
thread per query, and the runs are read at the chosen sites only.

numpy in, numpy out; :func:`snvbert.data.retrieval.packed_neighbour_features` takes this path
for CPU tensors. ``tests/test_retrieval.py`` holds it equal to the torch definition.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def _runs(query, panel, idx, starts, before, upto, left, right):  # pragma: no cover - compiled
    n_rows, k_nbr = idx.shape
    n_cols = query.shape[1]
    for b in prange(n_rows):
        t0, t1 = starts[b], starts[b + 1]
        if t1 == t0:
            continue
        incl = np.empty(n_cols + 1, dtype=np.int32)  # incl[u + 1]: the run ending at u
        excl = np.empty(n_cols + 1, dtype=np.int32)  # excl[u]: the run starting at u
        q = query[b]
        for j in range(k_nbr):
            nbr = panel[idx[b, j]]
            run = 0
            incl[0] = 0
            for u in range(n_cols):
                if q[u] != 0:
                    run = run + 1 if nbr[u] == q[u] else 0
                incl[u + 1] = run
            run = 0
            excl[n_cols] = 0
            for u in range(n_cols - 1, -1, -1):
                if q[u] != 0:
                    run = run + 1 if nbr[u] == q[u] else 0
                excl[u] = run
            for t in range(t0, t1):
                left[t, j] = incl[before[t]]
                right[t, j] = excl[upto[t]]


def packed_runs(
    query: np.ndarray,
    panel: np.ndarray,
    idx: np.ndarray,
    rows: np.ndarray,
    before: np.ndarray,
    upto: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Left and right agreement runs (T, K) int32 at T chosen (row, site) pairs.

    query (B, U) int8 the queries' calls at the feature columns (+-1, 0 unobserved); panel
    (N, U) int8 +-1 the reference haplotypes there; idx (B, K) each query's neighbours; rows
    (T,) each pair's query, in increasing order; before / upto (T,) how many feature columns
    lie strictly left of / at or left of each pair's site.
    """
    rows = np.asarray(rows, dtype=np.int64)
    n_rows = idx.shape[0]
    if len(rows) and np.any(rows[1:] < rows[:-1]):
        raise ValueError("packed_runs needs the pairs' rows in increasing order")
    starts = np.searchsorted(rows, np.arange(n_rows + 1)).astype(np.int64)
    left = np.empty((len(rows), idx.shape[1]), dtype=np.int32)
    right = np.empty_like(left)
    _runs(
        np.ascontiguousarray(query, dtype=np.int8),
        np.ascontiguousarray(panel, dtype=np.int8),
        np.ascontiguousarray(idx, dtype=np.int64),
        starts,
        np.ascontiguousarray(before, dtype=np.int64),
        np.ascontiguousarray(upto, dtype=np.int64),
        left,
        right,
    )
    return left, right
