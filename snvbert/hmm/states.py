"""State selection: the reference haplotypes an HMM query may copy (Beagle's ``ImpIbs``).

Beagle 5.4 does not run its HMM over every reference haplotype: per target it keeps those that
stay identical by state with it longest from each step of the typed sites. The HMM over that
union (with the whole panel's jump rate) is what snvbert's imputation and, by default, its
training run.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from snvbert.hmm import kernel
from snvbert.hmm.config import IBSConfig

# The tie-breaking priorities of the panel haplotypes, fixed: a query's states never depend on
# the run, the batch or the device.
PRIORITY_SEED = 0


def ibs_states(
    query_cols: Tensor,
    state_cols: Tensor,
    morgan: Tensor,
    allowed: Tensor,
    ibs: IBSConfig,
    *,
    compiled: bool | None = None,
) -> Tensor:
    """The HMM states Beagle would pick for each query: (B, N) bool, a subset of ``allowed``.

    query_cols (U, B) the query's alleles at the HMM's columns (+-1, 0 unobserved: matches
    anything); state_cols (U, N) the panel's (+-1); morgan (U,) their genetic positions. The
    columns fall into steps of ``ibs.step_cm``. From each step, a query takes the ``ibs.haps``
    panel haplotypes that stay identical by state with it longest over the next ``ibs.steps`` steps
    (Beagle's ImpIbs; a query that matches no haplotype over any whole step keeps them all):
    the haplotypes still matching at the first depth where at most ``haps`` do, topped up from
    those that matched one step less; where more than ``haps`` match all the way, ``haps`` of
    them. Ties are broken by a fixed pseudo-random priority of the panel
    haplotypes per step (:data:`PRIORITY_SEED`), so a query's states do not depend on its batch. The states
    are the union over steps. On the 5 Mb scenarios this keeps ~600 of 2,000 haplotypes, and the
    HMM over them (the jump rate still that of the whole panel) beats both the HMM over every
    haplotype and Beagle's composite states in every MAF bin; on a panel of 600 haplotypes it
    loses (see :data:`snvbert.hmm.config.IBS_MIN_HAPS`).

    ``compiled`` (None: on a CPU) runs the numba kernel (:func:`snvbert.hmm.kernel.ibs_states`)
    query by query instead of the batched torch steps; the picks are the same.
    """
    haps, step_cm, steps = ibs.haps, ibs.step_cm, ibs.steps
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
    n_steps, n_haps = len(starts) - 1, state_cols.shape[1]
    gen = torch.Generator().manual_seed(PRIORITY_SEED)
    if compiled is None:
        compiled = allowed.device.type == "cpu"
    if compiled:  # the compiled kernel: the same picks, query by query
        priority = torch.stack([torch.rand(n_haps, generator=gen) for _ in range(n_steps)])
        picks = kernel.ibs_states(
            query_cols.numpy(),
            state_cols.numpy(),
            allowed.numpy(),
            np.asarray(starts),
            priority.numpy(),
            haps,
            steps,
        )
        return torch.from_numpy(picks)
    q, p = query_cols.float(), state_cols.float()
    agree: dict[int, Tensor] = {}  # the last ``steps`` steps' (B, N) masks: memory (steps, B, N)

    def ok(s: int) -> Tensor:
        """The allowed panel haplotypes identical by state with each query over step s."""
        if s not in agree:
            a, b = starts[s], starts[s + 1]
            same = (q[a:b].T @ p[a:b]) >= q[a:b].abs().sum(0)[:, None] - 0.5
            agree[s] = same & allowed
        return agree[s]

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
