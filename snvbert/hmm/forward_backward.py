"""Scaled forward–backward over the typed columns: the posterior of each state at each column.

Beagle's ``ImpLSBaum``. One implementation, torch, on whatever device its inputs are on; the
tests hold an independent numpy oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snvbert.hmm.model import emission


def forward_backward(
    state_cols: Tensor,
    query_cols: Tensor,
    state_ok: Tensor,
    switch: Tensor,
    err: float,
) -> Tensor:
    """State posteriors (B, S, U).

    state_cols (U, S) or (U, B, S) the states' alleles (+-1) at each column; query_cols (U, B)
    the query's (0: unobserved, emits 1); state_ok (B, S) bool (other states have probability
    0); switch (U,) probability of a jump to a uniform allowed state before each column
    (:func:`snvbert.hmm.model.switch_probabilities`). Emissions are made one column at a time,
    so memory holds the forward pass (U, B, S) and nothing else of that size. The result is a
    permuted view of that (U, B, S) buffer: ``.permute(2, 0, 1)`` gives it back for free.
    """
    n_cols, b = query_cols.shape
    ok = state_ok.float()
    n_states = ok.shape[1]
    uniform = ok / ok.sum(1, keepdim=True).clamp(min=1.0)  # (B, S)

    def emit(j: int) -> Tensor:
        return emission(state_cols[j], query_cols[j], err) * ok

    fwd = torch.empty(n_cols, b, n_states, device=query_cols.device)
    a = emit(0) * uniform
    fwd[0] = a / a.sum(1, keepdim=True).clamp(min=1e-30)
    for j in range(1, n_cols):  # forward, scaled
        prior = (1.0 - switch[j]) * fwd[j - 1] + switch[j] * uniform
        a = prior * emit(j)
        fwd[j] = a / a.sum(1, keepdim=True).clamp(min=1e-30)
    beta = uniform.clone()
    for j in range(n_cols - 1, -1, -1):  # backward; the posterior replaces the forward value
        g = fwd[j] * beta
        g = g / g.sum(1, keepdim=True).clamp(min=1e-30)
        fwd[j] = g
        if j:
            be = beta * emit(j)
            beta = (1.0 - switch[j]) * be + switch[j] * be.sum(1, keepdim=True) * uniform
            beta = beta / beta.sum(1, keepdim=True).clamp(min=1e-30)
    return fwd.permute(1, 2, 0)
