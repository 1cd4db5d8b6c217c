"""Read-outs of the state posteriors: at any site, at the retrieved neighbours, as P(ALT).

The forward–backward runs over typed columns only; a site between two typed columns takes the
posterior interpolated linearly in genetic position (:func:`site_interpolation`, as Beagle and
Minimac do), and the HMM's own imputation there is that posterior summed over the states
carrying ALT (:func:`interpolated_dosage`; Beagle's habit: the untyped sites are read out only
through the states' alleles, never by running the HMM at them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PanelReadout:
    """A batch's read-outs of the panel-state HMM, computed beforehand (imputation: once per
    block of people over the chromosome, by :mod:`snvbert.hmm.kernel`).

    dose (B, length) P(ALT) at the window's sites (padded); cols (U,) the context columns the
    neighbours' posteriors are known at; neighbours maps neighbour indices (B, K), and
    optionally which of the U columns (U',), to their posteriors (B, K, U) there, or (B, K, U')
    (0 for a haplotype that is not one of the query's states); with ``rows`` (B',), the batch
    rows whose neighbours ``idx`` (B', K) are, to (B', K, ...).
    """

    dose: Tensor
    cols: Tensor
    neighbours: Callable[..., Tensor]


def pad_sites(x: Tensor, length: int) -> Tensor:
    """``x`` (..., W) zero-padded on its last (site) axis to the window ``length``."""
    pad = length - x.shape[-1]
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def site_interpolation(
    cols: Tensor, morgan: Tensor, first: int, n_sites: int
) -> tuple[Tensor, Tensor, Tensor]:
    """For sites ``first .. first + n_sites - 1``, the HMM columns either side and the right one's weight.

    cols (U,) increasing site indices of the HMM's columns (non-empty), in the coordinates of
    ``morgan``, the sites' genetic positions. Returns left, right (n_sites,) indices into
    ``cols`` and w (n_sites,) float32: a quantity known at the columns is
    ``(1 - w) * at[left] + w * at[right]`` at the site, linear in genetic position (a site
    beyond the ends takes the nearest column).
    """
    n_cols = cols.numel()
    sites = torch.arange(first, first + n_sites, device=cols.device)
    right = torch.searchsorted(cols, sites, right=False).clamp(max=n_cols - 1)
    left = (torch.searchsorted(cols, sites, right=True) - 1).clamp(min=0)
    g_left, g_right = morgan[cols[left]].double(), morgan[cols[right]].double()
    span = g_right - g_left
    w = torch.where(span > 0, (morgan[sites].double() - g_left) / span, 0.0)
    return left, right, w.clamp(0, 1).float()


def interpolated_dosage(
    post: Tensor, alt: Tensor, left: Tensor, right: Tensor, w: Tensor
) -> Tensor:
    """P(ALT) (B, W) at W sites from the state posteriors at the columns, clamped to [0, 1].

    post (B, N, U) state posteriors at the columns; alt (N, W) float, 1 where a state carries
    ALT at the site; left, right, w (W,) from :func:`site_interpolation`. Only the columns some
    site reads are multiplied out: the cost is (B x N x those columns x W).
    """
    used, inverse = torch.unique(torch.cat([left, right]), return_inverse=True)
    # (B, used, W): each used column's posterior summed over ALT carriers at every site
    at_cols = torch.matmul(post.index_select(2, used).transpose(1, 2), alt)
    sites = torch.arange(alt.shape[1], device=alt.device)
    at_left, at_right = inverse[: len(left)], inverse[len(left) :]
    dose = (1 - w) * at_cols[:, at_left, sites] + w * at_cols[:, at_right, sites]
    return dose.clamp(0.0, 1.0)


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

    ``panel_post`` (B, N, U) the panel-state posteriors at context columns ``cols`` (None or no
    column: the uniform copying prior over the ``allowed`` (B, N) rows, i.e. their ALT
    frequency); panel (N, C) +-1 over the context; the window is context columns
    [win_offset, win_offset + win_len), padded to ``length``. The HMM's own imputation, which
    the network takes as its starting logit and corrects.
    """
    alt = (panel[:, win_offset : win_offset + win_len] > 0).float()  # (N, W)
    if panel_post is None or cols.numel() == 0:
        ok = allowed.float()
        dose = ((ok @ alt) / ok.sum(1, keepdim=True).clamp(min=1.0)).clamp(0.0, 1.0)  # (B, W)
    else:
        left, right, w = site_interpolation(cols, ctx_morgan, win_offset, win_len)
        dose = interpolated_dosage(panel_post, alt, left, right, w)
    return pad_sites(dose, length)


def neighbour_posteriors(
    post: Tensor,
    valid: Tensor,
    cols: Tensor,
    ctx_morgan: Tensor,
    win_offset: int,
    win_len: int,
    length: int,
) -> Tensor:
    """The posterior of copying each neighbour at each window site, (B, K, length).

    post (B, K, U) the neighbours' posteriors at context columns ``cols`` (non-empty); invalid
    neighbours (``valid`` (B, K) False) get 0. Between the columns the posterior is
    interpolated in genetic position; a column a query does not observe is an exact HMM
    position (it emits 1), so its posterior is exact there.
    """
    post = post * valid[:, :, None]
    left, right, w = site_interpolation(cols, ctx_morgan, win_offset, win_len)
    post_w = (1 - w) * post.index_select(2, left) + w * post.index_select(2, right)
    return pad_sites(post_w, length)


def uniform_neighbour_posteriors(valid: Tensor, win_len: int, length: int) -> Tensor:
    """With no observed column, the prior: uniform over the valid neighbours, (B, K, length)."""
    valid_f = valid.float()
    post = (valid_f / valid_f.sum(1, keepdim=True).clamp(min=1.0))[:, :, None]
    post = post.expand(*valid.shape, win_len)
    return pad_sites(post, length)


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
