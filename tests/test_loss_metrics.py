"""Focal loss normalisation, and the imputation metrics against plain numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from snvbert.metrics import MAF_BIN_NAMES, DosageR2, MaskedMetrics, aggregate_r2, maf_bin, r2_by_maf
from snvbert.model.loss import focal_loss


def _data(B: int = 8, L: int = 50, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, generator=g) * 3
    targets = torch.randint(0, 2, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) < 0.4
    return logits, targets, mask


def test_focal_gamma0_is_bce() -> None:
    logits, targets, mask = _data()
    want = F.binary_cross_entropy_with_logits(logits[mask], targets[mask].float())
    torch.testing.assert_close(focal_loss(logits, targets, mask, gamma=0.0), want)


def test_focal_matches_definition_and_alpha() -> None:
    logits, targets, mask = _data()
    p = torch.sigmoid(logits.double())
    t = targets.double()
    p_t = p * t + (1 - p) * (1 - t)
    a_t = 0.25 * t + 0.75 * (1 - t)
    want = (-a_t * (1 - p_t) ** 2 * torch.log(p_t))[mask].mean()
    got = focal_loss(logits.double(), targets, mask, gamma=2.0, alpha=0.25)
    torch.testing.assert_close(got, want)


def test_loss_is_per_masked_site() -> None:
    logits, targets, mask = _data()
    one = focal_loss(logits, targets, mask, gamma=2.0)
    two = focal_loss(
        torch.cat([logits, logits]),
        torch.cat([targets, targets]),
        torch.cat([mask, mask]),
        gamma=2.0,
    )
    torch.testing.assert_close(one, two)
    # A constant prediction costs the same per site at any mask rate.
    const = torch.full((8, 200), 0.7)
    ones = torch.ones(8, 200, dtype=torch.long)
    losses = [
        focal_loss(const, ones, torch.rand(8, 200) < rate, gamma=2.0) for rate in (0.05, 0.5, 1.0)
    ]
    torch.testing.assert_close(torch.stack(losses), losses[0].expand(3))
    # No masked site: zero, not NaN.
    assert focal_loss(logits, targets, torch.zeros_like(mask), gamma=2.0).item() == 0.0


def test_aggregate_r2_numpy() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500).astype(float)
    x = y + rng.normal(0, 0.5, 500)
    assert aggregate_r2(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    assert math.isnan(aggregate_r2(np.array([]), np.array([])))
    assert math.isnan(aggregate_r2(x, np.ones_like(x)))


def test_maf_bins() -> None:
    maf = np.array([0.0, 0.0009, 0.001, 0.0049, 0.005, 0.0099, 0.01, 0.049, 0.05, 0.3, 0.5])
    want = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert maf_bin(maf).tolist() == want
    assert maf_bin(torch.tensor(maf)).tolist() == want
    assert MAF_BIN_NAMES == (
        "r2_maf_0_0.001",
        "r2_maf_0.001_0.005",
        "r2_maf_0.005_0.01",
        "r2_maf_0.01_0.05",
        "r2_maf_0.05_0.5",
    )


def _batch(P: int = 40, L: int = 30, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    af = torch.tensor(
        [0.0005, 0.003, 0.007, 0.02, 0.2, 0.45, 0.5, 0.8, 0.97, 0.9995] * (L // 10)
    )  # (L,)
    alleles = (torch.rand(2 * P, L, generator=g) < af).long()
    probs = (alleles.float() * 0.7 + torch.rand(2 * P, L, generator=g) * 0.3).clamp(0, 1)
    mask = torch.rand(2 * P, L, generator=g) < 0.7
    return probs, alleles, mask, af.expand(2 * P, L).clone()


def _numpy_r2(probs, alleles, mask, af) -> dict[str, float]:
    B, L = probs.shape
    x = probs.double().view(B // 2, 2, L).sum(1).numpy()
    y = alleles.double().view(B // 2, 2, L).sum(1).numpy()
    m = mask.view(B // 2, 2, L).all(1).numpy()
    a = np.broadcast_to(af[0].double().numpy(), x.shape)
    return r2_by_maf(x[m], y[m], a[m])


def test_dosage_r2_metric_matches_numpy_over_batches() -> None:
    probs, alleles, mask, af = _batch()
    metric = DosageR2()
    for sl in (slice(0, 20), slice(20, 50), slice(50, 80)):  # whole people per update
        metric.update(probs[sl], alleles[sl], mask[sl], af[sl])
    got = {k: v.item() for k, v in metric.compute().items()}
    want = _numpy_r2(probs, alleles, mask, af)
    assert set(got) == set(want) == {"r2", *MAF_BIN_NAMES}
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, nan_ok=True), k


def test_dosage_r2_counts_the_minor_allele() -> None:
    """At af > 0.5 the minor allele is REF: coding it so changes pooled r² (ALT-coding inflates)."""
    # Two sites in one bin (MAF 0.25): site A af=0.25, site B af=0.75 (ALT common). Truth counts of
    # the minor allele are low at both; ALT-coding would put site B's values near 2 and
    # create spurious between-site variance.
    P = 50
    g = torch.Generator().manual_seed(0)
    af = torch.tensor([0.25, 0.75]).expand(2 * P, 2).clone()  # exact in binary: 2 - 1.5 == 0.5
    alleles = (torch.rand(2 * P, 2, generator=g) < af).long()
    probs = torch.full((2 * P, 2), 0.0) + af  # a model that only knows the frequency
    mask = torch.ones(2 * P, 2, dtype=torch.bool)
    metric = DosageR2()
    metric.update(probs, alleles, mask, af)
    got = metric.compute()["r2_maf_0.05_0.5"].item()
    x = probs.view(P, 2, 2).sum(1).numpy()
    y = alleles.view(P, 2, 2).sum(1).double().numpy()
    minor = aggregate_r2(np.stack([x[:, 0], 2 - x[:, 1]], 1), np.stack([y[:, 0], 2 - y[:, 1]], 1))
    alt = aggregate_r2(x, y)
    assert math.isnan(minor)  # minor-coded, the frequency-only dosage is constant: no information
    assert math.isnan(got)
    assert alt > 0.2  # ALT-coded, the same useless predictor looks informative
    assert math.isnan(r2_by_maf(x, y, np.array([0.25, 0.75]))["r2"])


def test_dosage_r2_only_sites_masked_on_both_haplotypes() -> None:
    probs, alleles, mask, af = _batch(P=10)
    one_side = mask.clone()
    one_side[1::2] = False  # the second haplotype of every person observed: no genotype counts
    metric = DosageR2()
    metric.update(probs, alleles, one_side, af)
    assert metric.n.sum().item() == 0
    assert all(math.isnan(v.item()) for v in metric.compute().values())
    with pytest.raises(ValueError, match="whole people"):
        metric.update(probs[:3], alleles[:3], mask[:3], af[:3])


def test_masked_metrics() -> None:
    probs, alleles, mask, af = _batch()
    m = MaskedMetrics()
    m.update(probs, alleles, mask, af)
    got = {k: v.item() for k, v in m.compute().items()}
    pred, true = (probs[mask] > 0.5).long(), alleles[mask]
    tp = ((pred == 1) & (true == 1)).sum().item()
    f1 = (
        2
        * tp
        / (
            2 * tp
            + ((pred == 1) & (true == 0)).sum().item()
            + ((pred == 0) & (true == 1)).sum().item()
        )
    )
    assert got["f1"] == pytest.approx(f1)
    assert got["acc"] == pytest.approx((pred == true).float().mean().item())
    assert set(got) == {"f1", "acc", "f1_rare", "f1_common"}
    # A model that always says REF: accuracy high on rare sites, F1 0.
    m.reset()
    rare = torch.minimum(af, 1 - af) < 0.05
    m.update(torch.zeros_like(probs), alleles, mask & rare & (af < 0.5), af)
    out = m.compute()
    assert out["acc"] > 0.9 and out["f1"] == 0.0


def test_masked_metrics_empty_subset_is_nan_not_zero() -> None:
    m = MaskedMetrics()
    af = torch.full((2, 5), 0.3)  # common sites only
    m.update(torch.rand(2, 5), torch.randint(0, 2, (2, 5)), torch.ones(2, 5, dtype=torch.bool), af)
    out = m.compute()
    assert math.isnan(out["f1_rare"].item()) and not math.isnan(out["acc"].item())
