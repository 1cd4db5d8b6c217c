"""The HMM of one window's retrieval context, and its read-out at the K retrieved neighbours.

Training's dense (random-mask) levels, and array levels with ``data.hmm.scope=context``, run the
HMM per batch over the context columns some query of the batch observes (thousands of typed
sites for a dense mask: the only affordable form there). Its states are every panel haplotype a
query may copy (``states=panel``, as Beagle runs it, through :class:`ChromosomeHMM` over those
columns) or only the K neighbours (``states=neighbours``).
"""

from __future__ import annotations

from torch import Tensor

from snvbert.hmm.chromosome import ChromosomeHMM
from snvbert.hmm.config import HMMConfig
from snvbert.hmm.forward_backward import forward_backward
from snvbert.hmm.model import switch_probabilities
from snvbert.hmm.readout import neighbour_posteriors, uniform_neighbour_posteriors


def context_posteriors(
    query: Tensor, panel: Tensor, allowed: Tensor, ctx_morgan: Tensor, cols: Tensor, hmm: HMMConfig
) -> Tensor:
    """The panel-state posteriors (B, N, U) at context columns ``cols``.

    query (B, C) +-1, 0 hidden; panel (N, C) +-1; allowed (B, N); ctx_morgan (C,).
    """
    model = ChromosomeHMM(panel[:, cols].T.contiguous(), ctx_morgan[cols], ne=hmm.ne, ibs=hmm.ibs)
    return model.posteriors(query[:, cols].T.contiguous(), allowed, float(hmm.err))


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
    hmm: HMMConfig,
    cols: Tensor,
    panel_post: Tensor | None = None,
) -> Tensor:
    """Li–Stephens posterior of copying each neighbour at each window site, (B, K, length).

    The states are either every panel haplotype a query may copy (``hmm.states="panel"``:
    ``panel_post`` (B, N, U), computed beforehand at ``cols`` by :func:`context_posteriors` or a
    :class:`ChromosomeHMM`), read at the K neighbours ``idx``, or the K retrieved neighbours
    themselves (``"neighbours"``: a forward–backward over them, here, jump rate that of the
    whole panel). Window sites between columns take the posterior interpolated linearly in
    genetic position. This is the state of the art's per-locus weighting: the fusion gets it as
    a feature, its log a softmax over the neighbours turns back into the HMM's weighting, and
    learns where to trust it and where not.
    """
    if cols.numel() == 0:
        return uniform_neighbour_posteriors(valid, win_len, length)
    if panel_post is not None:
        post = panel_post.take_along_dim(idx[:, :, None], dim=1)  # (B, K, U)
    else:
        if hmm.states == "panel":
            raise ValueError("states=panel needs the panel-state posteriors (panel_post)")
        state_cols = panel[:, cols][idx].permute(2, 0, 1).contiguous()  # (U, B, K)
        switch = switch_probabilities(ctx_morgan[cols], hmm.ne, panel.shape[0])
        q_cols = query[:, cols].T.contiguous()  # (U, B)
        post = forward_backward(state_cols, q_cols, valid, switch, float(hmm.err))
    return neighbour_posteriors(post, valid, cols, ctx_morgan, win_offset, win_len, length)
