"""The mismatch rate fitted to the targets: EM (Baum–Welch) on the HMM's one emission parameter.

Genotype errors and phase switches raise it, an error-free array lowers it towards Li and
Stephens' rate; a fixed rate is right for one kind of array only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snvbert.hmm import kernel
from snvbert.hmm.forward_backward import forward_backward
from snvbert.hmm.model import li_stephens_err


def estimate_err(
    state_cols: Tensor,
    query_cols: Tensor,
    state_ok: Tensor | None,
    switch: Tensor,
    *,
    start: float,
    batch: int,
    max_iter: int = 5,
    tol: float = 0.05,
    compiled: bool = False,
) -> float:
    """The error rate that fits these queries: EM (Baum-Welch) on the HMM's one emission parameter.

    Each step runs :func:`forward_backward` over every query (``batch`` at a time) and sets
    ``err`` to the posterior share of observed alleles that differ from the copied haplotype's,
    until it moves less than ``tol`` (relative) or after ``max_iter`` steps. On error-free
    calls the maximum-likelihood value falls towards 0 (a large panel always holds a perfect
    copy), so the estimate is floored at :func:`li_stephens_err`. state_cols (U, S) +-1;
    query_cols (U, Q) +-1, 0 unobserved; state_ok (Q, S) bool or None (every state allowed).
    ``compiled``: the CPU kernel (:func:`snvbert.hmm.kernel.mismatches`, every query at once,
    no posterior kept), else the torch pass ``batch`` queries at a time.
    """
    floor = li_stephens_err(state_cols.shape[1])
    err = max(float(start), floor)
    if state_ok is None:
        state_ok = torch.ones(
            query_cols.shape[1], state_cols.shape[1], dtype=torch.bool, device=query_cols.device
        )
    observed = int((query_cols != 0).sum())
    for _ in range(max_iter):
        mismatch = _mismatches(state_cols, query_cols, state_ok, switch, err, batch, compiled)
        new = max(mismatch / max(observed, 1), floor)
        done = abs(new - err) <= tol * err
        err = new
        if done:
            break
    return err


def _mismatches(
    state_cols: Tensor,
    query_cols: Tensor,
    state_ok: Tensor,
    switch: Tensor,
    err: float,
    batch: int,
    compiled: bool,
) -> float:
    """The posterior expected number of observed alleles the copied state does not carry."""
    if compiled:
        args = (state_cols, query_cols, state_ok, switch)
        return float(kernel.mismatches(*(t.cpu().numpy() for t in args), err).sum())
    mismatch = 0.0
    for lo in range(0, query_cols.shape[1], batch):
        q = query_cols[:, lo : lo + batch]
        post = forward_backward(state_cols, q, state_ok[lo : lo + batch], switch, err)
        # post (B, S, U); an observed allele the copied state does not carry
        differs = (state_cols.T[None, :, :] != q.T[:, None, :]) & (q.T[:, None, :] != 0)
        mismatch += float((post * differs).sum())
    return mismatch
