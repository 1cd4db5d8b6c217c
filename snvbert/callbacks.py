"""Lightning callbacks that tie the data's epoch and curriculum to the trainer."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

log = logging.getLogger(__name__)


def _datamodule(trainer: L.Trainer) -> Any:
    return getattr(trainer, "datamodule", None)


def at_final_level(trainer: L.Trainer) -> bool:
    """True when this epoch trained at the curriculum's last (array) level, or there is none.

    Asks the training sampler which level its batches had, not the curriculum: the curriculum
    steps in ``on_train_epoch_end``, before checkpointing and early stopping look, and asking
    it would count the last epoch before the final level as a final one.
    """
    dm = _datamodule(trainer)
    curriculum = getattr(dm, "curriculum", None)
    if curriculum is None:
        return True
    trained = dm.sampler("train").last_level
    return (trained if trained is not None else curriculum.level) == curriculum.final_level


class MaskEpochs(L.Callback):
    """Reseeds training masks at each epoch start and steps the curriculum at each epoch end.

    Lightning has already called ``sampler.set_epoch(current_epoch)`` when
    ``on_train_epoch_start`` runs; this hook makes sure (a sampler left behind would silently
    repeat last epoch's masks, the first seed's failure) and logs the level and the
    fingerprints of this epoch's chip and of the validation chip.
    """

    def __init__(self) -> None:
        self._losses: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = _datamodule(trainer)
        if dm is None or not hasattr(dm, "sampler"):
            return
        sampler = dm.sampler("train")
        if sampler.epoch != trainer.current_epoch:
            log.warning(
                "train sampler was at epoch %d in epoch %d: reseeding it now",
                sampler.epoch,
                trainer.current_epoch,
            )
            sampler.set_epoch(trainer.current_epoch)
        self._losses = []
        level = dm.curriculum.current
        metrics = {
            "data/mask_level": float(dm.curriculum.level),
            "data/mask_rate": float(level.rate if level.strategy != "array" else -1.0),
        }
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)
        log.info(
            "epoch %d: mask level %d/%d (%s), val chip %s",
            trainer.current_epoch,
            dm.curriculum.level,
            dm.curriculum.final_level,
            level.strategy,
            self.val_fingerprint(dm),
        )

    @staticmethod
    def val_fingerprint(dm: Any) -> str:
        """Fingerprint of the validation chip (:meth:`SNVDataModule.val_fingerprint`)."""
        return dm.val_fingerprint()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(float(loss.detach()))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = _datamodule(trainer)
        if dm is None or not hasattr(dm, "curriculum") or not self._losses:
            return
        loss = float(np.mean(self._losses))
        if dm.curriculum.step(loss):
            log.info(
                "curriculum: level %d -> %d (%s) after epoch %d (train loss %.4f)",
                dm.curriculum.level - 1,
                dm.curriculum.level,
                dm.curriculum.current.strategy,
                trainer.current_epoch,
                loss,
            )


class CurriculumEarlyStopping(EarlyStopping):
    """EarlyStopping that counts only epochs at the curriculum's final (array) level."""

    def _should_skip_check(self, trainer: L.Trainer) -> bool:
        return super()._should_skip_check(trainer) or not at_final_level(trainer)


class CurriculumModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose "best" is chosen only among epochs at the final level.

    ``last.ckpt`` is written at every save point, improvement or not (Lightning 2.6 writes it
    only when a top-k checkpoint was saved in the same step), so a resume never repeats epochs.
    """

    _last_written_step = -1

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if at_final_level(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)
        self._save_last_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if self._last_written_step != trainer.global_step:
            self._last_written_step = trainer.global_step
            super()._save_last_checkpoint(trainer, monitor_candidates)
