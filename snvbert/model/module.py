"""SNVBertModule: the LightningModule that trains, validates and predicts with SNVBertNet."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict
from importlib.resources import files
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

from snvbert.metrics import DosageR2, MaskedMetrics, scored_sites
from snvbert.model.loss import focal_loss
from snvbert.model.net import LEGACY_NET, NetConfig, SNVBertNet

log = logging.getLogger(__name__)

# conf/train.yaml as written: the defaults of `loss.*` and `compile` below are its values, so a
# module built in Python trains as `python -m snvbert.train` does (the YAML is their one place).
TRAIN_DEFAULTS = OmegaConf.create((files("snvbert.conf") / "train.yaml").read_text())


def rng_states() -> dict[str, Any]:
    """torch's (CPU and each GPU's), numpy's global and Python's RNG states, as tensors and
    plain values."""
    mt, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global one)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [mt, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Set the RNGs to what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    mt, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((mt, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def n_hidden(batch: Mapping[str, Tensor]) -> int:
    """Hidden sites in a batch: the weight of its per-site mean loss in an epoch mean."""
    return max(int(batch["mask"].sum()), 1)


class SNVBertModule(L.LightningModule):
    """Focal loss on masked sites; F1/accuracy and dosage r² by MAF bin on validation and test.

    Args:
        net: the network, or its config (a NetConfig or dict, as stored in a checkpoint).
        optimizer: a partial optimizer (Hydra ``_partial_: true``), called with ``params`` and ``lr``.
            Needed to train, not to predict.
        scheduler: a partial from :mod:`snvbert.model.schedule`, called with the optimizer and
            ``total_steps``; None for a constant lr.
        lr: the learning rate. It is the lr the optimizer gets, before the schedule's factor.
            Needed to train; no default, so that no lr is ever chosen in code.
        focal_gamma, focal_alpha: see :func:`snvbert.model.loss.focal_loss`.
        compile: wrap the net in ``torch.compile`` at fit start.

    The defaults of ``focal_gamma``, ``focal_alpha`` and ``compile`` are conf/train.yaml's.
    """

    def __init__(
        self,
        net: SNVBertNet | NetConfig | Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        lr: float | None = None,
        focal_gamma: float = TRAIN_DEFAULTS.loss.focal_gamma,
        focal_alpha: float | None = TRAIN_DEFAULTS.loss.focal_alpha,
        compile: bool = TRAIN_DEFAULTS.compile,
    ) -> None:
        super().__init__()
        if not isinstance(net, SNVBertNet):
            net = SNVBertNet({**LEGACY_NET, **net} if isinstance(net, Mapping) else net)
        # Store the net as its plain config, and leave the optimizer and scheduler partials out:
        # the checkpoint's hparams are then plain values, so `load_from_checkpoint(path)` works
        # with torch's default weights_only=True loading and rebuilds the same architecture
        # (strict state-dict load) without Hydra. Training always builds the module from config.
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.hparams["net"] = asdict(net.config)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.net = net
        self.train_metrics = MaskedMetrics()
        self.val_metrics = MaskedMetrics()
        self.val_r2 = DosageR2()
        self.test_metrics = MaskedMetrics()
        self.test_r2 = DosageR2()

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.net(batch)

    def _loss(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return focal_loss(
            logits,
            batch["alleles"],
            batch["mask"],
            self.hparams.focal_gamma,
            self.hparams.focal_alpha,
        )

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        out = self.net(batch)
        loss = self._loss(out["logits"], batch)
        B = batch["tokens"].shape[0]
        # The epoch value is a mean weighted by hidden sites, so it is the loss per hidden site
        # over the epoch, however many sites each batch hides.
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=n_hidden(batch),
        )
        self.log(
            "train/fusion_entropy",
            out["fusion_entropy"],
            on_step=True,
            on_epoch=False,
            batch_size=B,
        )
        self.train_metrics.update(
            torch.sigmoid(out["logits"]), batch["alleles"], scored_sites(batch), batch["af"]
        )
        return loss

    def on_train_epoch_end(self) -> None:
        for name, value in self.train_metrics.compute().items():
            self.log(f"train/{name}", value, sync_dist=True)
        self.train_metrics.reset()

    def _eval_step(self, batch: Mapping[str, Tensor], stage: str) -> Tensor:
        out = self.net(batch)
        loss = self._loss(out["logits"], batch)
        probs = torch.sigmoid(out["logits"])  # the only sigmoid between logits and metrics
        B = batch["tokens"].shape[0]
        self.log(
            f"{stage}/loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=n_hidden(batch),
        )
        self.log(
            f"{stage}/fusion_entropy",
            out["fusion_entropy"],
            on_epoch=True,
            sync_dist=True,
            batch_size=B,
        )
        metrics, r2 = (
            (self.val_metrics, self.val_r2) if stage == "val" else (self.test_metrics, self.test_r2)
        )
        scored = scored_sites(batch)
        metrics.update(probs, batch["alleles"], scored, batch["af"])
        r2.update(probs, batch["alleles"], scored, batch["af"])
        return loss

    def _eval_epoch_end(self, stage: str) -> None:
        metrics, r2 = (
            (self.val_metrics, self.val_r2) if stage == "val" else (self.test_metrics, self.test_r2)
        )
        values = {**metrics.compute(), **r2.compute()}
        for name, value in values.items():
            self.log(
                f"{stage}/{name}", value.float(), prog_bar=name in ("f1", "r2"), sync_dist=True
            )
        metrics.reset()
        r2.reset()

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(
        self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """P(alt) per site, with the keys that place it: ``site``, ``hap``, ``core`` (and ``mask``, ``pad``)."""
        prob = torch.sigmoid(self.net(batch)["logits"])  # (B, L)
        out = {"prob": prob}
        out.update({k: batch[k] for k in ("site", "hap", "core", "mask", "pad") if k in batch})
        return {k: v.detach().cpu() for k, v in out.items()}

    def setup(self, stage: str) -> None:
        if self.hparams.compile and stage == "fit":
            # In place: the state-dict keys stay those of the plain net, so checkpoints load
            # into an uncompiled net for imputation.
            self.net.compile()

    def on_fit_start(self) -> None:
        net = getattr(self.net, "_orig_mod", self.net)
        n = net.count_parameters()
        msg = f"SNVBertNet: {n:,} trainable parameters ({n / 1e6:.2f} M)"
        log.info(msg)
        if self.trainer.is_global_zero:
            print(msg, flush=True)

    # -- exact resume: the random number generators --------------------------------------------
    # Lightning restores weights, optimizer, schedule, loops and callbacks but not the RNGs
    # (dropout draws from torch's). Their states at the checkpoint are saved as plain values
    # (weights_only loading) and set again just before the first batch a resumed run trains,
    # so that nothing drawn while resuming (the loader's base seed, say) shifts them.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        states = getattr(self, "_rng_to_restore", None)
        if states is not None:
            self._rng_to_restore = None
            set_rng_states(states)

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None or self.hparams.lr is None:
            raise ValueError(
                "SNVBertModule needs `optimizer` and `lr` to train (see conf/train.yaml)"
            )
        net: SNVBertNet = getattr(self.net, "_orig_mod", self.net)
        decay, no_decay = net.decay_split()
        # The decayed group takes the optimizer config's weight_decay; norms, biases and
        # embeddings are never decayed (shrinking them towards 0 is not regularisation).
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = self.optimizer_factory(params=groups, lr=self.hparams.lr)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
