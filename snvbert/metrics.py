"""Imputation metrics: aggregate dosage r² per MAF bin, and masked F1 / accuracy.

Both are torchmetrics ``Metric``s whose states are sums (``dist_reduce_fx="sum"``), so they
sync exactly under DDP: the r² of the pooled genotypes, not a mean of per-rank r².
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score

from snvbert.maf import MAF_EDGES

# Bins [0,.001) [.001,.005) [.005,.01) [.01,.05) [.05,.5] (edges: snvbert.maf, the one definition).
MAF_BIN_NAMES: tuple[str, ...] = tuple(
    f"r2_maf_{lo:g}_{hi:g}" for lo, hi in zip(MAF_EDGES[:-1], MAF_EDGES[1:], strict=True)
)
RARE_MAF = 0.05  # F1 is reported separately below and above this MAF


def scored_sites(batch: Mapping[str, Tensor]) -> Tensor:
    """Sites that count in metrics: hidden, and in the window's core.

    Windows overlap; counting only core sites scores each (site, haplotype) once, as the
    stitched imputation output will. The loss still uses every hidden site of the window.
    """
    mask = batch["mask"]
    return mask & batch["core"] if "core" in batch else mask


def aggregate_r2(dosage: np.ndarray, truth: np.ndarray) -> float:
    """Squared Pearson correlation of imputed dosage and true allele count, pooled.

    NaN when there are no genotypes or either side has zero variance.
    """
    x = np.asarray(dosage, dtype=np.float64).ravel()
    y = np.asarray(truth, dtype=np.float64).ravel()
    if x.size == 0:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    vx, vy = (dx * dx).sum(), (dy * dy).sum()
    if vx <= 0 or vy <= 0:
        return float("nan")
    return float((dx * dy).sum() ** 2 / (vx * vy))


def maf_bin(maf: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Bin index 0..4 of each MAF (the last bin includes 0.5)."""
    inner = MAF_EDGES[1:-1]
    if isinstance(maf, Tensor):
        return torch.bucketize(
            maf, torch.tensor(inner, dtype=maf.dtype, device=maf.device), right=True
        )
    return np.searchsorted(np.asarray(inner), maf, side="right")


def minor_allele_coding(
    dosage: np.ndarray, truth: np.ndarray, af: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Count the minor allele: where ALT is the major allele (af > 0.5), use 2 - x and 2 - y.

    Pooled r² is not invariant to this: ALT-counting inflates the rare bins.
    """
    flip = np.asarray(af) > 0.5
    return np.where(flip, 2 - dosage, dosage), np.where(flip, 2 - truth, truth)


def r2_by_maf(dosage: np.ndarray, truth: np.ndarray, af: np.ndarray) -> dict[str, float]:
    """Aggregate r² overall and per MAF bin, minor-allele coded; keys as :class:`DosageR2`.

    dosage, truth: diploid values (0..2), broadcastable with af (panel ALT frequency per site).
    """
    af = np.broadcast_to(af, np.shape(dosage))
    x, y = minor_allele_coding(np.asarray(dosage, float), np.asarray(truth, float), af)
    bins = maf_bin(np.minimum(af, 1 - af))
    out = {"r2": aggregate_r2(x, y)}
    for i, name in enumerate(MAF_BIN_NAMES):
        sel = bins == i
        out[name] = aggregate_r2(x[sel], y[sel])
    return out


class DosageR2(Metric):
    """Aggregate dosage r² overall and per MAF bin, from per-bin sufficient statistics.

    ``update(probs, alleles, mask, af)`` with (B, L) tensors in the batch layout: rows 2i and
    2i+1 are one person, so dosage = p[2i] + p[2i+1] and truth = a[2i] + a[2i+1], counted at
    sites masked on both haplotypes (``mask`` is never True at PAD). Alleles are re-coded to
    the minor allele per site (af > 0.5 -> 2 - x).
    """

    full_state_update = False
    higher_is_better = True
    _STATS = ("n", "sx", "sy", "sxx", "syy", "sxy")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        n_bins = len(MAF_BIN_NAMES)
        for s in self._STATS:
            self.add_state(
                s, default=torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, probs: Tensor, alleles: Tensor, mask: Tensor, af: Tensor) -> None:
        B, L = probs.shape
        if B % 2:
            raise ValueError(f"DosageR2 needs whole people (rows 2i, 2i+1), got {B} rows")
        x = probs.detach().double().view(B // 2, 2, L).sum(1)  # (P, L) dosage
        y = alleles.double().view(B // 2, 2, L).sum(1)  # (P, L) true allele count
        m = mask.view(B // 2, 2, L).all(1)  # (P, L)
        a = af.double().view(B // 2, 2, L)[:, 0]  # (P, L), equal on both rows
        flip = a > 0.5
        x = torch.where(flip, 2 - x, x)[m]
        y = torch.where(flip, 2 - y, y)[m]
        bins = maf_bin(torch.minimum(a, 1 - a))[m]
        for name, v in zip(
            self._STATS, (torch.ones_like(x), x, y, x * x, y * y, x * y), strict=True
        ):
            getattr(self, name).index_add_(0, bins, v)

    @staticmethod
    def _r2(n: Tensor, sx: Tensor, sy: Tensor, sxx: Tensor, syy: Tensor, sxy: Tensor) -> Tensor:
        cov = n * sxy - sx * sy
        vx = n * sxx - sx * sx
        vy = n * syy - sy * sy
        r2 = cov * cov / (vx * vy)
        return torch.where((n > 0) & (vx > 0) & (vy > 0), r2, torch.full_like(r2, float("nan")))

    def compute(self) -> dict[str, Tensor]:
        stats = [getattr(self, s) for s in self._STATS]
        per_bin = self._r2(*stats)
        out = {"r2": self._r2(*(s.sum() for s in stats))}
        out.update({name: per_bin[i] for i, name in enumerate(MAF_BIN_NAMES)})
        return out


class MaskedMetrics(nn.Module):
    """F1 (ALT = positive), accuracy, and F1 split rare (MAF < 0.05) / common, at masked sites.

    Accuracy alone looks excellent on rare variants while saying nothing (always "REF" scores
    high), hence F1 on ALT and the rare/common split. Each part is a torchmetrics metric and
    syncs under DDP.
    """

    def __init__(self) -> None:
        super().__init__()
        self.f1 = BinaryF1Score()
        self.acc = BinaryAccuracy()
        self.f1_rare = BinaryF1Score()
        self.f1_common = BinaryF1Score()
        # Sites seen per subset, synced like the rest, so an empty subset reports NaN, not F1 0.
        self.n_rare = SumMetric()
        self.n_common = SumMetric()

    def update(self, probs: Tensor, alleles: Tensor, mask: Tensor, af: Tensor) -> None:
        # Hard calls, not probabilities: torchmetrics applies a sigmoid to float input outside
        # [0, 1], and a second sigmoid is one of the seed's bugs; integer input has no such path.
        call, a = (probs.detach()[mask] > 0.5).long(), alleles[mask].long()
        rare = torch.minimum(af, 1 - af)[mask] < RARE_MAF
        self.n_rare.update(rare.sum())
        self.n_common.update((~rare).sum())
        for metric, sel in (
            (self.f1, None),
            (self.acc, None),
            (self.f1_rare, rare),
            (self.f1_common, ~rare),
        ):
            c, t = (call, a) if sel is None else (call[sel], a[sel])
            if c.numel():  # torchmetrics cannot take an empty update
                metric.update(c, t)

    def compute(self) -> dict[str, Tensor]:
        out = {}
        with warnings.catch_warnings():  # "compute before update" when a subset was empty
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            n_rare, n_common = self.n_rare.compute(), self.n_common.compute()
            counts = {
                "f1": n_rare + n_common,
                "acc": n_rare + n_common,
                "f1_rare": n_rare,
                "f1_common": n_common,
            }
            for name, count in counts.items():
                value = getattr(self, name).compute().float()
                out[name] = torch.where(count > 0, value, torch.full_like(value, float("nan")))
        return out

    def reset(self) -> None:
        for m in self.children():
            m.reset()
