"""The Li–Stephens model: a query haplotype is a mosaic of the states (panel haplotypes) it copies.

Transitions: between two typed columns the copied state jumps, with probability
``1 - exp(-4 ne d / N)`` (d the genetic distance in Morgans, N the panel's haplotypes), to a
state drawn uniformly from those the query may copy; no distance, no jump. Emissions: at an
observed column the copied allele is emitted, the other with probability ``err``; an
unobserved column (0) emits 1 for every state. Alleles are +-1 and an unobserved query column
0 (:mod:`snvbert.data.encoding`), so a match is ``state == query``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def switch_probabilities(morgan: Tensor, ne: float, n_states: int) -> Tensor:
    """Probability of a jump before each column, ``1 - exp(-4 ne d / N)`` (float32, (U,)).

    morgan (U,) the columns' genetic positions, increasing; the first column's value is 0 (the
    forward pass starts from the uniform prior), as is any column at the same position as the
    one before it.
    """
    morgan = morgan.double()
    gap = torch.diff(morgan, prepend=morgan[:1]).clamp(min=0.0)
    return (1.0 - torch.exp(-4.0 * ne * gap / max(n_states, 1))).float()


def emission(state_col: Tensor, query_col: Tensor, err: float) -> Tensor:
    """Emission probabilities at one column, (B, S): ``1 - err`` where the state carries the
    query's allele, ``err`` where not, 1 where the query is unobserved.

    state_col (S,) or (B, S) +-1; query_col (B,) +-1, 0 unobserved.
    """
    q = query_col[:, None]
    e = torch.where(state_col == q, 1.0 - err, err)
    return torch.where(q != 0, e, torch.ones_like(e))


def li_stephens_err(n_states: int) -> float:
    """Li & Stephens' (2003) mismatch rate for a panel of ``n_states`` haplotypes.

    theta / (2 (theta + N)) with Watterson's theta = 1 / sum_{i<N} 1/i: about 3e-5 for 2,000
    haplotypes. The least error rate :func:`snvbert.hmm.em.estimate_err` returns, and the one an
    error-free array fits to.
    """
    n = max(int(n_states), 2)
    theta = 1.0 / float(np.sum(1.0 / np.arange(1, n)))
    return theta / (2.0 * (theta + n))
