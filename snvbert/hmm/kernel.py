"""The Li–Stephens forward–backward and read-out, compiled for the CPU (numba).

The torch forward–backward (:mod:`snvbert.hmm.forward_backward`) runs over every panel
haplotype with a mask, one column at a time, each step a few tensor operations: right on a
GPU, where a step over (queries x 2,000 states) is one launch, and slow on a CPU, where it
spends its time in dispatch and in states the IBS selection already ruled out. Here each query
runs over its own states only (its IBS picks: about 600 of 2,000 on the 5 Mb scenario), one
thread per query, and the untyped sites are read out sparsely: at a site only the states that
carry its minor allele are summed (Beagle's habit), so a rare site costs its few carriers, not
the whole panel. The arithmetic is the torch pass's, step for step (``tests/test_hmm.py``
holds both to the numpy oracle).

Everything here is numpy in, numpy out; :class:`~snvbert.hmm.chromosome.ChromosomeHMM` picks
this path for CPU tensors and the torch one for CUDA. Compiled functions are cached on disk
(numba's ``cache=True``), so only the first run on a machine pays the compilation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import njit, prange

from snvbert.hmm.readout import site_interpolation

# The float below which a normaliser is treated as 0 (the torch pass's clamp).
_TINY = 1e-30


def set_threads(threads: int) -> None:
    """The threads the compiled kernels use (at most what numba found on the machine)."""
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))


@dataclass
class CompactPosteriors:
    """State posteriors of B queries over their own states.

    post (B, U, S) float32: query b's posterior at column u of its k-th state; idx (B, S)
    int32 the state's index among the HMM's N states (padding: 0); n (B,) int32 how many
    states each query has (the rest of its row is padding, posterior 0).
    """

    post: np.ndarray
    idx: np.ndarray
    n: np.ndarray

    def dense(
        self,
        n_states: int,
        rows: np.ndarray | None = None,
        lo: int = 0,
        hi: int | None = None,
    ) -> np.ndarray:
        """(B, N, U) float32 over every state, 0 where a state is not the query's.

        ``rows`` (default all) the queries and columns ``lo:hi`` (default all) to spread out."""
        rows = np.arange(self.post.shape[0]) if rows is None else np.asarray(rows)
        hi = self.post.shape[1] if hi is None else hi
        out = np.zeros((len(rows), n_states, hi - lo), dtype=np.float32)
        for i, row in enumerate(rows):
            k = int(self.n[row])
            out[i, self.idx[row, :k]] = self.post[row, lo:hi, :k].T
        return out


@njit(parallel=True, cache=True)
def _take_states(post, idx, n, rows, states, columns, n_states, out):  # pragma: no cover
    for i in prange(rows.shape[0]):
        b = rows[i]
        slot = np.full(n_states, -1, dtype=np.int32)
        for k in range(n[b]):
            slot[idx[b, k]] = k
        for j in range(states.shape[1]):
            k = slot[states[i, j]]
            for c in range(columns.shape[0]):
                out[i, j, c] = post[b, columns[c], k] if k >= 0 else 0.0


def take_states(
    post: CompactPosteriors,
    rows: np.ndarray,
    states: np.ndarray,
    columns: np.ndarray,
    n_states: int,
) -> np.ndarray:
    """(B, K, len(columns)) float32: queries ``rows``' posteriors of the states ``states``
    (B, K) at the HMM's ``columns``, 0 where a state is not one of the query's."""
    columns = np.ascontiguousarray(columns, dtype=np.int64)
    out = np.empty((len(rows), states.shape[1], len(columns)), dtype=np.float32)
    _take_states(
        post.post,
        post.idx,
        post.n,
        np.ascontiguousarray(rows, dtype=np.int64),
        np.ascontiguousarray(states, dtype=np.int64),
        columns,
        int(n_states),
        out,
    )
    return out


def compact_states(state_ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """idx (B, S) int32 and n (B,) int32 of a (B, N) bool mask, S its largest row count (>= 1)."""
    state_ok = np.asarray(state_ok, dtype=bool)
    n = state_ok.sum(1).astype(np.int32)
    width = max(1, int(n.max()) if len(n) else 1)
    idx = np.zeros((state_ok.shape[0], width), dtype=np.int32)
    rows, cols = np.nonzero(state_ok)
    starts = np.concatenate([[0], np.cumsum(n)[:-1]])
    idx[rows, np.arange(len(rows)) - np.repeat(starts, n)] = cols
    return idx, n


@njit(cache=True, fastmath=True)
def _fb_one(alleles, q, idx, n, switch, err, buf):  # pragma: no cover - compiled
    """Posteriors of one query (q (U,) +-1, 0 unobserved) over states idx[:n] into buf (U, >=n).

    The states' alleles are gathered once into a (U, n) block, so every inner loop runs over
    contiguous memory (and vectorises)."""
    n_cols = alleles.shape[0]
    own = np.empty((n_cols, n), dtype=np.int8)
    for j in range(n_cols):
        row = alleles[j]
        for k in range(n):
            own[j, k] = row[idx[k]]
    uni = np.float32(1.0 / max(n, 1))
    hit, miss = np.float32(1.0 - err), np.float32(err)
    one = np.float32(1.0)
    emit = np.empty(n, dtype=np.float32)
    beta = np.empty(n, dtype=np.float32)

    def emissions(j):
        qj = q[j]
        if qj == 0:
            emit[:] = one
        else:
            for k in range(n):
                emit[k] = hit if own[j, k] == qj else miss

    # forward, scaled
    emissions(0)
    total = np.float32(0.0)
    for k in range(n):
        a = emit[k] * uni
        buf[0, k] = a
        total += a
    scale = one / max(total, np.float32(_TINY))
    for k in range(n):
        buf[0, k] *= scale
    for j in range(1, n_cols):
        stay, jump = np.float32(1.0 - switch[j]), np.float32(switch[j]) * uni
        emissions(j)
        total = np.float32(0.0)
        for k in range(n):
            a = (stay * buf[j - 1, k] + jump) * emit[k]
            buf[j, k] = a
            total += a
        scale = one / max(total, np.float32(_TINY))
        for k in range(n):
            buf[j, k] *= scale
    # backward; the posterior replaces the forward value
    beta[:] = uni
    for j in range(n_cols - 1, -1, -1):
        total = np.float32(0.0)
        for k in range(n):
            g = buf[j, k] * beta[k]
            buf[j, k] = g
            total += g
        scale = one / max(total, np.float32(_TINY))
        for k in range(n):
            buf[j, k] *= scale
        if j:
            stay, jump = np.float32(1.0 - switch[j]), np.float32(switch[j]) * uni
            emissions(j)
            be_sum = np.float32(0.0)
            for k in range(n):
                beta[k] *= emit[k]
                be_sum += beta[k]
            total = np.float32(0.0)
            for k in range(n):
                beta[k] = stay * beta[k] + jump * be_sum
                total += beta[k]
            scale = one / max(total, np.float32(_TINY))
            for k in range(n):
                beta[k] *= scale


@njit(parallel=True, cache=True)
def _posteriors(alleles, query, idx, n, switch, err, out):  # pragma: no cover - compiled
    for b in prange(query.shape[1]):
        _fb_one(alleles, query[:, b], idx[b], n[b], switch, err, out[b])
        out[b, :, n[b] :] = 0.0


@njit(parallel=True, cache=True)
def _mismatches(alleles, query, idx, n, switch, err, out):  # pragma: no cover - compiled
    """Per query, the posterior expected count of observed alleles its copied state lacks."""
    n_cols = alleles.shape[0]
    for b in prange(query.shape[1]):
        buf = np.empty((n_cols, max(n[b], 1)), dtype=np.float32)
        q = query[:, b]
        _fb_one(alleles, q, idx[b], n[b], switch, err, buf)
        m = 0.0
        for j in range(n_cols):
            if q[j] != 0:
                for k in range(n[b]):
                    if alleles[j, idx[b, k]] != q[j]:
                        m += buf[j, k]
        out[b] = m


@njit(parallel=True, cache=True, fastmath=True)
def _sparse_dosage(
    post, idx, n, n_states, ptr, carriers, minor_alt, left, right, w, out
):  # pragma: no cover - compiled
    """Sites in order; the posteriors of the two columns either side spread over all N states
    once per column pair, so each carrier is one indexed load from each."""
    n_sites = left.shape[0]
    for b in prange(post.shape[0]):
        at_lo = np.zeros(n_states, dtype=np.float32)
        at_hi = np.zeros(n_states, dtype=np.float32)
        cur_lo, cur_hi = -1, -1
        for s in range(n_sites):
            lo, hi = left[s], right[s]
            if lo != cur_lo:
                for k in range(n[b]):
                    at_lo[idx[b, k]] = post[b, lo, k]
                cur_lo = lo
            if hi != cur_hi:
                for k in range(n[b]):
                    at_hi[idx[b, k]] = post[b, hi, k]
                cur_hi = hi
            sum_lo, sum_hi = np.float32(0.0), np.float32(0.0)
            for t in range(ptr[s], ptr[s + 1]):
                c = carriers[t]
                sum_lo += at_lo[c]
                sum_hi += at_hi[c]
            d = (1.0 - w[s]) * sum_lo + w[s] * sum_hi
            if not minor_alt[s]:
                d = 1.0 - d
            out[s, b] = min(max(d, 0.0), 1.0)


@njit(cache=True)
def _carriers(rows, ref_haps, ptr, carriers, minor_alt, first):  # pragma: no cover - compiled
    """Fill the CSR of minor-allele carriers for ``rows`` (sites first .. first + len - 1)."""
    n_ref = ref_haps.shape[0]
    t = ptr[first]
    for i in range(rows.shape[0]):
        row = rows[i]
        alt = 0
        for c in range(n_ref):
            alt += row[ref_haps[c]]
        is_alt = 2 * alt <= n_ref
        minor = 1 if is_alt else 0
        for c in range(n_ref):
            if row[ref_haps[c]] == minor:
                carriers[t] = c
                t += 1
        minor_alt[first + i] = is_alt
        ptr[first + i + 1] = t


@njit(cache=True)
def _minor_counts(rows, ref_haps):  # pragma: no cover - compiled
    out = np.empty(rows.shape[0], dtype=np.int64)
    n_ref = ref_haps.shape[0]
    for i in range(rows.shape[0]):
        alt = 0
        for c in range(n_ref):
            alt += rows[i, ref_haps[c]]
        out[i] = min(alt, n_ref - alt)
    return out


@njit(parallel=True, cache=True)
def _ibs_states(query, alleles, allowed, starts, order, haps, steps, out):  # pragma: no cover
    """Beagle's IBS picks per query (see :func:`snvbert.hmm.states.ibs_states`) into out (B, N).

    starts (n_steps + 1,) the steps' first columns; order (n_steps, N) the haplotypes by
    descending tie-break priority in each step."""
    n_steps, n_haps = starts.shape[0] - 1, alleles.shape[1]
    for b in prange(query.shape[1]):
        q = query[:, b]
        ok = np.empty((n_steps, n_haps), dtype=np.bool_)
        for s in range(n_steps):
            for h in range(n_haps):
                ok[s, h] = allowed[b, h]
            for j in range(starts[s], starts[s + 1]):
                if q[j] != 0:
                    for h in range(n_haps):
                        if alleles[j, h] != q[j]:
                            ok[s, h] = False
        keep = np.zeros(n_haps, dtype=np.bool_)
        cell = np.empty(n_haps, dtype=np.bool_)
        prev = np.empty(n_haps, dtype=np.bool_)
        for i in range(n_steps):
            count = 0
            for h in range(n_haps):
                cell[h] = ok[i, h]
                count += cell[h]
            done = count <= haps
            if done:
                for h in range(n_haps):
                    keep[h] |= cell[h]
            d = 1
            while not done and d < min(steps, n_steps - i):
                count = 0
                for h in range(n_haps):
                    prev[h] = cell[h]
                    cell[h] = cell[h] and ok[i + d, h]
                    count += cell[h]
                if count <= haps:
                    # the survivors, topped up from those that matched one step less
                    room = haps - count
                    for h in range(n_haps):
                        keep[h] |= cell[h]
                    for t in range(n_haps):
                        if room == 0:
                            break
                        h = order[i, t]
                        if prev[h] and not cell[h]:
                            keep[h] = True
                            room -= 1
                    done = True
                d += 1
            if not done:  # more than haps match all the way: haps of them
                room = haps
                for t in range(n_haps):
                    if room == 0:
                        break
                    h = order[i, t]
                    if cell[h]:
                        keep[h] = True
                        room -= 1
        any_kept = False
        for h in range(n_haps):
            any_kept |= keep[h]
        for h in range(n_haps):
            out[b, h] = keep[h] if any_kept else allowed[b, h]


def ibs_states(
    query: np.ndarray,
    alleles: np.ndarray,
    allowed: np.ndarray,
    starts: np.ndarray,
    priority: np.ndarray,
    haps: int,
    steps: int,
) -> np.ndarray:
    """(B, N) bool: Beagle's IBS picks for queries (U, B) over states (U, N) (+-1, 0 unobserved).

    starts (n_steps + 1,) the steps' first columns and the end; priority (n_steps, N) the
    tie-break priority of each haplotype in each step (higher first)."""
    out = np.empty(allowed.shape, dtype=bool)
    order = np.argsort(-priority, axis=1, kind="stable").astype(np.int32)
    _ibs_states(
        np.ascontiguousarray(query, dtype=np.int8),
        np.ascontiguousarray(alleles, dtype=np.int8),
        np.ascontiguousarray(allowed, dtype=bool),
        np.asarray(starts, dtype=np.int64),
        order,
        int(haps),
        int(steps),
        out,
    )
    return out


def posteriors(
    alleles: np.ndarray,
    query: np.ndarray,
    state_ok: np.ndarray,
    switch: np.ndarray,
    err: float,
) -> CompactPosteriors:
    """The forward–backward of queries (U, B) (+-1, 0 unobserved) over their allowed states.

    alleles (U, N) int8 +-1 the states' alleles at the columns; state_ok (B, N) bool; switch
    (U,) the jump probability before each column (:func:`~snvbert.hmm.model.switch_probabilities`).
    """
    args = _hmm_arguments(alleles, query, state_ok, switch, err)
    idx = args[2]
    out = np.empty((query.shape[1], alleles.shape[0], idx.shape[1]), dtype=np.float32)
    _posteriors(*args, out)
    return CompactPosteriors(out, idx, args[3])


def mismatches(
    alleles: np.ndarray,
    query: np.ndarray,
    state_ok: np.ndarray,
    switch: np.ndarray,
    err: float,
) -> np.ndarray:
    """(B,) float64: each query's posterior expected number of mismatching observed alleles
    (the EM statistic of :func:`snvbert.hmm.em.estimate_err`), with no posterior kept."""
    out = np.empty(query.shape[1], dtype=np.float64)
    _mismatches(*_hmm_arguments(alleles, query, state_ok, switch, err), out)
    return out


def _hmm_arguments(
    alleles: np.ndarray, query: np.ndarray, state_ok: np.ndarray, switch: np.ndarray, err: float
) -> tuple:
    """The compiled forward–backward's arguments, in its dtypes: alleles, query, idx, n,
    switch, err."""
    idx, n = compact_states(state_ok)
    return (
        np.ascontiguousarray(alleles, dtype=np.int8),
        np.ascontiguousarray(query, dtype=np.int8),
        idx,
        n,
        np.ascontiguousarray(switch, dtype=np.float64),
        float(err),
    )


@dataclass
class MinorCarriers:
    """Per panel site, the states carrying its minor allele (CSR), for the sparse read-out.

    ptr (n_sites + 1,) int64 and carriers (nnz,) int32 state indices; minor_alt (n_sites,) bool
    whether the minor allele is ALT (else the dosage is 1 minus the carriers' sum).
    """

    ptr: np.ndarray
    carriers: np.ndarray
    minor_alt: np.ndarray

    @classmethod
    def from_panel(
        cls, haplotypes: np.ndarray, ref_haps: np.ndarray, chunk: int = 4096
    ) -> MinorCarriers:
        """haplotypes (n_sites, n_haps) 0/1 (memory-mapped: read ``chunk`` sites at a time);
        ref_haps (N,) its columns that are the states, in state order."""
        n_sites = haplotypes.shape[0]
        ref_haps = np.ascontiguousarray(ref_haps, dtype=np.int64)
        counts = np.concatenate(
            [
                _minor_counts(np.asarray(haplotypes[lo : lo + chunk]), ref_haps)
                for lo in range(0, n_sites, chunk)
            ]
            or [np.zeros(0, dtype=np.int64)]
        )
        ptr = np.zeros(n_sites + 1, dtype=np.int64)
        carriers = np.empty(int(counts.sum()), dtype=np.int32)
        minor_alt = np.zeros(n_sites, dtype=bool)
        for lo in range(0, n_sites, chunk):
            _carriers(
                np.asarray(haplotypes[lo : lo + chunk]), ref_haps, ptr, carriers, minor_alt, lo
            )
        return cls(ptr, carriers, minor_alt)


@dataclass
class ChromosomeReadout:
    """Everything the sparse read-out of a chromosome needs besides the posteriors: the minor
    allele's carriers at every panel site and each site's interpolation between the typed
    columns either side; :meth:`dosage` reads P(ALT) (n_sites, B) at every site."""

    carriers: MinorCarriers
    n_states: int
    left: np.ndarray
    right: np.ndarray
    w: np.ndarray

    @classmethod
    def from_panel(
        cls,
        haplotypes: np.ndarray,
        ref_haps: np.ndarray,
        typed_sites: np.ndarray,
        morgans: np.ndarray,
    ) -> ChromosomeReadout:
        """haplotypes (n_sites, n_haps) 0/1; ref_haps (N,) the states; typed_sites (U,) the
        HMM's columns (increasing panel site indices); morgans (n_sites,)."""
        left, right, w = site_interpolation(
            torch.from_numpy(np.asarray(typed_sites, dtype=np.int64)),
            torch.from_numpy(np.asarray(morgans, dtype=np.float64)),
            0,
            haplotypes.shape[0],
        )
        carriers = MinorCarriers.from_panel(haplotypes, ref_haps)
        return cls(carriers, len(ref_haps), left.numpy(), right.numpy(), w.numpy())

    def dosage(self, post: CompactPosteriors) -> np.ndarray:
        return sparse_dosage(post, self.carriers, self.n_states, self.left, self.right, self.w)


def sparse_dosage(
    post: CompactPosteriors,
    carriers: MinorCarriers,
    n_states: int,
    left: np.ndarray,
    right: np.ndarray,
    w: np.ndarray,
) -> np.ndarray:
    """P(ALT) (n_sites, B) at every panel site, interpolated between the columns either side.

    left, right (n_sites,) column indices and w (n_sites,) the right one's weight
    (:func:`~snvbert.hmm.readout.site_interpolation`).
    """
    out = np.empty((len(left), post.post.shape[0]), dtype=np.float32)
    _sparse_dosage(
        post.post,
        post.idx,
        post.n,
        int(n_states),
        carriers.ptr,
        carriers.carriers,
        carriers.minor_alt,
        np.ascontiguousarray(left, dtype=np.int64),
        np.ascontiguousarray(right, dtype=np.int64),
        np.ascontiguousarray(w, dtype=np.float64),
        out,
    )
    return out
