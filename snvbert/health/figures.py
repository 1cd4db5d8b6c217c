"""The training-health figures, measured from tensors, the net and the datamodule.

Each function turns what a training run has at hand (a batch, the net's output, its parameters,
the datamodule) into the plain numbers that :mod:`snvbert.health.checks` judges. torch and
numpy only: no Lightning, no verdicts. :class:`snvbert.health.TrainingHealth` calls them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from snvbert.health.checks import FusionFigures
from snvbert.model.schedule import FACTORS, lr_at


def norm(tensors: list[Tensor]) -> float:
    """The L2 norm of all the tensors together (0 for none)."""
    if not tensors:
        return 0.0
    return float(
        torch.linalg.vector_norm(torch.stack([t.detach().float().norm() for t in tensors]))
    )


def expected_lr(pl_module: Any, trainer: Any, step: int) -> float | None:
    """The lr the configuration asks for at optimizer step ``step``; None when unknowable.

    Recomputed from ``hparams.lr`` and the module's scheduler *partial* (its function name and
    keyword arguments, with ``total_steps`` from the trainer as the module passes it) through
    :func:`snvbert.model.schedule.lr_at`, never read back from the optimizer or the scheduler
    object: the seed's bug lived exactly there, in a wrapper that ignored the configured lr.
    """
    lr = getattr(pl_module.hparams, "lr", None)
    if lr is None:
        return None
    factory = getattr(pl_module, "scheduler_factory", None)
    if factory is None:
        return float(lr)  # no schedule: the configured lr throughout
    if isinstance(factory, functools.partial) and factory.func.__name__ in FACTORS:
        name = factory.func.__name__
        kwargs = {
            k: p.default
            for k, p in inspect.signature(factory.func).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        kwargs.update(factory.keywords)
        kwargs["total_steps"] = int(trainer.estimated_stepping_batches)
        names = ("warmup_steps", "total_steps", "warmup_start_factor", "min_factor")
        return lr_at(name, step, float(lr), **{k: kwargs[k] for k in names if k in kwargs})
    return None


def parameter_groups(net: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Named parts of the net whose gradients and updates are judged separately.

    ``SNVBertNet.param_groups`` (embedding, block.i, fusion, head), with the fusion split by
    depth when there are several, so a detached fusion at one depth is not hidden by the other.
    Any other module: its top-level children.
    """
    if hasattr(net, "param_groups"):
        groups = dict(net.param_groups())
        fusion = getattr(net, "fusion", None)
        if isinstance(fusion, nn.ModuleDict) and len(fusion) > 1 and "fusion" in groups:
            del groups["fusion"]
            groups.update({f"fusion.{d}": list(m.parameters()) for d, m in fusion.items()})
    else:
        groups = {name: list(m.parameters()) for name, m in net.named_children()}
    return {name: ps for name, ps in groups.items() if ps}


def fusion_figures(
    out: Mapping[str, Tensor], batch: Mapping[str, Any], pad: Tensor | None
) -> FusionFigures | None:
    """The fusion attention of one forward (``return_weights=True``); None without neighbours
    in the batch or fusion weights in the output."""
    valid = batch.get("nbr_valid")
    weights = out.get("fusion_weights")  # (B, H, L, K)
    entropy = out.get("fusion_entropy")
    if valid is None or weights is None or entropy is None:
        return None
    n_valid = valid.sum(1)
    keep = (
        out["ran"]  # the sites the network ran at (with model.hmm_certain, not the certain ones)
        if "ran" in out
        else ~pad
        if pad is not None
        else torch.ones(weights.shape[0], weights.shape[2], dtype=torch.bool, device=weights.device)
    )
    wmax = weights.amax(-1).permute(0, 2, 1)[keep]  # (sites x heads) max weight per query
    return FusionFigures(
        entropy=float(entropy),
        k_max=int(n_valid.max()) if n_valid.numel() else 0,
        max_weight=float(wmax.mean()),
        all_one=bool((wmax >= 1 - 1e-6).all()) if wmax.numel() else False,
    )


def logit_spread(logits: Tensor, pad: Tensor | None) -> float | None:
    """Mean over the sites no item pads of the std of the logits (B, L) across items; None
    for fewer than two items or no such site."""
    if logits.dim() != 2 or logits.shape[0] < 2:
        return None
    x = logits.float()
    cols = (
        ~pad.any(0)
        if pad is not None
        else torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
    )
    if not bool(cols.any()):
        return None
    return float(x[:, cols].std(0).mean())


class RetrievalCounts(NamedTuple):
    """The neighbours of one batch."""

    neighbours: int  # valid neighbours in all
    self_hits: int  # the query haplotype itself
    person_hits: int  # either haplotype of the query's person
    valid: Tensor  # (B, K) bool


def retrieval_counts(batch: Mapping[str, Any]) -> RetrievalCounts | None:
    """Self- and own-person retrieval over the whole batch; None without ``nbr_hap``, ``hap``
    and ``person``."""
    nbr = batch.get("nbr_hap")
    if nbr is None or "hap" not in batch or "person" not in batch:
        return None
    valid = batch.get("nbr_valid", nbr >= 0)
    hap, person = batch["hap"], batch["person"]
    return RetrievalCounts(
        neighbours=int(valid.sum()),
        self_hits=int(((nbr == hap[:, None]) & valid).sum()),
        person_hits=int(((nbr // 2 == person[:, None]) & valid).sum()),
        valid=valid,
    )


def alignment_counts(
    haplotypes: Any,
    batch: Mapping[str, Any],
    valid: Tensor,
    samples: int,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """Compare ``samples`` random (row, neighbour) pairs with the panel over the window.

    Whole rows, not single entries: a one-site shift only shows where neighbouring sites
    differ, and rare variants make that uncommon. ``haplotypes`` is the panel's allele matrix
    (sites x haplotypes). Returns (entries checked, entries wrong); (0, 0) when there is
    nothing to compare.
    """
    alleles, site, nbr = batch.get("nbr_alleles"), batch.get("site"), batch["nbr_hap"]
    if haplotypes is None or alleles is None or site is None or samples <= 0:
        return 0, 0
    pairs = torch.nonzero(valid, as_tuple=False).cpu().numpy()  # (n, 2): row b, neighbour k
    if len(pairs) == 0:
        return 0, 0
    pairs = pairs[rng.choice(len(pairs), min(samples, len(pairs)), replace=False)]
    b, k = torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1])
    got = alleles[b, k].cpu().numpy()  # (n, L)
    sites = site[b].cpu().numpy()  # (n, L), -1 at PAD
    haps = nbr[b, k].cpu().numpy()
    checked = bad = 0
    for row_alleles, row_sites, h in zip(got, sites, haps, strict=True):
        real = row_sites >= 0
        truth = np.asarray(haplotypes[row_sites[real], int(h)])
        checked += int(real.sum())
        bad += int((row_alleles[real].astype(np.int64) != truth.astype(np.int64)).sum())
    return checked, bad


def val_chip_fingerprint(dm: Any) -> str | None:
    """A fingerprint of the masks validation measures with
    (:meth:`snvbert.data.datamodule.SNVDataModule.val_fingerprint`, which
    ``snvbert.callbacks.MaskEpochs`` also logs at each epoch start); None for a datamodule
    without one."""
    fingerprint = getattr(dm, "val_fingerprint", None)
    return None if fingerprint is None else fingerprint()
