"""Reference predictions computed from the same batches the model sees.

The model must beat what its inputs already give away: validation r² is logged beside that of

- ``af``: the training-panel allele frequency (dosage 2·AF);
- ``top1``: copy the best retrieved neighbour (fewest mismatches over the context);
- ``longest``: copy, at each site, the neighbour with the longest run of agreement spanning it;
- ``runs4``: blend all neighbours weighted by ((left run + 1)(right run + 1))^4, the measured
  rule of ../shared/DESIGN.md that comes within 0.005 of an HMM;
- ``hmm``: the Li–Stephens HMM's P(ALT) (``hmm_dose``, when the data computes it): over every
  panel haplotype with ``data.hmm.states=panel``, over the neighbours otherwise.

All four use the same people, masks and neighbours as the model, so the comparison is exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from torch import Tensor

from snvbert.metrics import DosageR2, scored_sites

NAMES = ("af", "top1", "longest", "runs4", "hmm")


def baseline_probs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """P(alt) per site (B, L) for each baseline."""
    alleles = batch["nbr_alleles"]  # (B, K, L)
    valid = batch["nbr_valid"][:, :, None]  # (B, K, 1)
    run = batch["nbr_left"] + batch["nbr_right"]
    run = run.masked_fill(~valid, -1.0)
    longest = torch.gather(alleles, 1, run.argmax(1, keepdim=True)).squeeze(1)
    logw = 4.0 * (torch.log1p(batch["nbr_left"]) + torch.log1p(batch["nbr_right"]))
    weights = torch.softmax(logw.masked_fill(~valid, float("-inf")), dim=1)
    probs = {
        "af": batch["af"].float(),
        "top1": alleles[:, 0],
        "longest": longest,
        "runs4": (weights * alleles).sum(1),
    }
    if "hmm_dose" in batch:
        # the HMM's own P(ALT): over every panel state with data.hmm.states=panel, else over
        # the neighbours; the model's starting point when it has the HMM skip (model.hmm_skip)
        probs["hmm"] = batch["hmm_dose"].float()
    return probs


class Baselines(L.Callback):
    """Logs ``val/baseline_<name>_r2`` for each reference prediction, every validation epoch."""

    def __init__(self) -> None:
        self.metrics = {name: DosageR2() for name in NAMES}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for metric in self.metrics.values():
            metric.to(pl_module.device)
            metric.reset()

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if "nbr_alleles" not in batch:
            return
        scored = scored_sites(batch)
        for name, probs in baseline_probs(batch).items():
            self.metrics[name].update(probs.float(), batch["alleles"], scored, batch["af"])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, metric in self.metrics.items():
            if metric.update_count == 0:
                continue
            r2 = metric.compute()["r2"]
            pl_module.log(f"val/baseline_{name}_r2", r2, sync_dist=False)
